"""tileflow's custom ops survive Dynamo, torch.export save/load and Inductor."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import tileflow
from tileflow.kernel_spec import KernelSpec
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
    with pytest.raises(ValueError, match="unknown activation") as error:
        padded_gemm(torch.randn(3, 4), torch.randn(5, 4), activation="relu6")
    # The names offered are the ones padded_gemm takes: not grouped_gemm's clamped_swiglu.
    assert "'swiglu'" in str(error.value) and "clamped_swiglu" not in str(error.value)
    with pytest.raises(ValueError, match="clamped_swiglu .* is a grouped_gemm activation only"):
        padded_gemm(torch.randn(3, 4), torch.randn(8, 4), activation="clamped_swiglu")
    with pytest.raises(ValueError, match="stacked as \\[2N, K\\]"):
        padded_gemm(torch.randn(3, 4), torch.randn(5, 4), activation="swiglu")


def test_bias_up_with_sibling_weights_is_refused() -> None:
    """bias_up belongs to a gated activation, which sibling weights cannot have: with
    more_weights it is refused as without them, never dropped silently."""
    x, w, w2, b, b2 = torch.randn(5, 8), torch.randn(6, 8), torch.randn(3, 8), torch.randn(6), torch.randn(3)
    with pytest.raises(ValueError, match="bias_up"):
        padded_gemm(x, w, b, more_weights=[w2], more_biases=[b2], bias_up=torch.randn(6))
    with pytest.raises(ValueError, match="bias_up"):
        padded_gemm(x, w, more_weights=[w2], bias_up=torch.randn(6))


@pytest.mark.parametrize("m, k", [(0, 8), (5, 0), (0, 0)])
def test_sibling_bias_dtype_is_checked_when_no_kernel_runs(m: int, k: int) -> None:
    """With no rows or K = 0 no kernel checks the operands, but the rules stay the kernels': a
    sibling's bias of another dtype is refused as it is when a kernel runs."""
    x, w, w2, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(3, 8), torch.randn(6)
    with pytest.raises(ValueError, match="bias must be float32, got float64"):  # what a kernel says
        padded_gemm(x, w, b, more_weights=[w2], more_biases=[torch.randn(3, dtype=torch.float64)])
    with pytest.raises(ValueError, match="bias of segment 1 must be float32, got float64"):
        padded_gemm(x[:m, :k], w[:, :k], b, more_weights=[w2[:, :k]], more_biases=[torch.randn(3, dtype=torch.float64)])


@pytest.mark.parametrize("bias", [False, True])
def test_sibling_weights_give_their_outputs_side_by_side(bias: bool) -> None:
    """`more_weights` (and `more_biases`): x @ cat(weights).T (+ cat(biases)), whatever the
    widths; a residual and an activation apply to the whole row; M = 0, N and K empty too."""
    x = torch.randn(13, 24)
    weights = [torch.randn(rows, 24) for rows in (20, 7, 12)]
    biases = [torch.randn(rows) for rows in (20, 7, 12)] if bias else [None]
    residual = torch.randn(13, 39)
    out = padded_gemm(x, weights[0], biases[0], more_weights=weights[1:], more_biases=biases[1:] or None,
                      activation="gelu", residual=residual)
    want = torch.nn.functional.gelu(torch.nn.functional.linear(
        x.double(), torch.cat(weights).double(), torch.cat(biases).double() if bias else None)) + residual.double()
    torch.testing.assert_close(out, want.float(), rtol=1e-5, atol=1e-5)
    assert padded_gemm(x[:0], weights[0], biases[0], more_weights=weights[1:], more_biases=biases[1:] or None).shape == (0, 39)
    empty = padded_gemm(x[:, :0], weights[0][:, :0], more_weights=[w[:, :0] for w in weights[1:]])
    torch.testing.assert_close(empty, torch.zeros(13, 39))
    no_columns = padded_gemm(x, weights[0], more_weights=[weights[1][:0], weights[2]])  # an empty segment
    torch.testing.assert_close(no_columns, torch.nn.functional.linear(x, torch.cat([weights[0], weights[2]])),
                               rtol=1e-5, atol=1e-5)


