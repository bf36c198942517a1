"""The serving engine's nano-batch cuts (`tileflow.serving.nano_batches`): cutting a step's
entries at token sizes, and `nano_batches="auto"`, which cuts a step where the split search's
cost model says the split wins."""

from __future__ import annotations

import copy
import math
from itertools import accumulate

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tileflow import search
from tileflow.devices import get_device
from tileflow.passes.disaggregate import AttentionCut, Stage, StageProgram
from tileflow.passes.nanobatch import AttentionCost
from tileflow.search import OpProfile, split_wins
from tileflow.serving import Entry, Request, ServingEngine, split_entries_at
from tileflow.serving.nano_batches import AutoSplit

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
    """The groups keep the entries whole and in order, none empty; each cut the sizes make
    falls on the entry boundary nearest it (so sizes on boundaries are kept exactly); cutting at
    the result's own sizes gives it again."""
    entries = _entries(lengths)
    total = sum(lengths)
    cuts = sorted(data.draw(st.lists(st.integers(0, total), max_size=4)))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, total])]
    groups = split_entries_at(entries, sizes)
    assert [e for g in groups for e in g] == entries and all(groups)
    bounds = list(accumulate(lengths))[:-1]
    made = list(accumulate(_tokens(groups)))[:-1]
    for target in cuts:
        if bounds:
            nearest = min(bounds, key=lambda b: (abs(b - target), b))
            assert nearest in made, (target, nearest, made)
    assert set(made) <= set(bounds)
    on_bounds = [c for c in cuts if c in bounds]
    assert set(on_bounds) <= set(made)
    assert split_entries_at(entries, _tokens(groups)) == groups


def test_entries_refuse_sizes_of_another_total() -> None:
    with pytest.raises(ValueError, match="sum to the entries' 5 tokens"):
        split_entries_at(_entries([2, 3]), [2, 2])
    assert split_entries_at([], []) == []
    assert _tokens(split_entries_at(_entries([30]), [10, 20])) == [30]  # one entry stays whole


def llama_like_program(layers: int = 2) -> StageProgram:
    """A stage program of Llama-3-8B-like layers in bf16 (32 query heads, 8 KV heads of 128;
    GEMMs of 4096 x 6144, 4096 x 4096, 4096 x 28672 and 14336 x 4096), for the cost model alone:
    its stages run nothing."""
    d, kv, ffn, e = 4096, 1024, 14336, 2

    def gemm(name: str, n: int, k: int) -> OpProfile:
        return OpProfile(name, "compute", 2.0 * n * k, e * (n + k), float(e * n * k))

    stages, costs = [], []
    for i in range(layers + 1):
        stages.append(Stage(2 * i, "dense", []))
        costs.append(([gemm("o", d, d), gemm("gate_up", 2 * ffn, d), gemm("down", d, ffn)] if i else [])
                     + ([gemm("qkv", d + 2 * kv, d)] if i < layers else [gemm("lm_head", 128256, d)]))
        if i < layers:
            cut = AttentionCut(i, f"attention_{i}", 32, 8, 128, 128 ** -0.5, torch.bfloat16, 2 * e * (d + kv))
            stages.append(Stage(2 * i + 1, "attention", [], cut=cut))
    return StageProgram(stages, [], 2, dense_costs=costs)


def test_a_steps_costs_are_its_stages_in_order_with_attention_averaged_over_its_rows() -> None:
    """Each dense stage's GEMMs, then its attention: the rows' cost under `AttentionCost` at the
    keys rounded up to a power of two, averaged over the step's rows and rounded up to a power
    of two."""
    program = llama_like_program(1)
    auto = AutoSplit(program, H100)
    entries = _entries([1] * 6, start=999) + _entries([10], start=300)
    costs = auto.step_costs(entries)
    assert [c.name for c in costs] == ["stage0.qkv", "stage1.attention", "stage2.o", "stage2.gate_up", "stage2.down",
                                       "stage2.lm_head"]
    cut = program.stages[1].cut
    decode = AttentionCost("a", 32, 8, 128, 1, 1024, True, None, None, 2, "bfloat16").at({})
    chunk = AttentionCost("a", 32, 8, 128, 10, 512, True, None, None, 2, "bfloat16").at({})
    flops = (6 * decode.flops_per_token + 10 * chunk.flops_per_token) / 16
    nbytes = (6 * decode.bytes_per_token + 10 * chunk.bytes_per_token) / 16
    attention = costs[1]
    assert attention.resource == "memory" and attention.dtype == str(cut.dtype).removeprefix("torch.")
    for got, want in ((attention.flops_per_token, flops), (attention.bytes_per_token, nbytes)):
        assert want <= got < 2 * want and math.log2(got).is_integer()


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


