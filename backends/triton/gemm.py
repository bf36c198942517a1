"""The padded fixed-tile GEMM for the Triton target (XY-Serve SmoothGEMM with virtual padding).

`out[M, N] = epilogue(x[M, K] @ weight[N, K]^T)`, like `F.linear` plus a fused epilogue.

M is the token count and changes on every call, so it is a *runtime* argument of the kernel (and
excluded from Triton's integer specialization): one compiled kernel per KernelSpec serves every M.
The tail M tile is handled by masked loads and stores ("virtual padding"): no padded copy of x is
ever made and only real rows are read or written. N and K come from the spec and are compile-time
constants; they need not be multiples of the tile either (their tails are masked too, and the K
mask is left out of the source when K is a multiple of BLOCK_K).

Two functions make up the backend's GEMM support:

- `render_gemm_source(spec)` turns the spec into readable Triton source text (the text is saved
  in the artifact directory and shown by the visualizer);
- `make_gemm_launcher(spec, kernel_fn)` wraps the built `@triton.jit` function in a launcher that
  validates its inputs, allocates the output and computes the grid from M at call time.

`backends/triton/build.py` glues them together (write the source to a file, import it, cache).
"""

from __future__ import annotations

import inspect
import os
import textwrap
from typing import Any, Callable

import torch

from tileflow.kernel_spec import KernelSpec, dtype_name

from .build import kernel_identifier

__all__ = [
    "ACTIVATION_EPILOGUES",
    "SUPPORTED_DTYPES",
    "kernel_identifier",
    "render_gemm_source",
    "make_gemm_launcher",
]

# Input/output dtypes the kernel supports; float64 is left to the reference backend because
# tl.dot has no fp64 path on every GPU Triton targets.
SUPPORTED_DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32")
# At most one of these may appear in an epilogue: each one replaces the accumulator.
ACTIVATION_EPILOGUES: tuple[str, ...] = ("silu", "gelu", "gelu_tanh", "swiglu")
# tl.dot needs every tile dimension to be at least 16 on GPUs.
_MIN_BLOCK = 16


# --------------------------------------------------------------------------------------------
# Helpers shared by the renderer and the launcher
# --------------------------------------------------------------------------------------------


