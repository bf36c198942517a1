"""What every meta-attention kernel backend checks, written once: spec params and launch inputs.

A ``meta_attention`` KernelSpec and the launcher interface shared by the backends (reference,
Triton, Ascend C) are target-neutral; each backend adds only its own limits (tile shapes its
hardware needs, dtypes it has a path for). Two functions hold the common part:

- `attention_params(spec, ...)`: validate the spec's params and resolve the tile sizes;
- `check_launch_inputs(...)`: validate one launch's tensors against the spec and the task table
  and normalize them (int32 metadata and table on q's device, the output allocated), returning
  a `LaunchInputs`;
- `softmax_scale(...)`: the launch's softmax scale, 1/sqrt(head_dim) by default, checked finite.

Error messages start with ``where`` (e.g. ``"kernel tileflow_meta_attention_..."``) and say what
to change; tests match on them, so keep their wording stable.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from tileflow.kernel_spec import KernelSpec, dtype_name

__all__ = [
    "MERGE_COLS",
    "TASK_COLS",
    "AttentionParams",
    "AttentionParamsLike",
    "LaunchInputs",
    "additive_bias",
    "attention_params",
    "bias_extent",
    "check_launch_inputs",
    "int_tensor",
    "softmax_scale",
]

# Columns of a task-table row and of a merge row (see the contract in tileflow/tasks.py).
TASK_COLS = 8
MERGE_COLS = 6


@dataclass(frozen=True)
class AttentionParams:
    """The target-neutral static parameters of a ``meta_attention`` spec (see `attention_params`)."""

    head_dim: int
    gqa: int
    block_q: int
    block_kv: int
    causal: bool
    sliding_window: bool
    tree: bool
    bias: bool
    softcap: bool = False
    sinks: bool = False
    alibi: bool = False
    key_starts: bool = False


def _positive_int(spec: KernelSpec, key: str, value: Any) -> int:
    """`value` if it is a positive int (not a bool), else a ValueError naming the param."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(
            f"meta_attention spec {spec.name} needs a positive integer param {key!r}, got {value!r}"
        )
    return value


