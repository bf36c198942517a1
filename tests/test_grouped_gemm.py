"""The grouped (MoE expert) padded GEMM: kernels on both CPU-runnable backends, the eager op, the
gemm_padding rewrite of `grouped_mm`, and the Ascend target's refusal.

Kernel numerics follow tests/gemm_cases.py: fresh random inputs per case, a float64 reference,
outputs poisoned with NaN before each launch (an element no program writes shows), groups with 0
rows, 1 row and tails that are not tile multiples, N and K not multiples of any tile.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import compiled_dynamic

import tileflow
from tileflow.cli import main as cli_main
from tileflow.kernel_spec import KernelSpec, TileConfig, check_gemm_spec, gemm_formula, is_gated, make_params
from tileflow.lower import grouped_gemm_spec
from tileflow.pipeline import PassContext, PassResult, register_pass
from tileflow.runtime import decode_plan, expected_group_rows, get_kernel
from tileflow.targets import get_backend, triton_interpreter_enabled

from gemm_cases import TOL
from models import MOE, SEQ_LENS, VOCAB, build

aten = torch.ops.aten
GROUPED = torch.ops.tileflow.grouped_gemm.default

# Where a target's kernels run: compiled Triton kernels need CUDA tensors (the interpreter and
# the other targets run on the CPU).
TRITON_DEVICE = "cpu" if triton_interpreter_enabled() or not torch.cuda.is_available() else "cuda"


def _device(target: str) -> str:
    return TRITON_DEVICE if target == "triton" else "cpu"


# N and K are no multiple of any tile side (tiles are powers of two >= 16).
N, K = 40, 20
# Group sizes per E: empty groups, 1-row groups, tails short of a tile, a group of exactly 16.
GROUP_SIZES = {1: [37], 3: [1, 0, 35], 8: [0, 5, 16, 1, 0, 33, 2, 7]}


def _offsets(sizes: list[int]) -> torch.Tensor:
    return torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(torch.int32)


def _inputs(sizes: list[int], rows: int, dtype: torch.dtype, seed: int, transposed: bool):
    """Fresh x [M, K], weight [E, rows, K] (a transposed view of [E, K, rows] when asked), offsets."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), K, generator=gen).to(dtype)
    w = torch.randn(len(sizes), K, rows, generator=gen) / K**0.5
    w = w.to(dtype).transpose(1, 2) if transposed else w.transpose(1, 2).contiguous().to(dtype)
    return x, w, _offsets(sizes)


