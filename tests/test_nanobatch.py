"""The `nanobatch` pass and its CPU runtime: nano-batched models equal the unsplit ones, the
split path really runs, and every schedule the pass emits passes the checker."""

from __future__ import annotations

import collections
import dataclasses
import sys
from pathlib import Path
from typing import Callable, Sequence

import pytest
import torch

import tileflow
import tileflow.runtime.nanobatch as nanobatch_runtime
from tileflow.schedule import Schedule, ScheduleError, check_schedule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import VOCAB, build, one_layer  # noqa: E402
from test_schedule import runs_before  # noqa: E402

PASSES = ("canonicalize", "attention", "gemm_padding", "nanobatch")


@pytest.fixture
def split_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Nano-op counts of the schedules the runtime executed."""
    calls: list[int] = []
    original = nanobatch_runtime.run_schedule
    ran = _record_nano_ops(monkeypatch)

    def counting(gm, plan, schedule, args, order=None):
        calls.append(len(schedule.ops))
        check_schedule(schedule, {s.name: (0, schedule.num_tokens) for s in plan.specs}, plan.edges)
        ran.clear()
        out = original(gm, plan, schedule, args, order)
        # The call really ran nano-op by nano-op, each once (not the whole graph in one go, which
        # would equal the unsplit model too).
        assert sorted(ran) == sorted(schedule.ops)
        return out

    monkeypatch.setattr(nanobatch_runtime, "run_schedule", counting)
    return calls


def _record_nano_ops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the nano-ops the runtime computes, in the order it computes them."""
    ran: list[str] = []
    run_op = nanobatch_runtime.ScheduleState.run_op

    def recording(self, op):
        ran.append(op.name)
        return run_op(self, op)

    monkeypatch.setattr(nanobatch_runtime.ScheduleState, "run_op", recording)
    return ran


# (GPT-2 in the extended run: its split at k = 3 equals eager in the LayerNorm test below, over
# sequences in `test_a_batch_of_sequences_splits_over_them`.)
@pytest.mark.parametrize(("name", "k"), [("llama", 2), pytest.param("gpt2", 3, marks=pytest.mark.extended), ("mixtral", 4),
                                        *(pytest.param("llama", k, marks=pytest.mark.extended) for k in (3, 4))])
def test_nano_batched_model_equals_unsplit(name: str, k: int, split_calls: list[int]) -> None:
    torch.manual_seed(k)
    model = build(name)
    report = tileflow.Report()
    opts = {"passes": PASSES, "nano_batches": k}
    compiled = torch.compile(model, backend=tileflow.TileflowBackend(opts, report=report), dynamic=True)
    runs = 0
    for tokens in (3, 8, 21):  # fewer tokens than k = 4 (capped), and two counts past it
        for batch in (1, 2):
            ids = torch.randint(0, VOCAB, (batch, tokens))
            with torch.no_grad():
                expected = model(ids, use_cache=False).logits
                got = compiled(ids, use_cache=False).logits
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            runs += 1
    assert len(split_calls) == runs  # every call ran nano-batched (k is capped by the token count)
    for graph in report.graphs:
        info = graph.extra["nano_batch"]
        assert graph.rewrites["nano_batch"] == info["split_ops"] > 0
        sizes = info["sizes"]
        # (A batch of two sequences splits over them: its sizes count sequences.)
        count = info.get("example_sequences") or info["example_tokens"]
        assert len(sizes) == min(k, count) and sum(sizes) == count
        schedule = Schedule.from_dict(info["schedule"])
        assert {op.stream for op in schedule.ops.values()} <= {0, 1}


def test_schedules_pass_the_checker_and_broken_ones_fail() -> None:
    model = build("llama")
    opts = {"passes": PASSES, "nano_batches": 3}
    plans = []

    def keep(gm, example_inputs):
        from tileflow.capture import capture_dynamo
        from tileflow.compiler import compile_graph
        from tileflow.config import Config

        def compile_and_keep(aten_gm, inputs):
            runner = compile_graph(aten_gm, inputs, Config.from_options(opts), tileflow.Report())
            plans.append(aten_gm.meta["tileflow_nanobatch"])
            return runner

        return capture_dynamo(gm, example_inputs, compile_and_keep)

    compiled = torch.compile(model, backend=keep, dynamic=True)
    with torch.no_grad():
        compiled(torch.randint(0, VOCAB, (1, 9)), use_cache=False)
    (plan,) = plans
    originals = {s.name: None for s in plan.specs}
    for tokens in (2, 7, 64, 1000):
        sizes = plan.sizes(tokens)
        schedule = plan.schedule(sizes)
        check_schedule(schedule, {n: (0, tokens) for n in originals}, plan.edges)
        assert sum(sizes) == tokens
    good = plan.schedule(plan.sizes(64))
    # A cross-stream wait left out (the dependency and its event): what the nano-ops declare
    # still checks, the graph's edges show the consumer reading rows nothing orders before it.
    def without(event: tuple[str, str]) -> Schedule:
        producer, consumer = event
        ops = dict(good.ops)
        ops[consumer] = dataclasses.replace(ops[consumer], deps=tuple(d for d in ops[consumer].deps if d != producer))
        return dataclasses.replace(good, ops=ops, events=[e for e in good.events if e != event])

    unsafe = next(without(e) for e in good.events if not runs_before(without(e), *e))
    check_schedule(unsafe, {n: (0, 64) for n in originals})
    with pytest.raises(ScheduleError, match="is not ordered before it"):
        check_schedule(unsafe, {n: (0, 64) for n in originals}, plan.edges)
    # A nano-op that never runs, and a dependency on a later op (a cycle), are both caught.
    dropped = dataclasses.replace(good, ops=dict(list(good.ops.items())[:-1]),
                                  streams={s: names[:-1] if names[-1] == list(good.ops)[-1] else names
                                           for s, names in good.streams.items()})
    with pytest.raises(ScheduleError, match=r"rows \[\d+, 64\) are covered by no nano-op"):
        check_schedule(dropped, {n: (0, 64) for n in originals})
    first, last = list(good.ops)[0], list(good.ops)[-1]
    cyclic_ops = dict(good.ops)
    cyclic_ops[first] = dataclasses.replace(good.ops[first], deps=(*good.ops[first].deps, last))
    with pytest.raises(ScheduleError, match="not satisfied: both on stream .*, but the producer is at position"):
        check_schedule(dataclasses.replace(good, ops=cyclic_ops), {n: (0, 64) for n in originals})


def test_one_nano_batch_leaves_the_graph_alone(split_calls: list[int]) -> None:
    model = one_layer(build("llama"))
    report = tileflow.Report()
    opts = {"passes": PASSES, "nano_batches": 1}
    compiled = torch.compile(model, backend=tileflow.TileflowBackend(opts, report=report), dynamic=True)
    with torch.no_grad():
        compiled(torch.randint(0, VOCAB, (1, 9)), use_cache=False)
    assert split_calls == [] and "nano_batch" not in report.graphs[0].extra
    assert "nano_batch" not in report.rewrites


def test_auto_without_a_device_entry_falls_back_with_the_reason(split_calls: list[int]) -> None:
    model = one_layer(build("llama"))
    report = tileflow.Report()
    opts = {"passes": PASSES, "nano_batches": "auto"}
    compiled = torch.compile(model, backend=tileflow.TileflowBackend(opts, report=report), dynamic=True)
    with torch.no_grad():
        compiled(torch.randint(0, VOCAB, (1, 9)), use_cache=False)
    assert split_calls == []
    assert any(f.pass_name == "nanobatch" and "needs a CUDA device's figures, and this graph runs on cpu" in f.reason
               for f in report.graphs[0].fallbacks)


def test_auto_on_a_gpu_whose_figures_cannot_be_read_says_so(monkeypatch) -> None:
    """An unlisted GPU gets a device entry of its own: a CUDA graph without one is a failed query,
    and the reason said "this GPU has no entry in the device table" instead of the error."""
    from types import SimpleNamespace

    import tileflow.devices
    from tileflow.passes.nanobatch import _device

    def fail(device_type: str = "cuda") -> None:
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.setattr(tileflow.devices, "detect_device", fail)
    assert _device(SimpleNamespace(device_type="cuda")) == (
        None, "the CUDA device's figures could not be read (CUDA driver initialization failed)")
    assert _device(SimpleNamespace(device_type="cpu")) == (None, "this graph runs on cpu")


class _TokenMixingViews(torch.nn.Module):
    """Reshapes that keep or mix rows: `[S, N] -> [H, S']` and `[2, S, H] -> [S, 2, H]` move
    elements between token rows (split per nano-batch, they gave other numbers); `[S, 2H] ->
    [S, 2, H]` keeps each row whole."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, pair: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.proj(x)  # [S, 8]
        mixed = h.reshape(8, -1) * 2
        swapped = pair.view(pair.shape[1], 2, -1) + 1
        kept = h.view(-1, 2, 4) * 3
        return mixed, swapped, kept


def test_reshapes_that_mix_token_rows_are_not_split(split_calls: list[int]) -> None:
    torch.manual_seed(0)
    model = _TokenMixingViews()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"passes": PASSES, "nano_batches": 3}),
                             dynamic=True)
    for tokens in (5, 7):
        x, pair = torch.randn(tokens, 8), torch.randn(2, tokens, 8)
        with torch.no_grad():
            for got, want in zip(compiled(x, pair), model(x, pair)):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert split_calls  # the row-keeping part still ran split


def test_as_strided_of_a_value_laid_out_across_the_tokens_is_not_split(split_calls: list[int]) -> None:
    """as_strided reads its base's layout: eager's [8, T] product here is a transpose's (strides
    (1, 8)), but the runner would join the split base contiguously, and the result was off by
    about 5. The pass leaves such a graph whole, with the reason."""
    torch.manual_seed(3)
    proj = torch.nn.Linear(8, 8)

    def reread(x: torch.Tensor) -> torch.Tensor:
        turned = proj(x).t() * 2
        return turned.as_strided((x.shape[0], 8), (8, 1)) + 1

    report = tileflow.Report()
    compiled = torch.compile(reread, backend=tileflow.TileflowBackend({"passes": PASSES, "nano_batches": 2},
                                                                       report=report), dynamic=True)
    for tokens in (5, 9):
        x = torch.randn(tokens, 8)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), reread(x), rtol=1e-5, atol=1e-5)
    assert not split_calls
    assert any("as_strided of a value the split computes in pieces" in f.reason
               for g in report.graphs for f in g.fallbacks)


def test_padding_off_the_token_dim_is_split(split_calls: list[int]) -> None:
    """`constant_pad_nd` of a feature dim (the attention pass pads latent attention's narrower
    head size so) keeps rows whole, so it runs per nano-batch instead of joining them: the
    model equals the unsplit one, and each pad runs once per nano-batch."""
    from models import ZOO

    torch.manual_seed(0)
    model = ZOO["deepseek_v3_mla"][0]().eval()
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"passes": PASSES, "nano_batches": 2}, report=report),
                             dynamic=True)
    _prompts_equal_eager(model, compiled, [(1, 5), (1, 9)])
    assert report.rewrites.get("head_size_padded") == 2 and split_calls
    [graph] = report.graphs
    schedule = Schedule.from_dict(graph.extra["nano_batch"]["schedule"])
    pieces = collections.Counter(op.original for op in schedule.ops.values() if op.original.startswith("constant_pad_nd"))
    assert pieces and set(pieces.values()) == {2}, pieces  # each pad runs as two nano-ops


def test_a_batch_as_long_as_the_sequence_falls_back(split_calls: list[int]) -> None:
    """On a first call with batch == sequence length Dynamo gives both dims one symbol: rows
    cannot be told from sequences, and GPT-NeoX split that way failed or came out wrong."""
    torch.manual_seed(1)
    model = one_layer(build("llama"))
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"passes": PASSES, "nano_batches": 2}, report=report),
                             dynamic=True)
    ids = torch.randint(0, VOCAB, (3, 3))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-5)
    assert split_calls == []
    assert any("in two dims" in f.reason for g in report.graphs for f in g.fallbacks)


class _MutatesItsInput(torch.nn.Module):
    """Attention reads x through a view; x is then updated in place (a copy_ back into the
    input at the end of the functional graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x).view(1, -1, 2, 8).transpose(1, 2)
        kv = x.view(1, -1, 2, 8).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True)
        x.mul_(2)
        return out


class _SplitsThenMutatesItsInput(torch.nn.Module):
    """Attention reads x through `x.split(...)` (views handed out in a tuple and picked by
    getitem); x is then updated in place."""

    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x).view(1, -1, 2, 8).transpose(1, 2)
        k, v = x.split(16, dim=-1)
        k, v = (t.view(1, -1, 2, 8).transpose(1, 2) for t in (k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x.mul_(2)
        return out


@pytest.mark.parametrize(("model_class", "width", "runs"), [(_MutatesItsInput, 16, 10), (_SplitsThenMutatesItsInput, 32, 20)])
def test_an_input_written_in_place_waits_for_its_readers_on_every_stream(
    monkeypatch: pytest.MonkeyPatch, model_class: type, width: int, runs: int
) -> None:
    """The copy_ into the mutated input waits for the attention that reads it on the memory
    stream, directly or through the items of a split: without that edge, 4 of 10 random stream
    interleavings read the doubled input (and 5 of 20 through the split, getitem not followed)."""
    from tileflow.runtime.streams import SimulatedStreams

    seeds = iter(range(1000))
    monkeypatch.setattr(nanobatch_runtime.NanoBatchRunner, "_executor_for",
                        lambda self, device: SimulatedStreams(seed=next(seeds)))
    torch.manual_seed(2)
    model = model_class()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"passes": PASSES, "nano_batches": 2}),
                             dynamic=True)
    with torch.no_grad():
        for _ in range(runs):
            x = torch.randn(6, width)
            want_x, got_x = x.clone(), x.clone()
            want = model(want_x)
            torch.testing.assert_close(compiled(got_x), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_x, want_x)


# A reader's findings: a squeeze of the token dim (a no-op at T >= 2) ran per nano-batch and
# dropped the dim of a one-row piece (a [16] result for [2, 8], or a crash); and with CUDA
# graphs a nano-batched step returned a number computed from T at its bucket's value.
SQUEEZED = torch.nn.Linear(8, 8)


