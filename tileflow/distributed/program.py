"""Build a disaggregated step from a model, and start a rank's process group."""

from __future__ import annotations

import datetime
import operator
import os
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist

from ..capture import capture_exported, decompose_exported, export_failure, export_program
from ..config import Config
from ..graph_utils import bind_arguments
from ..padding_safety import capped_buckets, check_padding
from ..pipeline import PassContext, PassManager, TileflowError
from ..report import GraphReport
from ..residual import resolve_residual
from ..runtime.streams import NO_TOKEN_DIM_TO_BUCKET, graph_token_dims, graphs_apply
from .layout import Layout
from .transport import Transport, check_timeout


class CausalLMStep(torch.nn.Module):
    """A transformers causal LM as one serving step over packed tokens:
    `(input_ids [1, T], position_ids [1, T]) -> logits [1, T, vocab]`.

    Switches the model to `attn_implementation="tileflow_causal"` (causal, no mask tensor), the
    form `build_stage_program` can cut; each sequence's positions restart at its KV length.
    Refuses models with layers that carry state across tokens outside attention (see
    `stateful_layer_types`): a step keeps no state but the attention's KV cache.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        from ..transformers_integration import CAUSAL_ATTENTION_NAME, register_transformers

        stateful = stateful_layer_types(model.config)
        if stateful:
            raise ValueError(
                f"{type(model).__name__} has {', '.join(repr(t) for t in stateful)} layers (config.layer_types), which a "
                f"serving step cannot run: it runs attention layers over the paged KV cache and token-wise layers "
                f"({', '.join(sorted(SERVABLE_LAYER_TYPES))}), and keeps no other state between steps or apart between "
                "the sequences packed in it (recurrent, linear-attention and convolution layers carry state from "
                "token to token outside attention)"
            )
        register_transformers()
        model.config._attn_implementation = CAUSAL_ATTENTION_NAME
        self.model = model
        # (bound, why): positions and step sizes the step is exact below (`build_stage_program`),
        # unless the build finds the token indices the model reads as positions and replaces them.
        self.position_limit = index_as_position_limit(model.config)
        self.reads_index_as_position = self.position_limit is not None
        # (bound, why): positions the step is exact below, whatever the step's size.
        self.positions_exact_below = longrope_position_limit(model.config)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Logits for every new token."""
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def index_as_position_limit(config: Any) -> tuple[int, str] | None:
    """Llama 4's attention temperature tuning scales the queries of its NoPE layers by
    `log1p(floor((p + 1) / floor_scale)) * attn_scale + 1`, with p taken from `arange(T)` plus the
    cache's length: a token's index in the forward, which in a packed serving step (no cache) is
    not its position. Both give a factor of 1, and the step equals the model, while the position
    and the index are below `floor_scale - 1`: (that bound, the reason), or None for models
    without it. `build_stage_program` lifts the bound when it finds that index in the graph and
    reads the step's positions there instead (`token_indices_as_positions`)."""
    no_rope = [flag for flag in getattr(config, "no_rope_layers", None) or () if not flag]
    if not (getattr(config, "attn_temperature_tuning", False) and no_rope):
        return None
    bound = max(int(getattr(config, "floor_scale")) - 1, 1)
    return bound, ("positions its attention temperature tuning is exact for (its NoPE layers read a token's index in "
                   "the step as its position, which agree while both are below floor_scale - 1)")


