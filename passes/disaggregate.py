"""disaggregate: cut a serving step at its attention ops into dense and attention stages (Lamina).

Decode attention is memory-bound and everything else compute-bound, so Lamina runs the KV cache
and attention on memory devices and the dense layers on compute devices. This pass finds the cut:
every `tileflow::meta_attention` becomes its own stage, and the nodes between two attentions form
a dense stage, so a model with L attention layers has L + 1 dense stages and L attention stages.
What crosses to the attention side is exactly what attention needs: q and the new k/v out, the
attention output back. The pass computes that byte count from the graph's shapes (symbolic in the
token count) and checks it against Lamina's (2 + 2/G)·e·d·B·L with d = query heads × head size
and G read from the same q and k shapes: it catches v or the output with another head size, not
k/v whose heads were repeated before the attention (GQA not undone: that cut is taken with G = 1,
and the attention workers hold G times the KV cache). (Dense stages on different model replicas also
pass hidden states to each other under Lamina's rotation; that is not cut traffic.)

The pass only annotates (each node's stage goes in `node.meta["tileflow"]["stage"]`, the cuts go in
the report), so the single-process graph runs exactly as before; `split_stages` turns an annotated
graph into a `StageProgram` that `tileflow.distributed` runs across ranks. There the attention
stages attend over a KV cache their rank owns, so the step must be traced as causal
self-attention over packed tokens: batch dimension 1, no mask tensor (transformers'
`attn_implementation="tileflow_causal"` traces that way). Anything else is left colocated, with
the reason in the report.
"""

from __future__ import annotations

import inspect
import math
import operator
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Generator, Sequence

import sympy
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.passes.split_module import split_module

from tileflow.graph_utils import (
    attribute,
    bind_arguments,
    constant_number,
    constant_values,
    meta_val,
)
from tileflow.pipeline import PassContext, PassResult, register_pass

ATTENTION_OP = torch.ops.tileflow.meta_attention.default


@dataclass(frozen=True)
class AttentionCut:
    """One attention stage: the shapes that cross the cut and the attention's parameters."""

    index: int
    node: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    dtype: torch.dtype
    bytes_per_token: int
    sliding_window: int | None = None
    softcap: float | None = None
    sinks: tuple[float, ...] | None = None  # one attention-sink logit per query head
    attention_chunk: int | None = None  # Llama 4's chunked attention: a query sees its chunk's keys only

    @property
    def group_size(self) -> int:
        """G: query heads per KV head."""
        return self.num_q_heads // self.num_kv_heads

    def sink_logits(self, device: torch.device | str) -> torch.Tensor | None:
        """`sinks` as a float32 tensor on `device` (made once per cut and device), or None."""
        from tileflow.runtime.attention import per_head_tensor

        return None if self.sinks is None else per_head_tensor(self.sinks, str(device))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form for the report."""
        data = asdict(self)
        data["dtype"] = str(self.dtype).removeprefix("torch.")
        return data


def lamina_bytes(element_bytes: int, hidden: int, group_size: int, tokens: Any, layers: int) -> Any:
    """Lamina's bytes per iteration across the model/attention cut: (2 + 2/G)·e·d·B·L."""
    return (2 + sympy.Rational(2, group_size)) * element_bytes * hidden * tokens * layers


def _expr(value: Any) -> Any:
    return value.node.expr if isinstance(value, torch.SymInt) else sympy.Integer(value)


def _numel(t: torch.Tensor) -> Any:
    return sympy.Mul(*[_expr(s) for s in t.shape])


