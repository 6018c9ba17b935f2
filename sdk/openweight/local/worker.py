"""One thread runs all of this process's model work: loading, prefill, decode steps.

Why: PyTorch parallelises each operation over an OpenMP thread team, and every thread that
runs torch operations gets a team of its own. Once a process has more team threads than
CPUs (the thread that loaded the model plus a server's worker thread, say), GNU OpenMP
stops letting idle team threads spin and puts them to sleep after every operation; each of
the ~1,000 small operations of a decode step then pays a wake-up. Measured on a 2-core
machine: SmolLM2-135M decoded at ~140 tokens/s where one thread did everything, ~60 where
the model was loaded on one thread and decoded on another. Routing everything through one
long-lived thread keeps one team, whichever thread (a script's main thread, a server's
worker pool, an event loop's executor) asks for a token.

Concurrent streams interleave here one step at a time, so they share the model fairly.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["call", "on_worker", "submit"]

T = TypeVar("T")
NAME = "openweight-torch"

_jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]]] = queue.SimpleQueue()
_thread: threading.Thread | None = None
_start_lock = threading.Lock()


def _run() -> None:
    while True:
        future, job = _jobs.get()
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(job())
        except BaseException as exc:  # handed to the caller, never lost
            future.set_exception(exc)


def on_worker() -> bool:
    """Whether the calling thread is the model thread."""
    return threading.current_thread() is _thread


def submit(job: Callable[[], T]) -> Future[T]:
    """Queue ``job`` on the model thread (a daemon: it never holds the process open)."""
    global _thread
    with _start_lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run, name=NAME, daemon=True)
            _thread.start()
    future: Future[T] = Future()
    _jobs.put((future, job))
    return future


def call(job: Callable[[], T]) -> T:
    """Run ``job`` on the model thread and return its result (or raise its exception)."""
    if on_worker():
        return job()
    return submit(job).result()
