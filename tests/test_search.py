"""Nano-batch split search: exact against brute force, threshold behaviour, determinism, cache,
JSON, and plans that turn into valid schedules."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tileflow import search
from tileflow.devices import DEVICES, get_device
from tileflow.schedule import OpSpec, check_schedule, make_schedule
from tileflow.search import (
    OpProfile,
    SplitPlan,
    brute_force_split,
    makespan,
    op_time,
    search_split,
    split_threshold,
    split_wins,
)

H100 = get_device("H100")


def llama_layer(ctx: int, layers: int = 1, net: bool = False) -> list[OpProfile]:
    """Llama-3-8B-like decode layers in bf16: GEMMs (weights read per launch) and decode
    attention reading `ctx` tokens of KV cache per token (8 KV heads x 128)."""
    d, kv, ffn = 4096, 1024, 14336
    ops: list[OpProfile] = []
    for i in range(layers):
        ops += [
            OpProfile(f"qkv{i}", "compute", 2 * d * (d + 2 * kv), 2 * (2 * d + 2 * kv),
                      2 * d * (d + 2 * kv)),
            OpProfile(f"attn{i}", "memory", 4 * ctx * d, ctx * 2 * kv * 2),
            OpProfile(f"o{i}", "compute", 2 * d * d, 4 * d, 2 * d * d),
        ]
        if net:
            ops.append(OpProfile(f"allreduce{i}", "network", 0, 2 * d))
        ops += [
            OpProfile(f"up{i}", "compute", 4 * d * ffn, 2 * (d + 2 * ffn), 4 * d * ffn),
            OpProfile(f"down{i}", "compute", 2 * ffn * d, 2 * (d + ffn), 2 * ffn * d),
        ]
    return ops


@pytest.fixture(autouse=True)
def _fresh_cache():
    search.clear_cache()
    yield
    search.clear_cache()


def same(a: SplitPlan, b: SplitPlan) -> None:
    assert (a.k, a.sizes, a.sm_share_per_stream, a.stream_of_resource) == (
        b.k, b.sizes, b.sm_share_per_stream, b.stream_of_resource)
    assert a.makespan == b.makespan and a.baseline_makespan == b.baseline_makespan


@st.composite
def profiles(draw, barriers: bool = False):
    """Random small op chains (2-5 ops) with costs spanning compute- and memory-bound, some
    weights a mixture of experts' (read as far as a launch's tokens reach); with `barriers`,
    about one op in four whole (MoE's grouped GEMM)."""
    n = draw(st.integers(2, 5))
    ops = []
    for i in range(n):
        resource = draw(st.sampled_from(["compute", "compute", "memory", "network"]))
        ops.append(OpProfile(
            f"op{i}",
            resource,
            flops_per_token=draw(st.sampled_from([0.0, 1e6, 5e7, 4e8])),
            bytes_per_token=draw(st.sampled_from([0.0, 1e4, 5e5, 4e6])),
            fixed_bytes=draw(st.sampled_from([0.0, 3e7, 2e8])),
            whole=barriers and draw(st.sampled_from([False, False, False, True])),
            weights_missed=draw(st.sampled_from([0.0, 0.0, 0.5, 0.99])),
        ))
    return ops


GPUS = st.sampled_from(["H100-SXM", "A100-SXM", "H20"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(profiles(), profiles(barriers=True)), st.sampled_from([1, 3, 16, 100, 512, 4096]), st.integers(1, 4),
       st.sampled_from([2, 4, 6]), GPUS)
def test_search_equals_brute_force(ops, tokens, kmax, units, device):
    dev = DEVICES[device]
    kw = dict(max_nano_batches=kmax, units=units, sm_shares=(0.25, 0.5, 0.75))
    found = search_split(ops, dev, tokens, apply_threshold=False, **kw)
    same(found, brute_force_split(ops, dev, tokens, **kw))
    assert found.makespan <= found.baseline_makespan
    assert sum(found.sizes) == tokens and found.k == len(found.sizes) <= kmax


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(profiles(), profiles(barriers=True)), st.sampled_from([2, 3, 16, 100, 512, 4096]), st.integers(2, 4),
       st.sampled_from([0.25, 0.5, 0.75]),
       GPUS, st.data())
def test_the_search_bounds_are_below_every_makespan(ops, tokens, k, share, device, data) -> None:
    """The search prunes with two lower bounds, which must never exceed the modeled makespan
    (an over-estimate prunes the optimum: brute force then disagrees only now and then): the
    group bound under every k-way composition of the tokens at a share, and a candidate's
    own bound under its makespan."""
    dev = DEVICES[device]
    k = min(k, tokens)
    cuts = sorted(data.draw(st.lists(st.integers(1, tokens - 1), min_size=k - 1, max_size=k - 1, unique=True)))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, tokens])]
    net = search.DEFAULT_NET_BW_GBS
    span = makespan(ops, sizes, share, dev)
    assert search._candidate_bound(ops, sizes, share, dev, net) <= span * (1 + 1e-12)
    assert search._group_bound(ops, k, share, tokens, dev, net) <= span * (1 + 1e-12)


@pytest.mark.parametrize("ctx, tokens", [(1024, 512), (1024, 2048), (128, 4096)])
def test_search_equals_brute_force_on_llama(ctx, tokens):
    ops = llama_layer(ctx, layers=2, net=True)
    found = search_split(ops, H100, tokens, apply_threshold=False)
    same(found, brute_force_split(ops, H100, tokens))


def test_threshold_is_where_splitting_starts_to_win():
    ops = llama_layer(1024, layers=2)
    threshold = split_threshold(ops, H100)
    assert threshold is not None and 64 <= threshold <= 4096
    # Just below: the best split does not beat the baseline; at the threshold it does.
    below = brute_force_split(ops, H100, threshold - 1)
    assert below.k == 1 or below.makespan >= below.baseline_makespan
    at = brute_force_split(ops, H100, threshold)
    assert at.k >= 2 and at.makespan < at.baseline_makespan


