"""The nano-batch stream runtime (tileflow/runtime/streams.py) on the CPU.

`SimulatedStreams` runs each step's queued stream work in random interleavings that respect only
stream order and events — what streams on a GPU may do — so a schedule or runtime that forgets a
dependency produces wrong logits or a failed lookup here. CUDA-graph bucketing runs with a CPU
stand-in for the captured graph that, like a real one, replays into the same output memory and
reads the static inputs.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

import tileflow
import tileflow.runtime.nanobatch as nanobatch_runtime
from tileflow.runtime.attention import attention_programs
from tileflow.runtime.streams import CudaGraphBuckets, SimulatedStreams, grid_share, programs_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
from graph_doubles import ReplayOnCpu  # noqa: E402
from models import VOCAB, build, one_layer  # noqa: E402

PASSES = ("canonicalize", "attention", "gemm_padding", "nanobatch")


def _compile(model: torch.nn.Module, k: int) -> torch.nn.Module:
    return torch.compile(model, backend=tileflow.TileflowBackend({"passes": PASSES, "nano_batches": k}), dynamic=True)


def _use_executor(monkeypatch: pytest.MonkeyPatch, make) -> list:
    """Every nano-batch runner of the test runs on executors made by `make()`; returns them."""
    made: list = []

    def executor_for(self, device):
        made.append(make())
        return made[-1]

    monkeypatch.setattr(nanobatch_runtime.NanoBatchRunner, "_executor_for", executor_for)
    return made


# (GPT-2 in the extended run: Llama's interleavings take the same runtime paths.)
@pytest.mark.parametrize("name,k", [("llama", 3), pytest.param("gpt2", 2, marks=pytest.mark.extended)])
def test_random_interleavings_of_the_streams_equal_eager(monkeypatch: pytest.MonkeyPatch, name: str, k: int) -> None:
    torch.manual_seed(0)
    model = build(name)
    seeds = iter(range(1000))
    made = _use_executor(monkeypatch, lambda: SimulatedStreams(seed=next(seeds)))
    compiled = _compile(model, k)
    for tokens in (5, 9, 16):
        ids = torch.randint(0, VOCAB, (1, tokens))
        with torch.no_grad():
            expected = model(ids, use_cache=False).logits
            for _ in range(3):  # three interleavings of the same step
                got = compiled(ids, use_cache=False).logits
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert len(made) == 9
    assert any(ex.interleaved for ex in made), "the simulated streams never overlapped any work"
    assert all({s for s, _ in ex.trace} == {0, 1} for ex in made)  # compute and memory streams both ran


def test_a_schedule_without_its_events_goes_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    # The power of the test above: drop the cross-stream events and some interleaving must fail.
    torch.manual_seed(1)
    model = build("llama")
    original = nanobatch_runtime.NanoBatchRunner._build

    def without_events(self, sizes):
        schedule, order = original(self, sizes)
        return dataclasses.replace(schedule, events=[]), order

    monkeypatch.setattr(nanobatch_runtime.NanoBatchRunner, "_build", without_events)
    seeds = iter(range(1000))
    _use_executor(monkeypatch, lambda: SimulatedStreams(seed=next(seeds)))
    compiled = _compile(model, 3)
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    failures = 0
    for _ in range(8):
        try:
            with torch.no_grad():
                got = compiled(ids, use_cache=False).logits
            failures += not torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
        except (KeyError, RuntimeError, IndexError):
            failures += 1
    assert failures > 0


def test_grid_shares_scale_persistent_grids() -> None:
    assert programs_for(132) == 132
    with grid_share(0.25):
        assert programs_for(132) == 33
        assert attention_programs("reference", torch.device("cpu")) == 1
        with grid_share(1.0):
            assert programs_for(132) == 132
    assert programs_for(132) == 132
    with grid_share(0.001):
        assert programs_for(8) == 1  # never an empty grid
    with pytest.raises(ValueError, match=r"fraction of the device in \(0, 1\]"):
        with grid_share(1.5):
            pass


def test_cuda_graph_buckets_capture_once_per_bucket_and_cut_the_padding(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(2)
    model = one_layer(build("llama"))
    runners: list = []
    original_init = nanobatch_runtime.NanoBatchRunner.__init__

    def init(self, gm, plan, whole, **kwargs):
        kwargs.update(graph_buckets=(8, 16), graph_factory=ReplayOnCpu, executor=SimulatedStreams(seed=3))
        original_init(self, gm, plan, whole, **kwargs)
        runners.append(self)

    monkeypatch.setattr(nanobatch_runtime.NanoBatchRunner, "__init__", init)
    compiled = _compile(model, 2)
    for tokens in (3, 5, 8, 13, 16, 11, 20):
        ids = torch.randint(0, VOCAB, (1, tokens))
        with torch.no_grad():
            expected = model(ids, use_cache=False).logits
            got = compiled(ids, use_cache=False).logits
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    graphs = [r._graphs for r in runners]
    assert sum(g.captures for g in graphs) == 2  # one per bucket; 20 tokens ran uncaptured


def test_a_step_that_cannot_be_captured_runs_uncaptured() -> None:
    class Refuses:
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing")

    calls: list[int] = []

    def step(x):
        calls.append(x.shape[0])
        return x * 2

    buckets = CudaGraphBuckets(step, [0], (4,), lambda out: 0, graph_factory=Refuses)
    x = torch.arange(3.0)
    assert torch.equal(buckets(x), x * 2) and torch.equal(buckets(x), x * 2)
    assert calls == [3, 3] and buckets.captures == 0  # tried once, then never again
    with pytest.raises(ValueError, match="positive ints"):
        CudaGraphBuckets(step, [0], (), lambda out: 0)


def _graph_runners(monkeypatch: pytest.MonkeyPatch, buckets=(8, 16)) -> list:
    """Every nano-batch runner of the test captures through `ReplayOnCpu` on simulated streams."""
    runners: list = []
    original_init = nanobatch_runtime.NanoBatchRunner.__init__

    def init(self, gm, plan, whole, **kwargs):
        kwargs.update(graph_buckets=buckets, graph_factory=ReplayOnCpu, executor=SimulatedStreams(seed=5))
        original_init(self, gm, plan, whole, **kwargs)
        runners.append(self)

    monkeypatch.setattr(nanobatch_runtime.NanoBatchRunner, "__init__", init)
    return runners


def _cache_kwarg(model: torch.nn.Module) -> str:
    # transformers renames `past_key_values` to `cache`; accept either.
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output):
    return getattr(output, "cache", None) or output.past_key_values


def test_graphs_are_keyed_by_every_shape_and_replays_leave_earlier_outputs_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(6)
    model = one_layer(build("llama"))
    runners = _graph_runners(monkeypatch)
    compiled = _compile(model, 2)
    results = []
    for batch, tokens in ((2, 5), (3, 6), (2, 7), (3, 5)):  # two batch sizes in the 8-token bucket
        ids = torch.randint(0, VOCAB, (batch, tokens))
        with torch.no_grad():
            expected = model(ids, use_cache=False).logits
            got = compiled(ids, use_cache=False).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        results.append((got, expected))
    for got, expected in results:  # later replays of the same graphs did not overwrite these
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    graphs = [r._graphs for r in runners]
    assert sum(g.captures for g in graphs) == 2  # one per batch size
    kept = [obj for g in graphs for c in g._graphs.values() for obj in c.kept_alive]
    assert any(type(obj).__name__ == "TaskTable" for obj in kept), "cached task tables must live as long as the graph"


def test_one_graph_run_with_each_layers_parameters_captures_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph break inside a layer makes Dynamo reuse the layer's graph for every layer, its
    parameters passed as inputs (JetMoE): each layer's weights get their own graph, where a
    replay used to raise ("called with other parameters than at capture")."""
    import tileflow.runtime.streams

    monkeypatch.setattr(tileflow.runtime.streams, "GRAPH_FACTORY", ReplayOnCpu)
    ReplayOnCpu.captures = 0
    torch.manual_seed(8)
    layers = [torch.nn.Linear(16, 16) for _ in range(2)]

    def block(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return layer(x).relu()

    report = tileflow.Report()
    compiled = torch.compile(block, backend=tileflow.TileflowBackend({"cuda_graphs": True, "max_tokens": 32},
                                                                     report=report))
    with torch.no_grad():
        for tokens in (3, 5, 20):
            for layer in layers:
                x = torch.randn(tokens, 16)
                torch._dynamo.mark_dynamic(x, 0)
                torch.testing.assert_close(compiled(layer, x), block(layer, x))
    assert [g.extra.get("cuda_graphs") for g in report.graphs] == ["whole step, token buckets [16, 32]"]
    assert ReplayOnCpu.captures == 4  # two buckets, two layers


def test_a_step_returning_a_grown_kv_cache_is_not_captured(monkeypatch: pytest.MonkeyPatch) -> None:
    # The cache after a step holds past + T rows: it has no token dim to cut the padding from.
    torch.manual_seed(7)
    model = one_layer(build("llama"))
    runners = _graph_runners(monkeypatch)
    compiled = _compile(model, 2)
    key = _cache_kwarg(model)
    first, second = torch.randint(0, VOCAB, (1, 6)), torch.randint(0, VOCAB, (1, 3))
    with torch.no_grad():
        want1 = model(first, use_cache=True)
        got1 = compiled(first, use_cache=True)  # prefill: the new cache rows are exactly the tokens
        want2 = model(second, use_cache=True, **{key: _cache_of(want1)})
        got2 = compiled(second, use_cache=True, **{key: _cache_of(got1)})
    for want, got in ((want1, got1), (want2, got2)):
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
        for w_layer, g_layer in zip(_cache_of(want).layers, _cache_of(got).layers):
            assert g_layer.keys.shape == w_layer.keys.shape
            torch.testing.assert_close(g_layer.keys, w_layer.keys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(g_layer.values, w_layer.values, rtol=1e-5, atol=1e-5)
    captures = [r._graphs.captures for r in runners]
    assert captures[0] == 1 and sum(captures[1:]) == 0, captures


def test_cuda_graphs_capture_a_whole_step_without_nano_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """`cuda_graphs=True` with the default passes (no nano-batch split): the whole compiled step
    is replayed from one graph per token bucket (a CPU stand-in here), padded rows cut, outputs
    equal eager at every length, and the report says so."""
    import tileflow.runtime.streams

    monkeypatch.setattr(tileflow.runtime.streams, "GRAPH_FACTORY", ReplayOnCpu)
    ReplayOnCpu.captures = 0
    torch.manual_seed(3)
    model = one_layer(build("llama"))
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"cuda_graphs": True, "max_tokens": 32},
                                                                     report=report), dynamic=True)
    for tokens in (3, 5, 16, 11, 20, 40):
        ids = torch.randint(0, VOCAB, (1, tokens))
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                       rtol=1e-5, atol=1e-5)
    assert ReplayOnCpu.captures == 2  # the 16- and 32-token buckets; 40 tokens ran uncaptured
    assert [g.extra.get("cuda_graphs") for g in report.graphs] == ["whole step, token buckets [16, 32]"]


