"""One question, one answer, on the default local model (pulled on first use)."""

from openweight import Client

client = Client()  # the embedded default, SmolLM2-135M-Instruct
result = client.chat(
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    temperature=0,
)
print(result.text)
print(f"[{result.finish_reason}; {result.usage.prompt_tokens} prompt + "
      f"{result.usage.completion_tokens} completion tokens]")
