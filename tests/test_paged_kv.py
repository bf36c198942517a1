"""`PagedKV`: a step's layout built once on the host (block table, lengths, cache slots), one
scatter per layer for the new rows, and attention over the batch without reading the metadata
back from the device — checked against per-token writes and the validated public op."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import tileflow
from tileflow.runtime.paged_kv import PagedKV

BLOCK, HKV, HQ, D = 3, 2, 4, 8


def _layout(draw_lens: list[tuple[int, int]], seed: int, spare: int = 0) -> tuple[list[list[int]], list[int], list[int]]:
    """Shuffled, disjoint blocks for sequences with (cached prefix, new tokens) lengths, each
    owning `spare` blocks past the ones it fills (as a serving engine reserves them)."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-(prefix + n) // BLOCK) + spare for prefix, n in draw_lens]
    order = torch.randperm(sum(need) + 2, generator=gen).tolist()  # two spare blocks stay unused
    blocks, at = [], 0
    for k in need:
        blocks.append(order[at : at + k])
        at += k
    return blocks, [n for _, n in draw_lens], [prefix for prefix, _ in draw_lens]


@settings(max_examples=25, deadline=None)
@given(lens=st.lists(st.tuples(st.integers(0, 10), st.integers(1, 5)), min_size=1, max_size=5), seed=st.integers(0, 99))
def test_write_batch_puts_every_row_at_its_position(lens, seed) -> None:
    blocks, q_lens, starts = _layout(lens, seed)
    cache = PagedKV(1, HKV, D, block_size=BLOCK, num_blocks=sum(map(len, blocks)) + 2, dtype=torch.float32)
    batch = cache.prepare(blocks, q_lens, starts)
    assert batch.host_cu_seqlens_q == tuple(batch.cu_seqlens_q.tolist())
    assert batch.host_seqlens_kv == tuple(s + n for s, n in zip(starts, q_lens)) == tuple(batch.seqlens_kv.tolist())
    k, v = torch.randn(2, sum(q_lens), HKV, D).unbind(0)
    cache.write_batch(0, batch, k, v)
    row = 0
    for b, n, start in zip(blocks, q_lens, starts):
        for p in range(start, start + n):
            torch.testing.assert_close(cache.k[0][b[p // BLOCK], p % BLOCK], k[row], rtol=0, atol=0)
            torch.testing.assert_close(cache.v[0][b[p // BLOCK], p % BLOCK], v[row], rtol=0, atol=0)
            row += 1
    # Nothing else was written: the cache holds exactly the step's rows.
    assert int((cache.k[0] != 0).any(-1).any(-1).sum()) == sum(q_lens)


@pytest.mark.parametrize("tree", [False, True])
def test_attend_batch_equals_the_validated_op(tree: bool) -> None:
    torch.manual_seed(0)
    blocks, q_lens, starts = _layout([(7, 1), (0, 5), (4, 3), (9, 2)], seed=1)
    cache = PagedKV(2, HKV, D, block_size=BLOCK, num_blocks=sum(map(len, blocks)) + 2, dtype=torch.float32)
    for layer in range(2):  # fill the whole cache (prefixes included) with random rows
        cache.k[layer].normal_()
        cache.v[layer].normal_()
    batch = cache.prepare(blocks, q_lens, starts)
    q = torch.randn(sum(q_lens), HQ, D)
    tree_mask = None
    if tree:  # a verify-style mask: each new token sees the first one and itself
        tree_mask = torch.eye(4, dtype=torch.bool).expand(4, 4, 4).clone()
        tree_mask[:, :, 0] = True
    got = cache.attend_batch(1, q, batch, scale=0.3, tree_mask=tree_mask)
    want = tileflow.ops.meta_attention_varlen(
        q, cache.k[1], cache.v[1], batch.block_table, batch.cu_seqlens_q, batch.seqlens_kv, scale=0.3,
        tree_mask=tree_mask,
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@settings(max_examples=30, deadline=None)
@given(lens=st.lists(st.tuples(st.integers(0, 14), st.integers(0, 9)), min_size=1, max_size=4),
       chunk=st.sampled_from([3, 6, 9]), tree=st.booleans(), seed=st.integers(0, 99), spare=st.integers(0, 2))
@example(lens=[(2, 4), (7, 3), (0, 9)], chunk=3, tree=True, seed=0, spare=0)  # trees across a boundary, a prompt across two
@example(lens=[(1, 1), (4, 1), (8, 0)], chunk=9, tree=True, seed=1, spare=2)  # every sequence inside its first chunk
@example(lens=[(10, 1), (4, 1)], chunk=6, tree=False, seed=2, spare=1)  # decodes past the first chunk
def test_chunked_attention_sees_only_each_querys_chunk(lens, chunk: int, tree: bool, seed: int, spare: int) -> None:
    """Llama 4's chunked attention through the step's chunk view: query rows at position p see
    the keys at or after chunk * (p // chunk), up to p, whichever chunks the sequence's new
    tokens span (decode, prompt chunks across several boundaries, empty sequences) and under a
    tree mask (a random tree over each short sequence's new tokens, causal for the longer ones);
    against float64 attention with the rule written out."""
    blocks, q_lens, starts = _layout(lens, seed, spare)
    gen = torch.Generator().manual_seed(seed)
    cache = PagedKV(1, HKV, D, block_size=BLOCK, num_blocks=sum(map(len, blocks)) + 2, dtype=torch.float32)
    cache.k[0].normal_(generator=gen)
    cache.v[0].normal_(generator=gen)
    batch = cache.prepare(blocks, q_lens, starts, attention_chunks=(chunk,))
    q = torch.randn(sum(q_lens), HQ, D, generator=gen)
    t = 4
    tree_mask = None
    if tree:  # each drafted token sees itself and a random set of the tokens before it
        tree_mask = (torch.rand(len(lens), t, t, generator=gen) < 0.5).tril_(-1) | torch.eye(t, dtype=torch.bool)
    got = cache.attend_batch(0, q, batch, scale=0.3, tree_mask=tree_mask, attention_chunk=chunk)
    row = 0
    for s, (owned, n, start) in enumerate(zip(blocks, q_lens, starts)):
        positions = torch.arange(start + n)
        keys = cache.k[0][torch.tensor(owned, dtype=torch.long)[positions // BLOCK], positions % BLOCK].double()
        values = cache.v[0][torch.tensor(owned, dtype=torch.long)[positions // BLOCK], positions % BLOCK].double()
        for i in range(n):
            p = start + i
            sees = (positions <= p) & (positions >= p // chunk * chunk)
            if tree_mask is not None and n <= t:
                new = positions >= start
                sees &= ~new | torch.nn.functional.pad(tree_mask[s, i, :n], (start, 0))
            for h in range(HQ):
                scores = (keys[sees, h // (HQ // HKV)] @ q[row, h].double()) * 0.3
                want = scores.softmax(0) @ values[sees, h // (HQ // HKV)]
                torch.testing.assert_close(got[row, h].double(), want, rtol=1e-5, atol=1e-5)
            row += 1


def test_chunked_attention_needs_its_chunk_view_and_whole_blocks_per_chunk() -> None:
    cache = PagedKV(1, HKV, D, block_size=BLOCK, num_blocks=4, dtype=torch.float32)
    batch = cache.prepare([[0, 1]], [4], [0], attention_chunks=(6,))
    with pytest.raises(ValueError, match=r"prepared for chunks of \[6\]: pass attention_chunks=\(3,\)"):
        cache.attend_batch(0, torch.randn(4, HQ, D), batch, scale=1.0, attention_chunk=3)
    with pytest.raises(ValueError, match="chunks of 4 positions, which the KV block size 3 does not divide"):
        cache.prepare([[0, 1]], [4], [0], attention_chunks=(4,))


def test_prepare_rejects_bad_layouts() -> None:
    cache = PagedKV(1, HKV, D, block_size=BLOCK, num_blocks=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="need 2 blocks of 3 tokens, it has 1"):
        cache.prepare([[0]], [2], [2])
    with pytest.raises(ValueError, match=r"block ids \[0, 4\] outside \[0, 4\)"):
        cache.prepare([[0, 4]], [1], [0])
    with pytest.raises(ValueError, match="same non-empty batch"):
        cache.prepare([[0], [1]], [1], [0, 0])
    batch = cache.prepare([[0]], [2], [0])
    with pytest.raises(ValueError, match="the batch has 2 new rows"):
        cache.write_batch(0, batch, torch.zeros(3, HKV, D), torch.zeros(3, HKV, D))


def test_to_device_keeps_values_shapes_and_dtypes() -> None:
    """The step's host arrays reach the device unchanged (on the CPU without a copy); a tensor
    already on the device stays as it is."""
    import numpy as np

    from tileflow.transfers import to_device

    table = np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2]  # not contiguous
    slots = np.array([7, 2**40], dtype=np.int64)
    mask = torch.tril(torch.ones(2, 3, 3, dtype=torch.bool))
    got = to_device("cpu", table, slots, mask)
    assert [t.dtype for t in got] == [torch.int32, torch.int64, torch.bool]
    assert got[0].tolist() == table.tolist() and got[1].tolist() == [7, 2**40] and got[2] is mask
    flat = np.zeros(4, dtype=np.int64)
    assert to_device("cpu", flat)[0].data_ptr() == flat.ctypes.data  # shared, not copied
    assert to_device("cpu", np.array(5))[0].shape == ()  # a 0-d array stays 0-d
    meta = torch.empty(2, device="meta")
    assert to_device("meta", meta)[0] is meta  # already there


def test_a_sequence_ending_on_a_chunk_boundary_is_one_piece() -> None:
    """New tokens that fill their first chunk up to its last position stay one piece: the chunk
    view is the step itself (no empty piece opened at the next chunk's start)."""
    cache = PagedKV(1, HKV, D, block_size=BLOCK, num_blocks=4, dtype=torch.float32)
    batch = cache.prepare([[0, 1], [2, 3]], [6, 2], [0, 1], attention_chunks=(6,))
    view = batch.chunk_views[6]
    assert view.batch is None and view.piece_seq.tolist() == [0, 1] and view.piece_row.tolist() == [0, 0]
    # Across a boundary (positions 4..8 with chunks of 6): two pieces, rows 4-5 and 6-8.
    batch = cache.prepare([[0, 1, 2]], [5], [4], attention_chunks=(6,))
    view = batch.chunk_views[6]
    assert view.piece_seq.tolist() == [0, 0] and view.batch.host_cu_seqlens_q == (0, 2, 5)


def test_write_batch_checks_the_value_rows_too() -> None:
    """k with the batch's rows and v with others is refused as a k/v pair of the wrong length."""
    cache = PagedKV(1, HKV, D, block_size=BLOCK, num_blocks=4, dtype=torch.float32)
    batch = cache.prepare([[0]], [2], [0])
    with pytest.raises(ValueError, match="the batch has 2 new rows, got k/v with 2/3"):
        cache.write_batch(0, batch, torch.zeros(2, HKV, D), torch.zeros(3, HKV, D))


def test_to_device_takes_arrays_with_negative_strides() -> None:
    """A reversed numpy view (negative strides, which `torch.from_numpy` refuses) arrives with
    its values in order."""
    import numpy as np

    from tileflow.transfers import to_device

    (got,) = to_device("cpu", np.arange(6, dtype=np.int32).reshape(2, 3)[::-1, ::-1])
    assert got.tolist() == [[5, 4, 3], [2, 1, 0]] and got.dtype == torch.int32


def test_checked_attention_refuses_host_metadata_other_than_the_device_tensors() -> None:
    """With `check`, the device lengths are validated, and the host copies the task table is built
    from must be those lengths: on the Triton path (nothing compares them at launch) host copies
    that disagree ran the kernel over other rows than the batch's, silently."""
    pytest.importorskip("triton")
    from tileflow.runtime.attention import run_meta_attention_varlen

    torch.manual_seed(0)
    q, k, v = torch.randn(4, 2, 16), torch.randn(2, 4, 1, 16), torch.randn(2, 4, 1, 16)
    table = torch.tensor([[0], [1]], dtype=torch.int32)
    cu, lens = torch.tensor([0, 2, 4], dtype=torch.int32), torch.tensor([3, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"host_metadata .* differs from the device tensors"):
        run_meta_attention_varlen(q, k, v, table, cu, lens, check=True, target="triton",
                                  host_metadata=((0, 2, 4), (2, 3)))
    # The same lengths on the host are fine (and spare nothing but the read-back).
    expected = run_meta_attention_varlen(q, k, v, table, cu, lens, check=True)
    got = run_meta_attention_varlen(q, k, v, table, cu, lens, check=True, host_metadata=((0, 2, 4), (3, 3)))
    torch.testing.assert_close(got, expected)


def test_prepare_refuses_two_new_rows_in_one_cache_slot() -> None:
    """A block written in a step belongs to one sequence: two sequences given one block (or one
    listing a block twice) made one row's k/v overwrite the other's, and attention read it."""
    cache = PagedKV(1, HKV, D, block_size=BLOCK, num_blocks=4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"new rows 0 \(sequence 0\) and 2 \(sequence 1\) both go to cache slot 3 "
                                         r"\(block 1\)"):
        cache.prepare([[0, 1], [2, 1]], [2, 2], [3, 3])
    with pytest.raises(ValueError, match=r"new rows 0 \(sequence 0\) and 3 \(sequence 0\) both go to cache slot 9"):
        cache.prepare([[3, 3]], [6], [0])
    # A decode step of two sequences handed one block: two rows in all, one slot.
    with pytest.raises(ValueError, match=r"new rows 0 \(sequence 0\) and 1 \(sequence 1\) both go to cache slot 4 "):
        cache.prepare([[0, 1], [2, 1]], [1, 1], [4, 4])
    # Sharing blocks that are only read (a cached prefix) is fine, as are repeated entries no row reaches.
    batch = cache.prepare([[0, 1], [0, 2], [3, 3, 2]], [1, 1, 0], [3, 3, 5])
    assert batch.slots.tolist() == [3, 6]
