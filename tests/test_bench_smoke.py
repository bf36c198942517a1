"""The benchmarks' CPU paths run (so they do not rot between GPU sessions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["gemm.py", "attention.py", "e2e.py", "profile_step.py", "sampling.py"])
def test_benchmark_smoke_check_passes_on_cpu(script: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "needs a GPU" in proc.stdout or "no CUDA GPU" in proc.stdout
    assert "smoke check passed" in proc.stdout
