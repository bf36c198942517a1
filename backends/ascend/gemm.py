"""The padded fixed-tile GEMM for the Ascend C target (XY-Serve SmoothGEMM with virtual padding).

`out[M, N] = epilogue(x[M, K] @ weight[N, K]^T)`, like `F.linear` plus a fused epilogue, from the
same `padded_gemm` KernelSpec as the Triton kernel; and its grouped (MoE) form, `grouped_gemm`:
rows sorted by expert, expert e's rows `offsets[e-1]:offsets[e]` times its own weight [N, K].

How the emitted kernel maps onto an AI core (cube unit + vector unit, no datapath between them
but GM and the queues):

- the output is cut in BLOCK_M x BLOCK_N tiles, numbered in the grouped (L2-friendly) order; the
  launch is persistent: block b of `blockDim = min(tiles, cores)` computes tiles b, b + blockDim, ...
  so the grid never depends on M beyond the host tiling;
- the cube computes a tile with the high-level Matmul API straight from GM (`SetTensorA` on x's
  rows, `SetTensorB` on the weight rows, transposed), with `SetSingleShape(rows, cols, K)` giving
  the *real* extent: the M tail is never padded in memory (virtual padding) and only real rows of
  x are read;
- the vector unit applies the epilogue on the float accumulator in the unified buffer (UB): bias
  (a float row, host-converted), the activation (SiLU, GELU, GELU-tanh, ReLU, squared ReLU, or
  a gated one, SwiGLU or GeGLU, with a second Matmul over the up weights), the residual (DataCopyPad of the real
  rows/columns), the cast (with `round`, through the input dtype first: float -> half/bfloat16
  -> the output dtype), and writes the real rows/columns back with DataCopyPad;
- UB is 192 KiB: the epilogue works on `UB_ROWS`-row slices of the tile (UB_ROWS = BLOCK_M when it
  fits), queues double-buffered when they fit, so a large tile still runs.

The grouped form deals (M-tile slot, N tile) pairs over the blocks, where the slots bound every
grouping (ceil(M / BLOCK_M) + E): a block finds its expert by scanning the E offsets in GM, so the
host never reads them; each group's tail tile holds only its own rows.

`render_gemm_sources(spec)` emits the project files of either form; `make_gemm_launcher` and
`make_grouped_gemm_launcher` validate a launch, run the host tiling and launch through a runner
(the CPU-debug library or the NPU operator).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tileflow.gemm_operands import gemm_operands, grouped_gemm_operands
from tileflow.kernel_spec import (
    ACTIVATIONS,
    CLAMPED_SWIGLU,
    GATED_ACTIVATIONS,
    KernelSpec,
    check_gemm_spec,
    clamped_swiglu_params,
    gated_activation,
    gemm_dims,
    gemm_formula,
    grouped_gemm_dims,
    is_gated,
)

from .sources import (
    EntryPoint, HostCall, KernelRun, KernelSources, banner, cpp_type, cpu_runner, kernel_ident, launch_stub,
    tiling_struct_name, torch_binding,
)

__all__ = [
    "SUPPORTED_DTYPES",
    "UB_BYTES",
    "MAX_BLOCK_DIM",
    "GemmLayout",
    "check_num_programs",
    "gemm_entry",
    "gemm_layout",
    "make_gemm_launcher",
    "make_grouped_gemm_launcher",
    "render_gemm_sources",
    "sys_workspace",
]

SUPPORTED_DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32")
# The cube works on 16 x 16 fractals: a tile side below 16 wastes the cube and breaks alignment.
_MIN_BLOCK = 16
# Unified buffer per AI core on Atlas A2 (910B), the vector unit's working memory.
UB_BYTES = 192 * 1024
# Cube L0 buffers on 910B: A and B operand base blocks 64 KiB each, the float accumulator 128 KiB
# (matmul_tiling refuses a fixed split beyond them, so the host tiling would fail at launch).
L0AB_BYTES = 64 * 1024
L0C_BYTES = 128 * 1024
# Matmul API names of the element types, for the host tiling.
_API_DTYPES = {"float16": "DT_FLOAT16", "bfloat16": "DT_BF16", "float32": "DT_FLOAT"}
_CPP_BYTES = {"half": 2, "bfloat16_t": 2, "float": 4}
# Most blocks one kernel launch takes (`<<<blockDim, ...>>>`; CANN caps blockDim at 65535). The
# host tiling takes the cap as a uint32, so a larger value would wrap instead of failing.
MAX_BLOCK_DIM = 65535


def check_num_programs(num_programs: Any, where: str) -> None:
    """ValueError unless `num_programs` is None or an int in [1, MAX_BLOCK_DIM]."""
    if num_programs is None:
        return
    if isinstance(num_programs, bool) or not isinstance(num_programs, int) or not 1 <= num_programs <= MAX_BLOCK_DIM:
        raise ValueError(
            f"{where}: num_programs must be an int in [1, {MAX_BLOCK_DIM}] (the blocks of one Ascend launch), "
            f"got {num_programs!r}"
        )


@dataclass(frozen=True)
class GemmLayout:
    """How one GEMM spec uses an AI core: tile sizes, the UB slice and its buffers."""

    n: int
    k: int
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    ub_rows: int  # rows of the tile the vector epilogue holds in UB at once
    buffer_num: int  # depth of the streamed queues (2 = double buffering)
    in_type: str
    out_type: str
    activation: str | None
    bias: bool
    residual: bool
    experts: int = 0  # grouped (MoE) GEMM: the weight is [experts, N, K]; 0 for a plain GEMM
    rounds: bool = False  # `round`: the result goes through InT (the input dtype) on its way to OutT
    clamp: tuple[float, float] | None = None  # clamped_swiglu's (alpha, limit)

    @property
    def gated(self) -> bool:
        """Two Matmuls per tile (gate and up), combined as act(gate) * up (SwiGLU, GeGLU)."""
        return is_gated(self.activation)

    @property
    def needs_scratch(self) -> bool:
        """A float scratch buffer for the epilogue: the activations built from exponentials and
        the residual's conversion need one; ReLU works in place."""
        return self.activation not in (None, "relu", "relu2") or self.residual

    @property
    def res_type(self) -> str:
        """The kernel's name of the residual's element type: OutT (the launcher converts the
        residual to the output dtype), or InT with `round`, whose residual has the GEMM's dtype
        (converting a float16 residual to bfloat16 would lose bits)."""
        return "InT" if self.rounds else "OutT"