def _squeezed_and_returned(x: torch.Tensor) -> torch.Tensor:
    return SQUEEZED(x).squeeze(0)


def _squeezed_in_the_middle(x: torch.Tensor) -> torch.Tensor:
    return (SQUEEZED(x).squeeze((0, 1)) * 2).sum(-1)


@pytest.mark.parametrize("fn, shape", [(_squeezed_and_returned, lambda t: (t, 8)),
                                       (_squeezed_in_the_middle, lambda t: (1, t, 8))])
@pytest.mark.parametrize("k", [2, 3])
def test_a_squeeze_of_the_token_dim_is_not_split(fn, shape, k: int) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=tileflow.TileflowBackend(
        {"target": "reference", "passes": PASSES, "nano_batches": k}), dynamic=True)
    for tokens in (5, 2, 3):
        x = torch.randn(*shape(tokens))
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), fn(x), rtol=1e-5, atol=1e-5)


def test_a_number_computed_from_the_token_count_comes_back_at_the_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    import tileflow.runtime.streams
    from graph_doubles import ReplayOnCpu

    monkeypatch.setattr(tileflow.runtime.streams, "GRAPH_FACTORY", ReplayOnCpu)
    ReplayOnCpu.captures = 0

    def step(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        return SQUEEZED(x).relu(), x.shape[0] * 2 + 1

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=tileflow.TileflowBackend(
        {"target": "reference", "passes": PASSES, "nano_batches": 2, "cuda_graphs": True, "max_tokens": 32}),
        dynamic=True)
    for tokens in (5, 6, 20):
        x = torch.randn(tokens, 8)
        with torch.no_grad():
            out, count = compiled(x)
            torch.testing.assert_close(out, step(x)[0], rtol=1e-5, atol=1e-5)
        assert count == tokens * 2 + 1
    assert ReplayOnCpu.captures > 0


@tileflow.register_pass
class _ReluToClamp:
    """Rewrites relu as clamp_min(x, 0) under a new node name (a user pass placed after nanobatch)."""

    name = "test_relu_to_clamp"

    def run(self, gm, ctx):
        from tileflow.pipeline import PassResult

        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target is torch.ops.aten.relu.default:
                with gm.graph.inserting_after(node):
                    new = gm.graph.call_function(torch.ops.aten.clamp_min.default, (node.args[0], 0.0))
                new.meta = dict(node.meta)
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
        return PassResult()


def test_a_pass_after_nanobatch_that_changes_the_graph_drops_the_plan() -> None:
    """The plan named nodes a later pass had replaced: every call raised KeyError at run time.
    The step runs whole now, and the report says why; without such a pass the plan stays."""
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def f(x: torch.Tensor) -> torch.Tensor:
        # The ReLU on the input: after a GEMM, gemm_padding would fuse it and leave the pass nothing.
        return lin2(lin1(torch.relu(x)))

    for passes, dropped in ((("canonicalize", "gemm_padding", "nanobatch", "test_relu_to_clamp"), True),
                            (("canonicalize", "gemm_padding", "nanobatch"), False)):
        torch._dynamo.reset()
        report = tileflow.Report()
        options = {"target": "reference", "passes": passes, "nano_batches": 2}
        compiled = torch.compile(f, backend=tileflow.TileflowBackend(options, report=report), dynamic=True)
        with torch.no_grad():
            for tokens in (5, 9):
                x = torch.randn(tokens, 16)
                torch.testing.assert_close(compiled(x), f(x), rtol=1e-5, atol=1e-5)
        assert ("nano_batch_dropped" in report.graphs[0].extra) == dropped
        assert ("nano_batch" in report.graphs[0].extra) != dropped  # no schedule reported that does not run


def test_strict_refuses_a_dropped_nano_batch_plan() -> None:
    """With strict=True, a forced split (nano_batches=2) that a later pass made unusable ran the
    step whole with only a warning: no error, and no fallback in the report."""
    lin1, lin2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def f(x: torch.Tensor) -> torch.Tensor:
        return lin2(lin1(torch.relu(x)))

    torch._dynamo.reset()
    options = {"target": "reference", "passes": ("canonicalize", "gemm_padding", "nanobatch", "test_relu_to_clamp"),
               "nano_batches": 2, "strict": True}
    compiled = torch.compile(f, backend=tileflow.TileflowBackend(options, report=tileflow.Report()), dynamic=True)
    with pytest.raises(Exception, match="nanobatch"), torch.no_grad():
        compiled(torch.randn(5, 16))