def _why_not_cut(node: fx.Node) -> str | None:
    """The reason this attention cannot be served from a remote KV cache, or None."""
    args = bind_arguments(node)
    q, k, v = args["q"], args["k"], args["v"]
    if args["sinks"] is not None and constant_values(args["sinks"]) is None:
        return "attention sinks known only at run time: the attention stages need them as constants"
    if args["softcap"] is not None and constant_number(args["softcap"]) is None:
        return "logit soft-capping with a cap known only at run time: the attention stages need it as a constant"
    if args["alibi_slopes"] is not None:
        return "ALiBi attention: the attention stages do not apply ALiBi slopes yet"
    if args["attn_mask"] is not None:
        return ("attention with a mask tensor: the attention stages apply the causal rule against "
                "their KV cache; trace the step with attn_implementation='tileflow_causal'")
    if not args["causal"]:
        return "non-causal attention: a remote KV cache serves causal self-attention only"
    qv, kv, vv = meta_val(q), meta_val(k), meta_val(v)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (qv, kv, vv)):
        return "attention operands without 4-D [B, H, S, D] shapes"
    if not statically_known_true(qv.shape[0] == 1):
        return f"batch dimension {qv.shape[0]} != 1: the step must pack its tokens into one row"
    if not statically_known_true(qv.shape[2] == kv.shape[2]):
        return "cross-attention (query and key lengths differ): not self-attention over new tokens"
    if qv.shape[1] % kv.shape[1] != 0:
        return f"{qv.shape[1]} query heads are not a multiple of {kv.shape[1]} KV heads"
    return None


def _token_mixing_outside_attention(gm: fx.GraphModule, tokens: Any) -> tuple[fx.Node, str] | None:
    """A convolution whose spatial dim is the token count (Mamba's and LFM2's causal short
    convolutions), with the reason it cannot be served; None when there is none. It reads the
    tokens before each one outside attention: a serving step would read the other sequences
    packed beside it, and none of its own earlier steps (it keeps no state but the KV cache)."""
    symbols = _expr(tokens).free_symbols
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.convolution.default:
            continue
        x = meta_val(node.args[0])
        if isinstance(x, torch.Tensor) and any(_expr(s).free_symbols & symbols for s in x.shape[2:]):
            return node, ("convolution over the token dimension (a Mamba or short-convolution layer): it reads earlier "
                          "tokens outside attention, and a serving step keeps no state between steps but the KV cache")
    return None


def _cut_of(index: int, node: fx.Node) -> AttentionCut:
    args = bind_arguments(node)
    scale, softcap, window, sinks = args["scale"], args["softcap"], args["sliding_window"], args["sinks"]
    qv, kv = meta_val(args["q"]), meta_val(args["k"])
    hq, hkv, d = int(qv.shape[1]), int(kv.shape[1]), int(qv.shape[3])
    e = qv.element_size()
    # q out, k and v out, the attention output back: per token.
    per_token = e * d * (hq + 2 * hkv + hq)
    return AttentionCut(
        index=index, node=node.name, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
        scale=float(scale) if scale is not None else 1.0 / math.sqrt(d), dtype=qv.dtype,
        bytes_per_token=per_token, sliding_window=None if window is None else int(window),
        softcap=None if softcap is None else constant_number(softcap),
        sinks=None if sinks is None else constant_values(sinks),
        attention_chunk=None if args["attention_chunk"] is None else int(args["attention_chunk"]),
    )


def crossing_bytes(node: fx.Node) -> Any:
    """Bytes crossing one attention cut per iteration, from the graph's (symbolic) shapes:
    the q, k and v operands out and the output back."""
    args = bind_arguments(node)
    return sum((_numel(meta_val(t)) * meta_val(t).element_size() for t in (args["q"], args["k"], args["v"], node)),
               sympy.Integer(0))


