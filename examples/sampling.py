"""Sampling options: temperature, top_p/top_k/min_p, repetition penalty, seed, stop strings."""

from openweight import Client, InvalidRequestError

client = Client()
prompt = "List three colours."
a = client.generate(prompt, temperature=0.8, top_p=0.95, top_k=40, seed=7, max_tokens=40)
b = client.generate(prompt, temperature=0.8, top_p=0.95, top_k=40, seed=7, max_tokens=40)
print("same seed, same text:", a.text == b.text)
cut = client.generate(prompt, temperature=0, stop=["\n"], max_tokens=40)
print("first line only:", repr(cut.text), cut.finish_reason)
try:
    client.generate(prompt, temperature=5)
except InvalidRequestError as exc:  # also a ValueError
    print("rejected:", exc)
