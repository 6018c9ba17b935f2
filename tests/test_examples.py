"""Every script in examples/ runs as written, on the embedded default model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 5


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script: Path, smollm2_home: Path) -> None:
    env = {**os.environ, "OPENWEIGHT_HOME": str(smollm2_home), "OPENWEIGHT_OFFLINE": "1"}
    env.pop("OPENWEIGHT_BASE_URL", None)
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=script.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip(), "an example should print something"
    assert "Traceback" not in done.stderr
