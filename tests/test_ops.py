"""tileflow's custom ops survive Dynamo, torch.export save/load and Inductor."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import tileflow
from tileflow.ops import padded_gemm


def gemm_block(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return padded_gemm(torch.relu(x), w, b, activation="silu") * 2


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(torch.relu(x).double() @ w.double().t() + b.double()).float() * 2


@pytest.fixture
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(9, 16), torch.randn(12, 16), torch.randn(12)


def test_eager_call(inputs) -> None:
    torch.testing.assert_close(gemm_block(*inputs), reference(*inputs), rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_clear() -> None:
    with pytest.raises(ValueError, match="K mismatch"):
        padded_gemm(torch.randn(3, 4), torch.randn(5, 6))
    with pytest.raises(ValueError, match="unknown activation"):
        padded_gemm(torch.randn(3, 4), torch.randn(5, 4), activation="relu6")
    with pytest.raises(ValueError, match="stacked as \\[2N, K\\]"):
        padded_gemm(torch.randn(3, 4), torch.randn(5, 4), activation="swiglu")


def test_empty_gemms_keep_the_operand_rules_and_split_biases() -> None:
    """The empty-dimension and no-row shortcuts skipped the dtype rules (an fp16 x with an fp32
    weight returned fp16, where F.linear and a non-empty call refuse), and a stacked SwiGLU weight
    of K = 0 with the gate's and up's biases apart crashed; zero experts divided by zero."""
    from tileflow.ops import grouped_gemm

    f = torch.nn.functional
    for x_shape, w_shape in (((3, 0), (4, 0)), ((0, 5), (4, 5))):
        with pytest.raises(ValueError, match="padded_gemm: weight must be float16, got float32"):
            padded_gemm(torch.randn(*x_shape, dtype=torch.float16), torch.randn(*w_shape))
    with pytest.raises(ValueError, match="grouped_gemm: weight must be float16, got float32"):
        grouped_gemm(torch.randn(4, 0).half(), torch.randn(2, 3, 0), torch.tensor([2, 4], dtype=torch.int32))
    b, b_up = torch.randn(4), torch.randn(4)
    out = padded_gemm(torch.randn(3, 0), torch.randn(8, 0), b, activation="swiglu", bias_up=b_up)
    torch.testing.assert_close(out, (f.silu(b) * b_up).expand(3, 4))
    with pytest.raises(ValueError, match="the last offset must equal x's row count M=5 .* got no offsets"):
        grouped_gemm(torch.randn(5, 4), torch.randn(0, 3, 4), torch.zeros(0, dtype=torch.int32))
    assert grouped_gemm(torch.randn(0, 4), torch.randn(0, 3, 4), torch.zeros(0, dtype=torch.int32)).shape == (0, 3)
    assert grouped_gemm(torch.randn(0, 4, 4), torch.randn(0, 3, 4)).shape == (0, 4, 3)


def test_a_launch_refuses_an_output_sharing_an_input_and_the_oracle_checks_its_spec() -> None:
    """`out=` aliasing x read its own products (314 off); the reference backend, the tests'
    oracle, ran specs the device backends refuse (two activations: only the first applied)."""
    from tileflow.kernel_spec import KernelSpec, TileConfig, make_params
    from tileflow.lower import gemm_spec
    from tileflow.runtime import get_kernel

    x, w = torch.randn(40, 40), torch.randn(40, 40)
    kernel = get_kernel("reference", gemm_spec(dtype=torch.float32, out_dtype=torch.float32, n=40, k=40,
                                               tile=TileConfig(16, 16, 16)))
    with pytest.raises(ValueError, match="out shares memory with x"):
        kernel(x, w, out=x)
    spec = KernelSpec("padded_gemm", "float32", "float32", TileConfig(16, 16, 16), ("silu", "gelu"), make_params(n=3, k=7))
    with pytest.raises(ValueError, match="at most one activation per GEMM epilogue"):
        get_kernel("reference", spec)(torch.randn(5, 7), torch.randn(3, 7))


@pytest.mark.parametrize("n, k", [(0, 4), (4, 0), (0, 0)])
@pytest.mark.parametrize("activation, separate_up", [("none", False), ("silu", False), ("gelu", False),
                                                     ("gelu_tanh", False), ("relu", False), ("relu2", False),
                                                     ("swiglu", False), ("swiglu", True)])
def test_gemms_with_an_empty_dimension_answer_as_linear_does(n: int, k: int, activation: str,
                                                             separate_up: bool) -> None:
    """N = 0 gives an empty result and K = 0 the epilogue of zero products (bias, activation,
    residual), as `F.linear` does; no tile plan covers an empty dimension, and they used to fail
    in tile planning."""
    f = torch.nn.functional
    m, stacked = 3, activation == "swiglu" and not separate_up
    x = torch.randn(m, k, dtype=torch.float64)
    w = torch.randn(2 * n if stacked else n, k, dtype=torch.float64)
    b = torch.randn(w.shape[0], dtype=torch.float64)
    w_up = torch.randn(n, k, dtype=torch.float64) if separate_up else None
    b_up = torch.randn(n, dtype=torch.float64) if separate_up else None
    residual = torch.randn(m, n, dtype=torch.float64)
    out = padded_gemm(x, w, b, activation=activation, residual=residual, weight_up=w_up, bias_up=b_up,
                      out_dtype=torch.float32)
    if activation == "swiglu":
        gate = f.linear(x, w[:n], b[:n]) if stacked else f.linear(x, w, b)
        up = f.linear(x, w[n:], b[n:]) if stacked else f.linear(x, w_up, b_up)
        want = f.silu(gate) * up
    else:
        act = {"none": lambda t: t, "silu": f.silu, "gelu": f.gelu,
               "gelu_tanh": lambda t: f.gelu(t, approximate="tanh"), "relu": lambda t: t.clamp_min(0),
               "relu2": lambda t: t.clamp_min(0) ** 2}[activation]
        want = act(f.linear(x, w, b))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (want + residual).float(), rtol=0, atol=1e-6)
    xg, wg = torch.randn(5, k), torch.randn(2, 2 * n if activation == "swiglu" else n, k)
    grouped = tileflow.ops.grouped_gemm(xg, wg, torch.tensor([2, 5], dtype=torch.int32), activation=activation)
    assert grouped.shape == (5, n) and not grouped.any()


def test_attention_ops_refuse_a_boolean_window() -> None:
    # The ops' schema would turn True into a window of 1.
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="meta_attention: sliding_window must be a positive int or None, got True"):
        tileflow.ops.meta_attention(q, q, q, causal=True, sliding_window=True)
    table, cu, lens = torch.zeros(1, 1, dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32), \
        torch.tensor([3], dtype=torch.int32)
    cache = torch.randn(1, 4, 2, 4)
    with pytest.raises(ValueError, match="meta_attention_varlen: sliding_window must be a positive int"):
        tileflow.ops.meta_attention_varlen(torch.randn(3, 2, 4), cache, cache, table, cu, lens, sliding_window=False)


def test_survives_dynamo(inputs) -> None:
    compiled = torch.compile(gemm_block, backend="eager", fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(*inputs), reference(*inputs), rtol=1e-5, atol=1e-5)
    x2 = torch.randn(23, 16)
    torch.testing.assert_close(compiled(x2, *inputs[1:]), reference(x2, *inputs[1:]), rtol=1e-5, atol=1e-5)


def test_survives_export_save_load(inputs, tmp_path: Path) -> None:
    class Block(torch.nn.Module):
        def forward(self, x, w, b):
            return gemm_block(x, w, b)

    m = torch.export.Dim("m", min=2, max=512)
    ep = torch.export.export(Block(), inputs, dynamic_shapes=({0: m}, None, None))
    assert any("tileflow.padded_gemm" in str(n.target) for n in ep.graph.nodes)
    path = tmp_path / "block.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    x2 = torch.randn(37, 16)
    torch.testing.assert_close(loaded.module()(x2, *inputs[1:]), reference(x2, *inputs[1:]), rtol=1e-5, atol=1e-5)


def test_survives_inductor(inputs) -> None:
    compiled = torch.compile(gemm_block, backend="inductor", dynamic=True)
    torch.testing.assert_close(compiled(*inputs), reference(*inputs), rtol=1e-4, atol=1e-4)


def test_tileflow_residual_inductor(inputs) -> None:
    report = tileflow.Report()
    backend = tileflow.TileflowBackend({"residual": "inductor"}, report=report)

    def fn(x, w, b):
        return torch.nn.functional.linear(x, w, b).sin() + gemm_block(x, w, b)

    compiled = torch.compile(fn, backend=backend, dynamic=True)
    for m in (9, 21):
        x = torch.randn(m, 16)
        torch.testing.assert_close(compiled(x, *inputs[1:]), fn(x, *inputs[1:]), rtol=1e-4, atol=1e-4)
    [graph] = report.graphs
    assert graph.residual == "inductor"


def _bad_op_calls() -> list[tuple[str, object]]:
    """Calls of the GEMM ops that eager refuses (by the op's check or a kernel's): name, thunk."""
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    gemm = torch.ops.tileflow.padded_gemm
    return [
        ("residual of another M", lambda: gemm(x, w, None, torch.randn(1, 5))),
        ("2-D bias", lambda: gemm(x, w, torch.randn(5, 1))),
        ("weight_up of another shape", lambda: gemm(x, w, None, None, "swiglu", None, "", "", torch.randn(6, 4))),
        ("weight_up without swiglu", lambda: gemm(x, w, None, None, "none", None, "", "", torch.randn(5, 4))),
        ("3-D x", lambda: gemm(torch.randn(2, 4, 4), w)),
        ("int64 offsets", lambda: torch.ops.tileflow.grouped_gemm(torch.randn(7, 4), torch.randn(2, 5, 4),
                                                                   torch.tensor([3, 7]))),
    ]


@pytest.mark.parametrize("case", range(len(_bad_op_calls())), ids=[name for name, _ in _bad_op_calls()])
def test_fake_implementations_refuse_what_eager_refuses(case: int) -> None:
    """Under torch.compile / torch.export only the fake implementation sees a call: each bad call
    eager refuses must fail there too, not trace to a wrong shape (a 3-D x came out [2, 5]) and
    fail, or misread, at run time."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with pytest.raises(ValueError):
        _bad_op_calls()[case][1]()
    with FakeTensorMode(), pytest.raises(ValueError):  # its tensors made in the mode: fake ones
        _bad_op_calls()[case][1]()


