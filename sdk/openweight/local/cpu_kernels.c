/* openweight's own matrix products for packed weights on x86 CPUs with AVX2 and FMA.

   They read the tensors PyTorch's packed kernels take, as PyTorch packed them, so nothing
   is repacked or stored twice, and compute in float32 (PyTorch's take bfloat16
   activations): see kernels.py for why and when they run. Built by kernels.py with the
   system's C compiler (-O3 -mavx2 -mfma -fopenmp), once per machine. OpenMP: the process
   already holds PyTorch's libgomp.so.1, so these loops share its threads. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* PyTorch's packed int4 CPU layout, blocks of block_n rows (64 in its AVX-512 build, 32 in
   its AVX2 one): [N/block_n][K][block_n/2] bytes, byte j of (block, k) holds row
   block_n*block + j in its low nibble and row block_n*block + block_n/2 + j in its high
   one. scale_zero is [K/32][N][2] bfloat16 (scale, zero): weight = (q - 8) * scale + zero,
   so a group's sum of x * weight is scale * (sum x*q - 8 sum x) + zero * sum x. */

static inline __m256 bf16_lo(__m256i pairs) { return _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)); }
static inline __m256 bf16_hi(__m256i pairs) {
    return _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32((int)0xFFFF0000)));
}

/* the group's sums for 8 rows at ``row`` of the table, added to out[0..8) */
static inline void finish(const uint16_t *sz, int64_t N, int64_t g, int64_t row, __m256 acc,
                          float xs, float *out) {
    __m256i p = _mm256_loadu_si256((const __m256i *)(sz + (g * N + row) * 2));
    __m256 vs = _mm256_set1_ps(xs);
    __m256 o = _mm256_loadu_ps(out);
    o = _mm256_fmadd_ps(bf16_lo(p), _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), vs, acc), o);
    o = _mm256_fmadd_ps(bf16_hi(p), vs, o);
    _mm256_storeu_ps(out, o);
}

/* Groups ahead whose scale/zero rows a single-token product asks the memory for: the
   weights stream in order, but each group's rows of the table are a whole table row apart,
   too far for the hardware to guess. Two ahead measured 10-40% faster than none on the 1B
   shape's products, weights out of cache (one ahead and four were between, eight no gain). */
#define TABLE_AHEAD 2

/* T tokens (1 or 2), one block of rows, with the tokens' activations as int16 (a scale per
   group of 32: 2^-15 of the group's largest, far finer than bfloat16): pairs of k run through
   madd, 16 products an instruction, against 8 for float FMA. Each row's sums are the same
   whichever T computes them. Two tokens share each unpacking of the weights (more would
   not fit the 16 registers). */
static inline __attribute__((always_inline)) void block16(
    const uint8_t *w, const uint16_t *sz, const int16_t *xq, const float *xscale,
    const float *xsum, float *out, int64_t K, int64_t N, int64_t n0, int half, const int T) {
    const __m256i mask = _mm256_set1_epi16(15);
    const int64_t groups = K / 32;
    for (int t = 0; t < T; t++)
        for (int i = 0; i < 2 * half; i += 8)
            _mm256_storeu_ps(out + t * N + n0 + i, _mm256_setzero_ps());
    for (int c = 0; c < half; c += 16)
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *wp = w + g * 32 * half + c;
            __m256i a[2][4];
            for (int t = 0; t < T; t++)
                for (int j = 0; j < 4; j++) a[t][j] = _mm256_setzero_si256();
            if (g + TABLE_AHEAD < groups) { /* the table's rows of a group lie N apart */
                _mm_prefetch((const char *)(sz + ((g + TABLE_AHEAD) * N + n0 + c) * 2), _MM_HINT_T0);
                _mm_prefetch((const char *)(sz + ((g + TABLE_AHEAD) * N + n0 + half + c) * 2),
                             _MM_HINT_T0);
            }
            for (int k = 0; k < 32; k += 2) {
                __m128i u = _mm_loadu_si128((const __m128i *)(wp + k * half));
                __m128i v = _mm_loadu_si128((const __m128i *)(wp + (k + 1) * half));
                __m256i w0 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(u, v));
                __m256i w1 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(u, v));
                __m256i q[4] = {_mm256_and_si256(w0, mask), _mm256_and_si256(w1, mask),
                                _mm256_srli_epi16(w0, 4), _mm256_srli_epi16(w1, 4)};
                for (int t = 0; t < T; t++) {
                    int32_t pair;
                    memcpy(&pair, xq + t * K + g * 32 + k, 4);
                    __m256i xv = _mm256_set1_epi32(pair);
                    for (int j = 0; j < 4; j++)
                        a[t][j] = _mm256_add_epi32(a[t][j], _mm256_madd_epi16(q[j], xv));
                }
            }
            /* rows of a[.][0..3]: c, c + 8 (low nibbles), half + c, half + c + 8 (high) */
            const int64_t rows[4] = {n0 + c, n0 + c + 8, n0 + half + c, n0 + half + c + 8};
            for (int t = 0; t < T; t++) {
                __m256 s = _mm256_set1_ps(xscale[t * groups + g]);
                for (int j = 0; j < 4; j++)
                    finish(sz, N, g, rows[j], _mm256_mul_ps(_mm256_cvtepi32_ps(a[t][j]), s),
                           xsum[t * groups + g], out + t * N + rows[j]);
            }
        }
}

