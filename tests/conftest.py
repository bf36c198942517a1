"""Test setup: Triton kernels run in the CPU interpreter unless a GPU is present; Dynamo is reset
between tests so each test's compiles are its own."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Must happen before anything imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