@register_pass
class Disaggregate:
    """Annotate dense/attention stages at each `meta_attention` and report the cut traffic."""

    name = "disaggregate"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Annotate every node with its stage; record the cuts (or why not) in the report."""
        result = PassResult()
        attentions = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ATTENTION_OP]
        if not attentions:
            result.fallback("graph", "no tileflow::meta_attention in the graph (run the attention pass first)")
            return result
        mixing = _token_mixing_outside_attention(gm, meta_val(attentions[0].args[0]).shape[2])
        if mixing is not None:
            result.fallback(*mixing)
            return result
        for node in attentions:
            reason = _why_not_cut(node)
            if reason is not None:
                # One attention that stays local keeps its KV cache local: the whole step stays.
                result.fallback(node, reason)
                return result
        cuts = [_cut_of(i, n) for i, n in enumerate(attentions)]
        total = sympy.expand(sum((crossing_bytes(n) for n in attentions), sympy.Integer(0)))
        tokens = _expr(meta_val(attentions[0].args[0]).shape[2])  # q [B, H, S, D]
        expected = sympy.expand(sum(
            (lamina_bytes(c.dtype.itemsize, c.num_q_heads * c.head_dim, c.group_size, tokens, 1) for c in cuts),
            sympy.Integer(0),
        ))
        if sympy.simplify(total - expected) != 0:
            raise AssertionError(f"cut traffic {total} bytes disagrees with Lamina's formula {expected}")

        stage = 0
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            if node.target is ATTENTION_OP:
                stage += 1
                _annotate(node, stage)
                stage += 1
            else:
                _annotate(node, stage)
        ctx.report.extra["disaggregate"] = {
            "attention_stages": len(cuts),
            "dense_stages": len(cuts) + 1,
            "bytes_per_iteration": str(total),
            "bytes_per_token": sum(c.bytes_per_token for c in cuts),
            "token_symbol": str(tokens),
            "cuts": [c.to_dict() for c in cuts],
        }
        gm.meta["tileflow_cuts"] = cuts
        result.count("disaggregate", len(cuts))
        return result


def _annotate(node: fx.Node, stage: int) -> None:
    node.meta.setdefault("tileflow", {})["stage"] = stage


@dataclass(frozen=True)
class Source:
    """Where a stage argument comes from: program input `index`, output `slot` of stage `index`,
    or `StageProgram.constants[index]` (a weight the graph reads directly)."""

    kind: str  # "input" | "stage" | "constant"
    index: int
    slot: int = 0


@dataclass
class Stage:
    """A dense stage (a GraphModule) or an attention stage (its cut), with its argument sources.
    An attention stage's sources are (q, k, v), and `key_starts` is the source of each token's
    first key when the step keeps several sequences packed in its row apart by them (a step
    calling `meta_attention(..., key_starts=)`; transformers steps exported by
    `build_stage_program` have none, see `StageProgram.run`)."""

    id: int
    kind: str  # "dense" | "attention"
    inputs: list[Source]
    module: fx.GraphModule | None = None
    cut: AttentionCut | None = None
    key_starts: Source | None = None

    @property
    def index(self) -> int:
        """The dense stage number (0 … L) or the attention layer number (0 … L − 1)."""
        return self.id // 2


# `attention(cut, q, k, v)`, and `key_starts=` when the stage has them (see `StageProgram.run`).
AttentionFn = Callable[..., torch.Tensor]


@dataclass
class StageProgram:
    """A step split at its attention ops: stages in execution order (dense, attention, dense, …,
    dense) and the program's outputs."""

    stages: list[Stage]
    outputs: list[Source]
    num_inputs: int
    constants: list[torch.Tensor] = field(default_factory=list)
    consumers: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    # The dense stages replay captured graphs (one at a time: never on two streams at once).
    cuda_graphs: bool = False
    # The most tokens a step may hold (the exported token dimension's bound), when known.
    max_tokens: int | None = None
    # The rows of the embedding table input 0 indexes (token ids must be below it), when known.
    vocab_size: int | None = None
    # Positions (input 1) must be below it: the rows of a learned position table (GPT-2's
    # `n_positions`), or where the step stops equalling the model (`max_positions_reason` says
    # which); None for models without such a bound (RoPE).
    max_positions: int | None = None
    max_positions_reason: str = "learned positions"
    # Per dense stage, its padded and grouped GEMMs' costs per token row (`nanobatch.gemm_costs`), when the
    # build took them: what the serving engine's `nano_batches="auto"` weighs a split with.
    dense_costs: list[list[Any]] = field(default_factory=list)

    @property
    def dense(self) -> list[Stage]:
        """The dense stages, in order."""
        return [s for s in self.stages if s.kind == "dense"]

    @property
    def cuts(self) -> list[AttentionCut]:
        """The attention cuts, in order."""
        return [s.cut for s in self.stages if s.kind == "attention"]

    def run(self, inputs: Sequence[Any], attention: AttentionFn | None = None) -> list[Any]:
        """Run every stage in this process and return the graph's flat outputs;
        `attention(cut, q, k, v)` replaces the attention stages (default: the original
        `meta_attention` over the given tokens, `local_attention`). A stage whose step packs
        sequences in one row calls it with `key_starts=` too (int [1, T], each token's first key),
        so a custom attention for such a program must accept that keyword; one that keeps
        sequences apart by itself (a KV cache per request) may ignore it.
        A transformers step exported by `build_stage_program` (`CausalLMStep`) has none: export
        cannot read the position ids, so its default attention takes the row as one sequence, and
        a step packing several needs an attention that keeps them apart (the serving engine's)."""
        stages = self.stepwise(inputs, attention)
        while True:
            try:
                next(stages)
            except StopIteration as done:
                return done.value

    def stepwise(self, inputs: Sequence[Any], attention: AttentionFn | None = None) -> Generator[int, None, list[Any]]:
        """`run`, one stage per `next()`: yields each stage's id after running it and returns the
        outputs (as `StopIteration.value`). Callers interleave several batches' stages with it,
        e.g. on separate streams."""
        attention = attention or local_attention
        values: dict[int, Any] = {}

        def resolve(src: Source) -> Any:
            if src.kind == "input":
                return inputs[src.index]
            if src.kind == "constant":
                return self.constants[src.index]
            return values[src.index][src.slot]

        for stage in self.stages:
            args = [resolve(s) for s in stage.inputs]
            if stage.kind == "dense":
                values[stage.id] = stage.module(*args)
            else:
                packed = {} if stage.key_starts is None else {"key_starts": resolve(stage.key_starts)}
                values[stage.id] = (attention(stage.cut, *args, **packed),)
            yield stage.id
        return [resolve(s) for s in self.outputs]