/* x [K] as int16 per group of 32, with each group's scale and its float sum */
static void quantize16(const float *x, int64_t K, int16_t *xq, float *xscale, float *xsum) {
    for (int64_t g = 0; g < K / 32; g++) {
        float top = 0, sum = 0;
        for (int k = 0; k < 32; k++) {
            float a = x[g * 32 + k] < 0 ? -x[g * 32 + k] : x[g * 32 + k];
            top = a > top ? a : top;
            sum += x[g * 32 + k];
        }
        float scale = top / 32767.0f, inv = top > 0 ? 32767.0f / top : 0.0f;
        for (int k = 0; k < 32; k++) xq[g * 32 + k] = (int16_t)__builtin_lrintf(x[g * 32 + k] * inv);
        xscale[g] = scale;
        xsum[g] = sum;
    }
}

/* block ``b`` of out [M, N] = x @ weight.T, the tokens two at a time (one unpacking each;
   unpacking once for all tokens into a table in the first-level cache measured slower, the
   multiply-adds and the finishing per token being the larger share) */
static void int4_block(const uint8_t *w, const uint16_t *sz, const int16_t *xq,
                       const float *xscale, const float *xsum, float *out, int64_t M,
                       int64_t K, int64_t N, int64_t b, int block_n) {
    const int64_t groups = K / 32;
    const int half = block_n / 2;
    const uint8_t *wb = w + b * K * half;
    int64_t m = 0;
    for (; m + 2 <= M; m += 2)
        block16(wb, sz, xq + m * K, xscale + m * groups, xsum + m * groups, out + m * N,
                K, N, b * block_n, half, 2);
    if (m < M)
        block16(wb, sz, xq + m * K, xscale + m * groups, xsum + m * groups, out + m * N,
                K, N, b * block_n, half, 1);
}

/* out [M, N] = x [M, K] @ weight.T, float32, for a weight packed in blocks of block_n
   rows (N a multiple of it, K of 32); returns 0, or -1 when out of memory */
int ow_int4_mm(const float *x, const uint8_t *w, const uint16_t *sz, float *out,
               int64_t M, int64_t K, int64_t N, int threads, int block_n) {
    const int64_t groups = K / 32;
    float *xsum = malloc(sizeof(float) * (size_t)(M * groups));
    float *xscale = malloc(sizeof(float) * (size_t)(M * groups));
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)(M * K));
    if (xsum == NULL || xscale == NULL || xq == NULL) {
        free(xsum); free(xscale); free(xq);
        return -1;
    }
    for (int64_t m = 0; m < M; m++)
        quantize16(x + m * K, K, xq + m * K, xscale + m * groups, xsum + m * groups);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < N / block_n; b++)
        int4_block(w, sz, xq, xscale, xsum, out, M, K, N, b, block_n);
    free(xsum);
    free(xscale);
    free(xq);
    return 0;
}

static inline __m256 int8_8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* the eight sums of a0..a7, in order */
static inline __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5,
                           __m256 a6, __m256 a7) {
    __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20),
                         _mm256_permute2f128_ps(s0, s1, 0x31));
}

/* the four sums of a0..a3, in order, each summed as hsum8 sums it */
static inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* two tokens' sums of 4 rows (r: the rows; x: the tokens' activations, K apart), scaled,
   written to out[t * N + n0 + i] for the first ``rows`` of them: the tokens share each
   conversion of the weights to float (8 accumulators: 4 rows by 2 tokens fit the
   registers where 8 by 2 would not) */