def test_sibling_gemms_on_ascend_are_computed_apart_and_copied_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ascend's GEMM kernels read one weight and write contiguous rows only: the runtime runs
    each segment by itself and copies it into its columns (a stand-in kernel that refuses a
    strided output, as Ascend's launcher does)."""
    from tileflow import runtime

    widths = []

    def ascend_kernel(target: str, spec: KernelSpec, artifact_dir: object = None):
        assert target == "ascend" and spec.param("segments") is None

        def launch(x, weight, bias=None, residual=None, *, out=None, **kwargs):
            assert out is None, "out must be contiguous (the kernel writes rows of N elements)"
            widths.append(spec.param("n"))
            return torch.nn.functional.linear(x, weight, bias)

        return launch

    monkeypatch.setattr(runtime, "get_kernel", ascend_kernel)
    x, weights, biases = torch.randn(6, 8), [torch.randn(rows, 8) for rows in (8, 4, 4)], [torch.randn(rows) for rows in (8, 4, 4)]
    out = runtime.run_padded_gemm(x, weights[0], biases[0], None, "none", torch.float32, "", "ascend",
                                  more_weights=weights[1:], more_biases=biases[1:])
    torch.testing.assert_close(out, torch.nn.functional.linear(x, torch.cat(weights), torch.cat(biases)))
    assert widths == [8, 4, 4]


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


def _fp32_gemm_spec(n: int, **options: object) -> KernelSpec:
    """The KernelSpec of an n x n float32 GEMM on 16 x 16 x 16 tiles (`options`: epilogue flags)."""
    from tileflow.kernel_spec import TileConfig
    from tileflow.lower import gemm_spec

    return gemm_spec(dtype=torch.float32, out_dtype=torch.float32, n=n, k=n, tile=TileConfig(16, 16, 16), **options)


def test_a_launch_refuses_an_output_sharing_an_input_and_the_oracle_checks_its_spec() -> None:
    """`out=` aliasing x read its own products (314 off); the reference backend, the tests'
    oracle, ran specs the device backends refuse (two activations: only the first applied)."""
    from tileflow.kernel_spec import TileConfig, make_params
    from tileflow.runtime import get_kernel

    x, w = torch.randn(40, 40), torch.randn(40, 40)
    kernel = get_kernel("reference", _fp32_gemm_spec(40))
    with pytest.raises(ValueError, match="out shares memory with x"):
        kernel(x, w, out=x)
    spec = KernelSpec("padded_gemm", "float32", "float32", TileConfig(16, 16, 16), ("silu", "gelu"), make_params(n=3, k=7))
    with pytest.raises(ValueError, match="at most one activation per GEMM epilogue"):
        get_kernel("reference", spec)(torch.randn(5, 7), torch.randn(3, 7))


def test_a_launch_refuses_an_output_sharing_a_separate_swiglu_up_weight_or_bias() -> None:
    """SwiGLU's up half may come as its own `weight_up` and `bias_up` tensors: an `out` sharing
    memory with either (read by every tile while others write) is refused like one sharing x."""
    from tileflow.runtime import get_kernel

    n = 8
    kernel = get_kernel("reference", _fp32_gemm_spec(n, activation="swiglu", has_bias=True))
    x, w, w_up, b, b_up = torch.randn(n, n), torch.randn(n, n), torch.randn(n, n), torch.randn(n), torch.randn(n)
    with pytest.raises(ValueError, match="out shares memory with weight_up"):
        kernel(x, w, b, out=w_up, weight_up=w_up, bias_up=b_up)
    with pytest.raises(ValueError, match="out shares memory with bias_up"):
        kernel(x[:1], w, b, out=b_up.view(1, n), weight_up=w_up, bias_up=b_up)
    out = torch.empty(n, n)
    assert kernel(x, w, b, out=out, weight_up=w_up, bias_up=b_up) is out


@pytest.mark.parametrize("extra", ["weight_up", "bias_up"])
def test_a_gemm_without_swiglu_refuses_an_up_operand(extra: str) -> None:
    """`weight_up` and `bias_up` belong to SwiGLU's up half: a GEMM with a bias and no SwiGLU
    refuses either one rather than ignore it."""
    from tileflow.runtime import get_kernel

    n = 8
    kernel = get_kernel("reference", _fp32_gemm_spec(n, has_bias=True))
    x, w, b = torch.randn(3, n), torch.randn(n, n), torch.randn(n)
    up = {"weight_up": torch.randn(n, n), "bias_up": torch.randn(n)}[extra]
    with pytest.raises(ValueError, match="weight_up/bias_up are for a gated epilogue"):
        kernel(x, w, b, **{extra: up})


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


@pytest.mark.parametrize("op", ["padded_gemm", "grouped_gemm", "meta_attention"])
def test_a_backward_through_an_op_fails_clearly_and_its_forward_still_runs(op: str) -> None:
    """The ops have no autograd formula. Called under grad mode on inputs that require grad,
    each still computes its output (the values of a no-grad call), which joins the autograd
    graph, and a backward through it raises naming the op: never gradients silently missing its
    contribution. Under no_grad the output is outside the graph."""
    torch.manual_seed(0)
    x, w, q = torch.randn(9, 16), torch.randn(12, 16), torch.randn(1, 2, 5, 8)
    xe, we = torch.randn(2, 3, 16), torch.randn(2, 4, 16)
    calls = {
        "padded_gemm": lambda grad: padded_gemm(x, w.requires_grad_(grad)),
        "grouped_gemm": lambda grad: tileflow.ops.grouped_gemm(xe, we.requires_grad_(grad), None),
        "meta_attention": lambda grad: tileflow.ops.meta_attention(q.requires_grad_(grad), q, q),
    }
    with torch.no_grad():
        want = calls[op](False)
    assert not want.requires_grad
    got = calls[op](True)
    assert got.requires_grad
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=0)
    if op == "padded_gemm":
        # A tensor of its own, modifiable in place as under custom_op (meta_attention's and the
        # batched grouped GEMM's outputs are views of their results' storage, which autograd
        # refuses to modify in place under grad mode, under custom_op too).
        got.add_(0)
    with pytest.raises(RuntimeError, match=f"backward through tileflow::{op}.*no autograd formula"):
        (got.float().sum() + (w.sum() if op == "padded_gemm" else 0)).backward()