def _softmax_over_the_tokens(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(SQUEEZED(x), dim=-2) * 2  # dim -2 of [T, 8] is the token dim


def _rows_shifted_down(x: torch.Tensor) -> torch.Tensor:
    # RWKV's token shift (`ZeroPad2d((0, 0, 1, -1))`): a pad that keeps the token count, row t
    # reading row t - 1.
    return torch.nn.functional.pad(SQUEEZED(x), (0, 0, 1, -1)) * 2


@pytest.mark.parametrize("fn", [_softmax_over_the_tokens, _rows_shifted_down])
def test_an_op_reading_across_the_tokens_that_keeps_their_count_is_not_split(fn) -> None:
    """A softmax along the token dim named by a negative index, and a pad of the token dim that
    keeps its length, read other rows than their own: run per nano-batch, each piece would see
    only its rows (another normalization, a zero row at every piece's start)."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=tileflow.TileflowBackend(
        {"target": "reference", "passes": PASSES, "nano_batches": 2}), dynamic=True)
    for tokens in (5, 9):
        x = torch.randn(tokens, 8)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), fn(x), rtol=1e-5, atol=1e-5)


def test_auto_splits_no_count_below_the_threshold_and_a_power_of_two_is_its_own_bucket() -> None:
    """`nano_batches="auto"`: no step below this model's split threshold is split (its win grows
    with the count: the threshold is the smallest count at which splitting wins), the power of
    two above it is; a power-of-two count is searched at itself, so its sizes are the search's,
    unscaled."""
    from test_search import H100, llama_layer

    from tileflow.passes.nanobatch import NanoBatchPlan
    from tileflow.search import search_split, split_threshold

    ops = llama_layer(ctx=4096, layers=2)
    plan = NanoBatchPlan("auto", (0, 0), {}, {}, [], [], profile=ops, device=H100)
    threshold = split_threshold(ops, H100)
    assert threshold is not None and search_split(ops, H100, 1 << (threshold - 1).bit_length()).k >= 2
    assert all(plan.sizes(n) == [n] for n in range(threshold - 16, threshold))
    assert len(plan.sizes(1 << (threshold - 1).bit_length())) >= 2
    chosen = search_split(ops, H100, 1024)
    assert chosen.k >= 2 and plan.sizes(1024) == list(chosen.sizes)


def test_a_schedule_cutting_each_op_its_own_way_runs_as_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """`make_schedule` and `check_schedule` allow each op its own row split (a consumer waits
    only for the producer pieces its rows meet). The runtime read a producer cut elsewhere by
    joining the pieces computed so far and caching that join: a consumer piece run between the
    producer's pieces (a valid order) cached rows [0, 2) + [4, 6) as the whole, and later
    readers got rows 4 and 5 in place of 2 and 3, silently."""
    from tileflow.runtime.nanobatch import run_schedule
    from tileflow.schedule import make_schedule

    torch.manual_seed(0)
    first, second = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def two_gemms(x: torch.Tensor) -> torch.Tensor:
        return second(torch.relu(first(x)))

    kept = []

    def keep(gm, example_inputs):
        from tileflow.capture import capture_dynamo
        from tileflow.compiler import compile_graph
        from tileflow.config import Config

        def compile_and_keep(aten_gm, inputs):
            runner = compile_graph(aten_gm, inputs, Config.from_options({"passes": PASSES, "nano_batches": 2}),
                                   tileflow.Report())

            def call(*args):
                kept.append((aten_gm, aten_gm.meta["tileflow_nanobatch"], args))
                return runner(*args)
            return call

        return capture_dynamo(gm, example_inputs, compile_and_keep)

    torch._dynamo.reset()
    x = torch.randn(6, 8)
    with torch.no_grad():
        torch.compile(two_gemms, backend=keep, dynamic=True)(x)
        want = two_gemms(x)
    gm, plan, args = kept[-1]
    producer, consumer = [s.name for s in plan.specs if plan.split[s.name]]
    splits = {producer: [(0, 2), (2, 4), (4, 6)], consumer: [(0, 1), (1, 3), (3, 4), (4, 6)]}
    order = [f"{producer}[0]", f"{producer}[2]", f"{consumer}[0]", f"{producer}[1]", f"{consumer}[1]",
             f"{consumer}[2]", f"{consumer}[3]"]
    schedule = make_schedule(plan.specs, splits, plan.edges, 6, priority={n: i for i, n in enumerate(order)})
    assert schedule.streams[0] == order
    check_schedule(schedule, {s.name: (0, 6) for s in plan.specs}, plan.edges)
    ran = _record_nano_ops(monkeypatch)
    with torch.no_grad():
        (got,) = run_schedule(gm, plan, schedule, args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # In the order the test is about (a consumer piece between the producer's pieces).
    assert [name for name in ran if name in order] == order


def test_attention_profile_grows_with_the_kv_length() -> None:
    """The split search's profile of decode attention (8 rows, each reading its sequence's K/V):
    `bytes_per_token` was one row's K and V whatever the KV length (128 bytes at 16 or 4096
    cached positions) and its FLOPs 0, so the search saw attention as free and never overlapped
    it (the search's own tests model it as reading the KV cache per token)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from tileflow.passes.nanobatch import _profile

    def profile(kv_len: int, q_len: int = 1, **options):
        q = torch.randn(8, 4, q_len, 16, dtype=torch.bfloat16)
        k = torch.randn(8, 2, kv_len, 16, dtype=torch.bfloat16)
        gm = make_fx(lambda q, k, v: tileflow.ops.meta_attention(q, k, v, **options))(q, k, k.clone())
        (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]
        return _profile(node, {}).at({})  # (static sizes: nothing to give)

    short, long = profile(16), profile(4096)
    assert long.bytes_per_token > short.bytes_per_token
    # A decode row: its whole cache (2 bytes x K and V x 2 heads x 16) and its q and output;
    # 4 FLOPs per query head, dim and key.
    assert long.bytes_per_token == 2 * 2 * 2 * 16 * 4096 + 2 * 2 * 4 * 16
    assert long.flops_per_token == 4 * 4 * 16 * 4096
    # A causal prefill of 64 rows after 64 cached: each row 1/64 of the 128 keys' K/V, and 128 - 63/2 keys seen on
    # average; a window of 8 sees at most 8 keys, and the 64 rows read 8 + 63 of them.
    prefill = profile(128, 64, causal=True)
    assert prefill.bytes_per_token == 2 * 2 * 2 * 16 * 128 / 64 + 2 * 2 * 4 * 16
    assert prefill.flops_per_token == 4 * 4 * 16 * (128 - 63 / 2)
    windowed = profile(128, 64, causal=True, sliding_window=8)
    assert windowed.bytes_per_token == 2 * 2 * 2 * 16 * 71 / 64 + 2 * 2 * 4 * 16
    assert windowed.flops_per_token == 4 * 4 * 16 * 8


def test_attention_profile_counts_the_keys_a_chunk_or_a_windows_first_rows_see() -> None:
    """FLOPs per row are 4·Hq·D per key the row sees, on average over the rows. `attention_chunk`
    (Llama 4's chunked layers) was ignored: a causal prefill of 64 rows in chunks of 16 sees 8.5
    keys per row, counted as 32.5 (and a decode row of a 128-key cache in chunks of 32 reads its
    chunk's 32 keys, counted as all 128). A window of 8 over a prefill from position 0 sees
    (1 + ... + 8 + 56 * 8) / 64 = 7.5625 keys per row, counted as min(the causal average, 8) = 8."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from tileflow.passes.nanobatch import _profile

    def profile(kv_len: int, q_len: int, **options):
        q = torch.randn(1, 4, q_len, 16, dtype=torch.bfloat16)
        k = torch.randn(1, 2, kv_len, 16, dtype=torch.bfloat16)
        gm = make_fx(lambda q, k, v: tileflow.ops.meta_attention(q, k, v, **options))(q, k, k.clone())
        (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]
        return _profile(node, {}).at({})  # (static sizes: nothing to give)

    per_key = 4 * 4 * 16
    assert profile(64, 64, causal=True, attention_chunk=16).flops_per_token == per_key * 8.5
    decode = profile(128, 1, causal=True, attention_chunk=32)
    assert decode.flops_per_token == per_key * 32
    assert decode.bytes_per_token == 2 * 2 * 2 * 16 * 32 + 2 * 2 * 4 * 16
    assert profile(64, 64, causal=True, sliding_window=8).flops_per_token == per_key * 7.5625


@pytest.mark.parametrize("rows, chunk", [(65536, 16), (1 << 20, 8192), (1 << 22, 2048)])
def test_a_long_chunked_prefill_counts_the_keys_its_rows_see(rows: int, chunk: int) -> None:
    """A causal prefill in chunks of c sees (c + 1) / 2 keys per row on average. Rows sampled
    evenly (one in rows // 4096) fell at the same offsets of every chunk: at a step of c only the
    chunks' first rows (1 key each, not 8.5), at c / 2 half as many keys as the rows see."""
    from tileflow.passes.nanobatch import _keys_seen

    seen, read = _keys_seen(rows, rows, True, None, chunk)
    assert seen == pytest.approx((chunk + 1) / 2, rel=1e-3) and read == rows


@pytest.fixture
def plans(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """(graph module, plan) of every nano-batch runner built."""
    built: list[tuple] = []
    original = nanobatch_runtime.NanoBatchRunner.__init__

    def keeping(self, gm, plan, *args, **kwargs):
        built.append((gm, plan))
        original(self, gm, plan, *args, **kwargs)

    monkeypatch.setattr(nanobatch_runtime.NanoBatchRunner, "__init__", keeping)
    return built


def test_layer_norms_and_fused_qkv_splits_run_per_nano_batch(plans: list[tuple], split_calls: list[int]) -> None:
    """GPT-2's LayerNorms (`native_layer_norm`, which returns output, mean and rstd) and the split
    of its fused q/k/v projection are token-wise as README promises norms are: they ran whole,
    every LayerNorm a barrier between all nano-batches of one layer and the next."""
    model = build("gpt2")
    opts = {"passes": PASSES, "nano_batches": 3}
    compiled = torch.compile(model, backend=tileflow.TileflowBackend(opts), dynamic=True)
    _prompts_equal_eager(model, compiled, [(1, 7), (1, 13)])
    assert len(split_calls) == 2
    ((gm, plan),) = plans
    norms = [n for n in gm.graph.nodes if n.target is torch.ops.aten.native_layer_norm.default]
    splits = [n for n in gm.graph.nodes if n.target is torch.ops.aten.split.Tensor]
    assert len(norms) == 5 and len(splits) == 2
    assert all(plan.split[n.name] for n in norms + splits)
    assert all(plan.split[user.name] for n in norms + splits for user in n.users)  # their getitems


def _prompts_equal_eager(model: torch.nn.Module, compiled, shapes: Sequence[tuple[int, int]]) -> None:
    """`compiled`'s logits over random prompts of each `[B, S]` shape equal `model`'s (fp32, 1e-5)."""
    for shape in shapes:
        ids = torch.randint(0, VOCAB, shape)
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                       rtol=1e-5, atol=1e-5)


def _decoded(model: torch.nn.Module, fn, ids: torch.Tensor, steps: int = 3) -> list[torch.Tensor]:
    """The logits of a prefill of `ids` then `steps - 1` greedy decode steps (`[B, 1]` ids against
    a DynamicCache), each step run by `fn`."""
    from transformers import DynamicCache

    cache, step, position, logits = DynamicCache(config=model.config), ids, 0, []
    for _ in range(steps):
        with torch.no_grad():
            out = fn(step, past_key_values=cache, use_cache=True,
                     cache_position=torch.arange(position, position + step.shape[1], device=ids.device))
        logits.append(out.logits)
        position += step.shape[1]
        step = out.logits[:, -1:].argmax(-1)
    return logits


def _heavy_ops(gm: torch.fx.GraphModule) -> tuple[list[str], list[str]]:
    """The names of `gm`'s `padded_gemm` and `meta_attention` nodes."""
    names = {"padded_gemm": [], "meta_attention": []}
    for node in gm.graph.nodes:
        names.get(getattr(node.target, "_opname", None), []).append(node.name)
    return names["padded_gemm"], names["meta_attention"]


# (Llama's k = 3 and Mixtral in the extended run: GPT-2's k = 3 and the one-layer decode's cut alike.)
@pytest.mark.parametrize(("name", "k"), [("llama", 2), pytest.param("llama", 3, marks=pytest.mark.extended),
                                         ("gpt2", 3), pytest.param("mixtral", 2, marks=pytest.mark.extended)])
def test_a_decode_step_of_several_sequences_splits_over_them(name: str, k: int, plans: list[tuple],
                                                             split_calls: list[int]) -> None:
    """A decode step over a cache (`[B, 1]` ids, one query per sequence, the cache's length
    another symbol) has no token symbol and ran whole ("a decode step over a cache"), though a big
    decode batch is NanoFlow's main case. With an integer k it now splits over its sequences: the
    GEMMs' B rows, attention per group of sequences with their cache rows (`[B, H, L, D]` cut
    along B, never along L), norms over B. One decode graph serves B = 3, 2 and 5 (B < k too:
    fewer pieces), through several steps, equal to eager."""
    torch.manual_seed(k)
    model = build(name)
    report = tileflow.Report()
    opts = {"passes": PASSES, "nano_batches": k}
    compiled = torch.compile(model, backend=tileflow.TileflowBackend(opts, report=report), dynamic=True)
    for batch in (3, 2, 5):
        ids = torch.randint(0, VOCAB, (batch, 7))
        for got, want in zip(_decoded(model, compiled, ids), _decoded(model, model, ids)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(split_calls) == 3 * 3  # every prefill and decode step ran nano-batched (checked by the fixture)
    assert not [f for g in report.graphs for f in g.fallbacks if f.pass_name == "nanobatch"]
    (prefill, decode) = [g.extra["nano_batch"] for g in report.graphs]
    assert prefill["split_over"] == decode["split_over"] == "sequences"
    assert decode["token_symbol"] is None  # (no token symbol: CUDA graphs bucket none, as before)
    parts = min(k, 3)
    assert decode["example_sequences"] == 3 and decode["sizes"] == [3 // parts + (i < 3 % parts) for i in range(parts)]
    (gm, plan) = plans[1]
    schedule = Schedule.from_dict(decode["schedule"])
    check_schedule(schedule, {s.name: (0, 3) for s in plan.specs}, plan.edges)
    pieces = collections.Counter(op.original for op in schedule.ops.values())
    gemms, attention = _heavy_ops(gm)
    assert len(gemms) >= 2 * 2 + 1 and len(attention) == 2
    assert all(plan.split[n] and pieces[n] == parts for n in gemms + attention)
    assert decode["split_ops"] == sum(plan.split.values()) and gm.meta["tileflow_nanobatch"] is plan
    # The split reads the batch symbol; every cache input `[B, H, L, D]` is cut along B (dim 0).
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index, dim = plan.split_input
    batch = placeholders[index].meta["val"].shape[dim].node.expr
    caches = [n for n in placeholders if isinstance(n.meta["val"], torch.Tensor) and n.meta["val"].dim() == 4]
    assert str(batch) == decode["batch_symbol"] and caches
    assert all(plan.token_dims[n.name] == 0 and n.meta["val"].shape[0].node.expr == batch
               and batch not in n.meta["val"].shape[2].node.expr.free_symbols for n in caches)


class _DecodeOverACache(torch.nn.Module):
    """One decode step of one attention layer: x `[B, 1, 16]`, the cache `[B, 2, L, 8]` (keys and
    values alike) with the new key appended, and an output projection (x `[B, S, 16]`: S queries
    per sequence, a verify step of S drafted tokens when S is fixed)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.kv, self.o = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        b, s = x.shape[:2]
        q = self.q(x).view(b, s, 2, 8).transpose(1, 2)
        kv = torch.cat([cache, self.kv(x).view(b, s, 2, 8).transpose(1, 2)], dim=2)
        a = torch.nn.functional.scaled_dot_product_attention(q, kv, kv)
        return self.o(a.transpose(1, 2).reshape(b, s, 16)) + x


class _TwoDecodes(torch.nn.Module):
    """Two decode steps over caches of their own, batches of their own (two batch symbols)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _DecodeOverACache(), _DecodeOverACache()

    def forward(self, x: torch.Tensor, cx: torch.Tensor, y: torch.Tensor, cy: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.a(x, cx), self.b(y, cy)


def test_decode_steps_split_over_sequences_only_with_one_batch_symbol(split_calls: list[int]) -> None:
    """A decode step splits over its sequences with B one input size symbol shared by every
    attention's queries; a graph whose queries' batches are two symbols falls back, with a
    reason that says so."""
    torch.manual_seed(1)
    model = _DecodeOverACache().eval()
    for k in (2, 3):
        torch._dynamo.reset()
        report = tileflow.Report()
        compiled = torch.compile(model, backend=tileflow.TileflowBackend({"passes": PASSES, "nano_batches": k},
                                                                         report=report), dynamic=True)
        split_calls.clear()
        for b, length in ((3, 5), (2, 9), (5, 4)):
            x, cache = torch.randn(b, 1, 16), torch.randn(b, 2, length, 8)
            with torch.no_grad():
                torch.testing.assert_close(compiled(x, cache), model(x, cache), rtol=1e-5, atol=1e-5)
        assert len(split_calls) == 3, (k, split_calls)
        assert not [f for g in report.graphs for f in g.fallbacks if f.pass_name == "nanobatch"]
        assert report.graphs[0].extra["nano_batch"]["split_over"] == "sequences"
    torch._dynamo.reset()
    two = _TwoDecodes().eval()
    report = tileflow.Report()
    compiled = torch.compile(two, backend=tileflow.TileflowBackend({"passes": PASSES, "nano_batches": 2},
                                                                   report=report), dynamic=True)
    split_calls.clear()
    args = (torch.randn(3, 1, 16), torch.randn(3, 2, 5, 8), torch.randn(4, 1, 16), torch.randn(4, 2, 6, 8))
    with torch.no_grad():
        for got, want in zip(compiled(*args), two(*args)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (reason,) = [f.reason for g in report.graphs for f in g.fallbacks if f.pass_name == "nanobatch"]
    assert split_calls == [] and "a decode step over a cache" in reason and "one input size symbol" in reason, reason


@pytest.fixture
def halving_search(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list, int]]:
    """Stand-ins for a CUDA device's figures (the H100's) and the split search, which answers two
    halves of the bucket at shares 0.75 / 0.25, a split that wins at any count (`split_wins`);
    each search's (costs, bucket) is kept."""
    from tileflow.devices import get_device
    from tileflow import search as search_module
    from tileflow.passes import nanobatch
    from tileflow.search import SplitPlan

    searched: list[tuple[list, int]] = []

    def search(costs: list, device: object, bucket: int, **options: object) -> SplitPlan:
        searched.append((costs, bucket))
        return SplitPlan(2, (bucket // 2, bucket - bucket // 2), {"compute": 0, "memory": 1, "network": 2},
                         {0: 0.75, 1: 0.25, 2: 0.0}, 1.0, 2.0)

    monkeypatch.setattr(nanobatch, "_device", lambda ctx: (get_device("H100"), ""))
    monkeypatch.setattr(search_module, "search_split", search)
    monkeypatch.setattr(search_module, "split_wins", lambda *args, **options: True)
    return searched


def test_auto_splits_a_decode_step_over_its_sequences_costed_at_each_calls_cache(
        monkeypatch: pytest.MonkeyPatch, halving_search: list[tuple[list, int]], plans: list[tuple],
        split_calls: list[int]) -> None:
    """`nano_batches="auto"` left a decode step over a cache whole ("its search costs token rows"),
    though NanoFlow's main case is a big decode batch and a decode step's sequences are one token
    row each. It now splits over the sequences as the search says, and the search costs attention
    at each call's cache length (its power-of-two bucket), where it had the length the graph was
    traced at (the first decode step's, short) for every later call (the real search on real
    sizes: `test_auto_splits_a_decode_step_from_the_cache_length_the_search_says`). On streams
    each nano-op runs at its stream's SM share."""
    torch.manual_seed(5)
    model = _DecodeOverACache().eval()
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"passes": PASSES, "nano_batches": "auto"},
                                                                     report=report), dynamic=True)
    for b, length in ((3, 5), (4, 9), (3, 7)):
        x, cache = torch.randn(b, 1, 16), torch.randn(b, 2, length, 8)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, cache), model(x, cache), rtol=1e-5, atol=1e-5)
    assert not [f for g in report.graphs for f in g.fallbacks if f.pass_name == "nanobatch"]
    (info,) = [g.extra["nano_batch"] for g in report.graphs]
    assert info["split_over"] == "sequences" and info["setting"] == "auto"
    # Three sequences, the bucket of 4 cut in two: [2, 1] (the report's example, then the calls).
    assert info["sizes"] == [2, 1] and len(info["timeline"]) > 0
    ((gm, plan),) = plans
    assert len(split_calls) == 3 and plan.split_input is not None
    # One decode row reads its cache's K and V (fp32, 2 heads of 8: 128 bytes a key, the new one
    # too) and writes its q and output; the cache of 5 is costed at 8 (+1), of 9 at 16, of 7 at 8,
    # and the search runs once per (sequences, buckets): the report's call and the first are one.
    per_key, own = 4 * 2 * 2 * 8, 2 * 4 * 2 * 8
    attention = [([c.bytes_per_token for c in costs if c.resource == "memory"], bucket)
                 for costs, bucket in halving_search]
    assert attention == [([per_key * 9 + own], 4), ([per_key * 17 + own], 4)], attention
    # On streams (simulated, a random interleaving), each stream's nano-ops run at the SM share
    # the search gave it: compute 0.75, attention's memory stream 0.25.
    import tileflow.runtime.streams as streams_runtime
    from tileflow.runtime.streams import SimulatedStreams

    executor, shares, grid_share = SimulatedStreams(seed=2), [], streams_runtime.grid_share
    monkeypatch.setattr(nanobatch_runtime.NanoBatchRunner, "_executor_for", lambda self, device: executor)
    monkeypatch.setattr(streams_runtime, "grid_share", lambda share: shares.append(share) or grid_share(share))
    x, cache = torch.randn(4, 1, 16), torch.randn(4, 2, 9, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, cache), model(x, cache), rtol=1e-5, atol=1e-5)
    ran = {stream for stream, _ in executor.trace}
    assert ran == {0, 1} and set(shares) == {0.75, 0.25} and len(halving_search) == 2


def test_auto_splits_a_batch_of_prompts_over_them_costing_a_sequences_rows(
        halving_search: list[tuple[list, int]], plans: list[tuple], split_calls: list[int]) -> None:
    """A batch of prompts (`[B, S]` ids) split along the tokens under "auto", its GEMMs and
    attention whole, since the search costs a unit as one row and a sequence holds S. It now
    splits over the sequences like an integer k, each sequence costed as its S rows (S at its
    power-of-two bucket, as attention's keys are)."""
    torch.manual_seed(7)
    model = one_layer(build("llama"))
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"passes": PASSES, "nano_batches": "auto"},
                                                                     report=report), dynamic=True)
    _prompts_equal_eager(model, compiled, [(3, 7), (5, 12)])
    assert not [f for g in report.graphs for f in g.fallbacks if f.pass_name == "nanobatch"]
    (info,) = [g.extra["nano_batch"] for g in report.graphs]
    assert info["split_over"] == "sequences" and info["sizes"] == [2, 1]
    ((gm, plan),) = plans
    heavy = [n.name for n in gm.graph.nodes if getattr(n.target, "_opname", None) in ("padded_gemm", "meta_attention")]
    assert len(split_calls) == 2 and heavy and all(plan.split[n] for n in heavy)
    assert [bucket for _, bucket in halving_search] == [4, 8]
    for (costs, _), rows in zip(halving_search, (8, 16)):  # S = 7 and 12 at their buckets
        per_row = [c.at({sym: rows for sym in c.symbols}) if c.resource == "memory" else c for c in plan.profile]
        assert len(costs) == len(per_row) == len(heavy)
        for cost, row in zip(costs, per_row):
            assert (cost.flops_per_token, cost.bytes_per_token, cost.fixed_bytes) == (
                row.flops_per_token * rows, row.bytes_per_token * rows, row.fixed_bytes), cost.name


