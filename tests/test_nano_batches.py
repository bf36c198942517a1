"""The serving engine's nano-batch cuts (`tileflow.serving.nano_batches`): cutting a step's
entries at token sizes, and `nano_batches="auto"`, which cuts a step where the split search's
cost model says the split wins."""

from __future__ import annotations

import copy
import dataclasses
import math
from itertools import accumulate

import pytest
import torch
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from tileflow import search
from tileflow.devices import get_device
from tileflow.passes.disaggregate import AttentionCut, StageProgram
from tileflow.passes.nanobatch import AttentionCost
from tileflow.search import split_wins
from tileflow.serving import Entry, Request, ServingEngine, split_entries_at
from tileflow.serving.nano_batches import AutoSplit
from test_serving import _eager_greedy, _eos

H100 = get_device("H100")


@pytest.fixture(autouse=True)
def _fresh_cache():
    search.clear_cache()
    yield
    search.clear_cache()


def _entries(lengths: list[int], start: int = 0) -> list[Entry]:
    """Entries of these token counts (prefill chunks at `start`; a count of 1 a decode)."""
    return [Entry(Request(i, [1] * (start + n), 1), [1] * n, start, "decode" if n == 1 else "prefill")
            for i, n in enumerate(lengths)]


def _tokens(groups: list[list[Entry]]) -> list[int]:
    return [sum(len(e.tokens) for e in g) for g in groups]


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=12), data=st.data())
def test_entries_cut_at_the_boundaries_nearest_the_sizes(lengths: list[int], data: st.DataObject) -> None:
    """The groups keep the entries whole and in order, none empty; the cuts are where the sizes'
    cuts move to: the nearest entry boundary or end of the step (the earlier of two as near),
    those at an end dropped (so sizes on boundaries are kept exactly); cutting at the result's
    own sizes gives it again."""
    entries = _entries(lengths)
    total = sum(lengths)
    cuts = sorted(data.draw(st.lists(st.integers(0, total), max_size=4)))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, total])]
    groups = split_entries_at(entries, sizes)
    assert [e for g in groups for e in g] == entries and all(groups)
    offsets = [0, *accumulate(lengths)]
    moved = {min(offsets, key=lambda b: (abs(b - target), b)) for target in cuts}
    assert list(accumulate(_tokens(groups)))[:-1] == sorted(moved - {0, total})
    assert split_entries_at(entries, _tokens(groups)) == groups


def test_entries_refuse_sizes_of_another_total() -> None:
    with pytest.raises(ValueError, match="sum to the entries' 5 tokens"):
        split_entries_at(_entries([2, 3]), [2, 2])
    assert split_entries_at([], []) == []
    assert _tokens(split_entries_at(_entries([30]), [10, 20])) == [30]  # one entry stays whole
    # A cut nearer an end of the step than any boundary is dropped.
    assert _tokens(split_entries_at(_entries([600, 400]), [990, 10])) == [1000]
    assert _tokens(split_entries_at(_entries([1, 1000]), [900, 101])) == [1001]


def llama_like_program(layers: int = 2) -> StageProgram:
    """bench/host.py's stage program of Llama-3-8B-like layers in bf16 (for the cost model alone:
    its stages run nothing), with the LM head."""
    import importlib
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parent.parent / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module("host").serving_program(layers, lm_head=True)


def _on_sixteenths(value: float) -> bool:
    """Whether `value` is a multiple of a sixteenth of the power of two below it."""
    return (value / math.ldexp(1.0, math.frexp(value)[1] - 5)).is_integer()


def _exact_attention(cut: AttentionCut, entries: list[Entry]) -> tuple[float, float]:
    """(FLOPs, bytes) per row of the step's attention at each entry's own key count."""
    rows = [(len(e.tokens), AttentionCost("a", cut.num_q_heads, cut.num_kv_heads, cut.head_dim, len(e.tokens),
                                          e.start + len(e.tokens), True, cut.sliding_window, cut.attention_chunk,
                                          cut.dtype.itemsize, "bfloat16").at({})) for e in entries]
    total = sum(n for n, _ in rows)
    return (sum(n * r.flops_per_token for n, r in rows) / total, sum(n * r.bytes_per_token for n, r in rows) / total)