static void int8_pair(const float *x, const int8_t *const *r, const uint16_t *scales,
                      float *out, int64_t K, int64_t N, int64_t n0, int rows) {
    const int64_t body = K & ~(int64_t)7;
    __m256 a[2][4];
    for (int t = 0; t < 2; t++)
        for (int i = 0; i < 4; i++) a[t][i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < body; k += 8) {
        const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + K + k);
        for (int i = 0; i < 4; i++) {
            const __m256 wv = int8_8(r[i] + k);
            a[0][i] = _mm256_fmadd_ps(wv, x0, a[0][i]);
            a[1][i] = _mm256_fmadd_ps(wv, x1, a[1][i]);
        }
    }
    for (int t = 0; t < 2; t++) {
        float sums[4];
        _mm_storeu_ps(sums, hsum4(a[t][0], a[t][1], a[t][2], a[t][3]));
        for (int i = 0; i < rows; i++) {
            for (int64_t k = body; k < K; k++) sums[i] += x[t * K + k] * (float)r[i][k];
            out[t * N + n0 + i] = sums[i] * bf16_to_float(scales[n0 + i]);
        }
    }
}

/* out [M, N] rows n0..n0+7 = (x [M, K] @ w.T) * scales, w [N, K] int8 row-major, scales [N]
   bfloat16: tokens in pairs (int8_pair, on each half of the rows), a last one alone on all
   eight rows (one load of x serves all eight). Each row's sum is summed in the same order
   either way, so it is the same whatever tokens run beside it. */
static void int8_tile(const float *x, const int8_t *w, const uint16_t *scales, float *out,
                      int64_t K, int64_t N, int64_t n0, int64_t M) {
    const int64_t body = K & ~(int64_t)7;
    const int rows = N - n0 < 8 ? (int)(N - n0) : 8;
    const int8_t *r[8];
    for (int i = 0; i < 8; i++) r[i] = w + (n0 + (i < rows ? i : 0)) * K;
    int64_t m = 0;
    for (; m + 2 <= M; m += 2)
        for (int half = 0; half < 2 && 4 * half < rows; half++)
            int8_pair(x + m * K, r + 4 * half, scales, out + m * N, K, N, n0 + 4 * half,
                      rows - 4 * half < 4 ? rows - 4 * half : 4);
    for (; m < M; m++) {
        const float *xm = x + m * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0,
               a6 = a0, a7 = a0;
        for (int64_t k = 0; k < body; k += 8) {
            __m256 xv = _mm256_loadu_ps(xm + k);
            a0 = _mm256_fmadd_ps(int8_8(r[0] + k), xv, a0);
            a1 = _mm256_fmadd_ps(int8_8(r[1] + k), xv, a1);
            a2 = _mm256_fmadd_ps(int8_8(r[2] + k), xv, a2);
            a3 = _mm256_fmadd_ps(int8_8(r[3] + k), xv, a3);
            a4 = _mm256_fmadd_ps(int8_8(r[4] + k), xv, a4);
            a5 = _mm256_fmadd_ps(int8_8(r[5] + k), xv, a5);
            a6 = _mm256_fmadd_ps(int8_8(r[6] + k), xv, a6);
            a7 = _mm256_fmadd_ps(int8_8(r[7] + k), xv, a7);
        }
        float sums[8];
        _mm256_storeu_ps(sums, hsum8(a0, a1, a2, a3, a4, a5, a6, a7));
        for (int i = 0; i < rows; i++) {
            for (int64_t k = body; k < K; k++) sums[i] += xm[k] * (float)r[i][k];
            out[m * N + n0 + i] = sums[i] * bf16_to_float(scales[n0 + i]);
        }
    }
}

/* out [M, N] = (x [M, K] @ w.T) * scales */
void ow_int8_mm(const float *x, const int8_t *w, const uint16_t *scales, float *out,
                int64_t M, int64_t K, int64_t N, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t tile = 0; tile < (N + 7) / 8; tile++)
        int8_tile(x, w, scales, out, K, N, tile * 8, M);
}

/* ---- a decode step of a Llama-style model's layers, for a few rows, in one call ----
   The same computation as fast.py's layers (and the products above), with no PyTorch
   operation between: a decode step of a small model is otherwise mostly the dispatch of
   ~30 small operations a layer. One OpenMP region runs every layer; the products, the
   attention heads and the rows' small steps are shared out. A row is one token: the single
   stream's next one, or one of several requests' in the server's batch; each row's
   results are the same whatever rows run beside it. */

typedef struct {
    int32_t kind;          /* 4: int4 in PyTorch's packing, 8: int8 rows */
    int32_t rows, cols;
    const void *weight;
    const uint16_t *table; /* int4: [cols/32, rows, 2] (scale, zero); int8: [rows] scales */
    const float *bias;     /* [rows], or NULL */
} ow_linear;

