"""canonicalize on hand-built and traced graphs: op counts before/after, and unchanged numerics."""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import tileflow
from tileflow.config import Config
from tileflow.graph_utils import transposed_dims
from tileflow.pipeline import PassContext, get_pass
from tileflow.report import GraphReport

aten = torch.ops.aten
prims = torch.ops.prims


def ops(gm: fx.GraphModule) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def canonicalize(gm: fx.GraphModule) -> dict[str, int]:
    ctx = PassContext(config=Config(), report=GraphReport(graph_id="g"))
    result = get_pass("canonicalize").run(gm, ctx)
    gm.graph.lint()
    return result.rewrites


def traced(fn: Callable, *inputs: torch.Tensor) -> fx.GraphModule:
    """ATen graph with symbolic sizes, as AOTAutograd would give us."""
    return make_fx(fn, tracing_mode="symbolic")(*inputs)


def hand_built(fn: Callable, *inputs: torch.Tensor) -> fx.GraphModule:
    """Keeps the ops exactly as written (e.g. aten.linear on 3-D input, as torch.export leaves it)."""
    gm = fx.symbolic_trace(fn)
    mode = FakeTensorMode()
    FakeTensorProp(gm, mode).propagate(*[mode.from_tensor(t) for t in inputs])
    return gm


def check_same(fn: Callable, gm: fx.GraphModule, *inputs: torch.Tensor) -> None:
    torch.testing.assert_close(gm(*inputs), fn(*inputs), rtol=1e-5, atol=1e-5)


def test_linear_3d_mm_becomes_linear() -> None:
    def fn(x, w):
        return F.linear(x, w)

    x, w = torch.randn(2, 5, 8), torch.randn(6, 8)
    gm = traced(fn, x, w)
    assert ops(gm)[aten.mm.default] == 1 and ops(gm)[aten.t.default] == 1
    assert canonicalize(gm)["canonical_linear"] == 1
    after = ops(gm)
    assert after[aten.linear.default] == 1 and aten.mm.default not in after and aten.t.default not in after
    linear = next(n for n in gm.graph.nodes if n.target is aten.linear.default)
    assert linear.args[1].op == "placeholder"  # the [N, K] weight itself, transpose folded
    check_same(fn, gm, torch.randn(3, 9, 8), w)  # other sizes: the graph is symbolic


def test_addmm_with_bias_becomes_linear_with_bias() -> None:
    def fn(x, w, b):
        return F.linear(x, w, b)

    x, w, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(6)
    gm = traced(fn, x, w, b)
    assert ops(gm)[aten.addmm.default] == 1
    canonicalize(gm)
    linear = next(n for n in gm.graph.nodes if n.target is aten.linear.default)
    assert len(linear.args) == 3 and aten.addmm.default not in ops(gm)
    check_same(fn, gm, torch.randn(11, 8), w, b)


def test_gpt2_conv1d_weight_k_by_n() -> None:
    def fn(x, w_kn, b):
        return torch.addmm(b, x.view(-1, x.shape[-1]), w_kn).view(*x.shape[:-1], w_kn.shape[1])

    x, w, b = torch.randn(2, 5, 8), torch.randn(8, 6), torch.randn(6)
    gm = traced(fn, x, w, b)
    canonicalize(gm)
    linear = next(n for n in gm.graph.nodes if n.target is aten.linear.default)
    assert linear.args[1].target is aten.t.default  # [K, N] storage seen as an [N, K] operand
    check_same(fn, gm, torch.randn(3, 7, 8), w, b)


def test_addmm_with_scaling_is_left_alone() -> None:
    def fn(b, x, w):
        return torch.addmm(b, x, w, beta=0.5)

    inputs = (torch.randn(5, 6), torch.randn(5, 8), torch.randn(8, 6))
    gm = traced(fn, *inputs)
    canonicalize(gm)
    assert ops(gm)[aten.addmm.default] == 1
    check_same(fn, gm, *inputs)


def test_exported_linear_on_3d_input_is_flattened() -> None:
    def fn(x, w, b):
        return torch.ops.aten.linear.default(x, w, b)

    x, w, b = torch.randn(2, 5, 8), torch.randn(6, 8), torch.randn(6)
    gm = hand_built(fn, x, w, b)
    canonicalize(gm)
    linear = next(n for n in gm.graph.nodes if n.target is aten.linear.default)
    assert linear.meta["val"].dim() == 2 and linear.args[0].meta["val"].shape == (10, 8)
    check_same(fn, gm, x, w, b)


def test_matmul_forms() -> None:
    def fn(a, w, q, k):
        return torch.ops.aten.matmul.default(a, w), torch.ops.aten.matmul.default(q, k)

    inputs = (torch.randn(2, 3, 8), torch.randn(8, 6), torch.randn(2, 4, 5, 16), torch.randn(2, 4, 16, 7))
    gm = hand_built(fn, *inputs)
    rewrites = canonicalize(gm)
    assert rewrites == {"canonical_linear": 1, "canonical_bmm": 1}
    assert aten.matmul.default not in ops(gm)
    bmm = next(n for n in gm.graph.nodes if n.target is aten.bmm.default)
    assert bmm.meta["val"].shape == (8, 5, 7)
    check_same(fn, gm, *inputs)


