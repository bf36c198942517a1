"""The gemm_padding pass on real Dynamo graphs: rewrites, fused epilogues, plans and fallbacks."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Callable

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from models import VOCAB, ZOO, compiled_dynamic, llama

import tileflow
from tileflow.lower import gemm_specs_for_node
from tileflow.passes.gemm_padding import GemmPadding
from tileflow.pipeline import PassContext, PassResult, register_pass
from tileflow.runtime import decode_plan

aten = torch.ops.aten
prims = torch.ops.prims
GEMM = torch.ops.tileflow.padded_gemm.default
GROUPED = torch.ops.tileflow.grouped_gemm.default
_GRABBED: list[tuple[fx.GraphModule, PassContext]] = []


@register_pass
class GrabGraph:
    """Keeps the graph as the passes before it left it, for inspection."""

    name = "test_grab_graph"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        _GRABBED.append((gm, ctx))
        return PassResult()


def compile_fn(fn: Callable, *inputs: torch.Tensor, dynamic_dims=((0, 0),), target="reference", max_tokens=512,
               passes=("canonicalize", "gemm_padding")):
    """Compile through Dynamo with the given (input, dim) pairs dynamic and everything else static
    (weights stay static, as in a real model). Returns the compiled fn, its ATen graph (after
    `passes`) and context."""
    _GRABBED.clear()
    for index, dim in dynamic_dims:
        torch._dynamo.mark_dynamic(inputs[index], dim)
    options = {"target": target, "max_tokens": max_tokens, "passes": [*passes, "test_grab_graph"]}
    compiled = torch.compile(fn, backend=tileflow.TileflowBackend(options, report=tileflow.Report()), dynamic=False)
    compiled(*inputs)
    gm, ctx = _GRABBED[-1]
    return compiled, gm, ctx


def gemm_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target is GEMM]


def ops(gm: fx.GraphModule) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def test_mlp_swiglu_and_residual_fuse() -> None:
    def mlp(h, wg, wu, wd):
        return h + F.linear(F.silu(F.linear(h, wg)) * F.linear(h, wu), wd)

    h, wg, wu, wd = torch.randn(2, 5, 16), torch.randn(24, 16), torch.randn(24, 16), torch.randn(16, 24)
    compiled, gm, ctx = compile_fn(mlp, h, wg, wu, wd, dynamic_dims=((0, 0), (0, 1)))
    gemms = gemm_nodes(gm)
    assert len(gemms) == 2  # gate+up as one kernel, down with the residual
    assert gemms[0].args[4] == "swiglu" and gemms[0].args[8] is not None
    assert gemms[1].args[3] is not None  # residual operand
    assert aten.mul.Tensor not in ops(gm) and aten.silu.default not in ops(gm)
    assert ctx.report.passes[1].rewrites == {"padded_gemm": 2, "fused_swiglu": 1, "fused_residual": 1}
    for shape in ((2, 5, 16), (3, 17, 16), (4, 2, 16)):
        x = torch.randn(*shape)
        torch.testing.assert_close(compiled(x, wg, wu, wd), mlp(x, wg, wu, wd), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("approximate,gated", [("tanh", "geglu_tanh"), ("none", "geglu")])
@pytest.mark.parametrize("stacked", [False, True])
def test_mlp_geglu_fuses(approximate: str, gated: str, stacked: bool) -> None:
    """Gemma's MLP, `gelu(gate) * up` (the tanh GELU there; the erf one too): one kernel over the
    gate and up weights, from two linears or one stacked weight chunked in halves."""
    def mlp(h, wg, wu, wd):
        if stacked:
            gate, up = F.linear(h, torch.cat([wg, wu])).chunk(2, dim=-1)
        else:
            gate, up = F.linear(h, wg), F.linear(h, wu)
        return h + F.linear(F.gelu(gate, approximate=approximate) * up, wd)

    h, wg, wu, wd = torch.randn(2, 5, 16), torch.randn(24, 16) / 4, torch.randn(24, 16) / 4, torch.randn(16, 24) / 5
    compiled, gm, ctx = compile_fn(mlp, h, wg, wu, wd, dynamic_dims=((0, 0), (0, 1)))
    gemms = gemm_nodes(gm)
    assert len(gemms) == 2 and gemms[0].args[4] == gated and (gemms[0].args[8] is None) == stacked
    assert aten.gelu.default not in ops(gm) and aten.mul.Tensor not in ops(gm)
    rewrites = ctx.report.passes[1].rewrites
    assert rewrites[f"fused_{gated}"] == 1 and rewrites.get("stacked_gate_up", 0) == int(stacked)
    assert [bool(p.get("gated")) for p in ctx.report.plans] == [True, False]
    for shape in ((2, 5, 16), (3, 17, 16), (4, 2, 16)):
        x = torch.randn(*shape)
        torch.testing.assert_close(compiled(x, wg, wu, wd), mlp(x, wg, wu, wd), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act,gated", [(F.silu, "swiglu"), (lambda a: F.gelu(a, approximate="tanh"), "geglu_tanh")])
def test_an_up_projection_computed_before_its_gate_fuses_with_it(act, gated: str) -> None:
    """`up(x) * act(gate(x))` with the up projection first in the graph: it waits for its gate
    and they run as one gated kernel (it used to become a GEMM of its own first)."""
    def mlp(h, wg, wu, wd):
        up = F.linear(h, wu)
        return h + F.linear(up * act(F.linear(h, wg)), wd)

    h, wg, wu, wd = torch.randn(2, 5, 16), torch.randn(24, 16) / 4, torch.randn(24, 16) / 4, torch.randn(16, 24) / 5
    compiled, gm, ctx = compile_fn(mlp, h, wg, wu, wd, dynamic_dims=((0, 0), (0, 1)))
    gemms = gemm_nodes(gm)
    assert len(gemms) == 2 and gemms[0].args[4] == gated and gemms[0].args[8].op == "placeholder"
    assert ctx.report.passes[1].rewrites == {"padded_gemm": 2, f"fused_{gated}": 1, "fused_residual": 1}
    dead = [n.name for n in gm.graph.nodes if n.op == "call_function" and not n.users]
    assert not dead, dead
    for shape in ((2, 5, 16), (3, 17, 16)):
        x = torch.randn(*shape)
        torch.testing.assert_close(compiled(x, wg, wu, wd), mlp(x, wg, wu, wd), rtol=1e-5, atol=1e-5)


def test_stacked_swiglu_layers_each_fuse_and_leave_nothing_dead() -> None:
    """Each layer's up projection, through its views, goes with the gate's fusion (the pass
    erases what each fusion leaves unread as it goes, so no later rewrite sees it)."""
    def mlps(h, *weights):
        for wg, wu, wd in zip(weights[0::3], weights[1::3], weights[2::3]):
            # (3-D linears: canonicalize flattens each, so the up projection reaches the mul through a view.)
            h = h + F.linear(F.silu(F.linear(h, wg)) * F.linear(h, wu), wd)
        return h

    # Seeded, and scaled as a model's weights are: unscaled, three layers grew the output to ~1e6,
    # where fp32's different summation order failed rtol=1e-5 on about one run in three.
    gen = torch.Generator().manual_seed(0)
    weights = [w for _ in range(3) for w in (torch.randn(24, 16, generator=gen) / 4, torch.randn(24, 16, generator=gen) / 4,
                                            torch.randn(16, 24, generator=gen) / 24**0.5)]
    h = torch.randn(2, 5, 16, generator=gen)
    compiled, gm, ctx = compile_fn(mlps, h, *weights, dynamic_dims=((0, 0), (0, 1)))
    assert ctx.report.passes[1].rewrites == {"padded_gemm": 6, "fused_swiglu": 3, "fused_residual": 3}
    assert aten.linear.default not in ops(gm) and aten.mul.Tensor not in ops(gm)
    dead = [n.name for n in gm.graph.nodes if n.op == "call_function" and not n.users]
    assert not dead, dead
    for shape in ((2, 5, 16), (3, 7, 16)):
        x = torch.randn(*shape, generator=gen)
        torch.testing.assert_close(compiled(x, *weights), mlps(x, *weights), rtol=1e-5, atol=1e-5)


def test_bias_activation_and_cast_fuse() -> None:
    def block(x, w, b):
        return F.gelu(F.linear(x, w, b), approximate="tanh").to(torch.float16)

    x, w, b = torch.randn(7, 16), torch.randn(12, 16), torch.randn(12)
    compiled, gm, ctx = compile_fn(block, x, w, b)
    [gemm] = gemm_nodes(gm)
    assert gemm.args[2] is not None and gemm.args[4] == "gelu_tanh" and gemm.args[5] == torch.float16
    assert ctx.report.passes[1].rewrites == {"padded_gemm": 1, "fused_bias": 1, "fused_gelu_tanh": 1, "fused_cast": 1}
    x2 = torch.randn(19, 16)
    out = compiled(x2, w, b)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, block(x2, w, b), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("square", [lambda r: r.square(), lambda r: r ** 2, lambda r: r * r])
def test_relu_and_squared_relu_fuse(square) -> None:
    """A ReLU after a GEMM fuses (`relu`), and so does its square, however it is written
    (`square`, `** 2`, `r * r`: the `relu2` MLP of Nemotron-style models, kernel `relu2`)."""
    def mlp(x, w1, b1, w2):
        return F.linear(square(F.relu(F.linear(x, w1, b1))), w2) + F.linear(F.relu(F.linear(x, w1)), w2)

    x, w1, b1, w2 = torch.randn(7, 16), torch.randn(24, 16), torch.randn(24), torch.randn(16, 24)
    compiled, gm, ctx = compile_fn(mlp, x, w1, b1, w2)
    assert sorted(str(g.args[4]) for g in gemm_nodes(gm)) == ["none", "none", "relu", "relu2"]
    assert aten.relu.default not in ops(gm) and aten.pow.Tensor_Scalar not in ops(gm) and aten.mul.Tensor not in ops(gm)
    assert ctx.report.passes[1].rewrites == {"padded_gemm": 4, "fused_bias": 1, "fused_relu": 1, "fused_relu2": 1,
                                             "fused_residual": 1}
    for m in (7, 19):
        xm = torch.randn(m, 16)
        torch.testing.assert_close(compiled(xm, w1, b1, w2), mlp(xm, w1, b1, w2), rtol=1e-5, atol=1e-4)


def test_a_relu_read_twice_fuses_without_its_square() -> None:
    """A ReLU whose result is also read elsewhere fuses alone: the square stays, as does its reader."""
    def block(x, w):
        r = F.relu(F.linear(x, w))
        return r * r + r

    x, w = torch.randn(7, 16), torch.randn(12, 16)
    compiled, gm, ctx = compile_fn(block, x, w)
    [gemm] = gemm_nodes(gm)
    assert gemm.args[4] == "relu" and aten.mul.Tensor in ops(gm)
    torch.testing.assert_close(compiled(x, w), block(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, to", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                       (torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)])
def test_a_cast_of_a_half_precision_result_fuses_and_rounds_like_eager(dtype: torch.dtype, to: torch.dtype) -> None:
    """`lm_head(h).float()`: eager rounds the product to the input dtype (where float16 overflows
    to inf), then converts. The fused kernel does the same (`round_first`, the spec's `round`),
    so the compiled result is eager's bit for bit, the infs included. Integer operands: their
    products' sums are exact in float32 in any order (eager's GEMM and the kernel add in their own
    orders), so only the rounding to the input dtype (above 2048 for float16, 256 for bfloat16)
    and the conversion can tell the two apart."""
    def logits(x, w):
        return F.linear(x, w).to(to)

    def integers(*shape: int) -> torch.Tensor:
        return torch.randint(-64, 65, shape).to(dtype)

    x, w = integers(7, 16), integers(12, 16)
    x[0] = 100.0  # 16 * 100 * 100: past float16's range
    w[0] = 100.0
    compiled, gm, ctx = compile_fn(logits, x, w)
    [gemm] = gemm_nodes(gm)
    assert gemm.args[5] == to and gemm.args[10] is True  # out_dtype, round_first
    assert ctx.report.passes[1].rewrites == {"padded_gemm": 1, "fused_cast": 1}
    assert prims.convert_element_type.default not in ops(gm) and aten._to_copy.default not in ops(gm)
    specs = gemm_specs_for_node(gemm, decode_plan(gemm.args[6]))
    assert {(s.epilogue, s.out_dtype) for s in specs} == {(("round", "cast"), str(to).removeprefix("torch."))}
    for xv in (x, torch.cat([x, integers(11, 16)])):  # another M: the same kernel
        out, want = compiled(xv, w), logits(xv, w)
        assert out.dtype == want.dtype
        torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
    # float16 overflows in the product, and bfloat16's 480000 in the conversion to float16.
    assert torch.isinf(out).any() == (torch.float16 in (dtype, to))


def test_a_widening_cast_fuses_after_bias_and_residual() -> None:
    """The epilogue runs in float32, then rounds to float16 and widens: within the fused
    epilogues' tolerance of eager (which rounds after the GEMM and after the add), with eager's
    float16 overflow."""
    def block(x, w, b, r):
        return (F.linear(x, w, b) + r).float()

    x, w, b = torch.randn(7, 16).half(), (torch.randn(12, 16) / 4).half(), torch.randn(12).half()
    r = torch.randn(7, 12).half()
    x[0, :], w[0, :] = 64.0, 1.0
    r[0, 0] = 65000.0  # plus a product of 1024: past float16's 65504
    compiled, gm, ctx = compile_fn(block, x, w, b, r, dynamic_dims=((0, 0), (3, 0)))
    assert ctx.report.passes[1].rewrites == {"padded_gemm": 1, "fused_bias": 1, "fused_residual": 1, "fused_cast": 1}
    [gemm] = gemm_nodes(gm)
    assert gemm.args[3] is not None and gemm.args[5] == torch.float32 and gemm.args[10] is True
    out, want = compiled(x, w, b, r), block(x, w, b, r)
    assert out.dtype == torch.float32 and torch.isinf(want[0, 0]) and torch.isinf(out[0, 0])
    torch.testing.assert_close(out, want, rtol=2e-3, atol=2e-3)


def test_plan_covers_the_symbolic_range() -> None:
    def fn(x, w):
        return F.linear(x, w)

    x = torch.randn(2, 9, 16)
    _, gm, ctx = compile_fn(fn, x, torch.randn(8, 16), dynamic_dims=((0, 0), (0, 1)), max_tokens=777)
    [gemm] = gemm_nodes(gm)
    plan = decode_plan(gemm.args[6])
    assert plan.m_max == 777 and plan.m_min >= 1  # batch * seq, capped by max_tokens
    assert plan.n == 8 and plan.k == 16
    assert ctx.report.plans and ctx.report.plans[0]["describe"] == plan.describe()
    assert gemm.meta["tileflow"]["plan"] == plan.describe()


def test_static_m_gets_a_degenerate_plan() -> None:
    _, gm, _ = compile_fn(lambda x, w: F.linear(x, w), torch.randn(6, 16), torch.randn(8, 16), dynamic_dims=())
    [gemm] = gemm_nodes(gm)
    plan = decode_plan(gemm.args[6])
    assert plan.m_min == plan.m_max == 6 and len(plan.pieces) == 1


def test_unsupported_dtype_falls_back_with_reason() -> None:
    def fn(x, w):
        return F.linear(x, w)

    x, w = torch.randn(5, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    compiled, gm, ctx = compile_fn(fn, x, w, target="triton")
    assert not gemm_nodes(gm)
    [fallback] = ctx.report.fallbacks
    assert "float64 is not supported by the triton GEMM kernels" in fallback.reason
    assert fallback.pass_name == "gemm_padding"
    torch.testing.assert_close(compiled(x, w), fn(x, w))


EXPERT_W = torch.randn(3, 16, 8)  # [E, K, N], as Llama-4 stores its experts


class _StackedExperts(torch.nn.Module):
    """A bmm over the module's own stacked weights `EXPERT_W` (a parameter or a buffer), after an
    effectful op (`aten._print`) with `effect`; given `v`, also one over that stack the caller
    hands in."""

    def __init__(self, kind: str = "parameter", effect: bool = False) -> None:
        super().__init__()
        self.effect = effect
        if kind == "parameter":
            self.w = torch.nn.Parameter(EXPERT_W.clone())
        else:
            self.register_buffer("w", EXPERT_W.clone())

    def forward(self, x: torch.Tensor, v: torch.Tensor | None = None) -> Any:
        if self.effect:
            torch.ops.aten._print("tileflow: an effectful op")
        rows = x.repeat(3, 1).view(3, -1, 16)
        own = torch.bmm(rows, self.w).sum(0)
        return own if v is None else (own, torch.bmm(rows, v).sum(0))
EXPERT_GATE_UP, EXPERT_DOWN = torch.randn(3, 16, 2 * 12) / 4, torch.randn(3, 12, 16) / 12**0.5


def test_a_batched_gemm_over_stacked_weights_becomes_a_batched_grouped_gemm() -> None:
    """Llama-4's dense experts: every token's row times every expert's weight, one bmm over
    [E, T, K] rows. It becomes a grouped GEMM without offsets (expert e's rows are block e),
    planned for T rows per expert up to max_tokens (not E * T up to max_tokens); the plain linear
    beside it is rewritten too, and one compiled graph serves every T."""
    def experts(x, w):
        return torch.bmm(x.repeat(3, 1).view(3, -1, 16), EXPERT_W).sum(0) + F.linear(x, w)

    x, w = torch.randn(5, 16), torch.randn(8, 16)
    compiled, gm, ctx = compile_fn(experts, x, w)
    assert len(gemm_nodes(gm)) == 1 and not ctx.report.fallbacks
    [node] = [n for n in gm.graph.nodes if n.target is GROUPED]
    assert node.args[2] is None and node.args[3] == "none"
    assert aten.bmm.default not in ops(gm)
    plan = decode_plan(node.args[5])
    assert (plan.m_min, plan.m_max) == (2, 512)  # rows per expert: T in [2, max_tokens] (Dynamo marks T >= 2)
    assert node.meta["tileflow"]["plan"].startswith("rows per expert ceil(M / 3)")
    for t in (1, 9, 40):
        x = torch.randn(t, 16)
        torch.testing.assert_close(compiled(x, w), experts(x, w), rtol=1e-5, atol=1e-5)


def test_warmup_token_counts_reach_a_batched_grouped_gemms_pieces() -> None:
    """`warmup_token_counts` (bench/e2e.py's warm-up steps) over Llama-4-style batched experts
    ([E, T, K], no offsets): the runtime picks a piece at ceil(E * T / E) = T rows per expert, so
    each piece's first token count is a warm-up step, as for a plain GEMM of T rows. It read the
    rows at dim 0, E (an int no token count changes), and warmed only 1 and 2 tokens: the 17- and
    33-token pieces' kernels compiled inside the timed run."""
    import types

    from tileflow.distributed import warmup_token_counts

    weights = torch.randn(3, 16, 256)

    def experts(x):
        return torch.bmm(x.repeat(3, 1).view(3, -1, 16), weights).sum(0)

    def plain(x):
        return F.linear(x, weights[0].t())

    counts = []
    for fn in (experts, plain):
        _, gm, _ = compile_fn(fn, torch.randn(5, 16), max_tokens=4096)
        assert [n.target for n in gm.graph.nodes if n.target in (GEMM, GROUPED)] == [GROUPED if fn is experts else GEMM]
        program = types.SimpleNamespace(dense=[types.SimpleNamespace(module=gm)], max_tokens=4096)
        counts.append(warmup_token_counts(program, 4096))
    assert counts[0] == counts[1] and len(counts[0]) > 2, counts


@pytest.mark.parametrize("kind", ["parameter", "buffer"])
def test_a_static_bmm_over_stacked_parameters_becomes_a_batched_grouped_gemm(kind: str) -> None:
    """Under dynamic=False no size is symbolic, and a bmm over the module's own stacked weights
    (a parameter or a buffer, as Llama-4 keeps its experts) stayed a bmm: only a symbolic T told
    token rows apart. It becomes a batched grouped GEMM with a one-piece plan of its static T
    rows per expert. The same bmm over a stack the caller hands in (the tokens, a cache: under
    dynamic=True its sizes are symbolic) still stays a bmm."""
    model, x, v = _StackedExperts(kind).eval(), torch.randn(5, 16), torch.randn(3, 16, 8)
    with torch.no_grad():
        compiled, gm, ctx = compile_fn(model, x, v, dynamic_dims=())
        torch.testing.assert_close(compiled(x, v), model(x, v), rtol=1e-5, atol=1e-5)
    [node] = [n for n in gm.graph.nodes if n.target is GROUPED]
    assert node.args[2] is None and node.args[3] == "none"
    [bmm] = [n for n in gm.graph.nodes if n.target is aten.bmm.default]
    assert bmm.args[1].op == "placeholder" and bmm.args[1].meta["val"].shape == v.shape  # the caller's stack
    plan = decode_plan(node.args[5])
    assert (plan.m_min, plan.m_max) == (5, 5) and len(plan.pieces) == 1
    assert ctx.report.passes[1].rewrites == {"grouped_gemm": 1} and not ctx.report.fallbacks


def test_parameters_are_found_past_an_effect_token() -> None:
    """An effectful op (`aten._print`) makes AOTAutograd thread an effect token in as the graph's
    first input. torch 2.11 does not shift `fw_metadata.static_input_indices` past it (2.12 does),
    so the parameters were read one input early: the token rows `x` counted as the model's own and
    its stacked weights not, the bmm over them left a bmm under dynamic=False. The parameter input
    is named on every supported torch, and its bmm becomes a batched grouped GEMM."""
    model, x, v = _StackedExperts(effect=True).eval(), torch.randn(5, 16), torch.randn(3, 16, 4)
    with torch.no_grad():
        compiled, gm, ctx = compile_fn(model, x, v, dynamic_dims=())
        torch.testing.assert_close(compiled(x, v), model(x, v), rtol=1e-5, atol=1e-5)
    placeholders = {n.name: n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"}
    assert [tuple(placeholders[name].shape) for name in ctx.parameter_inputs] == [tuple(EXPERT_W.shape)]
    [node] = [n for n in gm.graph.nodes if n.target is GROUPED]
    assert node.args[2] is None and ctx.report.passes[1].rewrites == {"grouped_gemm": 1}
    [bmm] = [n for n in gm.graph.nodes if n.target is aten.bmm.default]
    assert tuple(bmm.args[1].meta["val"].shape) == tuple(v.shape)  # the caller's stack stays a bmm


def test_parameters_are_found_past_an_effect_token_with_grad_enabled() -> None:
    """As above, compiled with grad enabled (the parameter requires grad): AOTAutograd traces the
    forward with its backward, and there no torch shifts `static_input_indices` past the effect
    token (2.12 on shifts them for an inference graph only), so on torch 2.13 the token rows `x`
    were named the parameter and the bmm over the model's stacked weights stayed a bmm."""
    model, x = _StackedExperts(effect=True).eval(), torch.randn(5, 16)
    with torch.enable_grad():
        compiled, gm, ctx = compile_fn(model, x, dynamic_dims=())
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    placeholders = {n.name: n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"}
    assert [tuple(placeholders[name].shape) for name in ctx.parameter_inputs] == [tuple(EXPERT_W.shape)]
    assert [n for n in gm.graph.nodes if n.target is GROUPED] and ctx.report.passes[1].rewrites == {"grouped_gemm": 1}


def test_a_batched_swiglu_over_stacked_weights_fuses() -> None:
    """Llama-4's expert MLP: `gate, up = bmm(x, gate_up).chunk(2, -1)`, then `up * silu(gate)`
    (up first) times the down weights: one fused SwiGLU grouped GEMM and one plain."""
    def mlp(x):
        gate, up = torch.bmm(x.view(3, -1, 16), EXPERT_GATE_UP).chunk(2, dim=-1)
        return torch.bmm(up * F.silu(gate), EXPERT_DOWN).view(-1, 16)

    compiled, gm, ctx = compile_fn(mlp, torch.randn(12, 16))
    nodes = [n for n in gm.graph.nodes if n.target is GROUPED]
    assert [n.args[3] for n in nodes] == ["swiglu", "none"] and not ctx.report.fallbacks
    assert aten.silu.default not in ops(gm)
    assert ctx.report.passes[1].rewrites == {"grouped_gemm": 2, "fused_grouped_swiglu": 1}
    for t in (1, 4, 35):
        x = torch.randn(3 * t, 16)
        torch.testing.assert_close(compiled(x), mlp(x), rtol=1e-5, atol=1e-5)


def test_multi_user_intermediates_are_not_fused() -> None:
    def fn(x, w):
        y = F.linear(x, w)
        return F.silu(y), y * 2  # y is needed unactivated too

    x, w = torch.randn(5, 16), torch.randn(8, 16)
    compiled, gm, _ = compile_fn(fn, x, w)
    [gemm] = gemm_nodes(gm)
    assert gemm.args[4] == "none"
    for got, want in zip(compiled(x, w), fn(x, w)):
        torch.testing.assert_close(got, want)


def test_measured_tma_plans_for_gemms_with_and_without_epilogues(tmp_path, monkeypatch) -> None:
    """With measured TMA times that win everywhere, a linear with no epilogue and one with a
    fused residual both plan TMA pieces (the TMA kernel reads the residual and writes the
    output through descriptors, without spills: sm_90 compile check); both match eager."""
    import json

    from tileflow import runtime
    from tileflow.devices import get_device
    from tileflow.tiles import candidate_configs

    h200 = get_device("H200")
    monkeypatch.setattr(runtime, "device_for_target", lambda target, device_type: h200)
    entries = []
    for n in (24, 16):  # the two GEMMs' widths, K = 16 and 24
        k = 16 if n == 24 else 24
        for c in candidate_configs(n, k, "float16", h200):
            entry = {"device": "H200", "dtype": "float16", "n": n, "k": k, "tile": c.to_dict()}
            entries += [{**entry, "tile_seconds": 1e-4}, {**entry, "tile_seconds": 1e-5, "tma": True}]
    path = tmp_path / "timings.json"
    path.write_text(json.dumps(entries))

    def block(h, w1, w2):
        return h + F.linear(F.gelu(F.linear(h, w1)), w2)

    h, w1, w2 = torch.randn(9, 16).half(), (torch.randn(24, 16) / 4).half(), (torch.randn(16, 24) / 5).half()
    torch._dynamo.mark_dynamic(h, 0)
    options = {"target": "reference", "max_tokens": 512, "tile_timings": str(path),
               "passes": ["canonicalize", "gemm_padding", "test_grab_graph"]}
    _GRABBED.clear()
    compiled = torch.compile(block, backend=tileflow.TileflowBackend(options, report=tileflow.Report()), dynamic=False)
    torch.testing.assert_close(compiled(h, w1, w2), block(h, w1, w2), rtol=2e-3, atol=2e-3)
    up, down = gemm_nodes(_GRABBED[-1][0])
    assert down.args[3] is not None  # the residual is fused into the second GEMM
    assert all(piece.tma for piece in decode_plan(up.args[6]).pieces)
    assert all(piece.tma for piece in decode_plan(down.args[6]).pieces)


def test_siblings_on_measured_tma_pieces_run_as_one_tma_kernel(tmp_path, monkeypatch) -> None:
    """Q, K and V (128 + 64 + 64 columns) whose measured times make every piece a TMA one of a
    tile whose BLOCK_N divides the segments' starts: one node, no plans per segment, lowering
    builds segmented TMA kernels only, and the compiled model matches eager at every M."""
    import json

    from tileflow import runtime
    from tileflow.devices import get_device
    from tileflow.tiles import candidate_configs

    h200 = get_device("H200")
    monkeypatch.setattr(runtime, "device_for_target", lambda target, device_type: h200)
    entries = []
    for c in candidate_configs(256, 64, "float16", h200):
        entry = {"device": "H200", "dtype": "float16", "n": 256, "k": 64, "tile": c.to_dict()}
        fast = 192 % c.block_n == 0  # a tile that reads one weight per output tile
        entries += [{**entry, "tile_seconds": 1e-4}, {**entry, "tile_seconds": 1e-5 if fast else 1e-3, "tma": True}]
    path = tmp_path / "timings.json"
    path.write_text(json.dumps(entries))

    def projections(h, wq, wk, wv):
        return F.linear(h, wq) * 2, F.linear(h, wk) * 2, F.linear(h, wv) * 2

    weights = [(torch.randn(rows, 64) / 8).half() for rows in (128, 64, 64)]
    h = torch.randn(9, 64).half()
    torch._dynamo.mark_dynamic(h, 0)
    options = {"target": "triton", "max_tokens": 512, "tile_timings": str(path),
               "passes": ["canonicalize", "gemm_padding", "test_grab_graph"]}
    _GRABBED.clear()
    compiled = torch.compile(projections, backend=tileflow.TileflowBackend(options, report=tileflow.Report()),
                             dynamic=False)
    compiled(h, *weights)
    [gemm] = gemm_nodes(_GRABBED[-1][0])
    plan = decode_plan(gemm.args[6])
    assert plan.segment_plans == () and plan.pieces and all(p.tma for p in plan.pieces)
    specs = gemm_specs_for_node(gemm, plan)
    assert specs and all(spec.param("segments") == "128x64x64" and spec.param("tma") for spec in specs)
    for tokens in (1, 9, 40):
        x = torch.randn(tokens, 64).half()
        for got, want in zip(compiled(x, *weights), projections(x, *weights)):
            torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


def test_the_report_says_which_plans_measured_tile_times_made(tmp_path) -> None:
    """Each padded-GEMM plan in the report names where its times came from: the tile-timings
    file for a shape it holds, the cost model for one it does not (whose candidate configs it
    does not all cover, so nothing is carried to it); the text report shows it too."""
    import json

    from tileflow.devices import get_device
    from tileflow.report import format_report
    from tileflow.tiles import candidate_configs

    cpu = get_device("cpu")
    entries = [{"device": "cpu", "dtype": "float32", "n": 24, "k": 16, "tile": c.to_dict(), "tile_seconds": 1e-4}
               for c in candidate_configs(24, 16, "float32", cpu)]
    path = tmp_path / "timings.json"
    path.write_text(json.dumps(entries))

    def block(h, w1, w2):
        return F.linear(F.gelu(F.linear(h, w1)), w2)

    h, w1, w2 = torch.randn(9, 16), torch.randn(24, 16) / 4, torch.randn(40, 24) / 5
    torch._dynamo.mark_dynamic(h, 0)
    report = tileflow.Report()
    options = {"target": "reference", "max_tokens": 512, "tile_timings": str(path)}
    compiled = torch.compile(block, backend=tileflow.TileflowBackend(options, report=report), dynamic=False)
    torch.testing.assert_close(compiled(h, w1, w2), block(h, w1, w2))
    sources = {(p["n"], p["k"]): p["tile_times"] for p in report.graphs[-1].plans}
    assert sources == {(24, 16): f"measured: {path}", (40, 24): "cost model"}
    text = format_report(report)
    lines = {line.split(":")[0].strip(): line for line in text.splitlines() if line.strip().startswith("padded_gemm N=")}
    assert lines["padded_gemm N=24 K=16 float32"].endswith(f"[measured: {path}]")
    assert lines["padded_gemm N=40 K=24 float32"].endswith("[cost model]")


def test_linear_bias_given_by_keyword_is_kept() -> None:
    # A hand-built graph may spell the bias as a keyword: it must not be dropped.
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    from tileflow.config import Config
    from tileflow.pipeline import get_pass
    from tileflow.report import GraphReport

    def fn(x, w, b):
        return aten.linear.default(x, w, bias=b)

    x, w, b = torch.randn(5, 16), torch.randn(8, 16), torch.randn(8)
    gm = fx.symbolic_trace(fn)
    mode = FakeTensorMode()
    FakeTensorProp(gm, mode).propagate(*[mode.from_tensor(t) for t in (x, w, b)])
    result = get_pass("gemm_padding").run(gm, PassContext(config=Config(), report=GraphReport(graph_id="g")))
    assert result.rewrites == {"padded_gemm": 1, "fused_bias": 1}
    [gemm] = gemm_nodes(gm)
    assert gemm.args[2] is not None
    torch.testing.assert_close(gm(x, w, b), F.linear(x, w, b))


def test_m_above_max_tokens_falls_back_for_that_gemm_only() -> None:
    # M = 40 * batch >= 80 > max_tokens: that GEMM has no plan and stays as it was, with the reason;
    # the other GEMM of the graph (static M) is still rewritten (the pass is not rolled back).
    def fn(x, w, w2):
        return F.linear(x, w), F.linear(x[0], w2)

    x, w, w2 = torch.randn(5, 40, 16), torch.randn(8, 16), torch.randn(8, 16)
    compiled, gm, ctx = compile_fn(fn, x, w, w2, max_tokens=64)
    assert len(gemm_nodes(gm)) == 1
    [fallback] = ctx.report.fallbacks
    assert "above max_tokens=64" in fallback.reason and "rolled back" not in fallback.reason
    x2 = torch.randn(3, 40, 16)
    for got, want in zip(compiled(x2, w, w2), fn(x2, w, w2)):
        torch.testing.assert_close(got, want)


def test_matrix_products_left_as_they_are_each_have_a_reason() -> None:
    """An `addmm` canonicalize does not make a linear (a scaled product or bias, a bias [1, N])
    and a matrix-vector product run as they are: the report says why for each, as for a linear."""
    def fn(x, w, b, v):
        return (torch.addmm(b, x, w.t(), beta=0.5), torch.addmm(b, x, w.t(), alpha=2.0),
                torch.addmm(b.view(1, -1), x, w.t()), x @ v)

    x, w, b, v = torch.randn(7, 16), torch.randn(8, 16), torch.randn(8), torch.randn(16)
    compiled, gm, ctx = compile_fn(fn, x, w, b, v)
    assert not gemm_nodes(gm)
    reasons = [f.reason for f in ctx.report.fallbacks]
    assert len(reasons) == 4, reasons
    assert ["beta=0.5" in r for r in reasons[:3]] == [True, False, False] and "alpha=2.0" in reasons[1]
    assert "bias of shape [1, 8]" in reasons[2] and "matrix-vector" in reasons[3]
    x2 = torch.randn(11, 16)
    for got, want in zip(compiled(x2, w, b, v), fn(x2, w, b, v)):
        torch.testing.assert_close(got, want)


def test_siblings_without_a_plan_fall_back_each_with_the_reason() -> None:
    """Sibling linears whose M passes max_tokens have no plan: each stays a linear with the
    reason, and the rest of the graph is still rewritten (not a rolled-back pass)."""
    def fn(x, wa, wb, w2):
        return F.linear(x, wa) * 2, F.linear(x, wb) * 2, F.linear(x[0], w2)

    x, wa, wb, w2 = torch.randn(5, 40, 16), torch.randn(8, 16), torch.randn(8, 16), torch.randn(8, 16)
    compiled, gm, ctx = compile_fn(fn, x, wa, wb, w2, max_tokens=64)
    assert len(gemm_nodes(gm)) == 1 and "fused_siblings" not in ctx.report.passes[1].rewrites
    assert len(ctx.report.fallbacks) == 2 and all("above max_tokens=64" in f.reason for f in ctx.report.fallbacks)
    x2 = torch.randn(3, 40, 16)
    for got, want in zip(compiled(x2, wa, wb, w2), fn(x2, wa, wb, w2)):
        torch.testing.assert_close(got, want)


def test_a_bias_added_by_hand_is_the_linears() -> None:
    """`x @ W.T + b` (b of N elements) is a linear with a bias: it fuses as one, with the
    activation and residual after it (it was left as a separate add, and the activation with
    it). An add that is not a bias stays: b broadcast over heads after a view that splits the N
    features, or with a SiLU gate whose up projection has none (SwiGLU kernels add both biases
    or neither: a fused SiLU, the product left)."""
    def mlp(h, w, b, w2):
        return h + F.linear(F.silu(h @ w.t() + b), w2)

    h, w, b, w2 = torch.randn(7, 16), torch.randn(24, 16), torch.randn(24), torch.randn(16, 24)
    compiled, gm, ctx = compile_fn(mlp, h, w, b, w2)
    first, second = gemm_nodes(gm)
    assert first.args[2] is not None and first.args[4] == "silu" and second.args[3] is not None
    assert ctx.report.passes[1].rewrites == {"padded_gemm": 2, "fused_bias": 1, "fused_silu": 1, "fused_residual": 1}
    assert aten.add.Tensor not in ops(gm)
    for rows in (7, 19, 2):
        x = torch.randn(rows, 16)
        torch.testing.assert_close(compiled(x, w, b, w2), mlp(x, w, b, w2), rtol=1e-5, atol=1e-5)

    def per_head(h, w, b):
        return (h @ w.t()).view(h.shape[0], 4, 6) + b  # b [6]: one value per head dim

    compiled, gm, ctx = compile_fn(per_head, h, w, b[:6])
    assert "fused_bias" not in ctx.report.passes[1].rewrites and aten.add.Tensor in ops(gm)
    x = torch.randn(11, 16)
    torch.testing.assert_close(compiled(x, w, b[:6]), per_head(x, w, b[:6]), rtol=1e-5, atol=1e-5)

    def gated(h, wg, bg, wu):
        return F.silu(h @ wg.t() + bg) * (h @ wu.t())

    compiled, gm, ctx = compile_fn(gated, h, w, b, w)
    assert ctx.report.passes[1].rewrites == {"padded_gemm": 2, "fused_bias": 1, "fused_silu": 1}
    torch.testing.assert_close(compiled(x, w, b, w), gated(x, w, b, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, fn", [
    ("residual scaled", lambda h, w, b: torch.add(h, F.linear(h, w), alpha=2)),
    ("product scaled", lambda h, w, b: torch.add(F.linear(h, w), h, alpha=2)),
    ("bias scaled", lambda h, w, b: torch.add(h @ w.t(), b, alpha=2)),
    ("a row broadcast", lambda h, w, b: F.linear(h, w) + h[:1]),
    ("a column broadcast", lambda h, w, b: F.linear(h, w) + h[:, :1]),
])
def test_adds_that_scale_or_broadcast_are_no_epilogue(name: str, fn: Callable) -> None:
    """An add with `alpha` (which scales its second operand) is neither a bias nor a residual of
    the GEMM before it, and neither is one that broadcasts its other operand over the rows or
    the columns: the GEMM is still rewritten, the add stays as it is, and the result is eager's."""
    h, w, b = torch.randn(7, 16), torch.randn(16, 16), torch.randn(16)
    compiled, gm, ctx = compile_fn(fn, h, w, b)
    assert ctx.report.passes[1].rewrites == {"padded_gemm": 1}, name
    assert aten.add.Tensor in ops(gm)
    for rows in (7, 19, 2):
        x = torch.randn(rows, 16)
        torch.testing.assert_close(compiled(x, w, b), fn(x, w, b), rtol=1e-5, atol=1e-5)


def test_only_a_relu_squared_is_a_squared_relu() -> None:
    """Only `relu(a) ** 2` and `relu(a) * relu(a)` are the squared ReLU (`relu2`): a ReLU times
    another tensor or raised to another power, and a squared GELU, fuse their activation alone
    and the rest stays."""
    def times_other(x, w, y):
        return F.relu(F.linear(x, w)) * y

    def cubed(x, w, y):
        return F.relu(F.linear(x, w)) ** 3

    def gelu_squared(x, w, y):
        return F.gelu(F.linear(x, w)) ** 2

    gen = torch.Generator().manual_seed(0)
    x, w, y = torch.randn(7, 16, generator=gen), torch.randn(24, 16, generator=gen), torch.randn(7, 24, generator=gen)
    for fn, activation in ((times_other, "relu"), (cubed, "relu"), (gelu_squared, "gelu")):
        compiled, gm, ctx = compile_fn(fn, x, w, y, dynamic_dims=((0, 0), (2, 0)))
        assert [g.args[4] for g in gemm_nodes(gm)] == [activation], fn.__name__
        assert ctx.report.passes[1].rewrites == {"padded_gemm": 1, f"fused_{activation}": 1}, fn.__name__
        for rows in (7, 19):
            xm, ym = torch.randn(rows, 16, generator=gen), torch.randn(rows, 24, generator=gen)
            torch.testing.assert_close(compiled(xm, w, ym), fn(xm, w, ym), rtol=1e-5, atol=1e-4)


def test_a_gate_and_up_on_different_inputs_are_no_swiglu_pair() -> None:
    """`silu(x @ Wg.T) * (y @ Wu.T)` with y not x: the two GEMMs do not share their input, so
    they are no SwiGLU pair (one kernel would read x for both): the gate fuses its SiLU alone."""
    def gated(x, wg, y, wu):
        return F.silu(F.linear(x, wg)) * F.linear(y, wu)

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 16, generator=gen), torch.randn(7, 16, generator=gen)
    wg, wu = torch.randn(24, 16, generator=gen), torch.randn(24, 16, generator=gen)
    compiled, gm, ctx = compile_fn(gated, x, wg, y, wu, dynamic_dims=((0, 0), (2, 0)))
    assert sorted(str(g.args[4]) for g in gemm_nodes(gm)) == ["none", "silu"]
    assert ctx.report.passes[1].rewrites == {"padded_gemm": 2, "fused_silu": 1}
    for rows in (7, 19):
        xm, ym = torch.randn(rows, 16, generator=gen), torch.randn(rows, 16, generator=gen)
        torch.testing.assert_close(compiled(xm, wg, ym, wu), gated(xm, wg, ym, wu), rtol=1e-5, atol=1e-5)


def test_a_residual_of_another_dtype_is_no_epilogue() -> None:
    """A float32 tensor added to a float16 GEMM's result promotes the sum to float32: it is no
    residual of the float16 kernel (which takes a residual in its own dtypes only), the add stays
    and the result is eager's, float32."""
    def block(x, w, r):
        return F.linear(x, w) + r

    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(7, 16, generator=gen).half(), (torch.randn(24, 16, generator=gen) / 4).half()
    r = torch.randn(7, 24, generator=gen)
    compiled, gm, ctx = compile_fn(block, x, w, r, dynamic_dims=((0, 0), (2, 0)))
    assert ctx.report.passes[1].rewrites == {"padded_gemm": 1}
    assert aten.add.Tensor in ops(gm)
    for rows in (7, 19):
        xm, rm = torch.randn(rows, 16, generator=gen).half(), torch.randn(rows, 24, generator=gen)
        got = compiled(xm, w, rm)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, block(xm, w, rm), rtol=2e-3, atol=2e-3)


def test_a_fused_swiglu_has_a_plan_of_its_own() -> None:
    """A SwiGLU pair and a plain GEMM of the same [N, K] weights get two plans (a fused SwiGLU's
    stages hold two weight tiles), and the report marks the SwiGLU's."""
    def block(x, wg, wu):
        return F.silu(F.linear(x, wg)) * F.linear(x, wu) + F.linear(x, wu)

    gen = torch.Generator().manual_seed(3)
    x, wg, wu = torch.randn(7, 16, generator=gen), torch.randn(24, 16, generator=gen), torch.randn(24, 16, generator=gen)
    compiled, gm, ctx = compile_fn(block, x, wg, wu)
    assert sorted(str(g.args[4]) for g in gemm_nodes(gm)) == ["none", "swiglu"]
    plans = [p for p in ctx.report.plans if p["op"] == "padded_gemm" and p["n"] == 24 and p["k"] == 16]
    assert sorted(bool(p.get("gated")) for p in plans) == [False, True], plans


def test_a_gate_with_a_bias_pairs_only_with_an_up_with_one() -> None:
    """SwiGLU kernels add both biases or neither: a gate `linear(h, Wg, bg)` whose up projection
    has no bias is no pair (the gate fuses its bias and SiLU, the product stays), and the graph
    still compiles and runs as eager."""
    def gated(h, wg, bg, wu):
        return F.silu(F.linear(h, wg, bg)) * F.linear(h, wu)

    gen = torch.Generator().manual_seed(4)
    h, wg, bg, wu = (torch.randn(7, 16, generator=gen), torch.randn(24, 16, generator=gen),
                     torch.randn(24, generator=gen), torch.randn(24, 16, generator=gen))
    compiled, gm, ctx = compile_fn(gated, h, wg, bg, wu)
    assert sorted(str(g.args[4]) for g in gemm_nodes(gm)) == ["none", "silu"]
    assert ctx.report.passes[1].rewrites == {"padded_gemm": 2, "fused_bias": 1, "fused_silu": 1}
    for rows in (7, 19):
        x = torch.randn(rows, 16, generator=gen)
        torch.testing.assert_close(compiled(x, wg, bg, wu), gated(x, wg, bg, wu), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form,target", [("3d_then_down", "reference"), ("3d_returned", "reference"),
                                         ("2d_with_bias", "reference"), ("3d_then_down", "triton")])
def test_swiglu_over_one_stacked_weight_fuses(form: str, target: str) -> None:
    """Phi-3's MLP: one gate-and-up weight [2I, K], its output chunked in halves, silu of the
    first times the second. One padded_gemm reads the stacked weight (and bias) as it is; the
    product keeps the shape eager gives it, and the down projection takes its residual."""
    def mlp(h, w_gu, b_gu, wd):
        gate, up = F.linear(h, w_gu, b_gu if form == "2d_with_bias" else None).chunk(2, dim=-1)
        act = up * F.silu(gate)
        if form == "3d_returned":
            return act * 2
        return h + F.linear(act, wd)

    h = torch.randn(2, 5, 16) if form != "2d_with_bias" else torch.randn(7, 16)
    w_gu, b_gu, wd = torch.randn(48, 16), torch.randn(48), torch.randn(16, 24)
    compiled, gm, ctx = compile_fn(mlp, h, w_gu, b_gu, wd, dynamic_dims=((0, 0),) if h.dim() == 2 else ((0, 0), (0, 1)),
                                   target=target)
    gemms = gemm_nodes(gm)
    assert len(gemms) == (1 if form == "3d_returned" else 2)
    stacked = gemms[0]
    assert stacked.args[1].op == "placeholder" and stacked.args[4] == "swiglu" and stacked.args[8] is None  # weight as is
    assert (stacked.args[2] is not None) == (form == "2d_with_bias")
    assert decode_plan(stacked.args[6]).n == 24
    assert aten.split.Tensor not in ops(gm) and aten.silu.default not in ops(gm)
    assert ctx.report.passes[1].rewrites["fused_swiglu"] == ctx.report.passes[1].rewrites["stacked_gate_up"] == 1
    for tokens in (1, 3, 11):
        x = torch.randn(tokens, 16) if h.dim() == 2 else torch.randn(2, tokens, 16)
        # atol 1e-4: the down projection sums 24 products of order 10 (unit weights), whose float32
        # rounding in another order reached 1.8e-5 on one element in a run; a wrong row is off by ~10.
        torch.testing.assert_close(compiled(x, w_gu, b_gu, wd), mlp(x, w_gu, b_gu, wd), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bias,target", [("none", "reference"), ("linear", "reference"), ("by_hand", "reference"),
                                         ("linear", "triton")])