def _gemm_dims(spec: KernelSpec) -> tuple[int, int]:
    """(N, K) of a GEMM spec, validated; N is the *output* width (half the rows for swiglu)."""
    n, k = spec.param("n"), spec.param("k")
    for key, value in (("n", n), ("k", k)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(
                f"padded_gemm spec needs a positive integer param {key!r}, got {value!r} "
                f"(build params with make_params(n=..., k=...))"
            )
    return n, k


def _check_spec(spec: KernelSpec) -> None:
    """Reject specs this kernel cannot implement, with a message that says why."""
    if spec.op != "padded_gemm":
        raise ValueError(f"render_gemm_source handles op 'padded_gemm', not {spec.op!r}")
    if spec.tile is None:
        raise ValueError(f"padded_gemm spec {spec.name} has no TileConfig")
    for name in ("dtype", "out_dtype"):
        if getattr(spec, name) not in SUPPORTED_DTYPES:
            raise ValueError(
                f"the Triton padded_gemm supports {name} in {SUPPORTED_DTYPES}, "
                f"got {getattr(spec, name)!r}"
            )
    if "cast" not in spec.epilogue and spec.out_dtype != spec.dtype:
        raise ValueError(
            f"out_dtype {spec.out_dtype!r} differs from dtype {spec.dtype!r} but the epilogue has "
            f"no 'cast' (epilogue={spec.epilogue})"
        )
    acts = [e for e in spec.epilogue if e in ACTIVATION_EPILOGUES]
    if len(acts) > 1:
        raise ValueError(f"at most one activation per GEMM epilogue, got {acts}")
    if len(set(spec.epilogue)) != len(spec.epilogue):
        raise ValueError(f"repeated epilogue entry in {spec.epilogue}")
    tile = spec.tile
    for name in ("block_m", "block_n", "block_k"):
        if getattr(tile, name) < _MIN_BLOCK:
            raise ValueError(
                f"TileConfig.{name}={getattr(tile, name)} is too small for tl.dot "
                f"(minimum {_MIN_BLOCK})"
            )
    if tile.group_m <= 0:
        raise ValueError(f"TileConfig.group_m must be positive, got {tile.group_m}")
    _gemm_dims(spec)


def _erf_expr() -> str:
    """`tl.math.erf` or `tl.erf`, whichever the installed Triton has (3.6-3.9 differ)."""
    import triton.language as tl

    if hasattr(tl, "math") and hasattr(tl.math, "erf"):
        return "tl.math.erf"
    if hasattr(tl, "erf"):
        return "tl.erf"
    raise RuntimeError("this Triton has neither tl.math.erf nor tl.erf (needed by 'gelu')")


def _dot_precision_kwarg(dtype: str) -> str:
    """Extra tl.dot keyword that keeps fp32 inputs in exact IEEE fp32 (no TF32)."""
    if dtype != "float32":
        return ""
    import triton.language as tl

    params = inspect.signature(tl.dot).parameters
    if "input_precision" in params:
        return ', input_precision="ieee"'
    return ", allow_tf32=False"  # older spelling of the same thing


# --------------------------------------------------------------------------------------------
# Source rendering
# --------------------------------------------------------------------------------------------

_HEADER = '''\
"""Generated by tileflow (Triton backend): padded fixed-tile GEMM.

kernel   : {kname}
op       : out[M, {n}] = {formula}
dtypes   : {dtype} inputs, fp32 accumulation, {out_dtype} output
tile     : BLOCK_M={bm} BLOCK_N={bn} BLOCK_K={bk} GROUP_M={gm} num_warps={nw} num_stages={ns}
schedule : {schedule}

M (the token count) is a runtime argument, so one compiled kernel serves every M. The tail M tile
uses masked loads/stores (virtual padding): no padded copy of x, only real rows are touched.
"""

import triton
import triton.language as tl
'''


def _formula(spec: KernelSpec) -> str:
    """One-line math description of what the kernel computes, for the header."""
    ep = spec.epilogue
    b = " + bias" if "bias" in ep else ""
    if "swiglu" in ep:
        bg, bu = (" + bias_gate", " + bias_up") if "bias" in ep else ("", "")
        expr = f"silu(x @ W_gate^T{bg}) * (x @ W_up^T{bu})"
    else:
        expr = f"x @ W^T{b}"
        for act in ("silu", "gelu", "gelu_tanh"):
            if act in ep:
                expr = f"{act}({expr})"
    if "residual" in ep:
        expr = f"{expr} + residual"
    return expr


def _signature(spec: KernelSpec, persistent: bool) -> str:
    """The kernel's parameter list (one argument or argument group per line)."""
    ep = spec.epilogue
    lines = ["x_ptr, w_ptr, out_ptr,"]
    if "swiglu" in ep:
        lines.append("wu_ptr,  # up-projection weight: its own pointer, so it need not be stacked")
    if "bias" in ep:
        lines.append("bias_ptr,")
        if "swiglu" in ep:
            lines.append("bias_up_ptr,")
    if "residual" in ep:
        lines.append("res_ptr,")
    lines.append("M,  # token count: runtime value, never specialized on (no recompiles)")
    lines.append("stride_xm, stride_xk,")
    lines.append("stride_wn, stride_wk,  # any layout: weight may be a transposed view")
    if "swiglu" in ep:
        lines.append("stride_wun, stride_wuk,")
    if "residual" in ep:
        lines.append("stride_rm, stride_rn,")
    lines.append("stride_om, stride_on,")
    if persistent:
        lines.append("NUM_PROGRAMS,  # grid size; capped by nano-batching to share the SMs")
    lines.append("N: tl.constexpr, K: tl.constexpr,")
    lines.append("BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,")
    lines.append("GROUP_M: tl.constexpr,")
    return "\n".join("    " + line for line in lines)


def _tile_body(spec: KernelSpec, tile_var: str) -> str:
    """Code that computes one output tile, numbered `tile_var`, at indentation zero."""
    ep = spec.epilogue
    n, k = _gemm_dims(spec)
    swiglu = "swiglu" in ep
    even_k = k % spec.tile.block_k == 0
    dot_kw = _dot_precision_kwarg(spec.dtype)
    out_tl = f"tl.{spec.out_dtype}"

    code: list[str] = []
    add = code.append
    add(
        f"""\
# Grouped tile order: GROUP_M row-tiles sweep N together, so the weight
# tiles they share stay in L2.
group_id = {tile_var} // num_pid_in_group
first_pid_m = group_id * GROUP_M
group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
pid_m = first_pid_m + (({tile_var} % num_pid_in_group) % group_size_m)
pid_n = ({tile_var} % num_pid_in_group) // group_size_m

offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
offs_k = tl.arange(0, BLOCK_K)
mask_m = offs_m < M  # virtual padding: rows past M are never read or written
mask_n = offs_n < N

# Row offsets in int64: M * stride can overflow int32 on very long batches.
rows = offs_m[:, None].to(tl.int64)
cols = offs_n[None, :]
x_ptrs = x_ptr + rows * stride_xm + offs_k[None, :] * stride_xk
# The weight tile is read as W^T [BLOCK_K, BLOCK_N] straight from [N, K] storage.
w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols.to(tl.int64) * stride_wn"""
    )
    if swiglu:
        add(
            """\
# SwiGLU: W is the gate projection and Wu the up projection of the same output columns (the
# [2N, K] concatenation, kept as two operands so no stacked copy is ever made); one program
# keeps both accumulators so x is read only once.
wu_ptrs = wu_ptr + offs_k[:, None] * stride_wuk + cols.to(tl.int64) * stride_wun
acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)"""
        )
    else:
        add("acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)")

    if even_k:
        x_mask, w_mask = "mask_m[:, None]", "mask_n[None, :]"
        loop_note = f"# K = {k} is a multiple of BLOCK_K: only the M and N tails need masks."
    else:
        x_mask = "mask_m[:, None] & (offs_k[None, :] < K - k0)"
        w_mask = "(offs_k[:, None] < K - k0) & mask_n[None, :]"
        loop_note = f"# K = {k} is not a multiple of BLOCK_K: the last K step is masked too."
    loop = [
        loop_note,
        "for k0 in range(0, K, BLOCK_K):",
        f"    a = tl.load(x_ptrs, mask={x_mask}, other=0.0)",
    ]
    if swiglu:
        loop += [
            f"    wg = tl.load(w_ptrs, mask={w_mask}, other=0.0)",
            f"    wu = tl.load(wu_ptrs, mask={w_mask}, other=0.0)",
            f"    acc_gate = tl.dot(a, wg, acc_gate{dot_kw})",
            f"    acc_up = tl.dot(a, wu, acc_up{dot_kw})",
        ]
    else:
        loop += [
            f"    w = tl.load(w_ptrs, mask={w_mask}, other=0.0)",
            f"    acc = tl.dot(a, w, acc{dot_kw})",
        ]
    loop += [
        "    x_ptrs += BLOCK_K * stride_xk",
        "    w_ptrs += BLOCK_K * stride_wk",
    ]
    if swiglu:
        loop.append("    wu_ptrs += BLOCK_K * stride_wuk")
    add("\n".join(loop))

    # ---- epilogue, in EPILOGUES order, on the fp32 accumulator ----
    epi: list[str] = ["# Epilogue, fused on the fp32 accumulator."]
    if "bias" in ep:
        if swiglu:
            epi += [
                "bias_gate = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)",
                "bias_up = tl.load(bias_up_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)",
                "acc_gate += bias_gate[None, :]",
                "acc_up += bias_up[None, :]",
            ]
        else:
            epi += [
                "bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)",
                "acc += bias[None, :]",
            ]
    if "silu" in ep:
        epi += ["acc = acc * _sigmoid(acc)  # silu"]
    if "gelu" in ep:
        erf = _erf_expr()
        epi += [f"acc = 0.5 * acc * (1.0 + {erf}(acc * 0.7071067811865476))  # gelu, erf form"]
    if "gelu_tanh" in ep:
        epi += [
            "# gelu, tanh approximation: 0.5 a (1 + tanh(sqrt(2/pi) (a + 0.044715 a^3)))",
            "inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)",
            "acc = 0.5 * acc * (1.0 + _tanh(inner))",
        ]
    if swiglu:
        epi += ["acc = acc_gate * _sigmoid(acc_gate) * acc_up  # silu(gate) * up"]
    epi += ["", "mask_out = mask_m[:, None] & mask_n[None, :]"]
    if "residual" in ep:
        epi += [
            "res_ptrs = res_ptr + rows * stride_rm + cols * stride_rn",
            "acc += tl.load(res_ptrs, mask=mask_out, other=0.0).to(tl.float32)",
        ]
    epi += [
        "out_ptrs = out_ptr + rows * stride_om + cols * stride_on",
        f"tl.store(out_ptrs, acc.to({out_tl}), mask=mask_out)",
    ]
    add("\n".join(epi))
    return "\n\n".join(code)


_SIGMOID_HELPER = '''\
@triton.jit
def _sigmoid(a):
    # exp of a non-positive number only, so it never overflows (the interpreter warns on inf).
    e = tl.exp(-tl.abs(a))
    return tl.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
'''

_TANH_HELPER = '''\
@triton.jit
def _tanh(u):
    # tanh from exp alone (tl.math has no tanh on every Triton 3.x); exp(-2|u|) <= 1 never
    # overflows.
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u >= 0, t, -t)
'''


def _helpers(spec: KernelSpec) -> str:
    """The small @triton.jit helper functions the epilogue uses (only those it needs)."""
    parts = []
    if "silu" in spec.epilogue or "swiglu" in spec.epilogue:
        parts.append(_SIGMOID_HELPER)
    if "gelu_tanh" in spec.epilogue:
        parts.append(_TANH_HELPER)
    return "".join("\n\n" + p for p in parts)


def render_gemm_source(spec: KernelSpec) -> str:
    """Generate the Triton source module for a `padded_gemm` KernelSpec.

    The module imports `triton` and `triton.language as tl` and defines one `@triton.jit` kernel
    named `kernel_identifier(spec)`. Only the epilogues present in `spec.epilogue` get code; fp32
    inputs use IEEE (non-TF32) dots. With `params.persistent=True` the kernel is persistent:
    `NUM_PROGRAMS` programs each loop over tiles `pid, pid + NUM_PROGRAMS, ...`.

    Raises ValueError for a spec the kernel cannot implement (wrong op, no tile, unsupported
    dtype, several activations, tiles below 16, missing n/k).
    """
    _check_spec(spec)
    n, k = _gemm_dims(spec)
    tile = spec.tile
    persistent = bool(spec.param("persistent", False))
    kname = kernel_identifier(spec)

    header = _HEADER.format(
        kname=kname,
        n=n,
        formula=_formula(spec),
        dtype=spec.dtype,
        out_dtype=spec.out_dtype,
        bm=tile.block_m,
        bn=tile.block_n,
        bk=tile.block_k,
        gm=tile.group_m,
        nw=tile.num_warps,
        ns=tile.num_stages,
        schedule=(
            "persistent: min(num_tiles, NUM_PROGRAMS) programs loop over the tiles"
            if persistent
            else "one program per output tile (grid = cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N))"
        ),
    )
    no_spec = '["M", "NUM_PROGRAMS"]' if persistent else '["M"]'
    prologue = """\
pid = tl.program_id(axis=0)
num_pid_m = tl.cdiv(M, BLOCK_M)
num_pid_n = tl.cdiv(N, BLOCK_N)
num_pid_in_group = GROUP_M * num_pid_n"""

    if persistent:
        body = (
            prologue
            + "\nnum_tiles = num_pid_m * num_pid_n\n\n"
            + "# Persistent schedule: each program walks the tile list with stride NUM_PROGRAMS.\n"
            + "for tile_id in range(pid, num_tiles, NUM_PROGRAMS):\n"
            + textwrap.indent(_tile_body(spec, "tile_id"), "    ", lambda line: bool(line.strip()))
        )
    else:
        body = prologue + "\n\n" + _tile_body(spec, "pid")

    return (
        header
        + _helpers(spec)
        + "\n\n"
        + "# M (and the grid size) are excluded from integer specialization: a new token\n"
        + "# count reuses the compiled kernel, no variant for M % 16 == 0 or M == 1.\n"
        + f"@triton.jit(do_not_specialize={no_spec})\n"
        + f"def {kname}(\n{_signature(spec, persistent)}\n):\n"
        + textwrap.indent(body, "    ", lambda line: bool(line.strip()))
        + "\n"
    )


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------

_SM_COUNT: dict[int, int] = {}


def _default_num_programs(device: torch.device) -> int:
    """Default persistent grid size: one program per SM on CUDA, per CPU core otherwise."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _SM_COUNT:
            _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
        return _SM_COUNT[index]
    return os.cpu_count() or 1


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def make_gemm_launcher(spec: KernelSpec, kernel_fn: Any) -> Callable[..., torch.Tensor]:
    """Wrap a built `padded_gemm` kernel in a launcher.

    Returns `launch(x, weight, bias=None, residual=None, *, out=None, num_programs=None)`:

    - `x` is [M, K] of the spec dtype (any M, any strides); `weight` is [N, K] ([2N, K] for
      swiglu) of the spec dtype, any strides (a transposed view works);
    - `bias` ([N], or [2N] for swiglu) and `residual` ([M, N]) must be given exactly when the
      epilogue has them; their dtype is the spec dtype or out_dtype;
    - `out`, when given, must be [M, N] of out_dtype and is written in place (any strides);
    - `num_programs` caps the grid of a persistent kernel (default: SM count on CUDA); it is an
      error for a non-persistent spec, whose grid cannot be capped without dropping tiles.

    M == 0 returns the (empty) output without launching. Bad inputs raise ValueError.
    """
    _check_spec(spec)
    n, k = _gemm_dims(spec)
    tile = spec.tile
    ep = spec.epilogue
    swiglu = "swiglu" in ep
    has_bias, has_res = "bias" in ep, "residual" in ep
    persistent = bool(spec.param("persistent", False))
    in_dtype, out_dtype = _torch_dtype(spec.dtype), _torch_dtype(spec.out_dtype)
    w_rows = 2 * n if swiglu else n
    side_dtypes = {in_dtype, out_dtype}
    where = f"kernel {spec.name}"

    def _check_tensor(name: str, t: Any, shape: tuple[int, ...], dtypes: set[torch.dtype],
                      device: torch.device) -> None:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{where}: {name} must have shape {list(shape)}, got {list(t.shape)}")
        if t.dtype not in dtypes:
            want = " or ".join(sorted(dtype_name(d) for d in dtypes))
            raise ValueError(f"{where}: {name} must be {want}, got {dtype_name(t.dtype)}")
        if t.device != device:
            raise ValueError(f"{where}: {name} is on {t.device} but x is on {device}")

    def launch(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        *,
        out: torch.Tensor | None = None,
        num_programs: int | None = None,
        weight_up: torch.Tensor | None = None,
        bias_up: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the kernel: `out[M, N] = epilogue(x @ weight^T)`; returns `out`.

        For swiglu, the gate and up operands are either stacked (`weight` [2N, K], `bias` [2N])
        or separate (`weight` and `weight_up` [N, K], `bias` and `bias_up` [N]).
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{where}: x must be a 2-D [M, K={k}] tensor, got {got}")
        m = x.shape[0]
        device = x.device
        _check_tensor("x", x, (m, k), {in_dtype}, device)
        if (weight_up is not None or bias_up is not None) and not swiglu:
            raise ValueError(f"{where}: weight_up/bias_up are for the swiglu epilogue only")
        if swiglu and weight_up is not None:
            _check_tensor("weight", weight, (n, k), {in_dtype}, device)
            _check_tensor("weight_up", weight_up, (n, k), {in_dtype}, device)
        else:
            _check_tensor("weight", weight, (w_rows, k), {in_dtype}, device)
            if swiglu:
                weight, weight_up = weight[:n], weight[n:]
        if has_bias:
            if bias is None:
                raise ValueError(f"{where}: the epilogue has 'bias' but no bias was given")
            if swiglu and bias_up is not None:
                _check_tensor("bias", bias, (n,), side_dtypes, device)
                _check_tensor("bias_up", bias_up, (n,), side_dtypes, device)
            else:
                _check_tensor("bias", bias, (w_rows,), side_dtypes, device)
                if swiglu:
                    bias, bias_up = bias[:n], bias[n:]
        elif bias_up is not None:
            raise ValueError(f"{where}: a bias_up was given but the epilogue {ep} has no 'bias'")
        elif bias is not None:
            raise ValueError(f"{where}: a bias was given but the epilogue {ep} has no 'bias'")
        if has_res:
            if residual is None:
                raise ValueError(f"{where}: the epilogue has 'residual' but no residual was given")
            _check_tensor("residual", residual, (m, n), side_dtypes, device)
        elif residual is not None:
            raise ValueError(
                f"{where}: a residual was given but the epilogue {ep} has no 'residual'"
            )
        if out is None:
            out = torch.empty((m, n), dtype=out_dtype, device=device)
        else:
            _check_tensor("out", out, (m, n), {out_dtype}, device)
        if num_programs is not None:
            if not persistent:
                raise ValueError(
                    f"{where}: num_programs caps the grid of a persistent kernel only; "
                    f"build the spec with make_params(..., persistent=True)"
                )
            if not isinstance(num_programs, int) or num_programs < 1:
                raise ValueError(
                    f"{where}: num_programs must be a positive int, got {num_programs!r}"
                )
        if m == 0:
            return out  # nothing to compute (an empty grid is an error on some versions)

        # The grid is computed from M at call time; the kernel itself is M-agnostic.
        num_tiles = _cdiv(m, tile.block_m) * _cdiv(n, tile.block_n)
        args: list[Any] = [x, weight, out]
        if swiglu:
            args.append(weight_up)
        if has_bias:
            args.append(bias)
            if swiglu:
                args.append(bias_up)
        if has_res:
            args.append(residual)
        args += [m, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1)]
        if swiglu:
            args += [weight_up.stride(0), weight_up.stride(1)]
        if has_res:
            args += [residual.stride(0), residual.stride(1)]
        args += [out.stride(0), out.stride(1)]
        if persistent:
            cap = num_programs if num_programs is not None else _default_num_programs(device)
            grid_size = min(num_tiles, cap)
            args.append(grid_size)
        else:
            grid_size = num_tiles
        kernel_fn[(grid_size,)](
            *args,
            N=n,
            K=k,
            BLOCK_M=tile.block_m,
            BLOCK_N=tile.block_n,
            BLOCK_K=tile.block_k,
            GROUP_M=tile.group_m,
            num_warps=tile.num_warps,
            num_stages=tile.num_stages,
        )
        return out

    launch.kernel = kernel_fn  # type: ignore[attr-defined]  # the JIT function, for inspection
    launch.spec = spec  # type: ignore[attr-defined]
    return launch


def _cdiv(a: int, b: int) -> int:
    """Ceiling division on host ints (same as `triton.cdiv`, without importing triton here)."""
    return -(-a // b)