def test_a_steps_costs_are_its_stages_in_order_with_attention_averaged_over_its_rows() -> None:
    """Each dense stage's GEMMs, then its attention: the rows' cost under `AttentionCost`, a
    decode's keys rounded up to a sixteenth of a power of two (1100 keys as 1152; a prompt
    chunk's 310 as they are), averaged over the step's rows and rounded up to a sixteenth too."""
    program = llama_like_program(1)
    auto = AutoSplit(program, H100)
    entries = _entries([1] * 6, start=1099) + _entries([10], start=300)
    costs = auto.step_costs(entries)
    assert [c.name for c in costs] == ["stage0.qkv", "stage1.attention", "stage2.o", "stage2.gate_up", "stage2.down",
                                       "stage2.lm_head"]
    cut = program.stages[1].cut
    decode = AttentionCost("a", 32, 8, 128, 1, 1152, True, None, None, 2, "bfloat16").at({})
    chunk = AttentionCost("a", 32, 8, 128, 10, 310, True, None, None, 2, "bfloat16").at({})
    flops = (6 * decode.flops_per_token + 10 * chunk.flops_per_token) / 16
    nbytes = (6 * decode.bytes_per_token + 10 * chunk.bytes_per_token) / 16
    attention = costs[1]
    assert attention.resource == "memory" and attention.dtype == str(cut.dtype).removeprefix("torch.")
    for got, want in ((attention.flops_per_token, flops), (attention.bytes_per_token, nbytes)):
        assert want <= got <= want * 17 / 16 and _on_sixteenths(got)


def test_chunked_attention_is_costed_at_the_position_in_its_chunk() -> None:
    """Under chunks of 8192 a decode at position 8199 sees 8 keys: it is costed so (rounded up
    by at most a sixteenth), not at 8200 keys rounded up."""
    import dataclasses

    program = llama_like_program(1)
    program.stages[1].cut = dataclasses.replace(program.stages[1].cut, attention_chunk=8192)
    entries = _entries([1] * 4, start=8199)
    attention = AutoSplit(program, H100).step_costs(entries)[1]
    flops, nbytes = _exact_attention(program.stages[1].cut, entries)
    assert flops <= attention.flops_per_token <= flops * 17 / 16
    assert nbytes <= attention.bytes_per_token <= nbytes * 17 / 16
    assert attention.bytes_per_token < 2 * 2 * 8 * 128 * 64  # (8200 keys would read 33 MB a row)


def test_auto_splits_a_big_decode_batch_and_runs_small_steps_whole() -> None:
    """On the H100's entry, a step of 8 decodes runs whole (each nano-batch would read every
    weight again for little attention to hide), and one of 512 decodes over 4096-token caches
    splits, the split winning at the sizes it runs."""
    auto = AutoSplit(llama_like_program(), H100)
    small = _entries([1] * 8, start=4095)
    assert auto.split(small) == ([small], None)
    big = _entries([1] * 512, start=4095)
    groups, shares = auto.split(big)
    assert len(groups) > 1 and [e for g in groups for e in g] == big
    compute = shares[search.DEFAULT_STREAM_OF_RESOURCE["compute"]]
    assert split_wins(auto.step_costs(big), H100, _tokens(groups), compute)