def test_auto_splits_a_decode_step_from_the_cache_length_the_search_says() -> None:
    """On Llama-3-8B-shaped costs (test_search's two layers) a decode step of 512 sequences is
    worth splitting over a cache of 1024 and not over one of 16 (the GEMMs alone: nothing to
    overlap); the plan asks the search at the cache's power-of-two bucket, and every length in
    one bucket gets the one answer."""
    import sympy
    from test_search import H100, llama_layer

    from tileflow.passes.nanobatch import AttentionCost, NanoBatchPlan
    from tileflow.search import search_split

    length = sympy.Symbol("L", integer=True, positive=True)
    gemms = [op for op in llama_layer(ctx=1, layers=2) if op.resource == "compute"]
    attention = [AttentionCost(f"attn{i}", 32, 8, 128, 1, length + 1, True, None, None, 2, "bfloat16")
                 for i in range(2)]
    profile = [gemms[0], attention[0], *gemms[1:5], attention[1], *gemms[5:]]  # qkv, attention, o, up, down
    plan = NanoBatchPlan("auto", None, {}, {}, [], [], profile=profile, device=H100, split_input=(0, 0))

    def searched(cache: int):
        costs = [c.at({length: cache}) if isinstance(c, AttentionCost) else c for c in profile]
        return search_split(costs, H100, 512)

    long, short = searched(1024), searched(16)
    assert long.k >= 2 and short.k == 1
    assert plan.sizes(512, {length: 1024}) == list(long.sizes) == plan.sizes(512, {length: 513})
    assert plan.shares(512, {length: 700}) == {s: v for s, v in long.sm_share_per_stream.items() if v > 0}
    assert plan.sizes(512, {length: 16}) == [512] and plan.shares(512, {length: 9}) is None


def test_a_decode_step_of_one_sequence_has_one_token_to_split(split_calls: list[int]) -> None:
    """B = 1 (Dynamo specializes it): the decode step's one query is one token, nothing to split,
    and the reason says so; its prefill splits along the tokens."""
    torch.manual_seed(2)
    model = one_layer(build("llama"))
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"passes": PASSES, "nano_batches": 2},
                                                                     report=report), dynamic=True)
    ids = torch.randint(0, VOCAB, (1, 7))
    for got, want in zip(_decoded(model, compiled, ids), _decoded(model, model, ids)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    reasons = [f.reason for g in report.graphs for f in g.fallbacks if f.pass_name == "nanobatch"]
    assert len(split_calls) == 1 and report.graphs[0].extra["nano_batch"]["split_over"] == "tokens"
    assert len(reasons) == 1 and "one token, nothing to split" in reasons[0], reasons


def test_a_split_decode_step_is_not_captured_as_cuda_graphs(monkeypatch: pytest.MonkeyPatch,
                                                            split_calls: list[int]) -> None:
    """CUDA graphs bucket the token symbol, which a decode step over a cache lacks: unsplit it was
    not captured ("no single symbolic token dimension to bucket"). Split over its sequences it
    still is not, with the same words in the report (the CPU stand-in for CUDA graphs)."""
    import tileflow.runtime.streams
    from graph_doubles import ReplayOnCpu

    monkeypatch.setattr(tileflow.runtime.streams, "GRAPH_FACTORY", ReplayOnCpu)
    ReplayOnCpu.captures = ReplayOnCpu.replays = 0
    torch._dynamo.reset()
    torch.manual_seed(3)
    model = _DecodeOverACache().eval()
    report = tileflow.Report()
    opts = {"target": "reference", "passes": PASSES, "nano_batches": 2, "cuda_graphs": True, "max_tokens": 32}
    compiled = torch.compile(model, backend=tileflow.TileflowBackend(opts, report=report), dynamic=True)
    for b, length in ((3, 5), (4, 7)):
        x, cache = torch.randn(b, 1, 16), torch.randn(b, 2, length, 8)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, cache), model(x, cache), rtol=1e-5, atol=1e-5)
    (graph,) = report.graphs
    assert len(split_calls) == 2 and graph.extra["nano_batch"]["split_over"] == "sequences"
    assert graph.extra["cuda_graphs"] == "not captured: no single symbolic token dimension to bucket"
    assert ReplayOnCpu.captures == ReplayOnCpu.replays == 0


def test_a_decode_step_of_a_batch_traced_static_is_neither_split_nor_bucketed_along_its_cache(
        monkeypatch: pytest.MonkeyPatch, split_calls: list[int]) -> None:
    """A generate loop compiled without dynamic=True: Dynamo's automatic dynamic shapes mark the
    cache's length (it changes every step) and keep the batch size static, so the decode graph's
    one size symbol is the cache's length. It was taken for the token count: the step was "split"
    along the cache's length with nothing split (every op whole, the schedule run for nothing), the
    report said so of a batch split "along the tokens", and CUDA graphs bucketed the cache's
    length (the padding analysis happened to refuse the replay). It now has no token symbol: the
    reason says why and what to do, nothing is bucketed, and the results equal eager."""
    import tileflow.runtime.streams
    from graph_doubles import ReplayOnCpu

    monkeypatch.setattr(tileflow.runtime.streams, "GRAPH_FACTORY", ReplayOnCpu)
    torch._dynamo.reset()
    torch.manual_seed(8)
    model = _DecodeOverACache().eval()
    report = tileflow.Report()
    opts = {"target": "reference", "passes": PASSES, "nano_batches": 2, "cuda_graphs": True, "max_tokens": 32}
    compiled = torch.compile(model, backend=tileflow.TileflowBackend(opts, report=report))
    for length in (5, 9, 7):
        x, cache = torch.randn(3, 1, 16), torch.randn(3, 2, length, 8)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, cache), model(x, cache), rtol=1e-5, atol=1e-5)
    static, decode = report.graphs  # the first call's static graph, then the cache's length symbolic
    assert split_calls == [] and "nano_batch" not in decode.extra
    (reason,) = [f.reason for f in decode.fallbacks if f.pass_name == "nanobatch"]
    assert "queries are all of a static size (a batch of 3, a decode step over a cache)" in reason, reason
    assert "mark the batch dim dynamic" in reason and "along the tokens" not in reason, reason
    assert decode.extra["cuda_graphs"] == tileflow.runtime.streams.NO_TOKEN_DIM_TO_BUCKET


def test_one_sequences_static_queries_over_a_cache_say_to_mark_the_queries(split_calls: list[int]) -> None:
    """One sequence's 4 queries over a growing cache, compiled without dynamic=True: the cache's
    length is the graph's one symbol, no token count. A batch of 1 cannot be made a symbol (Dynamo
    specializes it), so the reason says to mark the queries' dim dynamic, not the batch's."""
    torch._dynamo.reset()
    torch.manual_seed(9)
    model = _DecodeOverACache().eval()
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"passes": PASSES, "nano_batches": 2},
                                                                     report=report))
    for length in (5, 9):
        x, cache = torch.randn(1, 4, 16), torch.randn(1, 2, length, 8)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, cache), model(x, cache), rtol=1e-5, atol=1e-5)
    (reason,) = [f.reason for f in report.graphs[-1].fallbacks if f.pass_name == "nanobatch"]
    assert split_calls == [] and "(a batch of 1, 4 queries per sequence over a cache)" in reason, reason
    assert "mark the queries' dim dynamic" in reason and "batch dim" not in reason, reason


@pytest.mark.extended
def test_generate_splits_its_decode_steps_over_the_sequences(plans: list[tuple], split_calls: list[int]) -> None:
    """`model.generate` with a compiled forward over a left-padded batch (its mask per sequence,
    cut along B with the cache): the decode steps split over the sequences, the tokens and scores
    equal eager's."""
    torch.manual_seed(6)
    model = build("llama")
    ids = torch.randint(1, VOCAB, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, :2] = mask[2, :1] = 0
    kwargs = {"attention_mask": mask, "max_new_tokens": 4, "do_sample": False, "output_scores": True,
              "return_dict_in_generate": True, "pad_token_id": 0}
    with torch.no_grad():
        want = model.generate(ids, **kwargs)
        model.forward = torch.compile(model.forward, backend=tileflow.TileflowBackend(
            {"passes": PASSES, "nano_batches": 2}), dynamic=True)
        got = model.generate(ids, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(split_calls) == 4  # the prefill and three decode steps
    assert all(p.split_input is not None for _, p in plans)


def test_a_static_graph_says_why_no_step_of_it_splits(split_calls: list[int]) -> None:
    """A plain `torch.compile` compiles the first shape static: nano_batches=2 splits none of its
    steps (README: an integer k >= 2 splits every step), and the report said only 'no symbolic
    token dimension to split (none, or several and no attention to tell which)', not which, nor
    what makes the split run."""
    model = one_layer(build("llama"))
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"passes": PASSES, "nano_batches": 2}, report=report))
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-5)
    assert split_calls == []
    (reason,) = [f.reason for g in report.graphs for f in g.fallbacks if f.pass_name == "nanobatch"]
    assert "static shapes" in reason and "dynamic=True" in reason


class _HalvesOfADoubledInput(torch.nn.Module):
    """A split along the token dim of a [2T, H] tensor: the split's items carry the tokens, its
    source does not."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        x, y = torch.cat([a, a * 2]).split(a.shape[0])
        return torch.relu(self.lin(x)) + y


def test_an_item_of_a_split_that_runs_whole_runs_whole(split_calls: list[int]) -> None:
    """The split's items are [T, H], so its getitems were taken as token-wise while the split
    (along the token dim) ran whole: the runner narrowed the whole tuple ("'list' object has no
    attribute 'narrow'"), where the step ran before `_ROW_TUPLES`."""
    model = _HalvesOfADoubledInput().eval()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"passes": PASSES, "nano_batches": 2}))
    for tokens in (6, 9):
        a = torch.randn(tokens, 16)
        torch._dynamo.mark_dynamic(a, 0)
        with torch.no_grad():
            torch.testing.assert_close(compiled(a), model(a), rtol=1e-5, atol=1e-5)
    assert len(split_calls) == 2


# (Llama at k = 3 and 4 and Mixtral, each about 15 s, in the extended run: k = 2 and GPT-2's
# k = 3 cut the same sequences.)
@pytest.mark.parametrize(("name", "k"), [("llama", 2), pytest.param("llama", 3, marks=pytest.mark.extended),
                                         pytest.param("llama", 4, marks=pytest.mark.extended), ("gpt2", 3),
                                         pytest.param("mixtral", 2, marks=pytest.mark.extended)])
