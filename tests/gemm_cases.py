"""GEMM test cases shared by the kernel backends' tests: inputs, the float64 reference, and the
comparison (every output element written, relative error within the dtype's tolerance)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tileflow.kernel_spec import GATED_ACTIVATIONS, KernelSpec, gated_activation, is_gated

TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}

# (dtype, epilogue) pairs every GEMM kernel backend is checked on.
EPILOGUE_CASES = [
    ("float32", ("bias",)),
    ("float16", ("bias",)),
    ("float32", ("silu",)),
    ("float16", ("silu",)),
    ("float32", ("gelu",)),
    ("float16", ("gelu",)),
    ("float32", ("gelu_tanh",)),
    ("float16", ("gelu_tanh",)),
    ("float32", ("relu",)),
    ("float16", ("bias", "relu2", "residual")),
    ("float32", ("swiglu",)),
    ("float16", ("swiglu",)),
    ("float32", ("bias", "swiglu")),
    ("float16", ("bias", "swiglu")),
    ("float32", ("residual",)),
    ("float16", ("residual",)),
    ("float16", ("cast",)),
    ("float16", ("bias", "gelu", "residual")),
    ("float16", ("bias", "swiglu", "residual", "cast")),
    # GeGLU: the erf GELU of the gate, and Gemma's tanh form.
    ("float32", ("geglu",)),
    ("float16", ("bias", "geglu_tanh")),
    ("float32", ("bias", "geglu_tanh", "residual")),
    # The result rounded to float16, then widened (eager's `linear(x, w).float()`).
    ("float16", ("bias", "gelu", "residual", "round", "cast")),
]


# The float32 twins of epilogues checked in float16 too (and in float32 inside other cases: bias
# and residual in `bias-geglu_tanh-residual`, SiLU in `swiglu`, GELU in `geglu`): where a case
# costs seconds (a g++ build, an interpreter launch of a split or stream-K kernel), a dtype sweep
# the default run leaves to `extended`.
EPILOGUE_TWINS = [("float32", (ep,)) for ep in ("bias", "silu", "gelu", "gelu_tanh", "swiglu", "residual")]


def epilogue_params(cases: list[tuple[str, tuple[str, ...]]] = EPILOGUE_CASES) -> list:
    """`cases` as parameters, the EPILOGUE_TWINS among them marked `extended`."""
    import pytest

    return [pytest.param(*case, marks=pytest.mark.extended) if case in EPILOGUE_TWINS else case for case in cases]


def make_inputs(spec: KernelSpec, device: str, m: int, seed: int) -> dict[str, torch.Tensor | None]:
    """Fresh random x, weight and (when the epilogue wants them) bias and residual."""
    gen = torch.Generator().manual_seed(seed)
    n, k = spec.param("n"), spec.param("k")
    dt = getattr(torch, spec.dtype)
    rows = 2 * n if is_gated(spec.epilogue) else n
    # Scale so pre-activation values are O(1): activations are exercised on both sides of 0.
    x = torch.randn(m, k, generator=gen).to(dt)
    w = (torch.randn(rows, k, generator=gen) / k**0.5).to(dt)
    bias = torch.randn(rows, generator=gen).to(dt) if "bias" in spec.epilogue else None
    res = torch.randn(m, n, generator=gen).to(dt) if "residual" in spec.epilogue else None
    return {"x": x.to(device), "weight": w.to(device),
            "bias": None if bias is None else bias.to(device),
            "residual": None if res is None else res.to(device)}


def reference(spec: KernelSpec, x, weight, bias=None, residual=None) -> torch.Tensor:
    """float64 torch reference of the spec's GEMM + epilogue (with `round`, rounded to the spec
    dtype: fp16 overflows to inf there)."""
    n = spec.param("n")
    acc = x.double() @ weight.double().T
    if bias is not None:
        acc = acc + bias.double()
    ep = spec.epilogue
    if "silu" in ep:
        acc = F.silu(acc)
    if "gelu" in ep:
        acc = F.gelu(acc)
    if "gelu_tanh" in ep:
        acc = F.gelu(acc, approximate="tanh")
    if "relu" in ep:
        acc = acc.clamp_min(0)
    if "relu2" in ep:
        acc = acc.clamp_min(0) ** 2
    gated = gated_activation(ep)
    if gated:
        gate = acc[:, :n]
        gate = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda a: F.gelu(a, approximate="tanh")}[
            GATED_ACTIVATIONS[gated]](gate)
        acc = gate * acc[:, n:]
    if residual is not None:
        acc = acc + residual.double()
    if "round" in ep:
        # Eager's `linear(x, w).to(out_dtype)`: rounded to the input dtype, then converted.
        acc = acc.to(getattr(torch, spec.dtype)).to(getattr(torch, spec.out_dtype)).double()
    return acc


def overflow_inputs(spec: KernelSpec, device: str, m: int, seed: int) -> dict[str, torch.Tensor | None]:
    """`make_inputs` with out[0, 0] = 100 * 100 * K and out[1, 0] = -100 * 100 * K (past float16's
    65504 for K >= 7); every other element stays O(100)."""
    inputs = make_inputs(spec, "cpu", m, seed)
    inputs["x"][0], inputs["x"][1], inputs["weight"][0] = 100.0, -100.0, 100.0
    return {name: None if t is None else t.to(device) for name, t in inputs.items()}


def poisoned_out(spec: KernelSpec, device: str, m: int) -> torch.Tensor:
    """An output filled with NaN, so an element the kernel never writes shows."""
    return torch.full((m, spec.param("n")), float("nan"), dtype=getattr(torch, spec.out_dtype),
                      device=device)


def assert_close(spec: KernelSpec, out: torch.Tensor, ref: torch.Tensor) -> None:
    """Every element written (no NaN left) and relative error within the dtype's tolerance."""
    assert out.dtype == getattr(torch, spec.out_dtype)
    assert not torch.isnan(out).any(), "some output elements were never written"
    out64, ref64 = out.double().cpu(), ref.cpu()
    # An overflow (a `round` to float16) is inf exactly where the reference has it, with its sign.
    assert torch.equal(out64.isinf(), ref64.isinf()), f"inf at {out64.isinf().nonzero().tolist()}, want at {ref64.isinf().nonzero().tolist()}"
    assert torch.equal(out64[out64.isinf()], ref64[ref64.isinf()])
    out64, ref64 = out64.nan_to_num(posinf=0.0, neginf=0.0), ref64.nan_to_num(posinf=0.0, neginf=0.0)
    rel = ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()
    # the coarser of the input and output dtypes sets the tolerance (fp32 -> fp16 cast rounds)
    tol = max(TOL[spec.dtype], TOL[spec.out_dtype])
    assert rel <= tol, f"relative error {rel:.3g} > {tol} for {spec.name}"