def test_steps_alike_are_searched_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A step of the same entry sizes whose attention costs round to the same powers of two gets
    the split searched for the first (a decode batch's caches grow by one each step), cut at
    its own entries; caches past that power of two search again. Each decode's keys are costed
    at the sixteenth of a power of two they round up to: a batch of 512 cache lengths at 7."""
    import tileflow.serving.nano_batches as nano_batches

    calls: list[int] = []
    real = search._search
    monkeypatch.setattr(search, "_search", lambda ops, device, n, *rest: calls.append(n) or real(ops, device, n, *rest))
    auto = AutoSplit(llama_like_program(), H100)
    first = _entries([1] * 512, start=2100)
    groups, _ = auto.split(first)
    later = _entries([1] * 512, start=3000)
    again, _ = auto.split(later)
    assert calls == [512] and len(groups) > 1 and _tokens(again) == _tokens(groups) and again[0][0] is later[0]
    auto.split(_entries([1] * 512, start=4100))
    assert calls == [512, 512]
    nano_batches._attention_row_cost.cache_clear()
    ragged = [Entry(Request(i, [1] * (1800 + i), 1), [1], 1800 + i, "decode") for i in range(512)]
    auto.step_costs(ragged)
    assert nano_batches._attention_row_cost.cache_info().currsize == 7  # 1856, 1920, 1984, 2048, 2176, 2304, 2432


def test_a_split_that_wins_only_at_the_searched_costs_runs_whole() -> None:
    """330 decodes over 2500-token caches: at the attention costs the search runs at (rounded up
    to powers of two, 1.5x the step's here, so that the search's cache serves every step that
    rounds alike) its bucket's split wins; on the step's own profile that split loses, and so
    does the bucket below's, so the step runs whole (another split, searched at the step's own
    costs, would win: the price of searching once per power of two)."""
    import dataclasses

    auto = AutoSplit(llama_like_program(), H100)
    entries = _entries([1] * 330, start=2500)
    costs = auto.step_costs(entries)
    rounded = [dataclasses.replace(c, flops_per_token=2.0 ** math.ceil(math.log2(c.flops_per_token)),
                                   bytes_per_token=2.0 ** math.ceil(math.log2(c.bytes_per_token)))
               if c.name.endswith("attention") else c for c in costs]
    searched = search.split_for_count(rounded, H100, 330)
    assert searched is not None and not split_wins(costs, H100, searched.sizes, searched.compute_share)
    assert search.split_for_count(rounded, H100, 330, check_profile=costs) is None
    assert auto.split(entries) == ([entries], None)


@settings(max_examples=40, deadline=None)
@example(decodes=0, context=1, chunks=[125], cached=4)  # (a chunk's keys rounded up overstated its rows by 13%)
@given(decodes=st.integers(0, 300), context=st.integers(1, 8192),
       chunks=st.lists(st.integers(2, 512), max_size=3), cached=st.integers(0, 2048))
def test_auto_never_runs_a_split_the_model_says_loses(decodes: int, context: int, chunks: list[int],
                                                      cached: int) -> None:
    """Over mixes of decodes and prompt chunks, a split step's nano-batches (cut at entry
    boundaries) beat running the step whole in the cost model, at the share it was costed with,
    on the step's profile: its attention at most (17/16)^2 above the step's exact cost (the
    search's profile, rounded up to powers of two, overstated it up to 4x: 23 of 58 splits of
    random steps lost on the step's exact costs, by up to 25%)."""
    program = llama_like_program()
    auto = AutoSplit(program, H100)
    entries = _entries([1] * decodes, start=context) + _entries(chunks, start=cached)
    if not entries:
        return
    costs = auto.step_costs(entries)
    flops, nbytes = _exact_attention(program.stages[1].cut, entries)
    for op in costs[1::5][:2]:  # (both layers' attention)
        assert op.name.endswith("attention")
        assert flops <= op.flops_per_token <= flops * (17 / 16) ** 2 and nbytes <= op.bytes_per_token <= nbytes * (17 / 16) ** 2
    groups, shares = auto.split(entries)
    assert [e for g in groups for e in g] == entries and all(groups)
    if len(groups) > 1:
        compute = shares[search.DEFAULT_STREAM_OF_RESOURCE["compute"]]
        assert split_wins(costs, H100, _tokens(groups), compute)
    else:
        assert shares is None


def test_a_snapped_split_that_loses_runs_whole() -> None:
    """`split_for_count`'s `snap` moves the cuts to where they can fall; a split moved so that it
    no longer wins runs whole, and one that snaps to a single part too."""
    from test_search import llama_layer

    ops = llama_layer(ctx=4096, layers=2)
    found = search.split_for_count(ops, H100, 1024)
    assert found is not None and len(found[0]) > 1
    assert search.split_for_count(ops, H100, 1024, snap=lambda sizes: [1024]) is None
    lopsided = search.split_for_count(ops, H100, 1024, snap=lambda sizes: [1, 1023])
    share = search.search_split(ops, H100, 1024, apply_threshold=False).compute_share
    assert lopsided is None and not split_wins(ops, H100, [1, 1023], share) and share == found.compute_share
    assert search.split_for_count(ops, H100, 1024, snap=lambda sizes: list(sizes)) == found


def test_a_checked_split_at_a_power_of_two_falls_to_the_bucket_below(monkeypatch: pytest.MonkeyPatch) -> None:
    """At a count that is its own bucket, a split refused by the check on the step's costs falls
    to the bucket below's split scaled up (stand-ins: the search halves 512 and quarters 256;
    the check refuses equal halves)."""
    from test_search import llama_layer

    from tileflow.search import SplitPlan

    def search_split(ops, device, n, **options):
        first = n // 2 if n == 512 else n // 4
        return SplitPlan(2, (first, n - first), {"compute": 0, "memory": 1}, {0: 0.75, 1: 0.25}, 1.0, 2.0)

    monkeypatch.setattr(search, "search_split", search_split)
    monkeypatch.setattr(search, "split_wins", lambda ops, device, sizes, share, **options: sizes[0] != sizes[1])
    ops = llama_layer(ctx=4096)
    assert search.split_for_count(ops, H100, 512).sizes == [256, 256]  # (searched at the count: not checked)
    assert search.split_for_count(ops, H100, 512, check_profile=ops).sizes == [128, 384]


def test_a_programs_dense_costs_are_its_gemms(llama_program) -> None:
    """The build keeps each dense stage's padded GEMMs' costs: the first stage's q/k/v
    projections (one GEMM over their three weights), the last's output projection, MLP and head."""
    program, _ = llama_program
    assert len(program.dense_costs) == len(program.dense) == 3
    first, *_, last = program.dense_costs
    assert [(c.flops_per_token, c.fixed_bytes) for c in first] == [(2.0 * 64 * 128, 4.0 * 64 * 128)]  # q 64, k 32, v 32
    assert [c.flops_per_token for c in last] == [2.0 * 64 * 64, 2.0 * 64 * 256, 2.0 * 128 * 64, 2.0 * 64 * 64]


def test_a_mixture_of_experts_programs_dense_costs_hold_its_experts() -> None:
    """Mixtral's grouped GEMMs (gate and up stacked, then down) were left out of a program's
    costs. The engine runs them per nano-batch on its own tokens, so they cost as chain ops, not
    barriers: the top-2 rows a token routes, and of the experts' weights those its tokens reach
    (under uniform routing a token misses each expert with chance 1 - 2/4, a routed row with
    that chance's square root)."""
    import transformers

    from tileflow.distributed import CausalLMStep, build_stage_program

    torch.manual_seed(0)
    hidden, ffn, experts, top = 32, 48, 4, 2
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, num_local_experts=experts, num_experts_per_tok=top)).eval()
    program = build_stage_program(CausalLMStep(model), (torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None]),
                                  max_tokens=64)
    *_, last = program.dense_costs  # the output projection, the router, the experts, the head
    assert [(c.flops_per_token, c.bytes_per_token, c.fixed_bytes, c.whole) for c in last[2:4]] == [
        (top * 2.0 * 2 * ffn * hidden, top * 4.0 * (2 * ffn + hidden), 4.0 * experts * 2 * ffn * hidden, False),
        (top * 2.0 * hidden * ffn, top * 4.0 * (hidden + ffn), 4.0 * experts * hidden * ffn, False),
    ]
    assert [c.weights_missed for c in last[2:4]] == [pytest.approx(1 - top / experts)] * 2
    assert last[2].weight_bytes(3) == pytest.approx(last[2].fixed_bytes * (1 - (1 - top / experts) ** 3))
    assert [c.weights_missed for c in last[:2]] == [0.0, 0.0]  # (dense weights: all read)
    assert [c.flops_per_token for c in last[:2]] == [2.0 * hidden * hidden, 2.0 * hidden * experts]
    assert len(last) == 5 and last[4].flops_per_token == 2.0 * hidden * 64
    # "auto" weighs them: they are in every step's costs, and a step is cut (or not) with them.
    auto, entries = AutoSplit(program, H100), _entries([1] * 6 + [20], start=30)
    costs, stage = auto.step_costs(entries), f"stage{len(program.stages) - 1}"
    assert [c for c in costs if c.name in {f"{stage}.{e.name}" for e in last[2:4]}] == [
        dataclasses.replace(e, name=f"{stage}.{e.name}") for e in last[2:4]]
    groups, _ = auto.split(entries)
    assert [e for g in groups for e in g] == entries


