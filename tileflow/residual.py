"""Residual execution: how the graph left after tileflow's passes runs.

`eager` runs the FX graph's generated Python code op by op (the CPU default: no compile time).
`inductor` hands it to Inductor (the CUDA default); tileflow's custom ops are opaque calls to it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch.fx as fx

from .config import RESIDUALS
from .graph_utils import fake_mode_of


def resolve_residual(residual: str, device_type: str) -> str:
    """`auto` becomes `inductor` on CUDA and `eager` elsewhere."""
    if residual not in RESIDUALS:
        raise ValueError(f"unknown residual mode {residual!r}; valid modes are {list(RESIDUALS)}")
    if residual != "auto":
        return residual
    return "inductor" if device_type == "cuda" else "eager"


def build_residual(gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str) -> Callable[..., Any]:
    """A callable running `gm` (args as for `gm.forward`) in the given mode (`eager`/`inductor`).

    `inductor` must be called while AOTAutograd's tracing context is active (from a Dynamo
    compile); it keeps the sizes symbolic, so every token count reuses one compiled graph.
    """
    if mode == "eager":
        return gm
    if mode == "inductor":
        from torch._inductor.compile_fx import compile_fx_inner

        decomposed = _decompose_for_inductor(gm, example_inputs)
        compiled = compile_fx_inner(decomposed, list(example_inputs))
        return _unbox(compiled)
    raise ValueError(f"unknown residual mode {mode!r}; use 'eager' or 'inductor'")


def _decompose_for_inductor(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """Re-trace `gm` with Inductor's decomposition table, keeping sizes symbolic.

    Inductor lowers graphs that AOTAutograd decomposed with its own table; tileflow captures with
    no decompositions (so SDPA and friends stay whole for the passes) and canonicalize adds
    `linear` back, so the residual graph must be decomposed before Inductor sees it. tileflow's
    custom ops have no decompositions and stay opaque.
    """
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    mode = fake_mode_of(gm)
    if mode is None:
        return make_fx(gm, decomposition_table=select_decomp_table(), tracing_mode="symbolic")(*example_inputs)
    with mode:
        return make_fx(gm, decomposition_table=select_decomp_table())(*example_inputs)


def _unbox(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Inductor returns a 'boxed' function taking one list; give it the plain *args interface."""
    if not getattr(fn, "_boxed_call", False):
        return fn

    def call(*args: Any) -> Any:
        return fn(list(args))

    return call