def longrope_position_limit(config: Any) -> tuple[int, str] | None:
    """LongRoPE (Phi-3's long-context models) picks its short or long factors by the forward's
    largest position: above `original_max_position_embeddings`, long ones for every token. In a
    packed serving step that largest position may be another sequence's, so the step equals the
    model only while every position is below it: (that bound, the reason), or None for models
    without LongRoPE."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    found = [params] if isinstance(params, dict) else []
    found += [v for v in (params.values() if isinstance(params, dict) else ()) if isinstance(v, dict)]
    for entry in found:
        if entry.get("rope_type", entry.get("type")) == "longrope":
            original = entry.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
            if original:
                return int(original), ("positions below its original_max_position_embeddings (LongRoPE chooses its factors "
                                       "by a step's largest position, which in a packed step may be another sequence's)")
    return None


_ARANGES = frozenset({torch.ops.aten.arange.default, torch.ops.aten.arange.start, torch.ops.aten.arange.start_step})
# What an integer index may pass through and still be a number: arithmetic, casts, reshapes (an
# index reaching anything else, a lookup or a comparison, is left alone).
_NUMBER_OPS = frozenset({
    torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor, torch.ops.aten.mul.Tensor, torch.ops.aten.div.Tensor,
    torch.ops.aten.div.Tensor_mode, torch.ops.aten.floor_divide.default, torch.ops.aten.remainder.Scalar,
    torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default,
    torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten.view.default, torch.ops.aten.reshape.default,
    torch.ops.aten.unsqueeze.default, torch.ops.aten.expand.default, torch.ops.aten.clone.default,
    torch.ops.aten.alias.default,
})


def token_indices_as_positions(gm: torch.fx.GraphModule) -> tuple[int, int]:
    """Replace each `arange(T)` over a packed step's tokens (T: the token dimension of input 1,
    the positions `[1, T]`) that the graph uses only as a number, by the positions: the model
    computed a token's index in its forward as its position (Llama 4's temperature tuning, with
    no cache), which in a packed step the positions are. An arange used as an index (a lookup, a
    comparison, any op but plain arithmetic before it becomes floating point, or a float computed
    from it alone and turned back into an index: `_used_as_number`) is left alone.
    Returns how many were replaced and how many aranges over the tokens were left."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    positions = inputs[1] if len(inputs) > 1 else None
    val = positions.meta.get("val") if positions is not None else None
    if not isinstance(val, torch.Tensor) or val.dim() != 2 or val.shape[0] != 1 or not isinstance(val.shape[1], torch.SymInt):
        return 0, 0
    tokens = val.shape[1].node.expr
    replaced = left = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _ARANGES:
            continue
        out, bound = node.meta.get("val"), bind_arguments(node)
        if (not isinstance(out, torch.Tensor) or out.dim() != 1 or not isinstance(out.shape[0], torch.SymInt)
                or out.shape[0].node.expr != tokens or bound.get("start", 0) != 0 or bound.get("step", 1) != 1):
            continue
        if not _used_as_number(node):
            left += 1
            continue
        with gm.graph.inserting_before(node):
            row = gm.graph.call_function(torch.ops.aten.select.int, (positions, 0, 0))
            row.meta["val"] = val.select(0, 0)
            if out.dtype != val.dtype:
                row = gm.graph.call_function(torch.ops.aten._to_copy.default, (row,), {"dtype": out.dtype})
                row.meta["val"] = val.select(0, 0).to(out.dtype)
        node.replace_all_uses_with(row)
        gm.graph.erase_node(node)
        replaced += 1
    if replaced:
        gm.recompile()
    return replaced, left


def _used_as_number(node: torch.fx.Node) -> bool:
    """Whether every value computed from the index `node` is used as a number. An integer one
    may reach only `_NUMBER_OPS`; a floating-point one is a number once it meets the model's data
    in a floating-point result (an op with an input not computed from `node`), and until then
    its users are followed too, so that a cast back to an integer (`(arange(T) / 2).long()` for a
    lookup) or a comparison (`arange(T).float()[:, None] >= arange(T).float()`, a mask) is still
    an index. Parameters count as data."""
    derived, pending = {node}, [node]
    while pending:
        current = pending.pop()
        floating = current.meta["val"].is_floating_point()
        for user in current.users:
            if user in derived:
                continue
            out = user.meta.get("val")
            if not isinstance(out, torch.Tensor):
                if user.target is torch.ops.aten._assert_tensor_metadata.default:
                    continue  # a check of the value's metadata
                return False  # returned, or read as a Python number: not followed
            if floating and out.is_floating_point() and not all(arg in derived for arg in _tensor_inputs(user)):
                continue  # meets the model's data: a number from here on
            if user.target not in _NUMBER_OPS and not (floating and out.is_floating_point()):
                return False  # an integer reaching a lookup, or a comparison: an index
            derived.add(user)
            pending.append(user)
    return True