def test_noops_removed_real_work_kept() -> None:
    def fn(x, w):
        y = x.view(x.shape)            # no-op view
        y = y.expand(y.shape)          # no-op expand
        y = y.clone()                  # copy with the same layout
        y = y[:, :]                    # full slice
        z = y.t().t()                  # double transpose
        z = z.to(torch.float32)        # same dtype
        keep = x.t().contiguous()      # a layout change: real work
        return (z * 2, keep.view(-1), x[:, :])  # `x[:, :]` itself is an output: kept as it is

    x, w = torch.randn(4, 6), torch.randn(1)
    gm = traced(fn, x, w)
    before = ops(gm)
    rewrites = canonicalize(gm)
    after = ops(gm)
    assert rewrites["noop_removed"] >= 4
    assert after[aten.clone.default] == 1  # only the layout-changing clone remains
    assert sum(after.values()) < sum(before.values())
    check_same(fn, gm, torch.randn(4, 6), w)
    out = gm(x, w)
    assert out[1].shape == (24,)


def test_copies_an_output_views_are_kept() -> None:
    """A same-layout copy is no no-op when an output views it: without it the output would view
    the graph's input, and an update of either would show in the other. One that only feeds
    arithmetic is still dropped."""
    def fn(x):
        snapshot = x.clone().view(-1)          # returned through a view: must stay a copy
        cast = x.to(torch.float32, copy=True).t()
        dropped = x.clone() * 2                # read once, never returned: a no-op
        return snapshot, cast, dropped

    x = torch.randn(3, 4)
    gm = traced(fn, x)
    canonicalize(gm)
    assert ops(gm)[aten.clone.default] + ops(gm)[aten._to_copy.default] == 2
    snapshot, cast, _ = gm(x)
    assert snapshot.data_ptr() != x.data_ptr() and cast.data_ptr() != x.data_ptr()
    check_same(fn, gm, x)


def test_a_transposed_input_to_a_linear_is_reshaped_not_viewed() -> None:
    """Leading dims that no view can merge (a transposed activation) are flattened by a reshape:
    a view failed when the graph ran, which rolled the whole pass back."""
    def fn(x, w):  # as torch.export leaves it: aten.linear on a 3-D input
        return torch.ops.aten.linear.default(torch.ops.aten.transpose.int(x, 0, 1), w)

    x, w = torch.randn(2, 5, 8), torch.randn(6, 8)
    gm = hand_built(fn, x, w)
    assert canonicalize(gm)["canonical_linear"] == 1
    linear = next(n for n in gm.graph.nodes if n.target is aten.linear.default)
    assert linear.args[0].target is aten.reshape.default
    check_same(fn, gm, x, w)
    # The usual case, a contiguous activation: a view.
    contiguous = hand_built(lambda x, w: torch.ops.aten.linear.default(torch.ops.aten.mul.Tensor(x, 2), w), x, w)
    canonicalize(contiguous)
    assert next(n for n in contiguous.graph.nodes if n.target is aten.linear.default).args[0].target is aten.view.default
    # A graph input is laid out by its caller (an exported program takes a permuted one): a
    # reshape, which is that same view where the dims do merge.
    given = hand_built(lambda x, w: torch.ops.aten.linear.default(x, w), x, w)
    canonicalize(given)
    assert next(n for n in given.graph.nodes if n.target is aten.linear.default).args[0].target is aten.reshape.default
    check_same(lambda x, w: torch.ops.aten.linear.default(x, w), given, x.transpose(0, 1).contiguous().transpose(0, 1), w)


def test_proven_metadata_asserts_are_dropped() -> None:
    """torch.export writes `_assert_tensor_metadata` for each `.to()` that changes nothing; one
    the traced value proves is dropped (it would be the scores' second user and hide the softmax
    -> P @ V chain from the attention pass), one it does not prove is kept."""
    def fn(x):
        torch.ops.aten._assert_tensor_metadata.default(x, dtype=torch.float32, device="cpu", layout=torch.strided)
        return x * 2

    x = torch.randn(3, 4)
    gm = hand_built(fn, x)
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_after(placeholder):  # added after tracing: it would fire there
        gm.graph.call_function(aten._assert_tensor_metadata.default, (placeholder, None, None, torch.float16))
    assert ops(gm)[aten._assert_tensor_metadata.default] == 2
    assert canonicalize(gm)["noop_removed"] == 1
    kept = [n for n in gm.graph.nodes if n.target is aten._assert_tensor_metadata.default]
    assert len(kept) == 1 and kept[0].args[3] == torch.float16


# Draws per run: 20 in the default run, the 60 it had in the extended one (each traces a graph).
@pytest.mark.parametrize("examples", [20, pytest.param(60, marks=pytest.mark.extended)])
def test_transposed_dims_of_every_permutation(examples: int) -> None:
    """A permute is a transpose exactly when it swaps two dims (torch.export writes transposes
    that way), and `transposed_dims` names those two; `transpose(a, b)` and `t` agree."""
    settings(max_examples=examples, deadline=None, derandomize=True)(
        given(st.integers(2, 5).flatmap(lambda rank: st.permutations(range(rank))))(_transposed_dims_checked))()


def _transposed_dims_checked(order: list[int]) -> None:
    x = torch.randn(*range(2, 2 + len(order)))
    a, b = order[0], len(order) - 1
    gm = traced(lambda x: (x.permute(order), x.transpose(a, b)) + ((x.t(),) if x.dim() == 2 else ()), x)
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_function"}
    moved = [i for i, d in enumerate(order) if d != i]
    assert transposed_dims(nodes[aten.permute.default]) == (tuple(moved) if len(moved) == 2 else None)
    assert transposed_dims(nodes[aten.transpose.int]) == ((min(a, b), b) if a != b else None)
    if len(order) == 2:
        assert transposed_dims(nodes[aten.t.default]) == (0, 1)