@dataclass(frozen=True)
class UbBuffer:
    """One unified-buffer allocation of the kernel: a queue (`depth` buffers) or a TBuf (depth 0).

    The same table sizes the UB budget and emits the member declarations and `InitBuffer` calls,
    so what Python budgets is exactly what the kernel asks for.
    """

    name: str
    position: str  # VECIN / VECOUT (queues) or VECCALC (scratch)
    elem: str  # C++ element type of the byte count (as the kernel spells it: float, OutT)
    elem_bytes: int
    per_row: bool  # UB_ROWS x BLOCK_N elements, else BLOCK_N
    queue: bool
    comment: str = ""

    def bytes(self, layout: "GemmLayout") -> int:
        """Bytes this buffer takes (InitBuffer rounds every buffer up to 32 bytes; ours are multiples)."""
        count = (layout.ub_rows if self.per_row else 1) * layout.block_n * self.elem_bytes
        return count * (layout.buffer_num if self.queue else 1)

    def declaration(self) -> str:
        """The class member."""
        kind = f"TQue<QuePosition::{self.position}, BUFFER_NUM>" if self.queue else f"TBuf<TPosition::{self.position}>"
        return f"    {kind} {self.name};" + (f"  // {self.comment}" if self.comment else "")

    def init(self) -> str:
        """The `InitBuffer` call in Init."""
        size = ("UB_ROWS * " if self.per_row else "") + f"BLOCK_N * sizeof({self.elem})"
        depth = "BUFFER_NUM, " if self.queue else ""
        return f"        pipe->InitBuffer({self.name}, {depth}{size});"


def ub_buffers(layout: "GemmLayout") -> list[UbBuffer]:
    """Every UB allocation of a GEMM kernel with this layout, in declaration order."""
    out_elem, out_bytes = "OutT", _CPP_BYTES[layout.out_type]
    res_bytes = _CPP_BYTES[layout.in_type if layout.rounds else layout.out_type]
    buffers = [UbBuffer("accQue", "VECIN", "float", 4, True, True)]
    if layout.gated:
        buffers.append(UbBuffer("upQue", "VECIN", "float", 4, True, True))
    if layout.residual:
        buffers.append(UbBuffer("resQue", "VECIN", layout.res_type, res_bytes, True, True))
    buffers.append(UbBuffer("outQue", "VECOUT", out_elem, out_bytes, True, True))
    if layout.needs_scratch:
        buffers.append(UbBuffer("tmpBuf", "VECCALC", "float", 4, True, False, "activation / residual scratch (float)"))
    if layout.bias:
        buffers.append(UbBuffer("biasBuf", "VECCALC", "float", 4, False, False, "this tile's bias columns (float)"))
        if layout.gated:
            buffers.append(UbBuffer("biasUpBuf", "VECCALC", "float", 4, False, False))
    if layout.rounds:
        buffers.append(UbBuffer("roundBuf", "VECCALC", "InT", _CPP_BYTES[layout.in_type], True, False,
                                "the result rounded to the input dtype (`round`)"))
    return buffers


def gemm_layout(spec: KernelSpec) -> GemmLayout:
    """Validate `spec` (`padded_gemm` or `grouped_gemm`) for the Ascend C kernel and size its UB
    use; ValueError says why not."""
    if spec.op not in ("padded_gemm", "grouped_gemm"):
        raise ValueError(f"the Ascend C GEMM kernel handles padded_gemm and grouped_gemm, not {spec.op!r}")
    check_gemm_spec(spec, SUPPORTED_DTYPES, "Ascend C", _MIN_BLOCK, op=spec.op)
    n, k = gemm_dims(spec)
    experts = grouped_gemm_dims(spec)[2] if spec.op == "grouped_gemm" else 0
    tile = spec.tile
    ep = spec.epilogue
    activation = next((e for e in ep if e in ACTIVATIONS), None)
    in_bytes = _CPP_BYTES[cpp_type(spec.dtype)]
    fits_ub = False
    # Largest UB slice first, double-buffered first: halve the rows, then drop to one buffer.
    for rows in [tile.block_m >> i for i in range(tile.block_m.bit_length()) if tile.block_m >> i >= _MIN_BLOCK]:
        for buffers in (2, 1):
            layout = GemmLayout(
                n=n, k=k, block_m=tile.block_m, block_n=tile.block_n, block_k=tile.block_k,
                group_m=tile.group_m, ub_rows=rows, buffer_num=buffers,
                in_type=cpp_type(spec.dtype), out_type=cpp_type(spec.out_dtype),
                activation=activation, bias="bias" in ep, residual="residual" in ep, experts=experts,
                rounds="round" in ep, clamp=clamped_swiglu_params(spec) if activation == CLAMPED_SWIGLU else None,
            )
            if sum(b.bytes(layout) for b in ub_buffers(layout)) > UB_BYTES:
                continue
            fits_ub = True
            # The slice is also the cube's base M: A's (rows x BLOCK_K) and C's (rows x BLOCK_N,
            # float) base blocks must fit L0A / L0C (matmul_tiling refuses the split otherwise).
            if rows * tile.block_k * in_bytes <= L0AB_BYTES and rows * tile.block_n * 4 <= L0C_BYTES:
                # B's base block (BLOCK_N x BLOCK_K) does not depend on the slice.
                if tile.block_n * tile.block_k * in_bytes > L0AB_BYTES:
                    raise ValueError(
                        f"kernel {spec.name}: the cube's B base block BLOCK_N x BLOCK_K = {tile.block_n} x "
                        f"{tile.block_k} ({spec.dtype}) needs {tile.block_n * tile.block_k * in_bytes} bytes of "
                        f"L0B, more than its {L0AB_BYTES}; use a smaller BLOCK_N or BLOCK_K"
                    )
                return layout
    if fits_ub:
        raise ValueError(
            f"kernel {spec.name}: no epilogue slice of {_MIN_BLOCK} rows or more fits the cube's L0A "
            f"({L0AB_BYTES} bytes: rows x BLOCK_K={tile.block_k}) and L0C ({L0C_BYTES} bytes: float rows x "
            f"BLOCK_N={tile.block_n}); use a smaller BLOCK_N or BLOCK_K"
        )
    raise ValueError(
        f"kernel {spec.name}: BLOCK_N={tile.block_n} does not fit the {UB_BYTES // 1024} KiB unified "
        f"buffer even with {_MIN_BLOCK}-row epilogue slices; use a smaller BLOCK_N"
    )


