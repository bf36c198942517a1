"""tileflow.explain: compile a function or module with tileflow, run it once, return the Report."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from .backend import TileflowBackend
from .report import Report


def explain(fn_or_module: Callable[..., Any], *args: Any, options: Mapping[str, Any] | None = None, **kwargs: Any) -> Report:
    """Compile `fn_or_module` with `backend="tileflow"` (dynamic shapes), call it once on `args`
    and `kwargs` under `torch.no_grad()`, and return what the compiler did.

    Raises RuntimeError if Dynamo compiled nothing (for example when the function was already
    compiled too often and Dynamo's recompile limit sends it to eager).
    """
    if not callable(fn_or_module):
        raise TypeError(f"explain expects a function or nn.Module, got {type(fn_or_module).__name__}")
    report = Report()
    backend = TileflowBackend(options, report=report)
    compiled = torch.compile(fn_or_module, backend=backend, dynamic=True)
    with torch.no_grad():
        compiled(*args, **kwargs)
    if not report.graphs:
        raise RuntimeError(
            "tileflow.explain: Dynamo compiled no graph for this call (the function may have no "
            "tensor ops, or Dynamo's recompile limit was reached; try torch._dynamo.reset())"
        )
    return report