def _tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """`node`'s inputs that are tensors."""
    return [arg for arg in node.all_input_nodes if isinstance(arg.meta.get("val"), torch.Tensor)]


# transformers' `config.layer_types` values whose layers a serving step can run: attention over
# the KV cache, and token-wise blocks (Nemotron-H's MLP and MoE layers).
SERVABLE_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "attention", "mlp", "moe"})


def stateful_layer_types(config: Any) -> list[str]:
    """The kinds of layer in a transformers `config.layer_types` a serving step cannot run: any
    but attention and token-wise ones (Mamba, linear attention, short convolutions, hybrid
    layers, DeepSeek-V3.2's indexed sparse attention); Llama 4's "chunked_attention" layers are
    attention, whose chunks `tileflow_causal` reads from their mask. Empty without `layer_types`."""
    types = getattr(config, "layer_types", None) or ()
    return sorted({t for t in types if isinstance(t, str) and t not in SERVABLE_LAYER_TYPES | {"chunked_attention"}})


def build_stage_program(
    step: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    max_tokens: int = 4096,
    config: Config | None = None,
    report: GraphReport | None = None,
) -> Any:
    """Export `step(*inputs)` with the token dimension (dim 1 of every input) dynamic in
    [1, max_tokens], run tileflow's passes plus `disaggregate`, and split it into a `StageProgram`.

    The dense stages run as `config.residual` says (`auto`: through Inductor on CUDA, with
    tileflow's kernels opaque calls in them and every token count on one compiled graph; as
    eager FX elsewhere), like the graph left after the passes of `backend="tileflow"`. With
    `config.cuda_graphs` on CUDA each dense stage is replayed from CUDA graphs, one per token
    bucket up to `MAX_GRAPHED_TOKENS` (`GraphedStage`); a stage left uncaptured has the reason in
    the report (`cuda_graphs_stage_<i>`), and one left so because a padded replay could differ
    from the step raises `TileflowError` with `config.strict`.

    The step must pack its tokens into one row and use causal attention without a mask tensor
    (for transformers models: `attn_implementation="tileflow_causal"`); otherwise the pass leaves
    it whole and this raises with the pass's reason. A step whose results hold only below some
    position (`step.position_limit` and `step.positions_exact_below`: GPT-2's learned positions
    are found in the graph, Llama 4's temperature tuning and LongRoPE by `CausalLMStep`) gives the
    program `max_positions`, which the engine checks each request against.
    """
    config = _checked_stage_config(config or Config())
    return _program_from_export(step, decompose_exported(_export_step(step, example_inputs, max_tokens)),
                                example_inputs, max_tokens, config, report)


def build_stage_programs(
    step: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    configs: Mapping[str, Config],
    *,
    max_tokens: int = 4096,
) -> dict[str, Any]:
    """`build_stage_program` once per named config, from one export of the step, decomposed
    once: both depend on the step and `max_tokens` alone; each build rewrites its own copy of
    the graph (the parameters are shared)."""
    configs = {name: _checked_stage_config(config) for name, config in configs.items()}
    ep = decompose_exported(_export_step(step, example_inputs, max_tokens))
    return {name: _program_from_export(step, ep, example_inputs, max_tokens, config, None)
            for name, config in configs.items()}


