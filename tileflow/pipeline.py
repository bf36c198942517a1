"""The pass manager: runs tileflow's passes in order, instrumented, and never leaves a broken graph.

For each pass it snapshots the graph, runs the pass, times it, counts nodes, lints the result and
(with `verify`) compares the graph's outputs with the unrewritten graph's on real inputs. A pass
that raises, leaves an invalid graph or changes the numbers is rolled back and recorded as a
fallback with its reason; `strict=True` raises instead. With `debug_dir` set, every pass's before
and after graph is written as readable code and as JSON for the visualizer.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import guard_int, statically_known_true
from torch.utils._pytree import tree_flatten

from .config import BUILTIN_PASSES, Config
from .graph_utils import (
    attribute,
    count_nodes,
    graph_code,
    graph_to_json,
    restore_graph,
    snapshot_graph,
    written_arguments,
)
from .log import get_logger
from .report import Fallback, GraphReport, KernelRecord, PassRecord

log = get_logger("pipeline")


class TileflowError(RuntimeError):
    """A fallback or verification failure raised because `strict=True`."""


@dataclass
class PassResult:
    """What one pass did: whether it changed the graph, counts by rewrite kind, and fallbacks."""

    changed: bool = False
    rewrites: dict[str, int] = field(default_factory=dict)
    fallbacks: list[Fallback] = field(default_factory=list)

    def count(self, kind: str, n: int = 1) -> None:
        """Add `n` rewrites of `kind` (and mark the graph changed)."""
        self.rewrites[kind] = self.rewrites.get(kind, 0) + n
        self.changed = True

    def fallback(self, node: fx.Node | str, reason: str) -> None:
        """Record that a node was left as it was, and why."""
        name = node.name if isinstance(node, fx.Node) else str(node)
        self.fallbacks.append(Fallback(node=name, reason=reason))


@dataclass
class PassContext:
    """What a pass may read besides the graph: config, shapes, the graph's report, artifacts."""

    config: Config
    report: GraphReport
    artifact_dir: Path | None = None
    example_inputs: Sequence[Any] | None = None
    shape_env: Any = None
    target: str = "reference"
    device_type: str = "cpu"
    # Whether the graph's shape guards are checked before each call (under Dynamo: a call that
    # breaks one recompiles), so a pass may pin a symbolic size to its example value with a
    # guard; an exported program has no such check.
    shape_guards: bool = False
    # Symbols of sizes the caller declared dynamic (`torch._dynamo.mark_dynamic`): Dynamo fails
    # the whole compile (ConstraintViolationError) when a guard pins one, so none may be pinned.
    declared_dynamic: frozenset[Any] = frozenset()
    # Symbols of input sizes Dynamo made dynamic after it saw them change between calls (automatic
    # dynamic, under the default `dynamic=None`): pinning one would recompile at each new value.
    changed_sizes: frozenset[Any] = frozenset()
    # Names of the graph's inputs that hold the model's parameters and buffers (under Dynamo,
    # AOTAutograd's static inputs; an exported program holds them as attributes instead). In a
    # static graph no symbolic size tells the tokens apart, so a pass that needs a fixed weight
    # reads it here (gemm_padding's bmm over stacked expert weights).
    parameter_inputs: frozenset[str] = frozenset()

    def pin_static(self, sizes: Sequence[Any], what: str, need: str,
                   varying: Sequence[tuple[set[Any], str]] = ()) -> str | None:
        """Make the symbolic ones of `sizes` static, each pinned to its example value with a
        guard (a call with other values recompiles), and return None; or return why they cannot
        be, a reason naming them as `what` (`need` says why they must be static). Not pinned: a
        size where no guard is checked at each call (`shape_guards` false: an exported program),
        one the caller marked dynamic (Dynamo would refuse the compile), one Dynamo saw change
        between calls (`changed_sizes`), one with no example value, and one with a symbol of
        `varying`: pairs of the symbols of sizes that change from call to call (token counts,
        batch sizes) and words for them (Dynamo gives equal sizes one symbol, and pinning those
        would recompile at every length)."""
        # A size the shape environment proves equal to its example value at every value of its
        # symbols is a constant written symbolically (layer 0's head count when a first call's batch
        # equals its length: `4*s*((s**2)//s)//s**2`); reading it as an int needs no guard.
        symbolic = [d for d in sizes if isinstance(d, torch.SymInt) and d.node.maybe_as_int() is None
                    and not (d.node.has_hint() and statically_known_true(d == d.node.hint))]
        if not symbolic:
            return None
        if not self.shape_guards:
            return f"{what} is symbolic; {need}"
        if any(d.node.expr.free_symbols & self.declared_dynamic for d in symbolic):
            return f"{what} is marked dynamic (mark_dynamic); {need}"
        if any(d.node.expr.free_symbols & self.changed_sizes for d in symbolic):
            return (f"{what} changed between calls (Dynamo made it dynamic): pinning it would recompile at each "
                    f"value; {need}")
        for symbols, words in varying:
            if any(d.node.expr.free_symbols & symbols for d in symbolic):
                return f"{what} {words}: pinning it would recompile at every length"
        if not all(d.node.has_hint() for d in symbolic):
            return f"{what} is symbolic, with no example value to pin it to"
        for d in symbolic:
            guard_int(d)
        return None

    def add_kernel(self, name: str, target: str, source_path: str | None, spec: dict | None = None) -> None:
        """Record an emitted kernel in the graph's report."""
        self.report.kernels.append(
            KernelRecord(name=name, target=target, source_path=source_path, spec=spec, graph=self.report.graph_id)
        )