def test_halves_gated_second_first_fuse_over_views_of_the_stacked_weight(bias: str, target: str) -> None:
    """diffusers' GeGLU and Moonshine's MLP: `h, gate = proj(x).chunk(2); h * act(gate)`, the
    gate in the second half. The kernels read a stacked weight's gate from its first half, so
    the node takes the halves as separate gate and up weights: slices of the stacked weight and
    bias (views; never a copy), gate first. Matches eager."""
    def mlp(h, w_gu, b_gu):
        if bias == "by_hand":
            out = h @ w_gu.t() + b_gu
        else:
            out = F.linear(h, w_gu, b_gu if bias == "linear" else None)
        first, second = out.chunk(2, dim=-1)
        return first * F.gelu(second)

    gen = torch.Generator().manual_seed(11)
    h, w_gu, b_gu = torch.randn(6, 16, generator=gen), torch.randn(48, 16, generator=gen) / 4, torch.randn(48, generator=gen)
    compiled, gm, ctx = compile_fn(mlp, h, w_gu, b_gu, target=target)
    [gemm] = gemm_nodes(gm)
    assert gemm.args[4] == "geglu"
    weight, weight_up = gemm.args[1], gemm.args[8]
    for half, start in ((weight, 24), (weight_up, 0)):  # the gate is the second half
        assert half.target is aten.slice.Tensor and half.args[0].op == "placeholder" and half.args[1:] == (0, start, start + 24)
    if bias == "none":
        assert gemm.args[2] is None and gemm.args[9] is None
    else:
        assert [b.args[1:] for b in (gemm.args[2], gemm.args[9])] == [(0, 24, 48), (0, 0, 24)]
    assert decode_plan(gemm.args[6]).n == 24
    assert aten.gelu.default not in ops(gm) and aten.mul.Tensor not in ops(gm)
    rewrites = ctx.report.passes[1].rewrites
    assert rewrites["fused_geglu"] == rewrites["stacked_gate_up"] == 1
    assert rewrites.get("fused_bias", 0) == int(bias != "none")
    for tokens in (1, 2, 9):
        x = torch.randn(tokens, 16, generator=gen)
        torch.testing.assert_close(compiled(x, w_gu, b_gu), mlp(x, w_gu, b_gu), rtol=1e-5, atol=1e-5)