def test_a_batch_of_sequences_splits_over_them(name: str, k: int, plans: list[tuple], split_calls: list[int]) -> None:
    """`[B, S]` ids with B > 1 (both symbolic under dynamic=True): the GEMMs' rows are `B*S`, no
    token dim, so they and attention ran whole and only elementwise ops split. The step now splits
    over whole sequences: GEMMs at multiples of S rows, attention per sequence, norms over B; one
    graph serves every (B, S), B < k too; a single sequence (B = 1, its own graph) still splits
    along its tokens. Mixtral's experts route per nano-batch (each its own sequences' tokens)."""
    torch.manual_seed(k)
    model = build(name)
    report = tileflow.Report()
    opts = {"passes": PASSES, "nano_batches": k}
    compiled = torch.compile(model, backend=tileflow.TileflowBackend(opts, report=report), dynamic=True)
    shapes = [(3, 7), (2, 5), (5, 3), (4, 6)] + ([(1, 6)] if name == "llama" else [])
    _prompts_equal_eager(model, compiled, shapes)
    assert len(split_calls) == len(shapes)  # every call ran nano-batched (checked by the fixture)
    infos = [g.extra["nano_batch"] for g in report.graphs]
    assert [i["split_over"] for i in infos] == ["sequences"] + (["tokens"] if name == "llama" else [])
    (gm, plan), *_ = plans
    info = infos[0]
    parts = min(k, 3)  # k near-equal parts of the 3 sequences, capped by them
    assert info["example_sequences"] == 3 and info["sizes"] == [3 // parts + (i < 3 % parts) for i in range(parts)]
    schedule = Schedule.from_dict(info["schedule"])
    check_schedule(schedule, {s.name: (0, 3) for s in plan.specs}, plan.edges)
    pieces = collections.Counter(op.original for op in schedule.ops.values())
    kinds = collections.defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_function":
            kinds[node.target._opname if hasattr(node.target, "_opname") else str(node.target)].append(node.name)
    gemms, attention = kinds["padded_gemm"], kinds["meta_attention"]
    assert len(gemms) >= 2 * 2 + 1 and len(attention) == 2  # two layers (sibling projections fused) and the head
    assert all(plan.split[n] and pieces[n] == len(info["sizes"]) for n in gemms + attention)
    assert info["split_ops"] == sum(plan.split.values())
    if name == "mixtral":
        grouped = kinds["grouped_gemm"]
        assert grouped and all(plan.split[n] and n in plan.routed and pieces[n] == len(info["sizes"]) for n in grouped)


class _SequencesInterleaved(torch.nn.Module):
    """Attention over `[B, S, H]`, then its rows laid out `[S, B]` and flattened to `S*B` (a size
    that reads the same as `B*S`) for a projection, then back."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.o = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q = self.q(x).view(b, s, 2, 8).transpose(1, 2)
        a = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(b, s, h)
        y = a.transpose(0, 1).reshape(s * b, h)
        return self.o(y).reshape(s, b, h).transpose(0, 1) + x


def test_rows_of_sequences_interleaved_are_not_cut_as_sequences(plans: list[tuple], split_calls: list[int]) -> None:
    """Split over sequences, a reshape merging `[S, B]` into `S*B` rows interleaves them: it runs
    whole (the split reshapes are those with nothing before the split dim), while attention and
    the reshapes around it split per sequence."""
    model = _SequencesInterleaved().eval()
    opts = {"passes": PASSES, "nano_batches": 2}
    compiled = torch.compile(model, backend=tileflow.TileflowBackend(opts), dynamic=True)
    for shape in ((3, 5, 16), (4, 6, 16)):
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(split_calls) == 2
    ((gm, plan),) = plans
    nodes = {n.name: n for n in gm.graph.nodes}
    (merge,) = [n for n, node in nodes.items() if node.target is torch.ops.aten._unsafe_view.default]
    (attention,) = [n for n, node in nodes.items() if "meta_attention" in str(node.target)]
    assert plan.split_input is not None and plan.split[attention] and not plan.split[merge]


def test_a_padded_batch_with_its_cache_splits_over_its_sequences(plans: list[tuple], split_calls: list[int]) -> None:
    """Left-padded sequences (an attention mask per sequence, which attention reads with its
    sequence's rows) returning their KV cache: split over the sequences, each nano-batch's
    attention reads its own mask rows, and the logits equal eager's."""
    torch.manual_seed(5)
    model = build("llama")
    opts = {"passes": PASSES, "nano_batches": 2}
    compiled = torch.compile(model, backend=tileflow.TileflowBackend(opts), dynamic=True)
    for batch, tokens in ((3, 6), (4, 9)):
        ids = torch.randint(0, VOCAB, (batch, tokens))
        mask = torch.ones(batch, tokens, dtype=torch.long)
        mask[0, :2], mask[-1, :3] = 0, 0
        with torch.no_grad():
            got = compiled(ids, attention_mask=mask, use_cache=True)
            want = model(ids, attention_mask=mask, use_cache=True)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    assert len(split_calls) == 2
    ((gm, plan),) = plans
    attention = [n for n in gm.graph.nodes if "meta_attention" in str(n.target)]
    assert plan.split_input is not None and attention and all(plan.split[n.name] for n in attention)
    assert any(isinstance(a, torch.fx.Node) and plan.token_dims[a.name] == 0 for a in attention[0].args[3:])  # its mask


class _AttentionUnderAnInputMask(torch.nn.Module):
    """A projection, attention under a `[B, 1, S, S]` additive mask given as an input, and an
    output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.o = torch.nn.Linear(16, 48), torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 8).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(a.transpose(1, 2).reshape(b, s, 16))


def test_a_square_mask_input_splits_over_the_sequences(plans: list[tuple], split_calls: list[int]) -> None:
    """A `[B, 1, S, S]` mask input holds the token count in two dims, which along the tokens
    cannot be told apart (the step runs whole, with the reason); over sequences it is cut along
    B like every other input: the step splits, equal to eager."""
    torch.manual_seed(2)
    model = _AttentionUnderAnInputMask().eval()
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"passes": PASSES, "nano_batches": 2},
                                                                     report=report), dynamic=True)
    for b, s in ((3, 5), (4, 7)):
        x = torch.randn(b, s, 16)
        mask = torch.randn(b, 1, s, s).masked_fill(torch.rand(b, 1, s, s) < 0.3, float("-inf"))
        mask[..., 0] = 0.0  # every row sees a key
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, mask), model(x, mask), rtol=1e-5, atol=1e-5)
    assert len(split_calls) == 2 and not any(g.fallbacks for g in report.graphs), [g.fallbacks for g in report.graphs]
    ((gm, plan),) = plans
    assert report.graphs[0].extra["nano_batch"]["split_over"] == "sequences"
    assert all(plan.split[n.name] for n in gm.graph.nodes if "meta_attention" in str(n.target))


@pytest.mark.parametrize("marked", [(), pytest.param((1,), marks=pytest.mark.extended)])
def test_a_static_batch_of_sequences_says_why_its_gemms_run_whole(marked: tuple[int, ...], plans: list[tuple]) -> None:
    """A batch of 3 sequences whose batch size Dynamo keeps static (automatic dynamic shapes mark
    only the token dim, which changed; or only that dim was marked dynamic) splits along the
    tokens: its GEMMs' rows are `3*S` and attention's batch is 3, none of them a token dim, so
    every GEMM and attention ran whole with no word in the report. The report now says why and
    what to do (marking both dims dynamic, as dynamic=True does, splits over the sequences)."""
    torch._dynamo.reset()
    torch.manual_seed(2)
    model = build("llama")
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"passes": PASSES, "nano_batches": 2},
                                                                     report=report))
    for tokens in (7, 9) if not marked else (7,):
        ids = torch.randint(0, VOCAB, (3, tokens))
        for dim in marked:
            torch._dynamo.mark_dynamic(ids, dim)
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                       rtol=1e-5, atol=1e-5)
    graph = report.graphs[-1]
    (gm, plan), = plans
    heavy = [n.name for n in gm.graph.nodes if getattr(n.target, "_opname", None) in ("padded_gemm", "meta_attention")]
    reasons = [f.reason for f in graph.fallbacks if f.pass_name == "nanobatch"]
    assert len(heavy) == 11 and graph.extra["nano_batch"]["split_over"] == "tokens"
    assert not any(plan.split[n] for n in heavy)
    assert len(reasons) == 1 and "a batch of 3 sequences" in reasons[0] and "mark_dynamic" in reasons[0]


def test_a_symbolic_batch_of_static_length_splits_over_its_sequences(plans: list[tuple], split_calls: list[int]) -> None:
    """Prompts of one static length, only the batch dim dynamic (`mark_dynamic(ids, 0)`; Dynamo's
    automatic dynamic shapes do the same when only the batch size changes): the batch size is the
    graph's one symbol, so it was taken for the token count and split as such, its GEMMs (`B*7`
    rows) and attention whole. It now splits over the sequences as a batch with both dims symbolic
    does."""
    torch._dynamo.reset()
    torch.manual_seed(4)
    model = build("llama")
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"passes": PASSES, "nano_batches": 2}))
    for batch in (3, 5, 2):
        ids = torch.randint(0, VOCAB, (batch, 7))
        torch._dynamo.mark_dynamic(ids, 0)
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                       rtol=1e-5, atol=1e-5)
    assert len(split_calls) == 3
    ((gm, plan),) = plans
    heavy = [n.name for n in gm.graph.nodes if getattr(n.target, "_opname", None) in ("padded_gemm", "meta_attention")]
    assert len(heavy) == 11 and plan.split_input is not None and all(plan.split[n] for n in heavy)


def test_sequences_of_a_static_length_with_two_batch_symbols_say_so(split_calls: list[int]) -> None:
    """Prompts of one static length whose ids and padding mask each have their batch dim marked
    dynamic (two symbols for one batch size): no symbol tells the tokens, and the reason says
    what the step is (it called such a step "a decode step over a cache")."""
    torch.manual_seed(3)
    model = one_layer(build("llama"))
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"passes": PASSES, "nano_batches": 2},
                                                                     report=report))
    ids, mask = torch.randint(0, VOCAB, (4, 7)), torch.ones(4, 7, dtype=torch.long)
    mask[0, :2] = 0
    for t in (ids, mask):
        torch._dynamo.mark_dynamic(t, 0)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, attention_mask=mask, use_cache=False).logits,
                                   model(ids, attention_mask=mask, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    reasons = [f.reason for g in report.graphs for f in g.fallbacks if f.pass_name == "nanobatch"]
    assert split_calls == [] and len(reasons) == 1, reasons
    assert "a fixed length 7 (prompts of one static length" in reasons[0] and "decode" not in reasons[0], reasons


def _gptj() -> torch.nn.Module:
    """A small GPT-J: its interleaved RoPE's `rotate_every_two` is `stack((-x2, x1), dim=-1)`
    then `flatten` (CodeGen's and Cohere's alike)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPTJForCausalLM(cfg).eval()


def test_interleaved_rope_stacks_split_like_cats(plans: list[tuple], split_calls: list[int]) -> None:
    """`stack` was never token-wise, so GPT-J's q and k were joined whole at each RoPE's stack (4 a
    graph), a barrier between all nano-batches before each attention (results right): along the
    tokens 119 ops split and 8 whole, over sequences 94 and 34. A stack of token-major tensors
    along a new dim off the tokens keeps each row whole and now splits like `cat`, along the
    tokens (one sequence) and over the sequences (`[B, S]` ids), and the model equals eager."""
    model = _gptj()
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"passes": PASSES, "nano_batches": 2},
                                                                     report=report), dynamic=True)
    shapes = [(1, 7), (3, 7), (2, 5)]  # a graph along the tokens, and one over sequences called twice
    _prompts_equal_eager(model, compiled, shapes)
    assert len(split_calls) == len(shapes)
    infos = [g.extra["nano_batch"] for g in report.graphs]
    assert [i["split_over"] for i in infos] == ["tokens", "sequences"]
    for (gm, plan), info in zip(plans, infos):
        stacks = [n for n in gm.graph.nodes if n.target is torch.ops.aten.stack.default]
        assert len(stacks) == 4 and all(plan.split[n.name] for n in stacks)
        assert all(plan.split[user.name] for n in stacks for user in n.users)
        pieces = collections.Counter(op.original for op in Schedule.from_dict(info["schedule"]).ops.values())
        assert all(pieces[n.name] == len(info["sizes"]) == 2 for n in stacks)
        # The whole ops reading split values (barriers): only attention along one sequence's
        # tokens. (The rotary table's lookup at the positions splits too: `table[positions]`, or
        # before transformers 5.24 a gather at the positions repeated across the table's width.)
        # (Up to the final norm: before 5.24 the LM head reads `hidden[:, -logits_to_keep:]`,
        # which torch 2.11 keeps symbolic, the last rows, whole.)
        nodes = list(gm.graph.nodes)
        body = nodes[:max(i for i, n in enumerate(nodes) if n.target is torch.ops.aten.native_layer_norm.default)]
        barriers = [n for n in body if n.op == "call_function" and not plan.split[n.name]
                    and any(plan.split.get(a.name) for a in n.all_input_nodes)]
        kinds = collections.Counter(n.target._opname for n in barriers)
        assert kinds == ({"meta_attention": 2} if info["split_over"] == "tokens" else {}), barriers


