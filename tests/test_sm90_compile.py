"""Every kernel the benchmarks launch on an H200 compiles for sm_90, without a GPU.

The interpreter runs kernels the GPU compiler would reject (shared memory past the 227 KiB a
Hopper block can have, register spills); `tools/sm90_compile_check.py` compiles the real-size
kernels with Triton's bundled ptxas and reports both.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _ptxas_available(), reason="this triton has no NVIDIA backend (ptxas)")
def test_benchmark_kernels_compile_for_hopper_without_spills(tmp_path: Path) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", TILEFLOW_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "tools.sm90_compile_check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]
    names = " ".join(lines)
    # GEMMs (both variants), fused SwiGLU, grouped experts and both attention tile heights.
    for family in ("padded_gemm", "persistent", "swiglu", "grouped_gemm", "meta_attention"):
        assert family in names, family
    assert len(lines) >= 50
    spills = {line.split()[1]: int(re.search(r"spills=(\d+)", line).group(1)) for line in lines}
    assert not {name: n for name, n in spills.items() if n}, "kernels spill registers"