def test_cuda_graphs_on_a_cpu_graph_say_why_nothing_was_captured() -> None:
    def step(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(x @ w.t())

    report = tileflow.Report()
    compiled = torch.compile(step, backend=tileflow.TileflowBackend({"cuda_graphs": True}, report=report), dynamic=True)
    x, w = torch.randn(5, 8), torch.randn(4, 8)
    torch.testing.assert_close(compiled(x, w), step(x, w))
    [graph] = report.graphs
    assert graph.extra["cuda_graphs"] == "not captured: CUDA graphs capture CUDA work, this graph runs on cpu"


def test_a_step_that_writes_into_its_input_is_not_captured() -> None:
    """A replay would write into the graph's static copy of the input, never into the caller's
    tensor: such a step runs uncaptured, and the caller's tensor is updated as in eager."""
    def step(x):
        y = x + 1
        x.mul_(2)
        return y

    buckets = CudaGraphBuckets(step, [0], (4, 8), lambda out: 0, graph_factory=ReplayOnCpu)
    for tokens in (3, 3, 6):
        x = torch.arange(float(tokens))
        got_x, want_x = x.clone(), x.clone()
        got, want = buckets(got_x), step(want_x)
        assert torch.equal(got, want) and torch.equal(got_x, want_x)
    assert buckets.captures == 0
    with torch.inference_mode():  # static copies of inference tensors still tell a write apart
        x = torch.arange(5.0)
        buckets(x)
        assert torch.equal(x, torch.arange(5.0) * 2)


def test_a_compiled_step_that_mutates_its_input_updates_the_callers_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    import tileflow.runtime.streams

    class MutatesItsInput(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = torch.nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.q(x)
            x.mul_(2)
            return y

    monkeypatch.setattr(tileflow.runtime.streams, "GRAPH_FACTORY", ReplayOnCpu)
    torch.manual_seed(0)
    model = MutatesItsInput()
    for options in ({"cuda_graphs": True}, {"cuda_graphs": True, "passes": PASSES, "nano_batches": 2}):
        compiled = torch.compile(model, backend=tileflow.TileflowBackend(options), dynamic=True)
        with torch.no_grad():
            for tokens in (5, 6):
                x = torch.randn(tokens, 16)
                got_x, want_x = x.clone(), x.clone()
                torch.testing.assert_close(compiled(got_x), model(want_x))
                torch.testing.assert_close(got_x, want_x)


def test_exact_graphs_capture_each_token_count_without_padding() -> None:
    """`exact=True`: a call of T tokens replays a graph captured at T itself (its static inputs
    hold exactly the call's rows), up to the largest bucket; above it the step runs directly."""
    seen: list[int] = []

    def step(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return x - x.mean(0)  # reads across the tokens: padding would change every row

    buckets = CudaGraphBuckets(step, [0], (8,), lambda out: 0, graph_factory=ReplayOnCpu, exact=True)
    for tokens in (3, 5, 3, 8, 9):
        x = torch.randn(tokens, 4)
        torch.testing.assert_close(buckets(x), x - x.mean(0))
    assert buckets.captures == 3  # 3, 5 and 8; the second 3 replays, 9 runs directly
    assert seen[-1] == 9 and max(seen[:-1]) == 8 and set(seen[:-1]) == {3, 5, 8}


def test_a_step_padding_would_change_runs_from_graphs_at_exact_token_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bidirectional attention: padded keys would reach every query, so the step (whole or
    nano-batched) is captured at the token counts it is called with, and no others."""
    import tileflow.compiler
    import tileflow.runtime.streams

    monkeypatch.setattr(tileflow.runtime.streams, "GRAPH_FACTORY", ReplayOnCpu)
    torch.manual_seed(2)
    qkv = torch.nn.Linear(8, 24)

    def attend(x: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv(x).view(1, -1, 3, 2, 4).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, 8)

    limit = tileflow.compiler.EXACT_GRAPH_TOKENS
    for options in ({"cuda_graphs": True}, {"cuda_graphs": True, "passes": PASSES, "nano_batches": 2}):
        ReplayOnCpu.captures = ReplayOnCpu.replays = 0
        report = tileflow.Report()
        compiled = torch.compile(attend, backend=tileflow.TileflowBackend(options, report=report), dynamic=True)
        with torch.no_grad():
            for tokens in (3, 5, 3, limit + 1):
                x = torch.randn(tokens, 8)
                torch.testing.assert_close(compiled(x), attend(x), rtol=1e-5, atol=1e-5)
        [graph] = report.graphs
        assert graph.extra["cuda_graphs"].startswith(f"exact token counts only (up to {limit}, no padding)")
        assert (ReplayOnCpu.captures, ReplayOnCpu.replays) == (2, 3), options


class ReturnsViews(torch.nn.Module):
    """Outputs that are views of another output (a transpose, a column slice, a reshape) and of
    the input."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.proj(x)
        return y, y.t(), y[:, 2:], y.view(x.shape[0], 2, 4), x.view(x.shape[0], 2, 4)


@pytest.mark.parametrize("options", [
    {"passes": PASSES, "nano_batches": 2},
    {"cuda_graphs": True, "max_tokens": 16},
    {"cuda_graphs": True, "max_tokens": 16, "passes": PASSES, "nano_batches": 3},
], ids=["nano_batches", "cuda_graphs", "both"])
def test_outputs_share_memory_as_eagers_do(monkeypatch: pytest.MonkeyPatch, options: dict) -> None:
    """A nano-batched step computed each output on its own (a view piece by piece, or of another
    stream's copy of its base) and a replayed one copied each output apart: eager's views came
    back as tensors of their own, same values. Now they share memory, with eager's strides, and
    an in-place write to one shows in the others."""
    import tileflow.runtime.streams

    monkeypatch.setattr(tileflow.runtime.streams, "GRAPH_FACTORY", ReplayOnCpu)
    ReplayOnCpu.replays = 0
    torch.manual_seed(4)
    model = ReturnsViews()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend(options), dynamic=True)
    for tokens in (5, 6, 7):
        x = torch.randn(tokens, 8)
        with torch.no_grad():
            got, want = compiled(x), model(x)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
            assert g.stride() == w.stride()
        y, y_t, cols, y_3d, x_3d = got
        assert x_3d.data_ptr() == x.data_ptr()
        y.zero_()
        assert not (y_t.any() or cols.any() or y_3d.any())
    assert ReplayOnCpu.replays > 0 if options.get("cuda_graphs") else ReplayOnCpu.replays == 0


class LaidOutAcrossTheTokens(torch.nn.Module):
    """Outputs whose base eager lays out with the token dim inside (a transpose's product, or a
    contiguous [8, T]), and views of them: a nano-batched step joins the base contiguously along
    the tokens, and a replay's buffer is laid out for the bucket."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        turned = self.proj(x).t() * 2  # [8, T] with strides (1, 8)
        across = self.proj(x).t().contiguous()  # [8, T] with strides (T, 1)
        return turned, turned.transpose(0, 1).view(-1, 2, 4), across, across[:4]


@pytest.mark.parametrize("options", [
    {"passes": PASSES, "nano_batches": 2},
    {"cuda_graphs": True, "max_tokens": 16},
], ids=["nano_batches", "cuda_graphs"])
def test_outputs_over_a_base_laid_out_otherwise_keep_eagers_strides(monkeypatch: pytest.MonkeyPatch,
                                                                      options: dict) -> None:
    """Where sharing memory would need another layout than eager's (the joined base's, or the
    bucket's), each output keeps its own memory: an output eager returns contiguous comes back
    with its strides and no more bytes, and a view of it works (it raised for both before the
    fallback)."""
    import tileflow.runtime.streams

    monkeypatch.setattr(tileflow.runtime.streams, "GRAPH_FACTORY", ReplayOnCpu)
    torch.manual_seed(6)
    model = LaidOutAcrossTheTokens()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend(options), dynamic=True)
    for tokens in (5, 6):
        x = torch.randn(tokens, 8)
        with torch.no_grad():
            got, want = compiled(x), model(x)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
            if w.is_contiguous():
                assert g.stride() == w.stride() and g.untyped_storage().nbytes() <= w.untyped_storage().nbytes()
                g.view(-1)


def test_a_graph_is_captured_per_value_of_a_number_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamo passes a float argument as a 0-d CPU tensor, which a device kernel reads when it is
    launched: a CUDA graph holds the value it was captured with, so each value gets its own."""
    import tileflow.runtime.streams

    monkeypatch.setattr(tileflow.runtime.streams, "GRAPH_FACTORY", ReplayOnCpu)
    ReplayOnCpu.captures = ReplayOnCpu.replays = 0
    torch.manual_seed(1)
    proj = torch.nn.Linear(8, 8)

    def scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
        return proj(x).relu() * scale

    compiled = torch.compile(scaled, backend=tileflow.TileflowBackend({"cuda_graphs": True, "max_tokens": 16}),
                             dynamic=True)
    x = torch.randn(5, 8)
    with torch.no_grad():
        for scale in (0.5, 3.0, 0.5):
            torch.testing.assert_close(compiled(x, scale), scaled(x, scale))
    assert (ReplayOnCpu.captures, ReplayOnCpu.replays) == (2, 3)


def test_replayed_outputs_over_one_storage_are_copied_together() -> None:
    base = torch.arange(24.0).reshape(6, 4)
    other = torch.ones(3)
    # The base (contiguous, over the whole span) and views of it, one reading its bits as ints.
    values = [base[1:], base.t(), 7, base.view(torch.int32)[2:, 1:], other, None, base]
    copies = tileflow.runtime.streams.copies_sharing_memory(values)
    assert copies[2] == 7 and copies[5] is None
    tensors = [0, 1, 3, 4, 6]
    for i in tensors:
        got, was = copies[i], values[i]
        assert torch.equal(got, was) and got.stride() == was.stride() and got.dtype == was.dtype
        assert got.untyped_storage().data_ptr() != was.untyped_storage().data_ptr()
    shared = {copies[i].untyped_storage().data_ptr() for i in (0, 1, 3, 6)}
    assert len(shared) == 1 and copies[4].untyped_storage().data_ptr() not in shared
    copies[0][0, 0] = -1.0  # base[1, 0]: the transpose's [0, 1], the int view's bits two rows up
    assert copies[1][0, 1] == -1.0 and torch.equal(copies[3], base.view(torch.int32)[2:, 1:])
    copies[0][1, 1] = -2.0  # base[2, 1]: the int view's [0, 0]
    assert copies[3][0, 0] == torch.tensor(-2.0).view(torch.int32)
    # No contiguous tensor over the whole span (a bucket-sized buffer cut to fewer tokens along an
    # inner dim): cloned one by one, compact.
    inner = torch.randn(4, 16)[:, :5]
    apart = tileflow.runtime.streams.copies_sharing_memory([inner, inner[:2]])
    assert [c.stride() for c in apart] == [(5, 1), (5, 1)]
    assert apart[0].untyped_storage().data_ptr() != apart[1].untyped_storage().data_ptr()


def test_the_issue_order_follows_the_events_and_the_streams() -> None:
    """A schedule whose event orders two nano-ops that no dependency links: the checker refuses
    it, and the runtime (which also runs unchecked schedules) still issues the producer first
    instead of failing on an event not recorded yet."""
    from tileflow.runtime.nanobatch import topological_order
    from tileflow.runtime.streams import run_schedule_on_streams
    from tileflow.schedule import NanoOp, Schedule, ScheduleError, check_schedule

    ran: list[str] = []

    class State:
        def run_op(self, op):
            ran.append(op.name)

        def outputs(self):
            return list(ran)

    ops = {"b": NanoOp("b", "y", "memory", (0, 4), (), 1, "b"), "c": NanoOp("c", "x", "compute", (0, 4), (), 0, "c"),
           "a": NanoOp("a", "x", "compute", (0, 4), (), 0, "a")}
    schedule = Schedule(streams={0: ["a", "c"], 1: ["b"]}, ops=ops, events=[("a", "b")], num_tokens=4)
    with pytest.raises(ScheduleError, match=r"event \('a', 'b'\) orders no dependency"):
        check_schedule(schedule, {"a": 4, "b": 4, "c": 4})
    order = topological_order(schedule)
    assert order.index("a") < order.index("b") and order.index("a") < order.index("c")
    for seed in range(5):
        ran.clear()
        done = run_schedule_on_streams(State(), schedule, SimulatedStreams(seed=seed), order)
        assert done.index("a") < done.index("b") and done.index("a") < done.index("c")


def test_a_call_failing_on_its_data_does_not_end_its_buckets_capture() -> None:
    """The first call in a bucket carried an id past the table: its capture failed, and so did
    the step itself, yet the bucket was marked uncapturable for good (no replay ever again).
    The call raises as eager does, and the next call captures the bucket."""
    ReplayOnCpu.captures = ReplayOnCpu.replays = 0
    table = torch.randn(10, 4)
    graphs = CudaGraphBuckets(lambda ids: torch.nn.functional.embedding(ids, table), [0], (16,), lambda out: 0,
                              graph_factory=ReplayOnCpu)
    with pytest.raises(IndexError):
        graphs(torch.tensor([1, 2, 50]))
    for tokens in (3, 5, 7):
        ids = torch.randint(0, 10, (tokens,))
        torch.testing.assert_close(graphs(ids), table[ids])
    assert graphs.captures == 1 and ReplayOnCpu.replays >= 3


def test_a_grid_share_of_nothing_is_refused() -> None:
    """A share of 0 would leave a stream's persistent kernels no cores of their own: refused like
    one above the whole device, not silently clamped to one program."""
    with pytest.raises(ValueError, match=r"fraction of the device in \(0, 1\]"):
        with grid_share(0.0):
            pass
    with grid_share(1e-9):  # any positive share still launches one program
        assert programs_for(8) == 1


def test_each_stream_launches_under_its_own_grid_share() -> None:
    """`run_schedule_on_streams` launches each nano-op inside its stream's SM share (a stream
    without one gets the whole device)."""
    from tileflow.runtime.nanobatch import topological_order
    from tileflow.runtime.streams import run_schedule_on_streams
    from tileflow.schedule import NanoOp, Schedule

    grids: dict[str, int] = {}

    class State:
        def run_op(self, op):
            grids[op.name] = programs_for(100)

        def outputs(self):
            return dict(grids)

    ops = {"g0": NanoOp("g0", "gemm", "compute", (0, 2), (), 0, "g"),
           "a0": NanoOp("a0", "attn", "memory", (0, 2), ("g0",), 1, "a"),
           "n0": NanoOp("n0", "all_reduce", "network", (0, 2), ("a0",), 2, "n")}
    schedule = Schedule(streams={0: ["g0"], 1: ["a0"], 2: ["n0"]}, ops=ops,
                        events=[("g0", "a0"), ("a0", "n0")], num_tokens=2)
    got = run_schedule_on_streams(State(), schedule, SimulatedStreams(seed=0), topological_order(schedule),
                                  {0: 0.75, 1: 0.25})
    assert got == {"g0": 75, "a0": 25, "n0": 100}


def test_interleaved_means_a_stream_was_left_and_came_back_to() -> None:
    """`SimulatedStreams.interleaved` (what the interleaving tests rely on to show real overlap):
    one stream running its work back to back and then another's is no interleaving."""
    streams = SimulatedStreams()
    streams.trace = [(0, "a"), (0, "b"), (1, "c"), (1, "d")]
    assert not streams.interleaved
    streams.trace = [(0, "a"), (1, "c"), (0, "b")]
    assert streams.interleaved


def test_a_call_at_a_buckets_size_uses_that_bucket_and_padding_fills_the_rest() -> None:
    """A call of exactly a bucket's token count is captured at that bucket (not the next one up);
    a shorter call in the same bucket sees the rows past its count padded with `PAD_VALUE`, not
    the rows an earlier, longer call left in the static input."""
    from tileflow.padding_safety import PAD_VALUE

    seen: list[torch.Tensor] = []

    def step(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return x * 2

    buckets = CudaGraphBuckets(step, [0], (4, 8), lambda out: 0, graph_factory=ReplayOnCpu)
    assert [buckets.bucket_for(t) for t in (1, 4, 5, 8, 9)] == [4, 4, 8, 8, None]
    x = torch.arange(1.0, 5.0)
    torch.testing.assert_close(buckets(x), x * 2)
    assert seen[-1].shape == (4,)  # captured at 4 tokens, no padding
    x = torch.arange(1.0, 8.0)
    torch.testing.assert_close(buckets(x), x * 2)
    short = torch.arange(1.0, 6.0)
    torch.testing.assert_close(buckets(short), short * 2)  # replays the 8-token graph
    assert seen[-1].shape == (8,) and torch.equal(seen[-1][5:], torch.full((3,), float(PAD_VALUE)))


def test_outputs_over_one_storage_at_offsets_off_their_dtype_are_copied_apart() -> None:
    """A span starting at a byte (a uint8 output from byte 1) and a float64 view of the same
    storage from byte 8: the float64 view does not start a whole number of its elements past the
    span's start, so the two are cloned one by one (a shared span would misread its bytes)."""
    raw = torch.arange(24, dtype=torch.uint8)
    wide = raw.view(torch.float64)[1:]
    copies = tileflow.runtime.streams.copies_sharing_memory([raw[1:], wide])
    assert torch.equal(copies[0], raw[1:]) and torch.equal(copies[1].view(torch.uint8), wide.view(torch.uint8))


def test_static_inputs_keep_the_callers_layout() -> None:
    """A step may view its input in a way only the input's layout allows (a transposed input
    flattened through its transpose): the static copy is laid out like the caller's tensor, so
    the step is captured and replayed instead of failing at capture."""
    def step(x: torch.Tensor) -> torch.Tensor:
        return x.t().view(-1).view(4, -1).t() * 2  # [T, 4] -> [4 * T] -> [T, 4]

    buckets = CudaGraphBuckets(step, [0], (8,), lambda out: 0, graph_factory=ReplayOnCpu)
    for tokens in (3, 5):
        x = torch.randn(4, tokens).t()  # [T, 4], strides (1, T)
        torch.testing.assert_close(buckets(x), x * 2)
    assert buckets.captures == 1


def test_calls_from_two_threads_each_replay_their_own_rows() -> None:
    """A graph's static inputs are shared by every call: a second thread's call that fills them
    while the first call's replay has not run yet would hand the first call the second's rows.
    Calls take turns, so each gets its own (the first waits here, up to half a second, for the
    second's fill to land before it replays)."""
    import threading

    replaying, filled = threading.Event(), threading.Event()

    class WaitsForTheOtherCall(ReplayOnCpu):
        def replay(self) -> None:
            if threading.current_thread().name == "first":
                replaying.set()
                filled.wait(timeout=0.5)
            super().replay()

    buckets = CudaGraphBuckets(lambda x: x * 2, [0], (8,), lambda out: 0, graph_factory=WaitsForTheOtherCall)
    buckets(torch.zeros(3))  # captured here, on the test's thread
    fill = buckets._fill

    def fill_and_say(static: torch.Tensor, value: torch.Tensor, dim: int | None, tokens: int) -> None:
        fill(static, value, dim, tokens)
        if threading.current_thread().name == "second":
            filled.set()

    buckets._fill = fill_and_say
    results: dict[str, torch.Tensor] = {}
    inputs = {"first": torch.ones(3), "second": torch.full((3,), 5.0)}
    threads = {name: threading.Thread(target=lambda n=name: results.__setitem__(n, buckets(inputs[n])), name=name)
               for name in inputs}
    threads["first"].start()
    assert replaying.wait(timeout=5)
    threads["second"].start()
    for thread in threads.values():
        thread.join(timeout=10)
    for name, x in inputs.items():
        torch.testing.assert_close(results[name], x * 2, msg=f"the {name} call")


def test_nano_batched_steps_from_two_threads_take_turns_on_the_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    """A runner keeps one executor for every call, and a step's executor state is not per call
    (`CudaStreams` keeps the step's fork event and the streams it used, to join them back at
    `end`): a second thread's step that began while the first's was being launched made the
    first's `end` skip the streams it had used, so its caller read results still being written.
    Steps take turns (the first waits here, up to half a second, for the second to begin)."""
    import threading

    launching, began = threading.Event(), threading.Event()
    overlaps: list[str] = []

    class OneStepAtATime(SimulatedStreams):
        open_step: str | None = None

        def begin(self) -> None:
            name = threading.current_thread().name
            if self.open_step is not None:
                overlaps.append(f"{name} began inside {self.open_step}'s step")
            if name == "second":
                began.set()
            self.open_step = name
            super().begin()

        def launch(self, stream, fn) -> None:
            if threading.current_thread().name == "first" and not launching.is_set():
                launching.set()
                began.wait(timeout=0.5)
            super().launch(stream, fn)

        def end(self) -> None:
            super().end()
            self.open_step = None

    torch.manual_seed(3)
    model = one_layer(build("llama"))
    shared = OneStepAtATime(seed=0)
    _use_executor(monkeypatch, lambda: shared)
    compiled = _compile(model, 2)
    ids = {"first": torch.randint(0, VOCAB, (1, 9)), "second": torch.randint(0, VOCAB, (1, 9))}
    with torch.no_grad():
        expected = {name: model(x, use_cache=False).logits for name, x in ids.items()}
        compiled(ids["first"], use_cache=False)  # compiled here, on the test's thread
    launching.clear()
    results: dict[str, torch.Tensor] = {}

    def call(name: str) -> None:
        with torch.no_grad():
            results[name] = compiled(ids[name], use_cache=False).logits

    threads = {name: threading.Thread(target=call, args=(name,), name=name) for name in ids}
    threads["first"].start()
    assert launching.wait(timeout=30)
    threads["second"].start()
    for thread in threads.values():
        thread.join(timeout=60)
    assert overlaps == []
    for name in ids:
        assert name in results, f"the {name} call raised"
        torch.testing.assert_close(results[name], expected[name], rtol=1e-5, atol=1e-5, msg=f"the {name} call")


def test_a_number_input_that_changes_every_call_does_not_capture_a_graph_per_value(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A 0-d CPU number (a float a compiled step takes as a tensor) keys its graph by value, so a
    number that changes at every call (a timestep, a scale) captured, and kept, one graph per
    call, without bound. Past a few values, new ones run uncaptured; results equal eager."""
    import tileflow.runtime.streams

    scale_step = torch.nn.Linear(8, 8)

    def step(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return scale_step(x) * scale

    buckets = CudaGraphBuckets(step, [0, None], (8,), lambda out: 0, graph_factory=ReplayOnCpu)
    with torch.no_grad():
        for i in range(20):
            x, scale = torch.randn(5, 8), torch.tensor(0.5 + i / 100)
            torch.testing.assert_close(buckets(x, scale), step(x, scale))
        assert buckets.captures <= 8 and len(buckets._graphs) <= 8
        x = torch.randn(5, 8)
        torch.testing.assert_close(buckets(x, torch.tensor(0.5)), step(x, torch.tensor(0.5)))  # still replayed
        assert len(buckets._graphs) <= 8

    monkeypatch.setattr(tileflow.runtime.streams, "GRAPH_FACTORY", ReplayOnCpu)
    ReplayOnCpu.captures = 0
    compiled = torch.compile(step, backend=tileflow.TileflowBackend({"cuda_graphs": True, "max_tokens": 16}),
                             dynamic=True)
    with torch.no_grad():
        for i in range(20):
            x, scale = torch.randn(5, 8), torch.tensor(0.5 + i / 100)
            torch.testing.assert_close(compiled(x, scale), step(x, scale))
    assert ReplayOnCpu.captures <= 8


def test_graphs_are_keyed_by_each_inputs_dtype() -> None:
    """A call at the same bucket and shape but another dtype captures its own graph: replaying
    the first one would copy the call's values into the static input of the first dtype and
    return that dtype."""
    buckets = CudaGraphBuckets(lambda x: x * 2, [0], (8,), lambda out: 0, graph_factory=ReplayOnCpu)
    for dtype in (torch.float32, torch.float64, torch.float32):
        x = torch.arange(1.0, 6.0, dtype=dtype)
        out = buckets(x)
        assert out.dtype == dtype
        torch.testing.assert_close(out, x * 2, rtol=0, atol=0)
    assert buckets.captures == 2
