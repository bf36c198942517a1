"""The wheel ships passes/ and backends/ as tileflow.passes and tileflow.backends."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_mapped_packages_and_entry_points(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    [wheel] = tmp_path.glob("tileflow-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "tileflow/__init__.py",
        "tileflow/passes/__init__.py",
        "tileflow/passes/canonicalize.py",
        "tileflow/passes/attention.py",
        "tileflow/passes/gemm_padding.py",
        "tileflow/passes/disaggregate.py",
        "tileflow/distributed/model_worker.py",
        "tileflow/distributed/attention_worker.py",
        "tileflow/viz_template.html",
        "tileflow/backends/__init__.py",
        "tileflow/backends/reference/__init__.py",
        "tileflow/backends/triton/__init__.py",
        "tileflow/backends/ascend/__init__.py",
    ):
        assert expected in names, f"{expected} missing from the wheel"
    assert not any(n.startswith(("passes/", "backends/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[torch_dynamo_backends]" in text and "tileflow = tileflow.backend:tileflow_backend" in text
    assert "tileflow = tileflow.cli:main" in text