def test_a_reshape_round_trip_is_its_base() -> None:
    """Falcon's scores go [B, H, S, L] -> [B*H, S, L] -> [B, H, S, L] between the scale and the
    mask (an in-place divide on a flattened view): the round trip is the base itself, so the
    attention pass sees scale then mask. A trip to another layout stays."""
    def fn(x):
        y = x * 0.5
        back = y.view(-1, y.shape[2], y.shape[3]).view(y.shape) + 1.0
        merged = y.view(-1, y.shape[3]).view(y.shape[0], -1, y.shape[3])  # [B, H*S, L]: not y's shape
        return back, merged

    x = torch.randn(2, 3, 5, 5)
    gm = traced(fn, x)
    assert ops(gm)[aten.view.default] >= 4
    canonicalize(gm)
    add = next(n for n in gm.graph.nodes if n.target is aten.add.Tensor)
    assert add.args[0].target is aten.mul.Tensor  # the two views are gone
    merged = list(gm.graph.nodes)[-1].args[0][1]
    assert merged.target is aten.view.default and merged.meta["val"].dim() == 3
    check_same(fn, gm, torch.randn(2, 4, 6, 6))


# Draws per run: 10 in the default run, the 25 it had in the extended one (each traces a graph).
@pytest.mark.parametrize("examples", [10, pytest.param(25, marks=pytest.mark.extended)])
def test_einsum_layout_moves_fold_into_views(examples: int) -> None:
    """einsum lines its operands up for a bmm with unsqueezes and permutes of size-1 dims; the
    chains fold into views (and a permute and transpose where the real dims change order), with
    the same values, and a product with a 2-D weight becomes a linear."""
    settings(max_examples=examples, deadline=None)(given(equation=st.sampled_from([
        "bhsd,bhld->bhsl", "bshd,blhd->bhsl", "bhsl,bhld->bhsd", "bhsl,blhd->bshd", "bij,bjk->bik", "ij,jk->ik",
        "bsk,nk->bsn", "bsk,kn->bsn", "sk,nk->ns", "abcd,abde->acbe",
    ]), batch=st.integers(1, 3))(_einsum_checked))()


def _einsum_checked(equation: str, batch: int) -> None:
    sizes = {"b": batch, "h": 2, "s": 5, "l": 5, "d": 4, "i": 3, "j": 4, "k": 6, "n": 7, "a": batch, "c": 3, "e": 2}
    lhs, rhs = equation.split("->")[0].split(",")
    x, w = torch.randn(*[sizes[c] for c in lhs]), torch.randn(*[sizes[c] for c in rhs])

    def product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.einsum(equation, x, w)

    gm = traced(product, x, w)
    rewrites = canonicalize(gm)
    check_same(product, gm, x, w)
    moves = {aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims}
    # (A linear's [M, N] output is put back as the bmm's [1, M, N] by an unsqueeze of its own.)
    assert not [n for n in gm.graph.nodes if n.target in moves and n.args[0].target is not aten.linear.default], gm.code
    if len(rhs) == 2 and len(lhs) == 3:
        assert ops(gm)[aten.linear.default] == 1 and rewrites.get("canonical_linear"), gm.code


def _compiled(fn: Callable) -> tuple[Callable, tileflow.Report]:
    """`fn` compiled afresh with `dynamic=True` for the reference target, and its report."""
    torch._dynamo.reset()
    report = tileflow.Report()
    return torch.compile(fn, backend=tileflow.TileflowBackend({"target": "reference"}, report=report),
                         dynamic=True), report


def test_a_copy_in_a_folded_chain_stays_a_contiguous_copy() -> None:
    """A reader's findings: a chain holding a copy (`contiguous()`, traced as a clone) was folded
    into a reshape, which is a view where it can: the result aliased the input (an in-place
    update of the input after it showed through, off by up to 34) and came back strided, so a
    view of it failed; and a later chain rebuilt that reshape as a view of its strided source,
    which raised inside the pass and rolled the whole pass back (the linear lost its rewrite)."""
    def copied_then_input_updated(x: torch.Tensor) -> torch.Tensor:
        y = x.unsqueeze(0).permute(0, 2, 1).contiguous().view(x.shape[1], x.shape[0])
        x.mul_(2)
        return y

    def viewed_after_the_copy(x: torch.Tensor) -> torch.Tensor:
        a, b, c = x.shape
        y = x.view(1, a, b, c).transpose(1, 3).contiguous().unsqueeze(0).view(c, b, a, 1)
        return y.view(c * b, a) * 2

    def folded_twice(x: torch.Tensor) -> torch.Tensor:
        a, b = x.shape
        y1 = x.unsqueeze(0).transpose(0, 1).contiguous().view(a * b)
        y2 = y1.unsqueeze(1).permute(1, 0).view(a * b)
        return F.linear(y2.view(a, b) * 2, W8)

    compiled, _ = _compiled(copied_then_input_updated)
    for shape in ((3, 4), (5, 7)):
        x = torch.randn(shape)
        want, got = copied_then_input_updated(x.clone()), compiled(x)
        torch.testing.assert_close(got, want)
        assert got.is_contiguous() and got.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    compiled, _ = _compiled(viewed_after_the_copy)
    for shape in ((2, 3, 4), (3, 5, 6)):
        x = torch.randn(shape)
        torch.testing.assert_close(compiled(x), viewed_after_the_copy(x))
    compiled, report = _compiled(folded_twice)
    for a in (3, 5):
        x = torch.randn(8, a).t()  # a strided input
        torch.testing.assert_close(compiled(x), folded_twice(x))
    assert report.rewrites.get("canonical_linear") and not [p for p in report.passes if p.error], report.passes


W8 = torch.randn(16, 8)