def local_attention(cut: AttentionCut, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_starts: torch.Tensor | None = None) -> torch.Tensor:
    """The attention stage run where it is: causal meta-attention over the given tokens (with the
    cut's sliding window or attention chunks, soft-cap and sinks, and the packed sequences'
    `key_starts` when the step has them)."""
    softcap = None if cut.softcap is None else torch.tensor(cut.softcap)
    return torch.ops.tileflow.meta_attention(q, k, v, None, True, cut.scale, "", None, softcap, cut.sliding_window,
                                             cut.sink_logits(q.device), None, cut.attention_chunk, key_starts)


def _split_returning_tuples(gm: fx.GraphModule, stage_of: Callable[[fx.Node], int]) -> fx.GraphModule:
    """`split_module` in original order with every stage returning a tuple, so each output of a
    stage is `getitem(stage, slot)` in the parent graph. torch >= 2.12 does this itself
    (`tuple_return=True`); on 2.11 the single outputs are wrapped here."""
    if "tuple_return" in inspect.signature(split_module).parameters:
        return split_module(gm, None, stage_of, keep_original_order=True, tuple_return=True)
    split = split_module(gm, None, stage_of, keep_original_order=True)
    for node in list(split.graph.nodes):
        if node.op != "call_module":
            continue
        stage = getattr(split, str(node.target))
        out = next(n for n in stage.graph.nodes if n.op == "output")
        if isinstance(out.args[0], (tuple, list)):
            continue
        out.args = ((out.args[0],),)
        stage.recompile()
        users = list(node.users)
        with split.graph.inserting_after(node):
            first = split.graph.call_function(operator.getitem, (node, 0))
        for user in users:
            user.replace_input_with(node, first)
    split.recompile()
    return split