def gemm_entry(spec: KernelSpec) -> EntryPoint:
    """The kernel's GM parameters, in order (the launcher passes tensors in this order)."""
    ep = spec.epilogue
    params = ["x", "weight"]
    if is_gated(ep):
        params.append("weight_up")
    if spec.op == "grouped_gemm":
        params.append("offsets")
    if "bias" in ep:
        params.append("bias")
        if is_gated(ep):
            params.append("bias_up")
    if "residual" in ep:
        params.append("residual")
    # sys_workspace: the Matmul API's system workspace (GetLibApiWorkSpaceSize() bytes of GM).
    params += ["out", "sys_workspace", "tiling"]
    return EntryPoint(kernel_ident(spec), tuple(params), outputs=("out", "sys_workspace"))


# --------------------------------------------------------------------------------------------
# Source rendering
# --------------------------------------------------------------------------------------------


def _tiling_header(spec: KernelSpec, layout: GemmLayout, ident: str, struct: str) -> str:
    guard = f"TILEFLOW_{ident.upper()}_TILING_H"
    if layout.experts:
        m_tiles = "ceil(m / BLOCK_M) + EXPERTS: M-tile slots, a bound over the groups"
        expert_fields = """
    uint64_t weightExpertStride;  // elements from one expert's weight to the next
    uint64_t upExpertStride;      // the same for the up-projection weight (swiglu)"""
    else:
        m_tiles, expert_fields = "ceil(m / BLOCK_M)", ""
    return f"""{banner(spec, "Tiling struct (shared by host and kernel)")}
#ifndef {guard}
#define {guard}
#include <cstdint>
#include "kernel_tiling/kernel_tiling.h"

// Everything that depends on M, the token count; N, K and the tile are compile-time constants.
struct {struct} {{
    TCubeTiling cube;   // one UB slice: (ub_rows x BLOCK_N x K), filled by matmul_tiling
    uint32_t m;         // rows of x and out
    uint32_t tilesM;    // {m_tiles}
    uint32_t tilesN;    // ceil(N / BLOCK_N)
    uint32_t numTiles;  // tilesM * tilesN, dealt over the launch's blocks{expert_fields}
}};
#endif  // {guard}
"""


def _activation_code(layout: GemmLayout) -> str:
    """Vector-unit code applying the activation to `acc` (count elements; `tmp` is scratch); a
    gated one applies its gate's activation, then multiplies by `up`."""
    gated = gated_activation(layout.activation)
    if gated == CLAMPED_SWIGLU:
        alpha, limit = layout.clamp
        return f"""        // gpt-oss's clamped SwiGLU: g = min(gate, {limit}), (clamp(up, -{limit}, {limit}) + 1) * g * sigmoid({alpha} * g)
        Mins(acc, acc, {limit!r}f, count);
        Maxs(up, up, {-limit!r}f, count);
        Mins(up, up, {limit!r}f, count);
        Adds(up, up, 1.0f, count);
        Muls(tmp, acc, {-alpha!r}f, count);
        Exp(tmp, tmp, count);
        Adds(tmp, tmp, 1.0f, count);
        Div(acc, acc, tmp, count);
        Mul(acc, acc, up, count);
"""
    if gated:
        gate_act = GATED_ACTIVATIONS[gated]
        return (_unary_activation_code(gate_act)
                + f"        Mul(acc, acc, up, count);  // {gated}: {gate_act}(gate) * up\n")
    return _unary_activation_code(layout.activation)