def test_a_stacked_gate_up_with_a_bias_added_by_hand_fuses() -> None:
    """`gate, up = (x @ W.T + b).chunk(2)` then `silu(gate) * up`, viewed [B, S, 2I]: the
    added bias is the stacked GEMM's bias, in one kernel with the SwiGLU."""
    def mlp(h, w_gu, b_gu):
        gate, up = (torch.matmul(h, w_gu.t()) + b_gu).chunk(2, dim=-1)
        return F.silu(gate) * up

    gen = torch.Generator().manual_seed(12)
    h, w_gu, b_gu = torch.randn(2, 5, 16, generator=gen), torch.randn(48, 16, generator=gen), torch.randn(48, generator=gen)
    compiled, gm, ctx = compile_fn(mlp, h, w_gu, b_gu, dynamic_dims=((0, 0), (0, 1)))
    [gemm] = gemm_nodes(gm)
    assert gemm.args[4] == "swiglu" and gemm.args[2].op == "placeholder" and gemm.args[8] is None
    assert ops(gm)[aten.add.Tensor] == 0 and aten.silu.default not in ops(gm)
    assert ctx.report.passes[1].rewrites == {"padded_gemm": 1, "fused_bias": 1, "fused_swiglu": 1, "stacked_gate_up": 1}
    for batch, tokens in ((2, 5), (1, 13), (3, 2)):
        x = torch.randn(batch, tokens, 16, generator=gen)
        torch.testing.assert_close(compiled(x, w_gu, b_gu), mlp(x, w_gu, b_gu), rtol=1e-5, atol=1e-5)


