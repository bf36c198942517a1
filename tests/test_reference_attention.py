"""Reference meta-attention: the task-table executor (`run_task_table`) against the dense
definition (`attention_reference_dense`) against an independent float64 oracle written here from
the contract, on mixes of prefill / chunked / decode / verify / empty sequences; plus the
metadata checks."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from attention_cases import batch_lengths, batch_mixes, make_batch
from tileflow.backends.reference.attention import (
    attention_reference_dense,
    merge_partials,
    run_task_table,
)
from tileflow.attention_inputs import bias_ranges
from tileflow.tasks import build_task_table, check_metadata

TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
}


# ----------------------------------------------------------------------------------------------
# Independent oracle: scalar rules straight from the contract, float64 math per head.
# ----------------------------------------------------------------------------------------------


def oracle_sees(i: int, j: int, n: int, kv_len: int, causal: bool, window: int | None,
                tree: list[list[bool]] | None) -> bool:
    """Does query row i (of n new rows, KV length kv_len) see KV position j?"""
    p = kv_len - n + i
    if not 0 <= j < kv_len:
        return False
    if window is not None and j <= p - window:
        return False
    if tree is not None and n <= len(tree) and j >= kv_len - n:
        return tree[i][j - (kv_len - n)]
    return j <= p or not causal


def oracle_attention(batch: dict, *, scale: float | None, causal: bool, window: int | None) -> torch.Tensor:
    """float64 attention per sequence: K/V gathered with Python page arithmetic, the mask from
    `oracle_sees`, softmax written out as exp / sum (no shared code with the backend)."""
    q, k_cache, v_cache = (batch[name].double() for name in ("q", "k_cache", "v_cache"))
    block_size, num_kv = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    table = batch["block_table"].tolist()
    cu = batch["cu_seqlens_q"].tolist()
    trees = None if batch["tree_mask"] is None else batch["tree_mask"].tolist()
    out = torch.zeros_like(q)
    for s, kv_len in enumerate(batch["seqlens_kv"].tolist()):
        n = cu[s + 1] - cu[s]
        if n == 0:
            continue
        pages = [table[s][j // block_size] for j in range(kv_len)]
        offsets = [j % block_size for j in range(kv_len)]
        # [Hq, L, D]: query head h uses KV head h // group.
        heads = [h // group for h in range(q.shape[1])]
        keys = k_cache[pages, offsets][:, heads].transpose(0, 1)
        values = v_cache[pages, offsets][:, heads].transpose(0, 1)
        tree = None if trees is None else trees[s]
        sees = torch.tensor([[oracle_sees(i, j, n, kv_len, causal, window, tree) for j in range(kv_len)]
                             for i in range(n)], dtype=torch.bool).reshape(n, kv_len)
        scores = torch.einsum("nhd,hld->hnl", q[cu[s]:cu[s + 1]], keys) * scale
        # Subtracting any per-row constant leaves softmax unchanged; the visible max keeps exp finite.
        shift = torch.where(sees, scores, torch.full_like(scores, -1e300)).amax(dim=-1, keepdim=True)
        weights = torch.where(sees, torch.exp(scores - shift), torch.zeros_like(scores))
        total = weights.sum(dim=-1, keepdim=True)
        result = (weights @ values) / torch.where(total > 0, total, torch.ones_like(total))
        out[cu[s]:cu[s + 1]] = result.transpose(0, 1)
    return out


def run_all(batch: dict, *, causal: bool, window: int | None, block_q: int, num_programs: int,
            kv_split: int | None, scale: float | None = None):
    """(task-table output, dense output, oracle output, table) for one batch."""
    table = build_task_table(
        batch["cu_seqlens_q"], batch["seqlens_kv"], num_q_heads=batch["q"].shape[1],
        num_kv_heads=batch["k_cache"].shape[2], block_q=block_q, num_programs=num_programs,
        sliding_window=window, causal=causal, kv_split=kv_split,
    )
    poisoned = torch.full_like(batch["q"], float("nan"))
    tiled = run_task_table(table, **batch, scale=scale, causal=causal, sliding_window=window, out=poisoned)
    assert tiled.data_ptr() == poisoned.data_ptr()
    dense = attention_reference_dense(**batch, scale=scale, causal=causal, sliding_window=window)
    oracle = oracle_attention(batch, scale=scale, causal=causal, window=window)
    return tiled, dense, oracle, table


def assert_all_close(tiled: torch.Tensor, dense: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCES[dtype]
    assert tiled.dtype == dense.dtype == dtype
    assert not tiled.isnan().any(), "an output row was never written (or read a NaN cache slot)"
    torch.testing.assert_close(tiled.double(), oracle, **tol)
    torch.testing.assert_close(dense.double(), oracle, **tol)
    torch.testing.assert_close(tiled, dense, **tol)


# ----------------------------------------------------------------------------------------------
# Hypothesis: random mixes
# ----------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=batch_mixes(max_size=5),
    heads=st.sampled_from([(2, 2), (4, 2), (8, 2), (4, 1)]),  # GQA ratios 1, 2, 4 and MQA
    head_dim=st.sampled_from([16, 32]),
    block_size=st.sampled_from([1, 7, 16]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    causal=st.booleans(),
    window=st.none() | st.integers(1, 40),
    block_q=st.sampled_from([1, 3, 16]),
    num_programs=st.sampled_from([1, 4, 16]),
    kv_split=st.sampled_from([None, 0, 6, 9, 16]),  # mostly explicit: exercise merges
    tree_size=st.sampled_from([4, 8]),
    seed=st.integers(0, 2**16),
)
def test_task_table_matches_dense_and_oracle(
    kinds, heads, head_dim, block_size, dtype, causal, window, block_q, num_programs, kv_split,
    tree_size, seed,
) -> None:
    batch = make_batch(kinds, num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
                       block_size=block_size, dtype=dtype, seed=seed, tree_size=tree_size, max_len=40)
    tiled, dense, oracle, table = run_all(batch, causal=causal, window=window, block_q=block_q,
                                          num_programs=num_programs, kv_split=kv_split)
    # Shown by --hypothesis-show-statistics: how often merges and tree masks are exercised.
    event(f"split-KV merges: {table.merges.shape[0] > 0}")
    event(f"tree mask: {batch['tree_mask'] is not None}")
    assert_all_close(tiled, dense, oracle, dtype)


# ----------------------------------------------------------------------------------------------
# Targeted cases
# ----------------------------------------------------------------------------------------------

ALL_KINDS = ["prefill", "chunked", "decode", "verify", "empty", "verify", "decode", "chunked"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("window", [None, 5])
def test_forced_split_kv_merges(dtype: torch.dtype, window: int | None) -> None:
    """A small kv_split splits almost every tile: the LSE merge must reproduce the dense result."""
    batch = make_batch(ALL_KINDS, num_q_heads=8, num_kv_heads=2, head_dim=16, block_size=7,
                       dtype=dtype, seed=3, tree_size=6, max_len=60)
    tiled, dense, oracle, table = run_all(batch, causal=True, window=window, block_q=4,
                                          num_programs=5, kv_split=5)
    assert table.num_slots > 0 and table.merges.shape[0] > 0
    assert_all_close(tiled, dense, oracle, dtype)


def test_automatic_split_kv_for_few_long_sequences() -> None:
    """Two long decodes on a 64-program grid: the default policy splits (chunks >= 256)."""
    batch = make_batch(["decode", "decode"], num_q_heads=4, num_kv_heads=1, head_dim=16,
                       block_size=16, dtype=torch.float32, seed=5, max_len=900)
    batch["seqlens_kv"] = torch.tensor([900, 700], dtype=torch.int32)
    batch = make_batch_with_lengths(batch)
    tiled, dense, oracle, table = run_all(batch, causal=True, window=None, block_q=16,
                                          num_programs=64, kv_split=None)
    assert table.num_slots >= 4
    assert_all_close(tiled, dense, oracle, torch.float32)


def make_batch_with_lengths(batch: dict) -> dict:
    """Re-page a batch so each sequence owns exactly ceil(L_s / block_size) pages of random K/V
    (used when a test pins the KV lengths)."""
    block_size = batch["k_cache"].shape[1]
    kv_lens = batch["seqlens_kv"].tolist()
    pages = [-(-kv // block_size) for kv in kv_lens]
    gen = torch.Generator().manual_seed(11)
    order = torch.randperm(sum(pages), generator=gen).to(torch.int32)
    table = torch.zeros(len(kv_lens), max(pages), dtype=torch.int32)
    start = 0
    for s, count in enumerate(pages):
        table[s, :count] = order[start:start + count]
        start += count
    shape = (sum(pages), *batch["k_cache"].shape[1:])
    return {**batch, "block_table": table,
            "k_cache": torch.randn(shape, generator=gen).to(batch["q"].dtype),
            "v_cache": torch.randn(shape, generator=gen).to(batch["q"].dtype)}


@pytest.mark.parametrize("kv_split", [None, 1])
def test_row_that_sees_nothing_outputs_zeros(kv_split: int | None) -> None:
    """A verify row whose tree-mask row is empty and has no prefix sees no key: zeros, not NaN
    (also through the merge, where every slot has LSE -inf for that row)."""
    batch = make_batch(["prefill"], num_q_heads=2, num_kv_heads=1, head_dim=16, block_size=4,
                       dtype=torch.float32, seed=0, poison_unused=True)
    original_len = batch["seqlens_kv"].item()  # positions 0, 1 hold finite K/V only if >= 2
    batch["q"], batch["cu_seqlens_q"] = batch["q"][:2], torch.tensor([0, 2], dtype=torch.int32)
    batch["seqlens_kv"] = torch.tensor([2], dtype=torch.int32)
    assert original_len >= 2
    batch["tree_mask"] = torch.tensor([[[True, False], [False, False]]])
    tiled, dense, oracle, _ = run_all(batch, causal=True, window=None, block_q=4, num_programs=2,
                                      kv_split=kv_split)
    assert (tiled[1] == 0).all() and (dense[1] == 0).all()
    assert_all_close(tiled, dense, oracle, torch.float32)


def test_custom_scale_and_sequences_longer_than_the_tree() -> None:
    """A chunk with n_s > T stays causal even though a tree mask is given; explicit scale."""
    batch = make_batch(["verify", "prefill", "chunked"], num_q_heads=4, num_kv_heads=2, head_dim=32,
                       block_size=16, dtype=torch.float32, seed=9, tree_size=3, max_len=40)
    q_lens, _ = batch_lengths(batch)
    assert max(q_lens) > 3
    tiled, dense, oracle, _ = run_all(batch, causal=True, window=None, block_q=16, num_programs=3,
                                      kv_split=None, scale=0.3)
    assert_all_close(tiled, dense, oracle, torch.float32)


def test_merge_ignores_nan_in_empty_slots() -> None:
    """Slots whose max is -inf may hold garbage (a kernel's 0/0): the merge must not read it."""
    table = build_task_table([0, 1], [10], num_q_heads=1, num_kv_heads=1, block_q=1,
                             num_programs=1, kv_split=5)
    partial_out = torch.tensor([[[float("nan")]], [[2.0]]])
    partial_stats = torch.tensor([[[float("-inf")], [float("nan")]], [[0.5], [3.0]]])
    out = merge_partials(table, partial_out, partial_stats, torch.zeros(1, 1, 1))
    assert out.item() == 2.0
    # A slot that saw keys but whose stats were never written (the NaN a fresh workspace holds)
    # must show in the result, not weigh nothing.
    partial_stats[0] = float("nan")
    assert merge_partials(table, partial_out, partial_stats, torch.zeros(1, 1, 1)).isnan().all()


def test_merge_weighs_slots_by_their_key_counts_at_any_magnitude() -> None:
    """Rows that see keys only through transformers' finfo.min mask have maxima near -3.4e38,
    where max + log(count) rounds to max: the merge weighs each slot by its sum, not one LSE."""
    table = build_task_table([0, 1], [10], num_q_heads=1, num_kv_heads=1, block_q=1,
                             num_programs=1, kv_split=5)
    lowest = torch.finfo(torch.float32).min
    partial_out = torch.tensor([[[1.0]], [[4.0]]])
    partial_stats = torch.tensor([[[lowest], [1.0]], [[lowest], [3.0]]])  # one key, then three
    out = merge_partials(table, partial_out, partial_stats, torch.zeros(1, 1, 1))
    assert out.item() == (1.0 * 1 + 4.0 * 3) / 4


# ----------------------------------------------------------------------------------------------
# check_metadata
# ----------------------------------------------------------------------------------------------


def _meta_batch() -> dict:
    return make_batch(["chunked", "decode", "verify"], num_q_heads=4, num_kv_heads=2, head_dim=16,
                      block_size=4, dtype=torch.float32, seed=1, tree_size=4, max_len=20)


def _edit(name: str, fn: Callable[[dict], object]) -> Callable[[dict], dict]:
    """A batch transformer replacing one argument with fn(batch)."""

    def apply(batch: dict) -> dict:
        return {**batch, name: fn(batch)}
    return apply


def _bad_block(batch: dict) -> torch.Tensor:
    table = batch["block_table"].clone()
    table[1, 0] = batch["k_cache"].shape[0]
    return table


def _upper_tree(batch: dict) -> torch.Tensor:
    mask = batch["tree_mask"].clone()
    mask[2, 0, 1] = True
    return mask


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_edit("cu_seqlens_q", lambda b: b["cu_seqlens_q"].long()), r"cu_seqlens_q must be int32"),
        (_edit("block_table", lambda b: b["block_table"].long()), r"block_table must be int32"),
        (_edit("q", lambda b: b["q"][:, 0]), r"q must be \[total_q, num_q_heads, head_dim\]"),
        (_edit("v_cache", lambda b: b["v_cache"][:, :, :1]), r"v_cache shape .* differs"),
        (_edit("k_cache", lambda b: b["k_cache"].half()), r"share a dtype"),
        (_edit("q", lambda b: b["q"][:, :3]), r"not a multiple of the cache's 2 KV heads"),
        (_edit("q", lambda b: b["q"][..., :8]), r"head_dim differs"),
        (_edit("block_table", lambda b: b["block_table"][:, :1]), r"widen the table"),
        (_edit("block_table", _bad_block), r"block_table\[1, 0\] = \d+ is outside \[0, \d+\)"),
        (_edit("block_table", lambda b: b["block_table"][:2]), r"block_table has 2 rows"),
        (_edit("q", lambda b: b["q"][:-1]), r"must equal q.shape\[0\]"),
        (_edit("seqlens_kv", lambda b: torch.zeros_like(b["seqlens_kv"])), r"n_s <= L_s"),
        (_edit("cu_seqlens_q", lambda b: b["cu_seqlens_q"].flip(0)), r"must start at 0"),
        (_edit("tree_mask", lambda b: b["tree_mask"].int()), r"tree_mask must be bool"),
        (_edit("tree_mask", lambda b: b["tree_mask"][:2]), r"tree_mask must be \[num_seqs=3, T, T\]"),
        (_edit("tree_mask", _upper_tree), r"order the tree's tokens"),
    ],
)
def test_check_metadata_errors(edit: Callable[[dict], dict], match: str) -> None:
    batch = edit(_meta_batch())
    with pytest.raises(ValueError, match=match):
        check_metadata(**batch)