def test_addmm_with_alpha_is_left_alone() -> None:
    """addmm(b, x, w, alpha=0.5) scales the product; as a linear it would lose the 0.5."""
    def fn(b, x, w):
        return torch.addmm(b, x, w, alpha=0.5)

    inputs = (torch.randn(6), torch.randn(5, 8), torch.randn(8, 6))
    gm = make_fx(fn, tracing_mode="symbolic")(*inputs)
    canonicalize(gm)
    assert ops(gm)[aten.addmm.default] == 1
    torch.testing.assert_close(gm(*inputs), fn(*inputs))


def test_a_2d_linear_is_already_canonical() -> None:
    """a linear on a 2-D input is the canonical form: no rewrite, no views around it."""
    def fn(x, w):
        return torch.ops.aten.linear.default(x, w)

    gm = hand_built(fn, torch.randn(5, 8), torch.randn(6, 8))
    assert canonicalize(gm).get("canonical_linear", 0) == 0
    assert aten.view.default not in ops(gm) and aten.reshape.default not in ops(gm)


def test_a_copy_to_another_device_is_real_work() -> None:
    """`_to_copy(x, device=...)` keeps x's shape, strides and dtype but moves it: not a no-op."""
    def fn(x):
        return torch.ops.aten._to_copy.default(x, device=torch.device("meta")) * 2

    gm = hand_built(fn, torch.randn(3, 4))
    canonicalize(gm)
    assert ops(gm)[aten._to_copy.default] == 1


def test_a_matmul_broadcasting_its_batch_dims_is_left_alone() -> None:
    """batch dims [2, 4] x [1, 4] broadcast: not one bmm over flattened batches."""
    def fn(q, k):
        return torch.ops.aten.matmul.default(q, k)

    inputs = (torch.randn(2, 4, 5, 16), torch.randn(1, 4, 16, 7))
    gm = hand_built(fn, *inputs)
    assert canonicalize(gm).get("canonical_bmm", 0) == 0
    assert ops(gm)[aten.matmul.default] == 1
    torch.testing.assert_close(gm(*inputs), fn(*inputs))


def test_a_no_op_view_the_graph_returns_is_kept() -> None:
    """nodes the graph returns directly are kept (module docstring), even a no-op view:
    the output stays that node, not the input placeholder itself."""
    def fn(x):
        return x * 2, torch.ops.aten.view.default(x, [3, 4])

    gm = hand_built(fn, torch.randn(3, 4))
    canonicalize(gm)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert out[1].op == "call_function" and out[1].target is aten.view.default


def test_a_round_trip_differing_only_in_a_size_one_dims_stride_is_its_base() -> None:
    """x.t() of a [1, 4] is [4, 1] with strides (1, 4); viewed to [4] and back it has
    strides (1, 1). A size-1 dim's stride does not matter for layout: both views go."""
    def fn(x):
        y = x.t()
        return torch.ops.aten.view.default(torch.ops.aten.view.default(y, [4]), [4, 1]) * 2

    x = torch.randn(1, 4)
    gm = hand_built(fn, x)
    canonicalize(gm)
    assert ops(gm)[aten.view.default] == 0
    torch.testing.assert_close(gm(x), fn(x))