def test_steps_alike_are_cut_without_costing_them_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A step of the same entry sizes over caches within the same power of two gets the answer
    kept for the first (a decode batch's caches grow by one each step), cut at its own entries;
    caches past that power of two cost the step again."""
    import tileflow.serving.nano_batches as nano_batches

    calls: list[int] = []
    real = nano_batches.split_for_count
    monkeypatch.setattr(nano_batches, "split_for_count", lambda *args, **options: calls.append(args[2]) or real(*args, **options))
    auto = AutoSplit(llama_like_program(), H100)
    first = _entries([1] * 512, start=2100)
    groups, _ = auto.split(first)
    later = _entries([1] * 512, start=4000)
    again, _ = auto.split(later)
    assert calls == [512] and _tokens(again) == _tokens(groups) and again[0][0] is later[0]
    auto.split(_entries([1] * 512, start=4100))
    assert calls == [512, 512]
    # Each decode's keys are rounded to their power of two before they are costed: a batch of
    # caches of 512 lengths costs its rows at two key counts, not at 512.
    nano_batches._attention_row_cost.cache_clear()
    ragged = [Entry(Request(i, [1] * (1800 + i), 1), [1], 1800 + i, "decode") for i in range(512)]
    auto.step_costs(ragged)
    assert nano_batches._attention_row_cost.cache_info().currsize == 2


@settings(max_examples=40, deadline=None)
@given(decodes=st.integers(0, 300), context=st.integers(1, 8192),
       chunks=st.lists(st.integers(2, 512), max_size=3), cached=st.integers(0, 2048))
def test_auto_never_runs_a_split_the_model_says_loses(decodes: int, context: int, chunks: list[int],
                                                      cached: int) -> None:
    """Over mixes of decodes and prompt chunks, a split step's nano-batches (cut at entry
    boundaries) beat running the step whole in the cost model, at the share it was costed with."""
    auto = AutoSplit(llama_like_program(), H100)
    entries = _entries([1] * decodes, start=context) + _entries(chunks, start=cached)
    if not entries:
        return
    groups, shares = auto.split(entries)
    assert [e for g in groups for e in g] == entries and all(groups)
    if len(groups) > 1:
        compute = shares[search.DEFAULT_STREAM_OF_RESOURCE["compute"]]
        assert split_wins(auto.step_costs(entries), H100, _tokens(groups), compute)
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
    assert lopsided is None and not split_wins(ops, H100, [1, 1023], 0.75)
    assert search.split_for_count(ops, H100, 1024, snap=lambda sizes: list(sizes)) == found


@pytest.fixture(scope="module")
def llama_program():
    """A tiny Llama's stage program and its eager reference."""
    import transformers

    from tileflow.distributed import CausalLMStep, build_stage_program

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg).eval()
    reference = copy.deepcopy(model)
    program = build_stage_program(CausalLMStep(model), (torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None]),
                                  max_tokens=64)
    return program, reference


def test_a_programs_dense_costs_are_its_gemms(llama_program) -> None:
    """The build keeps each dense stage's padded GEMMs' costs: the first stage's q/k/v
    projections (one GEMM over their three weights), the last's output projection, MLP and head."""
    program, _ = llama_program
    assert len(program.dense_costs) == len(program.dense) == 3
    first, *_, last = program.dense_costs
    assert [(c.flops_per_token, c.fixed_bytes) for c in first] == [(2.0 * 64 * 128, 4.0 * 64 * 128)]  # q 64, k 32, v 32
    assert [c.flops_per_token for c in last] == [2.0 * 64 * 64, 2.0 * 64 * 256, 2.0 * 128 * 64, 2.0 * 64 * 64]


@pytest.mark.parametrize("streams", [False, True])
def test_auto_serves_the_eager_tokens_cut_as_the_split_says(llama_program, monkeypatch: pytest.MonkeyPatch,
                                                           streams: bool) -> None:
    """`nano_batches="auto"` on simulated streams: each step of several entries runs cut as
    `AutoSplit.split` says (the search's answer stood in for: halves of steps of 8 tokens or
    more, snapped to entry boundaries), and the tokens are eager generation's. Without streams
    (the CPU) every step runs whole, unasked."""
    import tileflow.serving.nano_batches as nano_batches
    from tileflow.runtime.streams import SimulatedStreams

    def halves(costs: list, device: object, count: int, snap=None, **options: object):
        sizes = snap([count // 2, count - count // 2]) if count >= 8 else [count]
        return (sizes, {0: 0.75, 1: 0.25}) if len(sizes) > 1 else None

    monkeypatch.setattr(nano_batches, "split_for_count", halves)
    program, reference = llama_program
    runs: list[list[int]] = []
    forward_nano = ServingEngine._forward_nano
    monkeypatch.setattr(ServingEngine, "_forward_nano",
                        lambda self, groups: runs.append(_tokens(groups)) or forward_nano(self, groups))
    decided: list[list[int]] = []
    split = AutoSplit.split

    def spy(self: AutoSplit, entries: list[Entry]):
        groups, shares = split(self, entries)
        decided.append(_tokens(groups))
        return groups, shares

    monkeypatch.setattr(AutoSplit, "split", spy)
    engine = ServingEngine(program, token_budget=48, decode_slots=6, block_size=4, num_blocks=128,
                           nano_batches="auto", streams=SimulatedStreams(seed=1) if streams else None)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 64, (n,), generator=gen).tolist() for n in (9, 30, 4, 17, 12, 25)]
    requests = [Request(i, p, 8) for i, p in enumerate(prompts)]
    engine.run(requests)
    for r in requests:
        with torch.no_grad():
            want = reference.generate(torch.tensor([r.prompt]), attention_mask=torch.ones(1, len(r.prompt), dtype=torch.long),
                                      max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert r.tokens[len(r.prompt):] == want[0, len(r.prompt):].tolist(), r.id
    if not streams:
        assert decided == [] and runs == []
        return
    assert runs == [sizes for sizes in decided if len(sizes) > 1]
    assert engine.metrics.summary()["nano_batched_steps"] == len(runs)
    assert runs and any(len(sizes) == 1 for sizes in decided)  # some steps split, some not
    assert all(len(sizes) == 1 for sizes in decided if sum(sizes) < 8)


def test_auto_is_refused_with_graphed_stages_and_other_strings_are_refused(llama_program) -> None:
    program, _ = llama_program
    with pytest.raises(ValueError, match=r"nano_batches must be an int >= 1 \(1: no split\) or \"auto\", got 'two'"):
        ServingEngine(program, nano_batches="two")
    graphed = copy.copy(program)
    graphed.cuda_graphs = True
    with pytest.raises(ValueError, match="nano_batches='auto' runs stages of several nano-batches at once"):
        ServingEngine(graphed, nano_batches="auto")