def test_check_metadata_accepts_valid_batches_and_ignores_unused_table_entries() -> None:
    batch = _meta_batch()
    # The checked lengths come back as host ints (the runtime reuses them: no second read).
    assert check_metadata(**batch) == (tuple(batch["cu_seqlens_q"].tolist()), tuple(batch["seqlens_kv"].tolist()))
    table = torch.cat([batch["block_table"], torch.full((3, 2), -7, dtype=torch.int32)], dim=1)
    check_metadata(**{**batch, "block_table": table})
    # An out-of-order tree is fine without causal (the tiles then span the whole KV length).
    check_metadata(**{**batch, "tree_mask": _upper_tree(batch)}, causal=False)


def test_run_task_table_rejects_a_table_from_another_batch() -> None:
    batch = _meta_batch()
    table = build_task_table([0, 1], [5], num_q_heads=4, num_kv_heads=2, block_q=4, num_programs=2)
    with pytest.raises(ValueError, match="different cu_seqlens_q"):
        run_task_table(table, **batch)
    table = build_task_table(batch["cu_seqlens_q"], batch["seqlens_kv"], num_q_heads=4,
                             num_kv_heads=2, block_q=4, num_programs=2, sliding_window=3)
    with pytest.raises(ValueError, match="sliding_window=3 but is run with causal=True, sliding_window=None"):
        run_task_table(table, **batch)
    with pytest.raises(ValueError, match="built for 4 query / 2 KV heads"):
        run_task_table(table, **{**batch, "q": batch["q"].repeat(1, 2, 1)}, sliding_window=3)


