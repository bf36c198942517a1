"""Test setup: Triton kernels run in the CPU interpreter unless a GPU is present; Dynamo is reset
between tests so each test's compiles are its own."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Must happen before anything imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402
from typing import Iterator  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def private_triton_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Keep generated Triton sources out of ~/.cache and start from an empty in-process memo."""
    from tileflow.backends.triton.build import clear_memo

    root = tmp_path_factory.mktemp("tileflow_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TILEFLOW_CACHE_DIR", str(root))
        clear_memo()
        yield root
        clear_memo()