def _unary_activation_code(act: str) -> str:
    """Vector-unit code applying the activation `act` of one accumulator to `acc`."""
    if act == "silu":
        return """        // silu(a) = a / (1 + exp(-a))
        Muls(tmp, acc, -1.0f, count);
        Exp(tmp, tmp, count);
        Adds(tmp, tmp, 1.0f, count);
        Div(acc, acc, tmp, count);
"""
    if act == "gelu":
        # Erf (CANN lib/math) takes no overlapping source and destination, so the scaled input
        # stays in acc: gelu(a) = (a / sqrt(2)) * (1 + erf(a / sqrt(2))) * (sqrt(2) / 2).
        return f"""        // gelu(a) = a * (1 + erf(a / sqrt(2))) / 2, with b = a / sqrt(2): b * (1 + erf(b)) / sqrt(2)
        Muls(acc, acc, {1 / math.sqrt(2):.9g}f, count);
        Erf(tmp, acc, count);  // lib/math: dst must not overlap src
        Adds(tmp, tmp, 1.0f, count);
        Mul(acc, acc, tmp, count);
        Muls(acc, acc, {1 / math.sqrt(2):.9g}f, count);
"""
    if act == "gelu_tanh":
        # (1 + tanh(u)) / 2 = 1 / (1 + exp(-2u)): Tanh (CANN lib/math) cannot run in place on the
        # one scratch buffer, Exp can, and needs no temporary UB space.
        return f"""        // gelu_tanh(a) = a * (1 + tanh(u)) / 2 = a / (1 + exp(-2u)), u = sqrt(2 / pi) * (a + 0.044715 a^3)
        Mul(tmp, acc, acc, count);
        Muls(tmp, tmp, 0.044715f, count);
        Adds(tmp, tmp, 1.0f, count);
        Mul(tmp, tmp, acc, count);
        Muls(tmp, tmp, {-2 * math.sqrt(2 / math.pi):.9g}f, count);
        Exp(tmp, tmp, count);
        Adds(tmp, tmp, 1.0f, count);
        Div(acc, acc, tmp, count);
"""
    if act in ("relu", "relu2"):
        code = "        Relu(acc, acc, count);\n"
        if act == "relu2":
            code += "        Mul(acc, acc, acc, count);  // relu2: relu(a)^2\n"
        return code
    return ""