def _gelu_new(x):
    """transformers' NewGELUActivation (GPT-2, Phi-2, GPT-J), as written there."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


@pytest.mark.parametrize("form", ["gelu_new", "operands_swapped", "literal_constant"])
def test_the_tanh_gelu_written_out_becomes_one_gelu(form: str) -> None:
    """The tanh GELU spelled out (in the orders and constants models write) is one
    `gelu(approximate="tanh")`, with nothing of the expression left."""
    def fn(x, w):
        h = F.linear(x, w)
        if form == "gelu_new":
            return _gelu_new(h)
        if form == "operands_swapped":
            return (torch.tanh((torch.pow(h, 3) * 0.044715 + h) * math.sqrt(2.0 / math.pi)) + 1.0) * (h * 0.5)
        return h * 0.5 * (1.0 + torch.tanh(0.7978845608 * (h + 0.044715 * h ** 3)))

    x, w = torch.randn(5, 8), torch.randn(6, 8)
    gm = traced(fn, x, w)
    assert canonicalize(gm)["canonical_gelu_tanh"] == 1
    [gelu] = [n for n in gm.graph.nodes if n.target is aten.gelu.default]
    assert gelu.kwargs == {"approximate": "tanh"} and gelu.args[0].target is aten.linear.default
    after = ops(gm)
    assert not {aten.tanh.default, aten.pow.Tensor_Scalar, aten.mul.Tensor, aten.add.Tensor} & set(after)
    x2 = torch.randn(9, 8)
    # One gelu rounds otherwise than its written-out ops, by a few ulp (past 1e-6 + 1e-6 relative
    # in 2 of 4500 draws); the tanh form against the erf one differs by 1e-4 and more.
    torch.testing.assert_close(gm(x2, w), fn(x2, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["divided", "multiplied", "half_last"])
def test_the_erf_gelu_written_out_becomes_one_gelu(form: str) -> None:
    """transformers' `gelu_python`, `x * 0.5 * (1 + erf(x / sqrt(2)))` (and with x times
    1/sqrt(2), or the half applied last), is one exact `gelu`: the GEMM before it fuses it."""
    def fn(x, w):
        h = F.linear(x, w)
        if form == "divided":
            return h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))
        if form == "multiplied":
            return h * 0.5 * (1.0 + torch.erf(h * (1 / math.sqrt(2.0))))
        return (torch.erf(h / math.sqrt(2.0)) + 1.0) * (h * 0.5)

    x, w = torch.randn(5, 8), torch.randn(6, 8)
    gm = traced(fn, x, w)
    assert canonicalize(gm)["canonical_gelu"] == 1
    [gelu] = [n for n in gm.graph.nodes if n.target is aten.gelu.default]
    assert gelu.kwargs.get("approximate", "none") == "none" and gelu.args[0].target is aten.linear.default
    assert not {aten.erf.default, aten.div.Tensor, aten.mul.Tensor, aten.add.Tensor} & set(ops(gm))
    x2 = torch.randn(9, 8)
    # One gelu rounds otherwise than its written-out ops, by a few ulp (past 1e-6 + 1e-6 relative
    # in 2 of 4500 draws); the tanh form against the erf one differs by 1e-4 and more.
    torch.testing.assert_close(gm(x2, w), fn(x2, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", ["scale", "erf_of_another", "erf_read_again", "scaled_read_again"])
def test_a_near_erf_gelu_is_left_alone(change: str) -> None:
    """An erf over another scale or another tensor is not `gelu(x)`; nor is one whose inner
    nodes something else reads (the pattern is rewritten only whole)."""
    def fn(x, y):
        if change == "scale":
            return x * 0.5 * (1.0 + torch.erf(x / 2.0))
        if change == "erf_of_another":
            return x * 0.5 * (1.0 + torch.erf(y / math.sqrt(2.0)))
        if change == "scaled_read_again":
            d = x / math.sqrt(2.0)
            return x * 0.5 * (1.0 + torch.erf(d)), d
        e = torch.erf(x / math.sqrt(2.0))
        return x * 0.5 * (1.0 + e), e

    x, y = torch.randn(5, 8), torch.randn(5, 8)
    gm = traced(fn, x, y)
    before = ops(gm)
    assert "canonical_gelu" not in canonicalize(gm)
    assert ops(gm) == before and aten.gelu.default not in ops(gm)


@pytest.mark.parametrize("change", ["cubic_coefficient", "square", "scale", "tanh_read_again", "integers"])
def test_a_near_gelu_is_left_alone(change: str) -> None:
    """Expressions that differ from the tanh GELU in a constant, a power or an extra reader of
    an inner node keep their ops."""
    def fn(x):
        if change == "cubic_coefficient":
            return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.05 * torch.pow(x, 3.0))))
        if change == "square":
            return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 2.0))))
        if change == "scale":
            return 0.5 * x * (1.0 + torch.tanh(0.8 * (x + 0.044715 * torch.pow(x, 3.0))))
        if change == "tanh_read_again":
            t = torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))
            return 0.5 * x * (1.0 + t), t
        return _gelu_new(x.long())  # an integer x: not a GELU eager would compute in floating point

    x = torch.randn(5, 8)
    gm = traced(fn, x)
    before = ops(gm)
    assert "canonical_gelu_tanh" not in canonicalize(gm)
    assert ops(gm) == before and aten.gelu.default not in ops(gm)


@pytest.mark.parametrize("change", ["linear_term_of_another", "cube_of_another", "half_of_another", "quarter", "plus_two"])
def test_a_gelu_over_two_tensors_or_other_constants_is_left_alone(change: str) -> None:
    """The tanh GELU's three reads of x must all be x, and its 0.5 and 1 exactly those: an
    expression mixing two tensors, or with another scale or offset, is not `gelu(x)`."""
    c = math.sqrt(2.0 / math.pi)

    def fn(x, y):
        if change == "linear_term_of_another":
            return 0.5 * x * (1.0 + torch.tanh(c * (y + 0.044715 * torch.pow(x, 3.0))))
        if change == "cube_of_another":
            return 0.5 * x * (1.0 + torch.tanh(c * (x + 0.044715 * torch.pow(y, 3.0))))
        if change == "half_of_another":
            return 0.5 * y * (1.0 + torch.tanh(c * (x + 0.044715 * torch.pow(x, 3.0))))
        if change == "quarter":
            return 0.25 * x * (1.0 + torch.tanh(c * (x + 0.044715 * torch.pow(x, 3.0))))
        return 0.5 * x * (2.0 + torch.tanh(c * (x + 0.044715 * torch.pow(x, 3.0))))

    x, y = torch.randn(5, 8), torch.randn(5, 8)
    gm = traced(fn, x, y)
    before = ops(gm)
    assert "canonical_gelu_tanh" not in canonicalize(gm)
    assert ops(gm) == before and aten.gelu.default not in ops(gm)
    torch.testing.assert_close(gm(x, y), fn(x, y))


@pytest.mark.parametrize("mask_dims", [2, 1])
def test_a_masked_assignment_of_one_value_becomes_a_where(mask_dims: int) -> None:
    """`index_put(x, [mask], v)`, a bool mask over all of x's dims or its leading ones (whole
    rows: DTensor's vocabulary-parallel embedding zeroes other ranks' rows so) and one value, is
    `where(mask, v, x)`, elementwise, equal on inputs of another size."""
    def fn(x, ids):
        mask = ids > 2 if mask_dims == 2 else ids[:, 0] > 2
        return torch.index_put(x, (mask,), torch.tensor(-1.5)) * 2

    x, ids = torch.randn(5, 8), torch.randint(0, 5, (5, 8))
    gm = traced(fn, x, ids)
    assert canonicalize(gm)["masked_assignment"] == 1
    assert aten.index_put.default not in ops(gm) and ops(gm)[aten.where.self] == 1
    x2, ids2 = torch.randn(11, 8), torch.randint(0, 5, (11, 8))
    torch.testing.assert_close(gm(x2, ids2), fn(x2, ids2), rtol=0, atol=0)


@pytest.mark.parametrize("form", ["accumulate", "row_values", "integer_index", "two_indices"])
def test_other_index_puts_are_left_alone(form: str) -> None:
    """An accumulating put, values with more than one element (a row per selected row), an integer
    index and an index over two dims are not a fill of one value: kept, and still exact."""
    def fn(x, ids):
        mask = ids[:, 0] > 2
        if form == "accumulate":
            return torch.index_put(x, (mask,), torch.tensor(1.0), accumulate=True)
        if form == "row_values":
            return torch.index_put(x, (mask,), torch.arange(8.0))
        if form == "integer_index":
            return torch.index_put(x, (ids[:, 0],), torch.tensor(1.0))
        return torch.index_put(x, (mask, torch.tensor([3])), torch.tensor(1.0))  # rows' column 3

    x, ids = torch.randn(5, 8), torch.randint(0, 5, (5, 8))
    gm = traced(fn, x, ids)
    assert "masked_assignment" not in canonicalize(gm)
    assert ops(gm)[aten.index_put.default] == 1
    x2, ids2 = torch.randn(11, 8), torch.randint(0, 5, (11, 8))
    torch.testing.assert_close(gm(x2, ids2), fn(x2, ids2), rtol=0, atol=0)


@pytest.mark.parametrize("value", ["[1, 1, 1]", "other_dtype", "bool_x"])
def test_a_masked_assignment_keeps_index_puts_shape_and_dtype(value: str) -> None:
    """One value with more (unit) dims than x, or of another dtype than x, is still one fill:
    index_put drops the value's leading unit dims and casts it to x's dtype, so the result has
    x's shape and dtype, rewritten or not."""
    def fn(x, ids):
        mask = ids[:, 0] > 2
        if value == "[1, 1, 1]":
            return torch.index_put(x, (mask,), torch.full((1, 1, 1), -1.5)) * 2
        if value == "other_dtype":
            return torch.index_put(x, (mask,), torch.tensor(3, dtype=torch.int64)) * 2
        return torch.index_put(x > 0, (mask,), torch.tensor(0.5))

    x, ids = torch.randn(5, 8), torch.randint(0, 5, (5, 8))
    gm = traced(fn, x, ids)
    canonicalize(gm)
    x2, ids2 = torch.randn(11, 8), torch.randint(0, 5, (11, 8))
    got, want = gm(x2, ids2), fn(x2, ids2)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["transposed_mask_viewed", "permuted_x_as_strided"])