def test_expert_halves_gated_second_first_stay_apart() -> None:
    """The grouped kernels read each expert's gate from the first half of its weight: experts
    whose second half is the gate keep their product out of the kernel (and match eager)."""
    def mlp(x):
        first, second = torch.bmm(x.view(3, -1, 16), EXPERT_GATE_UP).chunk(2, dim=-1)
        return torch.bmm(first * F.silu(second), EXPERT_DOWN).view(-1, 16)

    compiled, gm, ctx = compile_fn(mlp, torch.randn(12, 16))
    assert [n.args[3] for n in gm.graph.nodes if n.target is GROUPED] == ["none", "none"]
    assert aten.silu.default in ops(gm) and "fused_grouped_swiglu" not in ctx.report.passes[1].rewrites
    for t in (1, 4):
        x = torch.randn(3 * t, 16)
        torch.testing.assert_close(compiled(x), mlp(x), rtol=1e-5, atol=1e-5)


def _attention_inputs(h, wq, bq, wk, bk, wv, bv):
    """A layer's Q, K and V projections (Qwen2-style, with biases), split into heads of 8."""
    b, t = h.shape[0], h.shape[1]
    q = F.linear(h, wq, bq).view(b, t, -1, 8).transpose(1, 2)
    k = F.linear(h, wk, bk).view(b, t, -1, 8).transpose(1, 2)
    v = F.linear(h, wv, bv).view(b, t, -1, 8).transpose(1, 2)
    return q * 0.5, k + 1, v * 2  # (read, as attention reads them: not returned as views)