@pytest.mark.parametrize("streams", [False, True])
def test_auto_serves_the_eager_tokens_cut_as_the_split_says(llama_program, monkeypatch: pytest.MonkeyPatch,
                                                           streams: bool) -> None:
    """`nano_batches="auto"` on simulated streams: each step of several entries runs cut as
    `AutoSplit.split` says (the search's answer stood in for: halves of steps of 8 tokens or
    more, snapped to entry boundaries, which win), and the tokens are eager generation's. Without streams
    (the CPU) every step runs whole, unasked."""
    import tileflow.serving.nano_batches as nano_batches
    from tileflow.runtime.streams import SimulatedStreams

    def halves(costs: list, device: object, count: int, snap=None, **options: object) -> search.CountSplit | None:
        sizes = snap([count // 2, count - count // 2]) if count >= 8 else [count]
        return search.CountSplit(sizes, {0: 0.75, 1: 0.25}, 0.75) if len(sizes) > 1 else None

    monkeypatch.setattr(nano_batches, "split_for_count", halves)
    program, reference = llama_program
    runs: list[list[int]] = []
    forward_nano = ServingEngine._forward_nano
    monkeypatch.setattr(ServingEngine, "_forward_nano",
                        lambda self, groups, *rest: runs.append(_tokens(groups)) or forward_nano(self, groups, *rest))
    decided: list[list[int]] = []
    split = AutoSplit.split

    def spy(self: AutoSplit, entries: list[Entry]):
        groups, shares = split(self, entries)
        decided.append(_tokens(groups))
        return groups, shares

    monkeypatch.setattr(AutoSplit, "split", spy)
    # The device share each stage launches over: the search's, by stage kind (dense 0.75, attention 0.25).
    import tileflow.runtime.streams as streams_runtime
    import tileflow.serving.engine as engine_module

    launched: list[float | None] = []
    attended: list[float | None] = []
    running_on: list[int] = []  # the stream of the piece of work the simulated streams run now
    on_stream: set[tuple[int, float | None]] = set()  # (stream, share) of each stage launched
    grid_share, attend = engine_module.grid_share, ServingEngine._attend

    def spy_share(share: float | None):
        launched.append(share)
        on_stream.add((running_on[-1], share))
        return grid_share(share)

    monkeypatch.setattr(engine_module, "grid_share", spy_share)
    monkeypatch.setattr(ServingEngine, "_attend", lambda self, *args: attended.append(
        streams_runtime._GRID_SHARE.get()) or attend(self, *args))

    class StreamsSaid(SimulatedStreams):
        def launch(self, stream: int, fn) -> None:
            super().launch(stream, lambda: running_on.append(stream) or fn())

    engine = ServingEngine(program, token_budget=48, decode_slots=6, block_size=4, num_blocks=128,
                           nano_batches="auto", streams=StreamsSaid(seed=1) if streams else None)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 64, (n,), generator=gen).tolist() for n in (9, 30, 4, 17, 12, 25)]
    requests = [Request(i, p, 8, stop_tokens=_eos(reference)) for i, p in enumerate(prompts)]
    engine.run(requests)
    for r in requests:
        assert r.tokens[len(r.prompt):] == _eager_greedy(reference, r.prompt, 8), r.id
    if not streams:
        assert decided == [] and runs == []
        return
    assert runs == [sizes for sizes in decided if len(sizes) > 1]
    assert engine.metrics.summary()["nano_batched_steps"] == len(runs)
    assert runs and any(len(sizes) == 1 for sizes in decided)  # some steps split, some not
    assert all(len(sizes) == 1 for sizes in decided if sum(sizes) < 8)
    parts = sum(len(sizes) for sizes in runs)  # nano-batches run: each ran 3 dense stages and 2 attentions
    assert sorted(launched, key=str) == sorted([0.25] * 2 * parts + [0.75] * 3 * parts + [None] * parts, key=str)
    assert set(attended) == {0.25, None}  # (None: the steps run whole)
    # The search's streams: every dense stage on the compute stream at its share, every attention
    # on the memory stream at its (the turn collecting the logits: compute's, over the whole device).
    assert on_stream == {(0, 0.75), (1, 0.25), (0, None)}