# ----------------------------------------------------------------------------------------------
# Additive bias and the reference backend's kernel interface
# ----------------------------------------------------------------------------------------------


# Every combination on the reference backend; under the Triton interpreter (6-7 s each) one bias
# per head without causal and one shared bias with it in the default run, the other two extended.
@pytest.mark.parametrize(("backend", "bias_heads", "causal"), [
    *(("reference", h, c) for h in (1, 4) for c in (False, True)), ("triton", 4, False), ("triton", 1, True),
    *(pytest.param("triton", h, c, marks=pytest.mark.extended) for h, c in ((1, False), (4, True)))])
def test_launcher_with_attn_bias_matches_sdpa(backend: str, bias_heads: int, causal: bool) -> None:
    """Dense [B, H, S, D] attention viewed as a varlen batch (one page per sequence) with a bool
    mask turned into an additive bias, through a backend's launcher (the Triton one under the
    interpreter), against torch's SDPA. Fully hidden rows come out as zeros on every backend."""
    from tileflow.kernel_spec import KernelSpec, make_params
    from tileflow.targets import get_backend, triton_interpreter_enabled

    if backend == "triton" and not (triton_interpreter_enabled() or torch.cuda.is_available()):
        pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")

    gen = torch.Generator().manual_seed(4)
    b, hq, hkv, s, s_kv, d = 3, 4, 2, 5, 9, 16
    q = torch.randn(b, hq, s, d, generator=gen)
    k = torch.randn(b, hkv, s_kv, d, generator=gen)
    v = torch.randn(b, hkv, s_kv, d, generator=gen)
    keep = torch.rand(b, bias_heads, s, s_kv, generator=gen) > 0.3
    keep[..., -1] = True  # every row keeps its last key, so SDPA has no all-masked row
    bias = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    spec = KernelSpec(op="meta_attention", dtype="float32", out_dtype="float32",
                      params=make_params(head_dim=d, gqa=hq // hkv, block_q=2, causal=causal, bias=True))
    kernel = get_backend(backend).build(spec)
    assert kernel.target == backend
    cu = torch.arange(0, b * s + 1, s, dtype=torch.int32)
    seqlens = torch.full((b,), s_kv, dtype=torch.int32)
    table = build_task_table(cu, seqlens, num_q_heads=hq, num_kv_heads=hkv, block_q=2,
                             num_programs=3, causal=causal, kv_split=4)
    out = kernel(q.transpose(1, 2).reshape(b * s, hq, d), k.transpose(1, 2), v.transpose(1, 2),
                 torch.arange(b).view(b, 1), cu, seqlens, table, attn_bias=bias)
    mask = keep.expand(b, hq, s, s_kv)
    if causal:  # query i sits at position s_kv - s + i
        mask = mask & torch.ones(s, s_kv, dtype=torch.bool).tril(s_kv - s)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out.view(b, s, hq, d).transpose(1, 2), want, rtol=1e-5, atol=1e-5)
    dense = attention_reference_dense(q.transpose(1, 2).reshape(b * s, hq, d), k.transpose(1, 2),
                                      v.transpose(1, 2), torch.arange(b, dtype=torch.int32).view(b, 1),
                                      cu, seqlens, causal=causal, attn_bias=bias)
    torch.testing.assert_close(dense, out, rtol=1e-5, atol=1e-5)
    # A row whose keys are all hidden by the bias: zeros, not NaN.
    bias[0, :, 0] = float("-inf")
    out = kernel(q.transpose(1, 2).reshape(b * s, hq, d), k.transpose(1, 2), v.transpose(1, 2),
                 torch.arange(b).view(b, 1), cu, seqlens, table, attn_bias=bias)
    assert (out[0] == 0).all() and not out.isnan().any()
    # A row that sees its keys only through finfo.min, as transformers' eager masks hide padding:
    # their plain average, as eager attention gives, across split-KV chunks of unequal key counts
    # (4 and 1 keys with the causal rule, 4, 4 and 1 without).
    bias[1, :, 0] = torch.finfo(torch.float32).min
    out = kernel(q.transpose(1, 2).reshape(b * s, hq, d), k.transpose(1, 2), v.transpose(1, 2),
                 torch.arange(b).view(b, 1), cu, seqlens, table, attn_bias=bias)
    seen = s_kv - s + 1 if causal else s_kv
    want_row = v[1, :, :seen].double().mean(dim=1).repeat_interleave(hq // hkv, dim=0)
    torch.testing.assert_close(out[s].double(), want_row, rtol=1e-5, atol=1e-5)


def test_attn_bias_shape_is_checked() -> None:
    batch = _meta_batch()
    with pytest.raises(ValueError, match=r"attn_bias must be a float bias or bool mask broadcastable to \[S=3"):
        attention_reference_dense(**batch, attn_bias=torch.zeros(2, 1, 1, 1))


def _ranges_by_brute_force(bias: torch.Tensor) -> list[list[tuple[int, int, int, int]]]:
    """`bias_ranges` from its definition, key by key, for bias [B, H, S, L]."""
    b, heads, s, kv_len = bias.shape
    lowest = torch.finfo(bias.dtype).min
    result = []
    for seq in range(b):
        rows = []
        for i in range(s):
            # A head's row hides its finfo.min keys when it sees some key above finfo.min.
            floor = [lowest if (bias[seq, h, i] > lowest).any() else float("-inf") for h in range(heads)]
            seen = [j for j in range(kv_len) if any(bias[seq, h, i, j] > floor[h] for h in range(heads))]
            plain = [bool((bias[seq, :, i, j] == 0).all()) for j in range(kv_len)]
            lo, hi = (seen[0], seen[-1] + 1) if seen else (kv_len, 0)
            full_lo = plain.index(True) if any(plain) else kv_len
            full_hi = full_lo
            while full_hi < kv_len and plain[full_hi]:
                full_hi += 1
            rows.append((lo, full_lo, full_hi, hi))
        result.append(rows)
    return result


@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 6), st.integers(0, 9)),
    seed=st.integers(0, 2**16),
    hidden=st.floats(0.0, 1.0),
    plain=st.floats(0.0, 1.0),
    fill=st.sampled_from([float("-inf"), "lowest"]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
)
@settings(max_examples=80, deadline=None)
def test_bias_ranges_match_their_definition(shape: tuple[int, int, int, int], seed: int, hidden: float,
                                            plain: float, fill: float | str, dtype: torch.dtype) -> None:
    """Random biases mixing hidden (-inf, or the dtype's lowest value as eager masks write it),
    plain (0) and other keys, per head: the ranges are exactly the visible span and the first
    all-heads-plain run of every row."""
    gen = torch.Generator().manual_seed(seed)
    bias = torch.randn(shape, generator=gen).to(dtype)
    draw = torch.rand(shape, generator=gen)
    hide = torch.finfo(dtype).min if fill == "lowest" else fill
    bias = bias.masked_fill(draw < plain, 0.0).masked_fill(draw > 1 - hidden * (1 - plain), hide)
    got = bias_ranges(bias)
    assert got.dtype == torch.int32 and got.shape == (shape[0], shape[2], 4)
    assert got.tolist() == [[list(r) for r in rows] for rows in _ranges_by_brute_force(bias)]