def test_an_op_traced_with_fake_inputs_that_require_grad_joins_the_autograd_graph() -> None:
    """Tracing with fake tensors (Dynamo's fake propagation) sees the same: the fake output of an
    op over inputs that require grad requires grad."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(9, 16))
        w = mode.from_tensor(torch.randn(12, 16)).requires_grad_()
        assert torch.ops.tileflow.padded_gemm(x, w).requires_grad
        with torch.no_grad():
            assert not torch.ops.tileflow.padded_gemm(x, w).requires_grad


def test_a_compiled_backward_through_an_op_fails_clearly() -> None:
    """AOTAutograd (torch.compile's aot_eager and inductor backends) traces the op on functional
    wrappers of its inputs, whose requires_grad only the op's Autograd kernel sees: a module whose
    forward calls an op on a parameter, compiled and run under grad mode, fails naming the op
    (when compiling the backward, as custom_op's ops do) instead of training its other
    parameters with the op's weight silently left without a gradient."""

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(12, 16))
            self.head = torch.nn.Linear(12, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(padded_gemm(x, self.weight))

    compiled = torch.compile(Model(), backend="aot_eager")
    with pytest.raises(Exception, match="backward through tileflow::padded_gemm.*no autograd formula"):
        compiled(torch.randn(9, 16)).sum().backward()


def test_torch_func_grad_through_an_op_raises() -> None:
    """torch.func's grad wraps the inputs as AOTAutograd does: it raises (the op has no formula),
    never returns zeros for the op's inputs."""
    x, w = torch.randn(9, 16), torch.randn(12, 16)
    with pytest.raises(RuntimeError):
        torch.func.grad(lambda w: padded_gemm(x, w).sum())(w)


def test_an_op_under_grad_mode_runs_below_autograd() -> None:
    """Under grad mode an op's implementation records no autograd graph of its own: it keeps no
    tensors for a backward that never runs, takes weights made under inference_mode along with
    inputs that require grad, and its output (not a view) takes in-place ops, as custom_op's do."""
    x, w = torch.randn(64, 32, requires_grad=True), torch.randn(48, 32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = tileflow.ops.padded_gemm(x, w, activation="silu")
        tileflow.ops.meta_attention(torch.randn(1, 2, 8, 16, requires_grad=True), *[torch.randn(1, 2, 8, 16)] * 2,
                                    causal=True)
    assert saved == [] and out.requires_grad
    out += 1
    with torch.inference_mode():
        w_inference = torch.randn(48, 32)
    assert tileflow.ops.padded_gemm(x, w_inference).requires_grad


def test_the_ops_are_pt2_compliant() -> None:
    """Tagged as custom_op tags its ops: Dynamo's `only_allow_pt2_compliant_ops` would
    graph-break on them otherwise."""
    for name in ("padded_gemm", "grouped_gemm", "meta_attention_varlen", "meta_attention", "attention_mask_ranges"):
        assert torch.Tag.pt2_compliant_tag in getattr(torch.ops.tileflow, name).default.tags, name


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
        ("sibling weight of another K", lambda: gemm(x, w, None, None, "none", None, "", "", None, None, False,
                                                     [torch.randn(2, 5)])),
        ("sibling weights with a SwiGLU", lambda: gemm(x, torch.randn(10, 4), None, None, "swiglu", None, "", "", None,
                                                       None, False, [torch.randn(2, 4)])),
        ("a bias for the first weight only", lambda: gemm(x, w, torch.randn(5), None, "none", None, "", "", None, None,
                                                          False, [torch.randn(2, 4)])),
        ("a sibling bias of another width", lambda: gemm(x, w, torch.randn(5), None, "none", None, "", "", None, None,
                                                         False, [torch.randn(2, 4)], [torch.randn(3)])),
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


def test_the_kernel_cache_keeps_one_kernel_per_target() -> None:
    """One spec built for two targets gives two kernels, each built by its own target's backend:
    the target is part of the kernel cache's key (keyed by the spec alone, the second target got
    the first one's kernel)."""
    from tileflow.runtime import compiled_kernels, get_kernel

    spec = _fp32_gemm_spec(8)
    kernels = {target: get_kernel(target, spec) for target in ("reference", "triton")}
    assert {target: kernel.target for target, kernel in kernels.items()} == {"reference": "reference", "triton": "triton"}
    assert get_kernel("reference", spec) is kernels["reference"]  # built once per (target, spec)
    built = sorted(k.target for k in compiled_kernels("padded_gemm") if k.spec == spec)
    assert {"reference", "triton"} <= set(built) and len(built) == len(set(built))


def test_a_gemm_outside_its_plans_range_runs_the_nearest_piece() -> None:
    """A node's plan covers the M range it was compiled for; a call below or above it runs the
    nearest piece's kernel (with a warning), never fails. (Clamped only from above, an M below
    m_min asked the plan for a piece it has not: ValueError.)"""
    from tileflow.runtime import encode_plan, gemm_plan

    plan = encode_plan(gemm_plan(8, 16, torch.float32, "reference", "cpu", m_min=4, m_max=32))
    w = torch.randn(8, 16)
    for m in (2, 40):
        x = torch.randn(m, 16)
        out = torch.ops.tileflow.padded_gemm(x, w, None, None, "none", None, plan, "reference", None, None, False)
        torch.testing.assert_close(out, x @ w.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("softcap", [0.0, -1.0, float("inf")])
def test_attention_ops_refuse_a_softcap_that_is_not_positive_and_finite(softcap: float) -> None:
    """A soft-cap of 0 divides the scores by 0 (`softcap * tanh(scores / softcap)`: NaN rows, not
    an error); the varlen and the dense op refuse it, as they refuse negative and infinite ones."""
    q, cache = torch.randn(1, 2, 8), torch.randn(2, 4, 2, 8)
    table, cu, lens = (torch.tensor(v, dtype=torch.int32) for v in ([[0, 1]], [0, 1], [8]))
    with pytest.raises(ValueError, match="softcap must be a number > 0"):
        tileflow.ops.meta_attention_varlen(q, cache, cache.clone(), table, cu, lens, softcap=softcap)
    dense = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="softcap must be a number > 0"):
        tileflow.ops.meta_attention(dense, dense, dense, causal=True, softcap=softcap)


def test_a_windowed_varlen_call_builds_its_tasks_for_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """The varlen op builds its task table for the call's sliding window: a decode at position 63
    under a window of 8 reads only keys 56..63, and equals attention over them. (A table built
    without the window was refused by the kernel, whose masking it does not match.)"""
    import tileflow.runtime.attention as attention

    tables = []
    build = attention._attention_kernel

    def recording_kernel(*args, **kwargs):
        kernel = build(*args, **kwargs)

        def launch(*launch_args, **launch_kwargs):
            tables.append(launch_args[6])  # q, k_cache, v_cache, block_table, cu, lens, table
            return kernel(*launch_args, **launch_kwargs)
        return launch

    monkeypatch.setattr(attention, "_attention_kernel", recording_kernel)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=gen) for shape in ((1, 2, 8), (16, 4, 1, 8), (16, 4, 1, 8)))
    table = torch.arange(16, dtype=torch.int32)[None]
    cu, lens = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([64], dtype=torch.int32)
    with tileflow.use_config(tileflow.Config(target="reference")):
        got = tileflow.ops.meta_attention_varlen(q, k, v, table, cu, lens, sliding_window=8)
    (tasks,) = tables
    assert tasks.sliding_window == 8
    assert tasks.tasks[:, 4].min() >= 56 and tasks.tasks[:, 5].max() == 64
    keys, values = k.reshape(64, 8)[56:].double(), v.reshape(64, 8)[56:].double()
    want = torch.softmax(q.double() @ keys.t() / math.sqrt(8), -1) @ values
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_round_first_is_part_of_the_gemm_kernels_key() -> None:
    """`round_first` changes the kernel (a `round` entry in its epilogue), so it is part of the
    spec the runtime caches kernels by: the same float16 GEMM into float32 runs both ways in one
    process, 300 * 300 = 90000 rounded to float16 first (inf, as `F.linear(x, w).float()`) or not.
    (Left out of the spec, both calls ran the first-built kernel.)"""
    x, w = torch.full((3, 1), 300.0, dtype=torch.float16), torch.full((2, 1), 300.0, dtype=torch.float16)
    with tileflow.use_config(tileflow.Config(target="reference")):
        exact = padded_gemm(x, w, out_dtype=torch.float32)
        rounded = padded_gemm(x, w, out_dtype=torch.float32, round_first=True)
    assert exact.dtype == rounded.dtype == torch.float32
    assert torch.equal(exact, torch.full((3, 2), 90000.0)) and torch.isinf(rounded).all()


def test_a_batch_of_decodes_beside_prompts_fills_every_row() -> None:
    """A batch mixing decode-sized query runs and longer ones launches one kernel per tile height:
    every sequence's rows are written, by its own launch (with the decode launch dropped, the
    decodes' rows were never written: whatever `torch.empty` held)."""
    from tileflow.backends.reference.attention import attention_reference_dense

    gen = torch.Generator().manual_seed(3)
    q_lens, kv_lens = [1, 12, 2], [9, 12, 6]  # 1 and 2 rows fit a decode tile (8 positions at gqa 2)
    q = torch.randn(sum(q_lens), 4, 16, generator=gen)
    k_cache, v_cache = (torch.randn(8, 4, 2, 16, generator=gen) for _ in range(2))
    block_table = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 0]], dtype=torch.int32)
    cu = torch.tensor([0, 1, 13, 15], dtype=torch.int32)
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    batch = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, cu_seqlens_q=cu, seqlens_kv=lens)
    with tileflow.use_config(tileflow.Config(target="reference")):
        got = tileflow.ops.meta_attention_varlen(**batch)
    want = attention_reference_dense(**batch)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k_shape, v_shape", [((2, 2, 4, 8), (2, 2, 4, 8)), ((1, 2, 4, 8), (2, 2, 4, 8)),
                                              ((1, 2, 4, 8), (1, 2, 5, 8)), ((1, 2, 4, 8), (1, 2, 4, 4))])