def _qkv_weights(bias: bool = True) -> list:
    weights = []
    for rows in (32, 16, 16):
        weights += [torch.randn(rows, 24), torch.randn(rows) if bias else None]
    return weights


@pytest.mark.parametrize("bias", [True, False])
def test_sibling_linears_run_as_one_gemm_over_their_weights(bias: bool) -> None:
    """Q, K and V of one input become one padded_gemm reading the three weights as N segments
    (none copied into a stacked one), and each projection a column slice of its output."""
    weights = _qkv_weights(bias)
    compiled, gm, ctx = compile_fn(_attention_inputs, torch.randn(2, 5, 24), *weights, dynamic_dims=((0, 1),))
    [gemm] = gemm_nodes(gm)
    assert [w.meta["val"].shape[0] for w in [gemm.args[1], *gemm.args[11]]] == [32, 16, 16]
    assert all(w.op == "placeholder" for w in [gemm.args[1], *gemm.args[11]])  # the model's own weights
    assert (gemm.args[2] is not None) == bias and (gemm.args[12] is not None and len(gemm.args[12]) == 2) == bias
    assert ops(gm)[aten.slice.Tensor] == 3 and aten.cat.default not in ops(gm) and aten.linear.default not in ops(gm)
    assert ctx.report.passes[1].rewrites == {"padded_gemm": 1, "fused_siblings": 2, **({"fused_bias": 1} if bias else {})}
    # The reference target runs the segments apart, each by its own plan, which the node carries.
    plan = decode_plan(gemm.args[6])
    assert (plan.n, plan.k) == (64, 24) and [p.n for p in plan.segment_plans] == [32, 16, 16]
    assert sorted(p["n"] for p in ctx.report.plans) == [16, 32, 64]
    specs = gemm_specs_for_node(gemm, plan)  # lowering builds what runs: the segments' own kernels
    assert {spec.param("n") for spec in specs} == {16, 32} and not any(spec.param("segments") for spec in specs)
    assert gemm.meta["tileflow"]["segments"] == [32, 16, 16]
    for tokens in (1, 5, 19, 40):
        h = torch.randn(2, tokens, 24)
        for got, want in zip(compiled(h, *weights), _attention_inputs(h, *weights)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_view_merging_a_siblings_rows_and_columns_becomes_a_reshape() -> None:
    """A `view` of a projection's whole output is no view of a column slice: the pass makes it a
    reshape (a copy where it must), and the views the models write stay views."""
    def flat_and_split(h, wa, wb):
        return F.linear(h, wa).view(-1) * 2, F.linear(h, wb).view(h.shape[0], 2, 8) * 2

    wa, wb = torch.randn(8, 12), torch.randn(16, 12)
    compiled, gm, _ = compile_fn(flat_and_split, torch.randn(6, 12), wa, wb)
    [gemm] = gemm_nodes(gm)
    reshapes = [n for n in gm.graph.nodes if n.target is aten.reshape.default]
    views = [n for n in gm.graph.nodes if n.target is aten.view.default]
    assert len(reshapes) == 1 and reshapes[0].args[0].target is aten.slice.Tensor
    assert len(views) == 1 and views[0].args[0].target is aten.slice.Tensor
    for tokens in (2, 6, 11):
        h = torch.randn(tokens, 12)
        for got, want in zip(compiled(h, wa, wb), flat_and_split(h, wa, wb)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_siblings_stay_apart_where_they_cannot_share_a_kernel() -> None:
    """Only plain projections (a bias at most) of one input, with biases on all or none, share a
    kernel; on Ascend, whose kernels write whole rows only, none do."""
    def mixed(h, wq, bq, wk, wv, wg, wo):
        q, k = F.linear(h, wq, bq), F.linear(h, wk)  # a bias on one of them: apart
        gelu = F.gelu(F.linear(h, wg))  # an activation: its own epilogue
        return q, k, F.linear(h, wv) + h, gelu, F.linear(h * 2, wo)  # a residual; another input

    weights = [torch.randn(16, 16), torch.randn(16), torch.randn(16, 16), torch.randn(16, 16), torch.randn(16, 16),
               torch.randn(16, 16)]
    compiled, gm, ctx = compile_fn(mixed, torch.randn(4, 16), *weights)
    assert "fused_siblings" not in ctx.report.passes[1].rewrites and len(gemm_nodes(gm)) == 5
    _, gm, ctx = compile_fn(_attention_inputs, torch.randn(2, 5, 24), *_qkv_weights(), dynamic_dims=((0, 1),),
                            passes=("canonicalize",))
    result = GemmPadding().run(gm, dataclasses.replace(ctx, target="ascend"))
    assert "fused_siblings" not in result.rewrites and len(gemm_nodes(gm)) == 3
    assert all(not node.args[11:] for node in gemm_nodes(gm))


def test_on_triton_the_siblings_run_in_one_kernel_and_need_no_plans_of_their_own() -> None:
    """Where every piece's BLOCK_N divides the segments' starts (64 and 96), the Triton kernels
    read all three weights in one launch: the node carries no per-segment plans, and lowering
    builds segmented kernels only."""
    weights = []
    for rows in (64, 32, 32):
        weights += [torch.randn(rows, 24), torch.randn(rows)]

    def projections(h, wq, bq, wk, bk, wv, bv):
        return F.linear(h, wq, bq) + 1, F.linear(h, wk, bk) + 1, F.linear(h, wv, bv) + 1

    compiled, gm, ctx = compile_fn(projections, torch.randn(7, 24), *weights, target="triton")
    [gemm] = gemm_nodes(gm)
    plan = decode_plan(gemm.args[6])
    assert plan.segment_plans == () and all(p.config.block_n in (16, 32) for p in plan.pieces)
    specs = gemm_specs_for_node(gemm, plan)
    assert specs and all(spec.param("segments") == "64x32x32" for spec in specs)
    for tokens in (1, 7, 30):
        h = torch.randn(tokens, 24)
        for got, want in zip(compiled(h, *weights), projections(h, *weights)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _unbind_rows_then_flat(h, wa, wb):
    first, second = F.linear(h, wa).unbind(0)  # [T, 8] each: contiguous in eager, and when traced
    return first.view(-1) * 2, second.view(-1) * 2, F.linear(h, wb) * 2


def _split_rows_then_flat(h, wa, wb):
    top, bottom = F.linear(h, wa).split(4, dim=0)
    return top.view(-1) * 2, bottom.view(-1) * 2, F.linear(h, wb) * 2


@pytest.mark.parametrize("fn,shape,dynamic", [(_unbind_rows_then_flat, (2, 5, 12), ((0, 1),)),
                                              (_split_rows_then_flat, (8, 12), ())], ids=["unbind", "split"])
def test_views_behind_a_multi_output_view_of_a_sibling_stay_valid(fn, shape, dynamic) -> None:
    """A view op returning Tensor[] (unbind, split, chunk) is read through getitem: the views
    after it were traced on a contiguous output and may be impossible on a column slice, so they
    become reshapes too (a walk that stopped at the getitem left them, and the call raised)."""
    wa, wb = torch.randn(8, 12), torch.randn(16, 12)
    compiled, _, ctx = compile_fn(fn, torch.randn(*shape), wa, wb, dynamic_dims=dynamic)
    assert ctx.report.passes[1].rewrites.get("fused_siblings") == 1
    h = torch.randn(*shape)
    for got, want in zip(compiled(h, wa, wb), fn(h, wa, wb)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sibling_outputs_returned_by_the_graph_keep_eager_strides() -> None:
    """Projections the graph returns (a graph break after Q, K and V) keep eager's contiguous
    strides: as column slices of one buffer they would have other strides (`.view(-1)` on them
    raises), and each would keep the whole buffer alive; such siblings stay apart."""
    def proj(h, wq, wk, wv):
        return F.linear(h, wq), F.linear(h, wk), F.linear(h, wv)

    weights = [torch.randn(rows, 32) for rows in (32, 16, 16)]
    compiled, _, ctx = compile_fn(proj, torch.randn(2, 6, 32), *weights, dynamic_dims=((0, 1),))
    assert "fused_siblings" not in ctx.report.passes[1].rewrites
    h = torch.randn(2, 7, 32)
    for got, want in zip(compiled(h, *weights), proj(h, *weights)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert got.stride() == want.stride()


def test_siblings_with_operands_computed_after_the_first_stay_valid() -> None:
    """A sibling weight or bias computed after the first linear: the pass's order check keeps
    them apart (the count matters: a broken graph would roll the whole pass back)."""
    def computed(h, wa, ba, wb, bb):
        late_weight = F.linear(h, wa, ba), F.linear(h, wb * 2, bb)
        g = h * 2
        late_bias = F.linear(g, wa, ba), F.linear(g, wb, bb * 2)
        return *late_weight, *late_bias

    args = [torch.randn(8, 12), torch.randn(8), torch.randn(16, 12), torch.randn(16)]
    compiled, gm, _ = compile_fn(computed, torch.randn(6, 12), *args)
    assert len(gemm_nodes(gm)) == 4  # every linear a padded_gemm (a broken graph rolls the pass back)
    for rows in (2, 9):
        h = torch.randn(rows, 12)
        for got, want in zip(compiled(h, *args), computed(h, *args)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_cast_or_a_view_behind_a_view_op_of_a_sibling() -> None:
    """A sibling whose result is cast joins the group, its cast left after its columns (not
    fused into a kernel of its own), and a view behind another view op (unsqueeze) becomes a
    reshape."""
    def fn(h, wa, wb, wc):
        return F.linear(h, wa).half(), F.linear(h, wb).unsqueeze(0).view(-1) * 2, F.linear(h, wc) * 2

    args = [torch.randn(8, 12), torch.randn(8, 12), torch.randn(16, 12)]
    compiled, gm, ctx = compile_fn(fn, torch.randn(6, 12), *args)
    assert ctx.report.passes[1].rewrites.get("fused_siblings") == 2 and len(gemm_nodes(gm)) == 1
    (cast,) = [n for n in gm.graph.nodes if n.target in (aten._to_copy.default, prims.convert_element_type.default)]
    assert cast.args[0].target is aten.slice.Tensor
    for rows in (2, 9):
        h = torch.randn(rows, 12)
        for got, want in zip(compiled(h, *args), fn(h, *args)):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_a_sibling_no_view_of_its_columns_can_take_is_made_contiguous() -> None:
    """`view_as_complex` needs even strides: of a column slice with rows of 15 it cannot be taken,
    so that projection gets a contiguous copy of its columns (one `clone`), not a failed pass;
    an empty projection stays out of the group."""
    def complex_rows(h, wa, wb, wz):
        pairs = torch.view_as_complex(F.linear(h, wa).view(h.shape[0], 4, 2))
        return pairs * 2, F.linear(h, wb) * 2, F.linear(h, wz) + 1

    args = [torch.randn(8, 12), torch.randn(7, 12), torch.randn(0, 12)]
    compiled, gm, ctx = compile_fn(complex_rows, torch.randn(6, 12), *args)
    assert ctx.report.passes[1].rewrites.get("fused_siblings") == 1 and ops(gm)[aten.clone.default] == 1
    for rows in (2, 9):
        h = torch.randn(rows, 12)
        for got, want in zip(compiled(h, *args), complex_rows(h, *args)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_sibling_weight_of_other_strides_lowers_to_the_kernels_that_run() -> None:
    """The segmented kernel reads every weight with the first one's strides: with a weight
    stored [K, N] among them, lowering builds (and the runtime runs) one kernel per segment."""
    weights = [torch.randn(64, 24), torch.randn(32, 24), torch.randn(32, 24).t().contiguous().t()]

    def projections(h, wq, wk, wv):
        return F.linear(h, wq) + 1, F.linear(h, wk) + 1, F.linear(h, wv) + 1

    compiled, gm, _ = compile_fn(projections, torch.randn(7, 24), *weights, target="triton")
    [gemm] = gemm_nodes(gm)
    specs = gemm_specs_for_node(gemm, decode_plan(gemm.args[6]))
    assert specs and not any(spec.param("segments") for spec in specs)
    h = torch.randn(11, 24)
    for got, want in zip(compiled(h, *weights), projections(h, *weights)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("between", ["row_fill", "other_factor"])
def test_a_stacked_gate_up_with_something_else_in_the_product_stays_apart(between: str) -> None:
    """The stacked gate-and-up fusion takes exactly `act(first half) * second half`: a fill of
    the linear's output before the chunk (the kernel would drop it), or the gate times anything
    but the up half, is not that product, and the linear's epilogue stays unfused."""
    def mlp(h, w_gu, mask):
        out = F.linear(h, w_gu)
        if between == "row_fill":
            out = out.masked_fill(mask[:, None], 0.0)
        gate, up = out.chunk(2, dim=-1)
        if between == "other_factor":
            return F.gelu(gate, approximate="tanh") * torch.cos(up)
        return F.gelu(gate, approximate="tanh") * up

    h, w_gu = torch.randn(6, 16), torch.randn(48, 16) / 4
    mask = torch.arange(6) % 3 == 0
    compiled, gm, ctx = compile_fn(mlp, h, w_gu, mask, dynamic_dims=((0, 0), (2, 0)))
    [gemm] = gemm_nodes(gm)
    assert gemm.args[4] == "none" and "stacked_gate_up" not in ctx.report.passes[1].rewrites
    for tokens in (2, 9):
        x, m = torch.randn(tokens, 16), torch.arange(tokens) % 3 == 0
        torch.testing.assert_close(compiled(x, w_gu, m), mlp(x, w_gu, m), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("approximate,gated", [("tanh", "geglu_tanh"), ("none", "geglu")])
def test_a_residual_after_a_stacked_gated_product_fuses(approximate: str, gated: str) -> None:
    """`h + gelu(gate) * up` over one stacked weight with a bias (viewed [B, S, 2I] then
    chunked): one kernel with the bias halves, the gated epilogue and the residual, its output
    viewed back as [B, S, I]."""
    def mlp(h, w_gu, b_gu, r):
        gate, up = F.linear(h, w_gu, b_gu).chunk(2, dim=-1)
        return F.gelu(gate, approximate=approximate) * up + r

    h, w_gu, b_gu = torch.randn(2, 5, 16), torch.randn(48, 16) / 4, torch.randn(48)
    r = torch.randn(2, 5, 24)
    compiled, gm, ctx = compile_fn(mlp, h, w_gu, b_gu, r, dynamic_dims=((0, 1), (3, 1)))
    [gemm] = gemm_nodes(gm)
    assert gemm.args[4] == gated and gemm.args[2] is not None and gemm.args[3] is not None
    rewrites = ctx.report.passes[1].rewrites
    assert rewrites[f"fused_{gated}"] == rewrites["stacked_gate_up"] == rewrites["fused_residual"] == 1
    for tokens in (1, 3, 11):
        x, res = torch.randn(2, tokens, 16), torch.randn(2, tokens, 24)
        torch.testing.assert_close(compiled(x, w_gu, b_gu, res), mlp(x, w_gu, b_gu, res), rtol=1e-5, atol=1e-5)


REASON = "the weight's sizes are symbolic (a graph input under dynamic=True)"


def test_a_weight_given_as_an_input_stays_until_marked_static() -> None:
    """Under dynamic=True a function's weight argument has symbolic N and K: its linear stays
    as it was, the reason naming the fix, `torch._dynamo.mark_static(weight)`, with which the
    linear is rewritten and one graph serves every token count (each result eager's)."""
    def mlp(x, w, b):
        return F.silu(F.linear(x, w, b))

    gen = torch.Generator().manual_seed(3)
    w, b = torch.randn(48, 32, generator=gen), torch.randn(48, generator=gen)
    for static in (False, True):
        compiled, report = compiled_dynamic(mlp, (w, b) if static else ())
        for tokens in (3, 5, 9):
            x = torch.randn(tokens, 32, generator=gen)
            torch.testing.assert_close(compiled(x, w, b), mlp(x, w, b), rtol=1e-5, atol=1e-5)
        assert len(report.graphs) == 1
        if static:
            assert report.rewrites["fused_silu"] == 1 and not report.fallbacks, report.fallbacks
        else:
            assert "padded_gemm" not in report.rewrites
            assert [f.reason for f in report.fallbacks] == [
                REASON + "; plans need them static. If it is a parameter, torch._dynamo.mark_static(weight) before the "
                "first call makes them so (in an export, give the weight no Dim); if it is an activation (the tokens, "
                "a cache), the product has no fixed weight to plan for and runs as it is"]


def test_a_matmul_whose_weight_operand_is_the_tokens_stays_in_one_graph() -> None:
    """`query @ x.T` over a [S, D] input (attention pooling) canonicalizes to a linear whose
    "weight" is the tokens, its N the sequence length: a guard pinning it would recompile at
    every length (a version that pinned weights made 8 graphs for 10 lengths, then Dynamo ran
    the frame eagerly). It stays as it was, one graph serving every length."""

    class Pool(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = torch.nn.Parameter(torch.randn(4, 16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.query @ x.t(), dim=-1) @ x

    torch.manual_seed(0)
    model = Pool().eval()
    compiled, report = compiled_dynamic(model)
    with torch.no_grad():
        for length in (5, 6, 7, 9):
            x = torch.randn(length, 16)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(report.graphs) == 1 and report.recompiles == 0, (len(report.graphs), report.recompiles)
    assert any(f.reason.startswith(REASON) for f in report.fallbacks), report.fallbacks


@pytest.mark.parametrize("gate_second", [False, True])
def test_a_stacked_gate_up_weight_given_as_an_input_fuses_once_static(gate_second: bool) -> None:
    """A stacked gate-and-up weight passed as an argument and marked static fuses (gate in
    either half) with its bias, the down projection taking the residual, in one graph over
    every length; left symbolic, its linear stays as it was, and the pass still rewrites the
    others (nothing rolled back)."""
    def mlp(x, w, b, wd):
        first, second = F.linear(x, w, b).chunk(2, dim=-1)
        return x + F.linear(first * F.silu(second) if gate_second else F.silu(first) * second, wd)

    gen = torch.Generator().manual_seed(5)
    w, b, wd = torch.randn(48, 16, generator=gen), torch.randn(48, generator=gen), torch.randn(16, 24, generator=gen)
    for static in (False, True):
        compiled, report = compiled_dynamic(mlp, (w, b, wd) if static else (wd,))
        for tokens in (3, 7, 12):
            x = torch.randn(2, tokens, 16, generator=gen)
            torch.testing.assert_close(compiled(x, w, b, wd), mlp(x, w, b, wd), rtol=1e-5, atol=1e-5)
        assert len(report.graphs) == 1 and not any("rolled back" in f.reason for f in report.fallbacks)
        if static:
            assert not report.fallbacks, report.fallbacks
            assert report.rewrites["fused_swiglu"] == report.rewrites["stacked_gate_up"] == 1
        else:
            assert report.rewrites["padded_gemm"] == 1 and "stacked_gate_up" not in report.rewrites


def test_a_weight_dim_an_export_keeps_symbolic_is_left_alone() -> None:
    """A weight size declared dynamic in an export stays symbolic: the linear stays as it was,
    with the reason, and the archive runs other weight shapes correctly."""
    class Project(torch.nn.Module):
        def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return F.linear(x, w)

    tokens, width = torch.export.Dim("tokens", min=2, max=32), torch.export.Dim("width", min=2, max=64)
    archive = tileflow.export_model(Project(), (torch.randn(5, 16), torch.randn(24, 16)), ({0: tokens}, {0: width}),
                                    options={"target": "reference"})
    reasons = [f.reason for g in archive.report.graphs for f in g.fallbacks]
    assert any(r.startswith(REASON) for r in reasons), reasons
    x, w = torch.randn(7, 16), torch.randn(40, 16)
    torch.testing.assert_close(archive.program.module()(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_a_weight_size_seen_changing_stays_in_a_second_graph() -> None:
    """Under Dynamo's default `dynamic=None` a weight's size becomes symbolic once it changed
    between calls (automatic dynamic): the second graph leaves that linear as it was, with the
    reason, and serves every later width; each result is eager's."""
    def project(x, w):
        return F.gelu(F.linear(x, w))

    torch._dynamo.reset()
    report = tileflow.Report()
    compiled = torch.compile(project, backend=tileflow.TileflowBackend({"target": "reference"}, report=report))
    gen = torch.Generator().manual_seed(6)
    for i, width in enumerate((24, 32, 40, 48, 56)):
        x, w = torch.randn(5 + i, 16, generator=gen), torch.randn(width, 16, generator=gen)
        torch.testing.assert_close(compiled(x, w), project(x, w), rtol=1e-5, atol=1e-5)
    assert len(report.graphs) == 2
    assert report.rewrites["padded_gemm"] == 1  # the first, static graph's
    assert len(report.fallbacks) == 1 and report.fallbacks[0].reason.startswith(REASON)


def test_a_gemm_split_along_the_tokens_by_a_symbolic_size_is_padded() -> None:
    """A linear whose only user splits its rows by a symbolic size (DTensor's sequence parallel
    cuts a [1, 2T, N] output into T-row chunks for a reduce-scatter) is no gated pair: it becomes
    a padded GEMM. The gated-pair check read the split size as a list, and the TypeError rolled
    the whole pass back (no GEMM of the graph was rewritten)."""
    lin = torch.nn.Linear(64, 64, bias=False)

    def halves(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        a, b = lin(torch.cat([x, z], 1)).split(x.shape[1], dim=1)
        return torch.stack([a, b])

    compiled, report = compiled_dynamic(halves)
    for t in (5, 9):
        x, z = torch.randn(1, t, 64), torch.randn(1, t, 64)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, z), halves(x, z), rtol=1e-5, atol=1e-5)
    assert report.rewrites.get("padded_gemm") == 1 and not report.fallbacks, report.fallbacks


def test_an_as_strided_of_a_sibling_reads_eager_layout() -> None:
    """`as_strided` takes strides relative to its input's storage, traced on a contiguous
    projection: over a column slice of the siblings' wider output it would read other columns
    (wrong values, no error). Such a sibling gets a contiguous copy of its columns."""
    def every_other_column(h, wa, wb):
        qa, qb = F.linear(h, wa), F.linear(h, wb)
        return torch.as_strided(qa, (qa.shape[0], 4), (8, 2)) + torch.as_strided(qb, (qb.shape[0], 4), (8, 2))

    args = [torch.randn(8, 12), torch.randn(8, 12)]
    compiled, gm, ctx = compile_fn(every_other_column, torch.randn(6, 12), *args)
    for rows in (2, 6, 9):
        h = torch.randn(rows, 12)
        torch.testing.assert_close(compiled(h, *args), every_other_column(h, *args), rtol=1e-5, atol=1e-5)


def test_a_residual_that_lays_out_the_sum_stays_an_add() -> None:
    """Eager's `r + linear(x)` takes its layout from its first operand: a transposed residual
    gives a transposed sum. The kernel writes rows, so fusing that add changed the result's
    strides (a returned tensor's, and what an `as_strided` of it reads: wrong values, no error).
    Such an add stays apart; a residual after the product (`linear(x) + r`) still fuses."""
    def residual_first(h, w, r_t):
        z = r_t.t() + F.linear(h, w)  # z is laid out as r_t.t(): strides (1, rows)
        return z, torch.as_strided(z, (3, 2), (1, z.shape[0])) * 2

    def residual_second(h, w, r_t):
        return F.linear(h, w) + r_t.t()

    w = torch.randn(6, 8)
    compiled, gm, ctx = compile_fn(residual_first, torch.randn(4, 8), w, torch.randn(6, 4), dynamic_dims=((0, 0), (2, 1)))
    for rows in (3, 5):
        args = (torch.randn(rows, 8), w, torch.randn(6, rows))
        (got, got_strided), (want, want_strided) = compiled(*args), residual_first(*args)
        torch.testing.assert_close(got_strided, want_strided, rtol=1e-5, atol=1e-5)
        assert got.stride() == want.stride()
    _, gm, ctx = compile_fn(residual_second, torch.randn(4, 8), w, torch.randn(6, 4), dynamic_dims=((0, 0), (2, 1)))
    assert ctx.report.passes[1].rewrites.get("fused_residual") == 1


def test_projections_under_autocast_fuse_as_in_a_half_precision_model() -> None:
    """Under `torch.autocast` each linear casts its input and its weight just before it runs:
    the projections read three casts of one input, and K's and V's weights are cast after Q's
    linear, so Q, K and V stayed three GEMMs and gate and up two. The casts are now merged and the
    later weights' casts moved up to the first projection: the fusions of a bfloat16 model, and
    the logits autocast's eager ones."""
    torch.manual_seed(0)
    model = llama().eval()
    compiled, report = compiled_dynamic(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for length in (5, 9):
            ids = torch.randint(0, VOCAB, (2, length))
            got, want = compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert len(report.graphs) == 1 and not report.fallbacks, report.fallbacks
    assert report.rewrites["fused_siblings"] == 4 and report.rewrites["fused_swiglu"] == 2, report.rewrites


def test_projections_whose_norms_upcast_them_still_fuse_as_siblings() -> None:
    """Qwen3's Q and K norms upcast their projections (`q_proj(h).float()` in a half-precision
    model): the cast was fused into each as its epilogue, which kept Q and K out of V's sibling
    group (three GEMMs a layer). A cast alone no longer keeps a linear from its siblings: one
    GEMM, the casts left as they were."""
    torch.manual_seed(0)
    model = ZOO["qwen3"][0]().eval().to(torch.bfloat16)
    compiled, report = compiled_dynamic(model)
    with torch.no_grad():
        for length in (5, 9):
            ids = torch.randint(0, VOCAB, (2, length))
            torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                       rtol=2e-2, atol=2e-2)
    assert len(report.graphs) == 1 and not report.fallbacks, report.fallbacks
    assert report.rewrites["fused_siblings"] == 4 and report.rewrites["padded_gemm"] == 9, report.rewrites


def test_a_static_export_takes_a_bmm_over_stacked_parameters() -> None:
    """An exported program holds the module's parameters as attributes (`get_attr`), not as
    inputs: in a static export (no Dim, no symbolic size) a bmm over a stacked parameter is still
    told from the tokens' and becomes a batched grouped GEMM, equal to eager."""
    model, x = _StackedExperts().eval(), torch.randn(5, 16)
    with torch.no_grad():
        archive = tileflow.export_model(model, (x,), options={"target": "reference"})
        torch.testing.assert_close(archive.program.module()(x), model(x), rtol=1e-5, atol=1e-5)
    assert archive.report.rewrites.get("grouped_gemm") == 1, (archive.report.rewrites, archive.report.fallbacks)


def test_verify_takes_a_static_bmm_over_stacked_parameters_as_a_plain_compile_does() -> None:
    """verify=True compiles at the first call, after AOTAutograd's tracing context is gone: the
    parameters read while it compiled reach that compile too, so a static bmm over the module's
    stacked weights is the same batched grouped GEMM as without verify, equal to eager."""
    torch._dynamo.reset()
    model, x, report = _StackedExperts().eval(), torch.randn(5, 16), tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"target": "reference", "verify": True},
                                                                     report=report), dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert report.rewrites.get("grouped_gemm") == 1, (report.rewrites, report.fallbacks)
