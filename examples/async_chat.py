"""The async client: several questions at once without blocking the event loop."""

import asyncio

from openweight import AsyncClient


async def main() -> None:
    client = AsyncClient()
    questions = ["What is 2 + 2?", "What colour is the sky?"]
    answers = await asyncio.gather(
        *(client.generate(q, temperature=0, max_tokens=24) for q in questions)
    )
    for q, a in zip(questions, answers, strict=True):
        print(f"{q} -> {a.text}")
    async with client.stream([{"role": "user", "content": "Say hello."}], max_tokens=16,
                             temperature=0) as stream:
        async for chunk in stream:
            print(chunk.text, end="", flush=True)
    print()


asyncio.run(main())
