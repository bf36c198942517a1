"""The persistent meta-attention kernel for the Triton target (XY-Serve Meta-Attention).

One launch computes attention for a whole mixed batch (prefill, chunked prefill over a cached
prefix, decode and tree-speculative verify) over a paged KV cache. The work is described by a
*task table* built on the host (`tileflow/tasks.py`, see the contract in its docstring):

- a task is (sequence, KV head, a tile of up to `block_q` query positions, a KV range); the GQA
  query heads that share the KV head are packed into the tile's rows, so a tile computes
  `block_q * R` rows (row r = query position `q_start + r // R`, head `kv_head * R + r % R`) and
  every K/V page it loads serves all R heads at once;
- the grid is static (one program per slot, CUDA-graph friendly); program p runs the tasks
  `program_tasks[program_offsets[p]:program_offsets[p + 1]]`, dealt by cost on the host;
- a task whose KV range is a chunk of a longer range (split-KV, `slot >= 0`) writes its normalized
  partial output and its log-sum-exp to a workspace slot; a second, small kernel merges the slots
  of each tile with the log-sum-exp rule.

Two functions make up the backend's attention support (the same shape as `gemm.py`):

- `render_attention_source(spec)` turns a `meta_attention` KernelSpec into readable Triton source
  with two `@triton.jit` kernels: the meta-attention kernel, named `kernel_identifier(spec)`, and
  its merge kernel, named `kernel_identifier(spec) + "_merge"`;
- `make_attention_launcher(spec, kernels)` wraps them in a launcher that validates the inputs,
  moves the task table to the device, allocates the split-KV workspace and launches both.

`build_attention_kernel(spec)` glues them together through `build.build_triton_kernel`.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from tileflow.attention_inputs import (
    MERGE_COLS,
    TASK_COLS,
    additive_bias,
    attention_params,
    check_launch_inputs,
    softmax_scale,
)
from tileflow.kernel_spec import KernelSpec

from .build import build_triton_kernel, kernel_identifier

__all__ = [
    "SUPPORTED_DTYPES",
    "AttentionConfig",
    "attention_config",
    "build_attention_kernel",
    "make_attention_launcher",
    "merge_kernel_identifier",
    "render_attention_source",
]

# Input/output dtypes the kernel supports (fp64 is left to the reference backend: tl.dot has no
# fp64 path on every GPU Triton targets).
SUPPORTED_DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32")
# tl.dot needs every tile dimension to be at least 16 on GPUs.
_MIN_BLOCK = 16
# Columns of a task-table row and of a merge row (see the contract in tileflow/tasks.py).
_TASK_COLS = TASK_COLS
_MERGE_COLS = MERGE_COLS
# Defaults when the spec carries no TileConfig.
_DEFAULT_BLOCK_KV = 32
_DEFAULT_NUM_STAGES = 3
# Key starts' lead-and-tail loop pipelines its loads too: at 3 stages the 128-row prefill tile
# (4 warps, head_dim 128) takes 128 KiB of shared memory on sm_90, one program per SM; at 2 it
# takes 96 KiB, two per SM as the plain causal tile (which the 4-warp choice was measured for),
# with as many spills (tools/sm90_compile_check.py; not yet timed on a GPU).
_KEY_STARTS_NUM_STAGES = 2


def _default_num_warps(block_m: int, bias: bool, head_dim_pad: int) -> int:
    """Warps for a tile of `block_m` rows: 4, except 8 for tiles past 128 rows and for 128-row
    tiles that read a bias or have heads wider than 128 (the bias tile and the masked loop's
    state, or a [128, 256] accumulator, would not fit 4 warps' registers: at head_dim 256 the
    4-warp tile spilled 4.7 KB, 556 spill instructions in its KV loop, the 8-warp one none;
    bench/NOTES.md, session 9). The configuration sweep of 2026-11-30 measured causal prefill
    2x4096 at head_dim 128 at 0.97 ms with 4 warps against 1.15 ms with 8
    (bench/results/attention_sweep-*-97eab47.md)."""
    return 8 if block_m > 128 or (block_m == 128 and (bias or head_dim_pad > 128)) else 4


# --------------------------------------------------------------------------------------------
# Spec -> static configuration
# --------------------------------------------------------------------------------------------


def _next_pow2(x: int) -> int:
    """Smallest power of two >= x (x >= 1)."""
    return 1 << (x - 1).bit_length()


@dataclass(frozen=True)
class AttentionConfig:
    """The static shape of one meta-attention kernel, derived from its KernelSpec.

    `block_q` query positions x `gqa` heads make a tile's `block_q * gqa` real rows; `block_m` is
    that padded to a power of two >= 16 (the extra rows are masked, never read nor written).
    `head_dim_pad` is `head_dim` padded the same way (the padding columns are masked).
    """

    head_dim: int
    head_dim_pad: int
    gqa: int
    block_q: int
    block_m: int
    block_kv: int
    causal: bool
    sliding_window: bool
    tree: bool
    bias: bool
    softcap: bool
    sinks: bool
    alibi: bool
    num_warps: int
    num_stages: int
    key_starts: bool = False


def attention_config(spec: KernelSpec) -> AttentionConfig:
    """Validate a `meta_attention` KernelSpec and derive its static configuration.

    The target-neutral params (`head_dim`, `gqa`, `block_q`, `block_kv`, `causal`,
    `sliding_window`, `tree`, `bias`, `softcap`, `sinks`, `alibi`, `key_starts`; a TileConfig may supply
    `block_q`/`block_kv`) are checked by `tileflow.attention_inputs.attention_params`; this adds the Triton limits (`block_kv` a power
    of two >= 16) and the launch's `num_warps`/`num_stages` from the TileConfig.

    Raises ValueError for a spec the kernel cannot implement.
    """
    p = attention_params(spec, target="Triton", supported_dtypes=SUPPORTED_DTYPES,
                         default_block_kv=_DEFAULT_BLOCK_KV)
    if p.block_kv < _MIN_BLOCK or p.block_kv & (p.block_kv - 1):
        raise ValueError(
            f"spec {spec.name}: block_kv={p.block_kv} must be a power of two >= {_MIN_BLOCK} "
            f"(tl.dot needs every dimension >= {_MIN_BLOCK})"
        )
    tile = spec.tile
    block_m = max(_MIN_BLOCK, _next_pow2(p.block_q * p.gqa))
    head_dim_pad = max(_MIN_BLOCK, _next_pow2(p.head_dim))
    return AttentionConfig(
        head_dim=p.head_dim,
        head_dim_pad=head_dim_pad,
        gqa=p.gqa,
        block_q=p.block_q,
        block_m=block_m,
        block_kv=p.block_kv,
        causal=p.causal,
        sliding_window=p.sliding_window,
        tree=p.tree,
        bias=p.bias,
        softcap=p.softcap,
        sinks=p.sinks,
        alibi=p.alibi,
        key_starts=p.key_starts,
        num_warps=tile.num_warps if tile is not None else _default_num_warps(block_m, p.bias, head_dim_pad),
        num_stages=tile.num_stages if tile is not None else (_KEY_STARTS_NUM_STAGES if p.key_starts
                                                             else _DEFAULT_NUM_STAGES),
    )


def merge_kernel_identifier(spec: KernelSpec) -> str:
    """Name of the split-KV merge kernel in the rendered module."""
    return kernel_identifier(spec) + "_merge"


def _dot_precision_kwarg(dtype: str) -> str:
    """Extra tl.dot keyword that keeps fp32 inputs in exact IEEE fp32 (no TF32)."""
    if dtype != "float32":
        return ""
    import triton.language as tl

    if "input_precision" in inspect.signature(tl.dot).parameters:
        return ', input_precision="ieee"'
    return ", allow_tf32=False"  # older spelling of the same thing


# --------------------------------------------------------------------------------------------
# Source rendering
# --------------------------------------------------------------------------------------------

_HEADER = '''\
"""Generated by tileflow (Triton backend): persistent meta-attention over a paged KV cache.