def _kernel_source(spec: KernelSpec, layout: GemmLayout, entry: EntryPoint, struct: str) -> str:
    L = layout
    ident = entry.name
    gated, bias, residual = L.gated, L.bias, L.residual
    members = ["    GlobalTensor<InT> xGm, wGm;", "    GlobalTensor<OutT> outGm;"]
    if gated:
        members.append("    GlobalTensor<InT> wUpGm;")
    if bias:
        members.append("    GlobalTensor<float> biasGm;" + ("\n    GlobalTensor<float> biasUpGm;" if gated else ""))
    if residual:
        members.append(f"    GlobalTensor<{L.res_type}> resGm;")
    if L.experts:
        members.append("    GlobalTensor<int32_t> offsetsGm;  // end row of each expert's group")
        members.append("    uint64_t wBase = 0;   // this tile's expert: offset of its weight")
        if gated:
            members.append("    uint64_t upBase = 0;")
        if bias:
            members.append("    uint64_t biasBase = 0;  // and of its bias row (N floats per expert)")
    buffers = ub_buffers(L)
    members += [b.declaration() for b in buffers]

    grouped = L.experts > 0

    def w_size(stride: str) -> str:
        # A grouped weight spans every expert: EXPERTS - 1 strides plus one [N, K] matrix.
        return f"uint64_t(EXPERTS - 1) * t.{stride} + uint64_t(N) * K" if grouped else "uint64_t(N) * K"

    init_gm = [
        "        xGm.SetGlobalBuffer(reinterpret_cast<__gm__ InT*>(x), uint64_t(t.m) * K);",
        f"        wGm.SetGlobalBuffer(reinterpret_cast<__gm__ InT*>(weight), {w_size('weightExpertStride')});",
        "        outGm.SetGlobalBuffer(reinterpret_cast<__gm__ OutT*>(out), uint64_t(t.m) * N);",
    ]
    if gated:
        init_gm.append(f"        wUpGm.SetGlobalBuffer(reinterpret_cast<__gm__ InT*>(weight_up), {w_size('upExpertStride')});")
    if grouped:
        init_gm.append("        offsetsGm.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(offsets), EXPERTS);")
    if bias:
        # A grouped GEMM's bias is one row of N per expert.
        bias_size = "uint64_t(EXPERTS) * N" if grouped else "N"
        init_gm.append(f"        biasGm.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(bias), {bias_size});")
        if gated:
            init_gm.append(f"        biasUpGm.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(bias_up), {bias_size});")
    if residual:
        init_gm.append(f"        resGm.SetGlobalBuffer(reinterpret_cast<__gm__ {L.res_type}*>(residual), uint64_t(t.m) * N);")
    init_ub = [b.init() for b in buffers]

    load_bias = ""
    if bias:
        load_bias = """        // The tile's bias columns, once per tile (only the real columns are read).
        const DataCopyExtParams biasCopy(1, cols * sizeof(float), 0, 0, 0);
        LocalTensor<float> biasCols = biasBuf.Get<float>();
        DataCopyPad(biasCols, biasGm[{bias_base}n0], biasCopy, DataCopyPadExtParams<float>(false, 0, 0, 0.0f));
"""
        if gated:
            load_bias += """        LocalTensor<float> biasUpCols = biasUpBuf.Get<float>();
        DataCopyPad(biasUpCols, biasUpGm[{bias_base}n0], biasCopy, DataCopyPadExtParams<float>(false, 0, 0, 0.0f));
"""
        load_bias += "        PipeBarrier<PIPE_ALL>();\n"
        load_bias = load_bias.replace("{bias_base}", "biasBase + " if grouped else "")

    cube = """        // Cube: the real rows x cols of this slice, straight from GM (virtual padding: the M
        // tail is never materialized; rows past M are neither read nor written).
        mm.SetSingleShape(rows, cols, K);
        mm.SetTensorA(xGm[uint64_t(row0) * K]);
        mm.SetTensorB(wGm[{w_base}uint64_t(n0) * K], true);
        LocalTensor<float> accIn = accQue.AllocTensor<float>();
        mm.Iterate();
        mm.GetTensorC(accIn);
        accQue.EnQue(accIn);
"""
    if gated:
        cube += """        mm.SetTensorB(wUpGm[{up_base}uint64_t(n0) * K], true);
        LocalTensor<float> upIn = upQue.AllocTensor<float>();
        mm.Iterate();
        mm.GetTensorC(upIn);
        upQue.EnQue(upIn);
"""
    if residual:
        cube += """        // The residual's real rows/columns, row stride BLOCK_N in UB like the accumulator.
        LocalTensor<ResT> resIn = resQue.AllocTensor<ResT>();
        DataCopyPad(resIn, resGm[uint64_t(row0) * N + n0], {res_copy}, DataCopyPadExtParams<ResT>(false, 0, 0, ResT(0)));
        resQue.EnQue(resIn);
"""
    cube = cube.replace("{w_base}", "wBase + " if grouped else "").replace("{up_base}", "upBase + " if grouped else "")
    cube = cube.replace("ResT", L.res_type).replace("{res_copy}", "resCopyIn" if L.rounds else "outCopyIn")
    vec = ["        LocalTensor<float> acc = accQue.DeQue<float>();"]
    if gated:
        vec.append("        LocalTensor<float> up = upQue.DeQue<float>();")
    if L.needs_scratch:
        vec.append("        LocalTensor<float> tmp = tmpBuf.Get<float>();")
    vec.append("        const int32_t count = rows * BLOCK_N;  // whole rows: padding columns never leave UB")
    if bias:
        vec.append("        LocalTensor<float> biasCols = biasBuf.Get<float>();  // loaded by ComputeTile")
        if gated:
            vec.append("        LocalTensor<float> biasUpCols = biasUpBuf.Get<float>();")
        vec.append("        for (int32_t r = 0; r < rows; ++r) {")
        vec.append("            Add(acc[r * BLOCK_N], acc[r * BLOCK_N], biasCols, cols);")
        if gated:
            vec.append("            Add(up[r * BLOCK_N], up[r * BLOCK_N], biasUpCols, cols);")
        vec.append("        }")
    act = _activation_code(L)
    if act:
        vec.append(act.rstrip("\n"))
    if gated:
        vec.append("        upQue.FreeTensor(up);")
    if residual:
        vec.append(f"        LocalTensor<{L.res_type}> res = resQue.DeQue<{L.res_type}>();")
        if L.out_type == "float" and not L.rounds:
            vec.append("        Add(acc, acc, res, count);")
        else:
            vec.append("        Cast(tmp, res, RoundMode::CAST_NONE, count);")
            vec.append("        Add(acc, acc, tmp, count);")
        vec.append("        resQue.FreeTensor(res);")
    vec.append("        LocalTensor<OutT> outTile = outQue.AllocTensor<OutT>();")
    if L.rounds:
        # Eager rounds the GEMM's result to its dtype (float16 overflows to inf), then converts.
        vec.append("        LocalTensor<InT> rounded = roundBuf.Get<InT>();  // round: through the input dtype")
        vec.append("        Cast(rounded, acc, RoundMode::CAST_RINT, count);")
        if L.out_type == "float":
            vec.append("        Cast(outTile, rounded, RoundMode::CAST_NONE, count);")
        else:
            vec.append("        Cast(acc, rounded, RoundMode::CAST_NONE, count);")
            vec.append("        Cast(outTile, acc, RoundMode::CAST_RINT, count);")
    elif L.out_type == "float":
        vec.append("        DataCopy(outTile, acc, count);")
    else:
        vec.append("        Cast(outTile, acc, RoundMode::CAST_RINT, count);")
    vec.append("        accQue.FreeTensor(acc);")
    vec.append("        outQue.EnQue(outTile);")

    fields = "\n".join(members)
    process = _grouped_process(gated, bias) if grouped else _plain_process()
    experts_const = f"\nconstexpr int32_t EXPERTS = {L.experts};" if grouped else ""
    order = f"{L.experts} experts, tiles dealt slot-major" if grouped else f"grouped order GROUP_M={L.group_m}"
    res_copy = "        const DataCopyExtParams outCopyIn(rows, cols * sizeof(OutT), gmGap, ubGap, 0);\n" if residual else ""
    if residual and L.rounds:  # the residual's rows in its own (input) dtype
        res_copy = (
            "        const uint32_t resGmGap = (N - cols) * sizeof(InT);\n"
            "        const uint32_t resUbGap = (BLOCK_N * sizeof(InT) - Ceil32(cols * sizeof(InT))) / 32;\n"
            "        const DataCopyExtParams resCopyIn(rows, cols * sizeof(InT), resGmGap, resUbGap, 0);\n"
        )
    return f"""{banner(spec, "Ascend C kernel: padded fixed-tile GEMM (SmoothGEMM)")}//
// out[M, {L.n}] = {gemm_formula(spec)}
// {spec.dtype} inputs, fp32 accumulation, {spec.out_dtype} output; tile {L.block_m}x{L.block_n}x{L.block_k},
// {order}, epilogue on {L.ub_rows}-row UB slices, queue depth {L.buffer_num}.
#include "kernel_operator.h"
#include "lib/matmul_intf.h"
#include "{ident}_tiling.h"

using namespace AscendC;

namespace {{
using InT = {L.in_type};
using OutT = {L.out_type};
constexpr int32_t N = {L.n};
constexpr int32_t K = {L.k};
constexpr int32_t BLOCK_M = {L.block_m};
constexpr int32_t BLOCK_N = {L.block_n};
constexpr int32_t UB_ROWS = {L.ub_rows};
constexpr int32_t GROUP_M = {L.group_m};
constexpr int32_t BUFFER_NUM = {L.buffer_num};{experts_const}

using AType = matmul::MatmulType<TPosition::GM, matmul::CubeFormat::ND, InT>;
using BType = matmul::MatmulType<TPosition::GM, matmul::CubeFormat::ND, InT, true>;
using CType = matmul::MatmulType<TPosition::VECIN, matmul::CubeFormat::ND, float>;

__aicore__ inline uint32_t Ceil32(uint32_t bytes) {{ return (bytes + 31) / 32 * 32; }}

class PaddedGemm {{
public:
    matmul::Matmul<AType, BType, CType> mm;

    __aicore__ inline void Init({entry.signature().replace(", GM_ADDR sys_workspace, GM_ADDR tiling", "")}, const {struct}& t, TPipe* pipe)
    {{
        tiling = t;
        // Row strides: x is [m, K], the weight [N, K] (B transposed), both row-major.
        mm.SetOrgShape(t.m, N, K, K);
{chr(10).join(init_gm)}
{chr(10).join(init_ub)}
    }}

{process}
private:
    {struct} tiling;
{fields}

    // One output tile: rows [m0, mEnd) (the tile's real rows), columns from n0.
    __aicore__ inline void ComputeTile(uint32_t m0, uint32_t mEnd, uint32_t n0)
    {{
        const uint32_t cols = N - n0 < uint32_t(BLOCK_N) ? N - n0 : BLOCK_N;
{load_bias}        for (uint32_t row0 = m0; row0 < mEnd; row0 += UB_ROWS) {{
            const int32_t rows = mEnd - row0 < uint32_t(UB_ROWS) ? mEnd - row0 : UB_ROWS;
            ComputeSlice(row0, rows, n0, cols);
        }}
    }}

    // One UB slice: rows x cols real elements at (row0, n0), held with row stride BLOCK_N.
    __aicore__ inline void ComputeSlice(uint32_t row0, int32_t rows, uint32_t n0, uint32_t cols)
    {{
        // Real rows/columns only, in both directions: GM row stride N, UB row stride BLOCK_N.
        const uint32_t gmGap = (N - cols) * sizeof(OutT);
        const uint32_t ubGap = (BLOCK_N * sizeof(OutT) - Ceil32(cols * sizeof(OutT))) / 32;
{res_copy}        const DataCopyExtParams outCopyOut(rows, cols * sizeof(OutT), ubGap, gmGap, 0);
{cube}
        // Vector: the epilogue on the float accumulator.
{chr(10).join(vec)}

        LocalTensor<OutT> outDone = outQue.DeQue<OutT>();
        DataCopyPad(outGm[uint64_t(row0) * N + n0], outDone, outCopyOut);
        outQue.FreeTensor(outDone);
    }}
}};
}}  // namespace

extern "C" __global__ __aicore__ void {ident}({entry.signature()})
{{
    // The tiling lives in GM; copy it to the core's scalar memory word by word.
    {struct} t;
    const __gm__ uint32_t* src = reinterpret_cast<const __gm__ uint32_t*>(tiling);
    uint32_t* dst = reinterpret_cast<uint32_t*>(&t);
    for (uint32_t i = 0; i < sizeof(t) / sizeof(uint32_t); ++i) {{
        dst[i] = src[i];
    }}
    // The Matmul API's system workspace, allocated by the host: a <<<>>> launch built without
    // HAVE_WORKSPACE has no framework to set it, so the kernel does (before any Matmul call).
    SetSysWorkspace(sys_workspace);
    TPipe pipe;
    PaddedGemm op;
    // Before InitBuffer (op.Init), as CANN requires in separated mode.
    REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), op.mm, &t.cube);
    op.Init({entry.arguments().replace(", sys_workspace, tiling", "")}, t, &pipe);
    op.Process();
}}

{launch_stub(entry)}"""


