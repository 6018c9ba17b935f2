"""The harmony special tokens and a small harmony-style chat template, for tiny gpt-oss
models in the tests and the gpt-oss shapes in benchmarks/bench_scale.py."""

HARMONY_SPECIALS = ["<|endoftext|>", "<|start|>", "<|channel|>", "<|message|>", "<|end|>",
                    "<|return|>", "<|call|>", "<|constrain|>"]
# A small harmony-style template written for these tests (not the official one): a system
# message carrying the reasoning effort, analysis only for the current turn, tool results.
HARMONY_TEMPLATE = (
    "{%- set effort = reasoning_effort if reasoning_effort is defined and reasoning_effort "
    "else 'medium' -%}"
    "<|start|>system<|message|>Test model.\nReasoning: {{ effort }}<|end|>"
    "{%- if tools is defined and tools -%}<|start|>developer<|message|># Tools"
    "{%- for t in tools %} {{ t.function.name }}{%- endfor -%}<|end|>{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}<|start|>developer<|message|>{{ m.content }}<|end|>"
    "{%- elif m.role == 'user' -%}<|start|>user<|message|>{{ m.content }}<|end|>"
    "{%- elif m.role == 'assistant' -%}"
    "{%- if m.thinking is defined and m.thinking -%}"
    "<|start|>assistant<|channel|>analysis<|message|>{{ m.thinking }}<|end|>{%- endif -%}"
    "{%- if m.tool_calls is defined and m.tool_calls -%}{%- for c in m.tool_calls -%}"
    "<|start|>assistant<|channel|>commentary to=functions.{{ c.function.name }} "
    "<|constrain|>json<|message|>{{ c.function.arguments | tojson }}<|call|>"
    "{%- endfor -%}{%- else -%}"
    "<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>{%- endif -%}"
    "{%- elif m.role == 'tool' -%}"
    "<|start|>functions.tool to=assistant<|channel|>commentary<|message|>{{ m.content }}<|end|>"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"
)
