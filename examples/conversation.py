"""A multi-turn conversation: keep the history, append each answer."""

from openweight import Client, Message

client = Client()
history: list[Message] = [Message("system", "You are a concise assistant.")]
for question in ["Name a large European river.", "Which countries does it flow through?"]:
    history.append(Message("user", question))
    answer = client.chat(history, max_tokens=60, temperature=0)
    history.append(Message("assistant", answer.text))
    print(f"> {question}\n{answer.text}\n")
