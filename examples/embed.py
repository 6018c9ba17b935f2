"""Embeddings: vectors for texts from the default embedding model, and a tiny search."""

import math

from openweight import Client

client = Client()  # names no model: embed() uses the default embedding model
docs = ["The Eiffel Tower is in Paris.", "Pasta is boiled in salted water.",
        "Mount Everest is the highest mountain on Earth."]
result = client.embed(docs)
print(f"{len(result.vectors)} vectors of {result.dimensions} numbers from {result.model}, "
      f"{result.usage.prompt_tokens} tokens")

query = client.embed("How do I cook spaghetti?").vectors[0]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


best = max(range(len(docs)), key=lambda n: cosine(query, result.vectors[n]))
print("closest to the question:", docs[best])
