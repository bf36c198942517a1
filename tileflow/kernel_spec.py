"""KernelSpec: the target-neutral description of one kernel, the only thing a backend sees.

`tileflow/lower.py` turns tileflow ops into KernelSpecs; each backend (Triton, Ascend C,
reference) turns a KernelSpec into something that runs. A spec is frozen and hashable, so it keys
kernel caches, and it serializes to JSON for the report, the archive and the visualizer.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

# Epilogues a GEMM kernel can fuse, in the order they are applied to the accumulator. `cast`
# converts the fp32 accumulator straight to out_dtype; `round` (only with `cast`, for fp16/bf16
# inputs) first rounds it to the input dtype, as eager's `linear(x, w).to(out_dtype)` does
# (fp16's overflow to inf included), then converts that to out_dtype.
EPILOGUES: tuple[str, ...] = (
    "bias", "silu", "gelu", "gelu_tanh", "relu", "relu2", "swiglu", "geglu", "geglu_tanh", "clamped_swiglu", "residual",
    "round", "cast",
)
# Input dtypes whose GEMM result `round` rounds (for float32 / float64 the accumulator already has
# the input's dtype: rounding to it would change nothing, so such specs have no `round`).
ROUNDED_DTYPES: tuple[str, ...] = ("float16", "bfloat16")
# Activations accepted by `padded_gemm(..., activation=...)`; at most one per GEMM epilogue.
# `relu2` is the squared ReLU (`relu(a) ** 2`, transformers' "relu2").
# Gated activations, `act(x @ W_gate^T) * (x @ W_up^T)`: two weights (stacked [2N, K] or apart)
# in one kernel with two accumulators, by the activation of the gate: SwiGLU (Llama's MLP),
# GeGLU (erf GELU) and GeGLU with the tanh GELU (Gemma's).
GATED_ACTIVATIONS: dict[str, str] = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}
# gpt-oss's experts' gated activation, with its two numbers: `(clamp(up, -limit, limit) + 1) *
# g * sigmoid(alpha * g)`, g = min(gate, limit). Grouped GEMMs only; `alpha` and `limit` are the
# spec's params (`clamped_swiglu_params`).
CLAMPED_SWIGLU = "clamped_swiglu"
ACTIVATIONS: tuple[str, ...] = ("silu", "gelu", "gelu_tanh", "relu", "relu2", *GATED_ACTIVATIONS, CLAMPED_SWIGLU)
# The activations of one accumulator (every one but the gated ones, which read two).
UNARY_ACTIVATIONS: tuple[str, ...] = tuple(a for a in ACTIVATIONS if a not in GATED_ACTIVATIONS and a != CLAMPED_SWIGLU)
# dtypes by their short names; specs carry names, not torch.dtype, so they stay JSON-friendly.
DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")
# TileConfig's default width of the grouped tile order (left out of tile names).
_DEFAULT_GROUP_M = 8


@dataclass(frozen=True, order=True)
class TileConfig:
    """One fixed tile shape for a GEMM kernel.

    `block_m/n/k` are the tile sizes; `num_warps`/`num_stages` are launch parameters the Triton
    backend uses (other targets may ignore them); `group_m` is the width of the grouped,
    L2-friendly tile order.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = _DEFAULT_GROUP_M

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value <= 0 or value & (value - 1):
                raise ValueError(f"TileConfig.{name} must be a positive power of two, got {value}")

    @property
    def name(self) -> str:
        """Short stable name, e.g. `m64n128k32w4s3` (`...s3g4` when `group_m` is not the
        default 8: names key files and reports, so two tiles must not share one)."""
        group = "" if self.group_m == _DEFAULT_GROUP_M else f"g{self.group_m}"
        return (
            f"m{self.block_m}n{self.block_n}k{self.block_k}"
            f"w{self.num_warps}s{self.num_stages}{group}"
        )

    def to_dict(self) -> dict[str, int]:
        """JSON-friendly form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> "TileConfig":
        """Inverse of `to_dict`."""
        return cls(**data)


@dataclass(frozen=True)
class KernelSpec:
    """A kernel to build: which op, at which tile config, for which dtypes, with which epilogue.

    `op` names the kernel family (`"padded_gemm"`, `"grouped_gemm"`, `"meta_attention"`). `params`
    holds the family's static parameters as a sorted tuple of (key, value) pairs so the spec stays
    hashable (for a GEMM: `n`, `k`, `persistent`; a grouped GEMM adds `experts`; for attention:
    `head_dim`, `gqa`...). Dynamic sizes
    (the token count M) are never part of a spec: one spec serves every M its plan assigns to it.
    """

    op: str
    dtype: str
    out_dtype: str
    tile: TileConfig | None = None
    epilogue: tuple[str, ...] = ()
    params: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name in ("dtype", "out_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(
                    f"KernelSpec.{name}={getattr(self, name)!r} is not supported; use one of {DTYPES}"
                )
        unknown = [e for e in self.epilogue if e not in EPILOGUES]
        if unknown:
            raise ValueError(f"unknown epilogue {unknown}; valid epilogues are {EPILOGUES}")

    def param(self, key: str, default: Any = None) -> Any:
        """Value of one static parameter."""
        return dict(self.params).get(key, default)

    @functools.cached_property  # hot: launchers and caches ask for it on every call
    def name(self) -> str:
        """Readable kernel name, stable across runs (used for files and reports)."""
        parts = [f"tileflow_{self.op}", self.dtype]
        if self.out_dtype != self.dtype:
            # A cast's target: kernels casting to two dtypes must not share a name (and a file).
            parts.append(f"to_{self.out_dtype}")
        if self.tile is not None:
            parts.append(self.tile.name)
        for key, value in self.params:
            if isinstance(value, bool):
                if value:
                    parts.append(key)  # flags appear only when set
            elif isinstance(value, (int, str)):
                parts.append(f"{key}{value}")
        parts.extend(self.epilogue)
        return "_".join(str(p) for p in parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "op": self.op,
            "dtype": self.dtype,
            "out_dtype": self.out_dtype,
            "tile": None if self.tile is None else self.tile.to_dict(),
            "epilogue": list(self.epilogue),
            "params": [[k, v] for k, v in self.params],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KernelSpec":
        """Inverse of `to_dict`."""
        return cls(
            op=data["op"],
            dtype=data["dtype"],
            out_dtype=data["out_dtype"],
            tile=None if data["tile"] is None else TileConfig.from_dict(data["tile"]),
            epilogue=tuple(data["epilogue"]),
            params=tuple((k, v) for k, v in data["params"]),
        )

    def digest(self, *salt: str) -> str:
        """Content hash of the spec (plus e.g. tool versions), for on-disk kernel caches."""
        text = json.dumps(self.to_dict(), sort_keys=True) + "|" + "|".join(salt)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_params(**kwargs: Any) -> tuple[tuple[str, Any], ...]:
    """Build a spec's `params` tuple from keyword arguments, sorted by key."""
    return tuple(sorted(kwargs.items()))


