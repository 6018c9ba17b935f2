"""How much the libraries the project drives may print: nothing of theirs (their warnings,
advice and progress bars; pip's output) unless ``OPENWEIGHT_LOG=debug``. The project's own
progress lines (``openweight: ...``) are printed either way.

Nothing here imports transformers until ``quiet_libraries`` is called.
"""

from __future__ import annotations

import os

__all__ = ["LOG_ENV", "debug", "quiet_libraries"]

LOG_ENV = "OPENWEIGHT_LOG"


def debug() -> bool:
    """Does the user want the libraries' own output (``OPENWEIGHT_LOG=debug``)?"""
    return os.environ.get(LOG_ENV, "").strip().lower() == "debug"


def quiet_libraries() -> None:
    """Silence transformers' warnings and progress bars and huggingface_hub's bars, unless
    ``debug()``; call it before driving them."""
    if debug():
        return
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