def _rows_stacked(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # `[T, 16]` rows: rotate_every_two's interleaved halves stacked at dim -1, and the halves
    # along a new dim before the tokens (`[2, T, 8]`: the token dim moves to 1, each row still
    # reads only its own rows).
    x1, x2 = x[:, ::2], x[:, 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2) + 1, torch.stack((x1, x2), dim=0) * 2


def _split_in_two_equals_eager(fn, width: int, split_calls: list[int], tolerance: float = 0.0) -> None:
    """`fn` over `[T, width]` rows compiled with two nano-batches equals eager at 5 and 8 tokens
    (exactly, by default; one graph, the token dim dynamic), split at both calls."""
    compiled = torch.compile(fn, backend=tileflow.TileflowBackend({"passes": PASSES, "nano_batches": 2}))
    for tokens in (5, 8):
        x = torch.randn(tokens, width)
        torch._dynamo.mark_dynamic(x, 0)
        for got, want in zip(compiled(x), fn(x)):
            torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
    assert len(split_calls) == 2


def test_a_stack_off_the_token_dim_splits(plans: list[tuple], split_calls: list[int]) -> None:
    """Stacks of token-major tensors at dim -1 and at dim 0 run per nano-batch (they ran whole)
    and equal eager."""
    _split_in_two_equals_eager(_rows_stacked, 16, split_calls)
    ((gm, plan),) = plans
    stacks = [n for n in gm.graph.nodes if n.target is torch.ops.aten.stack.default]
    assert len(stacks) == 2 and all(plan.split[n.name] for n in stacks)
    assert [plan.token_dims[n.name] for n in stacks] == [0, 1]
    assert all(plan.split[n.name] for n in gm.graph.nodes if n.op == "call_function")


_TABLE = torch.randn(32, 8)


def _rows_looked_up(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # Positions computed per row, looked up in a table without the token dim the two ways GPT-J
    # reads its rotary table: `table[positions]` (transformers >= 5.24), and a gather along the
    # tokens at the positions repeated across the table's width (before).
    positions = (x[:, 0].abs() * 10).long() % _TABLE.shape[0]
    indexed = _TABLE[positions] * x
    repeated = positions[None, :, None].repeat(1, 1, _TABLE.shape[1])
    gathered = torch.gather(_TABLE[None].expand(1, -1, -1), 1, repeated)[0] * x
    return indexed, gathered


def test_lookups_in_a_table_at_per_row_positions_split(plans: list[tuple], split_calls: list[int]) -> None:
    """An index, a repeat whose count at the token dim is 1 and a gather along the tokens from a
    table without them run per nano-batch (each ran whole, a barrier: GPT-J's rotary lookup
    under transformers 5.17, the GPU machine's), and equal eager."""
    _split_in_two_equals_eager(_rows_looked_up, 8, split_calls)
    ((gm, plan),) = plans
    ops = [n for n in gm.graph.nodes if n.op == "call_function"]
    lookups = [n for n in ops if n.target in (torch.ops.aten.index.Tensor, torch.ops.aten.repeat.default,
                                              torch.ops.aten.gather.default)]
    assert len(lookups) == 3 and all(plan.split[n.name] for n in lookups)
    assert [plan.token_dims[n.name] for n in lookups] == [0, 1, 1]
    assert all(plan.split[n.name] for n in ops if plan.token_dims.get(n.name) is not None)


def test_the_lookup_rules_check_where_the_rows_are_read() -> None:
    """On a hand-written graph: a repeat tiling the token dim, a gather along another dim (output
    row t reads the table's row t), a table holding the tokens, and a boolean mask index (its
    output's rows are the mask's true ones, however many) stay whole."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from tileflow.passes.nanobatch import _is_token_wise

    def lookups(pos, table, rows, mask):
        return (pos.repeat(1, 2), pos.repeat(2, 1), pos.repeat(3, 1, 1), torch.gather(table[:5], 1, pos),
                torch.gather(table, 0, pos), rows[pos[:, 0]], table[pos[:, 0]], table[mask])

    gm = make_fx(lookups, tracing_mode="symbolic")(torch.randint(0, 4, (5, 2)), torch.randn(9, 2),
                                                   torch.randn(5, 2), torch.rand(9) > 0.5)
    pos, table, rows, mask = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ops = [n for n in gm.graph.nodes if n.op == "call_function"]
    wide, tall, stacked, off, along, own, looked, masked = [n for n in ops if n.target in (
        torch.ops.aten.repeat.default, torch.ops.aten.gather.default, torch.ops.aten.index.Tensor)]
    columns = [n.args[1][0] for n in (own, looked)]  # pos[:, 0]
    dims = {pos.name: 0, table.name: None, rows.name: 0, mask.name: None, **{n.name: 0 for n in columns},
            **{n.name: 0 for n in (wide, tall, off, along, own, looked, masked)}, stacked.name: 1}
    assert _is_token_wise(wide, dims) and _is_token_wise(stacked, dims)
    assert _is_token_wise(along, dims) and _is_token_wise(looked, dims)
    assert not _is_token_wise(tall, dims)  # the tokens tiled twice
    assert not _is_token_wise(off, dims)  # along dim 1: row t reads the table's row t
    assert not _is_token_wise(own, dims)  # a table split at the tokens, read at any row
    assert not _is_token_wise(looked, {**dims, looked.name: 1})  # the index's rows land at dim 0, not 1
    assert not _is_token_wise(masked, {**dims, mask.name: 0})  # a mask picks rows by value, whatever its dims


def test_the_stack_rule_checks_where_the_token_dim_lands() -> None:
    """The rule on a hand-written graph: a stack's output token dim is its inputs' shifted by one
    when the new dim is at or before it. A token dim said to be the new dim itself (a stack
    along the tokens), or inputs with the tokens at different places, stay whole."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from tileflow.passes.nanobatch import _is_token_wise

    gm = make_fx(lambda x, y: (torch.stack((x, y), -1), torch.stack((x, y), 0), torch.stack((x, y), 1)),
                 tracing_mode="symbolic")(torch.randn(5, 8), torch.randn(5, 8))
    x, y, *stacks = [n for n in gm.graph.nodes if n.op in ("placeholder", "call_function")]
    last, first, middle = stacks
    assert [n.args[1] if len(n.args) > 1 else 0 for n in stacks] == [-1, 0, 1]  # (make_fx drops a default 0)
    rows = {x.name: 0, y.name: 0, last.name: 0, first.name: 1, middle.name: 0}
    assert all(_is_token_wise(n, rows) for n in stacks)
    # (rows over sequences: the same dims, nothing tangled)
    from tileflow.passes.nanobatch import _SequenceRows

    assert all(_is_token_wise(n, rows, _SequenceRows(frozenset())) for n in stacks)
    along = {**rows, first.name: 0, last.name: 2, middle.name: 1}  # the token dim taken for the new dim
    assert not any(_is_token_wise(n, along) for n in stacks)
    apart = {**rows, y.name: 1}
    assert not any(_is_token_wise(n, apart) for n in stacks)
    assert not _is_token_wise(last, {**rows, y.name: None})  # an input without the token dim


def test_an_elementwise_op_splits_only_beside_operands_that_broadcast_along_the_tokens() -> None:
    """The pointwise rule on a hand-written graph: beside a split input, every other input must
    broadcast along the token dim (size 1 there, or no dim there). Falcon-Mamba's scan computes
    a value whose length is the token count written another way (`(T - 1)//2 + (T//2 - 1)//2 +
    4`), which the pass does not take for a token dim: split, its product with a per-row norm met
    each nano-batch's rows with the whole value (a crash at 11 tokens, k = 2)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from tileflow.passes.nanobatch import _is_token_wise

    gm = make_fx(lambda x, whole, row, col: (x * whole, x * row, x * col, x + 1.0),
                 tracing_mode="symbolic")(torch.randn(5, 8), torch.randn(5, 8), torch.randn(1, 8), torch.randn(8))
    x, whole, row, col, *ops = [n for n in gm.graph.nodes if n.op in ("placeholder", "call_function")]
    dims = {x.name: 0, whole.name: None, row.name: None, col.name: None, **{n.name: 0 for n in ops}}
    by_whole, by_row, by_col, by_scalar = ops
    assert not _is_token_wise(by_whole, dims)  # (as long as the tokens, not known as their dim)
    assert _is_token_wise(by_row, dims) and _is_token_wise(by_col, dims) and _is_token_wise(by_scalar, dims)


def _picks_per_row(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # `[T, 8]` router-like scores: each row's top 2 (a MoE router), its values sorted, its largest
    # and smallest; and the top 2 rows of every column (along the tokens: reads every row).
    probs = x.softmax(-1)
    weights, experts = probs.topk(2, dim=-1)
    ordered, order = torch.sort(x, dim=-1, descending=True)
    biggest, at = torch.max(x, 1)
    smallest, _ = torch.min(x, dim=-1)
    top_rows, _ = x.topk(2, dim=0)
    return weights / weights.sum(-1, keepdim=True), experts, ordered * 2, order, biggest + smallest, at, top_rows + 1


def test_top_k_sort_max_and_min_along_a_row_split(plans: list[tuple], split_calls: list[int]) -> None:
    """A router's top-k over each token's scores (Mixtral's, before its experts), and a sort, a
    max and a min along each row, run per nano-batch (they ran whole, and so did their items),
    equal to eager; a top-k along the tokens stays whole."""
    _split_in_two_equals_eager(_picks_per_row, 8, split_calls)
    ((gm, plan),) = plans
    aten = torch.ops.aten
    picks = [n for n in gm.graph.nodes if n.target in (aten.topk.default, aten.sort.default, aten.max.dim, aten.min.dim)]
    along_tokens = [n for n in picks if n.target is aten.topk.default and n.args[2:3] == (0,)]
    assert len(picks) == 5 and len(along_tokens) == 1
    assert [plan.split[n.name] for n in picks] == [n not in along_tokens for n in picks]
    items = [u for n in picks for u in n.users]
    assert [plan.split[u.name] for u in items] == [n not in along_tokens for n in picks for _ in n.users]


def _router_and_rope_rows(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # `[T, 8]` rows through the ops routers and RoPE write per row (they ran whole, a barrier):
    # Llama-4's `full_like(-inf).scatter(top-k)`, PhiMoE's `gather` and `scatter` of its picks,
    # DeepSeek-V3's group mask (`zeros_like().scatter_`) and its RoPE half written into a new
    # tensor (`new_empty`, slice writes: copies and `slice_scatter`), Llama-4's complex RoPE
    # (`view_as_complex`, `polar`, `view_as_real`) and chunk numbers (`//`); and a gather and a
    # scatter along the tokens, which read across rows.
    values, picks = x.topk(2, dim=-1)
    kept = torch.full_like(x, float("-inf")).scatter(1, picks, values)
    chosen = x.softmax(-1).gather(-1, picks)
    group = torch.zeros_like(x).scatter_(1, picks, 1.0).scatter_add(1, picks, values)
    halves = x.new_empty(x.shape)
    halves[:, :4] = x[:, 4:] * 2
    halves[:, 4:] = x[:, :4]
    turned = torch.view_as_real(torch.view_as_complex(x.reshape(-1, 4, 2)) * torch.polar(torch.ones_like(x[:, :4]),
                                                                                           x[:, :4]))
    chunk = torch.arange(8).expand_as(x) * x.floor_divide(0.5)
    rows = picks.clamp(max=4)  # (row numbers: the calls have 5 and 8 rows)
    across = x.gather(0, rows).sum(-1, keepdim=True) + torch.zeros_like(x).scatter(0, rows, values).sum(0)
    return kept, chosen, group, halves, turned.flatten(1), chunk, across


def test_router_and_rope_ops_along_a_row_split(plans: list[tuple], split_calls: list[int]) -> None:
    """The ops routers and RoPE run on each token's row (fills shaped as a row, gathers and
    scatters along it, a new tensor written in slices, complex views, `polar`, `//`) run per
    nano-batch (they ran whole: every nano-batch waited there for all the others), equal to
    eager; a gather and a scatter along the tokens stay whole."""
    # (Complex products round differently, by an ulp, over 2 or 3 rows than over 5: vectorized.)
    _split_in_two_equals_eager(_router_and_rope_rows, 8, split_calls, tolerance=1e-6)
    ((gm, plan),) = plans
    aten = torch.ops.aten
    indexed = (aten.gather.default, aten.scatter.src, aten.scatter.value, aten.scatter_add.default)
    along_tokens = {n.name for n in gm.graph.nodes if n.target in indexed and n.args[1] == 0}
    assert len(along_tokens) == 2
    wanted = {aten.full_like.default, aten.zeros_like.default, aten.ones_like.default, aten.new_empty.default,
              aten.copy.default, aten.slice_scatter.default, aten.view_as_complex.default, aten.view_as_real.default,
              aten.polar.default, aten.floor_divide.default, *indexed}
    found = {n.target for n in gm.graph.nodes}
    assert wanted <= found, wanted - found
    assert all(plan.split[n.name] is (n.name not in along_tokens) for n in gm.graph.nodes if n.target in wanted)


def test_the_row_rules_check_every_operand() -> None:
    """A gather, a scatter or a slice write along a row splits only when all its tensors hold the
    tokens at the output's token dim: an index or a source without them, along the tokens or
    of another count of rows would read (or write) across rows."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from tileflow.passes.nanobatch import _is_token_wise

    def fn(x, i, v, few):
        return (x.gather(1, i), x.scatter(1, i, v), x.slice_scatter(v, 1, 0, 2), x.gather(1, few),
                x.slice_scatter(x * 2, 0, 0), x.slice_scatter(x[:2], 0, 0, 2))

    gm = make_fx(fn, tracing_mode="symbolic")(torch.randn(5, 8), torch.zeros(5, 2, dtype=torch.long), torch.randn(5, 2),
                                              torch.zeros(3, 2, dtype=torch.long))
    nodes = [n for n in gm.graph.nodes if n.op in ("placeholder", "call_function")]
    x, i, v, few = nodes[:4]
    gather, scatter, write, gather_few, write_all, write_two = [n for n in nodes[4:] if n.target in (
        torch.ops.aten.gather.default, torch.ops.aten.scatter.src, torch.ops.aten.slice_scatter.default)]
    rows = {n.name: 0 for n in nodes}
    ops = [gather, scatter, write]
    assert all(_is_token_wise(n, rows) for n in ops)
    for operand in (i, v):
        users = [n for n in ops if operand in n.all_input_nodes]
        assert not any(_is_token_wise(n, {**rows, operand.name: None}) for n in users)
        assert not any(_is_token_wise(n, {**rows, operand.name: 1}) for n in users)
    assert not any(_is_token_wise(n, {name: 1 for name in rows}) for n in ops)  # along the tokens
    # An index of another count of rows (3 of them: it gathers for 3 rows only).
    assert not _is_token_wise(gather_few, rows)
    # Along the tokens, a write of every row is each row's own (a slice assignment's outer
    # write); of some rows, no.
    assert _is_token_wise(write_all, rows) and not _is_token_wise(write_two, rows)


@pytest.mark.parametrize("arch", ["llama4", "phimoe"])
def test_batched_and_max_picked_experts_run_per_nano_batch(plans: list[tuple], split_calls: list[int],
                                                           arch: str) -> None:
    """Llama-4 runs every token through every expert, `hidden.repeat(E, 1)` scaled by each
    expert's score and viewed `[E, T, H]` for batched expert GEMMs; PhiMoE routes by two max
    picks (its sparse mixer), then as Mixtral does. Both ran their experts whole, barriers. Now
    canonicalize broadcasts Llama-4's tokens (`repeat_as_broadcast`), whose rows at dim 1 its
    expert GEMMs split along, costed per token at a row in each expert's block; and PhiMoE's
    routing is proven (max picks are expert ids, never negative). Every op holding the tokens
    runs per nano-batch but attention and its mask (one sequence's queries stay together), and
    the outputs equal eager."""
    from models import MOE

    torch.manual_seed(4)
    model = MOE[arch]().eval()
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"passes": PASSES, "nano_batches": 2},
                                                                     report=report), dynamic=True)
    _prompts_equal_eager(model, compiled, [(1, 9), (1, 14)])
    assert len(split_calls) == 2
    ((gm, plan),) = plans
    grouped = [n for n in gm.graph.nodes if getattr(n.target, "_opname", None) == "grouped_gemm"]
    assert len(grouped) == 4 and all(plan.split[n.name] for n in grouped)
    (info,) = [g["extra"]["nano_batch"] for g in report.to_dict()["graphs"]]
    assert {getattr(n.target, "_opname", None) for n in gm.graph.nodes if n.name in info["barriers"]} == {
        "meta_attention"}
    attention_inputs = {a.name for n in gm.graph.nodes if getattr(n.target, "_opname", None) == "meta_attention"
                        for a in n.all_input_nodes}
    # (The mask's own ops read positions along the tokens: chunked attention's, in Llama-4.)
    whole = [n for n in gm.graph.nodes if n.op == "call_function" and plan.token_dims[n.name] is not None
             and not plan.split[n.name] and getattr(n.target, "_opname", None) != "meta_attention"]
    assert all(n.name in attention_inputs or all(u.target is not torch.ops.tileflow.grouped_gemm.default
                                                for u in n.users) for n in whole)
    assert not any(n.target is torch.ops.aten.repeat.default for n in gm.graph.nodes)
    if arch == "phimoe":
        assert info["routed_experts"] == [n.name for n in grouped]
        return
    experts, hidden = model.config.num_local_experts, model.config.hidden_size
    ffn = model.config.intermediate_size
    assert info["routed_experts"] == []  # (batched: each expert's block holds the tokens in order)
    for node in grouped:
        cost = next(c for c in plan.costs_at() if c.name == node.name)
        n, k = (2 * ffn, hidden) if node.args[3] == "swiglu" else (hidden, ffn)  # gate and up stacked; down
        assert not cost.whole and plan.token_dims[node.name] == 1
        assert (cost.flops_per_token, cost.fixed_bytes) == (2.0 * n * k * experts, 4.0 * experts * n * k)
        assert cost.weights_missed == 0.0  # (every token meets every expert)
    (graph,) = report.to_dict()["graphs"]
    assert graph["rewrites"]["repeat_as_broadcast"] == 2  # (one per MoE layer)


