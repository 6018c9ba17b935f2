"""The same SDK calls against a server: `openweight serve`, vLLM, Ollama, llama.cpp, LM Studio.

With OPENWEIGHT_BASE_URL set (and OPENWEIGHT_API_KEY if the server wants one), this talks
to that server. Without it, the script starts `openweight serve` on the default model
itself, on a free loopback port with a throwaway API key, and stops it at the end.
"""

import os
import secrets
import signal
import subprocess
import sys

from openweight import Client


def start_server(api_key: str) -> tuple[subprocess.Popen[str], str]:
    """Run `openweight serve` and read the URL it prints once it is ready."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "openweight.cli", "serve", "--port", "0", "--api-key", api_key],
        stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""  # "openweight: serving M at URL ..."
    if " at http" not in line:
        proc.wait()
        sys.exit("openweight serve did not start")
    return proc, line.split(" at ", 1)[1].split()[0]


server = None
if os.environ.get("OPENWEIGHT_BASE_URL"):
    client = Client()  # reads OPENWEIGHT_BASE_URL and OPENWEIGHT_API_KEY
else:
    key = secrets.token_urlsafe(16)
    server, url = start_server(key)
    client = Client(base_url=url, api_key=key)
try:
    print(f"model {client.model} on a server (remote: {client.is_remote})")
    result = client.chat([{"role": "user", "content": "What is the capital of France?"}],
                         temperature=0, max_tokens=32)
    print(result.text)
    print(f"[{result.finish_reason}; {result.usage.total_tokens} tokens]")
    with client.stream([{"role": "user", "content": "Say hello."}], temperature=0,
                       max_tokens=16) as stream:
        for chunk in stream:
            print(chunk.text, end="", flush=True)
    print()
finally:
    if server is not None:  # Ctrl-C, as you would stop it by hand
        server.send_signal(signal.SIGINT if os.name != "nt" else signal.SIGTERM)
        server.wait(timeout=30)