def test_auto_is_refused_with_graphed_stages_and_other_strings_are_refused(llama_program) -> None:
    """At construction and when set later (the benchmarks switch an engine's setting)."""
    program, _ = llama_program
    with pytest.raises(ValueError, match=r"nano_batches must be an int >= 1 \(1: no split\) or \"auto\", got 'two'"):
        ServingEngine(program, nano_batches="two")
    graphed = copy.copy(program)
    graphed.cuda_graphs = True
    with pytest.raises(ValueError, match="nano_batches='auto' runs stages of several nano-batches at once"):
        ServingEngine(graphed, nano_batches="auto")
    engine = ServingEngine(program, nano_batches="auto")
    with pytest.raises(ValueError, match="got 'two'"):
        engine.nano_batches = "two"
    with pytest.raises(ValueError, match="nano_batches='auto' runs stages"):
        engine.program = graphed
    engine.nano_batches = 1
    engine.program = graphed
    with pytest.raises(ValueError, match="nano_batches=2 runs stages"):
        engine.nano_batches = 2
    assert (engine.nano_batches, engine.program) == (1, graphed)


@pytest.mark.parametrize("why", ["no GEMMs", "a failing cost model"])
def test_auto_that_cannot_cost_a_step_says_so_once_and_runs_it_whole(llama_program, monkeypatch: pytest.MonkeyPatch,
                                                                     why: str) -> None:
    """A program with no padded GEMM to cost (built without the GEMM pass), or a cost model that
    fails (a device entry without the program's dtype), leaves "auto" nothing to decide with:
    every step runs whole, with one warning saying why, and the tokens are eager's."""
    from tileflow.runtime.streams import SimulatedStreams

    program, reference = llama_program
    if why == "no GEMMs":
        program = copy.copy(program)
        program.dense_costs = [[] for _ in program.dense]
        match = "hold no padded GEMM to cost"
    else:
        import tileflow.serving.nano_batches as nano_batches

        calls: list[int] = []

        def fail(*args: object, **options: object):
            calls.append(1)
            raise ValueError("no float64 peak for H20")

        monkeypatch.setattr(nano_batches, "split_for_count", fail)
        match = "the cost model failed: no float64 peak for H20"
    engine = ServingEngine(program, token_budget=48, decode_slots=4, block_size=4, num_blocks=128,
                           nano_batches="auto", streams=SimulatedStreams(seed=2))
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8], [2, 7]]
    requests = [Request(i, p, 4, stop_tokens=_eos(reference)) for i, p in enumerate(prompts)]
    with pytest.warns(RuntimeWarning, match=match) as caught:
        engine.run(requests)
    assert len([w for w in caught if "nano_batches" in str(w.message)]) == 1
    assert engine.metrics.nano_batched_steps == 0 and engine.metrics.steps > 1
    if why != "no GEMMs":
        assert calls == [1]  # (the failure is kept: later steps do not cost themselves again)
    for r in requests:
        assert r.tokens[len(r.prompt):] == _eager_greedy(reference, r.prompt, 4), r.id


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_cut_on_either_kind_of_streams_gives_the_whole_step_logits(llama_program, data: st.DataObject) -> None:
    """A step of decodes, drafts to verify and prompt chunks (a small budget chunks the prompts,
    so later chunks run behind their cached prefix), cut anywhere at entry boundaries and run on simulated
    streams in a random interleaving, gives the logits of the step run whole and writes the same
    KV (fp32, 1e-5), each from the cache as it was before the step: on a stream per nano-batch
    (a fixed k) and on `"auto"`'s streams, one for dense stages and one for attention, at any
    shares."""
    from tileflow.runtime.streams import SimulatedStreams

    program, _ = llama_program
    streams = SimulatedStreams(seed=data.draw(st.integers(0, 2**16), label="seed"))
    max_draft = data.draw(st.integers(0, 3), label="max draft")
    engine = ServingEngine(program, token_budget=data.draw(st.integers(4 * (1 + max_draft) + 4, 36), label="budget"), decode_slots=4,
                           max_draft=max_draft, block_size=4, num_blocks=128, overlap=False, streams=streams)
    lengths = data.draw(st.lists(st.integers(1, 28), min_size=2, max_size=6), label="prompt lengths")
    gen = torch.Generator().manual_seed(len(lengths))
    prompts = [torch.randint(0, 64, (n,), generator=gen).tolist() for n in lengths]
    late = data.draw(st.integers(0, len(prompts)), label="prompts arriving late")
    for i, prompt in enumerate(prompts[:len(prompts) - late]):
        engine.add(Request(i, prompt, 6))
    for _ in range(data.draw(st.integers(0, 5), label="steps before")):
        if engine.scheduler.has_work():
            engine.step()
    for i, prompt in enumerate(prompts[len(prompts) - late:], start=len(prompts) - late):
        engine.add(Request(i, prompt, 6))  # (they join decoding requests)
    # Drafts to verify (any tokens: the logits are compared, not the acceptance).
    drafts = {r.id: torch.randint(0, 64, (max_draft,), generator=gen).tolist()
              for r in engine.scheduler.running if not r.prefilling}
    entries = engine.scheduler.schedule(drafts)
    if len(entries) < 2:
        return
    kinds = {e.kind if e.kind != "prefill" else "chunk behind its prefix" if e.start else "prompt" for e in entries}
    event(" + ".join(sorted(kinds)))
    cuts = data.draw(st.sets(st.integers(1, len(entries) - 1), min_size=1), label="cuts")
    starts = [0, *sorted(cuts), len(entries)]
    groups = [entries[a:b] for a, b in zip(starts, starts[1:])]
    compute = data.draw(st.floats(0.05, 0.95), label="compute share")
    shares = data.draw(st.sampled_from([None, {0: compute, 1: 1 - compute}]), label="stream shares")
    caches = [t for kv in engine.kvs for t in (*kv.k, *kv.v)]
    before = [t.clone() for t in caches]
    split = engine._forward_nano(groups, shares)
    assert {stream for stream, _ in streams.trace} == (set(range(len(groups))) if shares is None else {0, 1})
    written = [t.clone() for t in caches]
    for t, old in zip(caches, before):
        t.copy_(old)
    whole = engine.forward(entries, engine.prepare(entries))
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    for t, got in zip(caches, written):
        torch.testing.assert_close(got, t, rtol=1e-5, atol=1e-5)