def test_bias_ranges_of_broadcast_biases() -> None:
    """A bias broadcast over sequences, heads or query rows (stride 0, as the dense op expands a
    model's [1, 1, S, L] mask) gives ranges of size 1 there, equal to the materialized ones."""
    causal = torch.full((6, 9), float("-inf")).triu(4)[None, None]
    expanded = causal.expand(3, 4, 6, 9)
    got = bias_ranges(expanded)
    assert got.shape == (1, 6, 4)
    assert got.expand(3, 6, 4).tolist() == bias_ranges(expanded.contiguous()).tolist()
    assert got[0].tolist() == [[0, 0, 4 + i, 4 + i] for i in range(6)]
    padding = torch.zeros(2, 1, 1, 9)
    padding[1, ..., :3] = float("-inf")  # the second sequence's first 3 keys are padding
    assert bias_ranges(padding.expand(2, 4, 6, 9))[:, 0].tolist() == [[0, 0, 9, 9], [3, 3, 9, 9]]
    with pytest.raises(ValueError, match="needs a float attention bias"):
        bias_ranges(torch.zeros(6, 9))


def test_additive_bias_of_masks_and_wide_biases() -> None:
    """`additive_bias`: a bool mask becomes 0 / -inf; float64 is narrowed with its finite values
    below float32's lowest kept at that lowest (-inf stays -inf, the rest rounds as a cast); a
    bias broadcast with stride 0 is converted on its distinct values only and comes back with
    those dims broadcast, equal to the conversion of the materialized bias."""
    from tileflow.attention_inputs import additive_bias

    keep = torch.tensor([[True, False, True]])
    assert additive_bias(keep).tolist() == [[0.0, float("-inf"), 0.0]]
    assert additive_bias(keep, torch.float16).dtype == torch.float16
    low64, low32 = torch.finfo(torch.float64).min, torch.finfo(torch.float32).min
    wide = torch.tensor([low64, -1e300, float("-inf"), -2.5, 0.0], dtype=torch.float64)
    assert additive_bias(wide).tolist() == [low32, low32, float("-inf"), -2.5, 0.0]
    half = torch.tensor([-65504.0, 1.5], dtype=torch.float16)
    assert additive_bias(half).tolist() == [-65504.0, 1.5]  # widening: values as they are
    gen = torch.Generator().manual_seed(2)
    for base in (torch.rand(1, 1, 5, 7, generator=gen) > 0.5, torch.randn(2, 1, 5, 7, generator=gen).double()):
        expanded = base.expand(2, 3, 5, 7)
        got = additive_bias(expanded)
        assert got.stride()[1] == 0 and got.untyped_storage().nbytes() == base.numel() * 4
        assert torch.equal(got, additive_bias(expanded.contiguous()))


