"""Batch mixes for meta-attention tests (shared by the reference and the Triton kernel tests).

`make_batch` builds the tensors ``meta_attention_varlen`` takes for a list of sequence kinds:

- ``"prefill"``: a whole prompt, ``n_s = L_s``;
- ``"chunked"``: chunked prefill over a cached prefix, ``1 < n_s < L_s``;
- ``"decode"``: one new token, ``n_s = 1``;
- ``"verify"``: speculative verification of a random token tree, ``2 <= n_s <= tree_size``, with
  a tree mask (row i sees its ancestors and itself among the new tokens);
- ``"empty"``: a sequence with cached KV but no query rows this step, ``n_s = 0``.

The KV cache is paged with a shuffled block table (a sequence's pages are not contiguous), and
by default every cache slot no sequence owns — spare pages and the tail of each last page — is
NaN, so a kernel that lets an invisible position reach the output produces NaN instead of a
plausible wrong number. Unused block-table entries point at a spare (NaN) page.

`batch_mixes` is a hypothesis strategy for lists of kinds.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from hypothesis import strategies as st

KINDS: tuple[str, ...] = ("prefill", "chunked", "decode", "verify", "empty")

# Pages no sequence owns, added to the cache as NaN-filled decoys.
_SPARE_BLOCKS = 2


def random_tree_mask(rng: random.Random, n: int, size: int) -> torch.Tensor:
    """A ``[size, size]`` bool mask of a random tree over ``n`` new tokens.

    Token i's parent is an earlier new token or the root (the committed prefix); row i is True
    at i's ancestors and at i itself. Rows/columns >= n are False (never read for this sequence).
    """
    mask = torch.zeros(size, size, dtype=torch.bool)
    for i in range(n):
        parent = rng.randrange(-1, i)  # -1: the root
        if parent >= 0:
            mask[i] = mask[parent]
        mask[i, i] = True
    return mask


def _lengths(kind: str, rng: random.Random, max_len: int, tree_size: int) -> tuple[int, int]:
    """(n_s, L_s) for one sequence of the given kind."""
    if kind == "prefill":
        length = rng.randint(1, max_len)
        return length, length
    if kind == "chunked":
        kv = rng.randint(3, max_len)
        return rng.randint(2, kv - 1), kv
    if kind == "decode":
        return 1, rng.randint(1, max_len)
    if kind == "verify":
        n = rng.randint(2, tree_size)
        return n, rng.randint(n + 1, max(n + 1, max_len))
    if kind == "empty":
        return 0, rng.randint(1, max_len)
    raise ValueError(f"unknown sequence kind {kind!r}; expected one of {KINDS}")


def make_batch(
    kinds: list[str],
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
    tree_size: int | None = None,
    max_len: int = 80,
    device: str | torch.device = "cpu",
    poison_unused: bool = True,
) -> dict[str, Any]:
    """Random tensors for ``meta_attention_varlen`` over sequences of the given kinds.

    Returns a dict with exactly the op's tensor arguments — ``q [total_q, Hq, D]``,
    ``k_cache`` / ``v_cache [num_blocks, block_size, Hkv, D]``, ``block_table int32 [S, W]``,
    ``cu_seqlens_q int32 [S+1]``, ``seqlens_kv int32 [S]``, ``tree_mask bool [S, T, T]`` (None
    unless a kind is ``"verify"``) — so ``op(**batch, causal=..., ...)`` works. With a tree
    mask, non-verify sequences with ``n_s <= T`` get the causal (lower-triangular) mask, so they
    behave as without one. ``tree_size`` defaults to 8; ``max_len`` bounds ``L_s``.
    Deterministic in ``seed``.
    """
    tree_size = 8 if tree_size is None else tree_size
    if tree_size < 2:
        raise ValueError("tree_size must be >= 2 (verify sequences have 2..tree_size tokens)")
    if max_len < 3:
        raise ValueError("max_len must be >= 3 (chunked prefill needs a prefix and 2 new tokens)")
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    lengths = [_lengths(kind, rng, max_len, tree_size) for kind in kinds]
    q_lens = [n for n, _ in lengths]
    kv_lens = [kv for _, kv in lengths]

    pages = [-(-kv // block_size) for kv in kv_lens]
    num_blocks = sum(pages) + _SPARE_BLOCKS
    # Shuffled page ids: sequence s owns order[start:start + pages[s]], the spares come last.
    order = torch.randperm(num_blocks, generator=gen)
    spare = order[sum(pages):]
    width = max(pages, default=0) or 1
    block_table = torch.full((len(kinds), width), int(spare[0]), dtype=torch.int32)
    start = 0
    for s, count in enumerate(pages):
        block_table[s, :count] = order[start:start + count].to(torch.int32)
        start += count

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, dtype=torch.float32)
    v_cache = torch.randn(shape, generator=gen, dtype=torch.float32)
    if poison_unused:
        owned = torch.zeros(num_blocks, block_size, dtype=torch.bool)
        for s, kv in enumerate(kv_lens):
            positions = torch.arange(kv)
            owned[block_table[s, positions // block_size].long(), positions % block_size] = True
        k_cache[~owned] = float("nan")
        v_cache[~owned] = float("nan")
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, generator=gen, dtype=torch.float32)

    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    tree_mask = None
    if "verify" in kinds:
        tree_mask = torch.zeros(len(kinds), tree_size, tree_size, dtype=torch.bool)
        causal = torch.ones(tree_size, tree_size, dtype=torch.bool).tril()
        for s, kind in enumerate(kinds):
            if kind == "verify":
                tree_mask[s] = random_tree_mask(rng, q_lens[s], tree_size)
            else:
                tree_mask[s] = causal
        tree_mask = tree_mask.to(device)

    return {
        "q": q.to(dtype).to(device),
        "k_cache": k_cache.to(dtype).to(device),
        "v_cache": v_cache.to(dtype).to(device),
        "block_table": block_table.to(device),
        "cu_seqlens_q": torch.tensor(cu, dtype=torch.int32, device=device),
        "seqlens_kv": torch.tensor(kv_lens, dtype=torch.int32, device=device),
        "tree_mask": tree_mask,
    }


def batch_lengths(batch: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(q_lens, kv_lens) of a batch made by `make_batch`, as host ints."""
    cu = batch["cu_seqlens_q"].tolist()
    return [b - a for a, b in zip(cu, cu[1:])], batch["seqlens_kv"].tolist()