def dtype_name(dtype: Any) -> str:
    """Short name (`"float16"`) of a torch dtype, or the name itself when given a string."""
    if isinstance(dtype, str):
        return dtype
    return str(dtype).removeprefix("torch.")


# The longest stem of a kernel's file name, in bytes: file systems allow 255 bytes a name, and
# the stem gains a suffix (`.reference.py`) and, while written, a temporary one (`.<stem>.py.x.tmp`).
_MAX_FILE_STEM = 200


def file_stem(name: str) -> str:
    """A kernel's name as the stem of its file name: unsafe characters replaced, and a name too
    long for a file system (a GEMM over many sibling weights spells every segment's width, 64
    siblings of 64 columns made 251 characters) cut, with a hash of the whole name so that two
    long names that share their start keep two files."""
    safe = re.sub(r"[^\w.\-]", "_", name)
    if len(safe.encode()) <= _MAX_FILE_STEM:
        return safe
    tag = hashlib.sha256(name.encode()).hexdigest()[:16]
    return safe.encode()[:_MAX_FILE_STEM - len(tag) - 1].decode(errors="ignore") + "_" + tag


def _positive_int_param(spec: KernelSpec, key: str) -> int:
    """A spec's static size parameter `key`, which must be a positive int."""
    value = spec.param(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(
            f"{spec.op} spec needs a positive integer param {key!r}, got {value!r} "
            f"(build params with make_params({key}=...))"
        )
    return value


def gemm_dims(spec: KernelSpec) -> tuple[int, int]:
    """(N, K) of a `padded_gemm` or `grouped_gemm` spec, validated; N is the *output* width (for
    a gated activation the weight has 2N rows: gate, then up)."""
    return _positive_int_param(spec, "n"), _positive_int_param(spec, "k")


def gemm_segments(spec: KernelSpec) -> tuple[int, ...]:
    """The widths of a `padded_gemm` spec's N segments: sibling GEMMs on one input (a layer's Q,
    K and V projections) computed as one, output columns [C_i, C_i + w_i) being x @ W_i^T with
    weight i's own pointer (no stacked copy of the weights). `(N,)` for a GEMM of one weight.
    The spec's `segments` param spells them as text, `"4096x1024x1024"`; ValueError unless they
    are two or more positive widths summing to N, without a SwiGLU (whose two weights are gate
    and up of the same columns)."""
    n, _ = gemm_dims(spec)
    text = spec.param("segments")
    if text is None:
        return (n,)
    try:
        widths = tuple(int(w) for w in str(text).split("x"))
    except ValueError:
        widths = ()
    if len(widths) < 2 or min(widths) <= 0 or sum(widths) != n:
        raise ValueError(f"{spec.op} spec's segments {text!r} must be two or more positive widths joined by 'x' "
                         f"that sum to N = {n}")
    if is_gated(spec.epilogue):
        raise ValueError(f"{spec.op} spec with segments {text!r} cannot fuse a gated activation "
                         f"({gated_activation(spec.epilogue)}); give the gate and up weights as weight and weight_up instead")
    return widths


def gated_activation(names: str | tuple[str, ...] | None) -> str | None:
    """The gated activation (a key of `GATED_ACTIVATIONS`, or `CLAMPED_SWIGLU`) that an activation
    name is or an epilogue holds, else None."""
    if names is None:
        return None
    if isinstance(names, str):
        names = (names,)
    return next((name for name in names if name in GATED_ACTIVATIONS or name == CLAMPED_SWIGLU), None)


def is_gated(names: str | tuple[str, ...] | None) -> bool:
    """Whether an activation name or an epilogue is gated: two weights, two accumulators."""
    return gated_activation(names) is not None


def segment_starts(widths: tuple[int, ...]) -> tuple[int, ...]:
    """The first output column of each N segment of the given widths."""
    return tuple(itertools.accumulate(widths[:-1], initial=0))


def clamped_swiglu_params(spec: KernelSpec) -> tuple[float, float]:
    """(alpha, limit) of a spec whose epilogue has `clamped_swiglu`: its `alpha` and `limit`
    params, kept as text (`repr` of the float) so that they name the kernel; ValueError unless
    both are finite numbers and the limit is positive."""
    try:
        alpha, limit = float(spec.param("alpha")), float(spec.param("limit"))
    except (TypeError, ValueError):
        raise ValueError(f"{spec.op} spec with clamped_swiglu needs the params 'alpha' and 'limit' as numbers "
                         f"(make_params(alpha=repr(a), limit=repr(l))), got {spec.param('alpha')!r} and "
                         f"{spec.param('limit')!r}") from None
    if not (math.isfinite(alpha) and 0 < limit < math.inf):
        raise ValueError(f"clamped_swiglu needs a finite alpha and a finite positive limit, got {alpha} and {limit}")
    return alpha, limit


def grouped_gemm_dims(spec: KernelSpec) -> tuple[int, int, int]:
    """(N, K, E) of a `grouped_gemm` spec, validated: output width, reduction depth, experts."""
    n, k = gemm_dims(spec)
    return n, k, _positive_int_param(spec, "experts")


# Kernel families `check_gemm_spec` knows, with the epilogue entries each cannot fuse: MoE graphs
# add no residual to an expert GEMM (a grouped GEMM's bias is per expert, [E, N]).
GEMM_OPS: dict[str, tuple[str, ...]] = {"padded_gemm": (), "grouped_gemm": ("residual",)}
# The static params each family's kernels read (`lower.gemm_spec`, `lower.grouped_gemm_spec`).
GEMM_PARAMS: dict[str, frozenset[str]] = {
    "padded_gemm": frozenset({"n", "k", "persistent", "split_k", "stream_k", "tma", "segments"}),
    "grouped_gemm": frozenset({"n", "k", "experts", "alpha", "limit"}),
}


def check_gemm_spec(
    spec: KernelSpec, supported_dtypes: tuple[str, ...], target: str, min_block: int, op: str = "padded_gemm"
) -> None:
    """Reject a GEMM spec (`op`: `padded_gemm` or `grouped_gemm`) a `target` kernel cannot
    implement, saying why.

    Target-neutral rules (a tile, one activation at most, no repeats, entries in `EPILOGUES`
    order, `cast` exactly when the dtypes differ, `round` only before a cast from fp16/bf16, the
    family's epilogue limits and size params)
    plus the target's dtypes and smallest tile side (`min_block`).
    """
    if op not in GEMM_OPS:
        raise ValueError(f"check_gemm_spec: unknown GEMM family {op!r}; known: {sorted(GEMM_OPS)}")
    if spec.op != op:
        raise ValueError(f"the {target} GEMM kernel handles op {op!r}, not {spec.op!r}")
    if spec.tile is None:
        raise ValueError(f"{op} spec {spec.name} has no TileConfig")
    for name in ("dtype", "out_dtype"):
        if getattr(spec, name) not in supported_dtypes:
            raise ValueError(
                f"the {target} {op} supports {name} in {supported_dtypes}, "
                f"got {getattr(spec, name)!r}"
            )
    if "cast" not in spec.epilogue and spec.out_dtype != spec.dtype:
        raise ValueError(
            f"out_dtype {spec.out_dtype!r} differs from dtype {spec.dtype!r} but the epilogue has "
            f"no 'cast' (epilogue={spec.epilogue})"
        )
    if "round" in spec.epilogue and ("cast" not in spec.epilogue or spec.dtype not in ROUNDED_DTYPES):
        # Without a cast the result is stored in the input dtype anyway; a float32 / float64
        # accumulator is already in it: either way `round` would be a second name for one kernel.
        raise ValueError(
            f"'round' (the result rounded to the input dtype before the cast) needs 'cast' and a "
            f"{' or '.join(ROUNDED_DTYPES)} input, got dtype {spec.dtype!r}, epilogue={spec.epilogue}"
        )
    acts = [e for e in spec.epilogue if e in ACTIVATIONS]
    if len(acts) > 1:
        raise ValueError(f"at most one activation per GEMM epilogue, got {acts}")
    if len(set(spec.epilogue)) != len(spec.epilogue):
        raise ValueError(f"repeated epilogue entry in {spec.epilogue}")
    if list(spec.epilogue) != sorted(spec.epilogue, key=EPILOGUES.index):
        # Kernels apply the entries in EPILOGUES order whatever the spec's order: a spec of silu
        # then bias would silently compute silu(x @ W^T + bias).
        raise ValueError(f"epilogue {spec.epilogue} is out of order; list its entries in the order {EPILOGUES}")
    unknown = sorted(set(dict(spec.params)) - GEMM_PARAMS[op])
    if unknown:
        # A misspelt flag (`persistant=True`) would build the plain kernel without a word.
        raise ValueError(f"{op} spec has params {unknown} no {op} kernel reads; known: {sorted(GEMM_PARAMS[op])}")
    unfusable = [e for e in spec.epilogue if e in GEMM_OPS[op]]
    if unfusable:
        raise ValueError(f"a {op} kernel cannot fuse {unfusable} (epilogue={spec.epilogue})")
    tile = spec.tile
    for name in ("block_m", "block_n", "block_k"):
        if getattr(tile, name) < min_block:
            raise ValueError(
                f"TileConfig.{name}={getattr(tile, name)} is too small for the {target} kernel "
                f"(minimum {min_block})"
            )
    if tile.group_m <= 0:
        raise ValueError(f"TileConfig.group_m must be positive, got {tile.group_m}")
    if op == "grouped_gemm":
        grouped_gemm_dims(spec)
    else:
        gemm_segments(spec)
    if CLAMPED_SWIGLU in spec.epilogue:
        if op != "grouped_gemm":
            raise ValueError(f"clamped_swiglu is a grouped_gemm epilogue (gpt-oss's experts), not a {op} one")
        clamped_swiglu_params(spec)
    elif spec.param("alpha") is not None or spec.param("limit") is not None:
        raise ValueError(f"{op} spec has params 'alpha'/'limit' but no clamped_swiglu epilogue ({spec.epilogue})")


def gemm_formula(spec: KernelSpec) -> str:
    """One-line math of a `padded_gemm` / `grouped_gemm` spec, for generated sources' headers,
    e.g. `silu(x @ W_gate^T + bias_gate) * (x @ W_up^T + bias_up) + residual` (`(...) rounded to
    float16` with a `round`)."""
    ep = spec.epilogue
    grouped = spec.op == "grouped_gemm"
    x, e = ("x[rows of e]", "[e]") if grouped else ("x", "")
    if CLAMPED_SWIGLU in ep:
        bg, bu = (f" + bias_gate{e}", f" + bias_up{e}") if "bias" in ep else ("", "")
        alpha, limit = clamped_swiglu_params(spec)
        expr = (f"(clamp(u, -{limit}, {limit}) + 1) * g * sigmoid({alpha} * g), g = min({x} @ W_gate{e}^T{bg}, {limit}), "
                f"u = {x} @ W_up{e}^T{bu}")
    elif is_gated(ep):
        bg, bu = (f" + bias_gate{e}", f" + bias_up{e}") if "bias" in ep else ("", "")
        act = GATED_ACTIVATIONS[gated_activation(ep)]
        expr = f"{act}({x} @ W_gate{e}^T{bg}) * ({x} @ W_up{e}^T{bu})"
    else:
        segments = len(gemm_segments(spec))
        weight = f"cat({', '.join(f'W{i}' for i in range(segments))})" if segments > 1 else f"W{e}"
        expr = f"{x} @ {weight}^T" + (f" + bias{e}" if "bias" in ep else "")
        for act in UNARY_ACTIVATIONS:
            if act in ep:
                expr = f"{act}({expr})"
    expr = f"{expr} + residual" if "residual" in ep else expr
    # `round`: the result passes through the input dtype on its way to out_dtype.
    return f"({expr}) rounded to {spec.dtype}" if "round" in ep else expr
