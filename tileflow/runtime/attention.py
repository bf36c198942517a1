"""Meta-attention at run time: batch metadata -> task table -> one kernel launch (plus merge).

`run_meta_attention_varlen` serves the varlen paged-KV op that serving code calls;
`run_meta_attention` serves the dense `[B, H, S, D]` op the attention pass puts into model graphs,
by viewing the dense tensors as a varlen batch (one page per sequence: no copy of K/V).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..attention_inputs import additive_bias, bias_ranges
from ..config import current_config
from ..kernel_spec import KernelSpec, dtype_name, make_params
from ..targets import resolve_target
from ..tasks import build_task_table, check_metadata, check_sliding_window
from ..transfers import record_upload, to_device, wait_for_upload
from .streams import device_cores, keep_alive_while_captured, programs_for

# Tile rows (block_q * GQA: heads sharing a KV head are packed into the dot's M dimension):
# small for decode-like batches, larger for prefill. GPUs take 128-row prefill tiles, the
# flash-attention shape; an Ascend core's 192 KiB unified buffer holds 64-row ones.
_DECODE_ROWS = 16
_PREFILL_ROWS = {"triton": 128}
_DEFAULT_PREFILL_ROWS = 64
# Programs per SM on a GPU, for decode-sized and prefill tiles. One resident program per SM
# left most of an H200's bandwidth idle on decode (23% of the copy rate at 32k context). The
# configuration sweep of 2026-11-30 (bench/results/attention_sweep-*-97eab47.md) measured decode
# 128x32768 at 2.09 ms with 8 programs per SM and 128-position KV steps against 2.73 ms with 4
# and 64 (97% against 75% of the copy rate); prefill ran its best with 4 per SM.
_PROGRAMS_PER_SM = {"decode": 8, "prefill": 4}


def attention_block_q(max_q_len: int, gqa: int, target: str = "") -> int:
    """Query positions per tile on `target` for a batch whose longest query run is `max_q_len`."""
    prefill = _PREFILL_ROWS.get(target, _DEFAULT_PREFILL_ROWS)
    rows = prefill if max_q_len > _DECODE_ROWS // max(gqa, 1) else _DECODE_ROWS
    return max(1, rows // gqa)


def is_decode_tile(block_q: int, gqa: int) -> bool:
    """Whether a tile of `block_q` query positions x `gqa` heads is decode-sized (at most
    `_DECODE_ROWS` rows): such tiles stream KV and barely use the tensor cores."""
    return block_q * max(gqa, 1) <= _DECODE_ROWS


def attention_block_kv(head_dim: int, target: str = "", *, decode: bool = False, dtype: torch.dtype | None = None) -> int:
    """KV positions per step on `target`. On GPUs up to head_dim 128: 128 for decode-sized
    tiles of 2-byte dtypes (a 32 KiB K tile per stage; a longer step keeps more bytes in
    flight, the sweep's best), else 64 (a 16 KiB bf16 K tile per stage); 32 for wider heads and
    on targets with smaller on-chip buffers."""
    if target == "triton":
        if head_dim > 128:
            return 32
        two_byte = dtype is None or dtype.itemsize <= 2
        return 128 if decode and two_byte else 64
    return 32 if head_dim > 64 else 64


def attention_programs(target: str, device: torch.device, *, decode: bool = False) -> int:
    """The persistent grid: a few programs per SM on a GPU (more for decode-sized tiles), a few
    on the CPU — scaled by the SM share of the stream launching it when nano-batching
    partitions the device."""
    if device.type == "cuda":
        return programs_for(device_cores(device) * _PROGRAMS_PER_SM["decode" if decode else "prefill"])
    return programs_for(4)


def attention_spec(
    *, dtype: torch.dtype, head_dim: int, gqa: int, block_q: int, causal: bool, sliding_window: bool, tree: bool, bias: bool,
    target: str = "", softcap: bool = False, sinks: bool = False, alibi: bool = False, key_starts: bool = False,
) -> KernelSpec:
    """The KernelSpec of one meta-attention kernel (its KV step sized for `target`)."""
    # The later features join the params only when set, so the other specs keep their digests.
    extra = {name: True for name, on in (("softcap", softcap), ("sinks", sinks), ("alibi", alibi),
                                         ("key_starts", key_starts)) if on}
    return KernelSpec(
        op="meta_attention",
        dtype=dtype_name(dtype),
        out_dtype=dtype_name(dtype),
        params=make_params(head_dim=head_dim, gqa=gqa, block_q=block_q,
                           block_kv=attention_block_kv(head_dim, target, decode=is_decode_tile(block_q, gqa), dtype=dtype),
                           causal=causal, sliding_window=sliding_window, tree=tree, bias=bias, **extra),
    )


def run_meta_attention_varlen(
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
    target: str = "",
    check: bool = True,
    host_metadata: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    attn_bias_ranges: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    key_starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Validate the batch (when `check`), build its task table and launch the meta-kernel.

    `host_metadata` = (cu_seqlens_q, seqlens_kv) as host ints, when the caller already knows
    them: it spares reading the device tensors back (a device sync per call).
    `attn_bias_ranges` are `bias_ranges(attn_bias)` when the caller has them (computed here
    otherwise). `softcap` caps the scaled scores: `softcap * tanh(scores / softcap)`. `sinks`
    (float [Hq]) are attention-sink logits: each joins its head's softmax with no value.
    `alibi_slopes` (float [Hq]): ALiBi, head h's score of key j for the query at position p
    gains `slope[h] * (j - p)`. `key_starts` (int32 [S, max q_len]): row i of sequence s sees no
    key before position key_starts[s, i] (the dense op's sequences packed in one row).
    """
    target = resolve_target(target or current_config().target, q.device)
    if check:
        # The check reads the lengths to the host anyway: reuse them (one device sync, not two).
        checked = check_metadata(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_kv, tree_mask, causal=causal)
        if host_metadata is not None and (tuple(host_metadata[0]), tuple(host_metadata[1])) != checked:
            # The task table is built from the host copies and the kernel reads the device tensors:
            # host copies that disagree made a kernel read (and write) rows past its sequences.
            raise ValueError(
                f"meta_attention_varlen: host_metadata {host_metadata} differs from the device tensors' "
                f"cu_seqlens_q / seqlens_kv {checked}: pass the host copies of the same lengths"
            )
        host_metadata = host_metadata if host_metadata is not None else checked
    check_sliding_window("meta_attention_varlen", sliding_window)
    if softcap is not None and (isinstance(softcap, bool) or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"meta_attention_varlen: softcap must be a number > 0 or None, got {softcap!r}")
    if alibi_slopes is not None and tree_mask is not None:
        raise ValueError("meta_attention_varlen: ALiBi with a tree_mask is not supported (a token tree's positions "
                         "are depths, not cache slots); verify linear drafts without the tree mask")
    hq, hkv, d = q.shape[1], k_cache.shape[2], q.shape[2]
    gqa = hq // hkv
    cu, lens = host_metadata if host_metadata is not None else (tuple(cu_seqlens_q.tolist()), tuple(seqlens_kv.tolist()))
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    kwargs = {}
    if attn_bias is not None:
        # Once per call, for every launch: where the bias hides keys or adds nothing.
        ranges = attn_bias_ranges if attn_bias_ranges is not None else bias_ranges(attn_bias)
        kwargs.update(attn_bias=attn_bias, attn_bias_ranges=ranges)
    if softcap is not None:
        kwargs["softcap"] = float(softcap)
    if sinks is not None:
        kwargs["sinks"] = sinks
    if alibi_slopes is not None:
        kwargs["alibi_slopes"] = alibi_slopes
    if key_starts is not None:
        kwargs["key_starts"] = key_starts
    programs = (attention_programs(target, q.device, decode=True), attention_programs(target, q.device))
    for block_q, table in _launch_plan(cu, lens, hq, hkv, target, programs, sliding_window, causal, str(q.device)):
        # A cached table is device memory a captured graph would read on every replay: keep it
        # alive with the graph, whatever the cache evicts later.
        keep_alive_while_captured(table)
        table.ready_on_current_stream()  # its copy may have been queued on another stream
        kernel = _attention_kernel(target, q.dtype, d, gqa, block_q, causal, sliding_window is not None,
                                   tree_mask is not None, attn_bias is not None, softcap is not None,
                                   sinks is not None, alibi_slopes is not None, key_starts is not None)
        kernel(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_kv, table,
               scale=scale if scale is not None else 1.0 / math.sqrt(d),
               tree_mask=tree_mask, sliding_window=sliding_window, out=out, **kwargs)
    return out


@functools.lru_cache(maxsize=256)
def _attention_kernel(
    target: str, dtype: torch.dtype, head_dim: int, gqa: int, block_q: int, causal: bool, sliding_window: bool,
    tree: bool, bias: bool, softcap: bool = False, sinks: bool = False, alibi: bool = False, key_starts: bool = False,
) -> Any:
    """The built kernel of `attention_spec(...)`: looked up once per variant, since building the
    spec and hashing it for `get_kernel` cost more host time than a decode step can spare."""
    from . import get_kernel

    return get_kernel(target, attention_spec(dtype=dtype, head_dim=head_dim, gqa=gqa, block_q=block_q, causal=causal,
                                             sliding_window=sliding_window, tree=tree, bias=bias, target=target,
                                             softcap=softcap, sinks=sinks, alibi=alibi, key_starts=key_starts))


@functools.lru_cache(maxsize=256)
def _launch_plan(
    cu: tuple[int, ...], lens: tuple[int, ...], hq: int, hkv: int, target: str, programs: tuple[int, int],
    window: int | None, causal: bool, device: str,
) -> tuple[tuple[int, Any], ...]:
    """The launches of a batch: (tile height block_q, task table) each, written into one output.

    A batch whose sequences all want one tile height (all decode-sized, or all longer) is one
    launch. A batch that mixes them (decodes and small verify groups beside prompt chunks) gets
    one launch per height, each with the tasks of its own sequences: in one prefill-sized launch a
    decode would fill a 128-row tile with its gqa real rows and the tensor cores would spend up
    to 32x the work on padding. `programs` = (grid of a decode-sized launch, grid of a prefill
    launch). Plans are pure functions of the batch shape: cached (dense
    graphs and decode steps repeat shapes), with the tables already on their device.
    """
    gqa = hq // hkv
    q_lens = [b - a for a, b in zip(cu, cu[1:])]
    decode_q = max(1, _DECODE_ROWS // gqa)  # query positions that fit a decode-sized tile
    small = [s for s, n in enumerate(q_lens) if 0 < n <= decode_q]
    large = [s for s, n in enumerate(q_lens) if n > decode_q]
    groups: list[list[int] | None] = [small, large] if small and large else [None]
    launches = []
    for group in groups:
        max_q = max((q_lens[s] for s in (group if group is not None else range(len(q_lens)))), default=0)
        block_q = attention_block_q(max_q, gqa, target)
        table = build_task_table(list(cu), list(lens), num_q_heads=hq, num_kv_heads=hkv, block_q=block_q,
                                 num_programs=programs[0 if is_decode_tile(block_q, gqa) else 1],
                                 sliding_window=window, causal=causal, sequences=group)
        launches.append((block_q, table.to(device)))
    return tuple(launches)


def run_meta_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    causal: bool,
    scale: float | None,
    target: str = "",
    *,
    mask_ranges: torch.Tensor | None = None,
    softcap: torch.Tensor | float | None = None,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: Sequence[float] | None = None,
    attention_chunk: int | None = None,
    key_starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense attention `[B, Hq, S, D] x [B, Hkv, S_kv, D]` through the varlen meta-kernel.

    Each batch row is one sequence whose K/V are a single page (`k.transpose(1, 2)` viewed as a
    `[B, S_kv, Hkv, D]` cache, no copy). With `causal`, query i sees keys j <= S_kv - S + i
    (for S == S_kv: the usual lower triangle). `attn_mask` (bool or additive, broadcastable to
    `[B, Hq, S, S_kv]`) is added to the scores; its `bias_ranges` tell the kernel which keys it
    hides (skipped) and where it adds nothing (no bias read): `mask_ranges`
    (`tileflow.ops.attention_mask_ranges(attn_mask)`, shared by the layers of a graph) or
    computed here. `softcap` caps the scaled scores before the mask (`softcap * tanh(scores /
    softcap)`): a number or a 0-d tensor (what Dynamo makes of a model's float; read on the host,
    which for a tensor on a device waits for it). `sliding_window=w` hides the keys at or before
    position p - w from the query at position p = S_kv - S + i. `sinks` (float [Hq]) join each
    head's softmax as keys with no value (gpt-oss). `alibi_slopes` (Hq numbers): ALiBi, head h's score of key j for query i gains `slope[h] * (j - (S_kv - S + i))`.
    `attention_chunk=c` hides from the query at position p the keys before c * (p // c) (Llama
    4's chunked attention), applied as a mask here (the paged serving path cuts the sequences at
    chunk boundaries instead: `tileflow.runtime.paged_kv`).
    `key_starts` (integer `[B | 1, S]`): query i of row b sees no key before position
    `key_starts[b, i]`, for sequences packed in one row (each query's sequence starts there):
    the kernel takes them per row (no `[S, S_kv]` mask), unless the call has a mask already,
    into which they are folded.
    With none of `causal`, `sliding_window`, `attention_chunk` and `alibi_slopes` (the rules
    that read the positions) S may exceed S_kv. Returns `[B, Hq, S, D]` (stored as
    `[B, S, Hq, D]`, the layout attention outputs usually have).
    """
    # Batch row b of q meets row b of k and v (one KV page each, the varlen kernel's checks off):
    # a k of another batch was read short without a word, and other mismatches raised about the
    # paged cache built here. (Head counts and dtypes are checked where they are used.)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"meta_attention: q, k and v must be 4-D [B, H, S, D], got q {list(q.shape)}, "
                         f"k {list(k.shape)}, v {list(v.shape)}")
    b, hq, s, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"meta_attention: k and v must be [B={b}, Hkv, S_kv, D={d}] alike (q is {list(q.shape)}), "
                         f"got k {list(k.shape)} and v {list(v.shape)}")
    s_kv = k.shape[2]
    positional = [name for name, given in (("causal", causal), ("sliding_window", sliding_window is not None),
                                           ("attention_chunk", attention_chunk is not None),
                                           ("alibi_slopes", alibi_slopes is not None)) if given]
    if s > s_kv and positional:
        # Query i sits at key position S_kv - S + i, which these rules read: more queries than keys
        # would put the first ones before every key (the varlen check would blame the cache, a
        # term this op lacks). Without them every query sees every key wherever it sits
        # (cross-attention over a shorter input), and the kernels never read its position.
        raise ValueError(f"meta_attention: q has {s} query positions but k only {s_kv} keys, with "
                         f"{' and '.join(positional)}: query i sits at key position S_kv - S + i, so those rules "
                         f"need S <= S_kv (only attention without them, e.g. cross-attention, may have S > S_kv)")
    if s == 0:
        # No query (an empty sequence: eager's softmax over no keys gives an empty output); the
        # K/V of zero positions would be cache pages of size 0, which the kernels refuse.
        return q.new_empty((b, s, hq, d)).transpose(1, 2)
    if s_kv == 0:
        # Queries over no key (only without a positional rule, above): eager's softmax over no
        # keys weighs nothing, zeros, as a kernel row that sees no key; no cache page of size 0.
        return q.new_zeros((b, s, hq, d)).transpose(1, 2)
    device = q.device
    q_flat = q.transpose(1, 2).reshape(b * s, hq, d)
    k_cache, v_cache = k.transpose(1, 2), v.transpose(1, 2)
    layout = keep_alive_while_captured(_dense_layout(b, s, s_kv, str(device)))
    wait_for_upload(layout.uploaded, layout.block_table, layout.cu_seqlens_q, layout.seqlens_kv)
    bias = ranges = None
    if key_starts is not None:
        key_starts = _dense_key_starts(key_starts, b, s, s_kv, device)
        if attn_mask is not None or attention_chunk is not None:
            # The call reads a mask anyway: the starts join it (its ranges come from it).
            hidden = torch.arange(s_kv, device=device)[None, None, None, :] < key_starts[:, None, :, None]
            attn_mask, mask_ranges, key_starts = _hiding(attn_mask, hidden, device), None, None
    if attention_chunk is not None:
        # The chunk rule as a mask: dense graphs from transformers' masks carry it in their mask
        # already, so only a traced serving step's dense form (run whole) comes here.
        pos = torch.arange(s_kv - s, s_kv, device=device)[:, None]
        other_chunk = torch.arange(s_kv, device=device)[None, :] // attention_chunk != pos // attention_chunk
        attn_mask, mask_ranges = _hiding(attn_mask, other_chunk, device), None
    if attn_mask is not None:
        # Launchers take a bool mask or a half or float32 bias as it is and convert what their
        # kernel needs themselves (the Triton kernel reads float32, converted on the distinct
        # values of broadcast dims). Float64 is narrowed here (its lowest kept: `additive_bias`).
        bias = additive_bias(attn_mask) if attn_mask.dtype == torch.float64 else attn_mask
        while bias.dim() < 4:
            bias = bias.unsqueeze(0)
        if mask_ranges is not None:
            if (mask_ranges.dim() != 3 or mask_ranges.shape[2] != 4 or mask_ranges.shape[0] not in (1, b)
                    or mask_ranges.shape[1] not in (1, s) or bias.shape[3] != s_kv):
                raise ValueError(
                    f"meta_attention: mask_ranges {list(mask_ranges.shape)} are not the ranges of a mask "
                    f"{list(attn_mask.shape)} over {s_kv} keys for [B={b}, S={s}] queries (attention_mask_ranges)"
                )
            ranges = mask_ranges.expand(mask_ranges.shape[0], s, 4)
        bias = bias.expand(bias.shape[0] if bias.shape[0] == b else 1, bias.shape[1], s, s_kv)
        if (causal or sliding_window is not None) and bias.dtype != torch.bool:
            # `bias_ranges` hides a row's finfo.min keys when the row sees a key above finfo.min,
            # judged from the mask alone; the causal / window rule may hide all of those keys
            # (a left-padding row under causal=True, a padding row whose window holds only pads),
            # and then eager averages the finfo.min keys the row does see. So the ranges come
            # from the mask with the rule's hidden keys at -inf (the kernel applies the rule to
            # them anyway); a materialized [B, H, S, S_kv] mask only in this rare combination
            # (graphs put their causal / window rule into the mask, with causal=False). A bool mask
            # has no finfo.min keys: its own ranges hold, the kernel applies the rule to them.
            # A bias that is the same for every query row (a per-key term, BLOOM's ALiBi along
            # a padding mask) is not copied per row: its finfo.min keys are simply kept in the
            # ranges, which is exact (next to a real score such a key's weight underflows to 0
            # in the kernel as in eager) and costs the kernel only the reads of those blocks.
            if s > 1 and bias.stride(2) == 0:
                row = bias[:, :, :1]  # (a [B, H, 1, S_kv] copy at most)
                ranges = bias_ranges(row.masked_fill(row == torch.finfo(row.dtype).min, -1.0))
            else:
                ranges = bias_ranges(bias.masked_fill(_rule_hides(s, s_kv, causal, sliding_window, device),
                                                      float("-inf")))
    out = run_meta_attention_varlen(
        q_flat, k_cache, v_cache, layout.block_table, layout.cu_seqlens_q, layout.seqlens_kv,
        scale=scale, causal=causal, attn_bias=bias, attn_bias_ranges=ranges, target=target, check=False,
        softcap=_number(softcap, "softcap"), sliding_window=sliding_window, sinks=sinks,
        alibi_slopes=None if alibi_slopes is None else per_head_tensor(tuple(map(float, alibi_slopes)), str(device)),
        host_metadata=layout.host_metadata, key_starts=key_starts,
    )
    return out.view(b, s, hq, d).transpose(1, 2)


@dataclass(frozen=True)
class _DenseLayout:
    """A dense `[B, S]` batch over `S_kv` keys as the varlen kernels see it: sequence b is KV page
    b (`block_table` [B, 1]) and query rows `b * S ..` (`cu_seqlens_q` [B + 1]), each over
    `S_kv` keys (`seqlens_kv` [B]); int32 on the device, `uploaded` the event after their copy
    (see `tileflow.transfers.wait_for_upload`), and `host_metadata` the host copies of the two
    lengths."""

    block_table: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seqlens_kv: torch.Tensor
    uploaded: Any
    host_metadata: tuple[tuple[int, ...], tuple[int, ...]]


@functools.lru_cache(maxsize=256)
def _dense_layout(b: int, s: int, s_kv: int, device: str) -> _DenseLayout:
    """The `_DenseLayout` of a `[b, s]` batch over `s_kv` keys on `device`, made once per shape:
    every layer of every step of that shape reads the same three small tensors, where making
    them per call cost three allocations and three kernel launches a layer on a GPU."""
    cu = list(range(0, b * s + 1, s)) if s > 0 else [0] * (b + 1)
    block_table, cu_seqlens_q, seqlens_kv = to_device(
        device, np.arange(b, dtype=np.int32).reshape(b, 1), np.array(cu, dtype=np.int32), np.full(b, s_kv, np.int32))
    return _DenseLayout(block_table, cu_seqlens_q, seqlens_kv, record_upload(device), (tuple(cu), (s_kv,) * b))


def _hiding(attn_mask: torch.Tensor | None, hidden: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`attn_mask` (or no mask) as an additive bias that also hides the keys `hidden` marks."""
    base = additive_bias(attn_mask) if attn_mask is not None else torch.zeros((), device=device)
    return torch.where(hidden, float("-inf"), base)


def _dense_key_starts(key_starts: torch.Tensor, b: int, s: int, s_kv: int, device: torch.device) -> torch.Tensor:
    """The dense op's `key_starts` checked (an integer `[B | 1, S]` tensor) and expanded to
    `[B, S]` int32 on q's `device`, clamped to [0, S_kv] first (the same rule: a start at or
    before 0 hides no key, one at or past S_kv all; an int64 start would wrap in int32)."""
    if (not isinstance(key_starts, torch.Tensor) or key_starts.dim() != 2 or key_starts.shape[0] not in (1, b)
            or key_starts.shape[1] != s or key_starts.dtype.is_floating_point or key_starts.dtype == torch.bool):
        got = f"{key_starts.dtype} {list(key_starts.shape)}" if isinstance(key_starts, torch.Tensor) else repr(key_starts)
        raise ValueError(f"meta_attention: key_starts must be an integer [B={b} | 1, S={s}] tensor (each query's "
                         f"first visible key), got {got}")
    return key_starts.to(device).clamp(0, s_kv).to(torch.int32).expand(b, s)


def _rule_hides(s: int, s_kv: int, causal: bool, window: int | None, device: torch.device) -> torch.Tensor:
    """Bool [S, S_kv]: the keys the causal / sliding-window rule hides from each query row of
    the dense op (query i at key position S_kv - S + i)."""
    pos = torch.arange(s_kv - s, s_kv, device=device)[:, None]
    keys = torch.arange(s_kv, device=device)[None, :]
    hidden = keys > pos if causal else torch.zeros(s, s_kv, dtype=torch.bool, device=device)
    if window is not None:
        hidden = hidden | (keys <= pos - window)
    return hidden


@functools.lru_cache(maxsize=256)
def per_head_tensor(values: tuple[float, ...], device: str) -> torch.Tensor:
    """Per-head numbers held on the host (attention-sink logits of a disaggregation cut or an
    attention worker, ALiBi slopes in a graph) as the float32 tensor the kernels take, on
    `device`: made once per (values, device), not per call (a copy to a GPU per layer per step
    would wait for it)."""
    return torch.tensor(values, dtype=torch.float32).to(device)


def _number(value: torch.Tensor | float | None, name: str) -> float | None:
    """A number given as a Python number or a one-element tensor, as a float (None stays None)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"meta_attention: {name} must be a number or a one-element float tensor, "
                             f"got a {value.dtype} tensor of shape {list(value.shape)}")
        return float(value.item())
    return None if value is None else float(value)