def _checked_stage_config(config: Config) -> Config:
    """`config`, refused (before the export) where a stage program would ignore what it asks."""
    if config.nano_batches != 1:
        # The stages are cut from the graph and run whole: a split would be annotated, then ignored.
        raise ValueError(f"nano_batches={config.nano_batches!r}: a disaggregated step's dense stages run unsplit "
                         "(nano-batching is not applied across the stage cut); build it with nano_batches=1")
    return config


def _export_step(step: torch.nn.Module, example_inputs: Sequence[torch.Tensor], max_tokens: int) -> torch.export.ExportedProgram:
    """The step exported with dim 1 of every input dynamic in [1, max_tokens]; a failure deep in
    torch.export as a ValueError saying what was asked and where the model broke."""
    # torch.export checks the example against the range only deep inside, as "4 not in range
    # [2, 3]" without naming either: say which sizes to give instead.
    sizes = sorted({int(t.shape[1]) for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() > 1})
    if sizes and not 2 <= sizes[-1] <= max_tokens:
        raise ValueError(f"the example inputs hold {sizes[-1]} tokens (dim 1), outside [2, max_tokens={max_tokens}]: "
                         f"give example inputs of 2 to {max_tokens} tokens (a dynamic dim's example must be at least 2), "
                         "or raise max_tokens")
    tokens = torch.export.Dim("tokens", min=1, max=max_tokens)
    dynamic = tuple({1: tokens} for _ in example_inputs)
    try:
        with torch.no_grad():
            return export_program(step, tuple(example_inputs), dynamic, strict=False)
    except ValueError:
        raise  # a refusal with its reason (tileflow_causal's, or the model's own)
    except Exception as exc:
        raise export_failure(exc, f"the step cannot be exported as one graph over any token count in [1, {max_tokens}]") from exc