def _routed_experts(x: torch.Tensor, scores: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                    defect: str = "", top: int = 2, residual: bool = True) -> torch.Tensor:
    # A mixture of experts routed as transformers' grouped-GEMM experts route it (top 2 of 4 per
    # token, sort, gather, grouped GEMMs over offsets counted from the sorted ids, weights,
    # unsort, sum), or with one `defect` that makes it read across tokens.
    weights, ids = scores.softmax(-1).topk(top, dim=-1)
    flat_w, flat_ids = weights.reshape(-1), ids.reshape(-1)
    if defect == "computed ids":
        flat_ids = 3 - flat_ids  # (the experts in reverse: ids of the 4, not known never negative)
    sorted_ids, perm = torch.sort(flat_ids, descending=defect == "descending")
    rows = x[(torch.sort(flat_w)[1] if defect == "rows by another sort" else perm) // top]
    if defect == "masked rows":  # (not a defect: transformers 5.17 zeroes rows past the experts)
        rows = rows.masked_fill((sorted_ids >= w1.shape[0]).unsqueeze(-1), 0.0)
    counted = flat_ids if defect == "unsorted counts" else sorted_ids
    # (No range: histc bins over each call's own smallest and largest id.)
    span = {} if defect == "bins over the ids' range" else {"min": 0, "max": w1.shape[0] - 1}
    offsets = torch.cumsum(torch.histc(counted.float(), bins=w1.shape[0], **span), dim=0, dtype=torch.int32)
    if defect == "gate and up halves":  # (not a defect: w1 holds both, the output cut in two)
        gate, up = torch.ops.tileflow.grouped_gemm(rows, w1, offsets).chunk(2, dim=-1)
        hidden = torch.nn.functional.silu(gate) * up
    else:
        hidden = torch.ops.tileflow.grouped_gemm(rows, w1, offsets, "silu")
    if defect == "row halves swapped":
        hidden = torch.cat(hidden.chunk(2, dim=0)[::-1])
    y = torch.ops.tileflow.grouped_gemm(hidden, w2, offsets)
    y = (y.cumsum(0) if defect == "cumsum over rows" else y) * flat_w[perm].unsqueeze(-1)
    if defect == "put back by argsort":  # (not a defect: argsort(P) is P's inverse too)
        y = y[torch.argsort(perm)]
    elif defect != "no unsort":
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.size(0))
        y = y[inverse]
    return y.view(x.shape[0], top, x.shape[1]).sum(1) + (x if residual else 0)


def _compile_routed(defect: str, k: int, report: tileflow.Report, top: int = 2,
                    route: Callable[..., torch.Tensor] | None = None) -> None:
    """`_routed_experts` with `defect` (or `route(x, scores, w1, w2, top)`) compiled with k
    nano-batches, equal to eager at 5, 9 and 16 tokens."""
    torch.manual_seed(11)
    w1, w2 = torch.randn(4, 16 if defect == "gate and up halves" else 8, 16) / 4, torch.randn(4, 16, 8) / 4
    if route is None:
        fn = lambda x, scores: _routed_experts(x, scores, w1, w2, defect, top)  # noqa: E731
    else:
        fn = lambda x, scores: route(x, scores, w1, w2, top)  # noqa: E731
    compiled = torch.compile(fn, backend=tileflow.TileflowBackend(
        {"passes": ("canonicalize", "nanobatch"), "nano_batches": k}, report=report))
    for tokens in (5, 9, 16):
        x, scores = torch.randn(tokens, 16), torch.randn(tokens, 4)
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(scores, 0)
        torch.testing.assert_close(compiled(x, scores), fn(x, scores), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("k", "top", "form"), [(2, 2, ""), (3, 2, ""), (2, 1, ""), (2, 2, "gate and up halves"),
                                                (2, 2, "put back by argsort")])
def test_a_mixture_of_experts_routing_runs_per_nano_batch(plans: list[tuple], split_calls: list[int], k: int,
                                                          top: int, form: str) -> None:
    """The routing of a mixture of experts (sort, gather, grouped GEMMs, unsort) ran whole, a
    barrier between every nano-batch's ops before it and after it. As a whole it computes each
    token's rows from that token's alone (`tileflow.routing` proves it op by op), so each
    nano-batch now runs it over its own tokens: its own sort, counts and grouped GEMMs, equal to
    eager, with each token's top 2 of 4 experts and its top 1 (whose ids `[T, 1] -> [T]` are
    still the router's). The report names the experts run so; none is a barrier. So with one
    expert GEMM over the gate and up weights whose output is cut in two (Hunyuan-V4's and
    MiniMax-M3's experts: the `split` had stopped the proof), and with the rows put back in token
    order by `argsort(P)` rather than `index_put`."""
    report = tileflow.Report()
    _compile_routed(form, k, report, top)
    assert len(split_calls) == 3
    ((gm, plan),) = plans
    grouped = [n.name for n in gm.graph.nodes if getattr(n.target, "_opname", None) == "grouped_gemm"]
    routing = {n.name for n in gm.graph.nodes if n.target in (
        torch.ops.aten.sort.default, torch.ops.aten.histc.default, torch.ops.aten.cumsum.default,
        torch.ops.aten.index_put.default, torch.ops.aten.arange.default, torch.ops.aten.empty_like.default)}
    assert len(grouped) == 2 and len(routing) == (4 if form == "put back by argsort" else 6)
    assert routing | set(grouped) <= plan.routed
    # Every op holding tensors runs per nano-batch (left whole: only the token count's arithmetic).
    assert all(plan.split[n.name] for n in gm.graph.nodes
               if n.op == "call_function" and isinstance(n.meta.get("val"), (torch.Tensor, tuple)))
    schedule = plan.schedule(plan.sizes(9))
    assert sorted(op.original for op in schedule.ops.values() if op.original in grouped) == sorted(grouped * k)
    (info,) = [g["extra"]["nano_batch"] for g in report.to_dict()["graphs"]]
    assert info["routed_experts"] == grouped and info["barriers"] == []


def test_batched_experts_of_any_count_share_one_graph(plans: list[tuple], split_calls: list[int]) -> None:
    """A batched grouped GEMM whose expert count is symbolic (its weights an input of
    `dynamic=True`) splits along its tokens in one graph for every count: costing it per token
    had read the count's value, pinning it (a recompile per count)."""
    def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # (Attention's queries tell the token symbol among the inputs' several.)
        q = x.view(1, x.shape[0], 2, 4).transpose(1, 2)
        a = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(-1, 8)
        return torch.ops.tileflow.grouped_gemm(a.unsqueeze(0).expand(w.shape[0], -1, -1), w, None).sum(0)

    compiled = torch.compile(fn, backend=tileflow.TileflowBackend({"passes": PASSES, "nano_batches": 2}), dynamic=True)
    for tokens, experts in ((5, 4), (8, 3), (7, 5)):
        x, w = torch.randn(tokens, 8), torch.randn(experts, 16, 8)
        torch.testing.assert_close(compiled(x, w), fn(x, w), rtol=1e-5, atol=1e-5)
    assert len(plans) == 1 and len(split_calls) == 3
    ((gm, plan),) = plans
    (grouped,) = [n for n in gm.graph.nodes if getattr(n.target, "_opname", None) == "grouped_gemm"]
    cost = next(c for c in plan.costs_at() if c.name == grouped.name)
    assert plan.split[grouped.name] and not cost.whole