def attention_params(
    spec: KernelSpec, *, target: str, supported_dtypes: tuple[str, ...], default_block_kv: int
) -> AttentionParams:
    """Validate a ``meta_attention`` KernelSpec's target-neutral params.

    Params (built with `make_params`): `head_dim`, `gqa` (query heads per KV head), `block_q`,
    `block_kv`, `causal`, `sliding_window`, `tree`, `bias`, `softcap`, `sinks`, `alibi`,
    `key_starts` (the last eight bools; default causal=True, the others False; `softcap`: logit soft-capping, the
    scores become `cap * tanh(scores / cap)` before any mask or bias, the cap a launch argument;
    `sinks`: attention sinks, one learned logit per query head that joins every row's softmax
    with no value, as gpt-oss has them, given at launch; `alibi`: ALiBi, each head's score of
    the key at position j for the query at position p gains `slope * (j - p)`, the slopes (one
    per query head) given at launch; `key_starts`: each query row's first visible key, an
    integer per row given at launch, for sequences packed in one dense row). A TileConfig, when present, supplies
    `block_q` (its `block_m`) and `block_kv` (its `block_n`) when the params leave them out; a
    tile that contradicts the params is an error. `block_kv` falls back to `default_block_kv`.

    `target` names the backend in messages; `supported_dtypes` are its input dtypes.
    Raises ValueError for a spec no meta-attention kernel can implement.
    """
    if spec.op != "meta_attention":
        raise ValueError(f"the {target} attention kernel handles op 'meta_attention', not {spec.op!r}")
    if spec.dtype not in supported_dtypes:
        raise ValueError(
            f"the {target} meta_attention supports dtype in {supported_dtypes}, got {spec.dtype!r}"
        )
    if spec.out_dtype != spec.dtype:
        raise ValueError(
            f"meta_attention writes q's dtype: out_dtype {spec.out_dtype!r} must equal dtype "
            f"{spec.dtype!r}"
        )
    if spec.epilogue:
        raise ValueError(f"meta_attention has no epilogues, got {spec.epilogue}")
    tile = spec.tile
    head_dim = _positive_int(spec, "head_dim", spec.param("head_dim"))
    gqa = _positive_int(spec, "gqa", spec.param("gqa"))

    block_q = spec.param("block_q")
    block_kv = spec.param("block_kv")
    if tile is not None:
        if block_q is not None and block_q != tile.block_m:
            raise ValueError(
                f"spec {spec.name}: params block_q={block_q} contradicts tile.block_m={tile.block_m}"
            )
        if block_kv is not None and block_kv != tile.block_n:
            raise ValueError(
                f"spec {spec.name}: params block_kv={block_kv} contradicts "
                f"tile.block_n={tile.block_n}"
            )
        block_q = tile.block_m if block_q is None else block_q
        block_kv = tile.block_n if block_kv is None else block_kv
    if block_kv is None:
        block_kv = default_block_kv
    block_q = _positive_int(spec, "block_q", block_q)
    block_kv = _positive_int(spec, "block_kv", block_kv)
    flags = {}
    for key, default in (("causal", True), ("sliding_window", False), ("tree", False), ("bias", False),
                         ("softcap", False), ("sinks", False), ("alibi", False), ("key_starts", False)):
        value = spec.param(key, default)
        if not isinstance(value, bool):
            raise ValueError(f"spec {spec.name}: param {key!r} must be a bool, got {value!r}")
        flags[key] = value
    if flags["alibi"] and flags["tree"]:
        # The kernels measure ALiBi's distances between cache slots; in a token tree a draft's
        # position is its depth, which the slots do not give.
        raise ValueError(f"spec {spec.name}: ALiBi with tree verify is not supported (a token tree's positions are "
                         f"depths, not cache slots); verify linear drafts without the tree mask")
    if flags["key_starts"] and (flags["tree"] or flags["bias"]):
        # The dense op folds key starts into a bias it has (`run_meta_attention`); trees are the
        # varlen op's, whose sequences are apart already.
        raise ValueError(f"spec {spec.name}: key_starts go with neither a tree mask nor a bias (fold them into the bias)")
    return AttentionParams(head_dim=head_dim, gqa=gqa, block_q=block_q, block_kv=block_kv, **flags)


@dataclass
class LaunchInputs:
    """One launch's inputs after `check_launch_inputs`: validated and normalized.

    Integer metadata and the task table are contiguous int32 tensors on q's device; `tree_mask`
    is bool on that device (None without tree support); `attn_bias` is expanded to
    ``[S, Hq, q_len, kv_len]`` and `bias_ranges` (see `bias_ranges`) to ``[S, q_len, 4]``
    int32 (both None without bias support); `out` is the tensor to write (the
    caller's, or a fresh contiguous one). q/k_cache/v_cache are the caller's tensors, unchanged.
    """

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seqlens_kv: torch.Tensor
    tasks: torch.Tensor
    program_offsets: torch.Tensor
    program_tasks: torch.Tensor
    merges: torch.Tensor
    num_slots: int
    tree_mask: torch.Tensor | None
    sliding_window: int | None
    attn_bias: torch.Tensor | None
    out: torch.Tensor
    bias_ranges: torch.Tensor | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None
    key_starts: torch.Tensor | None = None

    @property
    def num_programs(self) -> int:
        """P, the static grid of the task table."""
        return self.program_offsets.numel() - 1

    @property
    def num_seqs(self) -> int:
        """S, the sequences of the batch."""
        return self.seqlens_kv.shape[0]

    @property
    def nothing_to_do(self) -> bool:
        """True when no kernel needs to run (no query rows, no task or no program)."""
        return self.q.shape[0] == 0 or self.tasks.shape[0] == 0 or self.num_programs == 0


class AttentionParamsLike(Protocol):
    """What `check_launch_inputs` reads of a backend's config (an `AttentionParams` or richer)."""

    head_dim: int
    gqa: int
    block_q: int
    sliding_window: bool
    tree: bool
    bias: bool
    softcap: bool
    sinks: bool
    alibi: bool