def test_a_masked_assignment_keeps_index_puts_layout(layout: str) -> None:
    """index_put's result has x's strides (a clone of x); where's follows its operands', the mask's
    first: a later view or as_strided traced against index_put's strides must still read the
    same elements (a transposed mask, then `view(-1)`; a permuted x, then `as_strided`)."""
    def fn(x, ids):
        if layout == "transposed_mask_viewed":
            return torch.index_put(x * 2, (ids.t() > 2,), torch.tensor(-1.5)).view(-1)
        y = torch.index_put((x * 2).permute(2, 0, 1), (ids > 2,), torch.tensor(0.5))
        return y.as_strided((3, y.shape[1] * 4), (1, 3))

    if layout == "transposed_mask_viewed":
        x, ids, x2, ids2 = torch.randn(5, 8), torch.randint(0, 5, (8, 5)), torch.randn(7, 8), torch.randint(0, 5, (8, 7))
    else:
        x, ids, x2, ids2 = (torch.randn(5, 4, 3), torch.randint(0, 5, (3, 5, 4)), torch.randn(7, 4, 3),
                            torch.randint(0, 5, (3, 7, 4)))
    gm = traced(fn, x, ids)
    canonicalize(gm)
    torch.testing.assert_close(gm(x2, ids2), fn(x2, ids2), rtol=0, atol=0)


def _casts_of(gm: fx.GraphModule, source: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target is aten._to_copy.default and n.args[0].name == source]