kernel   : {kname}  (+ {mname} for split-KV tiles)
op       : out[t, h] = softmax({scores} | mask) @ V[s, h // {gqa}]
mask     : {mask}
dtypes   : {dtype} q/k/v, fp32 scores/softmax/accumulation, {dtype} output
tile     : BLOCK_Q={block_q} query positions x GQA={gqa} heads = {rows} rows, padded to
           BLOCK_M={block_m}; BLOCK_KV={block_kv}; HEAD_DIM={head_dim}{dpad}; num_warps={nw}
schedule : persistent static grid; program p runs the host-built tasks
           program_tasks[program_offsets[p]:program_offsets[p + 1]]

A task = (sequence, KV head, query tile, KV range). Tile row r is query position
q_start + r // GQA of head kv_head * GQA + r % GQA, so the GQA heads that share a KV head
share every K/V load. Scores are kept in base 2 (scale * log2(e) folded into qk_scale) so the
online softmax uses exp2; exp2 only ever sees non-positive arguments.
"""

import triton
import triton.language as tl
'''


def _scores_doc(cfg: AttentionConfig) -> str:
    """The scores' formula, for the header."""
    scores = f"q[t, h] . K[s, h // {cfg.gqa}]^T * scale"
    if cfg.softcap:
        scores = f"softcap * tanh({scores} / softcap)"
    return scores + " + slope[h] * (kv_pos - q_pos)" if cfg.alibi else scores


def _mask_doc(cfg: AttentionConfig) -> str:
    """One-line description of the visibility rule, for the header."""
    parts = ["kv_pos <= q_pos (causal)" if cfg.causal else "kv_pos < seqlen_kv (not causal)"]
    if cfg.sliding_window:
        parts.append("kv_pos > q_pos - window")
    if cfg.key_starts:
        parts.append("kv_pos >= key_starts[seq, q_idx] (sequences packed in a row)")
    if cfg.tree:
        parts.append("tree_mask replaces the causal rule among the new tokens (n_s <= T)")
    if cfg.bias:
        parts.append("plus an additive bias[seq, head, q_idx, kv_pos] (a model's own mask)")
    if cfg.sinks:
        parts.append("one sink logit per head joins every row's softmax, with no value")
    if cfg.alibi:
        parts.append("ALiBi: each head's slope times the key's distance to the query is added")
    return "; ".join(parts)


def _main_signature(cfg: AttentionConfig) -> str:
    """Parameter list of the meta-attention kernel (one argument group per line)."""
    lines = [
        "q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,",
        "block_table_ptr, cu_seqlens_q_ptr, seqlens_kv_ptr,",
        "tasks_ptr, program_offsets_ptr, program_tasks_ptr,",
        "partial_out_ptr, partial_stats_ptr,  # split-KV workspace (unused without split tasks)",
    ]
    if cfg.tree:
        lines.append("tree_mask_ptr,  # uint8 [S, T, T]")
    if cfg.bias:
        lines.append("bias_ptr,  # float additive bias [S, Hq, q_len, kv_len] (broadcast dims: stride 0)")
        lines.append("bias_ranges_ptr,  # int32 [S, q_len, 4]: (lo, full_lo, full_hi, hi) keys per row")
    if cfg.key_starts:
        lines.append("key_starts_ptr,  # int32 [S, q_len]: a row sees no key before key_starts[seq, q_idx]")
    if cfg.sinks:
        lines.append("sinks_ptr,  # float32 [Hq]: each head's attention-sink logit")
    if cfg.alibi:
        lines.append("alibi_ptr,  # float32 [Hq]: each head's ALiBi slope")
    lines.append("qk_scale,  # softmax scale * log2(e)")
    if cfg.softcap:
        lines.append("softcap,  # logit soft-capping: scores become softcap * tanh(scores / softcap)")
    if cfg.sliding_window:
        lines.append("window,  # sliding window: row at q_pos sees kv_pos > q_pos - window")
    if cfg.tree:
        lines.append("tree_size,  # T: sequences with more new tokens than T stay causal")
    lines += [
        "stride_qt, stride_qh, stride_qd,",
        "stride_kb, stride_ks, stride_kh, stride_kd,",
        "stride_vb, stride_vs, stride_vh, stride_vd,",
        "stride_ot, stride_oh, stride_od,",
        "stride_bt,  # block_table row stride",
        "stride_pw_slot, stride_pw_row, stride_pw_d,  # partial_out [slot, row, d]",
        "stride_ps_slot, stride_ps_stat, stride_ps_row,  # partial_stats [slot, (max, sum), row]",
    ]
    if cfg.tree:
        lines.append("stride_tm_s, stride_tm_i, stride_tm_j,")
    if cfg.bias:
        lines.append("stride_ab_s, stride_ab_h, stride_ab_i, stride_ab_j,")
        lines.append("stride_br_s, stride_br_i, stride_br_c,")
    if cfg.key_starts:
        lines.append("stride_st_s, stride_st_i,")
    lines += [
        "HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,",
        "GQA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_KV: tl.constexpr,",
        "PAGE_SIZE: tl.constexpr,  # KV cache page size, a constant: page lookups divide by it (a shift",
        "                          # for powers of two); 0: each sequence's KV is one page (dense attention)",
        "WIDE_OFFSETS: tl.constexpr,  # int64 cache offsets: a cache spans 2**31 elements or more",
        "SAME_KV_STRIDES: tl.constexpr,  # v_cache.stride() == k_cache.stride()",
    ]
    if cfg.softcap:
        lines.append("FAST_TANH: tl.constexpr,  # tanh.approx (half-precision inputs on an NVIDIA GPU)")
    return "\n".join("    " + line for line in lines)


def _main_body(cfg: AttentionConfig, dtype: str) -> str:
    """Body of the meta-attention kernel, at indentation zero."""
    padded_d = cfg.head_dim_pad != cfg.head_dim
    d_row = " & d_mask[None, :]" if padded_d else ""
    out_tl = f"tl.{dtype}"

    code = """\
pid = tl.program_id(axis=0)
task_begin = tl.load(program_offsets_ptr + pid)
task_end = tl.load(program_offsets_ptr + pid + 1)

# Per-row constants, the same for every task: tile row r is query position r // GQA
# of head r % GQA within the KV head's group.
offs_m = tl.arange(0, BLOCK_M)
row_pos = offs_m // GQA
row_head = offs_m % GQA
offs_kv = tl.arange(0, BLOCK_KV)
offs_d = tl.arange(0, HEAD_DIM_PAD)
"""
    if cfg.alibi and not cfg.softcap:
        code += "offs_kv_f = offs_kv.to(tl.float32)\n"
    if padded_d:
        code += f"d_mask = offs_d < HEAD_DIM  # head_dim {cfg.head_dim} padded to {cfg.head_dim_pad}\n"
    if cfg.softcap:
        code += """\
# Logit soft-capping: a score z = scale * q.k becomes softcap * tanh(z / softcap), kept in base 2
# like every score here: cap_out * tanh(q.k * cap_in).
cap_in = qk_scale * 0.6931471805599453 / softcap
cap_out = softcap * 1.4426950408889634
"""
    code += "\nfor task_idx in range(task_begin, task_end):\n"

    if cfg.sinks:
        init = """\
# Attention sinks: each head's logit joins the softmax as a key every row sees and that adds no
# value, so the running max and sum start from it. A split-KV chunk leaves it to the merge.
sink = tl.load(sinks_ptr + head) * 1.4426950408889634  # base 2
# A +inf sink takes every row's whole weight (the output is 0): as the largest finite logit it
# does, where inf - inf would make the rescaling NaN.
sink = tl.where(sink == float("inf"), 3.0e38, sink)
m_i = tl.where(slot < 0, sink, float("-inf"))  # running max (base-2 scores)
l_i = tl.where(slot < 0, 1.0, 0.0) + tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
"""
    else:
        init = """\
m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (base-2 scores)
l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
"""
    alibi = """\
# ALiBi: each row's head slope, in base 2 like the scores (its bias is slope * (kv_pos - q_pos)).
alibi = tl.load(alibi_ptr + head) * 1.4426950408889634
""" if cfg.alibi else ""
    if cfg.alibi and not cfg.softcap:
        alibi += """\
# The unmasked blocks keep their scores unscaled: the slope per key of the block in those units
# (qk_scale > 0 with ALiBi: the launcher makes it so), the rest of the bias once per row.
alibi_unscaled = alibi / qk_scale
"""
    starts = """\
# Sequences packed in one row: each row sees no key before its sequence's first position.
row_first = tl.load(key_starts_ptr + seq.to(tl.int64) * stride_st_s + q_idx * stride_st_i, mask=row_valid, other=0)
""" if cfg.key_starts else ""
    loop = f"""\
# ---- the task: (seq, kv_head, query tile, KV range, output slot) ----
task = tl.load(program_tasks_ptr + task_idx)
entry = tasks_ptr + task * {_TASK_COLS}
seq = tl.load(entry + 0)
kv_head = tl.load(entry + 1)
q_start = tl.load(entry + 2)  # first query position of the tile, within the sequence
q_rows = tl.load(entry + 3)  # query positions in the tile (the rest of BLOCK_M is padding)
kv_start = tl.load(entry + 4)
kv_end = tl.load(entry + 5)  # already clipped on the host to what the tile can see
slot = tl.load(entry + 6)  # -1: write out directly; >= 0: split-KV workspace slot

seq_q_begin = tl.load(cu_seqlens_q_ptr + seq)
num_new = tl.load(cu_seqlens_q_ptr + seq + 1) - seq_q_begin
seq_kv_len = tl.load(seqlens_kv_ptr + seq)

row_valid = row_pos < q_rows  # virtual padding: rows past the tile are never read or written
q_idx = q_start + row_pos  # query index within the sequence
q_pos = seq_kv_len - num_new + q_idx  # its position in the KV sequence
head = kv_head * GQA + row_head
{alibi}# Token and page offsets in int64: token * stride and page * stride can overflow int32.
token = (seq_q_begin + q_idx).to(tl.int64)

q_ptrs = q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd
q = tl.load(q_ptrs, mask=row_valid[:, None]{d_row}, other=0.0)

{starts}{init}acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)  # running sum of p @ V
# Cache offsets in int64 only when a cache spans 2**31 elements or more (the launcher decides):
# int32 offsets halve the address arithmetic of every K/V tile.
kv_head_idx = kv_head.to(tl.int64) if WIDE_OFFSETS else kv_head
k_head_off = kv_head_idx * stride_kh
v_head_off = kv_head_idx * stride_vh
if PAGE_SIZE == 0:  # one page per sequence: its id is the table's first entry, positions index it
    seq_page = tl.load(block_table_ptr + seq * stride_bt)
"""
    if cfg.tree:
        loop += """\
# Tree verify: among the sequence's num_new new tokens (positions >= new_start) the tree
# mask replaces the causal rule, when the tree is big enough to describe them (num_new <= T).
# Otherwise tree_start = seq_kv_len, past every position a task reads: no tree anywhere.
new_start = seq_kv_len - num_new
tree_start = tl.where(num_new <= tree_size, new_start, seq_kv_len)
"""
    if cfg.bias:
        loop += _bias_loops(cfg, dtype)
    elif cfg.key_starts:
        loop += _key_start_loops(cfg, dtype)
    elif cfg.tree:
        # Any KV block may be partly hidden: every step applies the masks.
        loop += "\nfor kv0 in range(kv_start, kv_end, BLOCK_KV):\n" + _indent(_kv_step(cfg, dtype, masked=True))
    elif cfg.sliding_window:
        loop += _window_loops(cfg, dtype)
    else:
        # Blocks that every row of the tile sees whole (before the first row's causal limit and
        # the range's end) need no mask: only the diagonal and tail blocks pay for it.
        limit = "tl.minimum(kv_end, q_pos_first + 1)" if cfg.causal else "kv_end"
        loop += f"""
q_pos_first = seq_kv_len - num_new + q_start  # row 0 has the tile's smallest position
full_end = kv_start + tl.maximum({limit} - kv_start, 0) // BLOCK_KV * BLOCK_KV
for kv0 in range(kv_start, full_end, BLOCK_KV):
""" + _indent(_kv_step(cfg, dtype, masked=False)) + """
for kv0 in range(full_end, kv_end, BLOCK_KV):
""" + _indent(_kv_step(cfg, dtype, masked=True))

    loop += f"""
# Rows that saw no key (possible only with sliding windows, tree masks, key starts or split ranges)
# output zeros, never NaN; a NaN input (in q, the cache, sinks, slopes) stays NaN, as in the
# reference, rather than reading as "no key".
has_key = l_i != 0.0
l_safe = tl.where(has_key, l_i, 1.0)
o = tl.where(has_key[:, None], acc / l_safe[:, None], 0.0)
if slot < 0:
    out_ptrs = out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od
    tl.store(out_ptrs, o.to({out_tl}), mask=row_valid[:, None]{d_row})
else:
    # Split-KV chunk: keep the normalized partial output and the rows' max (natural-log units)
    # and sum apart, not one LSE: a row that sees keys only through a finfo.min mask has its
    # max near -1e30, where adding log(sum) would round away the count of keys it weighs.
    slot_off = slot.to(tl.int64)
    part_ptrs = (partial_out_ptr + slot_off * stride_pw_slot + offs_m[:, None] * stride_pw_row
                 + offs_d[None, :] * stride_pw_d)
    tl.store(part_ptrs, o, mask=row_valid[:, None]{d_row})
    stats_ptrs = partial_stats_ptr + slot_off * stride_ps_slot + offs_m * stride_ps_row
    tl.store(stats_ptrs, tl.where(has_key, m_i * 0.6931471805599453, float("-inf")), mask=row_valid)
    tl.store(stats_ptrs + stride_ps_stat, l_i, mask=row_valid)
"""
    return code + _indent(loop)


def _window_loops(cfg: AttentionConfig, dtype: str) -> str:
    """The KV loops of a sliding-window kernel (no bias, no tree), at indentation zero.

    Keys after the last row's window start and (causal) up to the first row's position are seen
    by every row of the tile: whole blocks of them take the unmasked step, as a causal tile's
    blocks below its diagonal do (with a window of thousands of keys, most of a prompt's). The
    blocks before that run (the window's edge) and after it (the diagonal, the range's tail) take
    the masked step, in one loop.
    """
    limit = "tl.minimum(kv_end, q_pos_first + 1)" if cfg.causal else "kv_end"
    return f"""
q_pos_first = seq_kv_len - num_new + q_start  # row 0 has the tile's smallest position
q_pos_last = q_pos_first + q_rows - 1
seen_by_all = tl.maximum(q_pos_last - window + 1, kv_start)  # the last row's window starts here
full_start = tl.minimum(kv_start + (seen_by_all - kv_start + BLOCK_KV - 1) // BLOCK_KV * BLOCK_KV, kv_end)
full_end = full_start + tl.maximum({limit} - full_start, 0) // BLOCK_KV * BLOCK_KV
for kv0 in range(full_start, full_end, BLOCK_KV):
""" + _indent(_kv_step(cfg, dtype, masked=False)) + _lead_and_tail_loop(cfg, dtype, "kv_start", "kv_end")


def _key_start_loops(cfg: AttentionConfig, dtype: str) -> str:
    """The KV loops of a kernel with key starts (no bias, no tree), at indentation zero.

    Each row sees no key before its own start (the first position of its sequence, when several
    are packed in one dense row), nor, with a window, at or before its position - window. Keys
    from the latest such bound of the tile's rows up to (causal) the first row's position are
    seen by every row: whole blocks of them take the unmasked step; the masked step takes the
    blocks from the earliest bound up to that run and those after it. A tile inside one
    sequence thus costs what a causal tile does; one straddling a boundary reads the keys of
    both of its sequences.
    """
    limit = "tl.minimum(kv_end, q_pos_first + 1)" if cfg.causal else "kv_end"
    row_lo = "tl.maximum(row_first, q_pos - window + 1)" if cfg.sliding_window else "row_first"
    return f"""
q_pos_first = seq_kv_len - num_new + q_start  # row 0 has the tile's smallest position
row_lo = {row_lo}  # the row's first visible key
seg_start = tl.maximum(kv_start, tl.min(tl.where(row_valid, row_lo, kv_end), axis=0))
# Capped at kv_end (where full_start ends anyway): a start near 2**31 would overflow below.
seen_by_all = tl.minimum(tl.maximum(tl.max(tl.where(row_valid, row_lo, kv_start), axis=0), kv_start), kv_end)
full_start = tl.minimum(kv_start + (seen_by_all - kv_start + BLOCK_KV - 1) // BLOCK_KV * BLOCK_KV, kv_end)
full_end = full_start + tl.maximum({limit} - full_start, 0) // BLOCK_KV * BLOCK_KV
for kv0 in range(full_start, full_end, BLOCK_KV):
""" + _indent(_kv_step(cfg, dtype, masked=False)) + _lead_and_tail_loop(cfg, dtype, "seg_start", "kv_end")


def _lead_and_tail_loop(cfg: AttentionConfig, dtype: str, start: str, end: str) -> str:
    """The masked blocks of [`start`, `end`) before `full_start` and after `full_end` (the
    unmasked run), in one loop, at indentation zero: two loops, each with its own pipeline, would
    spill registers. Each block is masked at its own segment's end."""
    return f"""
# The masked blocks before and after the unmasked run, in one loop (order does not matter to the
# online softmax; two loops, each with its own pipeline, would spill registers).
num_lead = tl.maximum(full_start - {start} + BLOCK_KV - 1, 0) // BLOCK_KV
num_tail = tl.maximum({end} - full_end + BLOCK_KV - 1, 0) // BLOCK_KV
for step in range(0, num_lead + num_tail):
    lead = step < num_lead
    kv0 = tl.where(lead, {start} + step * BLOCK_KV, full_end + (step - num_lead) * BLOCK_KV)
    seg_stop = tl.where(lead, full_start, {end})
""" + _indent(_kv_step(cfg, dtype, masked=True, end="seg_stop"))


def _bias_loops(cfg: AttentionConfig, dtype: str) -> str:
    """The KV loops of a kernel with an additive bias, at indentation zero.

    The per-row bias ranges (see `tileflow.attention_inputs.bias_ranges`) narrow the task's KV
    range to the keys some row of the tile sees, and mark the run every row sees with a zero
    bias. Without window or tree masks that run is split off into whole unmasked blocks that
    never read the bias (a model's materialized causal mask then costs what `causal=True` does);
    the blocks before and after it take the masked step, each bounded by its own segment end.
    """
    code = """
# The bias ranges of the tile's rows: keys outside [seg_start, seg_end) are hidden from every
# row; keys in [full_lo, full_hi) have a zero bias for every row.
range_ptrs = bias_ranges_ptr + seq.to(tl.int64) * stride_br_s + q_idx * stride_br_i
seen_lo = tl.min(tl.load(range_ptrs, mask=row_valid, other=2147483647), axis=0)
full_lo = tl.max(tl.load(range_ptrs + stride_br_c, mask=row_valid, other=0), axis=0)
full_hi = tl.min(tl.load(range_ptrs + 2 * stride_br_c, mask=row_valid, other=2147483647), axis=0)
seen_hi = tl.max(tl.load(range_ptrs + 3 * stride_br_c, mask=row_valid, other=0), axis=0)
seg_start = tl.maximum(kv_start, seen_lo)
seg_end = tl.minimum(kv_end, seen_hi)
"""
    if cfg.tree or cfg.sliding_window:
        return code + "for kv0 in range(seg_start, seg_end, BLOCK_KV):\n" + _indent(
            _kv_step(cfg, dtype, masked=True, end="seg_end"))
    limit = "tl.minimum(tl.minimum(seg_end, full_hi), q_pos_first + 1)" if cfg.causal else "tl.minimum(seg_end, full_hi)"
    return code + f"""q_pos_first = seq_kv_len - num_new + q_start  # row 0 has the tile's smallest position
full_start = tl.minimum(tl.maximum(seg_start, full_lo), seg_end)
full_end = full_start + tl.maximum({limit} - full_start, 0) // BLOCK_KV * BLOCK_KV
for kv0 in range(full_start, full_end, BLOCK_KV):
""" + _indent(_kv_step(cfg, dtype, masked=False)) + _lead_and_tail_loop(cfg, dtype, "seg_start", "seg_end")


# The capped base-2 scores from the raw products `s` (see `cap_in`/`cap_out`).
# FAST_TANH (half-precision inputs on an NVIDIA GPU): the hardware's tanh.approx, one special-
# function instruction per score, as the softmax's exp2 is; its error (2**-11 relative) is below
# the rounding of the fp16/bf16 q and k the scores come from. Otherwise (float32, the
# interpreter) tanh from exp2 of a non-positive argument, which never overflows:
# tanh|t| = (1 - e) / (1 + e) for e = exp(-2|t|), within a few float32 ulps; a bf16 prefill tile
# compiled that way issued 1703 instructions per 64-key step against 988 (bench/NOTES.md, session 9).
_SOFTCAP_SCORES = """\
t = s * cap_in
if FAST_TANH:
    th = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [t], dtype=tl.float32, is_pure=True, pack=1)
else:
    # tanh(a) = (1 - e) / (1 + e) with e = exp(-2a) loses 1 - e's digits as a -> 0 (each score
    # off by about softcap * 1e-7, all of them 0 once e rounds to 1): below 0.1 its series
    # a - a^3/3 + 2a^5/15 is exact to float32.
    a = tl.abs(t)
    e = tl.exp2(a * -2.8853900817779268)
    a2 = a * a
    th = tl.where(a < 0.1, a * (1.0 + a2 * (-0.3333333333333333 + a2 * 0.13333333333333333)), (1.0 - e) / (1.0 + e))
    th = tl.where(t < 0.0, -th, th)
s = cap_out * th
"""


# ALiBi's bias, added to the base-2 scores (after any cap): the distance is exact in int32.
_ALIBI_SCORES = "s = s + alibi[:, None] * (kv_pos[None, :] - q_pos[:, None]).to(tl.float32)  # ALiBi\n"


def _kv_step(cfg: AttentionConfig, dtype: str, *, masked: bool, end: str = "kv_end") -> str:
    """One KV block of the online-softmax loop, at indentation zero.

    `masked=False` is for blocks every row of the tile sees whole (no tail, no causal cut, no
    window or tree in the spec, and a zero bias if any): no visibility mask, no bias load, and
    no guard for rows that have seen nothing yet, since every score is finite. A masked step
    hides the keys at or past `end`, the end of its loop's segment.
    """
    dot_kw = _dot_precision_kwarg(dtype)
    padded_d = cfg.head_dim_pad != cfg.head_dim
    d_row = " & d_mask[None, :]" if padded_d else ""
    if masked:
        kv_mask = f"kv_valid = kv_pos < {end}\n"
        page_mask, kv_tile_mask = ", mask=kv_valid, other=0", f", mask=kv_valid[:, None]{d_row}, other=0.0"
    else:
        kv_mask, page_mask = "", ""
        kv_tile_mask = ", mask=d_mask[None, :], other=0.0" if padded_d else ""
    step = f"""\
kv_pos = kv0 + offs_kv
{kv_mask}# Paged cache: position p lives at page block_table[seq, p // PAGE_SIZE], row p % PAGE_SIZE.
if PAGE_SIZE == 0:
    page = seq_page
    page_row = kv_pos
else:
    page = tl.load(block_table_ptr + seq * stride_bt + kv_pos // PAGE_SIZE{page_mask})
    page_row = kv_pos % PAGE_SIZE
if WIDE_OFFSETS:
    page = page.to(tl.int64)
k_off = page * stride_kb + page_row * stride_ks + k_head_off
if SAME_KV_STRIDES:  # the usual case, K and V caches alike: one set of offsets serves both
    v_off = k_off
else:
    v_off = page * stride_vb + page_row * stride_vs + v_head_off
# K and V tiles are both [BLOCK_KV, HEAD_DIM_PAD] (the dot reads K transposed from shared memory).
k = tl.load(k_cache_ptr + k_off[:, None] + offs_d[None, :] * stride_kd{kv_tile_mask})
"""
    # The base-2 scores, scaled, capped and biased as the spec says.
    if cfg.softcap:
        scores = f"s = tl.dot(q, tl.trans(k){dot_kw})\n" + _SOFTCAP_SCORES
    else:
        scores = f"s = tl.dot(q, tl.trans(k){dot_kw}) * qk_scale\n"
    scores += _ALIBI_SCORES if cfg.alibi else ""
    if masked:
        step += scores + "\nvisible = row_valid[:, None] & kv_valid[None, :]\n"
        if cfg.causal:
            step += "rule = kv_pos[None, :] <= q_pos[:, None]  # causal\n"
        if cfg.tree:
            step += """\
in_tree = kv_pos >= tree_start
tree_ptrs = (tree_mask_ptr + seq * stride_tm_s + q_idx[:, None] * stride_tm_i
             + (kv_pos - new_start)[None, :] * stride_tm_j)
tree_ok = tl.load(tree_ptrs, mask=visible & in_tree[None, :], other=0) != 0
"""
            if cfg.causal:
                step += "rule = tl.where(in_tree[None, :], tree_ok, rule)\n"
            else:
                step += "rule = tree_ok | (~in_tree)[None, :]  # not causal: only the tree masks\n"
        if cfg.causal or cfg.tree:
            step += "visible = visible & rule\n"
        if cfg.sliding_window:
            step += "visible = visible & (kv_pos[None, :] > q_pos[:, None] - window)  # sliding window\n"
        if cfg.key_starts:
            step += "visible = visible & (kv_pos[None, :] >= row_first[:, None])  # packed sequences\n"
        if cfg.bias:
            step += """\
# The model's own additive mask/bias (e.g. a materialized padding or sliding-window mask):
# -inf entries hide a key; scores are in base 2, so the bias is scaled by log2(e).
bias_ptrs = (bias_ptr + seq.to(tl.int64) * stride_ab_s + head[:, None] * stride_ab_h
             + q_idx[:, None] * stride_ab_i + kv_pos[None, :] * stride_ab_j)
bias = tl.load(bias_ptrs, mask=visible, other=0.0).to(tl.float32)
# A -inf entry hides its key like a mask does (a row hidden entirely outputs zeros, as on every
# backend); masks built with finfo.min instead would overflow when rescaled: clamp those. A NaN
# entry is kept, and makes its row NaN as in eager attention (`!=` and `where`, not `>` and
# `maximum`, which would drop it: hide its key without a word).
visible = visible & (bias != float("-inf"))
s = s + tl.where(bias < -1.0e30, -1.0e30, bias) * 1.4426950408889634
"""
        step += """\
s = tl.where(visible, s, float("-inf"))

# Online softmax. A row that has seen no visible key yet keeps m = -inf; using 0 as its
# reference makes every exp2 argument -inf (-> 0) instead of -inf - -inf (NaN).
m_new = tl.maximum(m_i, tl.max(s, axis=1))
m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
"""
        step += "p = tl.exp2(s - m_ref[:, None])\n"
    elif cfg.softcap:
        step += scores + """\
# Online softmax over a whole block: every score is finite, so m_new is too.
m_new = tl.maximum(m_i, tl.max(s, axis=1))
m_ref = m_new
p = tl.exp2(s - m_ref[:, None])
"""
    elif cfg.alibi:
        # The bias split as slope * (key offset in the block) + slope * (kv0 - q_pos): the first
        # part one multiply-add per unscaled score, the second per row, folded into the max and
        # the exp2 argument (one multiply-add per score, as without ALiBi).
        step += f"""\
s = tl.dot(q, tl.trans(k){dot_kw})
s = s + alibi_unscaled[:, None] * offs_kv_f[None, :]  # ALiBi within the block
row_bias = alibi * (kv0 - q_pos).to(tl.float32)  # ALiBi of the block's first key, per row
# Online softmax over a whole block: every score is finite, so m_new is too.
m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale + row_bias)
m_ref = m_new
p = tl.exp2(s * qk_scale - (m_ref - row_bias)[:, None])
"""
    else:
        step += f"""\
s = tl.dot(q, tl.trans(k){dot_kw})
# Online softmax over a whole block: every score is finite, so m_new is too. The scores stay
# unscaled: qk_scale >= 0 (the launcher makes it so), so the block's max times qk_scale is the
# max of the scaled scores, and s * qk_scale - m_new is one fused multiply-add per score.
m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
m_ref = m_new
p = tl.exp2(s * qk_scale - m_ref[:, None])
"""
    step += f"""\
alpha = tl.exp2(m_i - m_ref)
l_i = l_i * alpha + tl.sum(p, axis=1)
v = tl.load(v_cache_ptr + v_off[:, None] + offs_d[None, :] * stride_vd{kv_tile_mask})
# p is rounded to the cache dtype for the tensor-core dot; the sum stays fp32.
acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None]{dot_kw})
m_i = m_new
"""
    return step


def _merge_body(cfg: AttentionConfig, dtype: str) -> str:
    """Body of the split-KV merge kernel, at indentation zero."""
    padded_d = cfg.head_dim_pad != cfg.head_dim
    d_row = " & d_mask[None, :]" if padded_d else ""
    if cfg.sinks:  # the head's sink counted once, here: a chunk with max = sink, sum 1, no value
        merge_init = """\
m_i = tl.load(sinks_ptr + head)
m_i = tl.where(m_i == float("inf"), 3.0e38, m_i)  # as in the main kernel: never inf - inf
l_i = tl.full([BLOCK_M], 1.0, tl.float32)
"""
    else:
        merge_init = """\
m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
l_i = tl.zeros([BLOCK_M], tl.float32)
"""
    code = f"""\
# One program per split tile: (seq, kv_head, q_start, q_rows, first_slot, num_slots).
pid = tl.program_id(axis=0)
entry = merges_ptr + pid * {_MERGE_COLS}
seq = tl.load(entry + 0)
kv_head = tl.load(entry + 1)
q_start = tl.load(entry + 2)
q_rows = tl.load(entry + 3)
first_slot = tl.load(entry + 4)
num_slots = tl.load(entry + 5)

offs_m = tl.arange(0, BLOCK_M)
offs_d = tl.arange(0, HEAD_DIM_PAD)
"""
    if padded_d:
        code += "d_mask = offs_d < HEAD_DIM\n"
    code += f"""\
row_valid = offs_m // GQA < q_rows
head = kv_head * GQA + offs_m % GQA
token = (tl.load(cu_seqlens_q_ptr + seq) + q_start + offs_m // GQA).to(tl.int64)

# Log-sum-exp merge: out = sum_i w_i * o_i / sum_i w_i with w_i = sum_i * exp(max_i), computed
# against the running max so exp only sees non-positive arguments; chunks whose max is -inf (no
# visible key) weigh 0.
{merge_init}acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
first_slot = first_slot.to(tl.int64)
for i in range(0, num_slots):
    # (the loop index is a plain int under the interpreter: offsets are built from first_slot)
    slot_off = first_slot + i
    stats_ptrs = partial_stats_ptr + slot_off * stride_ps_slot + offs_m * stride_ps_row
    chunk_max = tl.load(stats_ptrs, mask=row_valid, other=float("-inf"))
    chunk_sum = tl.load(stats_ptrs + stride_ps_stat, mask=row_valid, other=0.0)
    part = tl.load(partial_out_ptr + slot_off * stride_pw_slot + offs_m[:, None] * stride_pw_row
                   + offs_d[None, :] * stride_pw_d, mask=row_valid[:, None]{d_row}, other=0.0)
    m_new = tl.maximum(m_i, chunk_max)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_ref)
    w = chunk_sum * tl.exp(chunk_max - m_ref)
    acc = acc * alpha[:, None] + w[:, None] * part
    l_i = l_i * alpha + w
    m_i = m_new

has_key = l_i != 0.0  # NaN stats stay NaN
l_safe = tl.where(has_key, l_i, 1.0)
o = tl.where(has_key[:, None], acc / l_safe[:, None], 0.0)
out_ptrs = out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od
tl.store(out_ptrs, o.to(tl.{dtype}), mask=row_valid[:, None]{d_row})
"""
    return code


def _indent(text: str) -> str:
    """Indent every non-empty line of `text` by four spaces."""
    return "".join(("    " + line) if line.strip() else line for line in text.splitlines(True))


def render_attention_source(spec: KernelSpec) -> str:
    """Generate the Triton source module for a `meta_attention` KernelSpec.

    The module defines two `@triton.jit` kernels: `kernel_identifier(spec)`, the persistent
    meta-attention kernel (grid = the task table's program count), and
    `merge_kernel_identifier(spec)`, the split-KV merge (grid = the number of merge rows). Only
    the masks the spec asks for (causal, sliding window, tree) get code, and head-dim masks appear
    only when `head_dim` is not a power of two >= 16. fp32 inputs use IEEE (non-TF32) dots.

    Raises ValueError for a spec the kernel cannot implement (see `attention_config`).
    """
    cfg = attention_config(spec)
    kname = kernel_identifier(spec)
    mname = merge_kernel_identifier(spec)
    header = _HEADER.format(
        kname=kname,
        mname=mname,
        gqa=cfg.gqa,
        mask=_mask_doc(cfg),
        scores=_scores_doc(cfg),
        dtype=spec.dtype,
        block_q=cfg.block_q,
        rows=cfg.block_q * cfg.gqa,
        block_m=cfg.block_m,
        block_kv=cfg.block_kv,
        head_dim=cfg.head_dim,
        dpad=f" (padded to {cfg.head_dim_pad})" if cfg.head_dim_pad != cfg.head_dim else "",
        nw=cfg.num_warps,
    )
    # Runtime integers that vary between calls are not specialized on (no recompiles when the
    # window or tree size changes, nor variants for a value of 1). The page size, fixed for a
    # cache's life, is a constexpr instead.
    no_spec = []
    if cfg.sliding_window:
        no_spec.append("window")
    if cfg.tree:
        no_spec.append("tree_size")
    main = (
        f"@triton.jit(do_not_specialize={no_spec!r})\n"
        f"def {kname}(\n{_main_signature(cfg)}\n):\n"
        + _indent(_main_body(cfg, spec.dtype))
    )
    merge_sig = "\n".join(
        "    " + line
        for line in (
            "out_ptr, partial_out_ptr, partial_stats_ptr, merges_ptr, cu_seqlens_q_ptr,"
            + (" sinks_ptr," if cfg.sinks else ""),
            "stride_ot, stride_oh, stride_od,",
            "stride_pw_slot, stride_pw_row, stride_pw_d,",
            "stride_ps_slot, stride_ps_stat, stride_ps_row,",
            "HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,",
            "GQA: tl.constexpr, BLOCK_M: tl.constexpr,",
        )
    )
    merge = (
        "@triton.jit\n"
        f"def {mname}(\n{merge_sig}\n):\n"
        + _indent(_merge_body(cfg, spec.dtype))
    )
    return header + "\n\n" + main + "\n\n" + merge


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _fast_tanh(dtype: str, device: torch.device) -> bool:
    """Whether the soft-capping tanh may be the PTX tanh.approx: half-precision inputs (see
    `_SOFTCAP_SCORES`), compiled for an NVIDIA GPU (not the interpreter, not ROCm)."""
    return dtype != "float32" and device.type == "cuda" and torch.version.hip is None


def _needs_wide_offsets(cache: torch.Tensor) -> bool:
    """Whether an element offset into `cache` can reach 2**31 (then the kernel computes its cache
    offsets in int64): the largest offset is the sum of (size - 1) * stride over its dims."""
    if cache.is_contiguous():  # the usual cache, asked on every launch: the cheap form
        return cache.numel() > 2**31
    return sum((n - 1) * abs(st) for n, st in zip(cache.shape, cache.stride())) >= 2**31


@functools.lru_cache(maxsize=16)
def _unused_workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-KV workspace arguments of a launch without split tasks, which the kernels never
    touch: made once per device rather than allocated twice per call."""
    return (torch.empty((1, 1, 1), dtype=torch.float32, device=device),
            torch.empty((1, 2, 1), dtype=torch.float32, device=device))


def _resolve_kernels(spec: KernelSpec, kernels: Any) -> tuple[Any, Any]:
    """(attention kernel, merge kernel) from what the caller passed.

    `build_triton_kernel` hands the launcher factory only the module's entry kernel; the merge
    kernel is then looked up by name in the same generated module (the jit function's globals),
    so build.py needs no change to carry two kernels. A (main, merge) pair or a dict with keys
    "attention"/"merge" is accepted as well.
    """
    if isinstance(kernels, dict):
        return kernels["attention"], kernels["merge"]
    if isinstance(kernels, (tuple, list)):
        main, merge = kernels
        return main, merge
    fn = getattr(kernels, "fn", None)
    module_globals = getattr(fn, "__globals__", None)
    name = merge_kernel_identifier(spec)
    if module_globals is None or name not in module_globals:
        raise ValueError(
            f"cannot find the merge kernel {name!r} next to {kernels!r}; pass the kernels as a "
            f"(attention, merge) pair"
        )
    return kernels, module_globals[name]


def make_attention_launcher(spec: KernelSpec, kernels: Any) -> Callable[..., torch.Tensor]:
    """Wrap the built meta-attention kernels in a launcher.

    `kernels` is the attention `@triton.jit` function from the generated module (its merge kernel
    is found beside it), or an (attention, merge) pair. Returns

        launch(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_kv, table, *,
               scale=None, tree_mask=None, sliding_window=None, out=None, attn_bias=None,
               attn_bias_ranges=None, softcap=None, sinks=None, alibi_slopes=None, key_starts=None) -> out

    - `q` [total_q, Hq, D] of the spec dtype; `k_cache`/`v_cache` [num_blocks, block_size, Hkv, D]
      of the same dtype with Hq == Hkv * gqa; any strides;
    - `block_table` [S, max_blocks], `cu_seqlens_q` [S + 1], `seqlens_kv` [S]: integer tensors
      (converted to int32 on q's device);
    - `table`: the TaskTable built for this batch (tasks, program_offsets, program_tasks, merges,
      num_slots, block_q, num_q_heads, num_kv_heads); its tensors are moved to q's device;
    - `scale` defaults to 1/sqrt(D); `sliding_window` (int >= 1) must be given exactly when the
      spec has `sliding_window=True`, `tree_mask` (bool [S, T, T]) exactly when it has `tree=True`,
      `softcap` (a number > 0) exactly when it has `softcap=True`, `sinks` (float [Hq]) exactly
      when it has `sinks=True`, `alibi_slopes` (float [Hq]) exactly when it has `alibi=True`,
      `key_starts` (integer [S, >= max q_len]) exactly when it has `key_starts=True`;
    - `out`, when given, must be q's shape and dtype and is written in place.

    The split-KV workspace (float32 partial_out [num_slots, block_q * gqa, D] and partial_stats
    [num_slots, 2, block_q * gqa], see `TaskTable.workspace_shapes`) is allocated per call when
    the table has slots; the merge kernel runs when it has merge rows. Bad inputs raise ValueError.
    """
    cfg = attention_config(spec)
    main_kernel, merge_kernel = _resolve_kernels(spec, kernels)
    where = f"kernel {spec.name}"
    rows_per_slot = cfg.block_q * cfg.gqa

    def launch(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_table: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        seqlens_kv: torch.Tensor,
        table: Any,
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
        """Run meta-attention for the batch described by `table`; returns `out`.

        `attn_bias` (given exactly when the spec has `bias=True`) is a float [S | 1, Hq | 1,
        max_q_len, max_kv_len] tensor added to the scaled scores, or a bool mask of that shape
        (True = attend: adds 0, else hides the key; the kernel gets its float32 additive form):
        row i of sequence s, key j reads attn_bias[s, h, i, j]. `attn_bias_ranges` are its
        `bias_ranges` when the caller has them already (computed here otherwise): the kernel
        skips the keys they hide and reads no bias where they say it is zero. `softcap` (given
        exactly when the spec has `softcap=True`) caps the scaled scores at +-softcap: softcap *
        tanh(scores / softcap).
        `sinks` (float [Hq], exactly when the spec has `sinks=True`) are the heads' attention-sink
        logits: each joins its head's softmax as a key that adds no value. `alibi_slopes` (float
        [Hq], exactly when the spec has `alibi=True`): ALiBi, the score of key position j for the
        query at position p gains slope[h] * (j - p). `key_starts` (exactly when the spec has
        `key_starts=True`): row i of sequence s sees no key before position key_starts[s, i].
        """
        # Shapes, dtypes, the table, masks and `out`: the checks every backend shares.
        inputs = check_launch_inputs(
            cfg, spec.dtype, where, q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_kv,
            table, tree_mask=tree_mask, sliding_window=sliding_window, out=out,
            attn_bias=attn_bias, attn_bias_ranges=attn_bias_ranges, need_bias_ranges=True,
            softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes, key_starts=key_starts,
        )
        out = inputs.out
        if inputs.nothing_to_do:
            return out  # nothing to compute (an empty grid is an error on some versions)
        d = cfg.head_dim
        device = q.device
        block_size = k_cache.shape[1]
        tasks, offsets, prog_tasks, merges = (
            inputs.tasks, inputs.program_offsets, inputs.program_tasks, inputs.merges)
        block_table, cu_seqlens_q = inputs.block_table, inputs.cu_seqlens_q
        seqlens_kv, num_slots, num_programs = inputs.seqlens_kv, inputs.num_slots, inputs.num_programs
        # bool storage is one byte per element: viewed as uint8 (no copy), loads are plain.
        tree_arg = None if inputs.tree_mask is None else inputs.tree_mask.view(torch.uint8)
        bias_arg = inputs.attn_bias
        if bias_arg is not None and bias_arg.dtype != torch.float32:
            # The kernel reads a float32 bias: its masked steps fetch it with cp.async, whose
            # smallest copy is 4 bytes. A bool mask read as bytes, or a 2-byte bias, there took
            # per-element loads that doubled the step and spilled inside it (sm_90: 2373 and
            # 2125 instructions a step against 1018, 384 and 392 bytes spilled, bench/NOTES.md,
            # session 41). Converted on its distinct values (broadcast dims stay stride 0).
            bias_arg = additive_bias(bias_arg)
        scale = softmax_scale(scale, d, where)
        if scale < 0:
            # The kernel's unmasked blocks rely on qk_scale >= 0 (max(s) * scale is the max of
            # the scaled scores); q . k * scale == (-q) . k * -scale.
            q, scale = -q, -scale
        if scale < 1e-30 and cfg.alibi:
            # ...and with ALiBi on qk_scale > 0, not tiny (they divide the slopes by it): scores
            # that small are zeros in float32 next to any bias.
            q, scale = torch.zeros_like(q), 1.0

        # ---- workspace (split-KV partial results, fp32) ----
        if num_slots > 0:
            partial_out = torch.empty((num_slots, rows_per_slot, d), dtype=torch.float32,
                                      device=device)
            partial_stats = torch.empty((num_slots, 2, rows_per_slot), dtype=torch.float32,
                                        device=device)
        else:  # never touched: tasks without a slot write `out` directly
            partial_out, partial_stats = _unused_workspace(device)

        args: list[Any] = [
            q, k_cache, v_cache, out,
            block_table, cu_seqlens_q, seqlens_kv,
            tasks, offsets, prog_tasks,
            partial_out, partial_stats,
        ]
        if cfg.tree:
            args.append(tree_arg)
        if cfg.bias:
            args += [bias_arg, inputs.bias_ranges]
        if cfg.key_starts:
            args.append(inputs.key_starts)
        if cfg.sinks:
            args.append(inputs.sinks)
        if cfg.alibi:
            args.append(inputs.alibi_slopes)
        args += [float(scale) * math.log2(math.e)]
        if cfg.softcap:
            args.append(inputs.softcap)
        if cfg.sliding_window:
            args.append(inputs.sliding_window)
        if cfg.tree:
            args.append(tree_arg.shape[1])
        args += [*q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
                 block_table.stride(0), *partial_out.stride(), *partial_stats.stride()]
        if cfg.tree:
            args += [*tree_arg.stride()]
        if cfg.bias:
            args += [*bias_arg.stride(), *inputs.bias_ranges.stride()]
        if cfg.key_starts:
            args += [*inputs.key_starts.stride()]
        consts = dict(
            HEAD_DIM=cfg.head_dim,
            HEAD_DIM_PAD=cfg.head_dim_pad,
            GQA=cfg.gqa,
            BLOCK_M=cfg.block_m,
        )
        main_kernel[(num_programs,)](
            *args, **consts, BLOCK_KV=cfg.block_kv,
            # A one-column table holds every sequence in one page (the dense op's case, whose page
            # size is the sequence length): no page size in the kernel, so no compile per length.
            PAGE_SIZE=0 if block_table.shape[1] == 1 else block_size,
            WIDE_OFFSETS=_needs_wide_offsets(k_cache) or _needs_wide_offsets(v_cache),
            SAME_KV_STRIDES=k_cache.stride() == v_cache.stride(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **({"FAST_TANH": _fast_tanh(spec.dtype, device)} if cfg.softcap else {}),
        )
        if merges.shape[0] > 0:
            merge_kernel[(merges.shape[0],)](
                out, partial_out, partial_stats, merges, cu_seqlens_q, *([inputs.sinks] if cfg.sinks else []),
                *out.stride(), *partial_out.stride(), *partial_stats.stride(),
                **consts, num_warps=cfg.num_warps,
            )
        return out

    launch.kernel = main_kernel  # type: ignore[attr-defined]  # the JIT functions, for inspection
    launch.merge_kernel = merge_kernel  # type: ignore[attr-defined]
    launch.spec = spec  # type: ignore[attr-defined]
    launch.config = cfg  # type: ignore[attr-defined]
    return launch


def build_attention_kernel(spec: KernelSpec, artifact_dir: Path | None = None) -> Any:
    """Render, write, import and wrap the meta-attention kernels for `spec` (cached).

    A thin wrapper over `build.build_triton_kernel`; returns its `CompiledKernel`, whose
    `launch` is the launcher described in `make_attention_launcher`.
    """
    return build_triton_kernel(spec, render_attention_source, make_attention_launcher,
                               artifact_dir)
