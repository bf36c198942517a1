"""Residual execution: how the graph left after tileflow's passes runs.

`eager` runs the FX graph's generated Python code op by op (the CPU default: no compile time).
`inductor` hands it to Inductor (the CUDA default); tileflow's custom ops are opaque calls to it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
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
        _keep_output_strides(decomposed, gm)
        compiled = compile_fx_inner(decomposed, list(example_inputs))
        return _unbox(compiled)
    raise ValueError(f"unknown residual mode {mode!r}; use 'eager' or 'inductor'")


def _keep_output_strides(decomposed: fx.GraphModule, gm: fx.GraphModule) -> None:
    """Make the re-traced graph return each output laid out as `gm` returns it when run eagerly.

    The re-trace with Inductor's decompositions can change an output's layout (a KV cache's keys,
    a `cat` of transposed tensors, came back [B, S, H, D]-ordered where eager returns them
    contiguous), and Inductor keeps the layout its graph says: the outputs would differ from
    eager's in their strides, and Dynamo's stride guards would recompile the next step that
    receives them. An output that was contiguous and no longer is gets a contiguous copy."""
    def outputs_of(module: fx.GraphModule) -> tuple[fx.Node, list]:
        (output,) = module.graph.find_nodes(op="output")
        args = output.args[0] if isinstance(output.args[0], (tuple, list)) else output.args
        return output, list(args)

    output, outputs = outputs_of(decomposed)
    _, originals = outputs_of(gm)
    if len(outputs) != len(originals):
        return
    fixed = list(outputs)
    for i, (new, old) in enumerate(zip(outputs, originals)):
        want = old.meta.get("val") if isinstance(old, fx.Node) else None
        got = new.meta.get("val") if isinstance(new, fx.Node) else None
        if not (isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)):
            continue
        if want.is_contiguous() and not got.is_contiguous():
            with decomposed.graph.inserting_before(output):
                copy = decomposed.graph.call_function(torch.ops.aten.clone.default, (new,),
                                                      {"memory_format": torch.contiguous_format})
            copy.meta = dict(new.meta)
            copy.meta["val"] = got.clone(memory_format=torch.contiguous_format)
            fixed[i] = copy
    if fixed != outputs:
        output.args = (type(output.args[0])(fixed),) if isinstance(output.args[0], (tuple, list)) else tuple(fixed)
        decomposed.recompile()


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