def test_dense_attention_refuses_k_and_v_that_do_not_pair_with_q(k_shape: tuple, v_shape: tuple) -> None:
    """The dense op pairs batch row b of q with row b of k and v (one KV page each): a k and v of
    another batch were read short without a word (q [1, ...] over k [2, ...] attended k[0]
    alone, where SDPA broadcasts), and other mismatches raised about the paged cache the op
    builds inside (`v_cache shape [1, 5, 2, 8] differs ...`, a block_table out of range)."""
    q = torch.randn(1, 2, 3, 8)
    with tileflow.use_config(tileflow.Config(target="reference")):
        with pytest.raises(ValueError, match=r"meta_attention: k and v must be \[B=1, Hkv, S_kv, D=8\]"):
            tileflow.ops.meta_attention(q, torch.randn(*k_shape), torch.randn(*v_shape))
        with pytest.raises(ValueError, match=r"meta_attention: k and v must be \[B=2, Hkv, S_kv, D=8\]"):
            tileflow.ops.meta_attention(q.expand(2, 2, 3, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))


def test_dense_attention_names_its_own_shapes_for_inputs_of_the_wrong_rank() -> None:
    """q, k and v of three dims (the varlen op's layout) failed unpacking q's shape."""
    q, k, v = torch.randn(3, 2, 8), torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match=r"meta_attention: q, k and v must be 4-D \[B, H, S, D\]"):
        tileflow.ops.meta_attention(q, k, v)