def split_stages(gm: fx.GraphModule) -> StageProgram:
    """Split a graph the `disaggregate` pass annotated into a `StageProgram`."""
    cuts: list[AttentionCut] | None = gm.meta.get("tileflow_cuts")
    if not cuts:
        raise ValueError(
            "split_stages needs a graph annotated by the 'disaggregate' pass; this one has no cuts "
            "(see the report's fallbacks for why)"
        )

    def stage_of(node: fx.Node) -> int:
        try:
            return node.meta["tileflow"]["stage"]
        except KeyError:
            # get_attr nodes added after the pass (none today) belong with their first user.
            return min(stage_of(u) for u in node.users)

    _relay_attention_outputs(gm, stage_of)
    split = _split_returning_tuples(gm, stage_of)
    placeholders = [n for n in split.graph.nodes if n.op == "placeholder"]
    where: dict[fx.Node, Source] = {p: Source("input", i) for i, p in enumerate(placeholders)}
    constants: list[torch.Tensor] = []
    stages: list[Stage] = []
    cut_iter = iter(cuts)
    for node in split.graph.nodes:
        if node.op == "get_attr":
            where[node] = Source("constant", len(constants))
            constants.append(attribute(split, str(node.target)))
        elif node.op == "call_module":
            sid = int(str(node.target).removeprefix("submod_"))
            module = getattr(split, str(node.target))
            sources = [where[a] for a in node.args]
            if sid % 2 == 1:
                qkv, key_starts = _attention_sources(module, sources)
                stages.append(Stage(sid, "attention", qkv, cut=next(cut_iter), key_starts=key_starts))
            else:
                stages.append(Stage(sid, "dense", sources, module=module))
            where[node] = Source("stage", sid)
        elif node.op == "call_function" and node.args and node.args[0] in where:
            parent = where[node.args[0]]
            where[node] = Source("stage", parent.index, int(node.args[1]))
        elif node.op == "call_function":
            raise AssertionError(f"unexpected top-level node {node.format_node()} after split_module")
        elif node.op == "output":
            out = node.args[0]
            outputs = [where[o] for o in (out if isinstance(out, (tuple, list)) else [out])]
    ids = [s.id for s in stages]
    if ids != list(range(2 * len(cuts) + 1)):
        raise AssertionError(f"stages {ids} are not dense/attention alternating from 0 to {2 * len(cuts)}")
    # Key starts are not listed: only an attention run in this process reads them (attention
    # workers keep each request's sequence apart in its own KV cache), so they never cross.
    consumers: dict[tuple[int, int], list[int]] = {}
    for stage in stages:
        for src in stage.inputs:
            if src.kind == "stage":
                consumers.setdefault((src.index, src.slot), []).append(stage.id)
    for src in outputs:
        if src.kind == "stage":
            consumers.setdefault((src.index, src.slot), []).append(-1)
    return StageProgram(stages, outputs, len(placeholders), constants, consumers)


def _relay_attention_outputs(gm: fx.GraphModule, stage_of: Callable[[fx.Node], int]) -> None:
    """An attention's output goes back to one place, the dense stage after it. Where something
    else reads it (the graph's output, a later stage, the next attention with no node between
    them), an alias in that dense stage relays it, so the stage exists and is its only reader."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not ATTENTION_OP:
            continue
        after = stage_of(node) + 1
        if node.users and all(u.op != "output" and stage_of(u) == after for u in node.users):
            continue
        with gm.graph.inserting_after(node):
            relay = gm.graph.call_function(torch.ops.aten.alias.default, (node,))
        relay.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")})
        _annotate(relay, after)
        node.replace_all_uses_with(relay, delete_user_cb=lambda user, relay=relay: user is not relay)
    gm.recompile()


def _attention_sources(module: fx.GraphModule, sources: list[Source]) -> tuple[list[Source], Source | None]:
    """An attention submodule's argument sources as (q, k, v), and its key starts' (None without)."""
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    (attn,) = [n for n in module.graph.nodes if n.op == "call_function" and n.target is ATTENTION_OP]
    args = bind_arguments(attn)
    key_starts = args["key_starts"]
    return ([sources[placeholders.index(args[name])] for name in ("q", "k", "v")],
            None if key_starts is None else sources[placeholders.index(key_starts)])
