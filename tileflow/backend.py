"""The torch.compile backend: `torch.compile(model, backend="tileflow", options={...})`.

Registered under the `torch_dynamo_backends` entry-point group (see pyproject.toml), so the string
"tileflow" works in a process that never imported tileflow.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch.fx as fx

from .capture import capture_dynamo
from .compiler import compile_graph
from .config import Config
from .graph_utils import free_symbols
from .log import configure_from_env, get_logger
from .report import Report, session_report

log = get_logger("backend")


def specialize_python_floats() -> None:
    """Have Dynamo bake a model's Python floats (norm eps, attention scale) into its graphs.

    Under `dynamic=True` Dynamo otherwise makes every float attribute a float64 CPU tensor input
    and, for a float AOTAutograd cannot turn into a tensor (the `scale` of
    `scaled_dot_product_attention`, `nn.Embedding.norm_type`), traces the whole frame a second
    time (38-52% of compiling and running a 2-layer transformers model, bench/NOTES.md session 32). A
    serving model's floats never change, and Inductor makes the same choice under CUDA graphs.
    Called once, when tileflow is imported; the setting is Dynamo's and process-wide,
    so code that wants symbolic floats back sets `torch._dynamo.config.specialize_float = False`
    after the import (tileflow compiles either way).
    """
    import torch._dynamo

    torch._dynamo.config.specialize_float = True


specialize_python_floats()


def _current_compile_id() -> tuple[str | None, int | None, int]:
    """Dynamo's id for the frame being compiled, the frame's number (None outside Dynamo) and
    Dynamo's count of its earlier compiles (0 for a frame's first, also after
    `torch._dynamo.reset()`, which numbers frames from 0 again)."""
    try:
        from torch._guards import CompileContext

        cid = CompileContext.current_compile_id()
    except Exception:  # outside a Dynamo compile
        return None, None, 0
    if cid is None:
        return None, None, 0
    return str(cid), getattr(cid, "frame_id", None), getattr(cid, "frame_compile_id", None) or 0


def _declared_dynamic(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> frozenset[Any]:
    """The symbols of the input sizes the caller marked dynamic (`torch._dynamo.mark_dynamic`):
    Dynamo's example inputs are the real tensors, which carry the marks, and its graph's
    placeholders the fake ones, whose sizes carry the symbols (one placeholder per input)."""
    import torch

    symbols: set[Any] = set()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, real in zip(placeholders, example_inputs):
        fake = node.meta.get("example_value")
        if not isinstance(fake, torch.Tensor):
            continue
        for i in getattr(real, "_dynamo_dynamic_indices", ()):
            if i < fake.dim() and isinstance(fake.shape[i], torch.SymInt):
                symbols |= fake.shape[i].node.expr.free_symbols
    return frozenset(symbols)


def _changed_sizes(gm: fx.GraphModule, declared: frozenset[Any]) -> frozenset[Any]:
    """The symbols of the input sizes Dynamo saw change between calls: under its default
    `dynamic=None` (it assumes sizes static) a size is symbolic only once marked dynamic or
    seen changing (automatic dynamic); under `dynamic=True` every size is, changed or not."""
    import torch

    if not torch._dynamo.config.assume_static_by_default:
        return frozenset()
    symbols: set[Any] = set()
    for node in gm.graph.nodes:
        fake = node.meta.get("example_value") if node.op == "placeholder" else None
        if isinstance(fake, (torch.Tensor, torch.SymInt)):
            symbols |= free_symbols([fake])
    return frozenset(symbols - declared)


def _parameter_inputs(aten_gm: fx.GraphModule) -> frozenset[str]:
    """The placeholders of AOTAutograd's graph that hold the model's parameters and buffers: its
    static inputs (`fw_metadata.static_input_indices`, read while AOTAutograd compiles; Dynamo
    also counts a tensor given `mark_static_address` among them). Empty outside that context."""
    import torch
    from torch._guards import TracingContext
    from torch.torch_version import TorchVersion

    context = TracingContext.try_get()
    metadata = getattr(context, "fw_metadata", None)
    indices = getattr(metadata, "static_input_indices", None) or ()
    # A graph with an effectful op takes AOTAutograd's effect tokens as its first inputs. torch
    # 2.12 on counts them in these indices (pytorch#175904), but only for an inference graph: a
    # forward traced with its backward (grad enabled, parameters requiring it: it has tangents)
    # keeps them unshifted, as 2.11 does for both. Unshifted, the indices would name the input
    # before each parameter: shifted here past the tokens.
    tokens = len(getattr(metadata, "tokens", None) or ())
    joint = bool(getattr(metadata, "traced_tangents", None))
    if tokens and (joint or TorchVersion(torch.__version__) < (2, 12)):
        indices = [i + tokens for i in indices]
    placeholders = [n.name for n in aten_gm.graph.nodes if n.op == "placeholder"]
    return frozenset(placeholders[i] for i in indices if 0 <= i < len(placeholders))


class TileflowBackend:
    """A Dynamo backend with a fixed Config that files what it compiles into a Report."""

    def __init__(self, options: Mapping[str, Any] | Config | None = None, *, report: Report | None = None) -> None:
        configure_from_env()
        self.config = options if isinstance(options, Config) else Config.from_options(options)
        self.report = report if report is not None else session_report()

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        compile_id, frame, earlier = _current_compile_id()
        # A recompile: Dynamo compiled this frame before (its count also grows for another
        # backend's compile, an earlier `explain`) and this report holds one of those compiles.
        recompile = frame is not None and earlier > 0 and self.report.compiled_frame_before(frame)
        log.info("Dynamo frame %s: %d nodes", compile_id, len(gm.graph.nodes))

        declared = _declared_dynamic(gm, example_inputs)
        changed = _changed_sizes(gm, declared)

        def compile_forward(aten_gm: fx.GraphModule, aten_inputs: Sequence[Any]) -> Callable[..., Any]:
            parameters = _parameter_inputs(aten_gm)  # (read here: the tracing context is gone at a first call)
            if self.config.verify:
                return _VerifyOnFirstCall(self, aten_gm, aten_inputs, compile_id, recompile, parameters)
            return compile_graph(aten_gm, aten_inputs, self.config, self.report, compile_id=compile_id, recompile=recompile,
                                 shape_guards=True, declared_dynamic=declared, changed_sizes=changed,
                                 parameter_inputs=parameters)

        compiled = capture_dynamo(gm, example_inputs, compile_forward)
        if frame is not None:
            # Noted only once this attempt returns: Dynamo may abandon an attempt part-way and call
            # the backend again under the same compile id, which is no recompile (with symbolic
            # floats, `specialize_python_floats` turned back off, AOTAutograd raises
            # TensorifyScalarRestartAnalysis on a graph with a Python float it cannot turn into a
            # tensor, as every transformers model in tests/ has, and Dynamo traces the frame again).
            self.report.note_compiled_frame(frame)
        return compiled


class _VerifyOnFirstCall:
    """Defers the pipeline to the first call, so `verify` can compare numerics on real inputs.

    Dynamo's graph inputs are fake at compile time; the first call brings real ones. The residual
    runs eagerly in this mode (Inductor must compile inside Dynamo's tracing context, which is
    gone by then); the report says so.
    """

    def __init__(self, backend: TileflowBackend, gm: fx.GraphModule, inputs: Sequence[Any], compile_id: str | None, recompile: bool,
                 parameter_inputs: frozenset[str] = frozenset()) -> None:
        self.backend, self.gm, self.inputs = backend, gm, inputs
        self.compile_id, self.recompile = compile_id, recompile
        self.parameter_inputs = parameter_inputs
        self.compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            # No shape guards for the passes: Dynamo built the graph's guards before this first
            # call, so a size pinned now would never be checked (`PassContext.shape_guards`).
            self.compiled = compile_graph(
                self.gm, self.inputs, self.backend.config, self.backend.report,
                compile_id=self.compile_id, recompile=self.recompile, real_inputs=args, residual="eager",
                residual_note="verify=True runs the residual graph eagerly", parameter_inputs=self.parameter_inputs,
            )
        return self.compiled(*args)


def tileflow_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Mapping[str, Any] | None = None, mode: str | None = None) -> Callable[..., Any]:
    """Entry point Dynamo calls for `backend="tileflow"`; `options` come from `torch.compile`."""
    if mode not in (None, "default"):
        raise ValueError(
            f"torch.compile(mode={mode!r}) is not a tileflow setting; pass tileflow options instead "
            f"(options={{...}} with keys {list(Config.keys())})"
        )
    return TileflowBackend(options)(gm, example_inputs)