typedef struct {
    int32_t hidden, heads, kv_heads, head_dim, block_n;
    float eps1, eps2, qk_eps, scaling;
    const float *norm1, *norm2;   /* [hidden] */
    const float *q_norm, *k_norm; /* [head_dim], or NULL */
    ow_linear qkv, o, gate_up, down;
} ow_layer;

/* a row's place in each layer's KV cache: its key and value go to slot ``write``; it
   attends to ``length`` slots (its own the last): those from slot ``start``, or, given a
   table of slots, those it lists from its entry ``start`` */
typedef struct { int64_t write, start, length; } ow_span;

typedef struct { const float *x; int16_t *xq; float *xscale, *xsum; } ow_input;

/* row m of a product's input (x: [M, p->cols]) made ready for it */
static void prepare(const ow_linear *p, const ow_input *in, int64_t m) {
    if (p->kind != 4) return;
    const int64_t groups = p->cols / 32;
    quantize16(in->x + m * p->cols, p->cols, in->xq + m * p->cols, in->xscale + m * groups,
               in->xsum + m * groups);
}

/* this thread's share of out [M, rows] = p(in) (inside the parallel region; ends on a
   barrier) */
static void product(const ow_linear *p, const ow_input *in, int64_t M, float *out,
                    int block_n) {
    if (p->kind == 4) {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < p->rows / block_n; b++)
            int4_block((const uint8_t *)p->weight, p->table, in->xq, in->xscale, in->xsum, out,
                       M, p->cols, p->rows, b, block_n);
    } else {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < (p->rows + 7) / 8; t++)
            int8_tile(in->x, (const int8_t *)p->weight, p->table, out, p->cols, p->rows,
                      t * 8, M);
    }
}

static void add_bias(const ow_linear *p, float *out) {
    if (p->bias != NULL)
        for (int i = 0; i < p->rows; i++) out[i] += p->bias[i];
}

static void rms_norm(const float *x, const float *w, float eps, int n, float *out) {
    double squares = 0;
    for (int i = 0; i < n; i++) squares += (double)x[i] * x[i];
    float inv = 1.0f / sqrtf((float)(squares / n) + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * inv * w[i];
}

/* x * cos + [x2, x1] * sin (sin carries the sign), in place */
static void rope(float *x, const float *cos, const float *sin, int dim, float *tmp) {
    const int half = dim / 2;
    for (int i = 0; i < dim; i++) tmp[i] = x[i] * cos[i] + x[(i + half) % dim] * sin[i];
    memcpy(x, tmp, sizeof(float) * (size_t)dim);
}

static inline float dot(const float *a, const float *b, int n) {
    __m256 s = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s);
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_movehdup_ps(t));
    float r = _mm_cvtss_f32(t);
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

/* one head's attention over ``length`` cached positions, ``stride`` floats apart: the
   first ``length``, or those ``slots`` lists */
static void attend(const float *q, const float *keys, const float *values,
                   const int64_t *slots, int64_t length, int64_t stride, int dim,
                   float scaling, float *scores, float *out) {
    float top = -INFINITY;
    for (int64_t j = 0; j < length; j++) {
        scores[j] = scaling * dot(q, keys + (slots ? slots[j] : j) * stride, dim);
        top = scores[j] > top ? scores[j] : top;
    }
    float total = 0;
    for (int64_t j = 0; j < length; j++) {
        scores[j] = expf(scores[j] - top);
        total += scores[j];
    }
    for (int d = 0; d < dim; d++) out[d] = 0;
    for (int64_t j = 0; j < length; j++) {
        const float p = scores[j] / total, *v = values + (slots ? slots[j] : j) * stride;
        for (int d = 0; d < dim; d++) out[d] += p * v[d];
    }
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* x [M, hidden]: the rows' hidden states, in and out. keys[i], values[i]: layer i's cache,
   slot s of kv head h at h * head_stride + s * token_stride (head_dim floats in a row);
   spans[m]: row m's slots, read from ``reads`` where it is not NULL. cos, sin:
   [M, head_dim], each row's rotary row. Returns 0, or -1 when out of memory. */
int ow_decode_layers(const ow_layer *layers, int32_t count, float *x, int64_t M,
                     float *const *keys, float *const *values, int64_t head_stride,
                     int64_t token_stride, const ow_span *spans, const int64_t *reads,
                     const float *cos, const float *sin, int threads) {
    int64_t widest = 0, heads = 0, keys_seen = 0;
    for (int i = 0; i < count; i++) {
        const ow_layer *L = &layers[i];
        const int64_t sizes[] = {L->hidden, L->qkv.rows, L->gate_up.rows,
                                 (int64_t)L->heads * L->head_dim};
        for (int j = 0; j < 4; j++) widest = sizes[j] > widest ? sizes[j] : widest;
        heads = L->heads > heads ? L->heads : heads;
    }
    int64_t *first = malloc(sizeof(int64_t) * (size_t)M); /* row m's scores from here */
    for (int64_t m = 0; first != NULL && m < M; m++) {
        first[m] = keys_seen * heads;
        keys_seen += spans[m].length;
    }
    const int64_t row = widest;
    float *buf = malloc(sizeof(float) * (size_t)(5 * M * row + heads * keys_seen));
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)(M * row));
    if (first == NULL || buf == NULL || xq == NULL) {
        free(first); free(buf); free(xq);
        return -1;
    }
    float *normed = buf, *mixed = buf + M * row, *attn = buf + 2 * M * row,
          *xscale = buf + 3 * M * row, *xsum = buf + 4 * M * row, *scores = buf + 5 * M * row;
    const int64_t hidden = layers[0].hidden;