def _program_from_export(step: torch.nn.Module, ep: torch.export.ExportedProgram, example_inputs: Sequence[torch.Tensor],
                         max_tokens: int, config: Config, report: GraphReport | None) -> Any:
    """`build_stage_program` after the export (`ep`, from `decompose_exported`): passes, the cut
    into stages, CUDA graphs."""
    from tileflow.passes.disaggregate import split_stages
    from tileflow.passes.nanobatch import gemm_costs, token_symbol

    limit = getattr(step, "position_limit", None)
    passes = tuple(p for p in config.passes if p != "disaggregate") + ("disaggregate",)
    config = config.replace(passes=passes)
    graph = capture_exported(ep, decomposed=True)
    report = report or GraphReport(graph_id="disaggregated_step")
    if limit is not None and getattr(step, "reads_index_as_position", False):
        replaced, left = token_indices_as_positions(graph.gm)
        report.extra["token_indices_as_positions"] = (
            f"{replaced} arange(s) over the step's tokens, which the model reads as positions, replaced by the "
            f"step's positions (input 1); {left} used as indices left as they are")
        if replaced and not left:  # an index left might be one the model reads as a position: keep the bound
            limit = None
    if limit is not None and max_tokens > limit[0]:
        raise ValueError(f"max_tokens={max_tokens}, but the model's step is exact only below {limit[0]} "
                         f"{limit[1]}: build it with max_tokens <= {limit[0]}")
    ctx = PassContext(config=config, report=report, example_inputs=graph.example_inputs)
    PassManager.from_config(config).run(graph.gm, ctx)
    if "disaggregate" not in report.rewrites:
        reasons = "; ".join(f"{f.node}: {f.reason}" for f in report.fallbacks if f.pass_name == "disaggregate") or "see the report"
        raise ValueError(f"the step cannot be disaggregated: {reasons}")
    # Before the split moves the embeddings into a stage: the token table, and a learned
    # position table (GPT-2's; RoPE models index none).
    vocab_size, max_positions = embedding_rows(graph.gm, 0), embedding_rows(graph.gm, 1)
    program = split_stages(graph.gm)
    program.vocab_size, program.max_positions = vocab_size, max_positions
    for bound in (limit, getattr(step, "positions_exact_below", None)):
        if bound is not None and (program.max_positions is None or bound[0] < program.max_positions):
            program.max_positions, program.max_positions_reason = bound
    device_type = next((t.device.type for t in example_inputs if isinstance(t, torch.Tensor)), "cpu")
    graphed = graphs_apply(config.cuda_graphs, device_type)
    program.dense_costs = [gemm_costs(stage.module) for stage in program.dense]  # (of the graphs, before any wrapping)
    for i, stage in enumerate(program.dense):
        # Every stage's sizes are the one token count (the export's only dynamic dim).
        found = token_symbol(stage.module) if graphed else None
        refused = check = None
        wrong = False  # refused because a padded replay could give other results (strict raises)
        if graphed and found is None:
            refused = NO_TOKEN_DIM_TO_BUCKET
        elif graphed and (check := check_padding(stage.module, found[0])).hazard:
            refused, wrong = f"not captured: a replay at a token bucket could differ from the step ({check.hazard})", True
        elif graphed and check.positive_inputs:
            # (An export bakes a model's numbers in: such inputs are the caller's, unchecked here.)
            refused = (f"not captured: padded rows stay finite only while inputs {list(check.positive_inputs)} are "
                       "positive, which a graphed stage does not check at each call")
            wrong = True
        capped: list[int] = []
        if graphed and not refused:
            buckets = [b for b in config.graph_buckets() if b <= MAX_GRAPHED_TOKENS]
            # Within the tables it looks positions up in, and the export's token range (a bucket past
            # max_tokens would run the graph at a size its guards were not traced for).
            capped = capped_buckets(buckets, min(b for b in (max_tokens, check.max_bucket) if b is not None))
            if not capped:
                refused = "not captured: it looks positions up in a table shorter than any bucket"
        if refused:
            report.extra[f"cuda_graphs_stage_{i}"] = refused
            if config.strict and wrong:  # as for a compiled graph that no padded replay could run right
                raise TileflowError(f"cuda_graphs not applied to dense stage {i} (strict=True): {refused}")
        dims = graph_token_dims(stage.module, found[0]) if capped else None  # (of the graph, before a compile wraps it)
        if resolve_residual(config.residual, device_type) == "inductor":
            stage.module = torch.compile(stage.module, dynamic=True)
        if dims is not None:
            stage.module = GraphedStage(stage, program.constants, dims[0], list(dims[1]), capped)
    program.cuda_graphs = graphed
    program.max_tokens = max_tokens
    return program


# Ops that only reshape the token ids on their way to the embedding (GPT-2 views them first).
_ID_RESHAPES = frozenset({torch.ops.aten.view.default, torch.ops.aten.reshape.default,
                          torch.ops.aten._unsafe_view.default, torch.ops.aten.clone.default,
                          torch.ops.aten.unsqueeze.default, torch.ops.aten.squeeze.dim})