def _plain_process() -> str:
    return """    __aicore__ inline void Process()
    {
        // Persistent: this block computes tiles GetBlockIdx(), + GetBlockNum(), ... in grouped order.
        for (uint32_t tile = GetBlockIdx(); tile < tiling.numTiles; tile += GetBlockNum()) {
            const uint32_t perGroup = GROUP_M * tiling.tilesN;
            const uint32_t firstM = tile / perGroup * GROUP_M;
            const uint32_t groupRows = tiling.tilesM - firstM < uint32_t(GROUP_M) ? tiling.tilesM - firstM : GROUP_M;
            const uint32_t inGroup = tile % perGroup;
            const uint32_t m0 = (firstM + inGroup % groupRows) * BLOCK_M;
            const uint32_t mEnd = tiling.m - m0 < uint32_t(BLOCK_M) ? tiling.m : m0 + BLOCK_M;
            ComputeTile(m0, mEnd, inGroup / groupRows * BLOCK_N);
        }
        mm.End();
    }
"""


def _grouped_process(gated: bool, bias: bool) -> str:
    up = "\n                    upBase = uint64_t(e) * tiling.upExpertStride;" if gated else ""
    if bias:
        up += "\n                    biasBase = uint64_t(e) * N;"
    return f"""    __aicore__ inline void Process()
    {{
        // Persistent over (M-tile slot, N tile). Each expert's rows are cut in BLOCK_M tiles from
        // the group's first row, its tail tile holding only its own rows (virtual padding per
        // group); the slots bound every grouping (ceil(m / BLOCK_M) + EXPERTS), so the launch
        // never reads the offsets on the host, and slots past the last group have no work.
        for (uint32_t tile = GetBlockIdx(); tile < tiling.numTiles; tile += GetBlockNum()) {{
            const uint32_t slot = tile / tiling.tilesN;
            const uint32_t n0 = tile % tiling.tilesN * BLOCK_N;
            uint32_t start = 0;
            uint32_t seen = 0;  // M tiles of the experts before e
            for (int32_t e = 0; e < EXPERTS; ++e) {{
                const uint32_t end = static_cast<uint32_t>(offsetsGm.GetValue(e));
                const uint32_t tiles = (end - start + BLOCK_M - 1) / BLOCK_M;
                if (slot < seen + tiles) {{
                    const uint32_t m0 = start + (slot - seen) * BLOCK_M;
                    wBase = uint64_t(e) * tiling.weightExpertStride;{up}
                    ComputeTile(m0, end - m0 < uint32_t(BLOCK_M) ? end : m0 + BLOCK_M, n0);
                    break;
                }}
                seen += tiles;
                start = end;
            }}
        }}
        mm.End();
    }}
"""


