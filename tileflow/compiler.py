"""compile_graph: the shared middle of tileflow, from a captured ATen graph to a callable.

Both front ends (Dynamo through `tileflow.backend`, torch.export through `tileflow.export`) call
it: it runs the pass pipeline, builds the residual executor, and files the graph's report.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx

from .config import Config
from .graph_utils import (count_nodes, graph_code, graph_structure, graph_to_json, shape_env_of, split_off_checks,
                          symbol_ranges)
from .log import get_logger
from .lower import lower_graph
from .padding_safety import capped_buckets, check_padding
from .pipeline import PassContext, PassManager, TileflowError
from .report import GraphReport, Report
from .residual import build_residual, resolve_residual
from .runtime import streams
from .targets import resolve_target

log = get_logger("compiler")
_GRAPH_IDS = itertools.count()


# A step whose padded rows could reach real ones is captured only at the token counts it is
# called with, up to this many: decode-sized steps, where launches cost the most, and each count
# keeps a graph (its static inputs and outputs) alive.
EXACT_GRAPH_TOKENS = 32


def graphed_step(gm: fx.GraphModule, runner: Callable[..., Any], buckets: Sequence[int],
                 graph_report: GraphReport, exact: bool = False) -> Callable[..., Any]:
    """`runner` replayed from one captured graph per token bucket (`Config.cuda_graphs` on a
    graph the nano-batch pass did not split; per token count when `exact`), or `runner` itself,
    with the reason in the report, when the graph has no single symbolic token dim to bucket."""
    from tileflow.passes.nanobatch import token_symbol

    from .runtime.streams import CudaGraphBuckets, graph_token_dims

    found = token_symbol(gm)
    if found is None:
        graph_report.extra["cuda_graphs"] = streams.NO_TOKEN_DIM_TO_BUCKET
        return runner
    inputs, outputs = graph_token_dims(gm, found[0])
    if not exact:
        graph_report.extra["cuda_graphs"] = f"whole step, token buckets {list(buckets)}"
    return CudaGraphBuckets(runner, inputs, buckets, lambda _: outputs, exact=exact)


@dataclass(frozen=True)
class _Buckets:
    """How `Config.cuda_graphs` replays a graph (`_safe_buckets`): at `buckets` (per token count up
    to the last when `exact`), at calls whose `positive_inputs` are positive, after `checks` (a
    module running the graph's asserts on the call's own rows; None: they stay in the graph)."""

    buckets: tuple[int, ...]
    positive_inputs: tuple[int, ...] = ()
    exact: bool = False
    checks: fx.GraphModule | None = None


def _safe_buckets(gm: fx.GraphModule, buckets: Sequence[int], graph_report: GraphReport,
                  split_asserts: bool, strict: bool = False) -> _Buckets:
    """The token buckets `gm` may be replayed at: when running it padded could change its real
    rows (`check_padding`; the reason goes in the report), none, and the graphs are captured at
    each token count up to `EXACT_GRAPH_TOKENS` instead (the last value, `exact`), or not at all
    when no replay could be right (an in-place write); else those within the token
    count's guarded range plus its upper bound when that falls between two (a replay runs the
    graph at its bucket's size, and past the range, as a table of 20 rows sliced by T guards
    T <= 20, the compiled code would read what the guards kept out), and within the tables it
    looks positions up in (a table of 20 rows read at `arange(T)` guards nothing, and a replay at
    32 would read past it). A graph with no single token symbol keeps them: the runners capture
    nothing there. Also the inputs that must be positive at a call for its replay to be right
    (`PaddingCheck.positive_inputs`). With `split_asserts`, asserts over values padded rows would
    change leave `gm` for a module of their own, run on each call's rows before its replay
    (`PaddingCheck.unpadded_asserts`; tileflow_causal's check over position ids passed in).
    With `strict` (`Config.strict`), a graph no replay could run raises instead."""
    from tileflow.passes.nanobatch import token_symbol

    found = token_symbol(gm)
    if found is None:
        return _Buckets(tuple(buckets))
    check = check_padding(gm, found[0], split_asserts=split_asserts)
    if check.hazard and not check.unpadded_replay:
        graph_report.extra["cuda_graphs"] = f"not captured: a replay could differ from the step ({check.hazard})"
        if strict:  # cuda_graphs asked for and not applied is a fallback
            raise TileflowError(f"cuda_graphs not applied to graph {graph_report.graph_id} (strict=True): "
                                f"{graph_report.extra['cuda_graphs']}")
        log.warning("%s: cuda_graphs not applied: %s", graph_report.graph_id, check.hazard)
        return _Buckets(())
    if check.hazard:
        # Replayed at the call's own token count, the graph runs on exactly the call's rows.
        graph_report.extra["cuda_graphs"] = (f"exact token counts only (up to {EXACT_GRAPH_TOKENS}, no padding): a "
                                             f"replay at a token bucket could differ from the step ({check.hazard})")
        log.warning("%s: cuda_graphs at exact token counts only: %s", graph_report.graph_id, check.hazard)
        return _Buckets((EXACT_GRAPH_TOKENS,), exact=True)
    # Also within the tables the step looks positions up in (`PaddingCheck.max_bucket`).
    bounds = [b for b in (graph_report.symbols.get(str(found[0]), [None, None])[1], check.max_bucket) if b is not None]
    capped = capped_buckets(buckets, min(bounds, default=None))
    checks = None
    if check.unpadded_asserts and capped:  # (no bucket left: nothing is replayed, the asserts stay)
        graph_report.extra["cuda_graphs_checks"] = (
            f"{', '.join(n.name for n in check.unpadded_asserts)}: run on each call's own rows before its replay "
            "(asserts over values a replay computes from padded rows too)")
        checks = split_off_checks(gm, check.unpadded_asserts)
    return _Buckets(capped, check.positive_inputs, checks=checks)


def _checked_first(checks: fx.GraphModule | None, step: Callable[..., Any]) -> Callable[..., Any]:
    """`step`, after running `checks` (`_Buckets.checks`) on the same arguments."""
    if checks is None:
        return step

    def checked(*args: Any) -> Any:
        checks(*args)
        return step(*args)

    return checked


def _replayed_while_positive(replayed: Callable[..., Any], plain: Callable[..., Any],
                             positive_inputs: tuple[int, ...]) -> Callable[..., Any]:
    """`replayed` at calls whose inputs at `positive_inputs` (0-d numbers the padding proof took
    as positive: an eps Dynamo passes as an input) are positive, else `plain`, uncaptured."""
    if not positive_inputs:
        return replayed

    def step(*args: Any) -> Any:
        return replayed(*args) if all(float(args[i]) > 0 for i in positive_inputs) else plain(*args)

    return step


def inputs_device_type(example_inputs: Sequence[Any]) -> str:
    """The device type most of the graph's tensor inputs live on (`cpu` when there are none)."""
    kinds = Counter(t.device.type for t in example_inputs if isinstance(t, torch.Tensor) and t.device.type != "meta")
    if not kinds:
        return "cpu"
    non_cpu = [k for k in kinds if k != "cpu"]
    return non_cpu[0] if non_cpu else "cpu"


def compile_graph(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    config: Config,
    report: Report,
    *,
    compile_id: str | None = None,
    recompile: bool = False,
    real_inputs: Sequence[Any] | None = None,
    residual: str | None = None,
    residual_note: str | None = None,
    emit_only: bool = False,
    shape_guards: bool = False,
    declared_dynamic: frozenset[Any] = frozenset(),
    changed_sizes: frozenset[Any] = frozenset(),
    parameter_inputs: frozenset[str] = frozenset(),
) -> Callable[..., Any]:
    """Run tileflow's passes on `gm` and return a callable that executes the result.

    `example_inputs` may be fake (sizes symbolic); `real_inputs`, when given, are concrete inputs
    used by `config.verify`. `residual` overrides `config.residual` (after `auto` resolution),
    and `residual_note` says why in the report.
    `emit_only` writes the kernels' sources without building them (ahead-of-time export for a
    target this machine cannot run). `shape_guards`: the caller checks the graph's shape guards
    before each call (Dynamo), so passes may pin symbolic sizes with guards (`PassContext`), but
    never the symbols in `declared_dynamic` (sizes the caller marked dynamic) nor in
    `changed_sizes` (sizes Dynamo saw change between calls). `parameter_inputs` names the
    placeholders of `gm` that hold the model's parameters and buffers (`PassContext`).
    """
    graph_id = f"graph_{next(_GRAPH_IDS):03d}"
    device_type = inputs_device_type(example_inputs)
    target = resolve_target(config.target, device_type)
    residual_mode = residual or resolve_residual(config.residual, device_type)
    root = debug_root(config.debug_dir) if config.debug_dir else None
    artifact_dir = root / graph_id if root is not None else None
    if root is not None:
        # The root report.json of an earlier run must not outlive the graph folders it describes:
        # if this compile fails, it would present this graph's files under that run's report (its
        # model, passes and kernels). Until this graph is done, it lists this session's graphs only.
        _write_root_report(root, report)
        if artifact_dir.is_dir():
            # A debug_dir used by an earlier process holds a graph of this id: start it afresh, else
            # its old kernels would be listed beside this graph's (by the visualizer, in an archive).
            shutil.rmtree(artifact_dir, ignore_errors=True)
    graph_report = GraphReport(
        graph_id=graph_id,
        compile_id=compile_id,
        nodes_in=count_nodes(gm),
        symbols=symbol_ranges(gm),
        residual=residual_mode,
        target=target,
        debug_dir=str(artifact_dir) if artifact_dir else None,
        config=config.to_dict(),
        extra={"residual_note": residual_note} if residual_note else {},
    )
    if not config.passes:
        # (An empty TILEFLOW_PASSES asks for this too; the report must not read as a graph with
        # nothing to rewrite.)
        graph_report.extra["passes"] = ("none: the options name no passes (passes=[] or an empty TILEFLOW_PASSES), so "
                                        "the graph runs as traced; unset them for the default passes")
    ctx = PassContext(
        config=config,
        report=graph_report,
        artifact_dir=artifact_dir,
        example_inputs=example_inputs,
        shape_env=shape_env_of(gm),
        target=target,
        device_type=device_type,
        shape_guards=shape_guards,
        declared_dynamic=declared_dynamic,
        changed_sizes=changed_sizes,
        parameter_inputs=parameter_inputs,
    )
    PassManager.from_config(config).run(gm, ctx, real_inputs=real_inputs)
    lower_graph(gm, ctx, target, emit_only=emit_only)
    plan = gm.meta.get("tileflow_nanobatch")
    if plan is not None and plan.graph != graph_structure(gm):
        # A pass after 'nanobatch' changed the graph the plan splits (its nodes would be missing,
        # or mean something else): run the step whole.
        graph_report.extra["nano_batch_dropped"] = ("a pass after 'nanobatch' changed the graph its plan splits: the "
                                                    "step runs whole; list 'nanobatch' after the passes that rewrite")
        if config.strict:  # a split the config asked for that does not run is a fallback
            raise TileflowError(f"nanobatch's plan dropped on graph {graph_id} (strict=True): "
                                f"{graph_report.extra['nano_batch_dropped']}")
        log.warning("%s: nano-batch plan dropped: %s", graph_id, graph_report.extra["nano_batch_dropped"])
        graph_report.extra.pop("nano_batch", None)  # the schedule the pass reported does not run
        plan = None
    graphed = _Buckets(config.graph_buckets() if streams.graphs_apply(config.cuda_graphs, device_type) else ())
    if config.cuda_graphs and not graphed.buckets:
        graph_report.extra["cuda_graphs"] = f"not captured: CUDA graphs capture CUDA work, this graph runs on {device_type}"
    if graphed.buckets:
        # A nano-batch plan covers every node of the graph, its asserts too: they stay in it.
        graphed = _safe_buckets(gm, graphed.buckets, graph_report, split_asserts=plan is None,
                                strict=config.strict)
    buckets, positive_inputs, exact = graphed.buckets, graphed.positive_inputs, graphed.exact
    if plan is not None and plan.token_input is None and buckets:
        # A decode step split over its sequences has no token symbol to bucket: not captured, as
        # when it ran unsplit (`graphed_step`).
        graph_report.extra["cuda_graphs"] = streams.NO_TOKEN_DIM_TO_BUCKET
        buckets = ()
    if artifact_dir is not None:
        # Lowering annotated the tileflow nodes with their kernels: refresh the final graph dump.
        (artifact_dir / "output.json").write_text(json.dumps(graph_to_json(gm), indent=1, default=str))
        if graphed.checks is not None:  # what left the graph, to run before each replay
            (artifact_dir / "cuda_graphs_checks.py").write_text(graph_code(graphed.checks))
    graph_report.nodes_out = count_nodes(gm)
    runner = build_residual(gm, example_inputs, residual_mode)
    if plan is not None:
        from .runtime.nanobatch import NanoBatchRunner

        residual = runner

        def nano_batched(graph_buckets: Sequence[int]) -> Callable[..., Any]:
            # Debug mode checks every schedule it builds.
            return NanoBatchRunner(gm, plan, residual, check=bool(config.debug_dir), graph_buckets=graph_buckets,
                                   graph_factory=streams.GRAPH_FACTORY, exact_graphs=exact)

        runner = nano_batched(buckets)
        if buckets and not exact:  # (exact: `_safe_buckets` said so, and why)
            graph_report.extra["cuda_graphs"] = f"nano-batched step, token buckets {list(buckets)}"
        if buckets and positive_inputs:
            runner = _replayed_while_positive(runner, nano_batched(()), positive_inputs)
    elif buckets:
        runner = _checked_first(graphed.checks, _replayed_while_positive(
            graphed_step(gm, runner, buckets, graph_report, exact), runner, positive_inputs))
    report.add_graph(graph_report, recompile=recompile)
    if root is not None:
        _write_reports(root, graph_report, report)
    log.info("compiled %s (%s): %d -> %d nodes", graph_id, compile_id, graph_report.nodes_in, graph_report.nodes_out)
    return runner


def debug_root(debug_dir: str | os.PathLike[str]) -> Path:
    """The folder this process writes its graphs under: `debug_dir`, or its `rank_<r>` subfolder
    when it is one of several processes of a launch (torch.distributed's world, or torchrun's
    WORLD_SIZE and RANK before the process group starts), whose graph ids all start at graph_000:
    the ranks would write their graphs and the root report.json over each other's."""
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world, rank = int(os.environ.get("WORLD_SIZE", "1") or 1), int(os.environ.get("RANK", "0") or 0)
    return Path(debug_dir) / f"rank_{rank}" if world > 1 else Path(debug_dir)


def _write_reports(root: Path, graph_report: GraphReport, report: Report) -> None:
    """Per-graph `report.json` in the graph's folder, and the whole session's in the root."""
    graph_dir = root / graph_report.graph_id
    graph_dir.mkdir(parents=True, exist_ok=True)
    (graph_dir / "report.json").write_text(json.dumps(graph_report.to_dict(), indent=2, default=str))
    _write_root_report(root, report)


def _write_root_report(root: Path, report: Report) -> None:
    """`root/report.json`: the graphs of `report` compiled into this debug_dir."""
    mine = [g for g in report.graphs if g.debug_dir and Path(g.debug_dir).parent == root]
    root.mkdir(parents=True, exist_ok=True)
    # This folder's graphs' recompiles, not the session's (other models share the session report).
    (root / "report.json").write_text(Report(graphs=mine, recompiles=sum(g.recompile for g in mine)).to_json())