def test_reference_backend_narrows_tasks_to_the_bias_ranges() -> None:
    """The reference backend reads only the keys inside a tile's ranges, as the kernel does:
    ranges that end early drop visible keys from the result."""
    from tileflow.kernel_spec import KernelSpec, make_params
    from tileflow.targets import get_backend

    gen = torch.Generator().manual_seed(5)
    hq, hkv, s, d = 2, 1, 12, 8
    q = torch.randn(s, hq, d, generator=gen)
    k, v = (torch.randn(1, s, hkv, d, generator=gen) for _ in range(2))
    bias = torch.full((s, s), float("-inf")).triu(1)[None, None]
    spec = KernelSpec(op="meta_attention", dtype="float32", out_dtype="float32",
                      params=make_params(head_dim=d, gqa=hq // hkv, block_q=4, causal=False, bias=True))
    kernel = get_backend("reference").build(spec)
    cu, lens = torch.tensor([0, s], dtype=torch.int32), torch.tensor([s], dtype=torch.int32)
    table = build_task_table(cu, lens, num_q_heads=hq, num_kv_heads=hkv, block_q=4, num_programs=2, causal=False)
    args = (q, k, v, torch.zeros(1, 1, dtype=torch.int32), cu, lens, table)
    right = kernel(*args, attn_bias=bias)
    torch.testing.assert_close(right, kernel(*args, attn_bias=bias, attn_bias_ranges=bias_ranges(bias)))
    short = bias_ranges(bias)
    short[..., 3] = short[..., 3].clamp(max=4)
    cut = kernel(*args, attn_bias=bias, attn_bias_ranges=short)
    torch.testing.assert_close(cut[:4], right[:4])  # rows 0-3 see keys 0-3 only: unchanged
    assert (cut[4:] - right[4:]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_every_backend_refuses_the_same_bad_launches(backend: str) -> None:
    """The reference launcher makes the device launchers' checks (`check_launch_inputs`,
    `softmax_scale`): sinks or ALiBi slopes that are not one per query head, a scale that is not
    finite and a cache of another dtype are refused before anything runs."""
    from tileflow.kernel_spec import KernelSpec, make_params
    from tileflow.targets import get_backend

    hq, hkv, d, s = 4, 2, 8, 5
    kernels = {
        extra: get_backend(backend).build(KernelSpec(
            op="meta_attention", dtype="float32", out_dtype="float32",
            params=make_params(head_dim=d, gqa=hq // hkv, block_q=4, causal=True, **{extra: True})))
        for extra in ("sinks", "alibi")
    }
    q = torch.randn(s, hq, d)
    k_cache, v_cache = torch.randn(2, 4, hkv, d), torch.randn(2, 4, hkv, d)
    cu, lens = torch.tensor([0, s], dtype=torch.int32), torch.tensor([s], dtype=torch.int32)
    table = build_task_table(cu, lens, num_q_heads=hq, num_kv_heads=hkv, block_q=4, num_programs=2)
    args = (q, k_cache, v_cache, torch.tensor([[0, 1]], dtype=torch.int32), cu, lens, table)
    good = {"sinks": {"sinks": torch.zeros(hq)}, "alibi": {"alibi_slopes": torch.full((hq,), 0.5)}}
    for extra, kernel in kernels.items():
        name = next(iter(good[extra]))
        out = kernel(*args, out=torch.full_like(q, float("nan")), **good[extra])
        assert out.isfinite().all()
        with pytest.raises(ValueError, match=rf"pass {name}, a float \[Hq=4\] tensor"):
            kernel(*args, **{name: torch.zeros(hq + 1)})
        for scale in (float("nan"), float("inf"), True):
            with pytest.raises(ValueError, match="the softmax scale must be a finite number"):
                kernel(*args, scale=scale, **good[extra])
        with pytest.raises(ValueError, match="k_cache must be float32, got float64"):
            kernel(q, k_cache.double(), *args[2:], **good[extra])


def _two_sequence_launch(backend: str) -> tuple[tuple[torch.Tensor, ...], Callable[..., Any]]:
    """Launch arguments of two sequences (6 and 3 queries over 6 and 9 keys, 2 query heads on 1
    KV head of 16, paged in blocks of 4), and `build(**flags)`: `backend`'s fp32 meta-attention
    kernel for them (tiles of 4 query rows) with those feature flags."""
    from tileflow.kernel_spec import KernelSpec, make_params
    from tileflow.targets import get_backend

    q = torch.randn(9, 2, 16)
    k_cache, v_cache = torch.randn(4, 4, 1, 16), torch.randn(4, 4, 1, 16)
    cu, lens = torch.tensor([0, 6, 9], dtype=torch.int32), torch.tensor([6, 9], dtype=torch.int32)
    block_table = torch.tensor([[0, 1, 3], [2, 3, 1]], dtype=torch.int32)

    def build(**flags: bool) -> Any:
        return get_backend(backend).build(KernelSpec(
            op="meta_attention", dtype="float32", out_dtype="float32",
            params=make_params(head_dim=16, gqa=2, block_q=4, block_kv=16, **flags)))

    return (q, k_cache, v_cache, block_table, cu, lens), build


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_every_backend_refuses_a_table_or_bias_of_another_batch(backend: str) -> None:
    """A task table built for another window (its KV ranges clipped narrower than the launch
    sees) and an attn_bias smaller than the batch's query runs and KV lengths are refused by
    every launcher: the Triton one ran both, dropping keys and reading the bias past its end."""
    args, build = _two_sequence_launch(backend)
    q, cu, lens = args[0], args[4], args[5]
    windowed = build(causal=True, sliding_window=True)
    narrow = build_task_table(cu, lens, num_q_heads=2, num_kv_heads=1, block_q=4, num_programs=2, sliding_window=2)
    with pytest.raises(ValueError, match="the task table was built for causal=True, sliding_window=2"):
        windowed(*args, narrow, sliding_window=8)
    right = build_task_table(cu, lens, num_q_heads=2, num_kv_heads=1, block_q=4, num_programs=2, sliding_window=8)
    assert windowed(*args, right, sliding_window=8, out=torch.full_like(q, float("nan"))).isfinite().all()

    biased = build(causal=True, bias=True)
    table = build_task_table(cu, lens, num_q_heads=2, num_kv_heads=1, block_q=4, num_programs=2)
    with pytest.raises(ValueError, match=r"attn_bias must .*>= 6, >= 9\]"):
        biased(*args, table, attn_bias=torch.zeros(2, 1, 2, 3))
    assert biased(*args, table, attn_bias=torch.zeros(2, 1, 6, 9), out=torch.full_like(q, float("nan"))).isfinite().all()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_every_backend_refuses_another_causal_rule_a_zero_window_or_a_bias_short_of_keys(backend: str) -> None:
    """Each launcher's own checks (`check_launch_inputs`, messages prefixed with the kernel's
    name) refuse, before anything runs: a causal table (KV ranges cut at each tile's last row)
    under a kernel built without the causal rule, which would drop the later keys; a sliding
    window of 0; and an attn_bias with every query row but fewer keys than the longest L_s,
    which the Triton kernel would read past its end."""
    args, build = _two_sequence_launch(backend)
    cu, lens = args[4], args[5]
    table = build_task_table(cu, lens, num_q_heads=2, num_kv_heads=1, block_q=4, num_programs=2)

    def refused(kernel, message: str) -> str:
        return re.escape(f"kernel {kernel.spec.name}: {message}")

    bidirectional = build(causal=False)
    with pytest.raises(ValueError, match=refused(bidirectional, "the task table was built for causal=True, "
                                                                "sliding_window=None but is run with causal=False")):
        bidirectional(*args, table)
    windowed = build(causal=True, sliding_window=True)
    with pytest.raises(ValueError, match=refused(windowed, "the kernel was built with a sliding window: pass "
                                                           "sliding_window=<int >= 1>, got 0")):
        windowed(*args, table, sliding_window=0)
    for window in (float("nan"), float("inf")):  # (int() of them raised Python's own error)
        with pytest.raises(ValueError, match=refused(windowed, "the kernel was built with a sliding window: pass "
                                                               f"sliding_window=<int >= 1>, got {window!r}")):
            windowed(*args, table, sliding_window=window)
    biased = build(causal=True, bias=True)
    with pytest.raises(ValueError, match=refused(biased, "attn_bias must cover every query row and key of the "
                                                         "batch, [S, Hq, >= 6, >= 9], got [2, 1, 6, 3]")):
        biased(*args, table, attn_bias=torch.zeros(2, 1, 6, 3))


@pytest.mark.parametrize("kv_split", [0, 3])
def test_sinks_and_alibi_through_split_kv_merges_match_dense(kv_split: int) -> None:
    """Sink logits and ALiBi slopes distinct per head (GQA groups of 2, tiles of several query
    rows): the tile executor, with whole-range tasks or split-KV chunks merged, matches the
    dense definition."""
    batch = make_batch(["prefill", "chunked", "decode"], num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=4,
                       dtype=torch.float64, seed=7, max_len=20)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    slopes = torch.tensor([0.25, 0.5, 0.125, 1.0], dtype=torch.float64)
    table = build_task_table(batch["cu_seqlens_q"], batch["seqlens_kv"], num_q_heads=4, num_kv_heads=2, block_q=3,
                             num_programs=3, kv_split=kv_split)
    assert (table.num_slots > 0) == (kv_split > 0)
    tiled = run_task_table(table, **batch, sinks=sinks, alibi_slopes=slopes)
    dense = attention_reference_dense(**batch, sinks=sinks, alibi_slopes=slopes)
    torch.testing.assert_close(tiled, dense, **TOLERANCES[torch.float64])


def test_bias_narrowed_tasks_match_dense() -> None:
    """A bias that hides the first 4 keys (padding) and the keys after each row (a causal mask
    as a bias), run by the reference backend in split-KV chunks of 4: each task narrowed to its
    tile's bias ranges (whose later rows see more keys than the first; a chunk the padding
    hides entirely is empty) still gives the dense result."""
    from tileflow.kernel_spec import KernelSpec, make_params
    from tileflow.targets import get_backend

    gen = torch.Generator().manual_seed(6)
    hq, hkv, s, d = 2, 1, 12, 8
    q = torch.randn(s, hq, d, generator=gen)
    k, v = (torch.randn(1, s, hkv, d, generator=gen) for _ in range(2))
    bias = torch.full((s, s), float("-inf")).triu(1)
    bias[4:, :4] = float("-inf")
    bias = bias[None, None]
    spec = KernelSpec(op="meta_attention", dtype="float32", out_dtype="float32",
                      params=make_params(head_dim=d, gqa=hq // hkv, block_q=4, causal=False, bias=True))
    kernel = get_backend("reference").build(spec)
    cu, lens = torch.tensor([0, s], dtype=torch.int32), torch.tensor([s], dtype=torch.int32)
    table = build_task_table(cu, lens, num_q_heads=hq, num_kv_heads=hkv, block_q=4, num_programs=2, causal=False,
                             kv_split=4)
    block_table = torch.zeros(1, 1, dtype=torch.int32)
    got = kernel(q, k, v, block_table, cu, lens, table, attn_bias=bias)
    want = attention_reference_dense(q, k, v, block_table, cu, lens, causal=False, attn_bias=bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_key_starts_apply_in_every_query_tile() -> None:
    """`key_starts` read at each tile's own query rows (tiles of 2 rows, split-KV chunks of 3):
    the executor matches the dense definition with the starts written as a -inf bias."""
    batch = make_batch(["prefill", "chunked"], num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=4,
                       dtype=torch.float64, seed=8, max_len=20)
    cu, lens = batch["cu_seqlens_q"].tolist(), batch["seqlens_kv"].tolist()
    q_lens = [cu[i + 1] - cu[i] for i in range(len(lens))]
    gen = torch.Generator().manual_seed(8)
    starts = torch.stack([torch.randint(0, max(lens), (max(q_lens),), generator=gen) for _ in lens])
    keys = torch.arange(max(lens))
    bias = torch.zeros(len(lens), 1, max(q_lens), max(lens), dtype=torch.float64)
    bias = bias.masked_fill(keys[None, None, None, :] < starts[:, None, :, None], float("-inf"))
    for kv_split in (0, 3):
        table = build_task_table(cu, lens, num_q_heads=4, num_kv_heads=2, block_q=2, num_programs=3,
                                 kv_split=kv_split)
        tiled = run_task_table(table, **batch, key_starts=starts.to(torch.int32))
        dense = attention_reference_dense(**batch, attn_bias=bias)
        torch.testing.assert_close(tiled, dense, **TOLERANCES[torch.float64])


def test_dense_op_refuses_more_queries_than_keys_under_a_positional_rule_clearly() -> None:
    """`meta_attention` (SDPA-like, dense) places query i at key position S_kv - S + i, which
    the causal rule, a sliding window, an attention chunk and ALiBi read, so with one of them it
    needs S <= S_kv. A direct call with more queries than keys must say so in the dense op's
    terms, naming the rule, not with the varlen op's 'the new tokens' K/V must already be in the
    cache'."""
    from tileflow.ops import meta_attention

    q, k, v = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    for rule, kwargs in (("causal", {"causal": True}), ("sliding_window", {"sliding_window": 3}),
                         ("attention_chunk", {"attention_chunk": 2}), ("alibi_slopes", {"alibi_slopes": [0.5, 0.25]})):
        with pytest.raises(ValueError, match=rf"meta_attention: q has 8 query positions but k only 4 keys, with {rule}"):
            meta_attention(q, k, v, **kwargs)


def _float64_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float64 SDPA over [B, H, S, D] (GQA: K/V heads repeated) plus an additive bias; a row that
    sees no key gives zeros, the kernels' contract."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + (bias.double() if bias.dtype != torch.bool else
                           torch.zeros(bias.shape, dtype=torch.float64).masked_fill(~bias, float("-inf")))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v


def more_queries_than_keys_cases(dtype: torch.dtype) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  torch.Tensor | None]]:
    """(name, q, k, v, mask) with more queries than keys (and, as a control, one fewer), GQA 2:
    no mask, a key-padding mask (-inf, and as bool) and a soft bias (its own value per element)."""
    gen = torch.Generator().manual_seed(7)
    b, hq, hkv, d = 2, 4, 2, 16
    cases = []
    for s, s_kv in ((20, 11), (6, 3), (9, 10)):
        q = torch.randn(b, hq, s, d, generator=gen).to(dtype)
        k, v = (torch.randn(b, hkv, s_kv, d, generator=gen).to(dtype) for _ in range(2))
        pad = torch.zeros(b, 1, 1, s_kv)
        pad[1, ..., s_kv - 2:] = float("-inf")  # the second sequence's last two keys are padding
        for name, mask in (("no mask", None), ("key padding", pad), ("key padding as bool", pad == 0),
                           ("soft bias", torch.randn(b, hq, s, s_kv, generator=gen))):
            cases.append((f"{name}, S={s}, S_kv={s_kv}", q, k, v, mask))
    return cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_op_runs_more_queries_than_keys_without_a_positional_rule(dtype: torch.dtype) -> None:
    """Without the causal rule, a window, an attention chunk or ALiBi no rule reads a query's
    position, so cross-attention over a shorter input (more queries than keys) is plain SDPA:
    the reference kernel's launcher, on a NaN-poisoned output with and without split-KV chunks,
    and the dense op equal float64 attention, for no mask, a key-padding mask and a soft bias,
    GQA 2. Over no key at all the op gives eager's zeros. (It raised 'q has 20 query positions
    but k only 11 keys'.)"""
    from tileflow.backends.reference.attention import build_reference_attention
    from tileflow.kernel_spec import KernelSpec, make_params

    for name, q, k, v, mask in more_queries_than_keys_cases(dtype):
        b, hq, s, d = q.shape
        hkv, s_kv = k.shape[1], k.shape[2]
        want = _float64_attention(q, k, v, mask)
        tol = TOLERANCES[dtype]
        got = torch.ops.tileflow.meta_attention(q, k, v, mask, False, None, "reference")
        torch.testing.assert_close(got.double(), want, **tol, msg=lambda m: f"dense op, {name}: {m}")
        spec = KernelSpec(op="meta_attention", dtype=str(dtype).removeprefix("torch."),
                          out_dtype=str(dtype).removeprefix("torch."),
                          params=make_params(head_dim=d, gqa=hq // hkv, block_q=4, block_kv=16, causal=False,
                                             bias=mask is not None))
        cu = torch.arange(0, b * s + 1, s, dtype=torch.int32)
        seqlens = torch.full((b,), s_kv, dtype=torch.int32)
        bias = {} if mask is None else {"attn_bias": mask.expand(b, hq, s, s_kv)}
        for kv_split in (0, 4):
            table = build_task_table(cu, seqlens, num_q_heads=hq, num_kv_heads=hkv, block_q=4, num_programs=3,
                                     causal=False, kv_split=kv_split)
            assert (table.num_slots > 0) == (kv_split == 4 and s_kv > 4)
            out = torch.full((b * s, hq, d), float("nan"), dtype=dtype)
            build_reference_attention(spec).launch(
                q.transpose(1, 2).reshape(b * s, hq, d), k.transpose(1, 2), v.transpose(1, 2),
                torch.arange(b, dtype=torch.int32).view(b, 1), cu, seqlens, table, out=out, **bias)
            assert not out.isnan().any(), f"{name}, kv_split={kv_split}: some outputs were never written"
            torch.testing.assert_close(out.view(b, s, hq, d).transpose(1, 2).double(), want, **tol,
                                       msg=lambda m: f"launcher, {name}, kv_split={kv_split}: {m}")
    q = torch.randn(2, 4, 3, 16, dtype=dtype)
    empty = torch.ops.tileflow.meta_attention(q, q[:, :2, :0], q[:, :2, :0], None, False, None, "reference")
    assert torch.equal(empty, torch.zeros_like(q))


def test_a_tree_mask_without_the_causal_rule_runs_on_the_task_table() -> None:
    """A tree mask without causality (a spec the kernels support: each tile spans its whole KV
    length) runs task by task like any other, with split-KV merges: equal to the dense
    reference and the oracle. (The executor's metadata check must not take such a call for
    one with more queries than keys, which refuses a tree mask.)"""
    batch = make_batch(["verify", "prefill", "verify"], num_q_heads=2, num_kv_heads=1, head_dim=16, block_size=5,
                       dtype=torch.float32, seed=11, tree_size=5, max_len=45)
    assert batch["tree_mask"] is not None
    tiled, dense, oracle, table = run_all(batch, causal=False, window=None, block_q=2, num_programs=4, kv_split=16)
    assert table.merges.shape[0] > 0
    assert_all_close(tiled, dense, oracle, torch.float32)