class Pass(Protocol):
    """A graph pass: one class per file in `passes/`."""

    name: str

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Rewrite `gm` in place and say what was done."""


_REGISTRY: dict[str, Callable[[], Pass]] = {}


def register_pass(cls: Callable[[], Pass]) -> Callable[[], Pass]:
    """Class decorator that makes a pass available by its `name` to `Config.passes`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"pass class {cls!r} needs a non-empty string attribute `name`")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
        # It names the pass's files in a debug_dir: a "/" would make folders, or leave it.
        raise ValueError(f"pass name {name!r} must be letters, digits, '_', '.' or '-'")
    _REGISTRY[name] = cls
    return cls


def available_passes() -> list[str]:
    """Names of the passes that can be listed in `Config.passes`."""
    for name in BUILTIN_PASSES:
        _import_builtin(name)
    return sorted(_REGISTRY)


def _import_builtin(name: str) -> None:
    if name in _REGISTRY or name not in BUILTIN_PASSES:
        return
    try:
        importlib.import_module(f"tileflow.passes.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"tileflow.passes.{name}":
            raise


def get_pass(name: str) -> Pass:
    """An instance of the registered pass `name` (built-in passes are imported on demand)."""
    _import_builtin(name)
    if name not in _REGISTRY:
        raise ValueError(f"unknown pass {name!r}; available passes are {available_passes()}")
    return _REGISTRY[name]()


class PassManager:
    """Runs an ordered list of passes over one graph with timing, linting, verification, rollback."""

    def __init__(self, passes: Sequence[Pass], config: Config) -> None:
        self.passes = list(passes)
        self.config = config

    @classmethod
    def from_config(cls, config: Config) -> "PassManager":
        """The passes `config.passes` names, in that order."""
        return cls([get_pass(name) for name in config.passes], config)

    def run(self, gm: fx.GraphModule, ctx: PassContext, real_inputs: Sequence[Any] | None = None) -> fx.GraphModule:
        """Run every pass over `gm` in place; return it.

        `real_inputs` are concrete inputs for the numerical check (`config.verify`); without them
        the check is skipped and the report says so.
        """
        debug = _DebugWriter(ctx.artifact_dir) if ctx.artifact_dir is not None else None
        reference, rng = None, None
        if self.config.verify:
            if real_inputs is None:
                ctx.report.extra["verify"] = "skipped: no real inputs (fake tensors only)"
            else:
                # Every check run draws the same random numbers (dropout), from the caller's state,
                # which it leaves as it was for the step itself.
                rng = _RandomState.of(real_inputs)
                reference = _run_graph(gm, real_inputs, rng)
                ctx.report.extra["verify"] = "checked each pass against the unrewritten graph"
        if debug is not None:
            debug.write_graph("input", gm)
        for index, p in enumerate(self.passes):
            self._run_one(index, p, gm, ctx, debug, reference, real_inputs, rng)
        if debug is not None:
            debug.write_graph("output", gm)
        return gm

    def _run_one(
        self,
        index: int,
        p: Pass,
        gm: fx.GraphModule,
        ctx: PassContext,
        debug: "_DebugWriter | None",
        reference: list[Any] | None,
        real_inputs: Sequence[Any] | None,
        rng: "_RandomState | None" = None,
    ) -> None:
        name = p.name
        snapshot = snapshot_graph(gm)
        # What a pass may write besides the graph (nanobatch's plan and disaggregate's cuts on
        # gm.meta, which the compiler acts on; plans and notes in the report): a rollback undoes it too.
        meta_snapshot = dict(gm.meta)
        report_snapshot = (list(ctx.report.plans), list(ctx.report.kernels), dict(ctx.report.extra))
        before_code = graph_code(gm) if debug is not None else ""
        # Frozen now as plain data: graph_to_json hands out the nodes' own `tileflow` meta dicts, which
        # a pass may extend in place (nanobatch's split marks); written after the pass, they would
        # show its work in the graph before it.
        before_json = json.loads(json.dumps(graph_to_json(gm), default=str)) if debug is not None else []
        nodes_before = count_nodes(gm)
        start = time.perf_counter()
        error: str | None = None
        result = PassResult()
        try:
            result = p.run(gm, ctx)
            if not isinstance(result, PassResult):
                raise TypeError(f"pass {name!r} returned {type(result).__name__}, expected PassResult")
            gm.graph.lint()
            gm.recompile()
            if reference is not None and real_inputs is not None and rng is not None:
                # Whatever the pass says it changed: one that rewrote and forgot to count is checked too.
                _check_numerics(name, reference, _run_graph(gm, real_inputs, rng), self.config)
        except Exception as exc:  # a failing pass must never take the compile down with it
            error = f"{type(exc).__name__}: {exc}"
            log.warning("pass %s failed on %s and was rolled back: %s", name, ctx.report.graph_id, error)
            log.debug("%s", traceback.format_exc())
            restore_graph(gm, snapshot)
            gm.meta.clear()
            gm.meta.update(meta_snapshot)
            ctx.report.plans[:], ctx.report.kernels[:] = report_snapshot[0], report_snapshot[1]
            ctx.report.extra.clear()
            ctx.report.extra.update(report_snapshot[2])
            if self.config.strict:
                raise TileflowError(f"pass {name!r} failed on graph {ctx.report.graph_id}: {error}") from exc
            result = PassResult()
            ctx.report.fallbacks.append(
                Fallback(node="<graph>", reason=f"pass {name} rolled back: {error}", pass_name=name, graph=ctx.report.graph_id)
            )
        ms = (time.perf_counter() - start) * 1e3
        for fb in result.fallbacks:
            fb.pass_name = fb.pass_name or name
            fb.graph = ctx.report.graph_id
        if result.fallbacks and self.config.strict:
            reasons = "; ".join(f"{f.node}: {f.reason}" for f in result.fallbacks)
            raise TileflowError(f"pass {name!r} fell back on graph {ctx.report.graph_id} (strict=True): {reasons}")
        ctx.report.fallbacks.extend(result.fallbacks)
        record = PassRecord(
            name=name,
            ms=ms,
            changed=result.changed,
            nodes_before=nodes_before,
            nodes_after=count_nodes(gm),
            rewrites=dict(result.rewrites),
            error=error,
            graph=ctx.report.graph_id,
        )
        ctx.report.passes.append(record)
        log.info(
            "%s %s: %.1f ms, %d -> %d nodes, %s",
            ctx.report.graph_id, name, ms, record.nodes_before, record.nodes_after, record.rewrites or "no rewrites",
        )
        if debug is not None:
            debug.write_pass(index, name, before_code, graph_code(gm), before_json, graph_to_json(gm))


def _written_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The placeholders and module attributes (an exported module's buffers) the graph writes in
    place: a functionalized graph's trailing `copy_` into an input or buffer, or any op whose
    schema writes an argument."""
    written = (w for node in gm.graph.nodes for w in written_arguments(node))
    return list(dict.fromkeys(w for w in written if w.op in ("placeholder", "get_attr")))


def _run_graph(gm: fx.GraphModule, inputs: Sequence[Any], rng: "_RandomState") -> list[Any]:
    """`gm`'s flat outputs on `inputs`, then the values it wrote into its mutated inputs and
    buffers. Those inputs are cloned first and those buffers restored after, so a check run never
    changes the caller's tensors or the module's state (a buffer counted once per verification
    run, an input doubled each time; an exported model's buffers, which an archive keeps), and
    each run starts from the same state: random ops draw from `rng`'s, and leave the caller's
    generators as they were."""
    written = _written_nodes(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    args = list(inputs)
    mutated = [placeholders.index(n) for n in written if n.op == "placeholder"]
    for i in mutated:
        if isinstance(args[i], torch.Tensor):
            args[i] = args[i].clone()
    buffers = [b for b in (attribute(gm, str(n.target)) for n in written if n.op == "get_attr")
               if isinstance(b, torch.Tensor)]
    saved = [b.detach().clone() for b in buffers]
    try:
        with torch.no_grad(), rng.replayed():
            out = gm(*args)
        flat, _ = tree_flatten(out)
        flat += [args[i] for i in mutated] + list(buffers)
        return [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in flat]
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


@dataclass(frozen=True)
class _RandomState:
    """The random generators' states (CPU, and each CUDA device the inputs are on) at one moment."""

    cpu: torch.Tensor
    cuda: dict[int, torch.Tensor]

    @classmethod
    def of(cls, inputs: Sequence[Any]) -> "_RandomState":
        devices = sorted({t.device.index or 0 for t in inputs if isinstance(t, torch.Tensor) and t.is_cuda})
        return cls(torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in devices})

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Run from these states, and give the caller's back after."""
        with torch.random.fork_rng(devices=list(self.cuda)):
            torch.set_rng_state(self.cpu)
            for device, state in self.cuda.items():
                torch.cuda.set_rng_state(state, device)
            yield


def _check_numerics(name: str, expected: list[Any], actual: list[Any], config: Config) -> None:
    """Raise if a pass changed the graph's outputs beyond the configured tolerance."""
    if len(expected) != len(actual):
        raise AssertionError(f"pass {name} changed the number of outputs ({len(expected)} -> {len(actual)})")
    for i, (e, a) in enumerate(zip(expected, actual)):
        if not isinstance(e, torch.Tensor):
            if e != a:
                raise AssertionError(f"pass {name} changed output {i}: {e!r} -> {a!r}")
            continue
        if e.shape != a.shape or e.dtype != a.dtype:
            raise AssertionError(
                f"pass {name} changed output {i} from {tuple(e.shape)}/{e.dtype} to {tuple(a.shape)}/{a.dtype}"
            )
        if not e.is_floating_point():
            if not torch.equal(e, a):
                raise AssertionError(f"pass {name} changed integer output {i}")
            continue
        # Half-precision outputs carry ~1e-3 rounding; never check them tighter than that.
        loose = e.dtype in (torch.float16, torch.bfloat16)
        rtol = max(config.verify_rtol, 2e-2 if loose else 0.0)
        atol = max(config.verify_atol, 2e-2 if loose else 0.0)
        if not torch.allclose(a.double(), e.double(), rtol=rtol, atol=atol, equal_nan=True):
            diff = (a.double() - e.double()).abs().nan_to_num(float("inf")).max().item()
            raise AssertionError(
                f"pass {name} changed output {i}: max abs diff {diff:.3g} exceeds rtol={rtol}, atol={atol}"
            )


class _DebugWriter:
    """Writes one graph's passes, before/after, under its artifact folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "passes").mkdir(parents=True, exist_ok=True)

    def write_graph(self, label: str, gm: fx.GraphModule) -> None:
        (self.root / f"{label}.py").write_text(graph_code(gm))
        (self.root / f"{label}.json").write_text(json.dumps(graph_to_json(gm), indent=1, default=str))

    def write_pass(self, index: int, name: str, before: str, after: str, before_json: list, after_json: list) -> None:
        stem = self.root / "passes" / f"{index:02d}_{name}"
        Path(f"{stem}.before.py").write_text(before)
        Path(f"{stem}.after.py").write_text(after)
        Path(f"{stem}.before.json").write_text(json.dumps(before_json, indent=1, default=str))
        Path(f"{stem}.after.json").write_text(json.dumps(after_json, indent=1, default=str))