def _table_field(table: Any, name: str) -> Any:
    """One field of the task table, with a clear error when it is missing."""
    if not hasattr(table, name):
        raise ValueError(f"the task table has no field {name!r} (got {type(table).__name__})")
    return getattr(table, name)


def int_tensor(name: str, value: Any, device: torch.device, ndim: int) -> torch.Tensor:
    """`value` as a contiguous int32 tensor on `device`, checking its rank."""
    if (isinstance(value, torch.Tensor) and value.dtype == torch.int32 and value.device == device
            and value.dim() == ndim and value.is_contiguous()):
        return value  # the hot path's tensors: already right, and a conversion costs microseconds
    t = torch.as_tensor(value)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {dtype_name(t.dtype)}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {list(t.shape)}")
    return t.to(device=device, dtype=torch.int32).contiguous()


def bias_extent(table: Any, tasks: torch.Tensor, num_seqs: int) -> tuple[int, int]:
    """(query rows, keys) of each ``[seq, head]`` plane of attn_bias a launch may read: the
    longest n_s and L_s of the batch, from the table's host copies of the metadata (nothing read
    back from the device; a `TaskTable` works them out once, `host_extent`); a table without
    them (hand-made) costs one read of its tasks, whose tiles and KV ranges bound what the kernel
    reads."""
    cu = getattr(table, "cu_seqlens_q", None)
    lens = getattr(table, "seqlens_kv", None)
    if (isinstance(cu, torch.Tensor) and isinstance(lens, torch.Tensor) and cu.device.type == "cpu"
            and lens.device.type == "cpu" and num_seqs > 0
            and (cu.numel(), lens.numel()) == (num_seqs + 1, num_seqs)):
        extent = getattr(table, "host_extent", None)
        return extent if extent is not None else (int((cu[1:] - cu[:-1]).max()), int(lens.max()))
    host = tasks.cpu()
    if host.numel() == 0:
        return 0, 0
    return int((host[:, 2] + host[:, 3]).max()), int(host[:, 5].max())


def check_launch_inputs(
    params: AttentionParamsLike,
    dtype: str,
    where: str,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seqlens_kv: torch.Tensor,
    table: Any,
    *,
    tree_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    attn_bias_ranges: torch.Tensor | None = None,
    need_bias_ranges: bool = False,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    key_starts: torch.Tensor | None = None,
) -> LaunchInputs:
    """Validate one meta-attention launch against its spec params and task table.

    In the order checked:
    - `q` [total_q, Hq, D] of `dtype`; `k_cache`/`v_cache` [num_blocks, block_size, Hkv, D] of the
      same dtype with Hq == Hkv * gqa;
    - `table`: the TaskTable built for this batch with the spec's block_q and the inputs' heads;
    - `block_table` [S, max_blocks], `cu_seqlens_q` [S + 1], `seqlens_kv` [S]: integer tensors;
    - `sliding_window` (int >= 1) exactly when the spec has `sliding_window=True`, `tree_mask`
      (bool [S, T, T]) exactly when it has `tree=True`, `attn_bias` (float, broadcastable to
      [S, Hq, q_len, kv_len]) exactly when it has `bias=True`, with `attn_bias_ranges` when the
      caller has them (`bias_ranges(attn_bias)`; computed here when missing and
      `need_bias_ranges`, for kernels that read them); `softcap` (a finite number > 0) exactly
      when it has `softcap=True`; `key_starts` (integer [S, >= max n_s]: query row i of sequence
      s sees no key before position key_starts[s, i], sequences packed in one dense row) exactly
      when it has `key_starts=True`; `sinks` (float [Hq], one logit per query head) exactly when
      it has `sinks=True`; `alibi_slopes` (float [Hq], one slope per query head) exactly when it
      has `alibi=True`;
    - the table's KV ranges clipped for the launch's causal rule and window;
    - `out`, when given, q's shape, dtype and device.

    Raises ValueError prefixed with `where` naming the first problem found.
    """
    hq, hkv = _check_qkv(params, dtype, where, q, k_cache, v_cache)
    device = q.device
    parts = _checked_table(params, where, table, hq, hkv, device)
    block_table, cu_seqlens_q, seqlens_kv = _checked_metadata(where, block_table, cu_seqlens_q, seqlens_kv, device)
    num_seqs = seqlens_kv.shape[0]
    window = _checked_window(params, where, sliding_window)
    tree = _checked_tree(params, where, tree_mask, num_seqs, device)
    bias, ranges = _checked_bias(params, where, attn_bias, attn_bias_ranges, need_bias_ranges, table, parts.tasks,
                                 num_seqs, hq, device)
    cap = _checked_softcap(params, where, softcap)
    starts = _checked_key_starts(params, where, key_starts, table, parts.tasks, num_seqs, device)
    sink_logits = _per_head(where, "sinks", sinks, params.sinks, "attention sinks", hq, device)
    slopes = _per_head(where, "alibi_slopes", alibi_slopes, params.alibi, "ALiBi", hq, device)
    _check_table_masking(params, where, table, parts.tasks, window)
    return LaunchInputs(
        q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table,
        cu_seqlens_q=cu_seqlens_q, seqlens_kv=seqlens_kv, tasks=parts.tasks, program_offsets=parts.program_offsets,
        program_tasks=parts.program_tasks, merges=parts.merges, num_slots=parts.num_slots, tree_mask=tree,
        sliding_window=window, attn_bias=bias, out=_checked_out(where, out, q, dtype), bias_ranges=ranges,
        softcap=cap, sinks=sink_logits, alibi_slopes=slopes, key_starts=starts,
    )