def _reference(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, activation: str,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 per-expert loop: rows offsets[e-1]:offsets[e] times weight[e] (plus bias[e])."""
    outs, start = [], 0
    for e, end in enumerate(offsets.tolist()):
        acc = x[start:end].double() @ w[e].double().T
        if bias is not None:
            acc = acc + bias[e].double()
        if is_gated(activation):
            half = acc.shape[1] // 2
            gate = acc[:, :half]
            gate = F.silu(gate) if activation == "swiglu" else F.gelu(gate, approximate="tanh" if activation == "geglu_tanh" else "none")
            acc = gate * acc[:, half:]
        elif activation == "gelu":
            acc = F.gelu(acc)
        elif activation == "silu":
            acc = F.silu(acc)
        elif activation == "relu2":
            acc = acc.clamp_min(0) ** 2
        outs.append(acc)
        start = end
    return torch.cat(outs)


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not torch.isnan(out).any(), "some output rows were never written"
    if ref.numel() == 0:
        return
    rel = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    tol = TOL[str(dtype).removeprefix("torch.")]
    assert rel <= tol, f"relative error {rel:.3g} > {tol}"


KERNEL_CASES = [
    # (target, dtype, E, activation, tile)
    (target, dtype, e, act, tile)
    for target in ("reference", "triton")
    for dtype in (torch.float32, torch.float16)
    for e, act, tile in (
        (1, "none", TileConfig(16, 32, 32)),
        (3, "swiglu", TileConfig(16, 16, 16)),
        (8, "none", TileConfig(32, 32, 16)),
        (8, "gelu", TileConfig(16, 32, 32)),
        (3, "relu2", TileConfig(16, 32, 32)),
        (3, "geglu_tanh", TileConfig(16, 16, 16)),
    )
] + [
    # The Ascend C kernel, compiled for the CPU against the Ascend C test double (tests/ascend_cpu).
    ("ascend-cpu", dtype, e, act, tile)
    for dtype, e, act, tile in (
        (torch.float32, 1, "none", TileConfig(16, 32, 32)),
        (torch.float16, 3, "swiglu", TileConfig(16, 16, 16)),
        (torch.float16, 8, "none", TileConfig(32, 32, 16)),
        (torch.float32, 8, "gelu", TileConfig(16, 32, 32)),
    )
] + [
    # bfloat16 on the reference and Ascend CPU backends, and on Triton with a GPU: Triton's CPU
    # interpreter computes bf16 dots wrongly (the padded GEMM's too).
    (target, torch.bfloat16, 3, "swiglu", TileConfig(16, 32, 32))
    for target in ("reference", "ascend-cpu") + (("triton",) if TRITON_DEVICE == "cuda" else ())
]
ASCEND_HEADERS = Path(__file__).parent / "ascend_cpu"


def _kernel(target: str, spec):
    """The built kernel of `spec`: through the runtime, or compiled in CPU-debug mode for Ascend."""
    if target == "ascend-cpu":
        from tileflow.backends.ascend import build_cpu_debug_kernel

        return build_cpu_debug_kernel(spec, [ASCEND_HEADERS])
    return get_kernel(target, spec)


@pytest.mark.parametrize("target, dtype, e, activation, tile", KERNEL_CASES)
def test_kernel_matches_float64(target: str, dtype: torch.dtype, e: int, activation: str, tile: TileConfig) -> None:
    sizes = GROUP_SIZES[e]
    rows = 2 * N if is_gated(activation) else N
    spec = grouped_gemm_spec(dtype=dtype, out_dtype=dtype, n=N, k=K, experts=e, tile=tile, activation=activation)
    kernel = _kernel(target, spec)
    dev = _device(target)
    for seed, transposed in ((0, True), (1, False)):
        x, w, offsets = _inputs(sizes, rows, dtype, seed, transposed)
        out = torch.full((x.shape[0], N), float("nan"), dtype=dtype, device=dev)
        assert kernel(x.to(dev), w.to(dev), offsets.to(dev), out=out) is out
        _assert_close(out.cpu(), _reference(x, w, offsets, activation), dtype)


@pytest.mark.parametrize("target", ["reference", "triton", "ascend-cpu"])
def test_kernel_with_no_rows_and_with_every_row_in_one_group(target: str) -> None:
    spec = grouped_gemm_spec(dtype=torch.float32, out_dtype=torch.float32, n=N, k=K, experts=3, tile=TileConfig(16, 32, 32))
    kernel = _kernel(target, spec)
    dev = _device(target)
    empty = kernel(torch.empty(0, K, device=dev), torch.randn(3, N, K, device=dev),
                   torch.zeros(3, dtype=torch.int32, device=dev))
    assert empty.shape == (0, N)
    x, w, offsets = _inputs([0, 0, 50], N, torch.float32, 2, True)
    got = kernel(x.to(dev), w.to(dev), offsets.to(dev))
    _assert_close(got.cpu(), _reference(x, w, offsets, "none"), torch.float32)


BIAS_CASES = [(target, dtype, act) for target in ("reference", "triton") for dtype in (torch.float32, torch.float16)
              for act in ("none", "swiglu")] + [("ascend-cpu", torch.float16, "swiglu"), ("ascend-cpu", torch.float32, "gelu")]


# On Triton (the interpreter: seconds a case) the default run takes float32 with SwiGLU and float16
# without an activation, both dtypes and both bias layouts; the other two under `extended`.
@pytest.mark.parametrize("target, dtype, activation", [
    pytest.param(*case, marks=pytest.mark.extended)
    if case in (("triton", torch.float32, "none"), ("triton", torch.float16, "swiglu")) else case
    for case in BIAS_CASES])
def test_kernel_adds_each_experts_bias_row(target: str, dtype: torch.dtype, activation: str) -> None:
    """A per-expert bias [E, N] ([E, 2N]: gate, then up): expert e's rows gain row e, before the
    activation, over empty, one-row and tail groups."""
    sizes = GROUP_SIZES[8]
    rows = 2 * N if is_gated(activation) else N
    spec = grouped_gemm_spec(dtype=dtype, out_dtype=dtype, n=N, k=K, experts=8, tile=TileConfig(16, 32, 16),
                             activation=activation, has_bias=True)
    assert ("bias_gate[e]" if is_gated(activation) else "bias[e]") in gemm_formula(spec)
    kernel = _kernel(target, spec)
    dev = _device(target)
    for seed, transposed in ((0, True), (1, False)):
        x, w, offsets = _inputs(sizes, rows, dtype, seed, transposed)
        # Large next to the products, so a row given another expert's bias shows.
        bias = (4 * torch.randn(8, rows, generator=torch.Generator().manual_seed(seed + 10))).to(dtype)
        out = torch.full((x.shape[0], N), float("nan"), dtype=dtype, device=dev)
        assert kernel(x.to(dev), w.to(dev), offsets.to(dev), bias.to(dev), out=out) is out
        _assert_close(out.cpu(), _reference(x, w, offsets, activation, bias), dtype)
    with pytest.raises(ValueError, match="no bias was given"):
        kernel(x.to(dev), w.to(dev), offsets.to(dev))
    with pytest.raises(ValueError, match=rf"bias must have shape \[8, {rows}\]"):
        kernel(x.to(dev), w.to(dev), offsets.to(dev), bias[:, 1:].to(dev))


def _clamped_swiglu(acc: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's activation of an [M, 2N] float64 product whose gate and up columns interleave."""
    gate, up = acc[:, 0::2].clamp(max=limit), acc[:, 1::2].clamp(-limit, limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


# Triton in float16 under `extended`: float16 runs on the Ascend CPU double, Triton in float32.
@pytest.mark.parametrize("target, dtype", [("reference", torch.float32), ("triton", torch.float32),
                                           pytest.param("triton", torch.float16, marks=pytest.mark.extended),
                                           ("ascend-cpu", torch.float16)])
def test_kernel_runs_gpt_oss_clamped_swiglu_over_interleaved_columns(target: str, dtype: torch.dtype) -> None:
    """`clamped_swiglu` over gpt-oss's layout: gate and up rows of the [E, 2N, K] weight (and
    columns of the [E, 2N] bias) interleaved, given as a transposed view of [E, K, 2N] and as
    row-major; products large enough that many gates pass the limit and many ups pass either
    side of it."""
    alpha, limit = 1.702, 2.0
    sizes = GROUP_SIZES[8]
    spec = grouped_gemm_spec(dtype=dtype, out_dtype=dtype, n=N, k=K, experts=8, tile=TileConfig(16, 32, 16),
                             activation="clamped_swiglu", has_bias=True, clamp=(alpha, limit))
    assert "alpha1.702" in spec.name and "limit2.0" in spec.name and "min(x[rows of e] @ W_gate[e]^T" in gemm_formula(spec)
    kernel = _kernel(target, spec)
    dev = _device(target)
    for seed, transposed in ((5, True), (6, False)):
        x, w, offsets = _inputs(sizes, 2 * N, dtype, seed, transposed)
        w = 3 * w
        bias = torch.randn(8, 2 * N, generator=torch.Generator().manual_seed(seed)).to(dtype)
        out = torch.full((x.shape[0], N), float("nan"), dtype=dtype, device=dev)
        assert kernel(x.to(dev), w.to(dev), offsets.to(dev), bias.to(dev), out=out) is out
        acc = _reference(x, w, offsets, "none", bias)
        assert (acc[:, 0::2] > limit).float().mean() > 0.15 and (acc[:, 1::2].abs() > limit).float().mean() > 0.3
        _assert_close(out.cpu(), _clamped_swiglu(acc, alpha, limit), dtype)


@pytest.mark.parametrize("target", ["reference", "triton"])
def test_eager_op_with_gpt_oss_experts(target: str) -> None:
    """The eager op over gpt-oss's layout ([E, K, 2N] weights, interleaved columns, biases), with
    offsets, batched, and with K = 0; its argument checks."""
    dev = _device(target)
    gen = torch.Generator().manual_seed(4)
    gg = tileflow.ops.grouped_gemm
    with tileflow.use_config(tileflow.Config(target=target)):
        for sizes, k in (([4, 0, 19, 1], K), ([2, 3, 0, 5], 0)):
            x = torch.randn(sum(sizes), k, generator=gen)
            w = (2 * torch.randn(4, k, 2 * N, generator=gen)).to(dev).transpose(1, 2)
            b = (2 * torch.randn(4, 2 * N, generator=gen)).to(dev)
            out = gg(x.to(dev), w, _offsets(sizes).to(dev), activation="clamped_swiglu", bias=b, alpha=1.702, limit=3.0)
            ref = _clamped_swiglu(_reference(x, w.cpu(), _offsets(sizes), "none", b.cpu()), 1.702, 3.0)
            _assert_close(out.cpu(), ref, torch.float32)
        x3, w = torch.randn(4, 5, K, generator=gen), torch.randn(4, 2 * N, K, generator=gen)
        out = gg(x3.to(dev), w.to(dev), activation="clamped_swiglu", alpha=1.0, limit=1.0)
        acc = torch.einsum("etk,enk->etn", x3.double(), w.double())
        gate, up = acc[..., 0::2].clamp(max=1.0), acc[..., 1::2].clamp(-1.0, 1.0)
        _assert_close(out.cpu(), (up + 1) * gate * torch.sigmoid(gate), torch.float32)
    x, w, offsets = _inputs([3, 0, 5], N, torch.float32, 0, False)
    cases = [
        (lambda: gg(x, w, offsets, activation="clamped_swiglu"), "alpha and limit go with"),
        (lambda: gg(x, w, offsets, activation="clamped_swiglu", alpha=1.0), "alpha and limit go with"),
        (lambda: gg(x, w, offsets, activation="swiglu", alpha=1.0, limit=7.0), "alpha and limit go with"),
        (lambda: gg(x, w, offsets, activation="clamped_swiglu", alpha=1.0, limit=0.0), "positive limit"),
        (lambda: gg(x, w, offsets, activation="clamped_swiglu", alpha=float("nan"), limit=1.0), "finite alpha"),
        (lambda: gg(x, w[:, :39], offsets, activation="clamped_swiglu", alpha=1.0, limit=1.0), r"\[E, 2N, K\]"),
        (lambda: gg(x, w, offsets, bias=torch.zeros(3, N, dtype=torch.float16)), "bias must be in x's dtype"),
        (lambda: tileflow.ops.padded_gemm(x, w[0], activation="clamped_swiglu"), "grouped_gemm activation only"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("target", ["reference", "triton"])
@pytest.mark.parametrize("activation", ["none", "geglu"])
def test_eager_op_with_an_expert_bias(target: str, activation: str) -> None:
    """`grouped_gemm(..., bias=)`: with offsets, batched (no offsets), and with K = 0 (each row
    its expert's bias through the epilogue); a bias of the wrong shape is refused."""
    rows = 2 * N if is_gated(activation) else N
    dev = _device(target)
    gen = torch.Generator().manual_seed(3)
    with tileflow.use_config(tileflow.Config(target=target)):
        for sizes, k in (([4, 0, 19, 1], K), ([2, 3, 0, 5], 0)):
            x = torch.randn(sum(sizes), k, generator=gen)
            w = torch.randn(4, rows, k, generator=gen)
            bias, offsets = torch.randn(4, rows, generator=gen), _offsets(sizes)
            out = tileflow.ops.grouped_gemm(x.to(dev), w.to(dev), offsets.to(dev), activation=activation, bias=bias.to(dev))
            _assert_close(out.cpu(), _reference(x, w, offsets, activation, bias), torch.float32)
        x3 = torch.randn(4, 5, K, generator=gen)
        w = torch.randn(4, rows, K, generator=gen)
        out = tileflow.ops.grouped_gemm(x3.to(dev), w.to(dev), activation=activation, bias=bias.to(dev))
        ref = _reference(x3.reshape(20, K), w, torch.arange(1, 5, dtype=torch.int32) * 5, activation, bias)
        _assert_close(out.cpu().reshape(20, N), ref, torch.float32)
        with pytest.raises(ValueError, match=rf"bias must be \[E, {'2N' if rows > N else 'N'}\] = \[4, {rows}\]"):
            tileflow.ops.grouped_gemm(x3, w, activation=activation, bias=bias[:, :-1])


@pytest.mark.parametrize("target", ["reference", "triton"])
def test_round_then_cast_in_the_shared_epilogue(target: str) -> None:
    """The grouped kernels share the padded GEMM's epilogue, `round` included (the pass fuses no
    cast after a grouped GEMM; a spec may still ask): the fused SwiGLU's float16 result, widened."""
    rounded, direct = (
        KernelSpec(op="grouped_gemm", dtype="float16", out_dtype="float32", tile=TileConfig(16, 32, 32),
                   epilogue=epilogue, params=make_params(n=N, k=K, experts=3))
        for epilogue in (("swiglu", "round", "cast"), ("swiglu", "cast"))
    )
    dev = _device(target)
    x, w, offsets = _inputs(GROUP_SIZES[3], 2 * N, torch.float16, 5, True)
    outs = [_kernel(target, spec)(x.to(dev), w.to(dev), offsets.to(dev)).cpu() for spec in (rounded, direct)]
    assert outs[0].dtype == torch.float32
    _assert_close(outs[0], _reference(x, w, offsets, "swiglu").half().double(), torch.float16)
    assert torch.equal(outs[0], outs[1].half().float()) and not torch.equal(outs[0], outs[1])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6),
    activation=st.sampled_from(["none", "silu", "swiglu"]),
    seed=st.integers(0, 2**16),
)
def test_eager_op_random_group_sizes(sizes: list[int], activation: str, seed: int) -> None:
    """Any split of M into groups (reference backend, through the plan of the eager op)."""
    rows = 2 * N if is_gated(activation) else N
    x, w, offsets = _inputs(sizes, rows, torch.float32, seed, seed % 2 == 0)
    with tileflow.use_config(tileflow.Config(target="reference")):
        out = tileflow.ops.grouped_gemm(x, w, offsets, activation=activation)
    assert out.shape == (sum(sizes), N)
    _assert_close(out, _reference(x, w, offsets, activation), torch.float32)


@pytest.mark.parametrize("target", ["reference", "triton"])
@pytest.mark.parametrize("activation", ["none", "swiglu"])
def test_eager_batched_op_without_offsets(target: str, activation: str) -> None:
    """No offsets: x [E, T, K] and expert e's rows are x[e] (a bmm with per-expert weights, as
    Llama-4's dense experts), T from none to more than a tile."""
    rows = 2 * N if is_gated(activation) else N
    for t, seed in ((0, 0), (1, 1), (17, 2)):
        gen = torch.Generator().manual_seed(seed)
        x, w = torch.randn(3, t, K, generator=gen), torch.randn(3, K, rows, generator=gen).transpose(1, 2) / K**0.5
        with tileflow.use_config(tileflow.Config(target=target)):
            out = tileflow.ops.grouped_gemm(x.to(_device(target)), w.to(_device(target)), activation=activation)
        assert out.shape == (3, t, N)
        ref = _reference(x.reshape(3 * t, K), w, torch.arange(1, 4, dtype=torch.int32) * t, activation)
        _assert_close(out.cpu().reshape(3 * t, N), ref, torch.float32)


def test_eager_validation_errors() -> None:
    x, w, offsets = _inputs([3, 0, 5], N, torch.float32, 0, False)
    gg = tileflow.ops.grouped_gemm
    cases = [
        (lambda: gg(x, w, offsets.long()), "offsets must be int32"),
        (lambda: gg(x, w, offsets[:2]), r"offsets must be \[E=3\]"),
        (lambda: gg(x, w, torch.tensor([3, 2, 8], dtype=torch.int32)), "non-decreasing"),
        (lambda: gg(x, w, torch.tensor([3, 3, 7], dtype=torch.int32)), "last offset must equal"),
        (lambda: gg(x, w, torch.tensor([-1, 3, 8], dtype=torch.int32)), "non-negative"),
        (lambda: gg(x, w[0], offsets), r"weight \[E, N, K\]"),
        (lambda: gg(x[:, :7], w, offsets), "K mismatch"),
        (lambda: gg(x, w[:, :39], offsets, activation="swiglu"), r"stacked as \[E, 2N, K\]"),
        (lambda: gg(x, w, offsets, activation="tanh"), "unknown activation"),
        (lambda: gg(x, w), r"without offsets is batched: x must be \[E, T, K\]"),
        (lambda: gg(x.view(2, 4, K), w), r"one row block per expert"),
        (lambda: gg(x.view(1, 8, K)[:, :, :7], w[:1]), "K mismatch"),
        (lambda: gg(x, w, [3, 3, 8]), "offsets must be a torch.Tensor, got list"),  # (an AttributeError before)
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    # The launchers check what they are given (no values: that would need a device sync).
    spec = grouped_gemm_spec(dtype=torch.float32, out_dtype=torch.float32, n=N, k=K, experts=3, tile=TileConfig(16, 32, 32))
    with pytest.raises(ValueError, match="weight must be float32"):
        get_kernel("reference", spec)(x, w.half(), offsets)
    with pytest.raises(ValueError, match=r"out must have shape \[8, 40\]"):
        get_kernel("reference", spec)(x, w, offsets, out=torch.empty(8, 41))


def test_spec_checks_and_plan_key() -> None:
    spec = grouped_gemm_spec(dtype="float16", out_dtype="float16", n=N, k=K, experts=4, tile=TileConfig(16, 32, 32))
    assert spec.op == "grouped_gemm" and spec.param("experts") == 4 and "experts4" in spec.name
    bad = type(spec)(op="grouped_gemm", dtype="float16", out_dtype="float16", tile=spec.tile, epilogue=("residual",),
                     params=spec.params)
    with pytest.raises(ValueError, match=r"cannot fuse \['residual'\]"):
        check_gemm_spec(bad, ("float16",), "Triton", 16, op="grouped_gemm")
    no_experts = type(spec)(op="grouped_gemm", dtype="float16", out_dtype="float16", tile=spec.tile,
                            params=(("k", K), ("n", N)))
    with pytest.raises(ValueError, match="positive integer param 'experts'"):
        get_backend("reference").build(no_experts)
    assert expected_group_rows(0, 8) == 1 and expected_group_rows(17, 8) == 3 and expected_group_rows(16, 8) == 2


def test_ascend_export_of_mixtral_writes_its_grouped_kernels(tmp_path: Path) -> None:
    build("mixtral").config.save_pretrained(tmp_path / "cfg")
    result = CliRunner().invoke(cli_main, ["export", str(tmp_path / "cfg"), "-o", str(tmp_path / "out"), "--target", "ascend",
                                       "--dynamic", "seq=2:32"])
    assert result.exit_code == 0, result.output
    kernels = json.loads((tmp_path / "out" / "kernels.json").read_text())["kernels"]
    grouped = [k for k in kernels if k["spec"]["op"] == "grouped_gemm"]
    assert grouped, [k["spec"]["op"] for k in kernels]
    for k in grouped:
        source = (tmp_path / "out" / f"op_kernel/{k['ident']}.cpp").read_text()
        assert "offsetsGm.GetValue(e)" in source and "constexpr int32_t EXPERTS = 4;" in source


# --------------------------------------------------------------------------------------------
# The gemm_padding rewrite on real Dynamo graphs

_GRABBED: list[tuple[fx.GraphModule, PassContext]] = []


@register_pass
class GrabGroupedGraph:
    """Keeps the graph as the passes before it left it, for inspection."""

    name = "test_grab_grouped_graph"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        _GRABBED.append((gm, ctx))
        return PassResult()


def _compile(fn: Callable, *inputs: torch.Tensor, target: str = "reference"):
    """Compile with x's rows (input 0, dim 0) dynamic; returns the compiled fn, graph and context."""
    _GRABBED.clear()
    torch._dynamo.mark_dynamic(inputs[0], 0)
    options = {"target": target, "max_tokens": 512, "passes": ["canonicalize", "gemm_padding", "test_grab_grouped_graph"]}
    compiled = torch.compile(fn, backend=tileflow.TileflowBackend(options, report=tileflow.Report()), dynamic=False)
    compiled(*inputs)
    gm, ctx = _GRABBED[-1]
    return compiled, gm, ctx


def _moe_inputs(m: int, e: int = 4, seed: int = 0, k: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, k] and int32 offsets of a random routing of m rows over e experts."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.bincount(torch.randint(0, e, (m,), generator=gen), minlength=e)
    return torch.randn(m, k, generator=gen), counts.cumsum(0).to(torch.int32)


# aten._grouped_mm wants rows of a multiple of 16 bytes: K = 32 in bfloat16.
K16 = 32


def test_pass_rewrites_transformers_experts_with_swiglu() -> None:
    import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)

    gate_up, down = torch.randn(4, 2 * 24, K) / K**0.5, torch.randn(4, K, 24) / 24**0.5

    def experts(x, offs, gate_up, down):
        h = torch.ops.transformers.grouped_mm_fallback(x, gate_up.transpose(-2, -1), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        return torch.ops.transformers.grouped_mm_fallback(F.silu(gate) * up, down.transpose(-2, -1), offs=offs)

    x, offs = _moe_inputs(9)
    compiled, gm, ctx = _compile(experts, x, offs, gate_up, down)
    nodes = [n for n in gm.graph.nodes if n.target is GROUPED]
    assert len(nodes) == 2 and not any("grouped_mm" in str(n.target) for n in gm.graph.nodes)
    assert [n.args[3] for n in nodes] == ["swiglu", "none"]
    # The expert parameters are read as they are ([E, N, K]): no transpose left in the graph.
    assert all(n.args[1].op == "placeholder" for n in nodes)
    assert aten.silu.default not in {n.target for n in gm.graph.nodes}
    result = ctx.report.passes[1]
    assert result.rewrites == {"grouped_gemm": 2, "fused_grouped_swiglu": 1} and not ctx.report.fallbacks
    plans = [p for p in ctx.report.plans if p["op"] == "grouped_gemm"]
    assert {(p["n"], p["k"], p["experts"]) for p in plans} == {(24, K, 4), (K, 24, 4)}
    assert all(p["describe"].startswith("rows per expert ceil(M / 4)") for p in plans)
    assert all(p["tile_times"] == "cost model" for p in plans)  # no tile times ship for this CPU
    plan = decode_plan(nodes[0].args[5])
    assert plan.m_max == math.ceil(512 / 4)
    for m in (3, 9, 40, 101):  # one compiled graph serves every row count and routing
        x, offs = _moe_inputs(m, seed=m)
        torch.testing.assert_close(compiled(x, offs, gate_up, down), experts(x, offs, gate_up, down), rtol=1e-5, atol=1e-5)


def _biased_experts(variant: str = "fused") -> Callable:
    """transformers' grouped MoE with expert biases (gpt-oss's layout, SwiGLU in halves): top-2
    ids sorted, offsets from their histogram, each grouped matmul plus `bias[sorted ids]`; a
    `variant` breaks one link between the ids and the offsets."""
    import transformers.integrations.moe  # noqa: F401

    mm = torch.ops.transformers.grouped_mm_fallback

    def experts(x, router, gate_up, gate_up_bias, down, down_bias, other_ids):
        e = gate_up.shape[0]
        top = torch.topk(x @ router.T, 2, dim=-1).indices.reshape(-1)
        if variant == "ids_not_top_k":  # ids from anywhere: nothing says they are not negative
            top = other_ids
        ids, perm = torch.sort(top, descending=variant == "descending")
        xs = x[perm // 2]
        low = -1 if variant == "other_histogram" else 0  # every row counted, id v in bin v + 1
        offs = torch.cumsum(torch.histc(ids.float(), bins=e, min=low, max=e - 1), dim=0, dtype=torch.int32)
        gathered = ids.flip(0) if variant == "other_gather" else ids
        h = mm(xs, gate_up.transpose(-2, -1), offs=offs) + gate_up_bias[gathered]
        gate, up = h.chunk(2, dim=-1)
        out = mm(F.silu(gate) * up, down.transpose(-2, -1), offs=offs)
        cast = {"wider_bias": torch.float64, "narrower_bias": torch.bfloat16}.get(variant, down_bias.dtype)
        return out + down_bias.to(cast)[ids]

    return experts


def _biased_expert_weights(e: int = 4, inner: int = 24) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(e, K, generator=gen), torch.randn(e, 2 * inner, K, generator=gen) / K**0.5,
            torch.randn(e, 2 * inner, generator=gen), torch.randn(e, K, inner, generator=gen) / inner**0.5,
            torch.randn(e, K, generator=gen)]


def test_pass_fuses_the_bias_gathered_by_sorted_expert_ids() -> None:
    """gpt-oss's experts (transformers' grouped path) add `bias[sorted ids]` after each grouped
    matmul: the bias becomes the kernels' per-expert row, with the SwiGLU after it, in one
    graph for every row count and routing."""
    fn = _biased_experts()
    weights = _biased_expert_weights()
    x = torch.randn(9, K)
    other = torch.zeros(18, dtype=torch.long)
    compiled, gm, ctx = _compile(fn, x, *weights, other)
    nodes = [n for n in gm.graph.nodes if n.target is GROUPED]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]
    assert [n.args[3] for n in nodes] == ["swiglu", "none"]
    assert [n.args[7] for n in nodes] == [placeholders[3], placeholders[5]]  # the [E, N] biases, read as they are
    assert aten.index.Tensor not in {u.target for p in (placeholders[3], placeholders[5]) for u in p.users}
    # (and the router, x @ router.T, a padded GEMM)
    assert ctx.report.passes[1].rewrites == {"grouped_gemm": 2, "fused_grouped_swiglu": 1, "fused_grouped_bias": 2,
                                             "padded_gemm": 1}
    for m in (1, 9, 40, 101):
        x = torch.randn(m, K, generator=torch.Generator().manual_seed(m))
        torch.testing.assert_close(compiled(x, *weights, other), fn(x, *weights, other), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["ids_not_top_k", "descending", "other_histogram", "other_gather", "wider_bias",
                                     "narrower_bias"])
def test_pass_leaves_a_bias_gather_it_cannot_prove_per_expert(variant: str) -> None:
    """The bias stays a gather and an add (the grouped GEMMs are still rewritten) unless the ids
    it is gathered by are the sorted top-k ids its offsets count: ids of any origin (negative
    ones would not be in their row's group), sorted descending, counted over other bins, a
    gather by other ids, or a bias of another dtype than the output's (wider: the add widens the
    output; narrower: the kernels take a bias in the input's or the output's dtype only)."""
    fn = _biased_experts(variant)
    weights = _biased_expert_weights()
    x = torch.randn(9, K)
    other = torch.randint(0, 4, (18,), generator=torch.Generator().manual_seed(1))
    compiled, gm, ctx = _compile(fn, x, *weights, other)
    rewrites = ctx.report.passes[1].rewrites
    # The last three break one of the two biases' links; the first three, both.
    assert rewrites["grouped_gemm"] == 2
    assert rewrites.get("fused_grouped_bias", 0) == (1 if variant in ("other_gather", "wider_bias", "narrower_bias") else 0)
    torch.testing.assert_close(compiled(x, *weights, other), fn(x, *weights, other), rtol=1e-5, atol=1e-5)


def _gpt_oss_experts(variant: str = "fused", alpha: float = 1.702, limit: float = 2.0) -> Callable:
    """gpt-oss's experts as transformers runs them (grouped path): [E, K, 2N] gate-up weights with
    interleaved columns and biases, `(clamp(up, -L, L) + 1) * g * sigmoid(g * alpha)`, g =
    clamp(gate, max=L), then the down projection (left out when its weights are not given); a
    `variant` changes one step of the activation or the form."""
    import transformers.integrations.moe  # noqa: F401

    mm = torch.ops.transformers.grouped_mm_fallback

    def experts(x, router, gate_up, gate_up_bias, down=None, down_bias=None):
        e = gate_up.shape[0]
        top = torch.topk(x @ router.T, 2, dim=-1).indices.reshape(-1)
        ids, perm = torch.sort(top)
        offs = torch.cumsum(torch.histc(ids.float(), bins=e, min=0, max=e - 1), dim=0, dtype=torch.int32)
        xs, gathered = x[perm // 2], ids
        if variant == "sentinels":
            # transformers 5.17's expert-parallel form: ids past the local experts (a router
            # wider than E here) sort last, outside every group; their rows are zeroed around
            # each grouped matmul, and the biases gathered by the ids clamped below E.
            sentinel = (ids >= e).unsqueeze(-1)
            xs, gathered = xs.masked_fill(sentinel, 0.0), ids.clamp(max=e - 1)
        h = mm(xs, gate_up, offs=offs) + gate_up_bias[gathered]
        if variant == "sentinels":
            h = h.masked_fill(sentinel, 0.0)
        gate, up = {
            "gate_odd": lambda: (h[..., 1::2], h[..., ::2]),
            "rows": lambda: (h[::2], h[1::2]),  # every other ROW (2 rows a token): a [T, 2N] result
            "step4": lambda: (h[..., ::4], h[..., 1::4]),
            "short": lambda: (h[..., : h.shape[-1] - 2 : 2], h[..., 1 : h.shape[-1] - 2 : 2]),
        }.get(variant, lambda: (h[..., ::2], h[..., 1::2]))()
        gate = gate.clamp(min=-limit if variant == "gate_floor" else None, max=limit)
        up = up.clamp(min=-limit, max=limit / 2 if variant == "up_other_limit" else limit)
        glu = {
            "tanh": lambda: gate * torch.tanh(gate * alpha),
            "sigmoid_of_sum": lambda: gate * torch.sigmoid(gate + alpha),
            "glu_sum": lambda: gate + torch.sigmoid(gate * alpha),
        }.get(variant, lambda: gate * torch.sigmoid(gate * alpha))()
        shifted = up + (2 if variant == "up_plus_two" else 1)
        h = shifted + glu if variant == "tip_sum" else shifted * glu
        if down is None:
            return h
        out = mm(h, down, offs=offs) + down_bias[gathered]
        return out.masked_fill(sentinel, 0.0) if variant == "sentinels" else out

    return experts


def _gpt_oss_weights(e: int = 4, inner: int = 24, routed: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(8)
    return [torch.randn(routed, K, generator=gen), 3 * torch.randn(e, K, 2 * inner, generator=gen) / K**0.5,
            torch.randn(e, 2 * inner, generator=gen), torch.randn(e, inner, K, generator=gen) / inner**0.5,
            torch.randn(e, K, generator=gen)]


@pytest.mark.parametrize("target, form", [("reference", "fused"), ("triton", "fused"), ("reference", "sentinels")])
def test_pass_fuses_gpt_oss_clamped_swiglu(target: str, form: str) -> None:
    """gpt-oss's gate-up experts become one grouped GEMM over the weight and the bias as they
    are (gate and up interleaved), with the clamped SwiGLU in its epilogue; equal to the graph
    it replaced for every row count, clamps taken (a limit of 2). Also in transformers 5.17's
    form, whose rows routed past the local experts are zeroed after each bias add (the fill
    moves after the fused kernel, which leaves those rows unwritten)."""
    fn = _gpt_oss_experts(form)
    weights = _gpt_oss_weights(routed=6 if form == "sentinels" else 4)
    x = torch.randn(9, K)
    compiled, gm, ctx = _compile(fn, x, *weights, target=target)
    node = next(n for n in gm.graph.nodes if n.target is GROUPED)
    # The [E, K, 2N] weight's transposed view and the [E, 2N] bias, interleaved, as they are.
    assert node.args[3] == "clamped_swiglu" and node.args[8:] == (1.702, 2.0)
    assert node.args[7].op == "placeholder" and tuple(node.args[7].meta["val"].shape) == (4, 48)
    weight = node.args[1]
    assert weight.target is aten.transpose.int and weight.args[0].op == "placeholder"
    assert tuple(weight.args[0].meta["val"].shape) == (4, K, 48)
    assert {aten.sigmoid.default, aten.slice.Tensor, aten.clamp.default}.isdisjoint(n.target for n in gm.graph.nodes)
    assert ctx.report.passes[1].rewrites == {"grouped_gemm": 2, "fused_grouped_clamped_swiglu": 1,
                                             "fused_grouped_bias": 2, "padded_gemm": 1}
    for m in (1, 9, 40):
        x = torch.randn(m, K, generator=torch.Generator().manual_seed(m))
        torch.testing.assert_close(compiled(x, *weights), fn(x, *weights), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["gate_odd", "gate_floor", "up_other_limit", "up_plus_two"])
def test_pass_leaves_an_activation_that_is_not_gpt_oss_s(variant: str) -> None:
    """One step off gpt-oss's activation (the gate in the odd columns, a floor on the gate, the
    up clamped to other bounds, `up + 2`) leaves it unfused, the biases still fused."""
    fn = _gpt_oss_experts(variant)
    weights = _gpt_oss_weights()
    compiled, gm, ctx = _compile(fn, torch.randn(9, K), *weights)
    assert ctx.report.passes[1].rewrites == {"grouped_gemm": 2, "fused_grouped_bias": 2, "padded_gemm": 1}
    x = torch.randn(17, K)
    torch.testing.assert_close(compiled(x, *weights), fn(x, *weights), rtol=1e-5, atol=1e-5)


# ---- More forms the bias and clamped-SwiGLU fusions must leave as they are

def _one_grouped_gemm_with_bias(variant: str, e: int = 4, cast: torch.dtype = torch.float32) -> Callable:
    """One grouped matmul plus a bias gathered by expert ids (`_biased_experts`' first half);
    each `variant` breaks the proof that the gather is each row's own expert's bias in one way
    the pass must see (the compiled graph must equal eager's in every case)."""
    import transformers.integrations.moe  # noqa: F401

    mm = torch.ops.transformers.grouped_mm_fallback

    def experts(x, router, w, bias, other_ids):
        scores = x @ router.T
        top = torch.topk(scores, 2, dim=-1).indices.reshape(-1)
        if variant == "topk_values":  # integer scores: top-k VALUES can be negative (bias[-1] wraps)
            top = torch.topk(scores.round().long().clamp(-e, e - 1), 2, dim=-1).values.reshape(-1)
        if variant == "split_piece":  # getitem 1 of a split, not of a topk: ids of any sign
            top = torch.split(torch.cat([other_ids, other_ids - 2]), other_ids.shape[0])[1]
        ids, perm = torch.sort(top)
        counted = perm if variant == "sort_indices" else ids  # the permutation, not the sorted ids
        lo, hi = (0, 2 * e - 1) if variant == "histc_max" else (0, e - 1)  # bins two ids wide
        offs = torch.cumsum(torch.histc(counted.to(cast), bins=e, min=lo, max=hi), dim=0, dtype=torch.int32)
        h = mm(x[perm // 2], w.transpose(-2, -1), offs=offs)
        gathered = bias[counted]
        if variant == "add_alpha":
            out = torch.add(h, gathered, alpha=2.0)
        else:
            out = h - gathered if variant == "sub" else h + gathered
        # Rows past offsets[-1] (negative ids leave some) have no value the kernels promise.
        return torch.where((torch.arange(out.shape[0]) < offs[-1])[:, None], out, 0.0)

    return experts


@pytest.mark.parametrize("variant", ["topk_values", "split_piece", "sort_indices", "histc_max", "add_alpha", "sub"])
def test_pass_leaves_other_bias_gathers_unfused(variant: str) -> None:
    """A bias gathered by ids the offsets do not provably group (top-k values, any tensor's
    piece, the sort's permutation, a histogram of wider bins) or combined otherwise than by a
    plain add (`alpha`, a subtraction) stays a gather: the compiled graph equals eager."""
    e = 4
    gen = torch.Generator().manual_seed(11)
    router, w = 3 * torch.randn(e, K, generator=gen), torch.randn(e, 8, K, generator=gen)
    bias = 10 * torch.randn(e, 8, generator=gen)
    m = 2 if variant == "sort_indices" else 9  # (2 tokens, 4 rows: the permutation stays below E)
    x = torch.randn(m, K, generator=gen)
    other = torch.randint(0, e, (2 * m,), generator=gen)
    fn = _one_grouped_gemm_with_bias(variant, e)
    compiled, gm, ctx = _compile(fn, x, router, w, bias, other)
    assert "fused_grouped_bias" not in ctx.report.passes[1].rewrites
    torch.testing.assert_close(compiled(x, router, w, bias, other), fn(x, router, w, bias, other), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cast, e", [(torch.bfloat16, 32), (torch.float16, 128)])
def test_a_histogram_of_ids_cast_to_a_narrow_float_is_not_proof(cast: torch.dtype, e: int) -> None:
    """histc bins its input in the input's dtype: ids cast to bfloat16 (32 experts, gpt-oss-20b's
    count) or float16 (128) land in a neighbour's bin, so the offsets' groups are not the ids'
    and a fused bias[e] differs from eager's bias[ids] on those rows."""
    ids = torch.arange(e)
    assert not torch.equal(torch.histc(ids.to(cast), bins=e, min=0, max=e - 1), torch.ones(e, dtype=cast))
    gen = torch.Generator().manual_seed(12)
    router, w = torch.randn(e, K, generator=gen), torch.randn(e, 8, K, generator=gen)
    bias = 10 * torch.randn(e, 8, generator=gen)
    x = torch.randn(64, K, generator=gen)
    fn = _one_grouped_gemm_with_bias("fused", e, cast)
    compiled, gm, ctx = _compile(fn, x, router, w, bias, torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(compiled(x, router, w, bias, torch.zeros(1, dtype=torch.long)),
                               fn(x, router, w, bias, torch.zeros(1, dtype=torch.long)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["rows", "step4", "short", "tanh", "sigmoid_of_sum", "glu_sum", "tip_sum",
                                     "negative_limit"])
def test_pass_leaves_more_activations_that_are_not_gpt_oss_s(variant: str) -> None:
    """Slices of rows, of every 4th column or short of the end, tanh for the sigmoid, `gate +
    alpha` in it, a sum for either product, a negative limit: left unfused (the bias still
    fused), and equal to eager."""
    fn = _gpt_oss_experts(variant, limit=-1.0 if variant == "negative_limit" else 2.0)
    weights = _gpt_oss_weights()[:3]
    compiled, gm, ctx = _compile(fn, torch.randn(9, K), *weights)
    assert ctx.report.passes[1].rewrites == {"grouped_gemm": 1, "fused_grouped_bias": 1, "padded_gemm": 1}
    x = torch.randn(17, K)
    torch.testing.assert_close(compiled(x, *weights), fn(x, *weights), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha, limit", [(1.0, 7.0), (-0.5, 0.25)])
def test_pass_takes_gpt_oss_s_alpha_and_limit_from_the_graph(alpha: float, limit: float) -> None:
    """The fused node carries the graph's own alpha and limit (not gpt-oss's 1.702 and 7)."""
    fn = _gpt_oss_experts(alpha=alpha, limit=limit)
    weights = _gpt_oss_weights()[:3]
    compiled, gm, ctx = _compile(fn, torch.randn(9, K), *weights)
    node = next(n for n in gm.graph.nodes if n.target is GROUPED)
    assert node.args[3] == "clamped_swiglu" and node.args[8:] == (alpha, limit)
    for m in (1, 17):
        x = torch.randn(m, K, generator=torch.Generator().manual_seed(m))
        torch.testing.assert_close(compiled(x, *weights), fn(x, *weights), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target, dtype", [("reference", torch.float32), ("triton", torch.float32),
                                           ("ascend-cpu", torch.float16)])
def test_clamped_swiglu_keeps_nan_and_clamps_inf_as_torch_clamp_does(target: str, dtype: torch.dtype) -> None:
    """torch.clamp keeps a NaN (a minimum or maximum that prefers the number would not) and
    clamps an infinity to the limit: a NaN gate or up gives a NaN output, an infinite gate or
    up a finite one."""
    alpha, limit = 1.702, 2.0
    sizes = GROUP_SIZES[3]
    spec = grouped_gemm_spec(dtype=dtype, out_dtype=dtype, n=N, k=K, experts=3, tile=TileConfig(16, 32, 16),
                             activation="clamped_swiglu", has_bias=True, clamp=(alpha, limit))
    kernel = _kernel(target, spec)
    dev = _device(target)
    x, w, offsets = _inputs(sizes, 2 * N, dtype, 21, False)
    bias = torch.randn(3, 2 * N, generator=torch.Generator().manual_seed(21)).to(dtype)
    bias[:, 4], bias[:, 7] = float("nan"), float("nan")  # gate 2, up 3
    bias[:, 8], bias[:, 11] = float("inf"), -float("inf")  # gate 4, up 5
    bias[:, 12], bias[:, 13] = -float("inf"), float("inf")  # gate 6 (to 0 after the sigmoid), up 6
    out = torch.zeros((x.shape[0], N), dtype=dtype, device=dev)
    kernel(x.to(dev), w.to(dev), offsets.to(dev), bias.to(dev), out=out)
    ref = _clamped_swiglu(_reference(x, w, offsets, "none", bias), alpha, limit)
    out = out.cpu()
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), torch.isnan(out).any(0)
    assert torch.isnan(out[:, 2:4]).all() and torch.isfinite(out[:, 4:6]).all()
    finite = ~torch.isnan(ref)
    torch.testing.assert_close(out[finite].double(), ref[finite], rtol=TOL[str(dtype).removeprefix("torch.")] * 10,
                               atol=1e-2)


@pytest.mark.parametrize("target", ["reference", "triton"])
def test_a_strided_expert_bias_is_read_by_its_strides(target: str) -> None:
    """A bias that is a transposed view ([2N, E] stored, [E, 2N] seen; and [N, E] for no
    activation): its rows are not consecutive, the kernels must not read them as if they were."""
    dev = _device(target)
    gen = torch.Generator().manual_seed(22)
    sizes = [4, 0, 19, 1]
    x = torch.randn(sum(sizes), K, generator=gen)
    with tileflow.use_config(tileflow.Config(target=target)):
        for activation, rows in (("clamped_swiglu", 2 * N), ("none", N)):
            w = torch.randn(4, rows, K, generator=gen)
            bias = (2 * torch.randn(rows, 4, generator=gen)).t()
            assert bias.stride(-1) != 1
            clamp = {"alpha": 1.702, "limit": 2.0} if activation == "clamped_swiglu" else {}
            out = tileflow.ops.grouped_gemm(x.to(dev), w.to(dev), _offsets(sizes).to(dev), activation=activation,
                                            bias=bias.to(dev), **clamp)
            acc = _reference(x, w, _offsets(sizes), "none", bias)
            ref = _clamped_swiglu(acc, 1.702, 2.0) if clamp else acc
            _assert_close(out.cpu(), ref, torch.float32)


def test_clamped_swiglu_refuses_a_limit_that_clamps_nothing() -> None:
    """limit = inf (a clamp that clamps nothing: another activation, not gpt-oss's) is refused by
    the op and the spec, and the pass leaves such a graph unfused, rather than generating kernel
    source that spells it `inf`."""
    x, w = torch.randn(9, K), torch.randn(3, 2 * N, K)
    with pytest.raises(ValueError, match="finite positive limit"):
        tileflow.ops.grouped_gemm(x, w, _offsets([3, 0, 6]), activation="clamped_swiglu", alpha=1.702, limit=float("inf"))
    spec = grouped_gemm_spec(dtype=torch.float32, out_dtype=torch.float32, n=N, k=K, experts=3,
                             tile=TileConfig(16, 32, 32), activation="clamped_swiglu", clamp=(1.702, float("inf")))
    with pytest.raises(ValueError, match="finite positive limit"):
        check_gemm_spec(spec, ("float32",), "reference", 1, op="grouped_gemm")
    fn = _gpt_oss_experts(limit=float("inf"))
    weights = _gpt_oss_weights()[:3]
    compiled, _, ctx = _compile(fn, torch.randn(9, K), *weights)
    assert "fused_grouped_clamped_swiglu" not in ctx.report.passes[1].rewrites
    x = torch.randn(13, K)
    torch.testing.assert_close(compiled(x, *weights), fn(x, *weights), rtol=1e-5, atol=1e-5)


def test_swiglu_fuses_across_a_fill_that_zeroes_whole_rows() -> None:
    """transformers 5.17 zeroes expert-parallel sentinel rows between the gate/up experts and
    the SwiGLU (`masked_fill(out, ids >= E, 0)`, a [M, 1] mask): the SwiGLU was left unfused (and
    Mixtral's on a device with 5.17 ran as three more ops). Zeroed rows stay zero through
    silu(gate) * up, so the fill moves after the fused kernel; a fill of single elements or of
    another value still blocks the fusion."""
    import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)

    gate_up, down = torch.randn(4, 2 * 24, K) / K**0.5, torch.randn(4, K, 24) / 24**0.5

    def experts(x, offs, ids, gate_up, down, value=0.0, per_element=False):
        h = torch.ops.transformers.grouped_mm_fallback(x, gate_up.transpose(-2, -1), offs=offs)
        sentinel = ids >= 3  # rows routed to expert 3 play the sentinels here
        h = h.masked_fill(sentinel[:, None] & (torch.arange(48) < 30) if per_element else sentinel[:, None], value)
        gate, up = h.chunk(2, dim=-1)
        return torch.ops.transformers.grouped_mm_fallback(F.silu(gate) * up, down.transpose(-2, -1), offs=offs)

    def routed(m: int, seed: int) -> tuple[torch.Tensor, ...]:
        x, offs = _moe_inputs(m, seed=seed)
        ids = torch.repeat_interleave(torch.arange(4), torch.diff(offs, prepend=offs.new_zeros(1)).long())
        torch._dynamo.mark_dynamic(ids, 0)  # as x's rows (`_compile` marks x's)
        return x, offs, ids

    compiled, gm, ctx = _compile(experts, *routed(9, 0), gate_up, down)
    assert ctx.report.passes[1].rewrites == {"grouped_gemm": 2, "fused_grouped_swiglu": 1}
    assert [n.args[3] for n in gm.graph.nodes if n.target is GROUPED] == ["swiglu", "none"]
    for m in (3, 9, 40):
        inputs = routed(m, m)
        torch.testing.assert_close(compiled(*inputs, gate_up, down), experts(*inputs, gate_up, down), rtol=1e-5, atol=1e-5)
    for kwargs in ({"value": 1.0}, {"per_element": True}):
        torch._dynamo.reset()
        _, _, ctx = _compile(lambda *a: experts(*a, **kwargs), *routed(9, 0), gate_up, down)
        assert ctx.report.passes[1].rewrites == {"grouped_gemm": 2}, kwargs


def test_plan_of_top_k_routed_rows_covers_k_rows_per_token() -> None:
    """Top-2 routing hands the experts 2T rows for T tokens: max_tokens caps T, so the plan covers
    up to 2 * max_tokens rows (ceil(2 * 512 / E) per expert), not max_tokens."""
    import transformers.integrations.moe  # noqa: F401

    w = torch.randn(4, 24, K) / K**0.5

    def top2(h, offs):
        return torch.ops.transformers.grouped_mm_fallback(h.repeat(2, 1), w.transpose(-2, -1), offs=offs)

    x, offs = _moe_inputs(18)
    compiled, gm, _ = _compile(top2, x[:9], offs)
    [node] = [n for n in gm.graph.nodes if n.target is GROUPED]
    plan = decode_plan(node.args[5])
    assert (plan.m_min, plan.m_max) == (1, math.ceil(2 * 512 / 4))
    torch.testing.assert_close(compiled(x[:9], offs), top2(x[:9], offs), rtol=1e-5, atol=1e-5)


def test_pass_rewrites_aten_grouped_mm_and_keeps_what_it_cannot_take() -> None:
    # aten._grouped_mm takes bfloat16 only. [E, K, N] weights that are no transpose of a
    # parameter: the pass reads a transposed view of them.
    w_kn = torch.randn(4, K16, 24).bfloat16()

    def fn(x, offs, w):
        good = torch._grouped_mm(x, w, offs=offs)
        as_int64 = torch.ops.transformers.grouped_mm_fallback(x, w, offs=offs.long())
        return good, as_int64

    import transformers.integrations.moe  # noqa: F401

    x, offs = _moe_inputs(10, k=K16)
    compiled, gm, ctx = _compile(fn, x.bfloat16(), offs, w_kn)
    [node] = [n for n in gm.graph.nodes if n.target is GROUPED]
    assert node.args[1].target is aten.transpose.int and node.args[3] == "none"
    [fallback] = ctx.report.fallbacks
    assert "offsets must be a 1-D int32 tensor, got torch.int64" in fallback.reason
    for m in (5, 33):
        x, offs = _moe_inputs(m, seed=m, k=K16)
        x = x.bfloat16()
        for got, want in zip(compiled(x, offs, w_kn), fn(x, offs, w_kn)):
            torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1.6e-2)


def test_pass_fallback_reasons_on_a_traced_graph() -> None:
    """A `_grouped_mm` with a bias (added to the traced graph by hand: `_grouped_mm` itself rejects
    a bias today) stays as it is, with the reason; the batched one (3-D, no offsets) beside it
    becomes a batched grouped GEMM."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from passes.gemm_padding import GemmPadding
    from tileflow.config import Config
    from tileflow.report import GraphReport

    def fn(x, x3, offs, w, b):
        return torch._grouped_mm(x, w, offs=offs), torch._grouped_mm(x3, w)

    bf16 = torch.bfloat16  # the only dtype aten._grouped_mm takes
    gm = make_fx(fn, tracing_mode="fake")(
        torch.randn(10, K16, dtype=bf16), torch.randn(4, 6, K16, dtype=bf16), torch.tensor([2, 5, 5, 10], dtype=torch.int32),
        torch.randn(4, K16, 24, dtype=bf16), torch.randn(4, 24, dtype=bf16),
    )
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    grouped = [n for n in gm.graph.nodes if n.target is aten._grouped_mm.default]
    grouped[0].args = (*grouped[0].args[:3], placeholders[4])  # bias
    ctx = PassContext(config=Config(), report=GraphReport(graph_id="g"))
    result = GemmPadding().run(gm, ctx)
    [fallback] = result.fallbacks
    assert "own bias argument is not supported" in fallback.reason and result.rewrites["grouped_gemm"] == 1
    [batched] = [n for n in gm.graph.nodes if n.target is GROUPED]
    assert batched.args[0] is placeholders[1] and batched.args[2] is None


@pytest.mark.parametrize("target", ["reference", "triton"])
def test_llama4_experts_run_as_batched_grouped_gemms(target: str) -> None:
    """Llama-4 runs every token through every expert (a `bmm` of [E, T, K] rows over stacked
    weights): each MoE layer's gate/up and down experts become batched grouped GEMMs, the gate/up
    one with `up * silu(gate)` fused, nothing left with a reason, equal to eager at every length
    on one graph."""
    model = MOE["llama4"]().eval()
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"target": target}, report=report), dynamic=True)
    with torch.no_grad():
        # Two lengths prove one graph; on the reference target a third past the attention chunk of 8
        # (SEQ_LENS' other lengths add no path).
        for seq_len in SEQ_LENS[:2] if target == "triton" else (*SEQ_LENS[:2], 13):
            ids = torch.randint(0, VOCAB, (2, seq_len))
            torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                       rtol=1e-4, atol=1e-4)
    assert len(report.graphs) == 1 and report.recompiles == 0
    assert report.rewrites["grouped_gemm"] == 4 and report.rewrites["fused_grouped_swiglu"] == 2
    assert not report.fallbacks, report.fallbacks


@pytest.mark.parametrize("target", ["reference", "triton"])
def test_llama4_experts_run_as_batched_grouped_gemms_in_a_static_compile(target: str) -> None:
    """Under dynamic=False (and in Dynamo's first, static compile) Llama-4's expert bmms stayed
    bmms, with no word in the report: the pass told token rows only by a symbolic size. Its
    experts are the model's parameters: each MoE layer's gate/up and down experts become batched
    grouped GEMMs (gate/up with `up * silu(gate)` fused), each planned for the graph's static T
    rows per expert as one piece, nothing left with a reason, equal to eager."""
    torch.manual_seed(0)
    model = MOE["llama4"]().eval()
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"target": target}, report=report), dynamic=False)
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                   rtol=1e-4, atol=1e-4)
    [graph] = report.graphs
    assert not graph.symbols  # a static graph
    assert report.rewrites["grouped_gemm"] == 4 and report.rewrites["fused_grouped_swiglu"] == 2
    assert not report.fallbacks, report.fallbacks
    plans = [p for p in graph.plans if p["op"] == "grouped_gemm"]
    assert plans and all((p["m_min"], p["m_max"]) == (2 * 7, 2 * 7) and len(p["pieces"]) == 1 for p in plans)


@pytest.mark.parametrize("target", ["reference", "triton"])
def test_kernel_writes_only_its_rows_and_reads_strided_offsets(target: str) -> None:
    """`out` a window of a bigger buffer: each group's tail tile is masked at the group's end
    row, so the last group's (which ends at M, inside a tile) writes nothing past M; and the
    offsets may be a strided view (the kernels read them by value: the launch copies them)."""
    spec = grouped_gemm_spec(dtype=torch.float32, out_dtype=torch.float32, n=N, k=K, experts=3, tile=TileConfig(16, 32, 32))
    kernel = _kernel(target, spec)
    dev = _device(target)
    x, w, offsets = _inputs(GROUP_SIZES[3], N, torch.float32, 7, True)
    m = x.shape[0]
    strided = torch.zeros(2 * len(offsets), dtype=torch.int32)[::2].copy_(offsets)
    assert not strided.is_contiguous()
    buf = torch.full((m + 16, N + 8), -7.0, device=dev)
    out = buf[:m, :N]
    assert kernel(x.to(dev), w.to(dev), strided.to(dev), out=out) is out
    _assert_close(out.cpu(), _reference(x, w, offsets, "none"), torch.float32)
    assert torch.all(buf[m:] == -7.0) and torch.all(buf[:, N:] == -7.0), "a write past the groups' rows or N"


class _FirstSlotsOnly:
    """Stands in for a `@triton.jit` kernel: launches the first `slots` M slots of each grid."""

    def __init__(self, kernel_fn, slots: int) -> None:
        self.kernel_fn, self.slots = kernel_fn, slots

    def __getitem__(self, grid: tuple[int, ...]):
        return self.kernel_fn[(self.slots, *grid[1:])]


@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="slot order is the interpreter's; the window test covers a GPU")
def test_triton_tail_tile_is_masked_at_its_own_groups_end_row() -> None:
    """Each group's tail tile stops at that group's end row, not at M. The interpreter runs slots in
    order, so a later group's tiles overwrite whatever an earlier tail tile wrote into its rows (with
    the wrong expert's weights; on a GPU the two race): launching only the first slots shows it.
    Groups of 5, 0 and 20 rows with 16-row tiles: slot 0 is rows 0:5 (expert 0), slot 1 rows 5:21
    and slot 2 rows 21:25 (expert 2, past the empty expert 1)."""
    from tileflow.backends.triton.grouped_gemm import make_grouped_gemm_launcher

    spec = grouped_gemm_spec(dtype=torch.float32, out_dtype=torch.float32, n=N, k=K, experts=3, tile=TileConfig(16, 32, 32))
    kernel_fn = get_kernel("triton", spec).launch.kernel
    x, w, offsets = _inputs([5, 0, 20], N, torch.float32, 10, True)
    ref = _reference(x, w, offsets, "none")
    for slots, written in ((1, 5), (2, 21), (3, 25)):
        out = torch.full((25, N), float("nan"))
        make_grouped_gemm_launcher(spec, _FirstSlotsOnly(kernel_fn, slots))(x, w, offsets, out=out)
        _assert_close(out[:written], ref[:written], torch.float32)
        assert torch.isnan(out[written:]).all(), f"the first {slots} slots wrote rows past {written}"


def test_ascend_kernel_masks_each_group_tail_at_its_end_row() -> None:
    """The Ascend kernel's out must be contiguous, so the window test above cannot run on it: here
    x holds rows past offsets[-1], which stay unwritten, and over 3 blocks tiles of later slots
    run before earlier ones (blocks run in turn), so a group's tail tile that wrote past its own
    end row (into the next group's rows, with its own expert's weight) would be caught."""
    from tileflow.backends.ascend import build_cpu_debug_kernel

    spec = grouped_gemm_spec(dtype=torch.float32, out_dtype=torch.float32, n=N, k=K, experts=3, tile=TileConfig(16, 32, 32))
    kernel = build_cpu_debug_kernel(spec, [ASCEND_HEADERS])
    x, w, offsets = _inputs(GROUP_SIZES[3] + [4], N, torch.float32, 9, True)
    w, offsets = w[:3], offsets[:3]  # x keeps 4 rows past the last group
    rows = int(offsets[-1])
    assert x.shape[0] == rows + 4
    for num_programs in (None, 3):
        out = torch.full((x.shape[0], N), float("nan"))
        assert kernel(x, w, offsets, out=out, num_programs=num_programs) is out
        _assert_close(out[:rows], _reference(x[:rows], w, offsets, "none"), torch.float32)
        assert torch.isnan(out[rows:]).all(), f"rows past offsets[-1] were written (num_programs={num_programs})"


def test_plan_range_is_the_rows_per_expert_of_the_m_range() -> None:
    """A grouped plan is keyed by ceil(M / E): both ends of a compile-time M range map to it (an
    unmapped m_min of 64 with E = 8 planned [64, 64] where dispatch asks for 8 to 64)."""
    from tileflow.runtime import grouped_gemm_plan

    plan = grouped_gemm_plan(64, 64, 8, torch.float32, "reference", "cpu", m_min=64, m_max=512)
    assert (plan.m_min, plan.m_max) == (expected_group_rows(64, 8), expected_group_rows(512, 8)) == (8, 64)


def test_eager_dispatch_picks_the_tile_of_the_rows_per_expert(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dispatch key is ceil(M / E), the rows one expert gets: M = 64 over 8 experts runs the
    plan's tile for 8 rows, not the one for 64 (a different tile in this plan)."""
    from tileflow import runtime
    from tileflow.config import current_config

    built: list[KernelSpec] = []
    real = runtime.get_kernel
    monkeypatch.setattr(runtime, "get_kernel", lambda target, spec, *a: built.append(spec) or real(target, spec, *a))
    e, m, n, k = 8, 64, 64, 32
    x, w = torch.randn(m, k), torch.randn(e, n, k)
    offsets = torch.arange(1, e + 1, dtype=torch.int32) * (m // e)
    with tileflow.use_config(tileflow.Config(target="reference")):
        out = tileflow.ops.grouped_gemm(x, w, offsets)
        plan = runtime.grouped_gemm_plan(n, k, e, torch.float32, "reference", "cpu",
                                         m_max=current_config().max_tokens * e)
    want_tile = plan.piece_for(expected_group_rows(m, e)).config
    assert want_tile != plan.piece_for(m).config
    assert [spec.tile for spec in built] == [want_tile]
    torch.testing.assert_close(out, torch.bmm(x.view(e, m // e, k), w.transpose(1, 2)).reshape(m, n))


def test_rows_per_expert_past_the_plan_warn_as_rows_per_expert(caplog: pytest.LogCaptureFixture) -> None:
    """A grouped GEMM's plan covers rows per expert, ceil(M / E): past it, the warning said
    "grouped_gemm M=8" for M = 32 rows over 4 experts (8 rows each), a row count the call never had.
    It names the rows per expert, and M and E. (An eager call plans up to max_tokens rows per
    expert: 80 rows over 4 experts, 20 each, are past max_tokens = 16.)"""
    from tileflow import runtime

    runtime._WARNED_RANGE.clear()
    x, w = torch.randn(80, 8), torch.randn(4, 8, 8)
    offsets = torch.tensor([20, 40, 60, 80], dtype=torch.int32)
    with tileflow.use_config(tileflow.Config(target="reference", max_tokens=16)), caplog.at_level("WARNING"):
        out = tileflow.ops.grouped_gemm(x, w, offsets)
    torch.testing.assert_close(out, torch.bmm(x.view(4, 20, 8), w.transpose(1, 2)).reshape(80, 8))
    [warning] = [r.getMessage() for r in caplog.records if "outside its plan's range" in r.getMessage()]
    assert "rows per expert ceil(M / E) = ceil(80 / 4) = 20 is outside its plan's range [1, 16]" in warning, warning
    assert "M=20" not in warning


@pytest.mark.parametrize("batched", [False, True])
def test_an_eager_call_plans_the_rows_routing_hands_the_experts(batched: bool, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Top-2 routing hands 4 experts 2T rows for T = max_tokens tokens, and a batched call gives
    each expert all T: the eager plan covered max_tokens rows in all (4 rows per expert at
    max_tokens = 16), so these calls warned and took the nearest piece. It covers max_tokens rows
    per expert: no warning, and each call runs the plan's tile for its rows per expert."""
    from tileflow import runtime

    built: list[KernelSpec] = []
    real = runtime.get_kernel
    monkeypatch.setattr(runtime, "get_kernel", lambda target, spec, *a: built.append(spec) or real(target, spec, *a))
    runtime._WARNED_RANGE.clear()
    e, tokens, k, n = 4, 16, 8, 8
    w = torch.randn(e, n, k)
    with tileflow.use_config(tileflow.Config(target="reference", max_tokens=tokens)), caplog.at_level("WARNING"):
        if batched:
            x = torch.randn(e, tokens, k)
            out, want = tileflow.ops.grouped_gemm(x, w), torch.bmm(x, w.transpose(1, 2))
        else:
            x = torch.randn(2 * tokens, k)
            offsets = torch.tensor([8, 16, 24, 32], dtype=torch.int32)
            out, want = tileflow.ops.grouped_gemm(x, w, offsets), torch.bmm(x.view(e, 8, k), w.transpose(1, 2)).reshape(32, n)
        plan = runtime.grouped_gemm_plan(n, k, e, torch.float32, "reference", "cpu", m_max=tokens * e)
    torch.testing.assert_close(out, want)
    assert not [r for r in caplog.records if "outside its plan's range" in r.getMessage()]
    per_expert = tokens if batched else 8
    assert (plan.m_min, plan.m_max) == (1, tokens) and [s.tile for s in built] == [plan.piece_for(per_expert).config]


@pytest.mark.parametrize("approximate,gated", [("tanh", "geglu_tanh"), ("none", "geglu")])
def test_pass_rewrites_experts_with_a_gelu_gate(approximate: str, gated: str) -> None:
    """MoE experts whose gate goes through a GELU (exact or tanh) fuse like SwiGLU's: one gated
    grouped GEMM of N = half the stacked rows, its plan marked gated (two weight tiles)."""
    import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)

    gate_up, down = torch.randn(4, 2 * 24, K) / K**0.5, torch.randn(4, K, 24) / 24**0.5

    def experts(x, offs, gate_up, down):
        h = torch.ops.transformers.grouped_mm_fallback(x, gate_up.transpose(-2, -1), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        act = F.gelu(gate, approximate=approximate)
        return torch.ops.transformers.grouped_mm_fallback(act * up, down.transpose(-2, -1), offs=offs)

    x, offs = _moe_inputs(9)
    compiled, gm, ctx = _compile(experts, x, offs, gate_up, down)
    assert [n.args[3] for n in gm.graph.nodes if n.target is GROUPED] == [gated, "none"]
    assert ctx.report.passes[1].rewrites == {"grouped_gemm": 2, f"fused_grouped_{gated}": 1}
    plans = {(p["n"], p["k"]): bool(p.get("gated")) for p in ctx.report.plans if p["op"] == "grouped_gemm"}
    assert plans == {(24, K): True, (K, 24): False}
    for m in (3, 9, 40):
        x, offs = _moe_inputs(m, seed=m)
        torch.testing.assert_close(compiled(x, offs, gate_up, down), experts(x, offs, gate_up, down), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["geglu", "geglu_tanh"])
def test_eager_op_with_a_gelu_gate(activation: str) -> None:
    """The eager grouped op halves a GELU-gated stacked weight as it does SwiGLU's."""
    x, w, offsets = _inputs([3, 0, 5], 2 * N, torch.float32, 7, True)
    with tileflow.use_config(tileflow.Config(target="reference")):
        out = tileflow.ops.grouped_gemm(x, w, offsets, activation=activation)
    assert out.shape == (8, N)
    _assert_close(out, _reference(x, w, offsets, activation), torch.float32)


def test_expert_weights_given_as_inputs_are_rewritten_once_static() -> None:
    """Under dynamic=True the experts' weights passed as arguments have symbolic E, N and K:
    the grouped matmuls stay as they were, the reason naming `mark_static`; marked static they
    are rewritten, with the SwiGLU fused, in one graph over every row count (each eager's)."""
    import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)

    def experts(x, offs, gate_up, down):
        h = torch.ops.transformers.grouped_mm_fallback(x, gate_up.transpose(-2, -1), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        return torch.ops.transformers.grouped_mm_fallback(F.silu(gate) * up, down.transpose(-2, -1), offs=offs)

    gate_up, down = torch.randn(4, 2 * 24, K) / K**0.5, torch.randn(4, K, 24) / 24**0.5
    for static in (False, True):
        compiled, report = compiled_dynamic(experts, (gate_up, down) if static else ())
        for m in (5, 9, 40):
            x, offs = _moe_inputs(m, seed=m)
            torch.testing.assert_close(compiled(x, offs, gate_up, down), experts(x, offs, gate_up, down),
                                       rtol=1e-5, atol=1e-5)
        assert len(report.graphs) == 1
        if static:
            assert not report.fallbacks and report.rewrites["fused_grouped_swiglu"] == 1, report.fallbacks
        else:
            assert "grouped_gemm" not in report.rewrites and len(report.fallbacks) == 2
            assert all("mark_static(weight)" in f.reason for f in report.fallbacks), report.fallbacks
