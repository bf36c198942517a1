"""Reference meta-attention: the op's definition (the oracle) and a tile-by-tile executor.

Two PyTorch implementations of ``tileflow.ops.meta_attention_varlen`` (semantics in
``tileflow/tasks.py`` and the shared contract):

- `attention_reference_dense`: the straightforward definition — per sequence, gather K/V from
  the pages, build the visibility mask, softmax, weighted sum. It is the oracle.
- `run_task_table`: executes a `tileflow.tasks.TaskTable` exactly as a kernel does — program by
  program, task by task, one tile of packed GQA rows against one KV range — writing the output
  for whole-range tasks and a workspace slot (normalized partial output + log-sum-exp) for
  split-KV tasks, then `merge_partials` combines the slots. It is the reference backend for
  meta-attention and the structure the Triton kernel mirrors, so a disagreement between the two
  localizes a bug to the table or to the kernel.

Both accumulate in float32 (float64 for float64 inputs) and return q's dtype. Both also take an
optional additive ``attn_bias`` (float ``[S | 1, Hq | 1, >= max n_s, >= max L_s]``, or a bool
mask of that shape, True = attend; row i of sequence s and key j read ``attn_bias[s, h, i, j]``),
which the dense ``meta_attention`` op uses for SDPA-style masks; ``-inf`` entries hide a key like
the visibility rules do.

`build_reference_attention` wraps `run_task_table` as the reference backend's kernel for a
``meta_attention`` KernelSpec, with the launcher interface of the Triton kernel.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from tileflow.attention_inputs import additive_bias, attention_params, bias_ranges, check_launch_inputs, softmax_scale
from tileflow.kernel_spec import DTYPES, KernelSpec
from tileflow.targets import CompiledKernel
from tileflow.tasks import TaskTable, check_metadata

__all__ = [
    "accumulation_dtype",
    "visibility_mask",
    "capped_scores",
    "with_sinks",
    "softmax_lse",
    "alibi_bias",
    "attention_reference_dense",
    "run_task_table",
    "run_task",
    "merge_partials",
    "build_reference_attention",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (the kernels' softmax precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def visibility_mask(
    rows: torch.Tensor,
    cols: torch.Tensor,
    *,
    kv_len: int,
    q_len: int,
    causal: bool,
    sliding_window: int | None,
    tree: torch.Tensor | None,
) -> torch.Tensor:
    """Bool ``[len(rows), len(cols)]``: does query row ``rows[a]`` see KV position ``cols[b]``?

    ``rows`` are query indices relative to the sequence (row i is at position
    ``kv_len - q_len + i``), ``cols`` absolute KV positions; ``tree`` is the sequence's
    ``[T, T]`` tree mask or None. The rules are the contract's: ``j < L``; ``j <= p`` when
    causal; ``j > p - w`` with a sliding window; and, when a tree mask is given and
    ``q_len <= T``, the tree mask replaces the causal rule on the new positions.
    """
    prefix = kv_len - q_len
    p = (prefix + rows.to(torch.int64))[:, None]
    j = cols.to(torch.int64)[None, :]
    order = j <= p if causal else torch.ones_like(j, dtype=torch.bool).expand(p.shape[0], -1)
    if tree is not None and q_len <= tree.shape[0]:
        new = j >= prefix
        # Clamp only to index safely; the clamped entries are discarded by `new`.
        ti = rows.to(torch.int64).clamp(0, tree.shape[0] - 1)[:, None]
        tj = (j - prefix).clamp(0, tree.shape[1] - 1)
        order = torch.where(new, tree.to(torch.bool)[ti, tj], order)
    visible = order & (j >= 0) & (j < kv_len)
    if sliding_window is not None:
        visible = visible & (j > p - sliding_window)
    return visible


def _gather_kv(
    cache: torch.Tensor, block_table: torch.Tensor, seq: int, positions: torch.Tensor, head: slice | int
) -> torch.Tensor:
    """Rows of a paged cache for KV ``positions`` of sequence ``seq`` (through the block table)."""
    block_size = cache.shape[1]
    blocks = block_table[seq, positions // block_size].to(torch.int64)
    return cache[blocks, positions % block_size, head]


def _masked_softmax_av(
    scores: torch.Tensor, visible: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(scores | visible) @ v, softmax statistics) with empty rows -> zeros.

    Exact (not online) softmax: the whole range is in memory. The statistics [2, rows] are each
    row's max score and its sum of exp(score - max) (`-inf` and 0 for a row that sees no key,
    which gets zero output instead of the NaN a plain softmax would give).
    """
    scores = scores.masked_fill(~visible, float("-inf"))
    any_visible = visible.any(dim=-1)
    row_max = scores.amax(dim=-1).where(any_visible, torch.zeros((), dtype=scores.dtype))
    e = torch.exp(scores - row_max[:, None])  # masked entries: exp(-inf) == 0
    denom = e.sum(dim=-1)
    safe = denom.where(any_visible, torch.ones((), dtype=denom.dtype))
    out = (e @ v) / safe[:, None]
    row_max = row_max.where(any_visible, torch.full((), float("-inf"), dtype=row_max.dtype))
    return out, torch.stack([row_max, denom])