@pytest.mark.parametrize("tokens", [1, 16, 32, 64, 128])
def test_small_steps_are_not_split(tokens):
    ops = llama_layer(1024, layers=2)
    plan = search_split(ops, H100, tokens)
    assert plan.k == 1 and plan.sizes == (tokens,)
    assert plan.makespan == plan.baseline_makespan
    assert plan.threshold is not None and tokens < plan.threshold


@pytest.mark.parametrize("ctx, tokens", [(128, 8192), (1024, 2048), (1024, 8192)])
def test_large_steps_are_split(ctx, tokens):
    # ctx=128: GEMM FLOPs dominate (compute-heavy); ctx=1024: attention is large as well.
    ops = llama_layer(ctx, layers=2)
    plan = search_split(ops, H100, tokens)
    assert plan.k >= 2 and plan.makespan < plan.baseline_makespan
    assert plan.stream_of_resource == {"compute": 0, "memory": 1}
    assert plan.sm_share_per_stream[0] + plan.sm_share_per_stream[1] == pytest.approx(1.0)


def test_deterministic_and_cached():
    ops = llama_layer(1024, layers=2, net=True)
    first = search_split(ops, H100, 2048)
    cached = len(search._PLAN_CACHE)
    assert search_split(ops, H100, 2048) == first and len(search._PLAN_CACHE) == cached
    search.clear_cache()
    second = search_split(list(ops), H100, 2048)
    assert first == second
    assert len(search._PLAN_CACHE) >= 1
    key = (search.model_signature(ops), H100, 2048)  # keyed by the device, not its name
    assert any(k[:3] == key for k in search._PLAN_CACHE)


def test_plan_json_round_trip():
    plan = search_split(llama_layer(1024, layers=2, net=True), H100, 2048)
    assert SplitPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert plan.stream_of_resource["network"] == 2 and plan.sm_share_per_stream[2] == 0.0


def test_roofline_and_contention():
    gemm = OpProfile("g", "compute", flops_per_token=2e8, fixed_bytes=1e8)
    # Few tokens: weight-read (memory) bound; many tokens: FLOP bound.
    assert op_time(gemm, 1, 1.0, H100)[1] is True
    t, bound = op_time(gemm, 8192, 0.5, H100)
    assert bound is False
    assert t == pytest.approx(2e8 * 8192 / (989e12 * 0.5) + search.LAUNCH_OVERHEAD_S)
    attn = OpProfile("a", "memory", bytes_per_token=4e6)
    # Bandwidth saturates at BW_SATURATION_SHARE of the SMs.
    assert op_time(attn, 64, search.BW_SATURATION_SHARE, H100)[0] == op_time(attn, 64, 1.0, H100)[0]
    # Two memory-bound streams overlapping are slower than the contention-free pipeline.
    mem_gemm = OpProfile("mg", "compute", flops_per_token=1e3, fixed_bytes=4e8)
    ops = [mem_gemm, attn, mem_gemm]
    sizes, share = (32, 32), 0.5
    streams, shares = search._streams_and_shares(ops, 2, share)
    times, _ = search._durations(ops, sizes, streams, shares, H100, 450.0)
    _, finish = search._list_schedule(ops, 2, streams, times)
    free = max(max(row) for row in finish)
    assert makespan(ops, sizes, share, H100) > free


def test_a_launch_reads_the_experts_its_tokens_reach() -> None:
    """A mixture of experts' launch reads the weights of the experts its tokens reach: 1 - m^n
    of them for n tokens, m the chance a token misses an expert (1 - k/E). Split in two, it
    reads more than once but less than twice; the plan cache tells such a profile from dense
    weights of the same size."""
    dense = OpProfile("experts", "compute", flops_per_token=1e3, fixed_bytes=6e8)
    routed = dataclasses.replace(dense, weights_missed=1 - 8 / 256)  # top 8 of 256 (DeepSeek-V3)
    for n in (1, 16, 64, 1024):
        assert routed.weight_bytes(n) == pytest.approx(6e8 * (1 - (1 - 8 / 256) ** n), rel=1e-12)
        assert dense.weight_bytes(n) == 6e8
        # Weight-bound at these sizes: the time is the bytes read over the bandwidth.
        assert op_time(routed, n, 1.0, H100)[0] == pytest.approx(
            routed.weight_bytes(n) / H100.mem_bw_bytes + search.LAUNCH_OVERHEAD_S, rel=1e-12)
    assert routed.weight_bytes(0) == dense.weight_bytes(0) == 0.0
    assert routed.weight_bytes(64) < 2 * routed.weight_bytes(32) < 2 * dense.weight_bytes(32)
    assert search.model_signature([routed]) != search.model_signature([dense])
    assert search_split([routed], H100, 64, apply_threshold=False).baseline_makespan < search_split(
        [dense], H100, 64, apply_threshold=False).baseline_makespan


@pytest.mark.parametrize("missed", [-0.1, 1.0, float("nan"), "0.5", True, None])
def test_bad_weights_missed_is_rejected(missed: object) -> None:
    with pytest.raises(ValueError, match="weights_missed"):
        OpProfile("x", "compute", fixed_bytes=1e6, weights_missed=missed)


def test_plan_becomes_a_valid_schedule():
    ops = llama_layer(1024, layers=1)
    plan = search_split(ops, H100, 2048)
    specs = [OpSpec(o.name, "op", o.resource) for o in ops]
    splits = {o.name: plan.ranges() for o in ops}
    edges = [(a.name, b.name, "global" if b.resource == "memory" else "token")
             for a, b in zip(ops, ops[1:])]
    sched = make_schedule(specs, splits, edges, 2048,
                          seq_bounds=list(range(0, 2049, 1)),
                          stream_of_resource=plan.stream_of_resource)
    check_schedule(sched, {o.name: 2048 for o in ops})
    assert len(sched.streams) == 2 and sched.events


