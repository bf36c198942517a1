"""Properties of the meta-attention task table (tileflow.tasks): coverage, KV clipping,
symmetric round-robin dealing, determinism, load balance, split-KV and validation."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tileflow.tasks import MERGE_COLUMNS, TASK_COLUMNS, TaskTable, build_task_table

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------
# Independent expectations
# ----------------------------------------------------------------------------------------------


def visible_interval(i: int, n: int, kv_len: int, causal: bool, window: int | None) -> tuple[int, int]:
    """[lo, hi) of KV positions query row i sees (an interval without a tree mask)."""
    p = kv_len - n + i
    lo = max(0, p - window + 1) if window is not None else 0
    hi = p + 1 if causal else kv_len
    return lo, hi


def check_invariants(
    table: TaskTable, q_lens: list[int], kv_lens: list[int], *, causal: bool, window: int | None,
    sequences: set[int] | None = None,
) -> None:
    """Every structural promise of the contract, checked from first principles (each row of
    the `sequences` chosen, default all, covered exactly once; the others not at all)."""
    num_q, num_kv, bq = table.num_q_heads, table.num_kv_heads, table.block_q
    group = num_q // num_kv
    tasks = table.tasks.numpy()
    merges = table.merges.numpy()
    assert table.tasks.dtype == table.merges.dtype == torch.int32
    assert table.program_offsets.dtype == table.program_tasks.dtype == torch.int32
    assert tasks.shape == (table.num_tasks, len(TASK_COLUMNS))
    assert merges.shape[1] == len(MERGE_COLUMNS)

    # Coverage counts per (sequence, query head, query row).
    cover = [np.zeros((num_q, n), dtype=np.int64) for n in q_lens]
    split_by_tile: dict[tuple[int, int, int, int], list[tuple[int, int, int]]] = {}
    for seq, g, q_start, q_rows, kv_start, kv_end, slot, cost in tasks.tolist():
        n, kv = q_lens[seq], kv_lens[seq]
        assert 0 <= g < num_kv
        assert 0 <= q_start < n and 1 <= q_rows <= bq and q_start + q_rows <= n
        assert q_start % bq == 0
        assert cost == q_rows * (kv_end - kv_start)
        tile_lo, _ = visible_interval(q_start, n, kv, causal, window)
        _, tile_hi = visible_interval(q_start + q_rows - 1, n, kv, causal, window)
        # Within what the rows can see: first row's window start, last row's last position.
        assert tile_lo <= kv_start < kv_end <= tile_hi
        if slot < 0:
            # An unsplit task reads exactly the union of its rows' visible intervals.
            assert (kv_start, kv_end) == (tile_lo, tile_hi)
            cover[seq][g * group:(g + 1) * group, q_start:q_start + q_rows] += 1
        else:
            split_by_tile.setdefault((seq, g, q_start, q_rows), []).append((kv_start, kv_end, slot))

    used_slots: list[int] = []
    merged_tiles = set()
    for seq, g, q_start, q_rows, first_slot, num_slots in merges.tolist():
        key = (seq, g, q_start, q_rows)
        assert key not in merged_tiles
        merged_tiles.add(key)
        chunks = sorted(split_by_tile.get(key, []))
        assert len(chunks) == num_slots >= 2
        assert sorted(c[2] for c in chunks) == list(range(first_slot, first_slot + num_slots))
        n, kv = q_lens[seq], kv_lens[seq]
        tile_lo, _ = visible_interval(q_start, n, kv, causal, window)
        _, tile_hi = visible_interval(q_start + q_rows - 1, n, kv, causal, window)
        # Split chunks tile the visible range exactly once, without gap or overlap.
        edges = [tile_lo] + [c[1] for c in chunks]
        assert [c[0] for c in chunks] == edges[:-1] and edges[-1] == tile_hi
        cover[seq][g * group:(g + 1) * group, q_start:q_start + q_rows] += 1
        used_slots.extend(range(first_slot, first_slot + num_slots))
    assert set(split_by_tile) == merged_tiles
    assert sorted(used_slots) == list(range(table.num_slots))
    for seq, c in enumerate(cover):
        assert (c == (1 if sequences is None or seq in sequences else 0)).all()

    # Program lists: a permutation of the tasks over exactly P programs.
    offsets = table.program_offsets.numpy()
    assert offsets.shape == (table.num_programs + 1,) and offsets[0] == 0 and offsets[-1] == table.num_tasks
    assert (np.diff(offsets) >= 0).all()
    assert sorted(table.program_tasks.tolist()) == list(range(table.num_tasks))


def check_round_robin(table: TaskTable) -> None:
    """Program p's j-th task was dealt at step j*P + (p if j even else P-1-p), and the deal
    sequence is sorted by cost (descending), ties by the tile's first query position
    (descending: later rows first), then by task index."""
    num_p = table.num_programs
    offsets = table.program_offsets.tolist()
    prog_tasks = table.program_tasks.tolist()
    dealt: dict[int, int] = {}
    for p in range(num_p):
        for j, task in enumerate(prog_tasks[offsets[p]:offsets[p + 1]]):
            dealt[j * num_p + (p if j % 2 == 0 else num_p - 1 - p)] = task
    assert sorted(dealt) == list(range(table.num_tasks))
    seq = [dealt[k] for k in range(table.num_tasks)]
    cost = table.tasks[:, 7].tolist()
    cu, kv_lens = table.cu_seqlens_q.tolist(), table.seqlens_kv.tolist()
    first_pos = [kv_lens[s] - (cu[s + 1] - cu[s]) + q_start for s, _, q_start in table.tasks[:, :3].tolist()]
    keys = [(-cost[t], -first_pos[t], t) for t in seq]
    assert keys == sorted(keys)


# ----------------------------------------------------------------------------------------------
# Hypothesis inputs
# ----------------------------------------------------------------------------------------------


@st.composite
def batches(draw: st.DrawFn, max_len: int = 300) -> tuple[list[int], list[int]]:
    pairs = draw(st.lists(
        st.integers(0, max_len).flatmap(lambda kv: st.tuples(st.integers(0, kv), st.just(kv))),
        min_size=0, max_size=12,
    ))
    return [n for n, _ in pairs], [kv for _, kv in pairs]


@st.composite
def table_args(draw: st.DrawFn) -> dict:
    num_kv = draw(st.sampled_from([1, 2, 4]))
    return {
        "num_q_heads": num_kv * draw(st.sampled_from([1, 2, 4])),
        "num_kv_heads": num_kv,
        "block_q": draw(st.sampled_from([1, 2, 3, 16, 64])),
        "num_programs": draw(st.integers(1, 40)),
        "sliding_window": draw(st.none() | st.integers(1, 100)),
        "causal": draw(st.booleans()),
        "kv_split": draw(st.none() | st.just(0) | st.integers(1, 50)),
    }


def cu_of(q_lens: list[int]) -> list[int]:
    return [0, *np.cumsum(q_lens, dtype=np.int64).tolist()]


@settings(SETTINGS, max_examples=60)  # (41 s at 150 on CI's two cores; the tests below draw the same tables)
@given(batches(), table_args())
def test_table_covers_every_row_once(lengths: tuple[list[int], list[int]], args: dict) -> None:
    q_lens, kv_lens = lengths
    table = build_task_table(cu_of(q_lens), kv_lens, **args)
    assert table.num_programs == args["num_programs"]
    check_invariants(table, q_lens, kv_lens, causal=args["causal"], window=args["sliding_window"])
    check_round_robin(table)


@SETTINGS
@given(batches(), table_args())
def test_host_extent_bounds_what_a_bias_must_cover(lengths: tuple[list[int], list[int]], args: dict) -> None:
    """`host_extent` is the longest query run and the longest KV length of the batch (None for
    an empty one), taken once from the host copies, and the bias check's `bias_extent` reads it;
    a copy of the table on another device works it out anew, the same."""
    from tileflow.attention_inputs import bias_extent

    q_lens, kv_lens = lengths
    table = build_task_table(cu_of(q_lens), kv_lens, **args)
    want = (max(q_lens), max(kv_lens)) if q_lens else None
    assert table.host_extent == want and table.to("cpu").host_extent == want
    if q_lens:
        assert bias_extent(table, table.tasks, len(q_lens)) == want


@SETTINGS
@given(batches(), table_args(), st.data())
def test_table_for_some_sequences_covers_exactly_theirs(lengths: tuple[list[int], list[int]], args: dict,
                                                        data: st.DataObject) -> None:
    """A table built for a subset of the batch's sequences (one launch of a batch whose
    sequences want different tile heights) covers their rows once and no other row."""
    q_lens, kv_lens = lengths
    chosen = set(data.draw(st.lists(st.integers(0, max(len(q_lens) - 1, 0)), max_size=len(q_lens)))) if q_lens else set()
    table = build_task_table(cu_of(q_lens), kv_lens, **args, sequences=sorted(chosen))
    check_invariants(table, q_lens, kv_lens, causal=args["causal"], window=args["sliding_window"], sequences=chosen)
    check_round_robin(table)
    assert table.cu_seqlens_q.tolist() == cu_of(q_lens)  # the whole batch's metadata, still
    with pytest.raises(ValueError, match="sequences must index"):
        build_task_table(cu_of(q_lens), kv_lens, **args, sequences=[len(q_lens)])


@SETTINGS
@given(batches(max_len=5000), st.integers(1, 200), st.booleans())
@example(([1], [1280]), 9, True)  # 2 tiles: chunks of 256 make 10 tasks, one past the grid; 320 make 8
def test_automatic_split_kv(lengths: tuple[list[int], list[int]], num_programs: int, causal: bool) -> None:
    """Default split-KV: chunks a multiple of 64 >= 256, equal within a tile but its last; the
    busiest program never carries more than without splitting; a grid of more tiles than
    programs splits only when its deal was out of balance; with fewer, the one-wave chunk is the
    table unless its deal is out of balance, and a finer cut is kept only when it helps."""
    q_lens, kv_lens = lengths
    args = dict(num_q_heads=8, num_kv_heads=2, block_q=16, num_programs=num_programs, causal=causal)
    table = build_task_table(cu_of(q_lens), kv_lens, **args)
    check_invariants(table, q_lens, kv_lens, causal=causal, window=None)
    summary = table.to_summary()
    unsplit = build_task_table(cu_of(q_lens), kv_lens, **args, kv_split=0).to_summary()
    assert summary["max_program_cost"] <= unsplit["max_program_cost"]
    split = table.tasks[table.tasks[:, 6] >= 0]
    for _, _, _, _, first, count in table.merges.tolist():
        sizes = (split[first:first + count, 5] - split[first:first + count, 4]).tolist()
        assert sizes[0] % 64 == 0 and sizes[0] >= 256
        assert sizes[:-1] == [sizes[0]] * (count - 1) and 0 < sizes[-1] <= sizes[0]
    # The first candidate, rebuilt through the public knob: with fewer tiles than programs the
    # smallest chunk (a multiple of 64, >= 256) whose tasks fit one wave, else no split.
    first = unsplit
    if summary["num_tiles"] < num_programs:
        for chunk in range(256, max(kv_lens, default=0) + 64, 64):
            candidate = build_task_table(cu_of(q_lens), kv_lens, **args, kv_split=chunk).to_summary()
            if candidate["num_tasks"] <= num_programs:
                first = candidate if candidate["num_split_tiles"] else unsplit
                break
    if first["cost_ratio"] <= 1.25:  # balanced enough: that candidate is the table, one wave
        assert summary == first
        assert summary["num_tiles"] >= num_programs or summary["num_tasks"] <= num_programs
    else:  # out of balance: cut finer only when it lowers the busiest program
        assert summary == first or summary["max_program_cost"] < first["max_program_cost"]


def test_split_kv_balances_a_long_context_beside_many_short() -> None:
    """One 128k-context decode beside 200 short ones (more tiles than programs) and 17 decodes
    at 32k (a tile count just past the grid): the long tiles are cut, and the busiest program
    stays within 1.5x the average (without splitting: 4.75x and 1.94x)."""
    for kv in ([131072] + [2048] * 200, [32768] * 17):
        cu = list(range(len(kv) + 1))
        table = build_task_table(cu, kv, num_q_heads=32, num_kv_heads=8, block_q=16, num_programs=132)
        unsplit = build_task_table(cu, kv, num_q_heads=32, num_kv_heads=8, block_q=16, num_programs=132, kv_split=0)
        assert table.num_slots > 0 and unsplit.to_summary()["cost_ratio"] > 1.9
        assert table.to_summary()["cost_ratio"] <= 1.5
        check_invariants(table, [1] * len(kv), kv, causal=True, window=None)


def test_metadata_past_int32_is_refused() -> None:
    """The kernels read int32 metadata: a cost or KV length past it is an error, not a wrap."""
    with pytest.raises(ValueError, match="past the int32 metadata"):
        build_task_table([0, 128], [17_000_000], num_q_heads=1, num_kv_heads=1, block_q=128, num_programs=1, kv_split=0)
    with pytest.raises(ValueError, match="KV length is 2147483653"):
        build_task_table([0, 1], [2**31 + 5], num_q_heads=1, num_kv_heads=1, block_q=1, num_programs=1, kv_split=0)


def test_round_robin_example() -> None:
    """7 tasks of distinct cost over 3 programs: 0,1,2 | 2,1,0 | 0 (by descending cost)."""
    # Decode tasks whose cost is their KV length.
    kv = [10, 70, 30, 50, 20, 60, 40]
    table = build_task_table(list(range(8)), kv, num_q_heads=1, num_kv_heads=1, block_q=1, num_programs=3)
    by_cost = sorted(range(7), key=lambda t: -kv[t])  # task index == sequence here
    want = [[by_cost[0], by_cost[5], by_cost[6]], [by_cost[1], by_cost[4]], [by_cost[2], by_cost[3]]]
    offsets = table.program_offsets.tolist()
    got = [table.program_tasks[offsets[p]:offsets[p + 1]].tolist() for p in range(3)]
    assert got == want


def test_explicit_split_and_no_split() -> None:
    table = build_task_table([0, 1], [100], num_q_heads=4, num_kv_heads=2, block_q=4,
                             num_programs=1, kv_split=30)
    assert table.num_slots == 8 and table.merges.tolist() == [[0, 0, 0, 1, 0, 4], [0, 1, 0, 1, 4, 4]]
    assert table.tasks[:4, 4:6].tolist() == [[0, 30], [30, 60], [60, 90], [90, 100]]
    off = build_task_table([0, 1], [100_000], num_q_heads=4, num_kv_heads=2, block_q=4,
                           num_programs=132, kv_split=0)
    assert off.num_slots == 0 and off.num_tasks == 2


def test_split_kv_triggers_for_few_long_sequences() -> None:
    """Two decodes at 32k context on 8 KV heads: 16 tiles for 132 programs -> split-KV fills
    the grid (one wave, no program left with more than one chunk)."""
    table = build_task_table([0, 1, 2], [32768, 30000], num_q_heads=32, num_kv_heads=8,
                             block_q=16, num_programs=132)
    summary = table.to_summary()
    assert summary["num_split_tiles"] == 16
    assert 100 <= table.num_tasks <= 132
    assert summary["max_program_cost"] == summary["max_task_cost"]
    check_invariants(table, [1, 1], [32768, 30000], causal=True, window=None)
    # Many short tiles: no split even with long KV.
    many = build_task_table(list(range(201)), [32768] * 200, num_q_heads=32, num_kv_heads=8,
                            block_q=16, num_programs=132)
    assert many.num_slots == 0


def test_empty_and_zero_query_batches() -> None:
    for cu, kv in (([0], []), ([0, 0, 0], [5, 0])):
        table = build_task_table(cu, kv, num_q_heads=2, num_kv_heads=1, block_q=4, num_programs=3)
        assert table.num_tasks == 0 and table.tasks.shape == (0, 8) and table.merges.shape == (0, 6)
        assert table.program_offsets.tolist() == [0, 0, 0, 0]
        assert table.to_summary()["cost_ratio"] == 1.0


@settings(max_examples=30, deadline=None)
@given(batches(), table_args())
def test_deterministic_and_input_types_agree(lengths: tuple[list[int], list[int]], args: dict) -> None:
    q_lens, kv_lens = lengths
    cu = cu_of(q_lens)
    a = build_task_table(cu, kv_lens, **args)
    b = build_task_table(torch.tensor(cu, dtype=torch.int32), torch.tensor(kv_lens, dtype=torch.int32), **args)
    c = build_task_table(np.array(cu), np.array(kv_lens, dtype=np.int64), **args)
    for other in (b, c):
        for name in ("tasks", "program_offsets", "program_tasks", "merges", "cu_seqlens_q", "seqlens_kv"):
            assert torch.equal(getattr(a, name), getattr(other, name)), name
        assert a.num_slots == other.num_slots


# ----------------------------------------------------------------------------------------------
# Load balance on reference mixes
# ----------------------------------------------------------------------------------------------


def _reference_mixes() -> dict[str, list[tuple[int, int]]]:
    """Realistic serving batches as (n_s, L_s) lists (seeded)."""
    rng = np.random.default_rng(0)
    decodes = lambda lo, hi, k: [(1, int(x)) for x in rng.integers(lo, hi + 1, k)]  # noqa: E731
    return {
        "chunk512_over_1536_plus_200_decodes": [(512, 2048)] + decodes(128, 4096, 200),
        "64_decodes_at_8k_32k": decodes(8192, 32768, 64),
        "32_verify_trees_96_decodes_1_chunk": (
            [(int(n), int(kv)) for n, kv in zip(rng.integers(4, 17, 32), rng.integers(512, 4097, 32))]
            + decodes(256, 8192, 96) + [(256, 1024)]
        ),
        "4_decodes_at_long_context_split_kv": [(1, 16384), (1, 32768), (1, 8192), (1, 24576)],
        "2_prompts_1024_plus_100_decodes": [(1024, 1024), (1024, 1024)] + decodes(128, 2048, 100),
    }


@pytest.mark.parametrize("name", list(_reference_mixes()))
def test_balance_on_reference_mixes(name: str) -> None:
    """Max per-program cost <= 1.5x the average on realistic batches.

    The bound is a property of realistic serving batches with many tasks per program (or of
    split-KV filling the grid when there are few); it cannot hold in general — one task whose
    cost exceeds 1.5x the average program's work (e.g. 3 tasks on 2 programs) breaks it. The
    mixes use an H100-sized grid (132 programs), Llama-3-8B heads (32 q / 8 kv) and
    block_q = 16 (64-row tiles with the 4 packed query heads).
    """
    pairs = _reference_mixes()[name]
    q_lens = [n for n, _ in pairs]
    kv_lens = [kv for _, kv in pairs]
    table = build_task_table(cu_of(q_lens), kv_lens, num_q_heads=32, num_kv_heads=8,
                             block_q=16, num_programs=132)
    summary = table.to_summary()
    print(f"{name}: tasks={summary['num_tasks']} split_tiles={summary['num_split_tiles']} "
          f"max/avg program cost = {summary['cost_ratio']:.3f}")
    check_invariants(table, q_lens, kv_lens, causal=True, window=None)
    assert summary["cost_ratio"] <= 1.5


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

_OK = {"num_q_heads": 4, "num_kv_heads": 2, "block_q": 4, "num_programs": 2}


@pytest.mark.parametrize(
    ("cu", "kv", "overrides", "match"),
    [
        ([0, 1, 2], [3], {}, r"len\(cu_seqlens_q\) == len\(seqlens_kv\) \+ 1"),
        ([0, 5], [3], {}, r"n_s <= L_s"),
        ([0, 5], [3], {"causal": False, "sliding_window": 2}, r"n_s <= L_s"),
        ([0, 2, 1], [3, 3], {}, r"non-decreasing"),
        ([0, 1], [-1], {}, r"seqlens_kv must be >= 0"),
        ([1, 2], [3], {}, r"must start at 0"),
        ([0, 1], [3], {"num_programs": 0}, r"num_programs must be >= 1"),
        ([0, 1], [3], {"num_q_heads": 6, "num_kv_heads": 4}, r"multiple of num_kv_heads"),
        ([0, 1], [3], {"block_q": 0}, r"block_q must be >= 1"),
        ([0, 1], [3], {"sliding_window": 0}, r"sliding_window must be >= 1"),
        ([0, 1], [3], {"kv_split": -1}, r"kv_split must be >= 0"),
        ([0.0, 1.0], [3], {}, r"must hold integers"),
        ([[0, 1]], [3], {}, r"must be 1-D"),
    ],
)
def test_validation_errors(cu, kv, overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_task_table(cu, kv, **{**_OK, **overrides})


def test_more_queries_than_keys_without_a_positional_rule() -> None:
    """Not causal and no window, no rule reads a row's position: a sequence may have more query
    rows than keys (the dense op's cross-attention over a shorter input), each tile over all of
    its keys, split into chunks like any other; `check_metadata` allows it when asked, only then
    and only without the causal rule or a tree mask."""
    from tileflow.tasks import check_metadata

    table = build_task_table([0, 9, 12], [4, 2], num_q_heads=4, num_kv_heads=2, block_q=2, num_programs=3,
                             causal=False, kv_split=0)
    tasks = table.tasks.numpy()
    assert sorted(map(tuple, tasks[:, [0, 1, 2, 3]].tolist())) == sorted(
        (s, h, q, min(2, n - q)) for s, n in ((0, 9), (1, 3)) for h in (0, 1) for q in range(0, n, 2))
    assert (tasks[:, 4] == 0).all() and (tasks[:, 5] == np.where(tasks[:, 0] == 0, 4, 2)).all()
    split = build_task_table([0, 9], [40], num_q_heads=2, num_kv_heads=2, block_q=4, num_programs=3,
                             causal=False, kv_split=16)
    assert split.num_slots > 0
    over = build_task_table([0, 50], [40], num_q_heads=2, num_kv_heads=2, block_q=4, num_programs=3,
                            causal=False, kv_split=16)
    assert over.num_slots == 13 * 2 * 3  # 13 tiles x 2 heads, each over 40 keys in chunks of 16
    q, cache = torch.zeros(9, 2, 4), torch.zeros(1, 4, 2, 4)
    args = (q, cache, cache, torch.zeros(1, 1, dtype=torch.int32), torch.tensor([0, 9], dtype=torch.int32),
            torch.tensor([4], dtype=torch.int32))
    assert check_metadata(*args, causal=False, more_queries_than_keys=True) == ((0, 9), (4,))
    with pytest.raises(ValueError, match=r"n_s <= L_s"):
        check_metadata(*args, causal=False)
    with pytest.raises(ValueError, match=r"more_queries_than_keys needs causal=False and no tree_mask"):
        check_metadata(*args, causal=True, more_queries_than_keys=True)


@pytest.mark.parametrize(("length", "kv_heads", "block_q", "programs"), [(4096, 8, 32, 528), (4096, 4, 16, 528),
                                                                          (2048, 8, 32, 132)])
def test_equal_costs_deal_a_causal_ramp_evenly(length: int, kv_heads: int, block_q: int, programs: int) -> None:
    """A prompt whose causal mask comes as a bias: the host sees every tile over the whole
    sequence (equal costs), while the kernel's bias ranges cut each tile at its last row. Ties
    dealt later rows first pair cheap tiles with dear ones: the real per-program work stays
    within 5% of the average (dealt in task order instead, it is 16-29% over)."""
    table = build_task_table([0, length], [length], num_q_heads=4 * kv_heads, num_kv_heads=kv_heads,
                             block_q=block_q, num_programs=programs, causal=False)
    tasks = table.tasks.numpy()
    assert len(set(tasks[:, 7].tolist())) == 1  # the host's costs are all equal
    real = (tasks[:, 2] + tasks[:, 3]) * tasks[:, 3]  # rows x keys up to the tile's last row
    offsets, dealt = table.program_offsets.numpy(), table.program_tasks.numpy()
    work = np.array([real[dealt[offsets[p]:offsets[p + 1]]].sum() for p in range(programs)])
    assert work.max() / work.mean() < 1.05


def test_a_table_on_the_host_has_nothing_to_wait_for() -> None:
    """`to()` records the upload's event only for CUDA devices (see the GPU tests for streams);
    on the CPU the table's tensors stay as they are and using it waits for nothing."""
    table = build_task_table([0, 3, 4], [5, 9], num_q_heads=4, num_kv_heads=2, block_q=2, num_programs=3)
    moved = table.to("cpu")
    assert moved.uploaded is None and moved.tasks is table.tasks
    moved.ready_on_current_stream()


def test_query_rows_past_int32_are_refused() -> None:
    """cu_seqlens_q is int32 in the kernels too: two sequences of 1.5e9 query rows end past it
    even though every column of the table fits (window 1 keeps each tile's range to its rows),
    and the offsets must not wrap negative."""
    n = 1_500_000_000
    with pytest.raises(ValueError, match="the query row count is 3000000000"):
        build_task_table([0, n, 2 * n], [n, n], num_q_heads=1, num_kv_heads=1, block_q=2**15, num_programs=4,
                         sliding_window=1, kv_split=0)


def test_one_wave_split_may_fill_the_grid_exactly() -> None:
    """One decode tile of 2560 keys on 10 programs: chunks of 256 make exactly 10 tasks, one
    full wave, so they are the table (not 8 chunks of 320, which leave a program idle and the
    busiest 1.25x the average)."""
    table = build_task_table([0, 1], [2560], num_q_heads=1, num_kv_heads=1, block_q=1, num_programs=10)
    assert table.tasks[:, 4:6].tolist() == [[256 * i, 256 * (i + 1)] for i in range(10)]
    assert table.to_summary()["cost_ratio"] == 1.0


@pytest.mark.parametrize("causal", [True, False])
def test_a_deal_exactly_at_the_balance_bound_is_not_split(causal: bool) -> None:
    """Four decode tiles of 2116 keys on five programs: the unsplit deal's busiest program
    carries exactly 1.25x the average, which the automatic policy accepts (at most `_BALANCED`
    times), so nothing is split."""
    table = build_task_table([0, 1], [2116], num_q_heads=4, num_kv_heads=4, block_q=1, num_programs=5,
                             causal=causal)
    assert table.num_slots == 0 and table.num_tasks == 4
    assert table.to_summary()["cost_ratio"] == 1.25


def test_tiles_are_in_sequence_kv_head_q_tile_order() -> None:
    """The task order the contract documents (sequence, kv head, q tile), which numbers the
    split slots and breaks cost ties in the deal."""
    table = build_task_table([0, 5, 6], [5, 4], num_q_heads=2, num_kv_heads=2, block_q=2, num_programs=1,
                             kv_split=0)
    assert table.tasks[:, :4].tolist() == [
        [0, 0, 0, 2], [0, 0, 2, 2], [0, 0, 4, 1], [0, 1, 0, 2], [0, 1, 2, 2], [0, 1, 4, 1],
        [1, 0, 0, 1], [1, 1, 0, 1],
    ]


def test_metadata_past_int32_is_refused_before_the_tiles_are_built() -> None:
    """The int32 check on the KV lengths and query rows runs before the per-tile arrays, which
    the metadata sizes: 2**40 query rows in tiles of one row would otherwise ask numpy for a
    2**40-entry array first (a MemoryError, or the host's memory, instead of this ValueError)."""
    n = 2**40
    with pytest.raises(ValueError, match="is 1099511627776, past the int32 metadata"):
        build_task_table([0, n], [n], num_q_heads=1, num_kv_heads=1, block_q=1, num_programs=4,
                         sliding_window=1, kv_split=0)


@pytest.mark.parametrize("sequences", [[True, False, True], torch.tensor([True, False, True]), np.array([True, False, True]),
                                       [0.0, 2.0], [1.9]])
def test_sequences_that_are_no_indices_are_refused(sequences) -> None:
    """`sequences` are indices into the batch: a boolean mask (True, False, True) was read as the
    indices 1, 0, 1 and a float as its truncation, so the table silently covered other sequences
    than the caller meant (sequences 0 and 1 instead of 0 and 2)."""
    with pytest.raises(ValueError, match="sequences"):
        build_task_table([0, 1, 2, 3], [5, 6, 7], num_q_heads=1, num_kv_heads=1, block_q=1, num_programs=2,
                         sequences=sequences)


def test_a_boolean_metadata_tensor_is_refused_like_a_boolean_list() -> None:
    """A bool list was refused as metadata, but a bool tensor passed as the integers 0 and 1."""
    for kv in ([True], torch.tensor([True])):
        with pytest.raises(ValueError, match="seqlens_kv must hold integers"):
            build_task_table([0, 1], kv, num_q_heads=1, num_kv_heads=1, block_q=1, num_programs=1)


def test_more_queries_than_keys_is_refused_with_a_tree_mask() -> None:
    """`check_metadata(more_queries_than_keys=True)` refuses a tree mask as it refuses the causal
    rule (its docstring says both): a tree mask is over the new tokens, the last n_s of the L_s
    keys, whose positions more queries than keys would put before every key."""
    from tileflow.tasks import check_metadata

    q, cache = torch.zeros(9, 2, 4), torch.zeros(1, 4, 2, 4)
    args = (q, cache, cache, torch.zeros(1, 1, dtype=torch.int32), torch.tensor([0, 9], dtype=torch.int32),
            torch.tensor([4], dtype=torch.int32), torch.ones(1, 9, 9, dtype=torch.bool).tril())
    with pytest.raises(ValueError, match=r"more_queries_than_keys needs causal=False and no tree_mask"):
        check_metadata(*args, causal=False, more_queries_than_keys=True)