def softmax_lse(stats: torch.Tensor) -> torch.Tensor:
    """Rows' log-sum-exp from their softmax statistics ``[2, rows]`` (max, sum of exp against
    it): ``max + log(sum)``, ``-inf`` for a row that sees no key."""
    row_max, row_sum = stats[0], stats[1]
    seen = row_sum > 0
    lse = row_max.where(seen, torch.zeros((), dtype=row_max.dtype)) + torch.log(
        row_sum.where(seen, torch.ones((), dtype=row_sum.dtype)))
    return lse.where(seen, torch.full((), float("-inf"), dtype=lse.dtype))


def capped_scores(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Logit soft-capping, `softcap * tanh(scores / softcap)` (Gemma-2, Grok), or `scores` as
    they are when `softcap` is None. Applied to the scaled scores, before any mask or bias."""
    return scores if softcap is None else softcap * torch.tanh(scores / softcap)


def alibi_bias(slopes: torch.Tensor, q_positions: torch.Tensor, kv_positions: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """ALiBi's bias `slope * (j - p)` for query rows at positions `q_positions` with their heads'
    `slopes` (any shapes that broadcast together) against the keys at `kv_positions` [L]: the
    rows' shape plus [L], in `dtype`. For a causal row it is `-slope * |p - j|` on every key it
    sees."""
    distance = kv_positions.to(dtype) - q_positions.to(dtype)[..., None]
    return slopes.to(dtype)[..., None] * distance


def with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Rows' attention output `out` [rows, D] over keys whose log-sum-exp is `lse` [rows], with
    each row's sink logit (`sinks` [rows], or None: unchanged) joined to its softmax as a key that
    adds no value: the output shrinks by exp(lse) / (exp(lse) + exp(sink))."""
    if sinks is None:
        return out
    return out * torch.sigmoid(lse - sinks.to(lse.dtype))[:, None]


def _resolve_scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _check_bias(attn_bias: torch.Tensor | None, q: torch.Tensor, cu: list[int], kv_lens: list[int]) -> None:
    """ValueError unless attn_bias broadcasts to [S, Hq, max n_s, max L_s]."""
    if attn_bias is None:
        return
    num_seqs, num_q_heads = len(kv_lens), q.shape[1]
    max_q = max((b - a for a, b in zip(cu, cu[1:])), default=0)
    max_kv = max(kv_lens, default=0)
    if (not isinstance(attn_bias, torch.Tensor) or attn_bias.dim() != 4
            or not (attn_bias.is_floating_point() or attn_bias.dtype == torch.bool)
            or attn_bias.shape[0] not in (1, num_seqs) or attn_bias.shape[1] not in (1, num_q_heads)
            or attn_bias.shape[2] < max_q or attn_bias.shape[3] < max_kv):
        got = tuple(attn_bias.shape) if isinstance(attn_bias, torch.Tensor) else type(attn_bias).__name__
        raise ValueError(
            f"attn_bias must be a float bias or bool mask broadcastable to [S={num_seqs} | 1, Hq={num_q_heads} | 1, "
            f">= {max_q}, >= {max_kv}], got {got}"
        )


def _bias_rows(
    attn_bias: torch.Tensor, seq: int, heads: range, rows: slice, cols: slice, dtype: torch.dtype
) -> torch.Tensor:
    """attn_bias for query rows x key cols of `seq`, as [len(rows), len(heads), len(cols)] of
    `dtype` (a bool mask as its additive form)."""
    b = attn_bias[seq if attn_bias.shape[0] > 1 else 0]
    b = b[heads.start:heads.stop] if b.shape[0] > 1 else b
    b = additive_bias(b[:, rows, cols], dtype)
    return b.expand(len(heads), -1, -1).transpose(0, 1)


def attention_reference_dense(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seqlens_kv: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    tree_mask: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """The definition of varlen paged meta-attention, sequence by sequence (the oracle).

    Shapes: ``q [total_q, Hq, D]``, caches ``[num_blocks, block_size, Hkv, D]``,
    ``block_table int32 [S, max_blocks]``, ``cu_seqlens_q int32 [S+1]``,
    ``seqlens_kv int32 [S]``, ``tree_mask bool [S, T, T]`` or None. Head h reads KV head
    ``h // (Hq // Hkv)``; ``scale`` defaults to ``1/sqrt(D)``; ``softcap`` caps the scaled scores
    (`capped_scores`); ``attn_bias`` is added to them after (see the module docstring);
    ``sinks`` [Hq], when given, join each head's softmax as keys with no value; with
    ``alibi_slopes`` [Hq], head h's score of key j for the query at position p gains
    ``slope[h] * (j - p)`` (after the cap, before the bias). Returns q's shape and dtype.
    """
    # causal=False here: the dense oracle handles any tree mask, ordered or not.
    check_metadata(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_kv, tree_mask, causal=False)
    total_q, num_q_heads, head_dim = q.shape
    group = num_q_heads // k_cache.shape[2]
    scale = _resolve_scale(scale, head_dim)
    acc = accumulation_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    cu = cu_seqlens_q.tolist()
    kv_lens = seqlens_kv.tolist()
    _check_bias(attn_bias, q, cu, kv_lens)
    for s, kv_len in enumerate(kv_lens):
        q_len = cu[s + 1] - cu[s]
        if q_len == 0:
            continue
        positions = torch.arange(kv_len, device=q.device)
        # [Hq, L, D]: K/V of the head each query head reads.
        k = _gather_kv(k_cache, block_table, s, positions, slice(None)).to(acc)
        v = _gather_kv(v_cache, block_table, s, positions, slice(None)).to(acc)
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        qs = q[cu[s]:cu[s + 1]].to(acc).transpose(0, 1)  # [Hq, n, D]
        visible = visibility_mask(
            torch.arange(q_len, device=q.device), positions, kv_len=kv_len, q_len=q_len,
            causal=causal, sliding_window=sliding_window,
            tree=None if tree_mask is None else tree_mask[s],
        )
        scores = capped_scores((qs @ k.transpose(1, 2)) * scale, softcap)  # [Hq, n, L]
        if alibi_slopes is not None:  # [Hq, 1] slopes over [1, n] query positions: [Hq, n, L]
            rows = kv_len - q_len + torch.arange(q_len, device=q.device)
            scores = scores + alibi_bias(alibi_slopes[:, None], rows[None, :], positions, acc)
        visible = visible.expand(num_q_heads, -1, -1)
        if attn_bias is not None:
            bias = _bias_rows(attn_bias, s, range(num_q_heads), slice(0, q_len), slice(0, kv_len), acc)
            scores = scores + bias.transpose(0, 1)
            visible = visible & (bias.transpose(0, 1) != float("-inf"))
        scores = scores.masked_fill(~visible, float("-inf"))
        if sinks is not None:  # one more key per head, always seen, whose value is zero
            # +inf as the largest float: its whole weight (zeros out), the limit, not inf - inf's NaN
            sink = sinks.to(acc).clamp(max=torch.finfo(acc).max)[:, None, None].expand(num_q_heads, q_len, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
            # A row with no visible key: softmax gives NaN; the contract says zeros.
            probs = probs.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)
        out[cu[s]:cu[s + 1]] = (probs @ v).transpose(0, 1)
    return out.to(q.dtype)


def run_task(
    task: list[int],
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu: list[int],
    kv_lens: list[int],
    *,
    group: int,
    scale: float,
    causal: bool,
    sliding_window: int | None,
    tree_mask: torch.Tensor | None,
    attn_bias: torch.Tensor | None = None,
    attn_bias_ranges: torch.Tensor | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    key_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute one task: its tile's ``q_rows * R`` packed rows against its KV range.

    Returns ``(out [q_rows * R, D], stats [2, q_rows * R])`` in the accumulation dtype (stats:
    each row's max score and sum of exp against it, see `_masked_softmax_av`), rows in
    tile order (``r = pos * R + head_in_group``); ``out`` is normalized over the task's range.
    With a bias, the range is narrowed to the keys its `attn_bias_ranges` say some row of the
    tile sees, as the Triton kernel narrows it. `key_starts` ([S, q_len] integers): row i of
    sequence s sees no key before position key_starts[s, i] (sequences packed in a dense row).
    """
    seq, kv_head, q_start, q_rows, kv_start, kv_end = task[:6]
    acc = accumulation_dtype(q.dtype)
    if attn_bias_ranges is not None:
        rows = attn_bias_ranges[seq if attn_bias_ranges.shape[0] > 1 else 0]
        rows = rows[q_start:q_start + q_rows] if rows.shape[0] > 1 else rows
        kv_start = max(kv_start, int(rows[:, 0].min()))
        kv_end = min(kv_end, int(rows[:, 3].max()))
        if kv_start >= kv_end:  # the bias hides every key of the range from every row
            tile_rows = q_rows * group
            stats = torch.zeros(2, tile_rows, dtype=acc, device=q.device)
            stats[0] = float("-inf")
            return torch.zeros(tile_rows, q.shape[2], dtype=acc, device=q.device), stats
    q_len = cu[seq + 1] - cu[seq]
    first = cu[seq] + q_start
    # Packed GQA rows: [q_rows, R, D] -> [q_rows * R, D], r = pos * R + h.
    heads = slice(kv_head * group, (kv_head + 1) * group)
    q_tile = q[first:first + q_rows, heads].reshape(q_rows * group, -1).to(acc)
    positions = torch.arange(kv_start, kv_end, device=q.device)
    k = _gather_kv(k_cache, block_table, seq, positions, kv_head).to(acc)
    v = _gather_kv(v_cache, block_table, seq, positions, kv_head).to(acc)
    visible = visibility_mask(
        torch.arange(q_start, q_start + q_rows, device=q.device), positions,
        kv_len=kv_lens[seq], q_len=q_len, causal=causal, sliding_window=sliding_window,
        tree=None if tree_mask is None else tree_mask[seq],
    )
    if key_starts is not None:
        starts = key_starts[seq, q_start:q_start + q_rows].to(positions.device)
        visible = visible & (positions[None, :] >= starts[:, None])
    visible = visible.repeat_interleave(group, dim=0)
    scores = capped_scores((q_tile @ k.T) * scale, softcap)
    if alibi_slopes is not None:
        rows = (kv_lens[seq] - q_len + torch.arange(q_start, q_start + q_rows, device=q.device)).repeat_interleave(group)
        scores = scores + alibi_bias(_row_values(alibi_slopes, kv_head, group, q_rows), rows, positions, acc)
    if attn_bias is not None:
        bias = _bias_rows(attn_bias, seq, range(kv_head * group, (kv_head + 1) * group),
                          slice(q_start, q_start + q_rows), slice(kv_start, kv_end), acc)
        bias = bias.reshape(q_rows * group, -1)  # [pos, head, kv] -> tile rows pos * R + head
        scores = scores + bias
        visible = visible & (bias != float("-inf"))
    return _masked_softmax_av(scores, visible, v)


def merge_partials(
    table: TaskTable,
    partial_out: torch.Tensor,
    partial_stats: torch.Tensor,
    out: torch.Tensor,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Combine split-KV partial results into ``out`` with the log-sum-exp rule.

    For each merge group (one split tile) with slots ``k``, each holding its rows' max score
    ``m_k`` and sum ``l_k`` of exp against it (`TaskTable.workspace_shapes`): ``M = max_k m_k``,
    ``w_k = l_k * exp(m_k - M)``, ``out = sum_k w_k * o_k / sum_k w_k`` where ``o_k`` is the
    slot's normalized partial output. Max and sum stay apart rather than folded into one LSE:
    rows that see keys only through a finfo.min mask have maxima near -3e38, where ``log(l_k)``
    would vanish in the rounding and every slot would weigh the same whatever its key count.
    Slots whose row saw no key (``m_k = -inf``) contribute nothing (their partial_out is
    ignored, even if NaN); a row with no visible key in any slot becomes zeros. Only the tile's
    ``q_rows * R`` rows are read; ``sinks`` [Hq], when given, join the merged softmax once
    (`with_sinks`). Writes ``out`` in place and returns it.
    """
    if table.merges.shape[0] == 0:
        return out
    group = table.group_size
    cu = table.cu_seqlens_q.tolist()
    for seq, kv_head, q_start, q_rows, first_slot, num_slots in table.merges.tolist():
        rows = q_rows * group
        stats = partial_stats[first_slot:first_slot + num_slots, :, :rows]
        maxima, sums = stats[:, 0], stats[:, 1]
        parts = partial_out[first_slot:first_slot + num_slots, :rows]
        m = maxima.amax(dim=0)
        finite = torch.isfinite(m)
        scale = torch.exp(maxima - m.where(finite, torch.zeros((), dtype=m.dtype)))
        # Only a row that saw no key (max -inf) is skipped, its partial output unread; NaN stats
        # (a slot never written) stay NaN through the merge, so the result shows them.
        empty = maxima == float("-inf")
        weight = torch.where(empty, torch.zeros((), dtype=scale.dtype), sums * scale)
        weighted = torch.where(empty[..., None], torch.zeros((), dtype=parts.dtype), parts * weight[..., None])
        denom = weight.sum(dim=0)
        keep = (denom > 0) | denom.isnan()  # else: no key in any slot -> zeros
        merged = weighted.sum(dim=0) / denom.where(keep, torch.ones((), dtype=denom.dtype))[:, None]
        merged = merged.where(keep[:, None], torch.zeros((), dtype=merged.dtype))
        if sinks is not None:
            lse_all = softmax_lse(torch.stack([m, denom]))
            merged = with_sinks(merged, lse_all, _row_values(sinks, kv_head, group, q_rows))
        first = cu[seq] + q_start
        heads = slice(kv_head * group, (kv_head + 1) * group)
        out[first:first + q_rows, heads] = merged.reshape(q_rows, group, -1).to(out.dtype)
    return out


def run_task_table(
    table: TaskTable,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seqlens_kv: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    tree_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    attn_bias: torch.Tensor | None = None,
    attn_bias_ranges: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    key_starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Execute a task table with torch ops, tile by tile, as the meta-attention kernel does.

    For each program and each of its tasks in order: gather the tile's packed query rows and the
    task's KV range through the block table, mask, take an exact softmax over the range, and
    write either ``out`` (``slot == -1``) or workspace slot ``slot`` (normalized partial output
    and its rows' softmax statistics); then `merge_partials`. ``causal`` and ``sliding_window`` must be the
    values the table was built with (checked). ``key_starts`` ([S, q_len] integers): row i of
    sequence s sees no key before position key_starts[s, i].

    ``out`` (q's shape and dtype) is written in place if given. ``workspace`` is
    ``(partial_out, partial_stats)`` shaped as `TaskTable.workspace_shapes`; when omitted it is
    allocated (in the accumulation dtype: float32, or float64 for float64 inputs) and filled
    with NaN, so a slot read before it is written shows up in the result.
    """
    # With no rule that reads positions a sequence may have more queries than keys, as the
    # table allows (`build_task_table`): the dense op's cross-attention.
    check_metadata(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_kv, tree_mask, causal=causal,
                   more_queries_than_keys=not causal and sliding_window is None and tree_mask is None)
    total_q, num_q_heads, head_dim = q.shape
    if (table.num_q_heads, table.num_kv_heads) != (num_q_heads, k_cache.shape[2]):
        raise ValueError(
            f"the task table was built for {table.num_q_heads} query / {table.num_kv_heads} KV "
            f"heads but the tensors have {num_q_heads} / {k_cache.shape[2]}"
        )
    if (table.causal, table.sliding_window) != (bool(causal), sliding_window):
        raise ValueError(
            f"the task table was built for causal={table.causal}, sliding_window="
            f"{table.sliding_window} but is run with causal={causal}, sliding_window="
            f"{sliding_window}: its KV ranges are clipped for the former; rebuild it"
        )
    if not (torch.equal(table.cu_seqlens_q, cu_seqlens_q.cpu())
            and torch.equal(table.seqlens_kv, seqlens_kv.cpu())):
        raise ValueError("the task table was built from different cu_seqlens_q / seqlens_kv: rebuild it")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out must have q's shape {tuple(q.shape)} and dtype {q.dtype}")
    acc = accumulation_dtype(q.dtype)
    if workspace is None:
        out_shape, stats_shape = table.workspace_shapes(head_dim)
        workspace = (
            torch.full(out_shape, float("nan"), dtype=acc, device=q.device),
            torch.full(stats_shape, float("nan"), dtype=acc, device=q.device),
        )
    partial_out, partial_stats = workspace
    group = table.group_size
    scale = _resolve_scale(scale, head_dim)
    cu = cu_seqlens_q.tolist()
    kv_lens = seqlens_kv.tolist()
    _check_bias(attn_bias, q, cu, kv_lens)
    if attn_bias is not None and attn_bias_ranges is None:
        attn_bias_ranges = bias_ranges(attn_bias)
    tasks = table.tasks.tolist()
    offsets = table.program_offsets.tolist()
    program_tasks = table.program_tasks.tolist()
    for program in range(table.num_programs):
        for index in program_tasks[offsets[program]:offsets[program + 1]]:
            task = tasks[index]
            res, stats = run_task(
                task, q, k_cache, v_cache, block_table, cu, kv_lens, group=group, scale=scale,
                causal=causal, sliding_window=sliding_window, tree_mask=tree_mask, attn_bias=attn_bias,
                attn_bias_ranges=attn_bias_ranges, softcap=softcap, alibi_slopes=alibi_slopes,
                key_starts=key_starts,
            )
            seq, kv_head, q_start, q_rows, _, _, slot, _ = task
            if slot < 0:
                if sinks is not None:
                    res = with_sinks(res, softmax_lse(stats), _row_values(sinks, kv_head, group, q_rows))
                first = cu[seq] + q_start
                heads = slice(kv_head * group, (kv_head + 1) * group)
                out[first:first + q_rows, heads] = res.reshape(q_rows, group, head_dim).to(out.dtype)
            else:
                partial_out[slot, :q_rows * group] = res.to(partial_out.dtype)
                partial_stats[slot, :, :q_rows * group] = stats.to(partial_stats.dtype)
    return merge_partials(table, partial_out, partial_stats, out, sinks)


def _row_values(per_head: torch.Tensor, kv_head: int, group: int, q_rows: int) -> torch.Tensor:
    """The value (sink logit, ALiBi slope) of each packed tile row's query head (r = pos * R +
    head in the group), from one value per query head."""
    return per_head[kv_head * group:(kv_head + 1) * group].repeat(q_rows)


def build_reference_attention(spec: KernelSpec, artifact_dir: Any = None) -> CompiledKernel:
    """The reference backend's "kernel" for a ``meta_attention`` spec: `run_task_table`.

    The launcher has the Triton attention launcher's interface::

        launch(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_kv, table, *,
               scale=None, tree_mask=None, sliding_window=None, out=None, attn_bias=None,
               attn_bias_ranges=None, softcap=None, sinks=None, alibi_slopes=None, key_starts=None) -> out

    ``causal`` comes from the spec (``spec.param("causal")``) and must match the table's;
    integer metadata is converted to int32. The returned kernel's ``source`` is the Python of
    the tile loop it runs, so reports and the visualizer can show it like generated kernels.
    """
    # The reference takes each task's whole KV range at once, so block_kv is never used.
    params = attention_params(spec, target="reference", supported_dtypes=DTYPES, default_block_kv=64)
    where = f"kernel {spec.name}"

    def launch(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_table: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        seqlens_kv: torch.Tensor,
        table: TaskTable,
        *,
        scale: float | None = None,
        tree_mask: torch.Tensor | None = None,
        sliding_window: int | None = None,
        out: torch.Tensor | None = None,
        attn_bias: torch.Tensor | None = None,
        attn_bias_ranges: torch.Tensor | None = None,
        softcap: float | None = None,
        sinks: torch.Tensor | None = None,
        alibi_slopes: torch.Tensor | None = None,
        key_starts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the task table with torch ops (see `run_task_table`), after the checks every
        backend's launcher makes (`check_launch_inputs`), so what the device kernels refuse
        the reference refuses too."""
        inputs = check_launch_inputs(
            params, spec.dtype, where, q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_kv,
            table, tree_mask=tree_mask, sliding_window=sliding_window, out=out, attn_bias=attn_bias,
            attn_bias_ranges=attn_bias_ranges, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes,
            key_starts=key_starts,
        )
        return run_task_table(
            table, q, k_cache, v_cache, inputs.block_table, inputs.cu_seqlens_q, inputs.seqlens_kv,
            scale=softmax_scale(scale, params.head_dim, where), causal=params.causal,
            sliding_window=inputs.sliding_window, tree_mask=inputs.tree_mask, out=inputs.out,
            attn_bias=attn_bias, attn_bias_ranges=attn_bias_ranges, softcap=inputs.softcap,
            sinks=sinks, alibi_slopes=alibi_slopes,  # as given: the checked copies are float32
            key_starts=inputs.key_starts,
        )

    source = "\n\n".join(inspect.getsource(fn) for fn in (run_task_table, run_task, merge_partials))
    return CompiledKernel(spec=spec, target="reference", source=source, launch=launch)