def test_bad_inputs():
    with pytest.raises(ValueError, match="resource"):
        OpProfile("x", "disk")
    with pytest.raises(ValueError, match="num_tokens"):
        search_split(llama_layer(128), H100, 0)
    with pytest.raises(ValueError, match="sm_shares"):
        search_split(llama_layer(128), H100, 64, sm_shares=(1.5,), apply_threshold=False)


def test_devices_sharing_a_name_get_their_own_plans():
    """The cache is keyed by the device, not its name: a derated copy of an entry (same name,
    a twentieth of the bandwidth) must not get the original's plan."""
    import dataclasses

    ops = llama_layer(1024)
    slow = dataclasses.replace(H100, mem_bw_gbs=H100.mem_bw_gbs / 20)
    for dev in (H100, slow, H100):
        same(search_split(ops, dev, 2048, apply_threshold=False), brute_force_split(ops, dev, 2048))
        assert search_split(ops, dev, 2048).threshold == split_threshold(ops, dev)


@functools.cache
def _two_layer_threshold() -> int | None:
    """The split threshold of two Llama-like layers over 4096-token caches on the H100 entry (its
    scan is most of a runner example's time, and the same in each)."""
    return split_threshold(llama_layer(ctx=4096, layers=2), H100)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokens=st.lists(st.integers(1, 4096), min_size=1, max_size=6))