def _host_source(spec: KernelSpec, layout: GemmLayout, entry: EntryPoint, struct: str) -> str:
    L = layout
    in_api = _API_DTYPES[spec.dtype]
    if L.experts:
        what = "m rows sorted into EXPERTS groups (expert weights the given strides apart)"
        params = "uint32_t m, uint32_t coreNum, uint64_t weightExpertStride, uint64_t upExpertStride, void* out, uint32_t* blockDim"
        m_tiles = f"(m + {L.block_m} - 1) / {L.block_m} + {L.experts}"
        strides = "\n    t->weightExpertStride = weightExpertStride;\n    t->upExpertStride = upExpertStride;"
    else:
        what = "m rows"
        params = "uint32_t m, uint32_t coreNum, void* out, uint32_t* blockDim"
        m_tiles = f"(m + {L.block_m} - 1) / {L.block_m}"
        strides = ""
    return f"""{banner(spec, "Host tiling and CPU-debug launch")}
#include <cstdint>
#include "tiling/tiling_api.h"
#include "tiling/platform/platform_ascendc.h"
#include "{entry.name}_tiling.h"
#ifdef ASCENDC_CPU_DEBUG
#include "tikicpulib.h"
#include "kernel_operator.h"
#endif

extern "C" uint32_t {entry.name}_tiling_size()
{{
    return sizeof({struct});
}}

// Bytes of the Matmul API's system workspace (the kernel's sys_workspace) on this device; 0 when
// the platform cannot be queried.
extern "C" uint32_t {entry.name}_sys_workspace_size()
{{
    const platform_ascendc::PlatformAscendC* platform = platform_ascendc::PlatformAscendCManager::GetInstance();
    return platform == nullptr ? 0 : platform->GetLibApiWorkSpaceSize();
}}

// Fill the tiling for a launch over {what} on a device with coreNum AI cores; 0 on success.
extern "C" int32_t {entry.name}_tiling({params})
{{
    if (m == 0 || coreNum == 0 || out == nullptr || blockDim == nullptr) {{
        return 1;
    }}
    {struct}* t = static_cast<{struct}*>(out);
    *t = {struct}{{}};
    matmul_tiling::MatmulApiTiling api;
    api.SetAType(matmul_tiling::TPosition::GM, matmul_tiling::CubeFormat::ND, matmul_tiling::DataType::{in_api});
    api.SetBType(matmul_tiling::TPosition::GM, matmul_tiling::CubeFormat::ND, matmul_tiling::DataType::{in_api}, true);
    api.SetCType(matmul_tiling::TPosition::VECIN, matmul_tiling::CubeFormat::ND, matmul_tiling::DataType::DT_FLOAT);
    api.SetShape({L.ub_rows}, {L.block_n}, {L.k});
    api.SetOrgShape(static_cast<int>(m), {L.n}, {L.k});
    api.SetBias(false);  // the bias is added by the vector epilogue, in float
    api.SetFixSplit({L.ub_rows}, {L.block_n}, {L.block_k});
    api.SetBufferSpace(-1, -1, -1);
    if (api.GetTiling(t->cube) == -1) {{
        return 2;
    }}
    t->m = m;
    t->tilesM = {m_tiles};
    t->tilesN = ({L.n} + {L.block_n} - 1) / {L.block_n};
    t->numTiles = t->tilesM * t->tilesN;{strides}
    *blockDim = t->numTiles < coreNum ? t->numTiles : coreNum;
    return 0;
}}

{cpu_runner(entry)}"""


def render_gemm_sources(spec: KernelSpec) -> KernelSources:
    """The Ascend C project files of a `padded_gemm` spec (see `sources.KernelSources`)."""
    layout = gemm_layout(spec)
    entry = gemm_entry(spec)
    ident = entry.name
    struct = tiling_struct_name(ident)
    sources = KernelSources(spec=spec, ident=ident, tiling_struct=struct, kernels=(ident,))
    sources.files[sources.tiling_header] = _tiling_header(spec, layout, ident, struct)
    sources.files[sources.kernel_file] = _kernel_source(spec, layout, entry, struct)
    sources.files[sources.host_file] = _host_source(spec, layout, entry, struct)
    sources.files[sources.torch_file] = torch_binding([entry], spec)
    return sources


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------