def test_router_ids_are_picked_indices() -> None:
    """Expert ids the routing counts from 0 must never be negative: a top-k's indices, a max's or
    a min's (PhiMoE picks one expert at a time), concatenations of such, through views and casts
    that keep their order, and such ids with some set to a number not negative (Zaya sends its
    "no expert" picks to expert 0), and any integers modulo a positive number. A pick's values,
    an argsort's order, a concatenation holding anything else, ids with some set to -1 and ids
    otherwise computed (`3 - id`) are no such ids."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from tileflow.routing import _router_ids

    def fn(scores):
        first, second = scores.max(-1, keepdim=True), scores.min(-1, keepdim=True)
        top = scores.topk(2, -1)
        return (top[1].reshape(-1), torch.cat([first[1], second[1]], -1).int(), top[0],
                torch.cat([first[1], scores.argsort(-1)[:, :1]], -1), torch.cat([first[1], first[1] - 1], -1),
                top[1].to(torch.int8), top[1].masked_fill(top[1] == 3, 0), top[1].masked_fill(top[1] == 3, -1),
                (top[1] - 5) % 4, 3 - top[1])

    gm = make_fx(fn, tracing_mode="symbolic")(torch.randn(5, 4))
    outputs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    assert [_router_ids(n) for n in outputs] == [True, True, False, False, False, False, True, False, True, False]


EXPERT_SCALES = torch.rand(4, 16, generator=torch.Generator().manual_seed(3)) + 0.5


def _routed_a_route_a_row(x: torch.Tensor, scores: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                          top: int) -> torch.Tensor:
    # ERGO's experts: each token's row repeated once per pick (`repeat_interleave`), routed one
    # route a row (`P // 1`) with unit weights (`new_ones`), each routed row scaled by its
    # expert's norm weights (`scale[ids]`), then weighted and summed per token.
    weights, ids = scores.softmax(-1).topk(top, dim=-1)
    repeated, flat_ids = x.repeat_interleave(top, dim=0), ids.reshape(-1, 1)
    sorted_ids, perm = torch.sort(flat_ids.reshape(-1))
    unit = repeated.new_ones(flat_ids.shape).reshape(-1)
    offsets = torch.cumsum(torch.histc(sorted_ids.float(), bins=4, min=0, max=3), dim=0, dtype=torch.int32)
    hidden = torch.ops.tileflow.grouped_gemm(repeated[perm // 1], w1, offsets, "silu")
    y = torch.ops.tileflow.grouped_gemm(hidden, w2, offsets) * unit[perm].unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.size(0))
    y = y[inverse] * EXPERT_SCALES[flat_ids.reshape(-1).clamp_max(3)]
    return (y.view(x.shape[0], top, -1) * weights.unsqueeze(-1)).sum(1)


def _assert_routed_per_nano_batch(plans: list[tuple], k: int, route: Callable[..., torch.Tensor]) -> tuple:
    """Compile `route` with k nano-batches (`_compile_routed`: equal to eager) and check that its
    grouped GEMMs ran per nano-batch, none a barrier; returns the (graph module, plan) run."""
    report = tileflow.Report()
    _compile_routed("", k, report, route=route)
    ((gm, plan),) = plans
    grouped = [n.name for n in gm.graph.nodes if getattr(n.target, "_opname", None) == "grouped_gemm"]
    (info,) = [g["extra"]["nano_batch"] for g in report.to_dict()["graphs"]]
    assert info["routed_experts"] == grouped and info["barriers"] == [], (info, report.fallbacks)
    return gm, plan


@pytest.mark.parametrize("k", [2, 3])
def test_a_routing_of_one_route_a_row_runs_per_nano_batch(plans: list[tuple], k: int) -> None:
    """ERGO routes each token's row repeated once per pick: its reshapes merge a token's picks
    into rows (`[T, k, H] -> [k*T, H]`, `[T, k] -> [k*T, 1]`), its permutation is divided by 1,
    its unit weights are `new_ones` the size of the routed rows and an expert's scales are looked
    up by the unsorted ids. Each was an op the proof did not know (the experts ran whole, a
    barrier); now the routing runs per nano-batch, equal to eager."""
    _assert_routed_per_nano_batch(plans, k, _routed_a_route_a_row)


def _routed_with_constants_per_row(x: torch.Tensor, scores: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                                   top: int) -> torch.Tensor:
    # Constants the size of the routed rows made by factories whose first argument is the size.
    weights, ids = scores.softmax(-1).topk(top, dim=-1)
    sorted_ids, perm = torch.sort(ids.reshape(-1))
    offsets = torch.cumsum(torch.histc(sorted_ids.float(), bins=4, min=0, max=3), dim=0, dtype=torch.int32)
    rows = perm.size(0)
    hidden = torch.ops.tileflow.grouped_gemm(x[perm // top] * torch.full((rows, 1), 2.0)[perm], w1, offsets, "silu")
    y = torch.ops.tileflow.grouped_gemm(hidden, w2, offsets)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(rows)
    y = y[inverse] * torch.ones(rows, 1) + torch.zeros(rows, 1)
    return (y.view(x.shape[0], top, -1) * weights.unsqueeze(-1)).sum(1) + x


@pytest.mark.parametrize("k", [2, 3])
def test_constants_sized_by_the_routed_rows_run_per_nano_batch(plans: list[tuple], k: int) -> None:
    """`torch.ones(k*T, 1)` (and `zeros`, `full`) in a routing: the proof takes them as a
    constant per routed row, and each nano-batch makes them at its own rows' count. (The runner
    resized only the `new_` factories, whose size is their second argument: these were made at
    the whole step's rows, and the first nano-batch's product crashed.)"""
    gm, plan = _assert_routed_per_nano_batch(plans, k, _routed_with_constants_per_row)
    factories = {n.target for n in gm.graph.nodes if n.name in plan.routed}
    assert {torch.ops.aten.ones.default, torch.ops.aten.zeros.default, torch.ops.aten.full.default} <= factories


@pytest.mark.parametrize(("form", "top"), [("centred input", 2), ("centred input", 1), ("chained layers", 2)])
def test_routings_beside_values_whole_by_nature_run_per_nano_batch(plans: list[tuple], split_calls: list[int],
                                                                  form: str, top: int) -> None:
    """A routing whose input a token-wise op computes from a value whole by nature (rows centred
    by their mean over the tokens), or from another routing's output directly (two MoE layers,
    no residual between them), runs per nano-batch, equal to eager, with one expert a token too
    (whose permutation's readers split as token-wise and join the routing). (Taking every
    reader of a whole value in, to reach a top-1 routing's sort, took such values in too, and
    refused the routing.)"""
    torch.manual_seed(12)
    w1, w2 = torch.randn(4, 8, 16) / 4, torch.randn(4, 16, 8) / 4
    w3, w4 = torch.randn(4, 8, 16) / 4, torch.randn(4, 16, 8) / 4
    if form == "centred input":
        fn = lambda x, scores: _routed_experts(x - x.mean(0, keepdim=True), scores, w1, w2, top=top)  # noqa: E731
    else:
        fn = lambda x, scores: _routed_experts(  # noqa: E731
            _routed_experts(x, scores, w1, w2, residual=False), scores, w3, w4)
    compiled = torch.compile(fn, backend=tileflow.TileflowBackend({"passes": ("canonicalize", "nanobatch"),
                                                                   "nano_batches": 2}))
    for tokens in (5, 9):
        x, scores = torch.randn(tokens, 16), torch.randn(tokens, 4)
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(scores, 0)
        torch.testing.assert_close(compiled(x, scores), fn(x, scores), rtol=1e-5, atol=1e-5)
    assert len(split_calls) == 2
    ((gm, plan),) = plans
    grouped = [n.name for n in gm.graph.nodes if getattr(n.target, "_opname", None) == "grouped_gemm"]
    assert len(grouped) == (2 if form == "centred input" else 4) and set(grouped) <= plan.routed


@pytest.mark.parametrize(("defect", "op", "top"), [
    ("descending", "sort", 2), ("unsorted counts", "histc", 2), ("cumsum over rows", "cumsum", 2), ("no unsort", "view", 2),
    ("rows by another sort", "grouped_gemm", 2), ("computed ids", "histc", 2), ("bins over the ids' range", "histc", 2),
    ("descending", "sort", 1), ("unsorted counts", "histc", 1), ("cumsum over rows", "cumsum", 1),
    ("row halves swapped", "split", 2)])
def test_routing_that_reads_across_tokens_runs_whole(plans: list[tuple], defect: str, op: str, top: int) -> None:
    """A routing with one op that reads across the tokens (groups sorted the other way from the
    offsets, offsets counted from the unsorted ids, a cumulative sum down the rows, rows left in
    expert order, rows sorted by something else than their experts, the rows' two halves swapped)
    is not proven, runs whole (equal to eager), and the report says which op stopped it. So are offsets counted from ids
    the router did not give (here 3 - id, not known to be never negative: a negative id's rows
    would be left out of a count from 0 at the front, shifting every group after them); and a histogram without a range, whose bins span each call's own smallest and
    largest id. With one expert a token too (the report named the gather after the sort, which
    the search for the routing's ops had not reached)."""
    report = tileflow.Report()
    _compile_routed(defect, 2, report, top)
    ((gm, plan),) = plans
    grouped = [n.name for n in gm.graph.nodes if getattr(n.target, "_opname", None) == "grouped_gemm"]
    assert not plan.routed and not any(plan.split[name] for name in grouped)
    (graph,) = report.to_dict()["graphs"]
    (why,) = [f["reason"] for f in graph["fallbacks"] if f["node"] == grouped[0]]
    assert why.startswith("the experts run whole, a barrier between nano-batches: ") and f"({op})" in why
    assert set(graph["extra"]["nano_batch"]["barriers"]) == set(grouped)


@pytest.mark.parametrize("form", ["", "masked rows"])
def test_rows_masked_by_their_sorted_ids_route_per_nano_batch_over_sequences(form: str) -> None:
    """Transformers 5.17 zeroes the gathered rows whose sorted id is past the experts
    (`masked_fill(hidden[P // k], (sorted_ids >= E).unsqueeze(-1), 0)`). Over sequences the
    sort's items split, and the comparison and unsqueeze between them and the mask are split ops
    the routing took in only when they read a sort's item directly: the experts ran whole, a
    barrier (Mixtral on the GPU machine's transformers). Now ops reading the routing through
    other split ops join it: both forms route per nano-batch, equal to eager."""
    torch.manual_seed(11)
    w1, w2, router = torch.randn(4, 8, 16) / 4, torch.randn(4, 16, 8) / 4, torch.randn(16, 4)

    def fn(x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q = x.view(b, s, 2, 8).transpose(1, 2)  # (attention tells the sequences from the tokens)
        x = x + torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(b, s, h)
        flat = x.reshape(b * s, h)
        return _routed_experts(flat, flat @ router, w1, w2, form).view(b, s, h)

    report = tileflow.Report()
    compiled = torch.compile(fn, backend=tileflow.TileflowBackend(
        {"passes": ("canonicalize", "attention", "nanobatch"), "nano_batches": 2}, report=report))
    for batch, length in ((3, 5), (4, 7)):
        x = torch.randn(batch, length, 16)
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(x, 1)
        torch.testing.assert_close(compiled(x), fn(x), rtol=1e-5, atol=1e-5)
    (info,) = [g["extra"]["nano_batch"] for g in report.to_dict()["graphs"]]
    assert info["split_over"] == "sequences" and len(info["routed_experts"]) == 2 and not report.fallbacks


def test_a_mixture_of_experts_routes_per_nano_batch_over_sequences(plans: list[tuple], split_calls: list[int]) -> None:
    """Over the sequences of a batch (a prefill of `[B, S]` prompts, decode steps over a cache)
    Mixtral's experts ran whole, barriers between the nano-batches. Each nano-batch now routes
    its own sequences' tokens (`tileflow.routing` over `B*S` rows; the router's flattened ids
    split already, each sequence's block whole), every routing op split, the logits of every
    step equal to eager at 3 and 5 sequences (uneven pieces)."""
    torch.manual_seed(6)
    model = one_layer(build("mixtral")).eval()
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"passes": PASSES, "nano_batches": 2},
                                                                     report=report), dynamic=True)
    for batch in (3, 5):
        ids = torch.randint(0, VOCAB, (batch, 6))
        for got, want in zip(_decoded(model, compiled, ids), _decoded(model, model, ids)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(split_calls) == 2 * 3
    for (gm, plan), info in zip(plans, [g.extra["nano_batch"] for g in report.graphs]):
        grouped = [n.name for n in gm.graph.nodes if getattr(n.target, "_opname", None) == "grouped_gemm"]
        sorts = [n.name for n in gm.graph.nodes if n.target is torch.ops.aten.sort.default]
        assert info["split_over"] == "sequences" and len(grouped) == 2 and len(sorts) == 1
        assert info["routed_experts"] == grouped and info["barriers"] == []
        assert set(grouped + sorts) <= plan.routed
        # (Whole: only what holds no sequences, the rotary table, and the cache's concatenation
        # along its length.)
        assert all(plan.split[n.name] for n in gm.graph.nodes if n.op == "call_function"
                   and plan.token_dims[n.name] is not None and n.target is not torch.ops.aten.cat.default)


def test_auto_costs_a_mixture_of_experts_per_nano_batch(
        halving_search: list[tuple[list, int]], plans: list[tuple], split_calls: list[int]) -> None:
    """Mixtral's experts (two grouped GEMMs per layer) are in the split search's costs, most of
    the layer's FLOPs, per token: the top-2 rows a token routes, and per launch the weights of
    the experts its tokens reach. Their routing runs per nano-batch (`tileflow.routing`), along the tokens and over
    the sequences alike (they ran whole there, barriers), so they are chain ops like any GEMM,
    a sequence counting its S tokens' rows (S at its power-of-two bucket, as the padded GEMMs'
    rows are). A heavy op that runs whole is a barrier (one sequence's attention, whose queries
    stay together)."""
    torch.manual_seed(5)
    model = one_layer(build("mixtral")).eval()
    experts, top = model.config.num_local_experts, model.config.num_experts_per_tok
    hidden, ffn = model.config.hidden_size, model.config.intermediate_size
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"passes": PASSES, "nano_batches": "auto"}),
                             dynamic=True)
    _prompts_equal_eager(model, compiled, [(1, 7), (1, 12), (3, 5)])
    assert len(split_calls) == 3
    (tokens_gm, tokens_plan), (seqs_gm, seqs_plan) = plans
    per_row = {  # by output width, (FLOPs, bytes, weight bytes) of a routed row, fp32: gate and up stacked, then down
        ffn: (2.0 * 2 * ffn * hidden, 4.0 * (2 * ffn + hidden), 4.0 * experts * 2 * ffn * hidden),
        hidden: (2.0 * hidden * ffn, 4.0 * (hidden + ffn), 4.0 * experts * hidden * ffn),
    }
    barriers = []
    for gm, plan, rows in ((tokens_gm, tokens_plan, top), (seqs_gm, seqs_plan, top * 8)):  # (S = 5, at its bucket 8)
        grouped = [n for n in gm.graph.nodes if getattr(n.target, "_opname", None) == "grouped_gemm"]
        heavy = [n.name for n in gm.graph.nodes if getattr(n.target, "_opname", None) in (
            "padded_gemm", "grouped_gemm", "meta_attention")]
        assert len(grouped) == 2 and [c.name for c in plan.profile] == heavy
        router = heavy.index(grouped[0].name) - 1  # (the gate GEMM, [H -> E])
        assert plan.profile[router].flops_per_token == 2.0 * hidden * experts
        for node in grouped:
            cost = next(c for c in plan.costs_at() if c.name == node.name)
            flops, nbytes, weights = per_row[node.meta["val"].shape[-1]]
            assert not cost.whole and plan.split[node.name] and node.name in plan.routed
            assert (cost.flops_per_token, cost.bytes_per_token, cost.fixed_bytes) == (flops * rows, nbytes * rows, weights)
            # A unit reads the experts its tokens reach: one token misses each with chance 1 - top/E.
            assert cost.weights_missed == pytest.approx((1 - top / experts) ** (rows / top))
        barriers.append({c.name for c in plan.costs_at() if c.whole})
        assert barriers[-1] == {name for name in heavy if not plan.split[name]}
    def named(gm: torch.fx.GraphModule, op: str) -> set[str]:
        return {n.name for n in gm.graph.nodes if getattr(n.target, "_opname", None) == op}

    # Along one sequence's tokens its attention runs whole; over the sequences nothing does.
    assert barriers == [named(tokens_gm, "meta_attention"), set()]
    # The search saw them as such.
    assert [{c.name for c in costs if c.whole} for costs, _ in halving_search] == [barriers[0]] * 2 + [barriers[1]]


def test_heavy_ops_that_run_whole_are_costed_as_barriers(
        halving_search: list[tuple[list, int]], plans: list[tuple], split_calls: list[int],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The split search costed every GEMM and attention as split per nano-batch, those that run
    whole too: one sequence's attention (its queries stay together) and the head over the last
    token's row only (`logits_to_keep=1`), whose one row the search counted once per token. Each
    is a barrier now, costed per token by its rows over the token count: attention's S query
    rows over S tokens, the head's 1 row over T (at T's power-of-two bucket, as the search sees
    sizes). The report's timeline draws each once, and on (simulated) streams each launches
    over the whole device, as the model has it."""
    torch.manual_seed(3)
    model = one_layer(build("llama")).eval()
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"passes": PASSES, "nano_batches": "auto"},
                                                                     report=report), dynamic=True)
    for length in (7, 12):
        ids = torch.randint(0, VOCAB, (1, length))
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids, use_cache=False, logits_to_keep=1).logits,
                                       model(ids, use_cache=False, logits_to_keep=1).logits, rtol=1e-5, atol=1e-5)
    assert len(split_calls) == 2
    ((gm, plan),) = plans
    gemms = [n.name for n in gm.graph.nodes if getattr(n.target, "_opname", None) == "padded_gemm"]
    (attention,) = [n.name for n in gm.graph.nodes if getattr(n.target, "_opname", None) == "meta_attention"]
    head = gemms[-1]
    whole = {c.name for c in plan.profile if c.whole}
    assert whole == {attention, head} == {c.name for c in plan.profile if not plan.split[c.name]}
    (tokens,) = plan.example_values  # (the one size symbol: the token count, 7 at the example)
    assert plan.whole_rows == {attention: 1, head: 1 / tokens}
    costs = {c.name: c for c in plan.costs_at()}
    row = next(c for c in plan.profile if c.name == head)  # (per row: 2 * vocabulary * hidden FLOPs)
    assert row.flops_per_token == 2.0 * VOCAB * model.config.hidden_size
    assert costs[head].flops_per_token == row.flops_per_token / 8 and costs[head].fixed_bytes == row.fixed_bytes
    (info,) = [g.extra["nano_batch"] for g in report.graphs]
    drawn = collections.Counter(e["op"] for e in info["timeline"])
    assert all(drawn[name] == 1 for name in whole) and all(drawn[name] == len(info["sizes"]) == 2 for name in gemms[:-1])
    assert {e["op"] for e in info["timeline"] if e["nano_batch"] is None} == whole == set(info["barriers"])
    # On streams (simulated), they launch over the whole device, as the model has them; the
    # split GEMMs over their stream's share.
    import tileflow.runtime.streams as streams_runtime
    from tileflow.runtime.streams import SimulatedStreams

    executor, launched, run_op = SimulatedStreams(seed=4), {}, nanobatch_runtime.ScheduleState.run_op
    monkeypatch.setattr(nanobatch_runtime.NanoBatchRunner, "_executor_for", lambda self, device: executor)
    monkeypatch.setattr(nanobatch_runtime.ScheduleState, "run_op", lambda self, op: launched.setdefault(
        op.original, set()).add(streams_runtime._GRID_SHARE.get()) or run_op(self, op))
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, use_cache=False, logits_to_keep=1).logits,
                                   model(ids, use_cache=False, logits_to_keep=1).logits, rtol=1e-5, atol=1e-5)
    assert all(launched[name] == {None} for name in whole) and all(launched[name] == {0.75} for name in gemms[:-1])


def test_a_whole_op_whose_rows_are_known_only_at_run_time_is_a_barrier_without_costs_per_unit() -> None:
    """Rows counted by a size the step computes (an unbacked symbol: how many rows a data-dependent
    op kept) are no expression of the inputs' sizes: the op stays in the model as a barrier, with
    its weights read once and no cost per unit (its costs are the same split or not), rather than
    leaving the model free to overlap across it."""
    import sympy
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from tileflow.passes.nanobatch import NanoBatchPlan, _rows_over_count
    from tileflow.search import OpProfile

    tokens = sympy.Symbol("s0", integer=True, positive=True)
    kept = ShapeEnv().create_unbacked_symint()
    assert _rows_over_count(2 * kept, tokens, {tokens}) is None
    assert _rows_over_count(3, tokens, {tokens}) == 3 / tokens and _rows_over_count(3, None, {tokens}) is None
    experts = OpProfile("experts", "compute", 1e6, 1e3, 5e8, whole=True)
    gemm = OpProfile("gemm", "compute", 2e6, 1e3, 1e7)
    plan = NanoBatchPlan("auto", (0, 0), {}, {}, [], [], profile=[gemm, experts], whole_rows={"experts": 0},
                         example_values={tokens: 5})
    assert plan.costs_at() == [gemm, OpProfile("experts", "compute", 0.0, 0.0, 5e8, whole=True)]