def batch_mixes(
    kinds: tuple[str, ...] = KINDS, *, min_size: int = 1, max_size: int = 6
) -> st.SearchStrategy[list[str]]:
    """Hypothesis strategy: lists of sequence kinds (a batch mix) drawn from ``kinds``."""
    return st.lists(st.sampled_from(kinds), min_size=min_size, max_size=max_size)


def exact_batch(lengths: list[tuple[int, int]], *, num_q_heads: int, num_kv_heads: int, head_dim: int,
                block_size: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Op tensors for sequences with exact (n_s, L_s): shuffled pages, NaN in unowned slots, no
    tree mask — for the edge cases a test pins down (`make_batch` draws lengths at random)."""
    gen = torch.Generator().manual_seed(seed)
    pages = [-(-kv // block_size) for _, kv in lengths]
    num_blocks = sum(pages) + 1  # one spare, NaN page
    order = torch.randperm(num_blocks, generator=gen)
    width = max(pages, default=0) or 1
    block_table = torch.full((len(lengths), width), int(order[-1]), dtype=torch.int32)
    owned = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    start = 0
    for s, ((_, kv), count) in enumerate(zip(lengths, pages)):
        block_table[s, :count] = order[start:start + count].to(torch.int32)
        start += count
        pos = torch.arange(kv)
        owned[block_table[s, pos // block_size].long(), pos % block_size] = True
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    k_cache[~owned] = float("nan")
    v_cache[~owned] = float("nan")
    cu = [0]
    for n, _ in lengths:
        cu.append(cu[-1] + n)
    return {
        "q": torch.randn(cu[-1], num_q_heads, head_dim, generator=gen).to(dtype).to(device),
        "k_cache": k_cache.to(dtype).to(device),
        "v_cache": v_cache.to(dtype).to(device),
        "block_table": block_table.to(device),
        "cu_seqlens_q": torch.tensor(cu, dtype=torch.int32, device=device),
        "seqlens_kv": torch.tensor([kv for _, kv in lengths], dtype=torch.int32, device=device),
        "tree_mask": None,
    }