def _refusal(where: str, msg: str) -> ValueError:
    """The error a launch check raises: `msg` after the launcher's `where`."""
    return ValueError(f"{where}: {msg}")


def _check_qkv(params: AttentionParamsLike, dtype: str, where: str, q: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor) -> tuple[int, int]:
    """q, k_cache and v_cache: shapes, `dtype`, one device, the spec's head size and GQA ratio.
    Returns (Hq, Hkv)."""
    in_dtype = getattr(torch, dtype)
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        got = list(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise _refusal(where, f"q must be a 3-D [total_q, Hq, D] tensor, got {got}")
    _, hq, d = q.shape
    device = q.device
    if d != params.head_dim:
        raise _refusal(where, f"q has head_dim {d} but the kernel was built for {params.head_dim}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise _refusal(where, f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != in_dtype:
            raise _refusal(where, f"{name} must be {dtype}, got {dtype_name(t.dtype)}")
        if t.device != device:
            raise _refusal(where, f"{name} is on {t.device} but q is on {device}")
    if k_cache.dim() != 4 or k_cache.shape[3] != d:
        raise _refusal(where, f"k_cache must be [num_blocks, block_size, Hkv, {d}], got {list(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise _refusal(where, f"v_cache shape {list(v_cache.shape)} differs from k_cache {list(k_cache.shape)}")
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    if hkv == 0 or hq != hkv * params.gqa:
        raise _refusal(
            where,
            f"q has {hq} heads and the cache {hkv} KV heads, but the kernel was built for "
            f"gqa={params.gqa} query heads per KV head",
        )
    if block_size < 1:
        raise _refusal(where, "the KV cache pages must hold at least one position")
    return hq, hkv


@dataclass(frozen=True)
class _TableTensors:
    """A task table's arrays as the kernels read them: contiguous int32 on q's device."""

    tasks: torch.Tensor
    program_offsets: torch.Tensor
    program_tasks: torch.Tensor
    merges: torch.Tensor
    num_slots: int


def _checked_table(params: AttentionParamsLike, where: str, table: Any, hq: int, hkv: int,
                   device: torch.device) -> _TableTensors:
    """The task table: built for the spec's block_q and the inputs' heads, its arrays consistent."""
    tq = _table_field(table, "block_q")
    if tq != params.block_q:
        raise _refusal(where, f"the task table was built with block_q={tq}, the kernel with {params.block_q}")
    if (_table_field(table, "num_q_heads"), _table_field(table, "num_kv_heads")) != (hq, hkv):
        raise _refusal(
            where,
            f"the task table was built for {table.num_q_heads} query / {table.num_kv_heads} "
            f"KV heads, the inputs have {hq} / {hkv}",
        )
    tasks = int_tensor("table.tasks", _table_field(table, "tasks"), device, 2)
    offsets = int_tensor("table.program_offsets", table.program_offsets, device, 1)
    prog_tasks = int_tensor("table.program_tasks", _table_field(table, "program_tasks"), device, 1)
    merges = int_tensor("table.merges", _table_field(table, "merges"), device, 2)
    num_slots = int(_table_field(table, "num_slots"))
    if tasks.shape[0] and tasks.shape[1] != TASK_COLS:
        raise _refusal(where, f"table.tasks must be [T, {TASK_COLS}], got {list(tasks.shape)}")
    if merges.shape[0] and merges.shape[1] != MERGE_COLS:
        raise _refusal(where, f"table.merges must be [G, {MERGE_COLS}], got {list(merges.shape)}")
    if offsets.numel() < 1 or prog_tasks.numel() != tasks.shape[0]:
        raise _refusal(
            where,
            f"table.program_offsets ({offsets.numel()} entries) / program_tasks "
            f"({prog_tasks.numel()}) do not describe the {tasks.shape[0]} tasks",
        )
    if merges.shape[0] and num_slots <= 0:
        raise _refusal(where, "the task table has merge rows but num_slots == 0")
    return _TableTensors(tasks, offsets, prog_tasks, merges, num_slots)


def _checked_metadata(where: str, block_table: Any, cu_seqlens_q: Any, seqlens_kv: Any,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch metadata as int32 on `device`, of one sequence count."""
    block_table = int_tensor("block_table", block_table, device, 2)
    cu_seqlens_q = int_tensor("cu_seqlens_q", cu_seqlens_q, device, 1)
    seqlens_kv = int_tensor("seqlens_kv", seqlens_kv, device, 1)
    num_seqs = seqlens_kv.shape[0]
    if cu_seqlens_q.shape[0] != num_seqs + 1 or block_table.shape[0] != num_seqs:
        raise _refusal(
            where,
            f"cu_seqlens_q must have S + 1 entries and block_table S rows for S={num_seqs} "
            f"sequences, got {cu_seqlens_q.shape[0]} and {block_table.shape[0]}",
        )
    return block_table, cu_seqlens_q, seqlens_kv


def _checked_window(params: AttentionParamsLike, where: str, sliding_window: Any) -> int | None:
    """The sliding window, an int >= 1, given exactly when the kernel was built with one."""
    if not params.sliding_window:
        if sliding_window is not None:
            raise _refusal(where, "sliding_window was given but the kernel was built without one")
        return None
    try:  # (int() of a NaN or an infinity raises: a window it is not)
        whole = (sliding_window is not None and not isinstance(sliding_window, bool)
                 and int(sliding_window) == sliding_window and sliding_window >= 1)
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole:
        raise _refusal(
            where,
            f"the kernel was built with a sliding window: pass sliding_window=<int >= 1>, got {sliding_window!r}",
        )
    return int(sliding_window)


def _checked_tree(params: AttentionParamsLike, where: str, tree_mask: Any, num_seqs: int,
                  device: torch.device) -> torch.Tensor | None:
    """The tree mask, bool [S, T, T] on `device`, given exactly when the kernel verifies trees."""
    if not params.tree:
        if tree_mask is not None:
            raise _refusal(where, "tree_mask was given but the kernel was built without tree support")
        return None
    if not isinstance(tree_mask, torch.Tensor) or tree_mask.dim() != 3:
        raise _refusal(where, "the kernel was built for tree verify: pass tree_mask bool [S, T, T]")
    if tree_mask.dtype != torch.bool:
        raise _refusal(where, f"tree_mask must be bool, got {dtype_name(tree_mask.dtype)}")
    if tree_mask.shape[0] != num_seqs or tree_mask.shape[1] != tree_mask.shape[2]:
        raise _refusal(where, f"tree_mask must be [S={num_seqs}, T, T], got {list(tree_mask.shape)}")
    return tree_mask.to(device)


def _checked_bias(params: AttentionParamsLike, where: str, attn_bias: Any, attn_bias_ranges: Any,
                  need_bias_ranges: bool, table: Any, tasks: torch.Tensor, num_seqs: int, hq: int,
                  device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The attention bias expanded to [S, Hq, q_len, kv_len] on `device`, given exactly when the
    kernel adds one, covering every query row and key the launch reads; and its ranges (see
    `bias_ranges`), expanded to [S, q_len, 4] (computed when missing and `need_bias_ranges`)."""
    if not params.bias:
        if attn_bias is not None or attn_bias_ranges is not None:
            raise _refusal(where, "attn_bias was given but the kernel was built without bias support")
        return None, None
    if (not isinstance(attn_bias, torch.Tensor) or attn_bias.dim() != 4
            or not (attn_bias.is_floating_point() or attn_bias.dtype == torch.bool)):
        raise _refusal(where, "the kernel was built with an attention bias: pass attn_bias [S, Hq, q_len, kv_len], "
                              "a float bias or a bool mask (True = attend)")
    if attn_bias.shape[0] not in (1, num_seqs) or attn_bias.shape[1] not in (1, hq):
        raise _refusal(
            where,
            f"attn_bias must broadcast to [S={num_seqs}, Hq={hq}, q_len, kv_len], got {list(attn_bias.shape)}",
        )
    # The kernels read bias[s, h, i, j] for every query row i < n_s and key j < L_s without
    # bounds checks: a smaller bias would be read past its end (silently, on the Triton target).
    need_q, need_kv = bias_extent(table, tasks, num_seqs)
    q_len, kv_len = attn_bias.shape[2], attn_bias.shape[3]
    if q_len < need_q or kv_len < need_kv:
        raise _refusal(
            where,
            f"attn_bias must cover every query row and key of the batch, [S, Hq, >= {need_q}, "
            f">= {need_kv}], got {list(attn_bias.shape)}",
        )
    bias = attn_bias.to(device).expand(num_seqs, hq, q_len, kv_len)
    if attn_bias_ranges is None and need_bias_ranges:
        attn_bias_ranges = bias_ranges(attn_bias)
    if attn_bias_ranges is None:
        return bias, None
    ranges = int_tensor("attn_bias_ranges", attn_bias_ranges, device, 3)
    if ranges.shape[0] not in (1, num_seqs) or ranges.shape[1] not in (1, q_len) or ranges.shape[2] != 4:
        raise _refusal(
            where,
            f"attn_bias_ranges must broadcast to [S={num_seqs}, q_len={q_len}, 4] (see bias_ranges), "
            f"got {list(ranges.shape)}",
        )
    return bias, ranges.expand(num_seqs, q_len, 4)


def _checked_softcap(params: AttentionParamsLike, where: str, softcap: Any) -> float | None:
    """The logit soft-cap, a finite number > 0, given exactly when the kernel caps logits."""
    if not params.softcap:
        if softcap is not None:
            raise _refusal(where, "softcap was given but the kernel was built without logit soft-capping")
        return None
    if (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
            or not math.isfinite(softcap) or softcap <= 0):
        raise _refusal(where, f"the kernel was built with logit soft-capping: pass softcap=<number > 0>, got {softcap!r}")
    return float(softcap)


def _checked_key_starts(params: AttentionParamsLike, where: str, key_starts: Any, table: Any, tasks: torch.Tensor,
                        num_seqs: int, device: torch.device) -> torch.Tensor | None:
    """Each query row's first visible key, int32 [S, >= max n_s] on `device`, given exactly when
    the kernel was built with key starts."""
    if not getattr(params, "key_starts", False):
        if key_starts is not None:
            raise _refusal(where, "key_starts were given but the kernel was built without key starts")
        return None
    if not isinstance(key_starts, torch.Tensor) or key_starts.dim() != 2:
        got = list(key_starts.shape) if isinstance(key_starts, torch.Tensor) else repr(key_starts)
        raise _refusal(
            where, f"the kernel was built with key starts: pass key_starts, an integer [S, max q_len] tensor, got {got}")
    if key_starts.dtype == torch.int64:
        # A wider start would wrap in int32 (2**32 to 0): clamped, it means the same (at or
        # before 0 no key hidden; int32's largest past every key).
        key_starts = key_starts.clamp(0, 2**31 - 1)
    starts = int_tensor("key_starts", key_starts, device, 2)
    need_q = bias_extent(table, tasks, num_seqs)[0]
    if starts.shape[0] != num_seqs or starts.shape[1] < need_q:
        raise _refusal(where, f"key_starts must cover every query row of the batch, [S={num_seqs}, >= {need_q}], "
                              f"got {list(starts.shape)}")
    return starts


def _per_head(where: str, name: str, value: Any, built: bool, what: str, hq: int,
              device: torch.device) -> torch.Tensor | None:
    """`value`, one float per query head, as float32 on `device`, given exactly when `built`."""
    if not built:
        if value is not None:
            raise _refusal(where, f"{name} were given but the kernel was built without {what}")
        return None
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.shape[0] != hq or not value.is_floating_point():
        got = f"{value.dtype} {list(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
        raise _refusal(where, f"the kernel was built with {what}: pass {name}, a float [Hq={hq}] tensor, got {got}")
    return value.to(device=device, dtype=torch.float32).contiguous()


def _check_table_masking(params: AttentionParamsLike, where: str, table: Any, tasks: torch.Tensor,
                         window: int | None) -> None:
    """The table's KV ranges were clipped for the launch's causal rule and window."""
    # A TaskTable records the masking its KV ranges were clipped for (a hand-built table may
    # not): ranges clipped for another causal rule or window silently drop keys this launch sees
    # (a table without tasks reads nothing).
    built_causal, built_window = getattr(table, "causal", None), getattr(table, "sliding_window", None)
    launch_causal = getattr(params, "causal", None)
    if tasks.shape[0] and hasattr(table, "causal") and launch_causal is not None and (
            bool(built_causal) != bool(launch_causal) or built_window != window):
        raise _refusal(
            where,
            f"the task table was built for causal={built_causal}, sliding_window={built_window} but is run "
            f"with causal={launch_causal}, sliding_window={window}: its KV ranges are clipped for "
            f"the former; rebuild it",
        )


def _checked_out(where: str, out: Any, q: torch.Tensor, dtype: str) -> torch.Tensor:
    """The output to write: the caller's (q's shape, dtype and device), or a new contiguous one."""
    if out is None:
        return torch.empty_like(q, memory_format=torch.contiguous_format)
    if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise _refusal(where, f"out must be a {dtype} tensor of shape {list(q.shape)} on {q.device}")
    return out


def softmax_scale(scale: Any, head_dim: int, where: str) -> float:
    """The softmax scale of a launch: `scale`, or 1/sqrt(head_dim) when it is None. A scale that
    is not a finite real number raises ValueError prefixed with `where` (a NaN scale would
    otherwise turn every output into NaN without a word)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and not scale.is_complex():
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"{where}: the softmax scale must be a finite number, got {scale!r}")
    return float(scale)


def additive_bias(bias: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An attention mask or bias as the additive `dtype` tensor a kernel adds to the scores: a
    bool mask (True = attend) gives 0 where True and -inf elsewhere; a float bias is cast, its
    finite values below `dtype`'s lowest becoming that lowest (transformers' finfo(float64).min
    masks would round to -inf in float32, and a row that sees only such keys would then output
    zeros where eager attention averages them; -inf stays -inf). Broadcast dims (stride 0) stay
    broadcast: only their distinct values are converted (a [1, 1, q, kv] mask expanded over
    sequences and heads is not copied once per sequence and head)."""
    distinct = bias[tuple(slice(0, 1) if stride == 0 and size > 1 else slice(None)
                          for size, stride in zip(bias.shape, bias.stride()))]
    if distinct.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=bias.device)
        out = torch.where(distinct, zero, float("-inf"))
    else:
        if distinct.is_floating_point() and torch.finfo(distinct.dtype).min < torch.finfo(dtype).min:
            low = torch.finfo(dtype).min
            distinct = torch.where(torch.isfinite(distinct) & (distinct < low), low, distinct)
        out = distinct.to(dtype)
    return out.expand(bias.shape)


def bias_ranges(attn_bias: torch.Tensor) -> torch.Tensor:
    """Where an additive attention bias lets each query row's keys matter, so kernels can skip
    the hidden blocks and run the blocks it leaves untouched without reading it.

    For `attn_bias` float ``[B, H, q_len, kv_len]`` (or a bool mask, True = seen with nothing
    added; any dim may be 1, or broadcast with stride 0), returns int32 ``[B', q_len', 4]`` (B'
    and q_len' are 1 where the bias does not vary along them) holding, per sequence and query
    row, key positions ``(lo, full_lo, full_hi, hi)`` over all heads:

    - every key some head sees lies in ``[lo, hi)``; a row that sees no key has
      ``lo = kv_len, hi = 0``. A key is hidden by -inf, and also by the lowest finite value of
      the bias dtype (``finfo.min``, which transformers' eager masks use) in a row of a head
      that sees some key above it: there it adds exactly nothing to the softmax (its exp
      underflows to 0 next to any real score). A row that sees nothing above ``finfo.min``
      keeps those keys, so it averages them as eager attention does;
    - ``[full_lo, full_hi)`` is the first run of keys whose bias is exactly 0 for every head:
      there the scores need neither the bias nor a mask (``full_lo = full_hi = kv_len`` when the
      row has no such key).

    A model's materialized causal mask (0 on and below the diagonal, -inf or ``finfo.min``
    above) gives row i ``(0, 0, i + 1, i + 1)``: the kernel then reads the bias only on the
    diagonal blocks and skips the blocks above them, as for `causal=True`. The cost is a few
    passes over the bias.
    """
    if (not isinstance(attn_bias, torch.Tensor) or attn_bias.dim() != 4
            or not (attn_bias.is_floating_point() or attn_bias.dtype == torch.bool)):
        got = (f"{list(attn_bias.shape)} {attn_bias.dtype}" if isinstance(attn_bias, torch.Tensor)
               else type(attn_bias).__name__)
        raise ValueError(f"bias_ranges needs a float attention bias or bool mask [B, H, q_len, kv_len], got {got}")
    kv_len = attn_bias.shape[3]
    # Work on the distinct values only: a dim broadcast with stride 0 holds one.
    bias = attn_bias
    for dim in range(3):
        if bias.stride(dim) == 0 and bias.shape[dim] > 1:
            bias = bias.narrow(dim, 0, 1)
    if bias.dtype == torch.bool:  # [B', q_len', kv_len]
        seen, plain = (bias[:, 0], bias[:, 0]) if bias.shape[1] == 1 else (bias.any(dim=1), bias.all(dim=1))
    else:
        # Negated comparisons: a NaN entry counts as seen (and real), so the kernels read it and
        # its row comes out NaN as in eager attention instead of losing that key silently.
        seen, real = ~(bias == float("-inf")), ~(bias <= torch.finfo(bias.dtype).min)
        seen = torch.where(real.any(dim=3, keepdim=True), real, seen)
        plain = bias == 0
        seen, plain = (seen[:, 0], plain[:, 0]) if bias.shape[1] == 1 else (seen.any(dim=1), plain.all(dim=1))
    if kv_len == 0:
        shape = (*seen.shape[:2], 1)
        zero = torch.zeros(shape, dtype=torch.int32, device=bias.device)
        return torch.cat([zero, zero, zero, zero], dim=2)
    # max over bools gives whether any key is True and, documented, the index of the first True.
    any_seen, lo = seen.max(dim=2)
    _, last = seen.flip(2).max(dim=2)
    any_plain, full_lo = plain.max(dim=2)
    full_lo = torch.where(any_plain, full_lo, kv_len)
    keys = torch.arange(kv_len, device=bias.device)
    any_past, full_hi = ((keys >= full_lo[..., None]) & ~plain).max(dim=2)
    full_hi = torch.where(any_past, full_hi, kv_len)
    lo = torch.where(any_seen, lo, kv_len)
    hi = torch.where(any_seen, kv_len - last, 0)
    return torch.stack([lo, full_lo, full_hi, hi], dim=2).to(torch.int32)