def test_repeated_casts_of_one_value_are_merged() -> None:
    """Under autocast every linear casts its input anew (`_to_copy(x, bfloat16)` per projection):
    the repeats are one cast, so both linears read one node (which the GEMM pass needs to fuse
    them); the numerics are unchanged."""
    def fn(x, wq, wk):
        return F.linear(x.to(torch.bfloat16), wq.to(torch.bfloat16)), F.linear(x.to(torch.bfloat16), wk.to(torch.bfloat16))

    args = (torch.randn(5, 8), torch.randn(6, 8), torch.randn(4, 8))
    gm = traced(fn, *args)
    assert len(_casts_of(gm, "x_1")) == 2
    assert canonicalize(gm)["repeat_merged"] >= 1
    (cast,) = _casts_of(gm, "x_1")
    linears = [n for n in gm.graph.nodes if n.target is aten.linear.default]
    assert len(linears) == 2 and {n.args[0] for n in linears} == {cast}
    args = (torch.randn(7, 8), *args[1:])
    for got, want in zip(gm(*args), fn(*args)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_casts_of_one_value_to_two_dtypes_stay_apart() -> None:
    """`x.to(bfloat16)` and `x.to(float16)` have the same arguments and differ in their dtype
    keyword only: they are two casts, each read at its own dtype."""
    def fn(x):
        return x.to(torch.bfloat16) * 2, x.to(torch.float16) * 2

    gm = traced(fn, torch.randn(5, 3))
    canonicalize(gm)
    assert sorted(str(n.kwargs["dtype"]) for n in _casts_of(gm, "x_1")) == ["torch.bfloat16", "torch.float16"]
    x = torch.randn(6, 3)
    for got, want in zip(gm(x), fn(x)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_casts_across_an_in_place_write_or_returned_stay_apart() -> None:
    """A cast read before an in-place write of its value (or of what it views) and one read
    after it differ though their arguments are the same; two returned casts are two tensors to
    the caller (one written must not change the other)."""
    def returned(x):
        return x.to(torch.float64), x.to(torch.float64)

    for write_view in (False, True):
        # As a graph that writes its input in place might read (make_fx reads the write's result).
        graph = fx.Graph()
        x, y = graph.placeholder("x_1"), graph.placeholder("y")
        before = graph.call_function(aten._to_copy.default, (x,), {"dtype": torch.float64})
        written = graph.call_function(aten.view.default, (x, [15])) if write_view else x
        graph.call_function(aten.copy_.default, (written, graph.call_function(aten.view.default, (y, [15])) if write_view
                                                else y))
        after = graph.call_function(aten._to_copy.default, (x,), {"dtype": torch.float64})
        graph.output(graph.call_function(aten.sub.Tensor, (after, before)))
        gm = fx.GraphModule(torch.nn.Module(), graph)
        FakeTensorProp(gm, FakeTensorMode()).propagate(torch.randn(5, 3), torch.randn(5, 3))
        canonicalize(gm)
        assert len(_casts_of(gm, "x_1")) == 2
        x, y = torch.randn(5, 3), torch.randn(5, 3)
        torch.testing.assert_close(gm(x.clone(), y), y.double() - x.double(), rtol=0, atol=0)
    gm = traced(returned, torch.randn(5, 3))
    canonicalize(gm)
    a, b = gm(torch.randn(5, 3))
    assert a.data_ptr() != b.data_ptr()


def test_a_cast_of_a_transpose_is_a_transpose_of_the_cast() -> None:
    """`x.transpose(2, 3).to(bfloat16)` (autocast's cast of a `matmul` operand) becomes
    `x.to(bfloat16).transpose(2, 3)`: the same values and strides, the transpose where the
    attention pass reads it."""
    def fn(x):
        return x.transpose(2, 3).to(torch.bfloat16).mul(2)

    gm = traced(fn, torch.randn(2, 3, 5, 4))
    assert canonicalize(gm)["cast_before_views"] == 1
    (mul,) = [n for n in gm.graph.nodes if n.target is aten.mul.Tensor]
    transpose = mul.args[0]
    assert transposed_dims(transpose) == (2, 3) and transpose.args[0].target is aten._to_copy.default
    x = torch.randn(2, 3, 7, 4)
    got, want = gm(x), fn(x)
    assert got.stride() == want.stride()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _cast_written_itself(x):
    a, b = x.to(torch.float64), x.to(torch.float64)
    b.add_(1)  # the second cast is written in place: merged, the write would reach `a` too
    return a * 2, b * 3


def _cast_written_through_its_view(x):
    a, b = x.to(torch.float64), x.to(torch.float64)
    b.view(-1).mul_(0)
    return a + 1, b + 1


def _input_written_through_unbind(x):
    a = x.to(torch.float64)
    x.unbind(0)[1].fill_(3)  # a write through an element of a multi-output view (getitem of unbind)
    return a + 0, x.to(torch.float64) + 0


def _value_written_through_split(x):
    c = x * 1
    a = c.to(torch.float64)
    c.split(1)[0].mul_(0)
    return a + 0, c.to(torch.float64) + 0


@pytest.mark.parametrize("fn", [_cast_written_itself, _cast_written_through_its_view, _input_written_through_unbind,
                                _value_written_through_split], ids=lambda fn: fn.__name__.strip("_"))
def test_casts_a_write_reaches_stay_apart(fn: Callable) -> None:
    """A repeat that is itself written in place (or through a view of it), and a read of a value
    written through an element of `split` or `unbind` (a view behind a `getitem`), are not merged:
    the merged node would carry the write to the other's readers, or read it too early."""
    gm = traced(fn, torch.randn(3, 4))
    canonicalize(gm)
    x = torch.randn(3, 4)
    for got, want in zip(gm(x.clone()), fn(x.clone())):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' `repeat_kv`: [B, Hkv, S, D] -> [B, Hkv * n_rep, S, D]."""
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def test_a_cast_of_repeat_kv_is_a_repeat_of_the_cast() -> None:
    """Autocast casts Gemma-2's `repeat_kv(key).transpose(2, 3)`: the cast moves below the whole
    chain (transpose, reshape, clone, expand, unsqueeze), so the attention pass finds the repeat
    and the cast converts the real heads only; values and strides are eager's."""
    def fn(k):
        return _repeat_kv(k, 2).transpose(2, 3).to(torch.bfloat16).mul(2)

    gm = traced(fn, torch.randn(2, 3, 5, 4))
    assert canonicalize(gm)["cast_before_views"] == 1
    (cast,) = [n for n in gm.graph.nodes if n.target is aten._to_copy.default]
    assert cast.args[0].op == "placeholder" and list(cast.meta["val"].shape[1:]) == [3, 5, 4]
    k = torch.randn(2, 3, 7, 4)
    got, want = gm(k), fn(k)
    assert got.stride() == want.stride()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_cast_stays_above_a_copy_another_op_reads_or_a_write_in_place() -> None:
    """A repeat whose copy another op also reads keeps the cast above it (moving it would make
    the copy twice), and so does a value written in place between the copy and the cast (the
    cast would read it after the write)."""
    def shared(k):
        r = _repeat_kv(k, 2)
        return r.to(torch.bfloat16).mul(2), r.sum()

    def written(k):
        r = k * 1
        copy = r.clone()
        r.mul_(3)
        return copy.to(torch.bfloat16).mul(2) + r

    for fn in (shared, written):
        gm = traced(fn, torch.randn(2, 3, 5, 4))
        canonicalize(gm)
        k = torch.randn(2, 3, 6, 4)
        got, want = gm(k.clone()), fn(k.clone())
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        (cast,) = [n for n in gm.graph.nodes if n.target is aten._to_copy.default]
        # (above the copy: on it, or on the view of it the repeat ends with)
        assert cast.args[0].target in (aten.clone.default, aten._unsafe_view.default), gm.code


def test_a_copy_written_in_place_is_kept() -> None:
    """A clone that an in-place op then writes is real work even with the source's layout:
    removed, the write would land on the graph's input."""
    def fn(x):
        r = x.clone()
        r.mul_(3)
        return r + x

    gm = traced(fn, torch.randn(4, 8))
    canonicalize(gm)
    x = torch.randn(4, 8)
    before = x.clone()
    torch.testing.assert_close(gm(x), fn(before.clone()), rtol=0, atol=0)
    torch.testing.assert_close(x, before, rtol=0, atol=0)


def _copy_of_a_slice_written_later(x):
    c = x * 1
    copy = c[1:, None].expand(-1, 2, -1).clone()  # a repeat of c's rows before the write
    c.add_(1)
    return copy.to(torch.bfloat16) * 2


def _cast_moved_then_copied_and_written(x):
    c = x.t().to(torch.bfloat16)  # the cast moves above the transpose
    copy = c.clone()  # a copy of a value written later: kept
    c.add_(1)
    return copy * 2, c * 3


@pytest.mark.parametrize("fn", [_copy_of_a_slice_written_later, _cast_moved_then_copied_and_written],
                         ids=lambda fn: fn.__name__.strip("_"))
def test_a_cast_moved_below_views_keeps_the_values_a_write_reaches(fn: Callable) -> None:
    """A clone of a view (other than a chain op: a slice) of a value written later holds the
    value before the write: the cast moved above the clone would read it after. And a cast that
    moved is still written in place through its new view: a copy of it stays a copy."""
    x = torch.randn(4, 3)
    gm = traced(fn, x)
    canonicalize(gm)
    got, want = gm(x.clone()), fn(x.clone())
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("weight_dims", [2, 3])
def test_a_bmm_over_one_weight_expanded_along_the_batch_is_a_linear(weight_dims: int) -> None:
    """`torch.bmm(x, w.expand(B, K, N))` multiplies every batch by one weight: it is `x @ w`.
    It was taken for a bmm over stacked (MoE expert) weights with as many experts as the input
    has batches, and under dynamic=True left as it was with a reason saying the weight's sizes
    were symbolic and to `mark_static` the parameter, which already was static."""
    class ExpandedWeight(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(*([1] * (weight_dims - 2)), 32, 24))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.bmm(x, self.w.expand(x.shape[0], 32, 24))

    model = ExpandedWeight().eval()
    compiled, report = _compiled(model)
    with torch.no_grad():
        for batch in (2, 3):
            x = torch.randn(batch, 5, 32)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert report.rewrites.get("padded_gemm") == 1, report.rewrites
    assert not report.fallbacks, [f.reason for f in report.fallbacks]


def _experts_input(form: str) -> Callable:
    # Llama-4's batched experts' input: every token's row once per expert, scaled by that expert's
    # score (`[T, E]`), viewed `[E, T, H]`; or a near form that is something else.
    def fn(x, scores):
        experts = 4  # (a number: the experts are the weights', the tokens symbolic)
        repeats = {"along columns": (1, experts), "twice over": (experts, 2)}.get(form, (experts, 1))
        routed = x.repeat(*repeats)
        scale = scores.t().reshape(-1, 1) if repeats[0] == experts else 2.0
        if form == "scores by token":
            scale = scores.reshape(-1, 1)  # ([T, E] flattened: row r is token r // E's, not expert r // T's)
        if form == "a product":
            rows = routed @ torch.ones(routed.shape[1], 8)
        elif form == "three operands":
            rows = torch.addcmul(routed, scale, scale)  # (decomposed in Python: its sizes need the dispatcher)
        else:
            rows = routed + 1 if form == "no scores" else routed * scale
        return torch.relu(rows.view(experts, -1, rows.shape[1] // repeats[1]))  # (canonicalize keeps outputs)
    return fn


@pytest.mark.parametrize("form", ["scaled", "no scores", "three operands"])
def test_tokens_repeated_per_expert_become_a_broadcast(form: str) -> None:
    """`x.repeat(E, 1) * s.t().reshape(E*T, 1)` viewed `[E, T, H]` (Llama-4's experts' input, its
    tokens hidden in E*T rows) is `x` broadcast to `[E, T, H]` times `s.t()` as `[E, T, 1]`: no
    repeat, the tokens at dim 1, the same values and layout, at other token counts too."""
    fn = _experts_input(form)
    gm = traced(fn, torch.randn(5, 8), torch.randn(5, 4))
    assert canonicalize(gm)["repeat_as_broadcast"] == 1
    assert aten.repeat.default not in ops(gm) and ops(gm)[aten.expand.default] == 1
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    assert out.args[0].target in (aten.mul.Tensor, aten.add.Tensor, aten.addcmul.default)  # (no view: [E, T, H] rows)
    x, scores = torch.randn(11, 8), torch.randn(11, 4)
    got, want = gm(x, scores), fn(x, scores)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.stride() == want.stride()


@pytest.mark.parametrize("form", ["along columns", "twice over", "scores by token", "a product"])
def test_other_repeats_stay(form: str) -> None:
    """A repeat along the columns or of the rows and the columns, scores in token-major order
    (their rows are no expert's block) and a product of the repeated rows (no elementwise op)
    are left as they are, and still exact."""
    fn = _experts_input(form)
    gm = traced(fn, torch.randn(5, 8), torch.randn(5, 4))
    assert "repeat_as_broadcast" not in canonicalize(gm)
    assert ops(gm)[aten.repeat.default] == 1
    x, scores = torch.randn(11, 8), torch.randn(11, 4)
    torch.testing.assert_close(gm(x, scores), fn(x, scores), rtol=0, atol=0)
