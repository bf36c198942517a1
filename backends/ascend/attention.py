"""Meta-attention for the Ascend C target (XY-Serve Meta-Attention on an Ascend 910B AI core).

One launch computes attention for a whole mixed batch — prefill, chunked prefill over a cached
prefix, decode and tree-speculative verify — over a paged KV cache, driven by the host-built task
table of `tileflow/tasks.py` (same contract as the Triton and reference kernels): program
``p = GetBlockIdx()`` runs ``program_tasks[program_offsets[p]:program_offsets[p + 1]]``; a task is
(sequence, KV head, a tile of up to ``block_q`` query positions whose ``R = gqa`` heads are packed
into ``block_q * R`` rows, a KV range); split-KV tasks write a float32 workspace slot that a second
kernel merges with the log-sum-exp rule.

How a task maps onto the AI core. The cube unit (matrices) and the vector unit (softmax) have no
direct datapath, so matrices pass through a per-core GM workspace:

- the Q tile is staged into UB with one strided `DataCopyPad` (``q_rows`` blocks of ``R * D``
  contiguous elements) and written to the core's workspace as a dense ``[rows, D]`` matrix, the
  cube's A operand;
- KV is walked in chunks that never cross a page (``min(block_kv, page left, range left)``), so a
  chunk's K rows are equally spaced (``Hkv * D`` apart) and the cube reads them in place from the
  cache (B transposed, ``orgKb = Hkv * D``): ``S = Q K^T`` lands in UB (row stride ``block_kv``);
- the vector unit scales (and, with ``softcap``, caps: ``c * tanh(s / c)``), adds ALiBi's
  ``slope * (j - p)`` (``alibi``: one multiply and one add of a column-offset row per tile row)
  and the model's additive bias when the spec has them, masks (causal / sliding window / key
  starts hide a contiguous column range per row; the tree mask is applied per element over the
  new-token columns), runs the online softmax per row, rounds P to the input type and writes it
  to the workspace; the cube computes ``P V`` (V read in place, ``orgN = Hkv * D``) into UB, and
  the vector unit folds it into the accumulator.
- with ``sinks``, each row's sink logit joins its softmax once as a key with no value (its sum
  gains ``exp(sink - max)``): at the end of an unsplit task, or in the merge for split rows.

The additive bias (``bias=True``: the float mask torch.export leaves in real models) has the
reference backend's semantics: tile row ``r`` (query index ``i = q_start + r // R`` within the
sequence, head ``h = kv_head * R + r % R``) adds ``attn_bias[seq, h, i, j]`` to the scaled score
of key ``j``, before the visibility rules (which override it: a hidden key stays hidden whatever
its bias), and a ``-inf`` entry hides a key, so a row the bias hides entirely outputs zeros (LSE
``-inf`` in a split-KV slot). A chunk's keys are contiguous in a bias row, so the bias of a
chunk arrives as one `DataCopyPad` per tile row, issued before the scores are computed (the
copy overlaps the cube's ``Q K^T``). The launcher passes the bias in place when it is float32
with contiguous keys (broadcast dims are stride 0: element strides ride in the tiling) and a
compact float32 copy otherwise (a bool mask, True = attend, as 0 / -inf). With the bias come
its per-row ranges (``attn_bias_ranges``, `tileflow.attention_inputs.bias_ranges`): each task's
KV range is narrowed to the keys some row of its tile sees, so the chunks a causal mask hides
are never loaded.

Key starts (``key_starts=True``: sequences packed in one dense row) give each query row of
sequence ``s`` its first visible key, ``key_starts[s, i]`` (int32 ``[S, >= max n_s]``, read in
place), on top of the causal rule and the window; they go with neither a tree nor a bias. The
host's task table knows nothing of them: the kernel starts each task's KV range at the earliest
start of its tile's rows (a range wholly before it is empty) and hides the keys before a row's own
start only in chunks that begin before the tile's latest start.

The kernel picks a pipeline per task at run time (XY-Serve's three):

- **2-stage** (``q_rows == 1``, decode): K/V chunks stream into UB (double-buffered) and the
  vector unit does both products as GEMVs — no cube, no workspace round trip for ``R`` rows;
- **3-stage** (the KV range is one chunk): QK^T -> softmax -> PV, exact softmax, no rescale;
- **4-stage** (otherwise): QK^T -> softmax -> PV -> Update (online rescale across chunks).

Public functions: `attention_layout(spec)` (validation and the static layout, UB budget
included), `render_attention_sources(spec)` (the project files), `make_attention_launcher(spec,
host_call, run, cores)` (validation, host tiling, workspaces and the two launches through a
runner: the CPU-debug library or the NPU operators), `build_cpu_attention(spec, include_dirs)`
and `task_pipeline(...)` (which pipeline the kernel runs for a task; for tests and reports).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

import torch

from tileflow.attention_inputs import (
    MERGE_COLS,
    TASK_COLS,
    AttentionParams,
    additive_bias,
    attention_params,
    bias_extent,
    check_launch_inputs,
    softmax_scale,
)
from tileflow.kernel_spec import KernelSpec
from tileflow.targets import CompiledKernel

from .gemm import MAX_BLOCK_DIM, sys_workspace
from .sources import (
    EntryPoint,
    HostCall,
    KernelRun,
    KernelSources,
    banner,
    cpp_type,
    cpu_runner,
    kernel_ident,
    launch_stub,
    tiling_struct_name,
    torch_binding,
)

__all__ = [
    "L0AB_BYTES",
    "L0C_BYTES",
    "SUPPORTED_DTYPES",
    "TILING_ERRORS",
    "UB_BYTES",
    "AttentionLayout",
    "UbBuffer",
    "attention_entries",
    "attention_layout",
    "build_cpu_attention",
    "make_attention_launcher",
    "render_attention_sources",
    "task_pipeline",
]

SUPPORTED_DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32")
# Unified buffer of one AI core on Atlas A2 (910B): every TPipe buffer of a kernel lives in it.
UB_BYTES = 192 * 1024
# Cube L0 buffers on 910B: A and B operands 64 KiB each, the float accumulator 128 KiB.
L0AB_BYTES = 64 * 1024
L0C_BYTES = 128 * 1024
# Depth of the streamed K/V/S/P queues: 2 = double buffering (load chunk i+1 while computing i).
BUFFER_NUM = 2
# KV positions per chunk when the spec does not say (as the Triton kernel).
_DEFAULT_BLOCK_KV = 32
# Vector instructions and DataCopy work on 32-byte blocks.
_BLOCK_BYTES = 32
# The cube works on 16 x 16 fractals: the Matmul base tile's M is padded to a multiple of 16.
_FRACTAL = 16
_API_DTYPES = {"float16": "DT_FLOAT16", "bfloat16": "DT_BF16", "float32": "DT_FLOAT"}
_ELEMENT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}

# Status codes of the host tiling function; the C++ enum is generated from this table, so the
# launcher's messages and the kernel project cannot drift apart.
TILING_ERRORS: dict[int, tuple[str, str]] = {
    1: ("TILING_NULL_OUTPUT", "no tiling buffer was given"),
    2: ("TILING_BAD_HEADS", "num_q_heads must be num_kv_heads * gqa, both positive"),
    3: ("TILING_BAD_PAGES", "block_size, max_blocks and num_blocks must be positive"),
    4: ("TILING_BAD_COUNTS", "sequence, token, task, slot and merge counts must be >= 0"),
    5: ("TILING_BAD_PROGRAMS", "num_programs must be >= 1"),
    6: ("TILING_BAD_WINDOW", "the sliding window must be >= 1"),
    7: ("TILING_BAD_TREE", "the tree mask size must be >= 0"),
    8: ("TILING_QK_CUBE", "the cube cannot tile S = Q K^T (matmul_tiling refused the split)"),
    9: ("TILING_PV_CUBE", "the cube cannot tile O = P V (matmul_tiling refused the split)"),
    10: ("TILING_BAD_SOFTCAP", "the logit soft-cap must be a finite number > 0"),
}

def _ceil(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


# --------------------------------------------------------------------------------------------
# Spec -> static layout (and its UB budget)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UbBuffer:
    """One TPipe buffer of an emitted kernel: its C++ member, kind, count and size.

    The emitted `InitBuffer` calls are generated from these, so the budget checked here at render
    time is exactly what the kernel asks of the UB.
    """

    member: str  # C++ member name
    kind: str  # "TQue<TPosition::VECIN, BUFFER_NUM>", "TBuf<TPosition::VECCALC>", ...
    num: int  # buffers (the TQue's InitBuffer `num`; 1 for a TBuf)
    nbytes: int  # bytes per buffer, a multiple of 32
    purpose: str

    @property
    def total(self) -> int:
        """UB bytes the buffer takes."""
        return self.num * self.nbytes


@dataclass(frozen=True)
class AttentionLayout:
    """The static shape of one Ascend meta-attention kernel, derived from its KernelSpec.

    A tile has ``rows = block_q * gqa`` rows (row r: query position r // gqa, head r % gqa);
    ``cube_rows`` is that padded to the cube's 16-row fractal (the Matmul base M). Per-row
    statistics take ``stat_len`` floats (rows padded to 32 bytes).
    """

    params: AttentionParams
    dtype: str
    ctype: str
    esize: int

    @property
    def head_dim(self) -> int:
        """D."""
        return self.params.head_dim

    @property
    def gqa(self) -> int:
        """R, query heads per KV head."""
        return self.params.gqa

    @property
    def block_q(self) -> int:
        """Query positions per tile."""
        return self.params.block_q

    @property
    def block_kv(self) -> int:
        """KV positions per chunk (at most; a chunk also stops at a page end)."""
        return self.params.block_kv

    @property
    def causal(self) -> bool:
        """Rows see positions <= their own."""
        return self.params.causal

    @property
    def sliding_window(self) -> bool:
        """The kernel takes a window w: rows see positions > p - w."""
        return self.params.sliding_window

    @property
    def tree(self) -> bool:
        """The kernel takes a tree mask for speculative verify."""
        return self.params.tree

    @property
    def bias(self) -> bool:
        """The kernel takes an additive float attention bias (see the module docstring)."""
        return self.params.bias

    @property
    def softcap(self) -> bool:
        """Logit soft-capping: the scaled scores become ``c * tanh(s / c)``, c given at launch."""
        return self.params.softcap

    @property
    def sinks(self) -> bool:
        """Attention sinks: one logit per query head (float32 [Hq] at launch) joins each row's
        softmax as a key with no value, counted once per row (by the merge for split rows)."""
        return self.params.sinks

    @property
    def alibi(self) -> bool:
        """ALiBi: head h's score of key j for the query at position p gains ``slope_h * (j - p)``
        (float32 [Hq] slopes at launch)."""
        return self.params.alibi

    @property
    def key_starts(self) -> bool:
        """Sequences packed in one dense row: query row i of sequence s sees no key before
        ``key_starts[s, i]`` (int32 [S, >= max n_s] at launch)."""
        return self.params.key_starts

    @property
    def rows(self) -> int:
        """Rows of a tile (and of a split-KV workspace slot)."""
        return self.block_q * self.gqa

    @property
    def cube_rows(self) -> int:
        """The Matmul base M: rows padded to the cube fractal."""
        return _ceil(self.rows, _FRACTAL)

    @property
    def stat_len(self) -> int:
        """Floats per per-row statistic (rows padded to a 32-byte block)."""
        return _ceil(self.rows, _BLOCK_BYTES // 4)

    @property
    def workspace_elems(self) -> int:
        """Elements (of the input dtype) of one program's GM workspace: Q tile + P tile."""
        return self.rows * self.head_dim + self.rows * self.block_kv

    def main_buffers(self) -> tuple[UbBuffer, ...]:
        """The meta-attention kernel's UB buffers, in InitBuffer order."""
        d, n, m, e = self.head_dim, self.block_kv, self.rows, self.esize
        # GetTensorC writes a whole baseM x baseN block (CANN: "the C matrix must hold at least
        # baseM * baseN"), and the cube's base M is the rows padded to its 16-row fractal.
        cm = self.cube_rows
        reduce_len = _ceil(max(n, d), _BLOCK_BYTES // 4)
        vecin, vecout = "TQue<TPosition::VECIN, {}>", "TQue<TPosition::VECOUT, {}>"
        calc = "TBuf<TPosition::VECCALC>"
        # One chunk's bias for every tile row, laid out like the S tile it is added to.
        bias = (UbBuffer("biasQue", vecin.format(1), 1, m * n * 4,
                         "attn_bias of a chunk (float, row stride BLOCK_KV)"),) if self.bias else ()
        alibi = (UbBuffer("alibiBuf", calc, 1, 2 * n * 4,
                          "ALiBi: the column offsets 0 .. BLOCK_KV - 1, then one row's term"),) if self.alibi else ()
        return (
            UbBuffer("queryQue", vecin.format(1), 1, m * d * e, "Q tile staged from GM"),
            UbBuffer("kvQue", vecin.format("BUFFER_NUM"), BUFFER_NUM, n * d * e,
                     "K / V chunks of the 2-stage (decode) pipeline"),
            UbBuffer("scoreQue", vecin.format("BUFFER_NUM"), BUFFER_NUM, cm * n * 4,
                     "S tiles (float, row stride BLOCK_KV; CUBE_ROWS rows for GetTensorC)"),
            *bias,
            UbBuffer("probQue", vecout.format("BUFFER_NUM"), BUFFER_NUM, m * n * e,
                     "P tiles on their way to the GM workspace"),
            UbBuffer("valueQue", vecin.format(1), 1, cm * d * 4, "P V from the cube (float; CUBE_ROWS rows for GetTensorC)"),
            UbBuffer("outQue", vecout.format(1), 1, m * d * e, "the output tile, cast"),
            UbBuffer("accBuf", calc, 1, m * d * 4, "the output accumulator (float)"),
            UbBuffer("queryFloatBuf", calc, 1, self.gqa * d * 4, "decode: the query rows in float"),
            UbBuffer("kvFloatBuf", calc, 1, n * d * 4, "decode: the K or V chunk in float"),
            UbBuffer("productBuf", calc, 1, d * 4, "decode: one GEMV product row"),
            UbBuffer("statBuf", calc, 1, len(self.main_stat_names()) * self.stat_len * 4,
                     "per-row softmax statistics"),
            UbBuffer("reduceWorkBuf", calc, 1, reduce_len * 4, "ReduceMax/ReduceSum scratch"),
            UbBuffer("reduceOutBuf", calc, 1, _BLOCK_BYTES, "ReduceMax/ReduceSum result"),
            *alibi,
        )

    def merge_buffers(self) -> tuple[UbBuffer, ...]:
        """The merge kernel's UB buffers, in InitBuffer order."""
        d, m, e = self.head_dim, self.rows, self.esize
        return (
            UbBuffer("slotStatQue", "TQue<TPosition::VECIN, BUFFER_NUM>", BUFFER_NUM, 2 * self.stat_len * 4,
                     "a slot's max and sum per row"),
            UbBuffer("partQue", "TQue<TPosition::VECIN, BUFFER_NUM>", BUFFER_NUM, m * d * 4,
                     "a slot's normalized partial output"),
            UbBuffer("outQue", "TQue<TPosition::VECOUT, 1>", 1, m * d * e, "the output tile, cast"),
            UbBuffer("accBuf", "TBuf<TPosition::VECCALC>", 1, m * d * 4, "the merged accumulator"),
            UbBuffer("statBuf", "TBuf<TPosition::VECCALC>", 1, len(self.merge_stat_names()) * self.stat_len * 4,
                     "per-row merge statistics"),
        )

    def main_stat_names(self) -> tuple[str, ...]:
        """The main kernel's per-row statistics, in statBuf order (each `stat_len` floats)."""
        return (_MAIN_STAT_NAMES + (("sinkWeight",) if self.sinks else ())
                + (("rowSlope",) if self.alibi else ()))

    def merge_stat_names(self) -> tuple[str, ...]:
        """The merge kernel's per-row statistics, in statBuf order."""
        return _MERGE_STAT_NAMES + (("sinkWeight",) if self.sinks else ())


# Per-row statistics every kernel has (`AttentionLayout.main_stat_names` / `merge_stat_names`
# add those of the spec's features).
_MAIN_STAT_NAMES = ("rowMax", "rowSum", "chunkMax", "chunkSum", "newMax", "refMax", "alpha",
                    "safeSum", "invSum")
_MERGE_STAT_NAMES = ("runMax", "runSum", "newMax", "refMax", "alpha", "weight", "safeSum", "invSum")


def _check_budget(spec: KernelSpec, kernel: str, buffers: Sequence[UbBuffer]) -> None:
    """ValueError when `buffers` do not fit the UB, listing what takes the room."""
    total = sum(b.total for b in buffers)
    if total > UB_BYTES:
        biggest = sorted(buffers, key=lambda b: -b.total)[:4]
        detail = ", ".join(f"{b.member} {b.num} x {b.nbytes} B ({b.purpose})" for b in biggest)
        raise ValueError(
            f"spec {spec.name}: the {kernel} kernel needs {total} bytes of unified buffer, more "
            f"than the {UB_BYTES} (192 KiB) of an AI core; largest: {detail}. Use a smaller "
            f"block_q, block_kv or head_dim"
        )


def _check_cube(spec: KernelSpec, what: str, base_m: int, base_n: int, base_k: int, esize: int) -> None:
    """ValueError when one Matmul base block overflows the cube's L0 buffers (as matmul_tiling)."""
    for name, size, limit in (("L0A", base_m * base_k * esize, L0AB_BYTES),
                              ("L0B", base_n * base_k * esize, L0AB_BYTES),
                              ("L0C", base_m * base_n * 4, L0C_BYTES)):
        if size > limit:
            raise ValueError(
                f"spec {spec.name}: the cube's {what} base block {base_m} x {base_n} x {base_k} "
                f"needs {size} bytes of {name}, more than its {limit}; use a smaller block_q, "
                f"block_kv or head_dim"
            )


def attention_layout(spec: KernelSpec) -> AttentionLayout:
    """Validate a ``meta_attention`` spec for the Ascend C kernel and derive its static layout.

    Beyond the target-neutral checks (`tileflow.attention_inputs.attention_params`):
    ``head_dim`` a multiple of 32 bytes of the input dtype (16 for fp16/bf16, 8 for fp32) so that
    every tile row starts 32-byte aligned for the vector unit and DataCopy; ``block_kv`` a
    multiple of 16; both kernels' buffers (with ``bias=True``, the bias tile too) must fit the
    192 KiB UB and each cube base block the L0 buffers.

    Raises ValueError saying what to change.
    """
    params = attention_params(spec, target="Ascend C", supported_dtypes=SUPPORTED_DTYPES,
                              default_block_kv=_DEFAULT_BLOCK_KV)
    esize = _ELEMENT_BYTES[spec.dtype]
    align = _BLOCK_BYTES // esize
    if params.head_dim % align:
        raise ValueError(
            f"spec {spec.name}: head_dim={params.head_dim} must be a multiple of {align} for "
            f"{spec.dtype} on Ascend (tile rows must start 32-byte aligned in the unified buffer)"
        )
    if params.block_kv % _FRACTAL:
        raise ValueError(
            f"spec {spec.name}: block_kv={params.block_kv} must be a multiple of {_FRACTAL} on "
            f"Ascend (the cube's fractal; score rows must start 32-byte aligned)"
        )
    layout = AttentionLayout(params=params, dtype=spec.dtype, ctype=cpp_type(spec.dtype), esize=esize)
    _check_budget(spec, "meta-attention", layout.main_buffers())
    _check_budget(spec, "split-KV merge", layout.merge_buffers())
    _check_cube(spec, "S = Q K^T", layout.cube_rows, layout.block_kv, layout.head_dim, esize)
    _check_cube(spec, "O = P V", layout.cube_rows, layout.head_dim, layout.block_kv, esize)
    return layout


def task_pipeline(task: Sequence[int], block_kv: int, block_size: int) -> str:
    """Which pipeline the kernel runs for one task-table row: "2-stage", "3-stage" or "4-stage".

    Mirrors the kernel's run-time choice: one query position -> 2-stage (decode); a KV range that
    is a single chunk (no longer than block_kv and inside one page) -> 3-stage; else 4-stage. (A
    bias kernel first narrows the range to its bias ranges, a key-starts kernel to its tile's
    earliest start; this row shows neither.)
    """
    q_rows, kv_start, kv_end = task[3], task[4], task[5]
    if q_rows == 1:
        return "2-stage"
    first_chunk = min(block_kv, block_size - kv_start % block_size, kv_end - kv_start)
    return "3-stage" if kv_end - kv_start <= first_chunk else "4-stage"


# --------------------------------------------------------------------------------------------
# Source rendering
# --------------------------------------------------------------------------------------------


def attention_entries(spec: KernelSpec) -> tuple[EntryPoint, EntryPoint]:
    """The two `__global__` kernels: meta-attention (`<ident>`) and its merge (`<ident>_merge`)."""
    layout = attention_layout(spec)
    ident = kernel_ident(spec)
    main = ["q", "k_cache", "v_cache", "block_table", "cu_seqlens_q", "seqlens_kv",
            "tasks", "program_offsets", "program_tasks"]
    if layout.tree:
        main.append("tree_mask")
    if layout.bias:
        main += ["attn_bias", "attn_bias_ranges"]
    if layout.key_starts:
        main.append("key_starts")
    sinks = ["sinks"] if layout.sinks else []
    main += sinks
    if layout.alibi:
        main.append("alibi_slopes")
    # sys_workspace: the Matmul API's system workspace (GetLibApiWorkSpaceSize() bytes of GM).
    main += ["out", "partial_out", "partial_stats", "workspace", "sys_workspace", "tiling"]
    return (
        EntryPoint(ident, tuple(main), outputs=("out", "partial_out", "partial_stats", "workspace", "sys_workspace")),
        EntryPoint(f"{ident}_merge",
                   ("out", "partial_out", "partial_stats", "merges", "cu_seqlens_q", *sinks, "tiling"),
                   outputs=("out",)),
    )


def _fill(template: str, **values: Any) -> str:
    """`string.Template` substitution ($name): C++ is full of braces, so no str.format."""
    return Template(template).substitute(**values)


_TILING_HEADER = """\
$banner
#ifndef ${guard}
#define ${guard}

#include "kernel_tiling/kernel_tiling.h"

// One launch's tiling: computed on the host by ${ident}_tiling(), copied to GM, read by both
// kernels. A POD of 32-bit words (the kernels copy it word by word).
struct ${struct} {
    TCubeTiling qkTiling;  // cube: S = Q K^T  (M = tile rows, N = KV chunk, K = head_dim)
    TCubeTiling pvTiling;  // cube: O = P V    (M = tile rows, N = head_dim, K = KV chunk)
    int32_t numSeqs;       // S
    int32_t numQHeads;     // Hq
    int32_t numKvHeads;    // Hkv
    int32_t blockSize;     // KV positions per cache page
    int32_t maxBlocks;     // block_table columns
    int32_t numBlocks;     // cache pages
    int32_t totalQ;        // query tokens of the batch
    int32_t numTasks;      // task-table rows
    int32_t numSlots;      // split-KV workspace slots
    int32_t numMerges;     // merge-table rows
    int32_t numPrograms;   // P: the static grid of the task table
    int32_t treeSize;      // T of tree_mask [S, T, T] (0 without a tree)
    int32_t window;        // sliding window (0 without one)
${bias_fields}${starts_field}    float scale;           // softmax scale
${softcap_field}};

#endif  // ${guard}
"""


# The tiling fields of a bias kernel: where a bias row starts (element strides of attn_bias, 0 on
# a broadcast dim; a row's keys are contiguous) and how many elements the kernel may address.
_BIAS_FIELDS = (
    "    int32_t biasStrideSeq;   // attn_bias row (seq, head, q_index) starts at seq * biasStrideSeq\n"
    "    int32_t biasStrideHead;  //   + head * biasStrideHead + q_index * biasStrideRow (elements,\n"
    "    int32_t biasStrideRow;   //   0 on a broadcast dim); its keys are contiguous\n"
    "    int32_t biasElems;       // attn_bias elements the kernel may address\n"
    "    int32_t rangeRows;       // attn_bias_ranges: int32 [numSeqs, rangeRows, 4], dense\n"
)
_BIAS_NAMES = ("biasStrideSeq", "biasStrideHead", "biasStrideRow", "biasElems", "rangeRows")

# The tiling field of a key-starts kernel: the row length of its key_starts (the launch's may be
# wider than the batch's longest query run).
_STARTS_FIELD = "    int32_t startsRows;    // key_starts: int32 [numSeqs, startsRows], dense\n"


def _tiling_header(spec: KernelSpec, layout: AttentionLayout, ident: str) -> str:
    return _fill(_TILING_HEADER, banner=banner(spec, "Tiling struct (host and kernel)"),
                 guard=f"{ident.upper()}_TILING_H", ident=ident, struct=tiling_struct_name(ident),
                 bias_fields=_BIAS_FIELDS if layout.bias else "",
                 starts_field=_STARTS_FIELD if layout.key_starts else "",
                 softcap_field=("    float softcap;         // logit soft-cap c: scores become c * tanh(s / c)\n"
                                if layout.softcap else ""))


# The kernel file: shared helpers, the meta-attention class, the merge class and both entries.
_KERNEL_TEMPLATE = """\
$banner
// XY-Serve Meta-Attention over a paged KV cache, driven by tileflow's host-built task table.
//   out[t, h] = softmax(scale * q[t, h] . K[seq, h / GQA]^T | mask) @ V[seq, h / GQA]
//   mask: $mask_doc
// Pipelines, picked per task at run time:
//   2-stage (one query position: decode)   K/V stream into UB; QK^T and PV as vector GEMVs
//   3-stage (KV range is one chunk)        QK^T (cube) -> softmax (vector) -> PV (cube)
//   4-stage (longer KV ranges)             QK^T -> softmax -> PV -> Update (online rescale)
// The cube and the vector unit share no datapath: Q and P reach the cube through this core's
// GM workspace; K and V are read by the cube in place from the cache.
#include "kernel_operator.h"
#include "lib/matmul_intf.h"
#include "${ident}_tiling.h"

using namespace AscendC;

namespace ${ident}_impl {

using T = ${ctype};  // q / k / v / out element type

// Query heads per KV head, packed into tile rows: row r is position r / GQA, head r % GQA.
constexpr int32_t GQA = ${gqa};
constexpr int32_t HEAD_DIM = ${head_dim};
// Query positions per tile, and the tile's rows.
constexpr int32_t BLOCK_Q = ${block_q};
constexpr int32_t TILE_ROWS = BLOCK_Q * GQA;
// KV positions per chunk (a chunk also stops at a page end, so it never crosses a page).
constexpr int32_t BLOCK_KV = ${block_kv};
// Per-row statistics take STAT_LEN floats: TILE_ROWS padded to 32 bytes.
constexpr int32_t STAT_LEN = ${stat_len};
// Depth of the streamed K/V/S/P queues: double buffering.
constexpr int32_t BUFFER_NUM = ${buffer_num};
// Vector operands start on 32-byte boundaries: 8 floats.
constexpr int32_t FLOATS_PER_BLOCK = 8;
// Task-table columns: seq, kv_head, q_start, q_rows, kv_start, kv_end, slot, cost.
constexpr int32_t TASK_COLS = ${task_cols};
// Merge-table columns: seq, kv_head, q_start, q_rows, first_slot, num_slots.
constexpr int32_t MERGE_COLS = ${merge_cols};
constexpr float NEG_INF = -__builtin_huge_valf();

using Tiling = ${struct};

// Cube operand types: A (Q or P) and B (K transposed, or V) straight from GM, C into UB.
using QueryType = matmul::MatmulType<TPosition::GM, matmul::CubeFormat::ND, T>;
using KeyType = matmul::MatmulType<TPosition::GM, matmul::CubeFormat::ND, T, true>;
using ProbType = matmul::MatmulType<TPosition::GM, matmul::CubeFormat::ND, T>;
using ValueType = matmul::MatmulType<TPosition::GM, matmul::CubeFormat::ND, T>;
using AccType = matmul::MatmulType<TPosition::VECIN, matmul::CubeFormat::ND, float>;

// The tiling lives in GM; copy it to the core's scalar memory word by word.
__aicore__ inline void LoadTiling(GM_ADDR tiling, Tiling& t)
{
    const __gm__ uint32_t* src = reinterpret_cast<const __gm__ uint32_t*>(tiling);
    uint32_t* dst = reinterpret_cast<uint32_t*>(&t);
    for (uint32_t i = 0; i < sizeof(Tiling) / sizeof(uint32_t); ++i) {
        dst[i] = src[i];
    }
}

${convert_helpers}
// Hide columns [from, to) of one score row (clipped to [0, len)): set them to -inf. Vector
// instructions need a 32-byte aligned start, so the unaligned head goes element by element and
// the rest in one Duplicate.
__aicore__ inline void HideColumns(const LocalTensor<float>& row, int32_t from, int32_t to, int32_t len)
{
    from = from < 0 ? 0 : from;
    to = to > len ? len : to;
    if (from >= to) {
        return;
    }
    int32_t aligned = (from + FLOATS_PER_BLOCK - 1) / FLOATS_PER_BLOCK * FLOATS_PER_BLOCK;
    aligned = aligned > to ? to : aligned;
    for (int32_t c = from; c < aligned; ++c) {
        row.SetValue(c, NEG_INF);
    }
    if (aligned < to) {
        Duplicate(row[aligned], NEG_INF, to - aligned);
    }
}

// Per-row reference for exp(): the running max, or 0 for a row that has seen no visible key yet
// (max -inf), so that exp sees -inf - 0 (-> 0) and never -inf - -inf (NaN).
__aicore__ inline void ReferenceMax(const LocalTensor<float>& ref, const LocalTensor<float>& max, int32_t rows)
{
    for (int32_t r = 0; r < rows; ++r) {
        const float m = max.GetValue(r);
        ref.SetValue(r, m == NEG_INF ? 0.0f : m);
    }
}

// acc[rows, HEAD_DIM] /= sum per row; rows with sum 0 (no visible key, acc == 0) stay 0.
__aicore__ inline void NormalizeRows(const LocalTensor<float>& acc, const LocalTensor<float>& sum,
                                     const LocalTensor<float>& safeSum, const LocalTensor<float>& invSum, int32_t rows)
{
    for (int32_t r = 0; r < rows; ++r) {
        const float l = sum.GetValue(r);
        safeSum.SetValue(r, l > 0.0f ? l : 1.0f);
    }
    // 1 / sum with Div: CANN documents Reciprocal's float results as less accurate than 1e-4.
    Duplicate(invSum, 1.0f, rows);
    Div(invSum, invSum, safeSum, rows);
    for (int32_t r = 0; r < rows; ++r) {
        const LocalTensor<float> accRow = acc[r * HEAD_DIM];
        Muls(accRow, accRow, invSum.GetValue(r), HEAD_DIM);
    }
}
${sinks_helper}
// Element offset of a tile's first output row: token firstToken, head kvHead * GQA.
__aicore__ inline uint64_t TileOffset(int32_t firstToken, int32_t kvHead, int32_t numQHeads)
{
    return (uint64_t(firstToken) * numQHeads + uint64_t(kvHead) * GQA) * HEAD_DIM;
}

// The GQA heads of one query position are contiguous (GQA * HEAD_DIM elements) in q and out;
// positions are numQHeads * HEAD_DIM apart: one strided copy of qRows blocks moves a tile.
__aicore__ inline DataCopyExtParams TileCopyParams(int32_t qRows, int32_t numQHeads, bool toGm)
{
    const uint32_t blockLen = GQA * HEAD_DIM * sizeof(T);
    const uint32_t gap = uint32_t(numQHeads - GQA) * HEAD_DIM * sizeof(T);
    return toGm ? DataCopyExtParams(uint16_t(qRows), blockLen, 0, gap, 0)
                : DataCopyExtParams(uint16_t(qRows), blockLen, gap, 0, 0);
}

// One task-table row plus what the kernel derives from the batch metadata.
struct Task {
    int32_t seq;
    int32_t kvHead;
    int32_t qStart;      // first query index of the tile, within the sequence
    int32_t qRows;       // query positions in the tile
    int32_t kvStart;     // KV range [kvStart, kvEnd), clipped on the host to what the tile sees
    int32_t kvEnd;
    int32_t slot;        // -1: write out; >= 0: split-KV workspace slot
    int32_t rows;        // qRows * GQA
    int32_t firstToken;  // global query row of the tile's first position
    int32_t newStart;    // KV position of the sequence's first new token
    bool treeApplies;    // tree verify: the tree mask covers the sequence's new tokens
${bias_task_fields}${starts_task_fields}};

class MetaAttention {
public:
    matmul::Matmul<QueryType, KeyType, AccType> qk;   // cube: S = Q K^T
    matmul::Matmul<ProbType, ValueType, AccType> pv;  // cube: O = P V

    __aicore__ inline MetaAttention() {}

    __aicore__ inline void Init(${main_init_params}, const Tiling& t, TPipe* pipe)
    {
        tiling = t;
        const uint64_t tokens = uint64_t(t.totalQ) * t.numQHeads * HEAD_DIM;
        const uint64_t cache = uint64_t(t.numBlocks) * t.blockSize * t.numKvHeads * HEAD_DIM;
        qGm.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(q), tokens);
        kGm.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(k_cache), cache);
        vGm.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(v_cache), cache);
        outGm.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(out), tokens);
        blockTableGm.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(block_table), uint64_t(t.numSeqs) * t.maxBlocks);
        cuSeqlensGm.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(cu_seqlens_q), uint64_t(t.numSeqs) + 1);
        seqlensKvGm.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(seqlens_kv), uint64_t(t.numSeqs));
        tasksGm.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(tasks), uint64_t(t.numTasks) * TASK_COLS);
        programOffsetsGm.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(program_offsets), uint64_t(t.numPrograms) + 1);
        programTasksGm.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(program_tasks), uint64_t(t.numTasks));
${tree_init}${bias_init}${starts_init}${sinks_init}${alibi_init}        // Split-KV workspace: slot s holds TILE_ROWS rows (float32) of output, then of max and of
        // sum, see TaskTable.workspace_shapes.
        partialOutGm.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(partial_out), uint64_t(t.numSlots) * TILE_ROWS * HEAD_DIM);
        partialStatsGm.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(partial_stats), uint64_t(t.numSlots) * 2 * TILE_ROWS);
        // This core's GM workspace: the dense Q tile, then the P tile (the cube's A operands).
        __gm__ T* mine = reinterpret_cast<__gm__ T*>(workspace) + uint64_t(GetBlockIdx()) * (TILE_ROWS * HEAD_DIM + TILE_ROWS * BLOCK_KV);
        queryWs.SetGlobalBuffer(mine, TILE_ROWS * HEAD_DIM);
        probWs.SetGlobalBuffer(mine + TILE_ROWS * HEAD_DIM, TILE_ROWS * BLOCK_KV);

${main_init_buffers}
        acc = accBuf.Get<float>();
        queryF = queryFloatBuf.Get<float>();
        kvF = kvFloatBuf.Get<float>();
        product = productBuf.Get<float>();
        reduceWork = reduceWorkBuf.Get<float>();
        reduceOut = reduceOutBuf.Get<float>();
        const LocalTensor<float> stats = statBuf.Get<float>();
${main_stats}${alibi_columns}    }

    // Run this program's tasks, in the order the host dealt them.
    __aicore__ inline void Process()
    {
        const int64_t program = GetBlockIdx();
        if (program < tiling.numPrograms) {
            const int32_t first = programOffsetsGm.GetValue(program);
            const int32_t last = programOffsetsGm.GetValue(program + 1);
            for (int32_t i = first; i < last; ++i) {
                RunTask(LoadTask(programTasksGm.GetValue(i)));
            }
        }
        qk.End();
        pv.End();
    }

private:
    __aicore__ inline Task LoadTask(int32_t index)
    {
        const uint64_t row = uint64_t(index) * TASK_COLS;
        Task t;
        t.seq = tasksGm.GetValue(row + 0);
        t.kvHead = tasksGm.GetValue(row + 1);
        t.qStart = tasksGm.GetValue(row + 2);
        t.qRows = tasksGm.GetValue(row + 3);
        t.kvStart = tasksGm.GetValue(row + 4);
        t.kvEnd = tasksGm.GetValue(row + 5);
        t.slot = tasksGm.GetValue(row + 6);
        t.rows = t.qRows * GQA;
        const int32_t seqBegin = cuSeqlensGm.GetValue(t.seq);
        const int32_t numNew = cuSeqlensGm.GetValue(t.seq + 1) - seqBegin;
        t.firstToken = seqBegin + t.qStart;
        t.newStart = seqlensKvGm.GetValue(t.seq) - numNew;  // the new tokens are the last numNew positions
        t.treeApplies = ${tree_applies};
${bias_clip}${starts_clip}        return t;
    }

    __aicore__ inline void RunTask(const Task& t)
    {
        // Every task starts from an empty softmax state: max -inf, sum 0, accumulator 0.
        Duplicate(rowMax, NEG_INF, STAT_LEN);
        Duplicate(rowSum, 0.0f, STAT_LEN);
        Duplicate(acc, 0.0f, t.rows * HEAD_DIM);
${alibi_task}        if (t.kvEnd > t.kvStart) {
            if (t.qRows == 1) {
                TwoStageDecode(t);
            } else if (t.kvEnd - t.kvStart <= ChunkLength(t, t.kvStart)) {
                ThreeStageSingleChunk(t);
            } else {
                FourStageMultiChunk(t);
            }
        }
        Finish(t);
    }

    // ---- pipeline 1: 2 stages (decode: one query position, GQA rows) -----------------------
    // Stage 1 (MTE2) streams a chunk's K and V into UB (two buffers: V loads while the scores
    // are computed); stage 2 (vector) computes the scores as GEMVs (Mul + ReduceSum per key),
    // the online softmax and P V (Muls + Add per value row). No cube, no workspace round trip.
    __aicore__ inline void TwoStageDecode(const Task& t)
    {
        LocalTensor<T> query = LoadQueryTile(t);
        WidenToFloat(queryF, query, t.rows * HEAD_DIM);
        queryQue.FreeTensor(query);
        for (int32_t pos = t.kvStart; pos < t.kvEnd;) {
            const int32_t chunkLen = ChunkLength(t, pos);
            const uint64_t offset = CacheOffset(t, pos);
            // Stage 1: K and V of the chunk (rows HEAD_DIM long, numKvHeads * HEAD_DIM apart).
            LoadKvChunk(kGm[offset], chunkLen);
            LoadKvChunk(vGm[offset], chunkLen);
${bias_load_decode}            // Stage 2: scores = q . k for every (row, key).
            LocalTensor<T> keys = kvQue.DeQue<T>();
            WidenToFloat(kvF, keys, chunkLen * HEAD_DIM);
            kvQue.FreeTensor(keys);
            LocalTensor<float> scores = scoreQue.AllocTensor<float>();
            for (int32_t r = 0; r < t.rows; ++r) {
                for (int32_t j = 0; j < chunkLen; ++j) {
                    Mul(product, queryF[r * HEAD_DIM], kvF[j * HEAD_DIM], HEAD_DIM);
                    ReduceSum(reduceOut, product, reduceWork, HEAD_DIM);
                    scores.SetValue(r * BLOCK_KV + j, reduceOut.GetValue(0));
                }
            }
            ScaleMaskSoftmax(t, scores, pos, chunkLen, true);
            // acc = acc * alpha + p . V, row by row.
            LocalTensor<T> values = kvQue.DeQue<T>();
            WidenToFloat(kvF, values, chunkLen * HEAD_DIM);
            kvQue.FreeTensor(values);
            for (int32_t r = 0; r < t.rows; ++r) {
                const LocalTensor<float> accRow = acc[r * HEAD_DIM];
                Muls(accRow, accRow, alpha.GetValue(r), HEAD_DIM);
                for (int32_t j = 0; j < chunkLen; ++j) {
                    Muls(product, kvF[j * HEAD_DIM], scores.GetValue(r * BLOCK_KV + j), HEAD_DIM);
                    Add(accRow, accRow, product, HEAD_DIM);
                }
            }
            scoreQue.FreeTensor(scores);
            pos += chunkLen;
        }
    }

    // ---- pipeline 2: 3 stages (the KV range is one chunk) ------------------------------------
    // QK^T (cube) -> softmax (vector, exact: the whole range is in UB) -> PV (cube). The cube's
    // P V is the accumulator as it is: no rescale.
    __aicore__ inline void ThreeStageSingleChunk(const Task& t)
    {
        QueryToWorkspace(t);
        const int32_t chunkLen = t.kvEnd - t.kvStart;
        const uint64_t offset = CacheOffset(t, t.kvStart);
${bias_load_single}        LocalTensor<float> scores = ScoresOnCube(t, offset, chunkLen);    // stage 1
        ScaleMaskSoftmax(t, scores, t.kvStart, chunkLen, false);          // stage 2
        ProbabilitiesToWorkspace(t, scores);
        LocalTensor<float> values = ValuesOnCube(t, offset, chunkLen);    // stage 3
        DataCopy(acc, values, t.rows * HEAD_DIM);
        valueQue.FreeTensor(values);
    }

    // ---- pipeline 3: 4 stages (KV ranges longer than one chunk) ------------------------------
    // Per chunk: QK^T (cube) -> online softmax (vector) -> PV (cube) -> Update (vector):
    // acc = acc * alpha + P V, alpha = exp(old max - new max) per row.
    __aicore__ inline void FourStageMultiChunk(const Task& t)
    {
        QueryToWorkspace(t);
        for (int32_t pos = t.kvStart; pos < t.kvEnd;) {
            const int32_t chunkLen = ChunkLength(t, pos);
            const uint64_t offset = CacheOffset(t, pos);
${bias_load_multi}            LocalTensor<float> scores = ScoresOnCube(t, offset, chunkLen);  // stage 1
            ScaleMaskSoftmax(t, scores, pos, chunkLen, true);               // stage 2
            ProbabilitiesToWorkspace(t, scores);
            LocalTensor<float> values = ValuesOnCube(t, offset, chunkLen);  // stage 3
            for (int32_t r = 0; r < t.rows; ++r) {                          // stage 4: update
                const LocalTensor<float> accRow = acc[r * HEAD_DIM];
                Muls(accRow, accRow, alpha.GetValue(r), HEAD_DIM);
            }
            Add(acc, acc, values, t.rows * HEAD_DIM);
            valueQue.FreeTensor(values);
            pos += chunkLen;
        }
    }

    // ---- KV chunks ----------------------------------------------------------------------------
    // A chunk stops at BLOCK_KV positions, at the end of the page and at the end of the range, so
    // its K/V rows are equally spaced in the cache.
    __aicore__ inline int32_t ChunkLength(const Task& t, int32_t pos) const
    {
        const int32_t pageLeft = tiling.blockSize - pos % tiling.blockSize;
        int32_t len = t.kvEnd - pos;
        len = len > BLOCK_KV ? BLOCK_KV : len;
        return len > pageLeft ? pageLeft : len;
    }

    // Element offset of (position pos, the task's KV head) in a paged cache:
    // page block_table[seq, pos / blockSize], row pos % blockSize.
    __aicore__ inline uint64_t CacheOffset(const Task& t, int32_t pos) const
    {
        const int32_t page = blockTableGm.GetValue(uint64_t(t.seq) * tiling.maxBlocks + pos / tiling.blockSize);
        const uint64_t cacheRow = uint64_t(page) * tiling.blockSize + pos % tiling.blockSize;
        return (cacheRow * tiling.numKvHeads + t.kvHead) * HEAD_DIM;
    }

    __aicore__ inline void LoadKvChunk(const GlobalTensor<T>& src, int32_t chunkLen)
    {
        LocalTensor<T> chunk = kvQue.AllocTensor<T>();
        const uint32_t rowBytes = HEAD_DIM * sizeof(T);
        const uint32_t gap = uint32_t(tiling.numKvHeads - 1) * rowBytes;
        DataCopyPad(chunk, src, DataCopyExtParams(uint16_t(chunkLen), rowBytes, gap, 0, 0),
                    DataCopyPadExtParams<T>(false, 0, 0, T(0.0f)));
        kvQue.EnQue(chunk);
    }

    // ---- Q and P through the GM workspace (the cube's A operands) ---------------------------
    __aicore__ inline LocalTensor<T> LoadQueryTile(const Task& t)
    {
        LocalTensor<T> query = queryQue.AllocTensor<T>();
        DataCopyPad(query, qGm[TileOffset(t.firstToken, t.kvHead, tiling.numQHeads)],
                    TileCopyParams(t.qRows, tiling.numQHeads, false), DataCopyPadExtParams<T>(false, 0, 0, T(0.0f)));
        queryQue.EnQue(query);
        return queryQue.DeQue<T>();
    }

    __aicore__ inline void QueryToWorkspace(const Task& t)
    {
        LocalTensor<T> query = LoadQueryTile(t);
        DataCopy(queryWs, query, t.rows * HEAD_DIM);  // dense [rows, HEAD_DIM]
        queryQue.FreeTensor(query);
        PipeBarrier<PIPE_ALL>();  // the cube reads the tile from GM next
    }

    __aicore__ inline void ProbabilitiesToWorkspace(const Task& t, LocalTensor<float>& scores)
    {
        LocalTensor<T> probs = probQue.AllocTensor<T>();
        NarrowFromFloat(probs, scores, t.rows * BLOCK_KV);  // P in the cube's input type
        scoreQue.FreeTensor(scores);
        probQue.EnQue(probs);
        probs = probQue.DeQue<T>();
        DataCopy(probWs, probs, t.rows * BLOCK_KV);  // [rows, BLOCK_KV]; columns >= chunkLen unread
        probQue.FreeTensor(probs);
        PipeBarrier<PIPE_ALL>();  // the cube reads P from GM next
    }

    // ---- cube stages --------------------------------------------------------------------------
    // S[rows, chunkLen] = Q K^T: K rows are numKvHeads * HEAD_DIM apart (B transposed, orgKb).
    __aicore__ inline LocalTensor<float> ScoresOnCube(const Task& t, uint64_t offset, int32_t chunkLen)
    {
        qk.SetOrgShape(t.rows, chunkLen, HEAD_DIM, tiling.numKvHeads * HEAD_DIM);
        qk.SetSingleShape(t.rows, chunkLen, HEAD_DIM);
        qk.SetTensorA(queryWs);
        qk.SetTensorB(kGm[offset], true);
        LocalTensor<float> scores = scoreQue.AllocTensor<float>();
        while (qk.Iterate()) {
            qk.GetTensorC(scores);  // row stride baseN = BLOCK_KV
        }
        scoreQue.EnQue(scores);
        return scoreQue.DeQue<float>();
    }

    // O[rows, HEAD_DIM] = P V: P rows BLOCK_KV apart (orgKa), V rows numKvHeads * HEAD_DIM apart (orgN).
    __aicore__ inline LocalTensor<float> ValuesOnCube(const Task& t, uint64_t offset, int32_t chunkLen)
    {
        pv.SetOrgShape(t.rows, tiling.numKvHeads * HEAD_DIM, BLOCK_KV, chunkLen, HEAD_DIM);
        pv.SetSingleShape(t.rows, HEAD_DIM, chunkLen);
        pv.SetTensorA(probWs);
        pv.SetTensorB(vGm[offset]);
        LocalTensor<float> values = valueQue.AllocTensor<float>();
        while (pv.Iterate()) {
            pv.GetTensorC(values);  // row stride baseN = HEAD_DIM: dense [rows, HEAD_DIM]
        }
        valueQue.EnQue(values);
        return valueQue.DeQue<float>();
    }

    // ---- vector stage: scale, mask, softmax ---------------------------------------------------
    // In place: scores (row stride BLOCK_KV, columns [0, chunkLen)) become exp(s - reference max).
    // online keeps the running statistics across chunks and leaves each row's rescale factor for
    // what was accumulated before in alpha; otherwise the chunk is the whole range.
    __aicore__ inline void ScaleMaskSoftmax(const Task& t, const LocalTensor<float>& scores, int32_t chunkStart,
                                            int32_t chunkLen, bool online)
    {
${scale_scores}${alibi_call}${bias_add_call}${mask_call}        for (int32_t r = 0; r < t.rows; ++r) {
            ReduceMax(reduceOut, scores[r * BLOCK_KV], reduceWork, chunkLen);
            chunkMax.SetValue(r, reduceOut.GetValue(0));
        }
        if (online) {
            Max(newMax, rowMax, chunkMax, t.rows);
        } else {
            DataCopy(newMax, chunkMax, STAT_LEN);
        }
        ReferenceMax(refMax, newMax, t.rows);
        for (int32_t r = 0; r < t.rows; ++r) {
            const LocalTensor<float> row = scores[r * BLOCK_KV];
            Adds(row, row, -refMax.GetValue(r), chunkLen);
            Exp(row, row, chunkLen);  // masked columns: exp(-inf) = 0
            ReduceSum(reduceOut, row, reduceWork, chunkLen);
            chunkSum.SetValue(r, reduceOut.GetValue(0));
        }
        if (online) {
            // alpha = exp(old max - new reference): 0 before a row's first visible key.
            Sub(alpha, rowMax, refMax, t.rows);
            Exp(alpha, alpha, t.rows);
            Mul(rowSum, rowSum, alpha, t.rows);
            Add(rowSum, rowSum, chunkSum, t.rows);
        } else {
            DataCopy(rowSum, chunkSum, STAT_LEN);
        }
        DataCopy(rowMax, newMax, STAT_LEN);
    }
${mask_function}${bias_functions}${alibi_function}
    // ---- finish: normalize, then the output or a split-KV slot -------------------------------
    __aicore__ inline void Finish(const Task& t)
    {
${main_sinks}        NormalizeRows(acc, rowSum, safeSum, invSum, t.rows);
        if (t.slot < 0) {
            LocalTensor<T> tile = outQue.AllocTensor<T>();
            NarrowFromFloat(tile, acc, t.rows * HEAD_DIM);
            outQue.EnQue(tile);
            tile = outQue.DeQue<T>();
            DataCopyPad(outGm[TileOffset(t.firstToken, t.kvHead, tiling.numQHeads)], tile,
                        TileCopyParams(t.qRows, tiling.numQHeads, true));
            outQue.FreeTensor(tile);
        } else {
            // Split-KV chunk: the normalized partial output and the rows' max and sum, kept apart
            // (max -inf and sum 0 for a row with no visible key): one LSE, m + ln(l), would round
            // ln(l) away next to the -3e38 of a finfo.min mask, and with it the chunk's key count.
            const uint64_t stats = uint64_t(t.slot) * 2 * TILE_ROWS;
            DataCopy(partialOutGm[uint64_t(t.slot) * TILE_ROWS * HEAD_DIM], acc, t.rows * HEAD_DIM);
            DataCopyPad(partialStatsGm[stats], rowMax, DataCopyExtParams(1, uint32_t(t.rows) * sizeof(float), 0, 0, 0));
            DataCopyPad(partialStatsGm[stats + TILE_ROWS], rowSum,
                        DataCopyExtParams(1, uint32_t(t.rows) * sizeof(float), 0, 0, 0));
        }
    }

    Tiling tiling;
    GlobalTensor<T> qGm, kGm, vGm, outGm, queryWs, probWs;
    GlobalTensor<int32_t> blockTableGm, cuSeqlensGm, seqlensKvGm, tasksGm, programOffsetsGm, programTasksGm;
${tree_member}${bias_member}${starts_member}${sinks_member}${alibi_member}    GlobalTensor<float> partialOutGm, partialStatsGm;
${main_buffer_members}
    LocalTensor<float> acc, queryF, kvF, product, reduceWork, reduceOut;
${alibi_locals}    LocalTensor<float> ${main_stat_members};
};

// Split-KV merge: one merge-table row per iteration (rows dealt over the blocks), log-sum-exp
// rule against the running max: out = sum_k w_k o_k / sum_k w_k, w_k = sum_k * exp(max_k - max).
class MetaAttentionMerge {
public:
    __aicore__ inline MetaAttentionMerge() {}

    __aicore__ inline void Init(${merge_init_params}, const Tiling& t, TPipe* pipe)
    {
        tiling = t;
        outGm.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(out), uint64_t(t.totalQ) * t.numQHeads * HEAD_DIM);
        partialOutGm.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(partial_out), uint64_t(t.numSlots) * TILE_ROWS * HEAD_DIM);
        partialStatsGm.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(partial_stats), uint64_t(t.numSlots) * 2 * TILE_ROWS);
        mergesGm.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(merges), uint64_t(t.numMerges) * MERGE_COLS);
        cuSeqlensGm.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(cu_seqlens_q), uint64_t(t.numSeqs) + 1);
${sinks_init}${merge_init_buffers}
        acc = accBuf.Get<float>();
        const LocalTensor<float> stats = statBuf.Get<float>();
${merge_stats}    }

    __aicore__ inline void Process()
    {
        for (int64_t g = GetBlockIdx(); g < tiling.numMerges; g += GetBlockNum()) {
            MergeTile(g);
        }
    }

private:
    __aicore__ inline void MergeTile(int64_t g)
    {
        const uint64_t row = uint64_t(g) * MERGE_COLS;
        const int32_t seq = mergesGm.GetValue(row + 0);
        const int32_t kvHead = mergesGm.GetValue(row + 1);
        const int32_t qStart = mergesGm.GetValue(row + 2);
        const int32_t qRows = mergesGm.GetValue(row + 3);
        const int32_t firstSlot = mergesGm.GetValue(row + 4);
        const int32_t numSlots = mergesGm.GetValue(row + 5);
        const int32_t rows = qRows * GQA;
        Duplicate(runMax, NEG_INF, STAT_LEN);
        Duplicate(runSum, 0.0f, STAT_LEN);
        Duplicate(acc, 0.0f, rows * HEAD_DIM);
        for (int32_t k = 0; k < numSlots; ++k) {
            const uint64_t slot = uint64_t(firstSlot) + k;
            // Stage 1: the slot's max, sum and partial output stream in (double-buffered queues).
            LocalTensor<float> slotStats = slotStatQue.AllocTensor<float>();
            const DataCopyExtParams statRow(1, uint32_t(rows) * sizeof(float), 0, 0, 0);
            DataCopyPad(slotStats, partialStatsGm[slot * 2 * TILE_ROWS], statRow,
                        DataCopyPadExtParams<float>(false, 0, 0, 0.0f));
            DataCopyPad(slotStats[STAT_LEN], partialStatsGm[slot * 2 * TILE_ROWS + TILE_ROWS], statRow,
                        DataCopyPadExtParams<float>(false, 0, 0, 0.0f));
            slotStatQue.EnQue(slotStats);
            LocalTensor<float> part = partQue.AllocTensor<float>();
            DataCopy(part, partialOutGm[slot * TILE_ROWS * HEAD_DIM], rows * HEAD_DIM);
            partQue.EnQue(part);
            slotStats = slotStatQue.DeQue<float>();
            const LocalTensor<float> slotMax = slotStats;
            const LocalTensor<float> slotSum = slotStats[STAT_LEN];
            part = partQue.DeQue<float>();
            // Stage 2: fold the slot in. A row whose slot saw no key has max = -inf: weight 0, and
            // its partial output is never read (it is ignored even if it were NaN).
            Max(newMax, runMax, slotMax, rows);
            ReferenceMax(refMax, newMax, rows);
            Sub(alpha, runMax, refMax, rows);
            Exp(alpha, alpha, rows);
            Sub(weight, slotMax, refMax, rows);
            Exp(weight, weight, rows);
            Mul(weight, weight, slotSum, rows);
            for (int32_t r = 0; r < rows; ++r) {
                const LocalTensor<float> accRow = acc[r * HEAD_DIM];
                Muls(accRow, accRow, alpha.GetValue(r), HEAD_DIM);
                const float w = weight.GetValue(r);
                if (w > 0.0f) {
                    const LocalTensor<float> partRow = part[r * HEAD_DIM];
                    Muls(partRow, partRow, w, HEAD_DIM);
                    Add(accRow, accRow, partRow, HEAD_DIM);
                }
            }
            Mul(runSum, runSum, alpha, rows);
            Add(runSum, runSum, weight, rows);
            DataCopy(runMax, newMax, STAT_LEN);
            slotStatQue.FreeTensor(slotStats);
            partQue.FreeTensor(part);
        }
        // Stage 3: normalize, cast and store the tile's rows.
${merge_sinks}        NormalizeRows(acc, runSum, safeSum, invSum, rows);
        LocalTensor<T> tile = outQue.AllocTensor<T>();
        NarrowFromFloat(tile, acc, rows * HEAD_DIM);
        outQue.EnQue(tile);
        tile = outQue.DeQue<T>();
        const int32_t firstToken = cuSeqlensGm.GetValue(seq) + qStart;
        DataCopyPad(outGm[TileOffset(firstToken, kvHead, tiling.numQHeads)], tile,
                    TileCopyParams(qRows, tiling.numQHeads, true));
        outQue.FreeTensor(tile);
    }

    Tiling tiling;
    GlobalTensor<T> outGm;
    GlobalTensor<float> partialOutGm, partialStatsGm;
    GlobalTensor<int32_t> mergesGm, cuSeqlensGm;
${sinks_member}${merge_buffer_members}
    LocalTensor<float> acc;
    LocalTensor<float> ${merge_stat_members};
};

}  // namespace ${ident}_impl

extern "C" __global__ __aicore__ void ${ident}(${main_signature})
{
    ${ident}_impl::Tiling t;
    ${ident}_impl::LoadTiling(tiling, t);
    // The Matmul API's system workspace, allocated by the host: a <<<>>> launch built without
    // HAVE_WORKSPACE has no framework to set it, so the kernel does (before any Matmul call).
    SetSysWorkspace(sys_workspace);
    TPipe pipe;
    ${ident}_impl::MetaAttention op;
    // Both Matmul objects in one call, each with its tiling, before InitBuffer (op.Init).
    REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), op.qk, &t.qkTiling, op.pv, &t.pvTiling);
    op.Init(${main_init_args}, t, &pipe);
    op.Process();
}

extern "C" __global__ __aicore__ void ${ident}_merge(${merge_signature})
{
    ${ident}_impl::Tiling t;
    ${ident}_impl::LoadTiling(tiling, t);
    TPipe pipe;
    ${ident}_impl::MetaAttentionMerge op;
    op.Init(${merge_init_args}, t, &pipe);
    op.Process();
}

${launch_stubs}"""


def _mask_doc(layout: AttentionLayout) -> str:
    """The visibility rule (one line) and the bias (a second one), for the kernel's header comment."""
    parts = ["kv_pos <= q_pos (causal)" if layout.causal else "every kv_pos < seqlen_kv (not causal)"]
    if layout.sliding_window:
        parts.append("kv_pos > q_pos - window")
    if layout.key_starts:
        parts.append("kv_pos >= key_starts[seq, q_index] (sequences packed in a row)")
    if layout.tree:
        parts.append("tree_mask replaces that among the new tokens when n_s <= T")
    doc = "; ".join(parts)
    if layout.softcap:
        doc += "\n//   logit soft-capping: the scaled scores become softcap * tanh(s / softcap)"
    if layout.alibi:
        doc += "\n//   ALiBi: head h's score of key j for the query at position p gains alibi_slopes[h] * (j - p)"
    if layout.sinks:
        doc += "\n//   sinks: each head's logit sinks[h] joins every row's softmax as a key with no value"
    if layout.bias:
        doc += "\n//   bias: attn_bias[seq, head, q_index, kv_pos] is added to the scaled scores first (-inf hides a key)"
    return doc


def _convert_helpers(layout: AttentionLayout) -> str:
    """WidenToFloat / NarrowFromFloat: Cast for half/bf16; plain copies for float (no float->float Cast)."""
    if layout.dtype == "float32":
        body_w = "    DataCopy(dst, src, count);  // T is float: nothing to convert"
        body_n = body_w
    else:
        body_w = "    Cast(dst, src, RoundMode::CAST_NONE, count);  // exact"
        body_n = "    Cast(dst, src, RoundMode::CAST_RINT, count);  // round to nearest-even"
    return (
        "// Conversions between the input type and the float the vector math runs in.\n"
        "__aicore__ inline void WidenToFloat(const LocalTensor<float>& dst, const LocalTensor<T>& src, uint32_t count)\n"
        f"{{\n{body_w}\n}}\n\n"
        "__aicore__ inline void NarrowFromFloat(const LocalTensor<T>& dst, const LocalTensor<float>& src, uint32_t count)\n"
        f"{{\n{body_n}\n}}\n"
    )


def _mask_call(layout: AttentionLayout, has_mask: bool) -> str:
    """The `MaskScores` call of ScaleMaskSoftmax, or a note that no visibility rule applies."""
    if has_mask:
        return "        MaskScores(t, scores, chunkStart, chunkLen);\n"
    if layout.bias:
        return "        (void)chunkStart;  // no visibility rule: only the bias hides keys\n"
    return "        (void)chunkStart;  // this kernel hides nothing\n"


def _bias_load(indent: int, chunk_start: str, why: str) -> str:
    """A pipeline's `LoadBiasChunk` call (the chunk's length is always `chunkLen`), made only for
    chunks that need the bias (`AddBias` is called under the same condition)."""
    return (" " * indent + f"if (BiasApplies(t, {chunk_start}, chunkLen)) {{\n"
            + " " * (indent + 4) + f"LoadBiasChunk(t, {chunk_start}, chunkLen);  // {why}\n"
            + " " * indent + "}\n")


def _bias_code(layout: AttentionLayout) -> dict[str, str]:
    """The kernel template's bias substitutions: all empty without a bias, so a spec without one
    emits exactly the code it did before the bias path existed."""
    names = ("bias_init", "bias_load_decode", "bias_load_single", "bias_load_multi",
             "bias_add_call", "bias_functions", "bias_member", "bias_clip", "bias_task_fields")
    if not layout.bias:
        return dict.fromkeys(names, "")
    return {
        "bias_init": (
            "        // The model's additive bias (float): see LoadBiasChunk; and its per-row ranges.\n"
            "        biasGm.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(attn_bias), uint64_t(t.biasElems));\n"
            "        rangesGm.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(attn_bias_ranges),\n"
            "                                 uint64_t(t.numSeqs) * t.rangeRows * 4);\n"
        ),
        "bias_clip": _BIAS_CLIP,
        "bias_load_decode": _bias_load(12, "pos", "queued behind K and V on MTE2"),
        "bias_load_single": _bias_load(8, "t.kvStart", "MTE2, overlaps the cube's Q K^T"),
        "bias_load_multi": _bias_load(12, "pos", "MTE2, overlaps the cube's Q K^T"),
        # Before the mask: the visibility rules override the bias (a hidden key stays hidden even
        # where its bias is NaN or +inf), as in the reference backend.
        "bias_add_call": (
            "        if (BiasApplies(t, chunkStart, chunkLen)) {\n"
            "            AddBias(t, scores, chunkLen);  // before the mask, which overrides it\n"
            "        }\n"
        ),
        "bias_task_fields": (
            "    int32_t fullLo;      // keys [fullLo, fullHi) have a zero bias for every row of the tile\n"
            "    int32_t fullHi;\n"
        ),
        "bias_functions": _BIAS_FUNCTIONS,
        "bias_member": "    GlobalTensor<float> biasGm;\n    GlobalTensor<int32_t> rangesGm;\n",
    }


# The task's KV range narrowed to the keys some row of its tile sees (tileflow's bias_ranges:
# (lo, full_lo, full_hi, hi) per query row), so chunks the bias hides from every row are skipped;
# and the run of keys whose bias is zero for every row, whose chunks neither load nor add it.
_BIAS_CLIP = """\
        int32_t seenLo = t.kvEnd;
        int32_t seenHi = t.kvStart;
        t.fullLo = 0;
        t.fullHi = t.kvEnd;
        for (int32_t i = 0; i < t.qRows; ++i) {
            const uint64_t at = (uint64_t(t.seq) * tiling.rangeRows + uint64_t(t.qStart + i)) * 4;
            const int32_t lo = rangesGm.GetValue(at);
            const int32_t fullLo = rangesGm.GetValue(at + 1);
            const int32_t fullHi = rangesGm.GetValue(at + 2);
            const int32_t hi = rangesGm.GetValue(at + 3);
            seenLo = lo < seenLo ? lo : seenLo;
            seenHi = hi > seenHi ? hi : seenHi;
            t.fullLo = fullLo > t.fullLo ? fullLo : t.fullLo;
            t.fullHi = fullHi < t.fullHi ? fullHi : t.fullHi;
        }
        t.kvStart = seenLo > t.kvStart ? seenLo : t.kvStart;
        t.kvEnd = seenHi < t.kvEnd ? seenHi : t.kvEnd;
"""


_BIAS_FUNCTIONS = """
    // ---- the model's additive bias ------------------------------------------------------------
    // Whether chunk [chunkStart, chunkStart + chunkLen) needs the bias: not when it lies in the
    // tile's zero-bias run (a materialized causal mask: every chunk below the diagonal).
    __aicore__ inline bool BiasApplies(const Task& t, int32_t chunkStart, int32_t chunkLen) const
    {
        return chunkStart < t.fullLo || chunkStart + chunkLen > t.fullHi;
    }

    // Stage the bias of chunk [chunkStart, chunkStart + chunkLen) for every tile row into a
    // [rows, BLOCK_KV] tile laid out like S. Row r is query index qStart + r / GQA of the sequence,
    // head kvHead * GQA + r % GQA; the chunk's keys are contiguous in its bias row, so each row is
    // one DataCopyPad (its UB destination starts on a 32-byte boundary: BLOCK_KV is a multiple of 16).
    __aicore__ inline void LoadBiasChunk(const Task& t, int32_t chunkStart, int32_t chunkLen)
    {
        LocalTensor<float> bias = biasQue.AllocTensor<float>();
        const DataCopyExtParams rowCopy(1, uint32_t(chunkLen) * sizeof(float), 0, 0, 0);
        for (int32_t r = 0; r < t.rows; ++r) {
            const int32_t qIndex = t.qStart + r / GQA;
            const int32_t head = t.kvHead * GQA + r % GQA;
            const uint64_t rowStart = uint64_t(t.seq) * tiling.biasStrideSeq + uint64_t(head) * tiling.biasStrideHead
                                      + uint64_t(qIndex) * tiling.biasStrideRow;
            DataCopyPad(bias[r * BLOCK_KV], biasGm[rowStart + chunkStart], rowCopy,
                        DataCopyPadExtParams<float>(false, 0, 0, 0.0f));
        }
        biasQue.EnQue(bias);
    }

    // scores += bias, row by row over the chunk's columns (a -inf bias hides the key: exp gives 0,
    // and a row the bias hides entirely keeps max -inf, so it ends with sum 0 and outputs zeros).
    __aicore__ inline void AddBias(const Task& t, const LocalTensor<float>& scores, int32_t chunkLen)
    {
        LocalTensor<float> bias = biasQue.DeQue<float>();
        for (int32_t r = 0; r < t.rows; ++r) {
            Add(scores[r * BLOCK_KV], scores[r * BLOCK_KV], bias[r * BLOCK_KV], chunkLen);
        }
        biasQue.FreeTensor(bias);
    }
"""


def _key_starts_code(layout: AttentionLayout) -> dict[str, str]:
    """The kernel template's key-starts substitutions (the rule itself is in `MaskScores`): all
    empty without key starts, so a spec without them emits exactly the code it did before."""
    names = ("starts_init", "starts_member", "starts_clip", "starts_task_fields")
    if not layout.key_starts:
        return dict.fromkeys(names, "")
    return {
        "starts_init": (
            "        // Sequences packed in a row: each query row's first visible key, int32 [S, startsRows].\n"
            "        keyStartsGm.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(key_starts),\n"
            "                                    uint64_t(t.numSeqs) * t.startsRows);\n"
        ),
        "starts_member": "    GlobalTensor<int32_t> keyStartsGm;\n",
        "starts_clip": _STARTS_CLIP,
        "starts_task_fields": (
            "    int32_t startsHi;    // the latest key start of the tile's rows (at least kvStart): chunks\n"
            "                         // from it on need no key-start mask\n"
        ),
    }


# The task's KV range starts at the earliest key start of its tile's rows: no row sees a key
# before it (the host's table knows nothing of key starts). A range that ends before it becomes
# empty: an unsplit task writes zeros, a split-KV slot max -inf and sum 0, which the merge ignores.
# The latest start tells which chunks need the start rule at all (see MaskScores).
_STARTS_CLIP = """\
        // Key starts: no row of the tile sees a key before the earliest of its rows' starts.
        int32_t startsLo = t.kvEnd;
        t.startsHi = t.kvStart;
        for (int32_t i = 0; i < t.qRows; ++i) {
            const int32_t start = keyStartsGm.GetValue(uint64_t(t.seq) * tiling.startsRows + uint64_t(t.qStart + i));
            startsLo = start < startsLo ? start : startsLo;
            t.startsHi = start > t.startsHi ? start : t.startsHi;
        }
        t.kvStart = startsLo > t.kvStart ? startsLo : t.kvStart;
"""


def _feature_code(layout: AttentionLayout) -> dict[str, str]:
    """The kernel template's substitutions for logit soft-capping, attention sinks and ALiBi:
    the plain scale and empty strings without them, so a spec without them emits exactly the
    code it did before they existed."""
    def per_head(member: str, arg: str) -> str:
        """The Init line of a launch tensor of one float per query head."""
        return (f"        {member}.SetGlobalBuffer(reinterpret_cast<__gm__ float*>({arg}), "
                "uint64_t(t.numQHeads));  // float [Hq]\n")

    code = dict.fromkeys(("sinks_init", "sinks_member", "main_sinks", "merge_sinks", "sinks_helper",
                          "alibi_init", "alibi_member", "alibi_locals", "alibi_columns", "alibi_task",
                          "alibi_call", "alibi_function"), "")
    code["scale_scores"] = (
        # Tanh (CANN lib/math) takes no overlapping source and destination and there is no second
        # score-sized buffer: c * tanh(x) = c - 2c / (1 + exp(2x)) runs in place on basic ops, the
        # numerators a BLOCK_KV row of the reduction scratch (free here). Div, not Reciprocal,
        # which CANN documents as short of float accuracy.
        "        // Logit soft-capping, c * tanh(x) with x = scale * s / c, before ALiBi, the bias and the\n"
        "        // mask; as c - 2c / (1 + exp(2x)) (Tanh may not run in place).\n"
        "        Muls(scores, scores, 2.0f * tiling.scale / tiling.softcap, t.rows * BLOCK_KV);\n"
        "        Exp(scores, scores, t.rows * BLOCK_KV);\n"
        "        Adds(scores, scores, 1.0f, t.rows * BLOCK_KV);\n"
        "        Duplicate(reduceWork, -2.0f * tiling.softcap, BLOCK_KV);\n"
        "        for (int32_t r = 0; r < t.rows; ++r) {\n"
        "            Div(scores[r * BLOCK_KV], reduceWork, scores[r * BLOCK_KV], BLOCK_KV);\n"
        "        }\n"
        "        Adds(scores, scores, tiling.softcap, t.rows * BLOCK_KV);\n"
        if layout.softcap else "        Muls(scores, scores, tiling.scale, t.rows * BLOCK_KV);\n"
    )
    if layout.sinks or layout.alibi:
        code["sinks_helper"] = _ROW_VALUES + (_ADD_SINKS if layout.sinks else "")
    if layout.sinks:
        code.update(
            sinks_init=per_head("sinksGm", "sinks"),
            sinks_member="    GlobalTensor<float> sinksGm;\n",
            main_sinks=(
                "        if (t.slot < 0) {  // a split row's sink joins once, in the merge\n"
                "            AddSinks(sinksGm, t.kvHead, rowSum, rowMax, refMax, sinkWeight, t.rows);\n"
                "        }\n"
            ),
            merge_sinks="        AddSinks(sinksGm, kvHead, runSum, runMax, refMax, sinkWeight, rows);\n",
        )
    if layout.alibi:
        code.update(
            alibi_init=per_head("alibiGm", "alibi_slopes"),
            alibi_member="    GlobalTensor<float> alibiGm;\n",
            alibi_locals="    LocalTensor<float> columnOffset, alibiTerm;\n",
            alibi_columns=(
                "        // ALiBi's column offsets 0 .. BLOCK_KV - 1, written once: a row's term over a chunk\n"
                "        // is one Muls and one Adds of them.\n"
                "        columnOffset = alibiBuf.Get<float>(BLOCK_KV);\n"
                "        alibiTerm = alibiBuf.Get<float>()[BLOCK_KV];\n"
                "        for (int32_t c = 0; c < BLOCK_KV; ++c) {\n"
                "            columnOffset.SetValue(c, float(c));\n"
                "        }\n"
            ),
            alibi_task="        RowValues(alibiGm, t.kvHead, rowSlope, t.rows);  // ALiBi: each row's head slope\n",
            alibi_call="        AddAlibi(t, scores, chunkStart, chunkLen);  // before the mask, which overrides it\n",
            alibi_function=_ADD_ALIBI,
        )
    return code


# Per-head launch values (sinks, ALiBi slopes) laid out per tile row; shared by both kernels.
_ROW_VALUES = """
// dst[r] = perHead[kvHead * GQA + r % GQA] for the tile's rows: one GM read per head.
__aicore__ inline void RowValues(const GlobalTensor<float>& perHead, int32_t kvHead, const LocalTensor<float>& dst,
                                 int32_t rows)
{
    for (int32_t g = 0; g < GQA; ++g) {
        const float value = perHead.GetValue(uint64_t(kvHead) * GQA + g);
        for (int32_t r = g; r < rows; r += GQA) {
            dst.SetValue(r, value);
        }
    }
}
"""

_ADD_SINKS = """
// Attention sinks: each row's sink logit joins its softmax as a key with no value, so its sum
// gains exp(sink - reference max) and the normalized output shrinks by l / (l + exp(sink - m)).
// A row that saw no key keeps acc 0 and outputs 0.
__aicore__ inline void AddSinks(const GlobalTensor<float>& sinks, int32_t kvHead, const LocalTensor<float>& sum,
                                const LocalTensor<float>& max, const LocalTensor<float>& ref,
                                const LocalTensor<float>& weight, int32_t rows)
{
    RowValues(sinks, kvHead, weight, rows);
    ReferenceMax(ref, max, rows);
    Sub(weight, weight, ref, rows);
    Exp(weight, weight, rows);
    Add(sum, sum, weight, rows);
}
"""

_ADD_ALIBI = """
    // ---- ALiBi ----------------------------------------------------------------------------------
    // Row r (query position p = newStart + qStart + r / GQA) gains rowSlope[r] * (j - p) at key j;
    // over the chunk's columns c (j = chunkStart + c): slope * c + slope * (chunkStart - p).
    __aicore__ inline void AddAlibi(const Task& t, const LocalTensor<float>& scores, int32_t chunkStart,
                                    int32_t chunkLen)
    {
        for (int32_t r = 0; r < t.rows; ++r) {
            const float slope = rowSlope.GetValue(r);
            const int32_t qPos = t.newStart + t.qStart + r / GQA;
            Muls(alibiTerm, columnOffset, slope, chunkLen);
            Adds(alibiTerm, alibiTerm, slope * float(chunkStart - qPos), chunkLen);
            Add(scores[r * BLOCK_KV], scores[r * BLOCK_KV], alibiTerm, chunkLen);
        }
    }
"""


def _mask_function(layout: AttentionLayout) -> str:
    """`MaskScores` (only the rules the spec asks for), or "" when nothing is ever hidden."""
    if not (layout.causal or layout.sliding_window or layout.tree or layout.key_starts):
        return ""
    body = [
        "        const LocalTensor<float> row = scores[r * BLOCK_KV];",
        "        const int32_t qIndex = t.qStart + r / GQA;  // query index within the sequence",
    ]
    if layout.causal or layout.sliding_window:
        body.append("        const int32_t qPos = t.newStart + qIndex;   // its KV position")
    if layout.tree:
        body += [
            "        if (t.treeApplies) {",
            "            // Tree verify: among the new tokens the tree mask decides (it replaces the",
            "            // causal rule); older positions stay visible. One bool per (row, new token).",
            "            const int32_t firstNew = t.newStart > chunkStart ? t.newStart - chunkStart : 0;",
            "            const uint64_t treeRow = (uint64_t(t.seq) * tiling.treeSize + qIndex) * tiling.treeSize;",
            "            for (int32_t c = firstNew; c < chunkLen; ++c) {",
            "                if (treeMaskGm.GetValue(treeRow + uint64_t(chunkStart + c - t.newStart)) == 0) {",
            "                    row.SetValue(c, NEG_INF);",
            "                }",
            "            }",
            "        }" + (" else {" if layout.causal else ""),
        ]
        if layout.causal:
            body += [
                "            // Causal: positions after the row's own are hidden.",
                "            HideColumns(row, qPos + 1 - chunkStart, chunkLen, chunkLen);",
                "        }",
            ]
    elif layout.causal:
        body += [
            "        // Causal: positions after the row's own are hidden.",
            "        HideColumns(row, qPos + 1 - chunkStart, chunkLen, chunkLen);",
        ]
    if layout.sliding_window:
        body += [
            "        // Sliding window: positions <= qPos - window are hidden. In 64 bits: without the causal",
            "        // rule a chunk may start past qPos, and qPos - window + 1 - chunkStart would fall below",
            "        // INT32_MIN for a window near INT32_MAX (and wrap to a bound that hides the whole chunk).",
            "        const int64_t windowEnd = int64_t(qPos) - tiling.window + 1 - chunkStart;",
            "        HideColumns(row, 0, windowEnd < 0 ? 0 : int32_t(windowEnd), chunkLen);",
        ]
    if layout.key_starts:
        body += [
            "        // Packed sequences: positions before the row's start are hidden. A chunk from the",
            "        // tile's latest start on hides nothing by this rule (no GM read).",
            "        if (chunkStart < t.startsHi) {",
            "            const int32_t start = keyStartsGm.GetValue(uint64_t(t.seq) * tiling.startsRows + uint64_t(qIndex));",
            "            HideColumns(row, 0, start - chunkStart, chunkLen);",
            "        }",
        ]
    rules = ("the causal\n    // and window rules hide one contiguous column range per row; the tree mask goes per element."
             if not layout.key_starts else  # key starts go with no tree mask
             "the causal,\n    // window and key-start rules hide one contiguous column range per row each.")
    return (
        "\n"
        f"    // Hide what each row may not see in chunk [chunkStart, chunkStart + chunkLen): {rules}\n"
        "    __aicore__ inline void MaskScores(const Task& t, const LocalTensor<float>& scores, int32_t chunkStart,\n"
        "                                      int32_t chunkLen)\n"
        "    {\n"
        "        for (int32_t r = 0; r < t.rows; ++r) {\n"
        + "\n".join("    " + line for line in body) + "\n"
        "        }\n"
        "    }\n"
    )


def _init_buffers(buffers: Sequence[UbBuffer]) -> str:
    lines = ["        // Unified buffer (sizes checked against the 192 KiB at render time):"]
    for b in buffers:
        if b.kind.startswith("TBuf"):
            lines.append(f"        pipe->InitBuffer({b.member}, {b.nbytes});  // {b.purpose}")
        else:
            num = "BUFFER_NUM" if b.num == BUFFER_NUM and "BUFFER_NUM" in b.kind else str(b.num)
            lines.append(f"        pipe->InitBuffer({b.member}, {num}, {b.nbytes});  // {b.purpose}")
    lines.append(f"        // total {sum(b.total for b in buffers)} bytes")
    return "\n".join(lines)


def _buffer_members(buffers: Sequence[UbBuffer]) -> str:
    return "\n".join(f"    {b.kind} {b.member};" for b in buffers)


def _stat_views(names: Sequence[str]) -> str:
    return "".join(f"        {name} = stats[{i} * STAT_LEN];\n" for i, name in enumerate(names))


def _init_params(entry: EntryPoint) -> str:
    """`GM_ADDR a, GM_ADDR b, ...` without the tiling, four to a line."""
    params = [f"GM_ADDR {p}" for p in entry.params if p not in ("sys_workspace", "tiling")]
    lines = [", ".join(params[i:i + 4]) for i in range(0, len(params), 4)]
    return (",\n" + " " * 32).join(lines)


def _init_args(entry: EntryPoint) -> str:
    return ", ".join(p for p in entry.params if p not in ("sys_workspace", "tiling"))


def _kernel_source(spec: KernelSpec, layout: AttentionLayout, ident: str,
                   main: EntryPoint, merge: EntryPoint) -> str:
    mask = _mask_function(layout)
    return _fill(
        _KERNEL_TEMPLATE,
        banner=banner(spec, "Ascend C kernels (meta-attention + split-KV merge)"),
        mask_doc=_mask_doc(layout),
        ident=ident,
        struct=tiling_struct_name(ident),
        ctype=layout.ctype,
        gqa=layout.gqa,
        head_dim=layout.head_dim,
        block_q=layout.block_q,
        block_kv=layout.block_kv,
        stat_len=layout.stat_len,
        buffer_num=BUFFER_NUM,
        task_cols=TASK_COLS,
        merge_cols=MERGE_COLS,
        convert_helpers=_convert_helpers(layout),
        main_init_params=_init_params(main),
        tree_init=(
            "        treeMaskGm.SetGlobalBuffer(reinterpret_cast<__gm__ uint8_t*>(tree_mask),\n"
            "                                   uint64_t(t.numSeqs) * t.treeSize * t.treeSize);  // bool [S, T, T]\n"
            if layout.tree else ""
        ),
        main_init_buffers=_init_buffers(layout.main_buffers()),
        main_stats=_stat_views(layout.main_stat_names()),
        tree_applies=(
            "numNew <= tiling.treeSize" if layout.tree else "false"
        ),
        mask_call=_mask_call(layout, bool(mask)),
        mask_function=mask,
        tree_member="    GlobalTensor<uint8_t> treeMaskGm;\n" if layout.tree else "",
        **_bias_code(layout),
        **_key_starts_code(layout),
        **_feature_code(layout),
        main_buffer_members=_buffer_members(layout.main_buffers()),
        main_stat_members=", ".join(layout.main_stat_names()),
        merge_init_params=_init_params(merge),
        merge_init_buffers=_init_buffers(layout.merge_buffers()),
        merge_stats=_stat_views(layout.merge_stat_names()),
        merge_buffer_members=_buffer_members(layout.merge_buffers()),
        merge_stat_members=", ".join(layout.merge_stat_names()),
        main_signature=main.signature(),
        merge_signature=merge.signature(),
        main_init_args=_init_args(main),
        merge_init_args=_init_args(merge),
        launch_stubs=launch_stub(main) + "\n" + launch_stub(merge),
    )


_HOST_TEMPLATE = """\
$banner
// The tiling function (plain C ABI, so Python calls it through ctypes) and, in CPU-debug
// builds, the launches of both kernels on the CPU.
#include "tiling/tiling_api.h"
#include "tiling/platform/platform_ascendc.h"
#include "${ident}_tiling.h"
#ifdef ASCENDC_CPU_DEBUG
#include "kernel_operator.h"
#include "tikicpulib.h"
#endif

namespace {

constexpr int32_t GQA = ${gqa};
constexpr int32_t HEAD_DIM = ${head_dim};
constexpr int32_t TILE_ROWS = ${rows};
constexpr int32_t CUBE_ROWS = ${cube_rows};  // TILE_ROWS padded to the cube's 16-row fractal
constexpr int32_t BLOCK_KV = ${block_kv};

// Status codes (tileflow's backends/ascend/attention.py TILING_ERRORS explains each).
enum TilingStatus : int32_t {
    TILING_OK = 0,
${status_enum}
};

// One Matmul tiling: base block = the whole single shape (one Iterate per tile).
int64_t CubeTiling(TCubeTiling& out, int m, int n, int k, bool transposeB)
{
    matmul_tiling::MatmulApiTiling api;
    api.SetAType(matmul_tiling::TPosition::GM, matmul_tiling::CubeFormat::ND, matmul_tiling::DataType::${api_dtype});
    api.SetBType(matmul_tiling::TPosition::GM, matmul_tiling::CubeFormat::ND, matmul_tiling::DataType::${api_dtype}, transposeB);
    api.SetCType(matmul_tiling::TPosition::VECIN, matmul_tiling::CubeFormat::ND, matmul_tiling::DataType::DT_FLOAT);
    api.SetShape(m, n, k);
    api.SetOrgShape(m, n, k);
    api.SetBias(false);
    api.SetFixSplit(CUBE_ROWS, n, k);
    return api.GetTiling(out);
}

}  // namespace

extern "C" uint32_t ${ident}_tiling_size()
{
    return sizeof(${struct});
}

// Bytes of the Matmul API's system workspace (the main kernel's sys_workspace) on this device; 0
// when the platform cannot be queried.
extern "C" uint32_t ${ident}_sys_workspace_size()
{
    const platform_ascendc::PlatformAscendC* platform = platform_ascendc::PlatformAscendCManager::GetInstance();
    return platform == nullptr ? 0 : platform->GetLibApiWorkSpaceSize();
}

// Fill the tiling of one launch; returns TILING_OK or the first problem found.
extern "C" int32_t ${ident}_tiling(
    int32_t numSeqs, int32_t numQHeads, int32_t numKvHeads, int32_t blockSize, int32_t maxBlocks,
    int32_t numBlocks, int32_t totalQ, int32_t numTasks, int32_t numSlots, int32_t numMerges,
    int32_t numPrograms, int32_t treeSize, int32_t window,${bias_params}${starts_param} float scale,${softcap_param} void* tilingOut)
{
    if (tilingOut == nullptr) {
        return TILING_NULL_OUTPUT;
    }
    if (numKvHeads < 1 || numQHeads != numKvHeads * GQA) {
        return TILING_BAD_HEADS;
    }
    if (blockSize < 1 || maxBlocks < 1 || numBlocks < 1) {
        return TILING_BAD_PAGES;
    }
    if (numSeqs < 0 || totalQ < 0 || numTasks < 0 || numSlots < 0 || numMerges < 0) {
        return TILING_BAD_COUNTS;
    }
    if (numPrograms < 1) {
        return TILING_BAD_PROGRAMS;
    }
${window_check}${tree_check}${softcap_check}    ${struct} t{};
    if (CubeTiling(t.qkTiling, TILE_ROWS, BLOCK_KV, HEAD_DIM, true) != 0) {
        return TILING_QK_CUBE;
    }
    if (CubeTiling(t.pvTiling, TILE_ROWS, HEAD_DIM, BLOCK_KV, false) != 0) {
        return TILING_PV_CUBE;
    }
    t.numSeqs = numSeqs;
    t.numQHeads = numQHeads;
    t.numKvHeads = numKvHeads;
    t.blockSize = blockSize;
    t.maxBlocks = maxBlocks;
    t.numBlocks = numBlocks;
    t.totalQ = totalQ;
    t.numTasks = numTasks;
    t.numSlots = numSlots;
    t.numMerges = numMerges;
    t.numPrograms = numPrograms;
    t.treeSize = treeSize;
    t.window = window;
${bias_assign}${starts_assign}    t.scale = scale;
${softcap_assign}    *static_cast<${struct}*>(tilingOut) = t;
    return TILING_OK;
}

${cpu_runners}"""


def _host_source(spec: KernelSpec, layout: AttentionLayout, ident: str,
                 main: EntryPoint, merge: EntryPoint) -> str:
    status = "\n".join(f"    {name} = {code},  // {why}" for code, (name, why) in TILING_ERRORS.items())
    window_check = (
        "    if (window < 1) {\n        return TILING_BAD_WINDOW;\n    }\n"
        if layout.sliding_window else ""
    )
    tree_check = (
        "    if (treeSize < 0) {\n        return TILING_BAD_TREE;\n    }\n"
        if layout.tree else ""
    )
    return _fill(
        _HOST_TEMPLATE,
        banner=banner(spec, "Host tiling and CPU-debug launch"),
        ident=ident,
        struct=tiling_struct_name(ident),
        gqa=layout.gqa,
        head_dim=layout.head_dim,
        rows=layout.rows,
        cube_rows=layout.cube_rows,
        block_kv=layout.block_kv,
        status_enum=status,
        api_dtype=_API_DTYPES[layout.dtype],
        window_check=window_check,
        tree_check=tree_check,
        softcap_param=" float softcap," if layout.softcap else "",
        softcap_check=(
            "    if (!(softcap > 0.0f && softcap < __builtin_huge_valf())) {\n"
            "        return TILING_BAD_SOFTCAP;\n    }\n" if layout.softcap else ""
        ),
        softcap_assign="    t.softcap = softcap;\n" if layout.softcap else "",
        bias_params=("\n    " + ", ".join(f"int32_t {n}" for n in _BIAS_NAMES) + ",") if layout.bias else "",
        bias_assign="".join(f"    t.{n} = {n};\n" for n in _BIAS_NAMES) if layout.bias else "",
        starts_param=" int32_t startsRows," if layout.key_starts else "",
        starts_assign="    t.startsRows = startsRows;\n" if layout.key_starts else "",
        cpu_runners=cpu_runner(main) + "\n" + cpu_runner(merge),
    )


def render_attention_sources(spec: KernelSpec) -> KernelSources:
    """Emit the Ascend C project files of a ``meta_attention`` spec.

    Files (see `sources.KernelSources`): ``op_kernel/<ident>.cpp`` (both kernels: `<ident>` and
    `<ident>_merge`, and their NPU launch stubs), ``op_host/<ident>_tiling.h`` (the tiling
    struct), ``op_host/<ident>_host.cpp`` (``<ident>_tiling_size()``, ``<ident>_tiling(...)``,
    ``<ident>_sys_workspace_size()`` and
    the CPU-debug runners) and ``op_host/<ident>_torch.cpp`` (the PyTorch operators).

    Raises ValueError for a spec the kernel cannot implement (see `attention_layout`).
    """
    layout = attention_layout(spec)
    ident = kernel_ident(spec)
    main, merge = attention_entries(spec)
    sources = KernelSources(spec=spec, ident=ident, tiling_struct=tiling_struct_name(ident),
                            kernels=(main.name, merge.name))
    sources.files[sources.tiling_header] = _tiling_header(spec, layout, ident)
    sources.files[sources.kernel_file] = _kernel_source(spec, layout, ident, main, merge)
    sources.files[sources.host_file] = _host_source(spec, layout, ident, main, merge)
    sources.files[sources.torch_file] = torch_binding((main, merge), spec)
    return sources


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _host_tiling(host_call: HostCall, ident: str, where: str, values: Sequence[int],
                 floats: Sequence[float]) -> torch.Tensor:
    """The tiling struct of one launch, computed by the emitted host function from its int32
    `values` and then its `floats` (the scale, and the soft-cap when the spec has one)."""
    size = int(host_call(f"{ident}_tiling_size", restype=ctypes.c_uint32))
    tiling = torch.zeros(size, dtype=torch.uint8)
    for v in values:
        if not -(2**31) <= v < 2**31:
            raise ValueError(f"{where}: a launch size ({v}) does not fit the kernel's int32 tiling")
    code = host_call(f"{ident}_tiling", *(ctypes.c_int32(v) for v in values),
                     *(ctypes.c_float(f) for f in floats), tiling)
    if code != 0:
        why = TILING_ERRORS.get(code, ("", f"unknown status {code}"))[1]
        raise ValueError(f"{where}: the host tiling refused the launch: {why}")
    return tiling


def _bias_operand(bias: torch.Tensor, extent: tuple[int, int], where: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """attn_bias as the kernel reads it, and its tiling values (strides of seq, head and query
    row, addressable elements).

    `bias` is the launch's bias expanded to ``[S, Hq, q_dim, kv_dim]`` (broadcast dims have
    stride 0). The kernel reads a row's keys as one contiguous run, in float32: a float32 bias
    whose keys are contiguous is passed as it is (no copy, whatever its other strides); anything
    else becomes a float32 copy of its distinct rows only (broadcast dims stay stride-0 views,
    so a ``[1, 1, q, kv]`` mask is never copied ``S * Hq`` times). Raises ValueError when the bias
    has fewer query rows or keys than `extent` (see `tileflow.attention_inputs.bias_extent`).
    """
    need_q, need_kv = extent
    if bias.shape[2] < need_q or bias.shape[3] < need_kv:
        raise ValueError(
            f"{where}: attn_bias must cover every query row and key of the batch, [S, Hq, >= {need_q}, "
            f">= {need_kv}], got {list(bias.shape)}"
        )
    keys_contiguous = bias.shape[3] <= 1 or bias.stride(3) == 1
    if bias.dtype != torch.float32 or not keys_contiguous:
        # Copy one representative of each broadcast dim (stride 0) among seq / head / row, keys
        # in full, then broadcast again.
        distinct = bias[tuple(slice(0, 1) if bias.stride(i) == 0 else slice(None) for i in range(3))]
        bias = additive_bias(distinct).contiguous().expand(bias.shape)  # a bool mask as 0 / -inf
    if bias.numel() == 0:  # no key to read (every task's KV range is empty): a 1-element dummy
        bias = torch.zeros(1, 1, 1, 1, dtype=torch.float32, device=bias.device)
    elems = 1 + sum((size - 1) * stride for size, stride in zip(bias.shape, bias.stride()))
    return bias, (bias.stride(0), bias.stride(1), bias.stride(2), elems)


def make_attention_launcher(spec: KernelSpec, host_call: HostCall, run: KernelRun,
                            cores: int) -> Callable[..., torch.Tensor]:
    """Wrap the built kernels (on any runner) in the meta-attention launch interface:

        launch(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_kv, table, *,
               scale=None, tree_mask=None, sliding_window=None, out=None, attn_bias=None,
               attn_bias_ranges=None, softcap=None, sinks=None, alibi_slopes=None, key_starts=None) -> out

    Inputs are validated by `tileflow.attention_inputs.check_launch_inputs` (the checks the
    Triton launcher makes). `host_call(name, *args, restype=...)` calls the emitted host functions
    (the tiling); `run(entry, block_dim, tensors)` launches a kernel — the CPU-debug library or
    the NPU operators, so both share validation, tiling and workspace allocation. The main kernel
    runs one block per task-table program; the merge kernel (when the table has merge rows)
    min(merges, cores) blocks.

    The kernel addresses q, the caches and out densely, so non-contiguous views are copied (and
    a non-contiguous `out` is written back). `attn_bias` (bias specs) is read in place when it is
    float32 with contiguous keys, else copied (see `_bias_operand`); `key_starts` (key-starts
    specs) are read in place as int32. The per-core GM workspace
    (Q and P tiles), the split-KV workspace (float32, `TaskTable.workspace_shapes`) and the
    Matmul API's system workspace (`<ident>_sys_workspace_size()` bytes) are allocated per call.
    """
    layout = attention_layout(spec)
    main, merge = attention_entries(spec)
    ident = kernel_ident(spec)
    where = f"kernel {spec.name}"

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
        """Run meta-attention for the batch described by `table`; returns `out`. With a bias,
        each task's KV range is narrowed to the keys its `attn_bias_ranges` (computed when not
        given) say some row of the tile sees. `softcap`, `sinks`, `alibi_slopes` and `key_starts`
        exactly when the spec has them (see `check_launch_inputs`); with key starts, the kernel
        starts each task's KV range at the earliest start of its tile's rows."""
        inputs = check_launch_inputs(
            layout.params, spec.dtype, where, q, k_cache, v_cache, block_table, cu_seqlens_q,
            seqlens_kv, table, tree_mask=tree_mask, sliding_window=sliding_window, out=out,
            attn_bias=attn_bias, attn_bias_ranges=attn_bias_ranges, need_bias_ranges=True,
            softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes, key_starts=key_starts,
        )
        out = inputs.out
        if inputs.nothing_to_do:
            return out
        device = q.device
        d = layout.head_dim
        num_programs, num_merges = inputs.num_programs, inputs.merges.shape[0]
        if num_programs > MAX_BLOCK_DIM:  # one block per program: the launch cannot take more
            raise ValueError(
                f"{where}: the task table has {num_programs} programs, more than the {MAX_BLOCK_DIM} blocks of "
                "one Ascend launch; build it with fewer programs (num_programs of the task table)"
            )
        dense_out = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
        tree = inputs.tree_mask
        tree_size = 0 if tree is None else tree.shape[1]
        scale = softmax_scale(scale, d, where)
        bias, bias_tiling, ranges = None, (), None
        if inputs.attn_bias is not None:
            bias, bias_tiling = _bias_operand(inputs.attn_bias, bias_extent(table, inputs.tasks, inputs.num_seqs), where)
            ranges = inputs.bias_ranges.contiguous()  # [S, q rows, 4], a few bytes per row
            bias_tiling = (*bias_tiling, ranges.shape[1])
        # key_starts arrive int32, dense and on q's device (check_launch_inputs): only their row length.
        starts_tiling = () if inputs.key_starts is None else (inputs.key_starts.shape[1],)

        tiling = _host_tiling(host_call, ident, where, (
            inputs.num_seqs, q.shape[1], k_cache.shape[2], k_cache.shape[1],
            inputs.block_table.shape[1], k_cache.shape[0], q.shape[0], inputs.tasks.shape[0],
            inputs.num_slots, num_merges, num_programs, tree_size, inputs.sliding_window or 0,
            *bias_tiling, *starts_tiling,
        ), (scale,) if inputs.softcap is None else (scale, inputs.softcap))

        slots = max(inputs.num_slots, 1)  # a 1-slot dummy when no task is split (never touched)
        tensors = {
            "q": q.contiguous(),
            "k_cache": k_cache.contiguous(),
            "v_cache": v_cache.contiguous(),
            "block_table": inputs.block_table,
            "cu_seqlens_q": inputs.cu_seqlens_q,
            "seqlens_kv": inputs.seqlens_kv,
            "tasks": inputs.tasks,
            "program_offsets": inputs.program_offsets,
            "program_tasks": inputs.program_tasks,
            "merges": inputs.merges,
            # bool is one byte per element: the kernel reads it as uint8 (no copy for a dense mask).
            "tree_mask": None if tree is None else tree.contiguous().view(torch.uint8),
            "attn_bias": bias,
            "attn_bias_ranges": ranges,
            "key_starts": inputs.key_starts,
            "sinks": inputs.sinks,
            "alibi_slopes": inputs.alibi_slopes,
            "out": dense_out,
            "partial_out": torch.empty((slots, layout.rows, d), dtype=torch.float32, device=device),
            "partial_stats": torch.empty((slots, 2, layout.rows), dtype=torch.float32, device=device),
            "workspace": torch.empty(num_programs * layout.workspace_elems, dtype=q.dtype, device=device),
            "sys_workspace": sys_workspace(host_call, ident, where, device),
            "tiling": tiling.to(device),
        }
        run(main, num_programs, [tensors[p] for p in main.params])
        if num_merges:
            run(merge, min(num_merges, max(cores, 1)), [tensors[p] for p in merge.params])
        if dense_out is not out:
            out.copy_(dense_out)
        return out

    launch.spec = spec  # type: ignore[attr-defined]
    launch.layout = layout  # type: ignore[attr-defined]
    return launch


def build_cpu_attention(spec: KernelSpec, include_dirs: Sequence[Path],
                        build_dir: Path | None = None) -> CompiledKernel:
    """Emit, compile for the CPU (CANN's CPU-debug mode, against `include_dirs`) and wrap a
    ``meta_attention`` spec: a `CompiledKernel` with target "ascend-cpu-debug" whose source is
    the combined emitted files. Tests use it with the double under tests/ascend_cpu/."""
    attention_layout(spec)  # refuse a bad spec before compiling anything
    from . import build_cpu_debug_kernel

    return build_cpu_debug_kernel(spec, include_dirs, build_dir=build_dir)