def test_auto_plans_search_once_per_bucket_and_scale_its_cuts(tokens: list[int], monkeypatch) -> None:
    """`nano_batches="auto"`: the search runs at the power-of-two bucket of each count (and the
    bucket below), never at the count itself (a new count would pay a search on the step's
    critical path; a bucket's is cached), nor at any count of the threshold's scan. A count runs
    the bucket's split scaled to it where that beats running whole there, else the bucket
    below's, else it runs whole; the sizes are positive and sum to the count."""
    from tileflow.passes import nanobatch

    searched: list[int] = []
    real = search._search

    def spy(ops, device, n, *rest):
        searched.append(n)
        return real(ops, device, n, *rest)

    monkeypatch.setattr(search, "_search", spy)
    ops = llama_layer(ctx=4096, layers=2)
    plan = nanobatch.NanoBatchPlan("auto", (0, 0), {}, {}, [], [], profile=ops, device=H100)
    search.clear_cache()

    def scaled(n: int, at: int) -> tuple[list[int], dict] | None:
        found = search_split(ops, H100, at, apply_threshold=False)
        cuts = [round(c * n / at) for c in itertools.accumulate(found.sizes)]
        sizes = [b - a for a, b in zip([0] + cuts, cuts) if b > a]
        if found.k == 1 or not (n == at or split_wins(ops, H100, sizes, found.compute_share)):
            return None
        return sizes, {s: v for s, v in found.sm_share_per_stream.items() if v > 0}

    for n in tokens:
        sizes = plan.sizes(n)
        bucket = 1 << (n - 1).bit_length()
        assert sum(sizes) == n and all(s > 0 for s in sizes), (n, sizes)
        want = scaled(n, bucket) or (scaled(n, bucket // 2) if n != bucket else None)
        assert (sizes, plan.shares(n)) == (want or ([n], None)), n
    buckets = {1 << (n - 1).bit_length() for n in tokens}
    assert buckets <= set(searched) <= buckets | {b // 2 for b in buckets}  # never the counts
    # This profile's win grows with the count, so no count below its threshold splits (a count
    # below a threshold whose scan skipped it may, where its split wins: the split it runs wins).
    threshold = _two_layer_threshold()  # (searched after the spy's check; once for every example)
    for n in tokens:
        assert plan.sizes(n) == [n] or (threshold is not None and n >= threshold), (n, threshold)
    assert plan.sizes(1) == [1] and plan.sizes(0) == [0] and plan.shares(0) is None  # (no bucket below 1)
    search.clear_cache()


def test_a_count_splits_where_a_buckets_split_scaled_to_it_wins() -> None:
    """Under "auto", a count runs its bucket's split scaled to it only where that beats running
    whole there (`split_wins`; placing the count against the split threshold cost a dozen
    searches of the step): a count below the threshold inside a bucket above it stays whole.
    Just above a power of two the bucket's split (four equal parts of 1024) loses, and the split
    of the bucket below (512's two parts), scaled up, wins: 513 runs that, where it ran four
    parts of 128, modeled 13% slower than running whole."""
    from tileflow.passes import nanobatch

    ops = llama_layer(ctx=4096, layers=2)
    search.clear_cache()
    threshold = split_threshold(ops, H100)
    assert threshold is not None and 256 < threshold < 480
    plan = nanobatch.NanoBatchPlan("auto", (0, 0), {}, {}, [], [], profile=ops, device=H100)
    assert plan.sizes(threshold - 1) == [threshold - 1] and plan.sizes(256) == [256]
    assert len(plan.sizes(480)) > 1 and len(plan.sizes(512)) > 1
    upper, lower = (search_split(ops, H100, b, apply_threshold=False) for b in (1024, 512))
    assert upper.sizes == (256,) * 4 and lower.k == 2
    assert not split_wins(ops, H100, [128, 128, 129, 128], upper.compute_share)
    assert plan.sizes(513) == [round(lower.sizes[0] * 513 / 512), 513 - round(lower.sizes[0] * 513 / 512)]
    assert split_wins(ops, H100, plan.sizes(513), lower.compute_share)
    search.clear_cache()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(profiles(), st.lists(st.integers(1, 3000), min_size=1, max_size=8), GPUS)
def test_auto_never_runs_a_split_the_model_says_loses(ops, counts: list[int], device: str) -> None:
    """Whatever the profile and the count, the split "auto" runs is modeled faster than running
    the step whole (it ran its bucket's split scaled down wherever the count was at or above the
    threshold, 13% slower than whole at 513 rows of two Llama layers), at the SM shares it runs."""
    from tileflow.passes import nanobatch

    dev = DEVICES[device]
    plan = nanobatch.NanoBatchPlan("auto", (0, 0), {}, {}, [], [], profile=ops, device=dev)
    for n in counts:
        sizes = plan.sizes(n)
        assert sum(sizes) == n and all(s > 0 for s in sizes), (n, sizes)
        if len(sizes) > 1:
            streams = search._streams_and_shares(ops, len(sizes), 0.5)[0]
            share = plan.shares(n).get(streams.get("compute"), 0.5) if "memory" in streams else 0.5
            assert makespan(ops, sizes, share, dev) < makespan(ops, (n,), 1.0, dev), (n, sizes)


def test_split_wins_compares_the_split_with_the_whole_step() -> None:
    """`split_wins` is the model's answer: the split's makespan below the whole step's; one
    nano-batch never wins."""
    ops = llama_layer(1024, layers=2)
    for sizes, share in (((256, 256), 0.75), ((64, 448), 0.5), ((100, 100, 100), 0.875), ((8, 8), 0.5)):
        want = makespan(ops, sizes, share, H100) < makespan(ops, (sum(sizes),), 1.0, H100)
        assert split_wins(ops, H100, sizes, share) == want, sizes
    assert {split_wins(ops, H100, s, 0.5) for s in ((256, 256), (8, 8))} == {True, False}
    assert not split_wins(ops, H100, (512,), 0.5)


def _naive_makespan(ops: list[OpProfile], sizes: tuple[int, ...], share: float) -> float:
    """The contention step as written first: every memory-bound instance against every one on
    another stream, O(n^2) (the module's version bisects per stream)."""
    k = len(sizes)
    streams, shares = search._streams_and_shares(ops, k, share)
    times, bound = search._durations(ops, sizes, streams, shares, H100, search.DEFAULT_NET_BW_GBS)
    start, finish = search._list_schedule(ops, k, streams, times)
    intervals = [(streams[op.resource], start[i][j], finish[i][j]) for i, op in enumerate(ops) for j in range(k)
                 if bound[i][j]]
    stretched = [row[:] for row in times]
    for i, op in enumerate(ops):
        for j in range(k):
            if bound[i][j] and times[i][j] > 0:
                a, b = start[i][j], finish[i][j]
                overlap = sum(max(0.0, min(b, q) - max(a, p)) for t, p, q in intervals if t != streams[op.resource])
                stretched[i][j] = times[i][j] * (1.0 + search.MEMORY_CONTENTION * overlap / (b - a))
    _, finish = search._list_schedule(ops, k, streams, stretched)
    return max(f for row in finish for f in row)


@settings(max_examples=40, deadline=None)
@given(layers=st.integers(1, 4), ctx=st.sampled_from([256, 4096, 32768]), net=st.booleans(),
       sizes=st.lists(st.integers(1, 4096), min_size=2, max_size=4), share=st.sampled_from(search.DEFAULT_SM_SHARES))
def test_contention_by_bisection_equals_the_quadratic_sum(layers, ctx, net, sizes, share) -> None:
    """The per-stream bisection finds the same overlaps, summed in the same order: makespans
    are bitwise equal to the all-pairs sum's."""
    ops = llama_layer(ctx=ctx, layers=layers, net=net)
    assert makespan(ops, tuple(sizes), share, H100) == _naive_makespan(ops, tuple(sizes), share)


@pytest.mark.parametrize("cost", ["flops_per_token", "bytes_per_token", "fixed_bytes"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_costs_are_rejected(cost: str, value: float) -> None:
    """`min(nan, ...) < 0` is False: a NaN cost passed the check and every makespan came out
    NaN (search_split then returned k = 1 with makespan nan); inf gave inf makespans."""
    with pytest.raises(ValueError, match="finite"):
        OpProfile("x", "compute", **{cost: value})


@pytest.mark.parametrize("kwargs, match", [
    (dict(units=0), "units"),                    # silently turned splitting off
    (dict(units=-3), "units"),
    (dict(sm_shares=()), "sm_shares"),            # silently turned splitting off
    (dict(net_bw_gbs=0.0), "net_bw_gbs"),         # ZeroDivisionError
    (dict(net_bw_gbs=-100.0), "net_bw_gbs"),      # negative network times, a plan all the same
    (dict(max_nano_batches=0), "max_nano_batches"),
])
@pytest.mark.parametrize("entry", ["search_split", "brute_force_split"])
def test_bad_options_are_rejected(kwargs: dict, match: str, entry: str) -> None:
    fn = {"search_split": search_split, "brute_force_split": brute_force_split}[entry]
    with pytest.raises(ValueError, match=match):
        fn(llama_layer(1024, net=True), H100, 2048, **kwargs)


def test_non_integer_token_counts_are_rejected() -> None:
    """A float count gave fractional nano-batch sizes (513.0, 768.0, ...)."""
    with pytest.raises(ValueError, match="integer"):
        search_split(llama_layer(1024), H100, 2048.5, apply_threshold=False)
    with pytest.raises(ValueError, match="integer"):
        brute_force_split(llama_layer(1024), H100, 2048.5)


def test_shares_outside_the_partition_are_rejected_by_makespan() -> None:
    # A compute share of 1.0 leaves the memory stream no SMs: ZeroDivisionError before.
    with pytest.raises(ValueError, match="share"):
        makespan(llama_layer(1024), (8, 8), 1.0, H100)
    # Without a memory op there is nothing to partition: any share is fine (and unused).
    gemm_only = [OpProfile("g", "compute", 1e6, 1e3, 1e6)]
    assert makespan(gemm_only, (8, 8), 1.0, H100) == makespan(gemm_only, (8, 8), 0.5, H100)


def test_shares_given_as_an_iterator_are_read_once() -> None:
    """search_split read `sm_shares` twice (the plan, then the threshold scan): an iterator was
    empty the second time, the threshold scan found no split and a 2048-token step that the
    plan splits came back whole."""
    ops = llama_layer(1024, layers=2)
    want = search_split(ops, H100, 2048)
    assert want.k >= 2  # threshold is in the hundreds for this model (see the tests above)
    search.clear_cache()
    same(search_split(ops, H100, 2048, sm_shares=iter(search.DEFAULT_SM_SHARES)), want)


def test_steps_beyond_the_threshold_scan_follow_their_plan() -> None:
    """A threshold of None says only that no split wins up to MAX_THRESHOLD_TOKENS (the scanned
    range); search_split read it as "never split" and kept larger steps whole even where the
    plan wins. Huge weights (10 GB re-read per nano-batch) push the win past the scan."""
    ops = [OpProfile("g", "compute", flops_per_token=1e8, fixed_bytes=1e10),
           OpProfile("a", "memory", bytes_per_token=3e5)]
    big = 4 * search.MAX_THRESHOLD_TOKENS
    assert split_threshold(ops, H100) is None
    # Baseline by hand: the GEMM is FLOP-bound, attention reads 3e5 B per token.
    baseline = 1e8 * big / 989e12 + 3e5 * big / 3.35e12 + 2 * search.LAUNCH_OVERHEAD_S
    oracle = brute_force_split(ops, H100, big)
    assert oracle.baseline_makespan == pytest.approx(baseline, rel=1e-12)
    assert oracle.k >= 2 and oracle.makespan < baseline
    plan = search_split(ops, H100, big)
    same(plan, oracle)
    assert plan.threshold is None
    # Inside the scanned range nothing wins, so a step there stays whole.
    inside = search_split(ops, H100, search.MAX_THRESHOLD_TOKENS)
    assert inside.k == 1 and inside.sizes == (search.MAX_THRESHOLD_TOKENS,)


def test_auto_report_timeline_is_drawn_at_the_searched_share() -> None:
    """The pass's report drew the "auto" plan's timeline at a fixed compute share of 0.6 (not
    even one of the shares searched), so it ended elsewhere than the plan's makespan."""
    from tileflow.passes import nanobatch

    ops = llama_layer(ctx=1024, layers=2)
    plan = nanobatch.NanoBatchPlan("auto", (0, 0), {}, {}, [], [], profile=ops, device=H100)
    chosen = search_split(ops, H100, 2048)  # a power of two: the bucket itself, sizes unscaled
    assert chosen.k >= 2
    timeline = plan.timeline(2048)
    assert timeline is not None and len(timeline) == len(ops) * chosen.k
    assert max(e["finish_us"] for e in timeline) == pytest.approx(chosen.makespan * 1e6, rel=1e-12)
    assert sorted({e["tokens"] for e in timeline}) == sorted(set(chosen.sizes))
    assert plan.timeline(16) is None  # below the threshold: not split, nothing to draw


def test_two_op_two_nano_batch_makespan_by_hand() -> None:
    """The docstring's model worked by hand on a 2-op chain, 2 equal nano-batches, share 0.5:
    a weight-bound GEMM (1 GB of weights) and attention, both memory-bound on H100."""
    gemm = OpProfile("g", "compute", flops_per_token=1.0, fixed_bytes=1e9)
    attn = OpProfile("a", "memory", bytes_per_token=1e7)
    # 0.5 >= BW_SATURATION_SHARE: both streams read at the full 3.35 TB/s.
    tg = 1e9 / 3.35e12 + search.LAUNCH_OVERHEAD_S
    ta = 1e8 / 3.35e12 + search.LAUNCH_OVERHEAD_S
    # Contention-free list schedule: g0 [0, tg]; a0 and g1 both at tg (tie: nano-batch 0 first);
    # a1 after g1 at 2tg. a0 lies wholly inside g1 (f = 1, a0 -> 2ta); g1 overlaps a0 for ta
    # (g1 -> tg + ta); g0 and a1 overlap nothing. Rescheduled: a1 starts when g1 ends.
    assert makespan([gemm, attn], (10, 10), 0.5, H100) == pytest.approx(2 * tg + 2 * ta, rel=1e-12)


def test_numpy_and_tensor_costs_are_numbers() -> None:
    """Costs given as numpy scalars or 0-d tensors plan as the same floats (the cache key is JSON);
    a cost that is not a number is refused."""
    import numpy as np
    import torch

    plain = [OpProfile("g", "compute", 8e7, 1e3, 1e8), OpProfile("a", "memory", 1e3, 1e5)]
    odd = [OpProfile("g", "compute", np.int64(8 * 10**7), np.float32(1e3), torch.tensor(1e8)),
           OpProfile("a", "memory", np.float64(1e3), 1e5)]
    assert all(type(c) is float for op in odd for c in (op.flops_per_token, op.bytes_per_token, op.fixed_bytes))
    assert search_split(odd, H100, 1024) == search_split(plain, H100, 1024) == brute_force_split(plain, H100, 1024)
    with pytest.raises(ValueError, match="costs must be numbers"):
        OpProfile("g", "compute", "8e7")


def test_a_callers_edit_of_a_plan_does_not_reach_the_cache() -> None:
    """Plans are cached and shared: an edit of one caller's plan changed the next caller's. A plan
    still pickles and copies (it crosses to worker processes)."""
    import copy
    import dataclasses
    import pickle

    ops = [OpProfile("g", "compute", 8e7, 1e3, 1e8), OpProfile("a", "memory", 1e3, 1e5)]
    plan = search_split(ops, H100, 2048, apply_threshold=False)
    shares, streams = dict(plan.sm_share_per_stream), dict(plan.stream_of_resource)
    plan.sm_share_per_stream[0] = 0.01
    plan.stream_of_resource["compute"] = 5
    again = search_split(ops, H100, 2048, apply_threshold=False)
    assert (again.sm_share_per_stream, again.stream_of_resource) == (shares, streams)
    assert pickle.loads(pickle.dumps(again)) == again == copy.deepcopy(again)
    assert dataclasses.asdict(again)["sm_share_per_stream"] == shares
    assert SplitPlan.from_dict(json.loads(json.dumps(again.to_dict()))) == again


# --------------------------------------------------------------------------------------------
# the memory-bound flag, token units, every field of the cache keys and the threshold scan


def test_a_zero_cost_op_is_not_memory_bound() -> None:
    """Memory-bound means the bytes term dominates: an op with neither FLOPs nor bytes (its
    launch only) is not, so it is never stretched by memory contention."""
    zero = OpProfile("z", "compute")
    assert op_time(zero, 8, 0.5, H100) == (search.LAUNCH_OVERHEAD_S, False)
    ops = [zero, OpProfile("a", "memory", bytes_per_token=1e5), OpProfile("z2", "compute")]
    streams, shares = search._streams_and_shares(ops, 2, 0.5)
    times, bound = search._durations(ops, (8, 8), streams, shares, H100, search.DEFAULT_NET_BW_GBS)
    assert bound == [[False, False], [True, True], [False, False]]
    _, finish = search._list_schedule(ops, 2, streams, times)
    # Only the attention instances are memory-bound, and they share one stream: no contention.
    assert makespan(ops, (8, 8), 0.5, H100) == max(max(row) for row in finish)


def test_token_units_give_the_remainder_to_the_first_units() -> None:
    """10 tokens in 4 units are 3, 3, 2, 2 (the first ones one larger): a 2-way split's cuts fall
    after 3, 6 or 8 tokens, the near-equal split first."""
    assert search._unit_sizes(10, 4) == [3, 3, 2, 2]
    assert search._compositions(10, 2, 4) == [(6, 4), (3, 7), (8, 2)]


def test_the_plan_cache_keys_every_search_option() -> None:
    """Plans are cached per (model, device, token bucket, options): a search with fewer
    nano-batches, other units or other shares after one with the defaults must not get the
    defaults' plan."""
    ops = llama_layer(1024, layers=2)
    wide = search_split(ops, H100, 2048, apply_threshold=False)
    assert wide.k == 4
    for kw in (dict(max_nano_batches=2), dict(units=4), dict(sm_shares=(0.75,)), dict(net_bw_gbs=45.0)):
        same(search_split(ops, H100, 2048, apply_threshold=False, **kw), brute_force_split(ops, H100, 2048, **kw))
    assert search_split(ops, H100, 2048, max_nano_batches=2, apply_threshold=False).k == 2


def test_the_threshold_cache_keys_max_tokens() -> None:
    """A scan up to fewer tokens than the threshold finds no split, even after a full scan of the
    same model and device was cached."""
    ops = llama_layer(1024, layers=2)
    threshold = split_threshold(ops, H100)
    assert threshold is not None and threshold > 256
    assert split_threshold(ops, H100, max_tokens=256) is None
    search.clear_cache()
    assert split_threshold(ops, H100, max_tokens=256) is None and split_threshold(ops, H100) == threshold


def test_profiles_differing_only_in_dtype_get_their_own_plans() -> None:
    """The model signature covers every field of a profile's ops: the same ops in float32 (a
    fifteenth of H100's bf16 rate) are another model, with another plan and threshold."""
    import dataclasses

    ops = llama_layer(1024, layers=2)
    f32 = [dataclasses.replace(op, dtype="float32") for op in ops]
    assert search.model_signature(ops) != search.model_signature(f32)
    for n in (512, 2048):
        same(search_split(ops, H100, n, apply_threshold=False), brute_force_split(ops, H100, n))
        same(search_split(f32, H100, n, apply_threshold=False), brute_force_split(f32, H100, n))
    assert search_split(f32, H100, 2048).threshold == split_threshold(f32, H100)


def test_a_step_of_exactly_the_threshold_is_split() -> None:
    """The threshold is the smallest count where splitting wins: a step of that many tokens
    follows its split plan, one token fewer stays whole."""
    ops = llama_layer(1024, layers=2)
    threshold = split_threshold(ops, H100)
    assert threshold is not None
    at = search_split(ops, H100, threshold)
    assert at.k >= 2 and at.makespan < at.baseline_makespan
    same(at, brute_force_split(ops, H100, threshold))
    assert search_split(ops, H100, threshold - 1).k == 1


@pytest.mark.parametrize("ctx, layers", [(128, 1), (256, 1), (256, 2), (512, 1), (512, 2), (1024, 1)])
def test_the_bisected_threshold_is_exactly_where_splitting_starts_to_win(ctx: int, layers: int) -> None:
    """The bisection runs until its bracket is one token wide: at the threshold a split wins, one
    token below it none does (odd thresholds as well as even ones)."""
    ops = llama_layer(ctx, layers=layers)
    threshold = split_threshold(ops, H100)
    assert threshold is not None and threshold > 1
    at = search_split(ops, H100, threshold, apply_threshold=False)
    below = search_split(ops, H100, threshold - 1, apply_threshold=False)
    assert at.k > 1 and at.makespan < at.baseline_makespan
    assert below.k == 1 or below.makespan >= below.baseline_makespan


@pytest.mark.parametrize("cost", ["flops_per_token", "bytes_per_token", "fixed_bytes"])
def test_negative_costs_are_rejected(cost: str) -> None:
    """A negative cost would give negative op times (a split that "saves" time by re-reading it)."""
    with pytest.raises(ValueError, match="non-negative"):
        OpProfile("x", "compute", **{cost: -1.0})


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_shares_at_the_ends_of_the_partition_are_rejected_up_front(share: float) -> None:
    """A compute share of 0 or 1 leaves one stream no SMs: refused by the option check, naming
    `sm_shares`, before any bound divides by the empty stream's share."""
    with pytest.raises(ValueError, match="sm_shares"):
        search_split(llama_layer(1024), H100, 2048, sm_shares=(share,), apply_threshold=False)


def test_each_instance_is_timed_as_its_own_op_where_ops_repeat_costs() -> None:
    """The search times each distinct cost once (a model's layers repeat theirs under other
    names); an op with the same numbers under another resource or dtype runs at another share or
    peak, and must keep its own time."""
    numbers = dict(flops_per_token=3e7, bytes_per_token=8e3, fixed_bytes=5e7)
    ops = [OpProfile("a", "compute", **numbers), OpProfile("b", "memory", **numbers),
           OpProfile("c", "compute", dtype="float32", **numbers), OpProfile("d", "network", **numbers),
           OpProfile("e", "compute", **numbers)]
    sizes = (48, 16, 48)
    streams, shares = search._streams_and_shares(ops, len(sizes), 0.75)
    times, bound = search._durations(ops, sizes, streams, shares, H100, search.DEFAULT_NET_BW_GBS)
    for i, op in enumerate(ops):
        own = [op_time(op, n, shares[streams[op.resource]], H100) for n in sizes]
        assert times[i] == [t for t, _ in own] and bound[i] == [b for _, b in own], op.name
    assert len({tuple(row) for row in times}) == 4  # a and e alike; b, c and d each their own


def test_an_empty_nano_batch_costs_nothing() -> None:
    """No tokens, no launch: an op on 0 rows takes no time (and reads no weights)."""
    gemm = OpProfile("g", "compute", flops_per_token=1e6, fixed_bytes=1e8)
    assert op_time(gemm, 0, 1.0, H100) == (0.0, False)
    assert op_time(OpProfile("n", "network", bytes_per_token=1e3, fixed_bytes=1e6), 0, 1.0, H100) == (0.0, False)


def test_the_threshold_scan_reaches_a_power_of_two_max_tokens() -> None:
    """The scan includes `max_tokens` itself when it is a power of two (the default, 2**16, is):
    a threshold between 256 and 512 is found scanning up to 512."""
    ops = llama_layer(1024, layers=2)
    threshold = split_threshold(ops, H100)
    assert threshold is not None and 256 < threshold <= 512
    search.clear_cache()
    assert split_threshold(ops, H100, max_tokens=512) == threshold


def test_a_threshold_up_to_a_max_tokens_that_is_not_a_power_of_two_is_found() -> None:
    """The scan probes `max_tokens` itself after the last power of two below it: with
    max_tokens=400, a model whose threshold is 310 gets 310 (probing powers of two only, it got
    None, "no split wins up to 400 tokens", although a split wins from 310 on)."""
    ops = llama_layer(1024, layers=2)
    threshold = split_threshold(ops, H100)
    assert threshold is not None and 256 < threshold < 400
    for max_tokens in (400, threshold):
        search.clear_cache()
        assert split_threshold(ops, H100, max_tokens=max_tokens) == threshold, max_tokens
    search.clear_cache()
    assert split_threshold(ops, H100, max_tokens=threshold - 1) is None


@pytest.mark.parametrize("sizes", [(-64,), (32, -32), (2.5, 1.5), (True,)])
def test_makespan_rejects_sizes_that_are_no_token_counts(sizes) -> None:
    """A negative size was timed as no work ((32, -32) modeled faster than (64,), (-64,) as 0 s),
    and a fractional one as rows the timeline then truncated."""
    ops = llama_layer(512)
    with pytest.raises(ValueError, match="nano-batch sizes must be non-negative integers"):
        makespan(ops, sizes, 0.5, H100)
    with pytest.raises(ValueError, match="nano-batch sizes must be non-negative integers"):
        search.modeled_timeline(ops, sizes, 0.5, H100)


@pytest.mark.parametrize("max_tokens", [0, -5, 2.5, True])
def test_split_threshold_refuses_a_max_tokens_that_is_no_positive_count(max_tokens) -> None:
    """max_tokens 0 or negative answered None ("no split wins") without scanning anything, and 2.5
    failed deep in the search with "nano-batch sizes must be non-negative integers, got [2.5]"."""
    with pytest.raises(ValueError, match="max_tokens"):
        split_threshold(llama_layer(512), H100, max_tokens=max_tokens)


def test_split_threshold_and_brute_force_refuse_an_empty_profile() -> None:
    """search_split refuses an empty profile; split_threshold answered None for it and
    brute_force_split raised ZeroDivisionError (its plan's makespan is 0)."""
    with pytest.raises(ValueError, match="ops_profile is empty"):
        split_threshold([], H100)
    with pytest.raises(ValueError, match="ops_profile is empty"):
        brute_force_split([], H100, 64).speedup


def _moe_layer(ctx: int) -> list[OpProfile]:
    """A Mixtral-8x7B-like decode layer in bf16: attention's GEMMs and attention split per
    nano-batch, the router, then the experts' grouped GEMMs (top 2 of 8) run once over the step."""
    d, kv, ffn, experts, top = 4096, 1024, 14336, 8, 2
    return [
        OpProfile("qkv", "compute", 2 * d * (d + 2 * kv), 2 * (2 * d + 2 * kv), 2 * d * (d + 2 * kv)),
        OpProfile("attn", "memory", 4 * ctx * d, ctx * 2 * kv * 2),
        OpProfile("o", "compute", 2 * d * d, 4 * d, 2 * d * d),
        OpProfile("router", "compute", 2 * d * experts, 2 * (d + experts), 2 * d * experts),
        OpProfile("gate_up", "compute", top * 4 * d * ffn, top * 2 * (d + 2 * ffn), experts * 4 * d * ffn, whole=True),
        OpProfile("down", "compute", top * 2 * ffn * d, top * 2 * (d + ffn), experts * 2 * ffn * d, whole=True),
    ]


def test_a_whole_op_is_a_barrier_run_once_on_the_whole_device() -> None:
    """MoE's grouped GEMMs run once over the step, after every nano-batch's ops before them and
    before any after them, at the whole device's rate: a split step's time is the split's time
    for each stretch between barriers plus the barriers' own, which are the unsplit step's."""
    layer = _moe_layer(ctx=2048)
    ops = [*layer, *(dataclasses.replace(op, name=f"{op.name}1") for op in layer)]
    # (Enough tokens that the experts are compute-bound, their time set by the SMs they get.)
    sizes, share = (2500, 1596), 0.75
    timeline = search.modeled_timeline(ops, sizes, share, H100)
    barriers = [e for e in timeline if e["op"] in ("gate_up", "down", "gate_up1", "down1")]
    assert [(e["op"], e["nano_batch"], e["tokens"]) for e in barriers] == [
        ("gate_up", None, 4096), ("down", None, 4096), ("gate_up1", None, 4096), ("down1", None, 4096)]
    assert len(timeline) == 4 + (len(ops) - 4) * 2
    order = [op.name for op in ops]
    for barrier in barriers:
        at = order.index(barrier["op"])
        before = [e for e in timeline if order.index(e["op"]) < at]
        after = [e for e in timeline if order.index(e["op"]) > at]
        assert barrier["start_us"] == max(e["finish_us"] for e in before)
        assert not after or barrier["finish_us"] == min(e["start_us"] for e in after)
        expected = op_time(ops[at], 4096, 1.0, H100)[0] * 1e6
        assert barrier["finish_us"] - barrier["start_us"] == pytest.approx(expected, rel=1e-12)
    # Between the barriers the split runs as a chain of its own would (both stretches hold both
    # kinds of op, so the SM partition is the same).
    stretch = layer[:4]
    barrier_time = sum(op_time(op, 4096, 1.0, H100)[0] for op in layer[4:])
    assert makespan(ops, sizes, share, H100) == pytest.approx(
        2 * (makespan(stretch, sizes, share, H100) + barrier_time), rel=1e-12)
    # Unsplit, a whole op is timed as any other op over the step.
    assert makespan(ops, (4096,), 1.0, H100) == pytest.approx(
        sum(op_time(op, 4096, 1.0, H100)[0] for op in ops), rel=1e-12)
    assert not op_time(layer[4], 4096, 1.0, H100)[1]  # (compute-bound, as said above)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(profiles(barriers=True), st.lists(st.integers(1, 2048), min_size=2, max_size=4), st.sampled_from([0.25, 0.5, 0.75]),
       GPUS)
def test_nothing_runs_beside_a_whole_op(ops, sizes, share, device) -> None:
    """In every modeled step a whole op appears once, over every token, and no other op's
    instance overlaps it in time; every op before it has finished when it starts."""
    timeline = search.modeled_timeline(ops, sizes, share, DEVICES[device])
    order = [op.name for op in ops]
    for op in ops:
        if not op.whole:
            assert sorted(e["nano_batch"] for e in timeline if e["op"] == op.name) == list(range(len(sizes)))
            continue
        (barrier,) = [e for e in timeline if e["op"] == op.name]
        assert barrier["nano_batch"] is None and barrier["tokens"] == sum(sizes)
        for e in timeline:
            if e is not barrier:
                assert e["finish_us"] <= barrier["start_us"] or e["start_us"] >= barrier["finish_us"]
            if order.index(e["op"]) < order.index(op.name):
                assert e["finish_us"] <= barrier["start_us"]


def test_a_whole_op_must_say_so_with_a_bool() -> None:
    """`whole` is a flag: anything else is refused, as a cost that is not a number is."""
    with pytest.raises(ValueError, match="whole must be a bool"):
        OpProfile("experts", "compute", 1.0, whole="yes")


def test_only_ops_that_split_partition_the_sms() -> None:
    """A whole op runs alone on the whole device: a kind of op that only runs whole (MoE's
    experts beside attention and all-reduces) gets no share of the SMs taken from the kinds that
    split, and a step with no work in one of its nano-batches still draws (its entries sort)."""
    attention = OpProfile("attn", "memory", 4 * 1024 * 4096, 1024 * 2 * 1024 * 2)
    reduce = OpProfile("ar", "network", 0, 2 * 4096)
    experts = OpProfile("experts", "compute", 1e9, 1e4, 1e9, whole=True)
    split_only = [attention, reduce, dataclasses.replace(attention, name="attn1"), dataclasses.replace(reduce, name="ar1")]
    with_experts = [*split_only, experts]
    assert search._shares_for(with_experts, 2, search.DEFAULT_SM_SHARES) == [1.0]
    assert search._streams_and_shares(with_experts, 2, 1.0)[1] == {1: 1.0, 2: 0.0, 0: 1.0}
    plain, barred = (search_split(ops, H100, 4096, apply_threshold=False) for ops in (split_only, with_experts))
    assert barred.sizes == plain.sizes and barred.sm_share_per_stream[1] == 1.0
    timeline = search.modeled_timeline([attention, experts], (64, 0), 0.75, H100)
    assert sorted(str(e["nano_batch"]) for e in timeline) == ["0", "1", "None"]