def make_gemm_launcher(spec: KernelSpec, host_call: HostCall, run: KernelRun, cores: int) -> Callable[..., torch.Tensor]:
    """Wrap a built GEMM in the `padded_gemm` launch interface of every backend:

        launch(x, weight, bias=None, residual=None, *, out=None, weight_up=None, bias_up=None,
               num_programs=None) -> out

    Inputs are checked by `tileflow.gemm_operands`; the kernel reads row-major operands, so a
    non-contiguous `x`/`weight` is made contiguous (a copy), the bias is passed as float32 and
    the residual in the output dtype (in the input dtype with `round`). `num_programs` caps the
    number of blocks (default: the device's `cores`; at most MAX_BLOCK_DIM). M == 0 returns the
    empty output without launching.
    """
    gemm_layout(spec)
    entry = gemm_entry(spec)
    # The residual in the output dtype; with `round`, in the input dtype (the kernel's ResT).
    res_dtype = getattr(torch, spec.dtype if "round" in spec.epilogue else spec.out_dtype)
    where = f"kernel {spec.name}"

    def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               residual: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
               weight_up: torch.Tensor | None = None, bias_up: torch.Tensor | None = None,
               num_programs: int | None = None) -> torch.Tensor:
        ops = gemm_operands(spec, x, weight, bias, residual, out=out, weight_up=weight_up, bias_up=bias_up)
        check_num_programs(num_programs, where)
        if not ops.out.is_contiguous():
            raise ValueError(f"{where}: out must be contiguous (the kernel writes rows of N elements)")
        if ops.m == 0:
            return ops.out
        tensors = {
            "x": ops.x.contiguous(),
            "weight": ops.weight.contiguous(),
            "weight_up": None if ops.weight_up is None else ops.weight_up.contiguous(),
            **_float_biases(ops.bias, ops.bias_up),
            "residual": None if ops.residual is None else ops.residual.to(res_dtype).contiguous(),
            "out": ops.out,
        }
        _tile_and_run(host_call, run, entry, where, ops.m, tensors, num_programs or cores)
        return ops.out

    launch.spec = spec  # type: ignore[attr-defined]
    return launch


def _tile_and_run(host_call: HostCall, run: KernelRun, entry: EntryPoint, where: str, m: int,
                  tensors: dict[str, Any], cores: int, *extra: Any) -> None:
    """Fill the tiling through the host function (`extra`: the family's arguments after
    (m, cores)), then launch the kernel over the blocks it chose with `tensors` in GM order."""
    size = int(host_call(f"{entry.name}_tiling_size", restype=ctypes.c_uint32))
    tiling = torch.zeros(size, dtype=torch.uint8)
    block_dim = ctypes.c_uint32(0)
    code = host_call(f"{entry.name}_tiling", ctypes.c_uint32(m), ctypes.c_uint32(cores), *extra, tiling,
                     ctypes.byref(block_dim))
    if code != 0:
        raise ValueError(f"{where}: the host tiling refused M={m} (code {code})")
    tensors["sys_workspace"] = sys_workspace(host_call, entry.name, where, tensors["x"].device)
    tensors["tiling"] = tiling.to(tensors["x"].device)
    run(entry, block_dim.value, [tensors[p] for p in entry.params])


def sys_workspace(host_call: HostCall, ident: str, where: str, device: torch.device) -> torch.Tensor:
    """The Matmul API's system workspace for one launch: `<ident>_sys_workspace_size()` bytes
    (the platform's GetLibApiWorkSpaceSize) of uninitialized GM on `device`."""
    size = int(host_call(f"{ident}_sys_workspace_size", restype=ctypes.c_uint32))
    if size == 0:
        raise RuntimeError(f"{where}: the platform reported no Matmul system workspace size (GetLibApiWorkSpaceSize)")
    return torch.empty(size, dtype=torch.uint8, device=device)


def _expert_rows(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [E, N, K] as the kernel reads it: rows of K contiguous elements, K apart, inside
    each expert; experts any distance apart (a stacked gate/up view passes as it is)."""
    k = weight.shape[2]
    if weight.stride(2) == 1 and (weight.shape[1] == 1 or weight.stride(1) == k):
        return weight
    return weight.contiguous()


def _float_biases(bias: torch.Tensor | None, bias_up: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """The launch's bias tensors as the kernel reads them: float32, contiguous (a grouped GEMM's
    [E, N] rows back to back)."""
    return {name: None if b is None else b.to(torch.float32).contiguous() for name, b in (("bias", bias), ("bias_up", bias_up))}


def make_grouped_gemm_launcher(spec: KernelSpec, host_call: HostCall, run: KernelRun, cores: int) -> Callable[..., torch.Tensor]:
    """Wrap a built grouped (MoE) GEMM in the `grouped_gemm` launch interface of every backend:

        launch(x, weight, offsets, bias=None, *, out=None, num_programs=None) -> out

    Inputs are checked by `tileflow.gemm_operands.grouped_gemm_operands`: `x` [M, K] with rows
    sorted by expert, `weight` [E, N, K] ([E, 2N, K] gate then up for swiglu; any expert stride),
    `offsets` int32 [E], the end row of each group (the caller's contract; only its shape is
    checked, so a launch never reads it on the host), `bias` [E, N] ([E, 2N]) exactly when the
    epilogue has one (`clamped_swiglu`'s gate and up rows interleave). Rows past
    `offsets[-1]` are not written.
    """
    gemm_layout(spec)
    entry = gemm_entry(spec)
    where = f"kernel {spec.name}"

    def launch(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None = None, *,
               out: torch.Tensor | None = None, num_programs: int | None = None) -> torch.Tensor:
        # (an interleaved gate and up, clamped_swiglu's, as two views: the kernel's two Matmuls
        # read one each, copied row-major by `_expert_rows`)
        ops = grouped_gemm_operands(spec, x, weight, offsets, bias, out=out, split_interleaved=True)
        check_num_programs(num_programs, where)
        if not ops.out.is_contiguous():
            raise ValueError(f"{where}: out must be contiguous (the kernel writes rows of N elements)")
        if ops.m == 0:
            return ops.out
        w = _expert_rows(ops.weight)
        up = None if ops.weight_up is None else _expert_rows(ops.weight_up)
        tensors = {"x": ops.x.contiguous(), "weight": w, "weight_up": up, "offsets": ops.offsets.contiguous(),
                   "out": ops.out, **_float_biases(ops.bias, ops.bias_up)}
        _tile_and_run(host_call, run, entry, where, ops.m, tensors, num_programs or cores,
                      ctypes.c_uint64(w.stride(0)), ctypes.c_uint64(0 if up is None else up.stride(0)))
        return ops.out

    launch.spec = spec  # type: ignore[attr-defined]
    return launch
