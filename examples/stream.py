"""Print the answer as it is generated; stop early by leaving the loop."""

from openweight import Client

client = Client()
with client.stream([{"role": "user", "content": "Write a haiku about rivers."}],
                   max_tokens=64, temperature=0) as stream:
    for chunk in stream:
        print(chunk.text, end="", flush=True)
        if chunk.usage:
            print(f"\n[{chunk.finish_reason}, {chunk.usage.completion_tokens} tokens]")
