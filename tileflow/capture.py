"""Capture: turn what the front end hands us into one functional ATen inference graph.

Two front ends feed tileflow:
- Dynamo (`torch.compile(backend="tileflow")`) gives a Torch-IR FX graph with SymInt token dims;
  AOTAutograd lowers it to ATen, functionalized, with parameters as inputs and sizes still
  symbolic. SDPA stays one node (its backend-specific ATen form, e.g.
  `_scaled_dot_product_flash_attention_for_cpu`), since nothing here decomposes it.
- `torch.export` gives an ExportedProgram; its decompositions are run with SDPA kept whole, and
  the unlifted module (parameters as attributes) is what the passes see.
Everything after capture (passes, lowering, residual execution) is shared by both.
"""

from __future__ import annotations

import os

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .graph_utils import finite_bound

GraphCompiler = Callable[[fx.GraphModule, Sequence[Any]], Callable[..., Any]]

# Ops that must reach the passes whole: the attention pass matches them as one node (and a
# sink gate by its `logsumexp`), the GEMM pass fuses `silu` (alone, or SwiGLU's `silu(gate) * up`)
# into a GEMM's epilogue, which torch.export's table would otherwise decompose into
# `x * sigmoid(x)` first.
_KEEP_WHOLE = (
    "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "linear",
    "silu",
    "logsumexp",
)


def capture_dynamo(gm: fx.GraphModule, example_inputs: Sequence[Any], compile_graph: GraphCompiler) -> Callable[..., Any]:
    """Lower a Dynamo graph to ATen through AOTAutograd and hand it to `compile_graph`.

    `compile_graph(aten_gm, example_inputs)` receives the functional forward graph (fake example
    inputs, symbolic sizes) and returns the callable that runs it. A backward graph, when autograd
    needs one, runs eagerly: tileflow is an inference compiler and does not rewrite it.
    """
    from torch._functorch.aot_autograd import aot_module_simplified

    return aot_module_simplified(
        gm,
        example_inputs,
        fw_compiler=compile_graph,
        bw_compiler=_run_backward_eagerly,
        decompositions={},
        keep_inference_input_mutations=True,
    )


def _run_backward_eagerly(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    from torch._functorch.aot_autograd import make_boxed_func

    return make_boxed_func(gm.forward)


@dataclass
class ExportedGraph:
    """An exported program brought to tileflow's ATen form.

    `gm` runs with the program's flat user inputs (parameters live on it as attributes);
    `example_inputs` are fake values with the symbolic sizes; `range_constraints` maps each size
    symbol to its (min, max) as declared with `torch.export.Dim`.
    """

    gm: fx.GraphModule
    example_inputs: list[Any]
    range_constraints: dict[str, tuple[int, int | None]]


def export_decompositions() -> Any:
    """torch.export's default decomposition table, minus the ops tileflow matches whole."""
    table = torch.export.default_decompositions()
    for op in list(table.keys()):
        if any(op.name().split("::")[-1].split(".")[0] == name for name in _KEEP_WHOLE):
            table.pop(op)
    return table


def export_program(module: torch.nn.Module, args: tuple[Any, ...], dynamic_shapes: Any, **kwargs: Any) -> torch.export.ExportedProgram:
    """`torch.export.export`, retried with the guards it cannot prove over a dimension's range
    deferred to runtime asserts in the program.

    Older torch (2.11) fails to prove guards that hold for every size (transformers' masks give
    it `min(16 * s, 32 * s) == 16 * s`) and rejects the range; later versions prove them. A range
    the model really narrows (a specialization) still raises on the retry."""
    from torch._dynamo.exc import UserError

    try:
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, **kwargs)
    except UserError as err:
        if "Constraints violated" not in str(err):
            raise
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes,
                                   prefer_deferred_runtime_asserts_over_guards=True, **kwargs)


def export_failure(exc: BaseException, what: str) -> ValueError:
    """A torch.export failure as a ValueError that says what was asked (`what`), where in the
    model it broke (the innermost frame of the traceback outside torch and tileflow), why
    (`error_summary`: torch's reason and suggested fix), and a hint for a data-dependent one."""
    import traceback

    skipped = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not os.path.abspath(f.filename).startswith(skipped)]
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    data_dependent = "data-dependent" in str(exc).lower() or "DataDependent" in type(exc).__name__
    hint = (" (a data-dependent branch, such as a recurrent layer's chunking or a loop over the experts that got "
            "tokens)" if data_dependent else "")
    return ValueError(f"{what} (torch.export){where}: {error_summary(exc)}{hint}")


def error_summary(exc: BaseException) -> str:
    """An exception in one line: its type and first line, then torch.export's first "- ..."
    detail (the reason a dim was specialized or must be related to another, below a generic
    first line) and its first suggested fix."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    detail = next((line for line in lines[1:] if line.startswith("- ")), None)
    if detail:
        text += " " + detail[2:]
    fix = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if line.startswith("Suggested fixes")), None)
    if fix:
        text += f" Suggested fix: {fix}"
    return f"{type(exc).__name__}: {text}".rstrip(": ")


def decompose_exported(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """An ExportedProgram decomposed to functional ATen, the ops tileflow matches whole kept
    (SDPA, linear, ...): the costly half of `capture_exported`, done once for programs that
    several configs rewrite."""
    if not isinstance(ep, torch.export.ExportedProgram):
        raise TypeError(f"tileflow's capture expects a torch.export.ExportedProgram, got {type(ep).__name__}")
    return ep.run_decompositions(export_decompositions())


def capture_exported(ep: torch.export.ExportedProgram, *, decomposed: bool = False) -> ExportedGraph:
    """Decompose an ExportedProgram to functional ATen (SDPA and linear kept; skipped when
    `decomposed`: `ep` came from `decompose_exported`) and unlift it. Each call's graph is its
    own to rewrite; the parameters are the program's, shared."""
    if not decomposed:
        ep = decompose_exported(ep)
    gm = ep.module()
    example_inputs = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    ranges: dict[str, tuple[int, int | None]] = {}
    for sym, vr in ep.range_constraints.items():
        ranges[str(sym)] = (int(vr.lower), finite_bound(vr.upper))
    return ExportedGraph(gm=gm, example_inputs=example_inputs, range_constraints=ranges)