@pytest.mark.parametrize("m, n, k", [(5, 8, 0), (5, 0, 16), (0, 8, 16)])
def test_empty_gemms_refuse_the_dtypes_no_kernel_has(m: int, n: int, k: int) -> None:
    """A GEMM of int64 operands or an int8 / bool `out_dtype` is refused when there is something
    to tile; with an empty dimension no kernel runs and the shortcut computed it anyway (an
    int64 or int8 result), so whether a call was valid hung on its sizes."""
    from tileflow.ops import grouped_gemm

    with pytest.raises(ValueError, match="padded_gemm: x must be one of .* got int64"):
        padded_gemm(torch.zeros(m, k, dtype=torch.long), torch.zeros(n, k, dtype=torch.long))
    for out_dtype in (torch.int8, torch.bool):
        with pytest.raises(ValueError, match="padded_gemm: out_dtype must be one of .* got"):
            padded_gemm(torch.randn(m, k), torch.randn(n, k), out_dtype=out_dtype)
    offsets = torch.tensor([m // 2, m], dtype=torch.int32)
    with pytest.raises(ValueError, match="grouped_gemm: x must be one of .* got int64"):
        grouped_gemm(torch.zeros(m, k, dtype=torch.long), torch.zeros(2, n, k, dtype=torch.long), offsets)
    with pytest.raises(ValueError, match="grouped_gemm: out_dtype must be one of .* got int8"):
        grouped_gemm(torch.randn(m, k), torch.randn(2, n, k), offsets, out_dtype=torch.int8)