#pragma omp parallel num_threads(threads)
    for (int i = 0; i < count; i++) {
        const ow_layer *L = &layers[i];
        const int dim = L->head_dim, nq = L->heads * dim, nk = L->kv_heads * dim;
        const int group = L->heads / L->kv_heads, inter = L->gate_up.rows / 2;
        const int64_t width = L->qkv.rows;
        float *kc = keys[i], *vc = values[i];
        ow_input in = {normed, xq, xscale, xsum};
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            rms_norm(x + m * hidden, L->norm1, L->eps1, (int)hidden, normed + m * hidden);
            prepare(&L->qkv, &in, m);
        }
        product(&L->qkv, &in, M, mixed, L->block_n);
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            float *mine = mixed + m * width, *tmp = attn + m * row;
            add_bias(&L->qkv, mine);
            for (int h = 0; h < L->heads + L->kv_heads; h++) {
                float *head = mine + h * dim;
                if (L->q_norm != NULL) {
                    rms_norm(head, h < L->heads ? L->q_norm : L->k_norm, L->qk_eps, dim, tmp);
                    memcpy(head, tmp, sizeof(float) * (size_t)dim);
                }
                rope(head, cos + m * dim, sin + m * dim, dim, tmp);
            }
            const int64_t slot = spans[m].write * token_stride;
            for (int h = 0; h < L->kv_heads; h++) {
                memcpy(kc + h * head_stride + slot, mine + nq + h * dim, sizeof(float) * (size_t)dim);
                memcpy(vc + h * head_stride + slot, mine + nq + nk + h * dim,
                       sizeof(float) * (size_t)dim);
            }
        }
#pragma omp for schedule(static)
        for (int64_t task = 0; task < M * L->heads; task++) {
            const int64_t m = task / L->heads, h = task % L->heads;
            const int64_t *slots = reads == NULL ? NULL : reads + spans[m].start;
            const int64_t from = (h / group) * head_stride +
                                 (slots == NULL ? spans[m].start * token_stride : 0);
            attend(mixed + m * width + h * dim, kc + from, vc + from, slots, spans[m].length,
                   token_stride, dim, L->scaling, scores + first[m] + h * spans[m].length,
                   attn + m * nq + h * dim);
        }
        in.x = attn;
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) prepare(&L->o, &in, m);
        product(&L->o, &in, M, mixed, L->block_n);
        in.x = normed;
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            float *mine = mixed + m * hidden, *xm = x + m * hidden;
            add_bias(&L->o, mine);
            for (int64_t j = 0; j < hidden; j++) xm[j] += mine[j];
            rms_norm(xm, L->norm2, L->eps2, (int)hidden, normed + m * hidden);
            prepare(&L->gate_up, &in, m);
        }
        product(&L->gate_up, &in, M, mixed, L->block_n);
        in.x = attn;
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            float *mine = mixed + m * L->gate_up.rows, *act = attn + m * inter;
            add_bias(&L->gate_up, mine);
            for (int j = 0; j < inter; j++) act[j] = silu(mine[j]) * mine[inter + j];
            prepare(&L->down, &in, m);
        }
        product(&L->down, &in, M, mixed, L->block_n);
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            float *mine = mixed + m * hidden, *xm = x + m * hidden;
            add_bias(&L->down, mine);
            for (int64_t j = 0; j < hidden; j++) xm[j] += mine[j];
        }
    }
    free(first);
    free(buf);
    free(xq);
    return 0;
}