def test_fake_implementations_match_eager_shape_dtype_and_strides() -> None:
    """Inductor and export plan buffers from the fake result: its shape, dtype and strides must be
    the real op's (SwiGLU halves a stacked weight's rows; out_dtype; the batched grouped form keeps
    x's leading dims; dense attention comes out stored as [B, S, H, D])."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def calls():
        x, w, wg = torch.randn(3, 4), torch.randn(10, 4), torch.randn(2, 6, 4)
        q, kv = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 5, 8)
        qv, cache = torch.randn(5, 4, 8), torch.randn(3, 4, 2, 8)
        table, cu, lens = (torch.tensor([[0, 1], [2, 0]], dtype=torch.int32), torch.tensor([0, 3, 5], dtype=torch.int32),
                           torch.tensor([7, 4], dtype=torch.int32))
        return [
            lambda: torch.ops.tileflow.padded_gemm(x, w, None, None, "swiglu", torch.float64, "", "", None, None, False),
            lambda: torch.ops.tileflow.padded_gemm(x, w, torch.randn(10), torch.randn(3, 10), "silu", None, "", ""),
            lambda: torch.ops.tileflow.grouped_gemm(torch.randn(7, 4), wg, torch.tensor([3, 7], dtype=torch.int32),
                                                    "swiglu", torch.float64),
            lambda: torch.ops.tileflow.grouped_gemm(torch.randn(2, 3, 4), wg, None, "none", None),
            lambda: torch.ops.tileflow.meta_attention(q, kv, kv, None, True),
            lambda: torch.ops.tileflow.meta_attention_varlen(qv, cache, cache, table, cu, lens),
        ]

    want = [c() for c in calls()]
    with FakeTensorMode():
        got = [c() for c in calls()]
    for g, w in zip(got, want):
        assert (g.shape, g.dtype, g.stride()) == (w.shape, w.dtype, w.stride())


@pytest.mark.parametrize("slopes", [[float("nan"), 0.5], [0.5, float("inf")], torch.tensor([0.5, float("-inf")]), [0.5]])
def test_dense_attention_refuses_alibi_slopes_not_one_finite_number_per_head(slopes) -> None:
    """The dense op's slopes are numbers baked into the call: a NaN one came out as a NaN head
    instead of an error, and a short list would read past it."""
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="alibi_slopes must be 2 finite numbers"):
        tileflow.ops.meta_attention(q, q, q, causal=True, alibi_slopes=slopes)


def test_dense_attention_key_starts_past_int32_are_clamped_not_wrapped() -> None:
    """`key_starts` are clamped to [0, S_kv] before the int32 cast: a start of 2**32 hides every key
    (it wrapped to 0: every key seen) and one of 1 - 2**32 hides none (it wrapped to 1)."""
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    starts = torch.tensor([[2**32, 1 - 2**32, 2]])
    got = tileflow.ops.meta_attention(q, k, v, key_starts=starts)
    sees = torch.arange(5)[None, :] >= starts.clamp(0, 5)[0, :, None]
    want = torch.nn.functional.scaled_dot_product_attention(q[:, :, 1:], k, v, attn_mask=sees[1:])
    assert not got[:, :, 0].any()
    torch.testing.assert_close(got[:, :, 1:], want, rtol=1e-5, atol=1e-5)


def test_gemms_with_no_row_or_no_depth_keep_out_dtype_and_float64() -> None:
    """M = 0 still answers in `out_dtype` (it came back in x's dtype), and a float64 GEMM of K = 0
    is its bias exactly (an epilogue in float32 rounded it)."""
    for out_dtype in (torch.float64, torch.float16):
        out = padded_gemm(torch.randn(0, 5), torch.randn(4, 5), out_dtype=out_dtype)
        assert (out.shape, out.dtype) == ((0, 4), out_dtype)
    x, w, b = torch.randn(3, 0, dtype=torch.float64), torch.randn(4, 0, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    out = padded_gemm(x, w, b, residual=torch.zeros(3, 4, dtype=torch.float64))
    assert out.dtype == torch.float64 and torch.equal(out, b.expand(3, 4))


def test_dense_attention_softcap_runs_the_capped_kernel() -> None:
    """A softcap call runs the kernel built with soft-capping (its flag is part of the kernel's
    cache key) and caps the scaled scores: `softcap * tanh(scores / softcap)`."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 8, generator=gen) * s for s in (4, 4, 1))
    scores = 0.5 * torch.tanh(q.double() @ k.double().transpose(-1, -2) / math.sqrt(8) / 0.5)
    scores = scores.masked_fill(torch.ones(3, 3, dtype=torch.bool).triu(1), float("-inf"))
    with tileflow.use_config(tileflow.Config(target="reference")):
        got = tileflow.ops.meta_attention(q, k, v, causal=True, softcap=0.5)
    torch.testing.assert_close(got.double(), torch.softmax(scores, -1) @ v.double(), rtol=1e-5, atol=1e-5)