def embedding_rows(gm: torch.fx.GraphModule, input_index: int) -> int | None:
    """How far the graph's `input_index`-th input may go: the rows of the smallest embedding
    table it indexes (a language model's vocabulary: its token ids must be below it; or its
    learned position table: its positions must be), less the constant it is shifted by on the
    way (OPT reads its table at position + 2), or None when it indexes none.
    Checked on the host before a step, an id past the table is a clear error; inside the step it
    is an index error mid-batch, or a device-side assert that ends the CUDA context."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if input_index >= len(inputs):
        return None
    rows: list[int] = []
    ids: list[tuple[torch.fx.Node, int]] = [(inputs[input_index], 0)]  # (node, the constant added to the input)
    while ids:
        node, offset = ids.pop()
        for user in node.users:
            if user.op != "call_function":
                continue
            shift = _constant_shift(user, node)
            if user.target in _ID_RESHAPES and user.args[0] is node:
                ids.append((user, offset))
            elif shift is not None:
                ids.append((user, offset + shift))
            elif user.target is torch.ops.aten.embedding.default and user.args[1] is node:
                weight = user.args[0]
                table = weight.meta.get("val") if isinstance(weight, torch.fx.Node) else weight
                if table is None and weight.op == "get_attr":
                    table = operator.attrgetter(weight.target)(gm)
                if isinstance(table, torch.Tensor) and table.dim() == 2:
                    rows.append(int(table.shape[0]) - offset)
    return min(rows, default=None)


_ADDS = (torch.ops.aten.add.Tensor, torch.ops.aten.add.Scalar)
_SUBS = (torch.ops.aten.sub.Tensor, torch.ops.aten.sub.Scalar)


def _constant_shift(user: torch.fx.Node, node: torch.fx.Node) -> int | None:
    """The int `user` adds to `node` (`node + c`, `c + node`, `node - c`), or None."""
    if user.target not in _ADDS + _SUBS or len(user.args) != 2 or user.kwargs.get("alpha", 1) != 1:
        return None
    a, b = user.args
    if a is node and isinstance(b, int) and not isinstance(b, bool):
        return b if user.target in _ADDS else -b
    if b is node and isinstance(a, int) and not isinstance(a, bool) and user.target in _ADDS:
        return a
    return None


# Serving stages are captured up to this many tokens (vLLM's default too): larger steps run
# kernels long enough that their launches cost little beside them, and each bucket's graph
# holds its own copies of the stage's activations and outputs (the logits: tokens x vocabulary).
MAX_GRAPHED_TOKENS = 512


class GraphedStage:
    """A dense stage replayed from captured graphs, one per token bucket (16, 32, ... tokens):
    vLLM's piecewise capture. Dense stages are token-wise (norms, GEMMs, RoPE, residual adds), so
    the bucket's padding rows never reach real ones; the attention between two stages runs
    uncaptured over the step's real tokens. One launch per stage replaces the host work of every
    kernel in it, what dominates decode-sized steps. The stage's weights are referenced by the
    graphs, never copied; each call copies its token-dim inputs into the graph's and clones the
    outputs it returns (`tileflow.runtime.streams.CudaGraphBuckets`)."""

    def __init__(self, stage: Any, constants: Sequence[Any], input_dims: list[Any], output_dims: list[Any],
                 buckets: Sequence[int]) -> None:
        from ..runtime.streams import CudaGraphBuckets

        self.module = stage.module
        # Which arguments are weights (always the same tensors): bound here, not graph inputs.
        self._fixed = {i: constants[src.index] for i, src in enumerate(stage.inputs) if src.kind == "constant"}
        self._arity = len(stage.inputs)
        dynamic_dims = [d for i, d in enumerate(input_dims) if i not in self._fixed]
        self.graphs = CudaGraphBuckets(self._run, dynamic_dims, buckets, lambda outputs: list(output_dims))

    def _run(self, *dynamic: Any) -> Any:
        values = iter(dynamic)
        return self.module(*[self._fixed[i] if i in self._fixed else next(values) for i in range(self._arity)])

    def __call__(self, *args: Any) -> Any:
        return self.graphs(*[a for i, a in enumerate(args) if i not in self._fixed])


def warmup_token_counts(program: Any, max_tokens: int | None = None) -> list[int]:
    """The step sizes (token counts, ascending, up to `max_tokens` and the program's own bound)
    at which a step of `program` first runs something that smaller steps did not: 1 and 2 (a
    compiled stage specializes size 1; every other count shares one graph), the first count of
    each tile-plan piece of its tileflow GEMMs that runs a kernel no earlier piece of the plan runs
    (Triton compiles a kernel at its first launch; a grouped GEMM's pieces are over its expected
    rows per expert), and the first count of each CUDA-graph bucket of its graphed stages
    (captured at first use).

    A warm-up that runs one step of each count leaves no GEMM compile and no capture to later
    steps of up to `max_tokens` tokens. What a step's attention launches depends on its batch
    layout (decode-sized and prefill-sized tiles), not on these counts: the warm-up's steps
    should mix prompt chunks with decodes."""
    from ..lower import gemm_plan_text
    from ..passes.nanobatch import token_symbol
    from ..runtime import decode_plan, expected_group_rows

    bound = min((b for b in (max_tokens, program.max_tokens) if b is not None), default=None)
    starts = {1, 2}  # size 1, and every other count
    for stage in program.dense:
        module = stage.module
        if isinstance(module, GraphedStage):
            previous = 0
            for bucket in module.graphs.buckets:
                starts.add(previous + 1)
                previous = bucket
            module = module.module
        found = token_symbol(module)  # (a compiled stage reads through to its graph)
        if found is None:
            continue
        for node in module.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target is torch.ops.tileflow.padded_gemm.default:
                experts = None
            elif node.target is torch.ops.tileflow.grouped_gemm.default:
                experts = int(node.args[1].meta["val"].shape[0])
            else:
                continue
            text = gemm_plan_text(node)
            x = node.args[0].meta["val"]
            # The batched form (no offsets, x [E, T, K]: Llama 4's experts) runs E * T rows, its
            # dim 0 the expert count, which no token count changes.
            batched = experts is not None and x.dim() == 3
            rows = x.shape[0] * x.shape[1] if batched else x.shape[0]
            if not text or not isinstance(rows, torch.SymInt):
                continue  # planned at run time, or rows that no token count changes

            def key(tokens: int, rows: Any = rows, experts: int | None = experts, symbol: Any = found[0]) -> int:
                m = int(rows.node.expr.xreplace({symbol: tokens}))
                return m if experts is None else expected_group_rows(m, experts)

            plan = decode_plan(text)
            top = bound if bound is not None else plan.m_max
            for plan_ in (plan, *plan.segment_plans):
                # A piece whose kernel an earlier piece runs compiles nothing new (a split
                # factor is a launch argument of one split kernel).
                firsts: dict[Any, Any] = {}
                for piece in plan_.pieces:
                    firsts.setdefault(piece.kernel_variant, piece)
                for piece in firsts.values():
                    if piece.lo <= key(1) or key(top) < piece.lo:
                        continue  # reached by the first step, or by none
                    lo, hi = 1, top  # the fewest tokens whose rows reach the piece (rows grow with tokens)
                    while lo < hi:
                        mid = (lo + hi) // 2
                        lo, hi = (mid + 1, hi) if key(mid) < piece.lo else (lo, mid)
                    starts.add(lo)
    return sorted(t for t in starts if bound is None or t <= bound)


def init_distributed(
    timeout_s: float, model_workers: int = 1, device: str = "cpu",
) -> tuple[Layout, Transport]:
    """Join the process group torchrun set up and name this rank's role: gloo for `device="cpu"`,
    NCCL for `"cuda"` (each rank on GPU LOCAL_RANK), HCCL for `"npu"` (with torch_npu). The
    protocol needs only ordered point-to-point messages, which all three provide."""
    backends = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
    if device not in backends:
        raise ValueError(f"device must be one of {sorted(backends)}, got {device!r}")
    backend = backends[device]
    check_timeout(timeout_s)  # before the process group, whose store's error names neither
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing and not dist.is_initialized():
        # torch's own error names one variable and not how to set them all.
        raise RuntimeError(f"init_distributed joins a process group torchrun set up, but {', '.join(missing)} "
                           f"{'is' if len(missing) == 1 else 'are'} not set: run the script under torchrun, e.g. "
                           "`torchrun --standalone --nproc-per-node 3 SCRIPT`")
    if device != "cpu":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        getattr(torch, device).set_device(local)
        device = f"{device}:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Layout(dist.get_world_size(), model_workers), Transport(timeout_s, device=device)
