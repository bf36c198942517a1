"""Golden files: emitted sources kept under tests/golden/ so that any change to them is seen.

`check_golden(name, text)` compares `text` with tests/golden/<name>; with
`TILEFLOW_UPDATE_GOLDEN=1` in the environment it rewrites the file instead (the one command to
accept an intended change: `TILEFLOW_UPDATE_GOLDEN=1 python -m pytest tests -k golden`).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

GOLDEN_DIR = Path(__file__).parent / "golden"


def check_golden(name: str, text: str) -> None:
    """Assert `text` equals the golden file `name` (or rewrite it when updating)."""
    path = GOLDEN_DIR / name
    if os.environ.get("TILEFLOW_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    if not path.exists():
        raise AssertionError(
            f"no golden file {path}; create it with TILEFLOW_UPDATE_GOLDEN=1 python -m pytest tests -k golden"
        )
    expected = path.read_text()
    if text != expected:
        diff = "".join(difflib.unified_diff(
            expected.splitlines(keepends=True), text.splitlines(keepends=True),
            fromfile=f"golden/{name}", tofile="emitted", n=2,
        ))
        raise AssertionError(
            f"emitted source differs from golden/{name} (if intended: TILEFLOW_UPDATE_GOLDEN=1 "
            f"python -m pytest tests -k golden):\n{diff[:6000]}"
        )
