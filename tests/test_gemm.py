"""padded_gemm through the runtime: plans, dispatch by M, reference and Triton kernels vs float64.

Triton runs in the CPU interpreter here (conftest sets TRITON_INTERPRET=1 without a GPU)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys

import pytest
import torch
import torch.nn.functional as F

import tileflow
from tileflow import runtime
from tileflow.kernel_spec import GATED_ACTIVATIONS, is_gated
from tileflow.lower import gemm_spec
from tileflow.ops import padded_gemm

M_VALUES = (1, 2, 7, 16, 17, 63, 100, 129, 1000)
N, K = 40, 72  # multiples of no tile
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


_GATES = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda a: F.gelu(a, approximate="tanh")}


def oracle(x, w, bias=None, residual=None, activation="none", weight_up=None, bias_up=None):
    """float64 definition of the op."""
    acc = x.double() @ w.double().t()
    if bias is not None:
        acc = acc + bias.double()
    if is_gated(activation):
        up = x.double() @ weight_up.double().t()
        if bias_up is not None:
            up = up + bias_up.double()
        acc = _GATES[GATED_ACTIVATIONS[activation]](acc) * up
    elif activation == "silu":
        acc = F.silu(acc)
    elif activation == "gelu":
        acc = F.gelu(acc)
    elif activation == "gelu_tanh":
        acc = F.gelu(acc, approximate="tanh")
    elif activation == "relu":
        acc = acc.clamp_min(0)
    elif activation == "relu2":
        acc = acc.clamp_min(0) ** 2
    if residual is not None:
        acc = acc + residual.double()
    return acc


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def record_launches(monkeypatch, *flags: str) -> list[dict]:
    """Make `runtime.get_kernel` hand out kernels that record each launch: the launch's keyword
    arguments, under "spec" the spec's values of the params `flags`, under "epilogue" the spec's
    epilogue. Returns the records."""
    launches: list[dict] = []
    real_get_kernel = runtime.get_kernel

    def recording_get_kernel(target, spec, artifact_dir=None):
        kernel = real_get_kernel(target, spec, artifact_dir)

        def launch(*args, **kwargs):
            launches.append({"spec": {flag: spec.param(flag, False) for flag in flags},
                             "epilogue": list(spec.epilogue), **kwargs})
            return kernel(*args, **kwargs)

        return launch

    monkeypatch.setattr(runtime, "get_kernel", recording_get_kernel)
    return launches


def padded_gemm_case(m: int, n: int, k: int, activation: str, has_bias: bool, has_residual: bool, gen):
    """Fresh operands of a padded GEMM (x, weight, bias, residual; the weight stacked [2N, K] for
    SwiGLU) and their float64 result."""
    x = torch.randn(m, k, generator=gen)
    rows = 2 * n if is_gated(activation) else n
    w = torch.randn(rows, k, generator=gen) / k**0.5
    bias = torch.randn(rows, generator=gen) if has_bias else None
    residual = torch.randn(m, n, generator=gen) if has_residual else None
    up = {}
    w_gate, bias_gate = w, bias
    if is_gated(activation):
        up = {"weight_up": w[n:], "bias_up": None if bias is None else bias[n:]}
        w_gate, bias_gate = w[:n], None if bias is None else bias[:n]
    return (x, w, bias, residual), oracle(x, w_gate, bias_gate, residual, activation, **up)


CASES = [
    ("none", False, False),
    ("none", True, False),
    ("silu", True, False),
    ("gelu", False, False),
    ("gelu_tanh", True, False),
    ("relu", False, True),
    ("relu2", True, False),
    ("swiglu", False, False),
    ("swiglu", True, False),
    ("geglu", False, True),
    ("geglu_tanh", True, False),
    ("none", True, True),
    ("silu", False, True),
]


@pytest.mark.parametrize("target", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation, has_bias, has_residual", CASES)
def test_every_m_against_float64(target, dtype, activation, has_bias, has_residual) -> None:
    gen = torch.Generator().manual_seed(hash((target, str(dtype), activation, has_bias, has_residual)) % 2**31)
    plan = runtime.gemm_plan(N, K, dtype, target, "cpu", m_max=1024)
    m_values = M_VALUES if (activation, has_bias, has_residual) == ("none", True, False) else (1, 17, 129)
    for m in m_values:
        x = torch.randn(m, K, generator=gen).to(dtype)
        w = (torch.randn(N, K, generator=gen) / K**0.5).to(dtype)
        wu = (torch.randn(N, K, generator=gen) / K**0.5).to(dtype) if is_gated(activation) else None
        b = torch.randn(N, generator=gen).to(dtype) if has_bias else None
        bu = torch.randn(N, generator=gen).to(dtype) if has_bias and is_gated(activation) else None
        r = torch.randn(m, N, generator=gen).to(dtype) if has_residual else None
        spec = gemm_spec(dtype=dtype, out_dtype=dtype, n=N, k=K, tile=plan.select_tile(m), activation=activation,
                         has_bias=has_bias, has_residual=has_residual)
        kernel = runtime.get_kernel(target, spec)
        out = torch.full((m, N), float("nan"), dtype=dtype)  # poisoned: every element must be written
        kernel(x, w, b, r, out=out, weight_up=wu, bias_up=bu)
        assert not out.isnan().any(), f"M={m}: unwritten output"
        err = rel_err(out, oracle(x, w, b, r, activation, wu, bu))
        assert err <= TOL[dtype], f"M={m} {activation}: relative error {err:.2e}"


@pytest.mark.parametrize("target", ["reference", "triton"])
def test_stacked_swiglu_weight_and_cast(target) -> None:
    x = torch.randn(33, K, dtype=torch.float16)
    w2 = (torch.randn(2 * N, K) / K**0.5).half()
    b2 = torch.randn(2 * N).half()
    with tileflow.use_config(tileflow.Config(target=target, max_tokens=256)):
        got = padded_gemm(x, w2, b2, activation="swiglu", out_dtype=torch.float32)
    assert got.dtype == torch.float32 and got.shape == (33, N)
    want = oracle(x, w2[:N], b2[:N], None, "swiglu", w2[N:], b2[N:])
    assert rel_err(got, want) <= 2e-3


@pytest.mark.parametrize("target", ["reference", "triton"])
def test_every_target_refuses_operands_of_another_dtype(target) -> None:
    """The reference target checks a launch as the device kernels do: operands whose dtype is
    not the kernel's are refused, not silently computed in a mix of precisions."""
    x, w = torch.randn(5, K), torch.randn(N, K)
    with tileflow.use_config(tileflow.Config(target=target, max_tokens=64)):
        with pytest.raises(ValueError, match="weight must be float32, got float16"):
            padded_gemm(x, w.half())
        with pytest.raises(ValueError, match="bias must be float32, got float64"):
            padded_gemm(x, w, torch.randn(N, dtype=torch.float64))
        with pytest.raises(ValueError, match=r"bias must be \[40\], got \(41,\)"):
            padded_gemm(x, w, torch.randn(N + 1))


@pytest.mark.parametrize("target", ["reference", "triton"])
def test_a_cast_kernel_refuses_an_out_of_the_input_dtype(target) -> None:
    """A bias or residual may come in the input dtype or out_dtype, `out` only in out_dtype: a
    float16 `out` for a float16 -> float32 kernel is refused, not filled with the float32 result
    rounded to float16."""
    from tileflow.kernel_spec import TileConfig

    spec = gemm_spec(dtype=torch.float16, out_dtype=torch.float32, n=N, k=K, tile=TileConfig(16, 32, 32),
                     has_bias=True)
    kernel = runtime.get_kernel(target, spec)
    x, w = torch.randn(5, K).half(), (torch.randn(N, K) / K**0.5).half()
    with pytest.raises(ValueError, match="out must be float32, got float16"):
        kernel(x, w, torch.randn(N).half(), out=torch.empty(5, N, dtype=torch.float16))
    out = torch.empty(5, N)
    assert kernel(x, w, torch.randn(N), out=out) is out  # a float32 bias is fine


def test_a_launch_refuses_an_operand_on_another_device_and_keeps_the_side_operand_dtypes() -> None:
    """Every operand must be on x's device (here the meta device, which any machine has), and a
    GEMM with an empty dimension, which runs no kernel, still takes a bias in out_dtype as the
    kernel launch does."""
    from tileflow.gemm_operands import check_operand_kinds
    from tileflow.kernel_spec import TileConfig

    spec = gemm_spec(dtype=torch.float32, out_dtype=torch.float32, n=N, k=K, tile=TileConfig(16, 32, 32), has_bias=True)
    kernel = runtime.get_kernel("reference", spec)
    x, w, b = torch.randn(3, K), torch.randn(N, K), torch.randn(N)
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        kernel(x, w.to("meta"), b)
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        kernel(x, w, b.to("meta"))
    x16 = torch.randn(0, K).half()
    check_operand_kinds("empty", x16, {"weight": w.half()}, {"bias": b, "residual": None}, torch.float32)
    with pytest.raises(ValueError, match="bias must be float16 or float32, got float64"):
        check_operand_kinds("empty", x16, {"weight": w.half()}, {"bias": b.double()}, torch.float32)


def test_an_empty_out_in_the_workspace_of_its_inputs_is_no_overlap() -> None:
    """With no rows nothing is read or written: empty x and out views of one workspace buffer (a
    server's batch of 0 tokens) share no memory, and the launch returns the empty out."""
    from tileflow.kernel_spec import TileConfig

    spec = gemm_spec(dtype=torch.float32, out_dtype=torch.float32, n=N, k=K, tile=TileConfig(16, 32, 32))
    workspace = torch.zeros(4, K + N)
    x, out = workspace[:0, :K], workspace[:0, K:]
    got = runtime.get_kernel("reference", spec)(x, torch.randn(N, K), out=out)
    assert got is out and got.shape == (0, N)


def test_transposed_weight_view() -> None:
    x, w_kn = torch.randn(21, K), torch.randn(K, N)
    with tileflow.use_config(tileflow.Config(target="triton", max_tokens=64)):
        got = padded_gemm(x, w_kn.t())  # GPT-2 Conv1D layout: no copy of the weight
    assert rel_err(got, oracle(x, w_kn.t())) <= 1e-5


def test_dispatch_never_builds_for_a_new_m() -> None:
    """Kernels are built per plan config; any M in range reuses one of them."""
    n, k = 24, 40
    config = tileflow.Config(target="reference", max_tokens=300)
    plan = runtime.gemm_plan(n, k, torch.float32, "reference", "cpu", m_max=300)
    w = torch.randn(n, k)
    with tileflow.use_config(config):
        for m in range(1, 300, 7):
            padded_gemm(torch.randn(m, k), w)
    built = [kern for kern in runtime.compiled_kernels("padded_gemm") if kern.spec.param("n") == n and kern.spec.param("k") == k]
    assert {kern.spec.tile for kern in built} == set(plan.configs)
    assert len(built) <= 6
    before = len(runtime.compiled_kernels())
    with tileflow.use_config(config):
        for m in (5, 77, 256):
            padded_gemm(torch.randn(m, k), w)
    assert len(runtime.compiled_kernels()) == before


def test_m_zero_and_out_of_plan_range() -> None:
    w = torch.randn(8, 16)
    with tileflow.use_config(tileflow.Config(target="reference", max_tokens=32)):
        assert padded_gemm(torch.randn(0, 16), w).shape == (0, 8)
        big = torch.randn(100, 16)  # past max_tokens: still right, with a warning to raise it
        assert rel_err(padded_gemm(big, w), oracle(big, w)) < 1e-6


def test_token_counts_past_the_plan_warn_once_per_plan_and_side(caplog: pytest.LogCaptureFixture) -> None:
    """A server running past max_tokens meets a new M at almost every step: the warning came
    once per M, and every M stayed in a set for the process's life. Once per plan and side now."""
    w = torch.randn(8, 24)
    runtime._WARNED_RANGE.clear()
    with tileflow.use_config(tileflow.Config(target="reference", max_tokens=32)), caplog.at_level("WARNING"):
        for m in range(33, 233, 7):
            x = torch.randn(m, 24)
            assert rel_err(padded_gemm(x, w), oracle(x, w)) < 1e-6
    warnings = [r.getMessage() for r in caplog.records if "outside its plan's range" in r.getMessage()]
    assert len(warnings) == 1 and "M=33 " in warnings[0], warnings
    assert len(runtime._WARNED_RANGE) == 1


def test_triton_without_gpu_or_interpreter_is_a_clear_error(monkeypatch) -> None:
    from tileflow.backends.triton import BACKEND

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, why = BACKEND.available()
    assert not ok and "TRITON_INTERPRET=1" in why


@pytest.mark.parametrize("value,on", [("1", True), ("true", True), ("on", True), ("0", False), ("false", False),
                                      ("off", False), ("no", False), ("2", False)])
@pytest.mark.parametrize("with_triton", [True, False])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value: str, on: bool, with_triton: bool) -> None:
    """`TRITON_INTERPRET=false` (or off, no, 2) leaves Triton's interpreter off, but tileflow took
    every value but 0 for on: the backend said it could run on a CPU and built a compiled kernel,
    which failed at launch with Triton's "0 active drivers". Without Triton the same spelling holds."""
    from tileflow.backends.triton import BACKEND
    from tileflow.targets import triton_interpreter_enabled

    if with_triton:
        pytest.importorskip("triton")
    else:
        monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.setenv("TRITON_INTERPRET", value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert triton_interpreter_enabled() == on
    if with_triton:
        ok, why = BACKEND.available()
        assert ok == on and (on or "TRITON_INTERPRET=1" in why), why


def test_reference_kernels_of_long_names_are_saved(tmp_path) -> None:
    """The reference backend writes a kernel's source to the debug folder under its name; a GEMM
    over 64 sibling weights of 64 columns has a name too long for a file: it is cut."""
    from tileflow.kernel_spec import KernelSpec, TileConfig, make_params
    from tileflow.targets import get_backend

    spec = KernelSpec(op="padded_gemm", dtype="float32", out_dtype="float32", tile=TileConfig(16, 32, 32),
                      params=make_params(n=64 * 64, k=32, persistent=False, segments="x".join(["64"] * 64)))
    kernel = get_backend("reference").build(spec, tmp_path)
    assert len(kernel.source_path.name.encode()) <= 255 and kernel.source_path.read_text() == kernel.source
    assert runtime.save_kernel_source(dataclasses.replace(kernel, source_path=None), tmp_path / "again").exists()


def test_ascend_target_says_what_is_missing() -> None:
    with tileflow.use_config(tileflow.Config(target="ascend")):
        with pytest.raises(RuntimeError, match="ascend.*(torch_npu|Ascend C emitter)"):
            padded_gemm(torch.randn(4, 8), torch.randn(3, 8))


def test_measured_tile_times_replace_the_estimates(tmp_path) -> None:
    import json

    from tileflow.devices import get_device
    from tileflow.tiles import candidate_configs

    n, k = 40, 72
    base = runtime.gemm_plan(n, k, torch.float32, "reference", "cpu", m_max=500)
    candidates = candidate_configs(n, k, "float32", get_device("cpu"))
    favourite = next(c for c in candidates if c not in (base.select_tile(1), base.select_tile(500)))
    path = tmp_path / "timings.json"
    path.write_text(json.dumps([
        {"device": "cpu", "dtype": "float32", "n": n, "k": k, "tile": c.to_dict(), "tile_seconds": 1e-12 if c == favourite else 1.0}
        for c in candidates
    ]))
    plan = runtime.gemm_plan(n, k, torch.float32, "reference", "cpu", m_max=500, tile_timings=str(path))
    assert plan.configs == (favourite,)
    with pytest.raises(ValueError, match="no file at .*none.json"):
        runtime.gemm_plan(n, k, torch.float32, "reference", "cpu", m_max=500, tile_timings=str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text('[{"device": "cpu"}]')
    with pytest.raises(ValueError, match="malformed"):
        runtime.gemm_plan(n, k, torch.float32, "reference", "cpu", m_max=500, tile_timings=str(tmp_path / "bad.json"))


def test_measured_persistent_variant_runs_and_takes_its_grid_share(tmp_path, monkeypatch) -> None:
    import json

    from tileflow.devices import get_device
    from tileflow.runtime.streams import grid_share
    from tileflow.tiles import candidate_configs

    n, k = 40, 72
    candidates = candidate_configs(n, k, "float32", get_device("cpu"))
    path = tmp_path / "timings.json"
    # Every persistent variant measured faster than its plain kernel: the plan runs them all.
    path.write_text(json.dumps(
        [{"device": "cpu", "dtype": "float32", "n": n, "k": k, "tile": c.to_dict(), "tile_seconds": 1e-3}
         for c in candidates]
        + [{"device": "cpu", "dtype": "float32", "n": n, "k": k, "tile": c.to_dict(), "tile_seconds": 5e-4,
            "persistent": True} for c in candidates]
    ))
    plan = runtime.gemm_plan(n, k, torch.float32, "triton", "cpu", m_max=256, tile_timings=str(path))
    assert all(piece.persistent for piece in plan.pieces)
    # The grouped GEMM has no persistent variant: its plans ignore those timings.
    grouped = runtime.grouped_gemm_plan(n, k, 4, torch.float32, "triton", "cpu", m_max=256, tile_timings=str(path))
    assert not any(piece.persistent for piece in grouped.pieces)
    launches = record_launches(monkeypatch, "persistent")
    x, w = torch.randn(100, k), torch.randn(n, k)
    want = x.double() @ w.double().t()
    with tileflow.use_config(tileflow.Config(target="triton", max_tokens=256, tile_timings=str(path))):
        whole = padded_gemm(x, w)
        with grid_share(0.5):
            shared = padded_gemm(x, w)
    for out in (whole, shared):
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-4)
    assert [launch["spec"]["persistent"] for launch in launches] == [True, True]
    assert "num_programs" not in launches[0]  # the whole device: the kernel's own default
    assert launches[1]["num_programs"] == max(1, int((os.cpu_count() or 1) * 0.5))


def test_tile_timings_become_times_per_wave_of_resident_programs(tmp_path, caplog) -> None:
    """Given the device, the loader turns a plain, TMA or split entry's time per wave of one
    program per SM into its time per wave of the programs an SM holds at once; persistent and
    stream-K entries, entries without their measured M and other devices' entries stay as
    written, as does every entry when no device is given."""
    import json

    from tileflow.devices import get_device
    from tileflow.kernel_spec import TileConfig

    h200 = get_device("H200")
    pair = TileConfig(64, 128, 64, num_warps=4, num_stages=4)  # two to an H200 SM
    alone = TileConfig(128, 256, 64, num_warps=8, num_stages=4)  # one
    base = {"device": "H200", "dtype": "bfloat16", "n": 4096, "k": 14336}
    entries = [
        # 17 x 32 = 544 programs: 5 waves of 132, 3 of 264, so a 264-wave is 5/3 of a 132-wave.
        {**base, "tile": pair.to_dict(), "tile_seconds": 3e-5, "m": 1088},
        {**base, "tile": pair.to_dict(), "tile_seconds": 3e-5, "m": 1088, "tma": True},
        # 5 x 32 x 2 = 320 programs: 3 waves of 132, 2 of 264.
        {**base, "tile": pair.to_dict(), "tile_seconds": 3e-5, "m": 320, "split_k": 2},
        {**base, "tile": pair.to_dict(), "tile_seconds": 3e-5, "m": 1088, "persistent": True},
        {**base, "tile": pair.to_dict(), "tile_seconds": 3e-7, "m": 1088, "stream_k": True},
        {**base, "tile": alone.to_dict(), "tile_seconds": 8e-5, "m": 4224},
        {**base, "n": 6144, "tile": pair.to_dict(), "tile_seconds": 3e-5},
        {**base, "device": "H100-SXM", "tile": pair.to_dict(), "tile_seconds": 3e-5, "m": 1088},
    ]
    path = tmp_path / "timings.json"
    path.write_text(json.dumps(entries))
    with caplog.at_level("WARNING", logger="tileflow"):
        got = runtime.load_tile_timings(str(path), h200)
    # The entry without its m, of a config two share an SM with, is taken as it stands, with a word.
    assert [r.getMessage() for r in caplog.records if "has no measured m" in r.getMessage()] == [
        f"tile time of {pair.name} at 6144x14336 has no measured m: taken as the time of a wave of 2 resident "
        "programs per SM (bench/gemm.py --measure-tiles records m)"]

    def seconds(device: str, n: int, persistent: bool = False, split: int = 1, stream_k: bool = False,
                tma: bool = False) -> dict:
        return dict(got[(device, "bfloat16", n, 14336, persistent, split, stream_k, tma)])

    assert seconds("H200", 4096)[pair] == pytest.approx(3e-5 * 5 / 3)
    assert seconds("H200", 4096, tma=True)[pair] == pytest.approx(3e-5 * 5 / 3)
    assert seconds("H200", 4096, split=2)[pair] == pytest.approx(3e-5 * 3 / 2)
    assert seconds("H200", 4096, persistent=True)[pair] == 3e-5
    assert seconds("H200", 4096, stream_k=True)[pair] == 3e-7
    assert seconds("H200", 4096)[alone] == 8e-5
    assert seconds("H200", 6144)[pair] == 3e-5
    assert seconds("H100-SXM", 4096)[pair] == 3e-5
    raw = runtime.load_tile_timings(str(path))
    assert dict(raw[("H200", "bfloat16", 4096, 14336, False, 1, False, False)])[pair] == 3e-5
    path.write_text(json.dumps([{**entries[0], "m": 0}]))
    with pytest.raises(ValueError, match="measured m must be >= 1"):
        runtime.load_tile_timings(str(path), h200)


def test_run5_tile_times_plan_the_down_projection_as_measured(monkeypatch) -> None:
    """The tile times an H200 measured in run 5, which tileflow ships for the H200. Their
    plan for the down projection (4096 x 14336) at M = 100..256 once ran stream-K over 16 tiles
    and 64x128 TMA tiles alone on their SMs, at 0.64-0.70x cuBLAS; it now runs the split-K
    kernels that the modeled plan ran there at 0.90-0.93x (bench/NOTES.md, Session 39). From
    M = 1000 on it keeps the 128x256 TMA kernels that ran at 0.94-1.01x."""
    from pathlib import Path

    from tileflow.devices import get_device

    monkeypatch.setattr(runtime, "device_for_target", lambda target, device_type: get_device("H200"))
    timings = runtime.shipped_tile_timings(get_device("H200"))
    assert timings is not None and Path(timings).parent.name == "tile_timings"
    plan = runtime.gemm_plan(4096, 14336, torch.bfloat16, "triton", "cuda", m_max=8192, tile_timings=timings)
    assert runtime.gemm_plan(4096, 14336, torch.bfloat16, "triton", "cuda", m_max=8192, tile_timings="auto") == plan
    for m in (100, 128, 256):
        piece = plan.piece_for(m)
        assert piece.split_k == 4 and not piece.stream_k and not piece.tma, (m, plan.describe())
    assert not any(piece.stream_k and piece.lo <= 1024 for piece in plan.pieces), plan.describe()
    for m in (1000, 2048, 4096, 8192):
        assert plan.piece_for(m).tma and plan.piece_for(m).config.block_n == 256, (m, plan.describe())


# On Triton (K = 4096 in the interpreter) the bias, GELU and residual case is extended: the split-K
# reduce's epilogues are test_triton_gemm.py's, the dispatch is the other two cases'.
@pytest.mark.parametrize("activation,has_bias,has_residual,target", [
    pytest.param(*case, target, marks=pytest.mark.extended) if (case[0], target) == ("gelu", "triton") else (*case, target)
    for target in ("reference", "triton")
    for case in (("none", False, False), ("swiglu", True, False), ("gelu", True, True))])
def test_split_k_pieces_dispatch_and_match_float64(monkeypatch, target, activation, has_bias, has_residual) -> None:
    """A plan made for an H200 splits K for these few-tile GEMMs: the runtime launches the
    split-K kernel with the piece's factor, and the result equals float64 (the plan is
    carried as a node would carry it; the kernels run on the CPU)."""
    from tileflow.devices import get_device
    from tileflow.tiles import build_tile_plan

    n, k = 96, 4096
    plan = build_tile_plan(n, k, "float32", m_max=512, device=get_device("H200"),
                           weight_tiles=2 if is_gated(activation) else 1)
    launches = record_launches(monkeypatch, "split_k")
    gen = torch.Generator().manual_seed(11)
    for m in (3, 40):
        piece = plan.piece_for(m)
        assert piece.split_k > 1, plan.describe()
        operands, want = padded_gemm_case(m, n, k, activation, has_bias, has_residual, gen)
        got = runtime.run_padded_gemm(*operands, activation, torch.float32, runtime.encode_plan(plan), target)
        assert rel_err(got, want) < 1e-5
        assert launches[-1]["spec"]["split_k"] and launches[-1]["split_k"] == piece.split_k


def test_measured_shapes_plan_a_shape_the_file_does_not_hold(tmp_path, monkeypatch) -> None:
    """Tile times measured at a few (N, K) shapes plan another shape of the same device and dtype:
    each config's time carried to its K along the line through the measured depths, for the plain
    kernels and each variant. Not when the file lacks a candidate config of the shape (the model
    plans, never mixing measured and modeled configs), nor for a fused SwiGLU, nor for another
    dtype; a shape the file holds keeps its own times."""
    import json

    from tileflow.devices import get_device
    from tileflow.tiles import build_tile_plan, candidate_configs

    h200 = get_device("H200")
    monkeypatch.setattr(runtime, "device_for_target", lambda target, device_type: h200)

    def seconds(c, k: int) -> float:  # a fixed part and a stream over K, different per config
        return 2e-6 * c.num_warps + (c.block_m + c.block_n) * k * 2 / (40e9 + 100 * c.block_n * c.block_m)

    measured = [(4096, 4096), (4096, 14336)]
    entries = [{"device": "H200", "dtype": "bfloat16", "n": n, "k": k, "tile": c.to_dict(), "tile_seconds": seconds(c, k)}
               for n, k in measured for c in candidate_configs(n, k, "bfloat16", h200)]
    fast_tma = candidate_configs(4096, 4096, "bfloat16", h200)[0]
    entries += [{**e, "tile_seconds": e["tile_seconds"] / 4, "tma": True} for e in entries if e["tile"] == fast_tma.to_dict()]
    path = tmp_path / "timings.json"
    path.write_text(json.dumps(entries))
    n, k = 5120, 8192
    cands = candidate_configs(n, k, "bfloat16", h200)
    plan = runtime.gemm_plan(n, k, torch.bfloat16, "triton", "cuda", m_max=4096, tile_timings=str(path))
    want = build_tile_plan(n, k, "bfloat16", m_max=4096, device=h200, measured={c: seconds(c, k) for c in cands},
                           measured_tma={fast_tma: seconds(fast_tma, k) / 4})
    assert plan == want and any(p.tma for p in plan.pieces)
    modeled = build_tile_plan(n, k, "bfloat16", m_max=4096, device=h200)
    assert plan != modeled
    # Carried only where the plain kernels cover every candidate config.
    path.write_text(json.dumps([e for e in entries if e["tile"] != cands[-1].to_dict()]))
    assert runtime.gemm_plan(n, k, torch.bfloat16, "triton", "cuda", m_max=4096, tile_timings=str(path)) == modeled
    path.write_text(json.dumps(entries))
    swiglu = runtime.gemm_plan(n, k, torch.bfloat16, "triton", "cuda", m_max=4096, tile_timings=str(path), weight_tiles=2)
    assert swiglu == build_tile_plan(n, k, "bfloat16", m_max=4096, device=h200, weight_tiles=2)
    fp16 = runtime.gemm_plan(n, k, torch.float16, "triton", "cuda", m_max=4096, tile_timings=str(path))
    assert fp16 == build_tile_plan(n, k, "float16", m_max=4096, device=h200)
    own = runtime.gemm_plan(4096, 4096, torch.bfloat16, "triton", "cuda", m_max=4096, tile_timings=str(path))
    held = candidate_configs(4096, 4096, "bfloat16", h200)
    assert own == build_tile_plan(4096, 4096, "bfloat16", m_max=4096, device=h200,
                                  measured={c: seconds(c, 4096) for c in held},
                                  measured_tma={fast_tma: seconds(fast_tma, 4096) / 4})
    # Between the measured depths only: a line carried past its samples is no measurement.
    for k_out in (2048, 16384):
        assert runtime.gemm_plan(n, k_out, torch.bfloat16, "triton", "cuda", m_max=4096, tile_timings=str(path)) == \
            build_tile_plan(n, k_out, "bfloat16", m_max=4096, device=h200)
    assert runtime.plan_tile_times(n, 16384, torch.bfloat16, "triton", "cuda", tile_timings=str(path)) is None
    assert runtime.plan_tile_times(n, k, torch.bfloat16, "triton", "cuda", tile_timings=str(path)) == str(path)


def test_carried_tile_times_are_resident_wave_times_converted_once(tmp_path, monkeypatch) -> None:
    """Entries that record their measured M are turned into resident-wave times once, then
    carried: the plan of a shape between two measured depths equals `build_tile_plan` with each
    config's converted times carried along K (`tile_times_at_depth`)."""
    import json

    from tileflow.devices import get_device
    from tileflow.tiles import build_tile_plan, candidate_configs, programs_per_core, tile_times_at_depth

    h200 = get_device("H200")
    monkeypatch.setattr(runtime, "device_for_target", lambda target, device_type: h200)
    n_meas, m_meas = 4096, 1088
    entries, converted = [], {}
    for k in (4096, 14336):
        for c in candidate_configs(n_meas, k, "bfloat16", h200):
            raw = 2e-6 * c.num_warps + (c.block_m + c.block_n) * k * 2 / (40e9 + 100 * c.block_n * c.block_m)
            programs = -(-m_meas // c.block_m) * -(-n_meas // c.block_n)
            ratio = -(-programs // h200.cores) / -(-programs // (h200.cores * programs_per_core(c, "bfloat16", h200)))
            entries.append({"device": "H200", "dtype": "bfloat16", "n": n_meas, "k": k, "tile": c.to_dict(),
                            "tile_seconds": raw, "m": m_meas})
            converted.setdefault(c, {})[k] = raw * ratio
    raw_4096 = {c: e["tile_seconds"] for c, e in zip(converted, entries)}
    assert any(v[4096] != raw_4096[c] for c, v in converted.items())  # the pairs' and fours' times change
    path = tmp_path / "timings.json"
    path.write_text(json.dumps(entries))
    n, k = 5120, 8192
    want = tile_times_at_depth({c: sorted(v.items()) for c, v in converted.items()
                                if c in candidate_configs(n, k, "bfloat16", h200)}, k)
    plan = runtime.gemm_plan(n, k, torch.bfloat16, "triton", "cuda", m_max=4096, tile_timings=str(path))
    assert plan == build_tile_plan(n, k, "bfloat16", m_max=4096, device=h200, measured=want)


def test_measured_split_k_times_reach_the_plan(tmp_path, monkeypatch) -> None:
    """Tile timings with split-K entries (per-program times, as `bench/gemm.py --measure-tiles`
    writes them) make a measured GPU plan split exactly where they say; without them a measured
    plan never splits."""
    import json

    from tileflow.devices import get_device
    from tileflow.tiles import candidate_configs

    h200 = get_device("H200")
    monkeypatch.setattr(runtime, "device_for_target", lambda target, device_type: h200)
    n, k = 4096, 4096
    cands = candidate_configs(n, k, "bfloat16", h200)
    plain = [{"device": "H200", "dtype": "bfloat16", "n": n, "k": k, "tile": c.to_dict(), "tile_seconds": 2e-5}
             for c in cands]
    path = tmp_path / "timings.json"
    path.write_text(json.dumps(plain))
    measured = runtime.gemm_plan(n, k, torch.bfloat16, "triton", "cuda", m_max=4096, tile_timings=str(path))
    assert all(piece.split_k == 1 for piece in measured.pieces)
    fast = cands[2]
    path.write_text(json.dumps(plain + [{**plain[2], "tile_seconds": 1e-9, "split_k": 4}]))
    timings = runtime.load_tile_timings(str(path))
    assert timings[("H200", "bfloat16", n, k, False, 4, False, False)] == ((fast, 1e-9),)
    split = runtime.gemm_plan(n, k, torch.bfloat16, "triton", "cuda", m_max=4096, tile_timings=str(path))
    assert {(p.config, p.split_k) for p in split.pieces if p.split_k > 1} == {(fast, 4)}
    # The grouped GEMM has no split kernel: its plans ignore those entries.
    grouped = runtime.grouped_gemm_plan(n, k, 8, torch.bfloat16, "triton", "cuda", m_max=4096, tile_timings=str(path))
    assert all(piece.split_k == 1 for piece in grouped.pieces)


@pytest.mark.parametrize("target", ["reference", "triton"])
@pytest.mark.parametrize("activation,has_bias,has_residual", [("none", False, False), ("swiglu", True, False),
                                                              ("gelu", True, True)])
def test_measured_stream_k_pieces_dispatch_and_match_float64(tmp_path, monkeypatch, target, activation, has_bias,
                                                             has_residual) -> None:
    """Tile timings with a stream-K entry (a time per work unit, as `bench/gemm.py
    --measure-tiles` writes it) put stream-K pieces into a measured plan; the runtime launches
    the stream-K kernel over the whole device, or over its grid share under nano-batching, and
    the result equals float64 on both targets."""
    import json

    from tileflow.devices import get_device
    from tileflow.runtime.streams import grid_share
    from tileflow.tiles import candidate_configs

    n, k = 96, 4096
    # Plans run stream-K over at least one whole tile per core: an H200 cut to one SM lets these
    # small grids qualify (the launch's program count comes from the CPU here).
    h200 = dataclasses.replace(get_device("H200"), cores=1)
    monkeypatch.setattr(runtime, "device_for_target", lambda target, device_type: h200)
    weight_tiles = 2 if is_gated(activation) else 1
    cands = candidate_configs(n, k, "float32", h200, weight_tiles=weight_tiles)
    entry = {"device": "H200", "dtype": "float32", "n": n, "k": k}
    path = tmp_path / "timings.json"
    path.write_text(json.dumps([{**entry, "tile": c.to_dict(), "tile_seconds": 1e-4} for c in cands]
                               + [{**entry, "tile": cands[0].to_dict(), "tile_seconds": 1e-9, "stream_k": True}]))
    plan = runtime.gemm_plan(n, k, torch.float32, target, "cuda", m_max=512, tile_timings=str(path),
                             weight_tiles=weight_tiles)
    assert all(piece.stream_k and piece.config == cands[0] for piece in plan.pieces), plan.describe()
    launches = record_launches(monkeypatch, "stream_k")
    gen = torch.Generator().manual_seed(12)
    for m, share in ((3, None), (40, 0.25)):
        operands, want = padded_gemm_case(m, n, k, activation, has_bias, has_residual, gen)
        with grid_share(share) if share is not None else contextlib.nullcontext():
            got = runtime.run_padded_gemm(*operands, activation, torch.float32, runtime.encode_plan(plan), target)
        assert rel_err(got, want) < 1e-5
        assert launches[-1]["spec"]["stream_k"]
        assert launches[-1].get("num_programs") == (None if share is None else max(1, int((os.cpu_count() or 1) * share)))


@pytest.mark.parametrize("target", ["reference", "triton"])
def test_measured_tma_pieces_dispatch_and_match_float64(tmp_path, monkeypatch, target) -> None:
    """Tile timings with TMA entries faster than the plain kernels put TMA pieces into a
    measured GPU plan for 16-bit operands; the runtime builds and launches the TMA kernel, with
    or without a bias and residual epilogue, and the result equals float64 (the reference
    target runs the same math without TMA)."""
    import json

    from tileflow.devices import get_device
    from tileflow.tiles import candidate_configs

    n, k = 96, 512
    h200 = get_device("H200")
    monkeypatch.setattr(runtime, "device_for_target", lambda target, device_type: h200)
    cands = candidate_configs(n, k, "float16", h200)
    entry = {"device": "H200", "dtype": "float16", "n": n, "k": k}
    path = tmp_path / "timings.json"
    path.write_text(json.dumps([{**entry, "tile": c.to_dict(), "tile_seconds": 1e-4} for c in cands]
                               + [{**entry, "tile": c.to_dict(), "tile_seconds": 5e-5, "tma": True} for c in cands]))
    plan = runtime.gemm_plan(n, k, torch.float16, target, "cuda", m_max=512, tile_timings=str(path))
    assert all(piece.tma for piece in plan.pieces), plan.describe()
    launches = record_launches(monkeypatch, "tma")
    gen = torch.Generator().manual_seed(13)
    for m in (5, 70):
        x, w = torch.randn(m, k, generator=gen).half(), (torch.randn(n, k, generator=gen) / k**0.5).half()
        got = runtime.run_padded_gemm(x, w, None, None, "gelu", torch.float16, runtime.encode_plan(plan), target)
        assert rel_err(got, oracle(x, w, None, None, "gelu")) < 2e-3
        assert launches[-1]["spec"]["tma"]
    with tileflow.use_config(tileflow.Config(target=target, max_tokens=512, tile_timings=str(path))):
        x, bias = torch.randn(9, k, generator=gen).half(), torch.randn(n, generator=gen).half()
        got = padded_gemm(x, w, bias)
    assert rel_err(got, oracle(x, w, bias, None, "none")) < 2e-3
    assert launches[-1]["spec"]["tma"] and launches[-1]["epilogue"] == ["bias"]
    residual = torch.randn(9, n, generator=gen).half()
    got = runtime.run_padded_gemm(x, w, bias, residual, "none", torch.float16, runtime.encode_plan(plan), target)
    assert rel_err(got, oracle(x, w, bias, residual, "none")) < 2e-3
    assert launches[-1]["spec"]["tma"] and launches[-1]["epilogue"] == ["bias", "residual"]


def test_swiglu_with_separate_weights_needs_both_biases_or_neither() -> None:
    x, wg, wu, b = torch.randn(5, 16), torch.randn(8, 16), torch.randn(8, 16), torch.randn(8)
    with tileflow.use_config(tileflow.Config(target="reference")):
        with pytest.raises(ValueError, match="give both bias and bias_up or neither"):
            padded_gemm(x, wg, b, activation="swiglu", weight_up=wu)
        with pytest.raises(ValueError, match="bias_up .* needs bias"):
            padded_gemm(x, wg, activation="swiglu", weight_up=wu, bias_up=b)
        got = padded_gemm(x, wg, b, activation="swiglu", weight_up=wu, bias_up=b)
    torch.testing.assert_close(got, F.silu(F.linear(x, wg, b)) * F.linear(x, wu, b))


@pytest.mark.parametrize("target", ["reference", "triton"])
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the Triton interpreter's numpy
def test_round_first_is_the_float16_result_converted(target) -> None:
    """`padded_gemm(..., out_dtype, round_first=True)` is `F.linear(x, w).to(out_dtype)`: the
    result rounded to x's dtype (float16: inf past 65504) before the conversion; without it the
    float32 accumulator is converted as is. On the reference target it is eager bit for bit
    (integer operands: their sums are exact in float32 in any order, and above 2048 float16
    rounds them)."""
    gen = torch.Generator().manual_seed(11)
    x, w = (torch.randint(-32, 33, shape, generator=gen).half() for shape in ((33, K), (N, K)))
    x[0], w[0] = 100.0, 100.0  # out[0, 0] = 720000: inf in float16
    with tileflow.use_config(tileflow.Config(target=target, max_tokens=256)):
        rounded = padded_gemm(x, w, out_dtype=torch.float32, round_first=True)
        direct = padded_gemm(x, w, out_dtype=torch.float32)
        # N = 0 and K = 0 take no kernel: the rounding still applies (60000 + 60000 is inf).
        side = torch.full((3, 8), 60000.0).half()
        empty_k = padded_gemm(x[:3, :0], w[:8, :0], side[0], residual=side, out_dtype=torch.float32, round_first=True)
    assert rounded.dtype == direct.dtype == torch.float32
    assert torch.isinf(rounded[0, 0]) and torch.isfinite(direct).all()
    assert torch.equal(rounded, direct.half().float())
    assert torch.isinf(empty_k).all()
    if target == "reference":
        assert torch.equal(rounded, F.linear(x, w).float())


def test_round_first_keys_its_own_kernel_only_where_it_rounds() -> None:
    from tileflow.kernel_spec import TileConfig

    def spec(dtype, out_dtype, **kw):
        return gemm_spec(dtype=dtype, out_dtype=out_dtype, n=N, k=K, tile=TileConfig(16, 32, 32), has_bias=True, **kw)

    plain, rounded = spec(torch.float16, torch.float32), spec(torch.float16, torch.float32, round_first=True)
    assert plain.epilogue == ("bias", "cast") and rounded.epilogue == ("bias", "round", "cast")
    assert plain.name == "tileflow_padded_gemm_float16_to_float32_m16n32k32w4s3_k72_n40_bias_cast"  # as before
    assert rounded.name == plain.name.replace("_cast", "_round_cast") and rounded.digest() != plain.digest()
    # A float32 accumulator already has the input's dtype, and without a cast nothing is converted.
    assert spec(torch.float32, torch.float16, round_first=True) == spec(torch.float32, torch.float16)
    assert spec(torch.float16, torch.float16, round_first=True) == spec(torch.float16, torch.float16)


def test_a_kernel_spec_digest_changes_with_every_field_and_every_salt() -> None:
    """The digest keys on-disk kernel caches and the in-process build memo: any change that
    changes the generated code (every spec field, each TileConfig field included) or the tool
    versions passed as salt must change it, or a stale kernel is reused."""
    import dataclasses

    from tileflow.kernel_spec import KernelSpec, TileConfig, make_params

    base = KernelSpec("padded_gemm", "float16", "float32", TileConfig(16, 32, 32), ("bias", "cast"),
                      make_params(n=40, k=72, persistent=False))
    variants = [
        dataclasses.replace(base, op="grouped_gemm"),
        dataclasses.replace(base, dtype="bfloat16"),
        dataclasses.replace(base, out_dtype="float64"),
        dataclasses.replace(base, tile=None),
        dataclasses.replace(base, epilogue=("bias", "round", "cast")),
        dataclasses.replace(base, params=make_params(n=40, k=72, persistent=True)),
        dataclasses.replace(base, params=make_params(n=40, k=64, persistent=False)),
        *(dataclasses.replace(base, tile=dataclasses.replace(base.tile, **{f: 2 * getattr(base.tile, f)}))
          for f in ("block_m", "block_n", "block_k", "num_warps", "num_stages", "group_m")),
    ]
    digests = {spec.digest() for spec in [base, *variants]}
    assert len(digests) == 1 + len(variants)
    assert len({base.digest(), base.digest("1.0"), base.digest("1.1"), base.digest("1.0", "3.2")}) == 4
    assert base.digest("1.0") == KernelSpec.from_dict(base.to_dict()).digest("1.0")
    for spec in variants:
        assert KernelSpec.from_dict(spec.to_dict()) == spec


def test_gemm_specs_refuse_odd_blocks_bool_sizes_and_unknown_params() -> None:
    """A block side that is not a power of two, a size given as a bool (True is an int 1 to
    Python) and a param no GEMM kernel reads (a misspelt flag) are refused, naming the cause."""
    from tileflow.kernel_spec import KernelSpec, TileConfig, check_gemm_spec, make_params

    for bad in (48, 0, -16):
        with pytest.raises(ValueError, match="power of two"):
            TileConfig(bad, 32, 32)
    tile = TileConfig(16, 32, 32)

    def check(**params) -> None:
        spec = KernelSpec("padded_gemm", "float32", "float32", tile, (), make_params(**params))
        check_gemm_spec(spec, ("float32",), "test", 16)

    check(n=40, k=72, persistent=True)
    with pytest.raises(ValueError, match="positive integer param 'n'"):
        check(n=True, k=72)
    with pytest.raises(ValueError, match="positive integer param 'k'"):
        check(n=40, k=0)
    with pytest.raises(ValueError, match=r"params \['persistant'\]"):
        check(n=40, k=72, persistant=True)


def test_reference_stream_k_parts_follow_the_kernels_grouped_tile_order() -> None:
    """The reference runs a stream-K spec's K parts tile by tile: tile (pid_m, pid_n) gets the
    segments of the tile the kernels number so in their grouped order (GROUP_M row tiles sweep
    N together; the last group short), not another tile's. The numbers differ only in summation
    order, which no float64 comparison sees, so this checks the boundaries themselves."""
    from tileflow.backends.reference.gemm import _stream_k_parts
    from tileflow.kernel_spec import KernelSpec, TileConfig, make_params
    from tileflow.tiles import stream_k_segments

    group_m, n, k, m, programs = 4, 80, 72, 100, 11
    tile = TileConfig(16, 16, 16, group_m=group_m)
    spec = KernelSpec(op="padded_gemm", dtype="float32", out_dtype="float32", tile=tile, epilogue=(),
                      params=make_params(n=n, k=k, stream_k=True))
    num_pid_m, num_pid_n, steps = -(-m // 16), -(-n // 16), -(-k // 16)  # 7 M tiles: a last group of 3
    units = num_pid_m * num_pid_n * steps
    parts = _stream_k_parts(spec, m, programs)
    seen = set()
    for tile_id in range(num_pid_m * num_pid_n):  # the kernels' order, forwards
        in_group = tile_id % (group_m * num_pid_n)
        first_pid_m = tile_id // (group_m * num_pid_n) * group_m
        group_size_m = min(num_pid_m - first_pid_m, group_m)
        pid_m, pid_n = first_pid_m + in_group % group_size_m, in_group // group_size_m
        seen.add((pid_m, pid_n))
        want = (0, *(min(end * 16, k) for _, _, end in stream_k_segments(tile_id, steps, units, programs)))
        assert parts(pid_m, pid_n, num_pid_m) == want, (tile_id, pid_m, pid_n)
    assert len(seen) == num_pid_m * num_pid_n
    assert any(len(parts(pm, pn, num_pid_m)) > 2 for pm, pn in seen)  # some tiles are shared


def test_reference_split_k_adds_the_parts_the_triton_launcher_makes() -> None:
    """The reference's split-K adds the products of K parts of ceil(steps / split_k) whole
    BLOCK_K steps, in order, as the Triton launcher splits K: K = 72 in 5 steps of 16 is
    (0, 48, 72) for split_k = 2 and (0, 32, 64, 72) for 4. (Another partition is as close to
    float64, so this compares with the parts' sum itself; one tile, so both see the same
    operands.)"""
    from tileflow.backends.reference.gemm import gemm_tile
    from tileflow.kernel_spec import KernelSpec, TileConfig, make_params

    spec = KernelSpec(op="padded_gemm", dtype="float32", out_dtype="float32", tile=TileConfig(64, 64, 16),
                      epilogue=(), params=make_params(n=N, k=K, split_k=True))
    kernel = runtime.get_kernel("reference", spec)
    gen = torch.Generator().manual_seed(8)
    x, w = torch.randn(19, K, generator=gen), torch.randn(N, K, generator=gen)
    for split_k, bounds in ((2, (0, 48, 72)), (4, (0, 32, 64, 72)), (1, (0, 72))):
        want = gemm_tile(x, w, None, None, "none", torch.float32, k_split=bounds)
        assert torch.equal(kernel(x, w, split_k=split_k), want), split_k


def test_reference_stream_k_kernel_sums_each_tiles_own_parts() -> None:
    """A stream-K reference launch over `num_programs` programs computes every output tile
    (pid_m, pid_n) from that tile's own K parts (`_stream_k_parts` at the launch's M, capped
    program count and ceil(M / BLOCK_M) row tiles), bit for bit: a wrong tile numbering or
    program count changes only the summation order, which no float64 comparison sees."""
    from tileflow.backends.reference.gemm import _stream_k_parts, gemm_tile
    from tileflow.kernel_spec import KernelSpec, TileConfig, make_params

    n, k, m, programs, bm, bn = 80, 72, 100, 11, 16, 16  # 7 M tiles: a last group of 3
    spec = KernelSpec(op="padded_gemm", dtype="float32", out_dtype="float32", tile=TileConfig(bm, bn, 16, group_m=4),
                      epilogue=(), params=make_params(n=n, k=k, stream_k=True))
    gen = torch.Generator().manual_seed(11)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    got = runtime.get_kernel("reference", spec)(x, w, num_programs=programs)
    parts, num_pid_m = _stream_k_parts(spec, m, programs), -(-m // bm)
    for pid_m in range(num_pid_m):
        for pid_n in range(-(-n // bn)):
            rows, cols = slice(pid_m * bm, (pid_m + 1) * bm), slice(pid_n * bn, (pid_n + 1) * bn)
            want = gemm_tile(x[rows], w[cols], None, None, "none", torch.float32,
                             k_split=parts(pid_m, pid_n, num_pid_m))
            assert torch.equal(got[rows, cols], want), (pid_m, pid_n)


def test_reference_launch_refuses_a_split_k_it_cannot_run() -> None:
    """A reference kernel refuses `split_k` unless it is a split-K kernel, and a split-K kernel
    refuses a missing, zero, negative or bool `split_k` (ValueError, as the Triton launcher)."""
    from tileflow.kernel_spec import KernelSpec, TileConfig, make_params

    def kernel(split: bool):
        params = make_params(n=N, k=K, split_k=True) if split else make_params(n=N, k=K)
        return runtime.get_kernel("reference", KernelSpec(op="padded_gemm", dtype="float32", out_dtype="float32",
                                                          tile=TileConfig(16, 16, 16), epilogue=(), params=params))

    x, w = torch.randn(5, K), torch.randn(N, K)
    with pytest.raises(ValueError, match="needs a split-K kernel"):
        kernel(False)(x, w, split_k=2)
    for bad in (None, 0, -1, True, 2.0):
        with pytest.raises(ValueError, match="needs split_k, a positive int"):
            kernel(True)(x, w, split_k=bad)
    assert rel_err(kernel(True)(x, w, split_k=3), oracle(x, w)) <= 1e-5


def test_reference_float64_gemm_accumulates_in_float64() -> None:
    """float64 operands accumulate in float64 on the reference backend (a float32 accumulator
    would be off by about 1e-7), bias and residual included."""
    from tileflow.kernel_spec import TileConfig

    spec = gemm_spec(dtype=torch.float64, out_dtype=torch.float64, n=N, k=K, tile=TileConfig(16, 32, 32),
                     activation="silu", has_bias=True, has_residual=True)
    gen = torch.Generator().manual_seed(12)
    x, w = torch.randn(37, K, generator=gen, dtype=torch.float64), torch.randn(N, K, generator=gen, dtype=torch.float64)
    b, r = torch.randn(N, generator=gen, dtype=torch.float64), torch.randn(37, N, generator=gen, dtype=torch.float64)
    got = runtime.get_kernel("reference", spec)(x, w, b, r)
    assert got.dtype == torch.float64
    assert rel_err(got, oracle(x, w, b, r, "silu")) <= 1e-13


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_reference_half_gemm_keeps_its_epilogue_in_float32(activation: str) -> None:
    """float16 operands with a float32 output (`cast`): bias, activation, SwiGLU product and
    residual all stay on the float32 accumulator, as the kernels' epilogue does, so the result is
    float64's to float32 rounding (~1e-7), not float16's (~5e-4, inside the float16 tolerance
    that the other cases use)."""
    from tileflow.kernel_spec import TileConfig

    spec = gemm_spec(dtype=torch.float16, out_dtype=torch.float32, n=N, k=K, tile=TileConfig(16, 32, 32),
                     activation=activation, has_bias=True, has_residual=True)
    gen = torch.Generator().manual_seed(13)
    x, w, wu = (torch.randn(*shape, generator=gen).half() for shape in ((37, K), (N, K), (N, K)))
    b, bu, r = (torch.randn(*shape, generator=gen).half() for shape in ((N,), (N,), (37, N)))
    up = {"weight_up": wu, "bias_up": bu} if is_gated(activation) else {}
    got = runtime.get_kernel("reference", spec)(x, w, b, r, **up)
    assert got.dtype == torch.float32
    assert rel_err(got, oracle(x, w, b, r, activation, wu, bu)) <= 1e-6


@pytest.mark.parametrize("activation", ["geglu", "geglu_tanh"])
def test_a_gated_gemm_over_an_empty_k_is_its_gate_bias_activation_times_the_up_bias(activation) -> None:
    """K = 0: no kernel runs, and the result is act(bias_gate) * bias_up with the gate's own
    activation (GELU, exact or tanh), not SiLU."""
    gen = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(3, 0), torch.randn(2 * N, 0), torch.randn(2 * N, generator=gen)
    with tileflow.use_config(tileflow.Config(target="reference")):
        got = padded_gemm(x, w, b, activation=activation)
    want = oracle(x, w[:N], b[:N], activation=activation, weight_up=w[N:], bias_up=b[N:])
    torch.testing.assert_close(got.double(), want.expand(3, N), rtol=1e-6, atol=1e-6)


_BAD_TIMING_ENTRIES = [
    ({"persistent": "false"}, "'persistent' must be true or false"),  # bool("false") is True
    ({"split_k": 0}, "'split_k' must be an integer >= 1"),  # was a ZeroDivisionError
    ({"n": 0}, "'n' must be an integer >= 1"),  # was a ZeroDivisionError
    ({"n": -4096}, "'n' must be an integer >= 1"),
    ({"k": 14336.5}, "'k' must be an integer >= 1"),  # int() truncated it
    ({"tile_seconds": True}, "'tile_seconds' must be a number"),  # read as 1 s
]


@pytest.mark.parametrize("change, message", _BAD_TIMING_ENTRIES)
def test_a_tile_timings_entry_with_a_bad_field_is_malformed(tmp_path, change: dict, message: str) -> None:
    """Every field is checked for its kind and range: a wrong one was read silently as another
    value, or raised a bare ZeroDivisionError once the device was known."""
    import json

    from tileflow.devices import get_device

    entry = {"device": "H200", "dtype": "bfloat16", "n": 4096, "k": 14336, "m": 1088,
             "tile": {"block_m": 64, "block_n": 128, "block_k": 64, "num_warps": 4, "num_stages": 4},
             "tile_seconds": 3e-5, **change}
    path = tmp_path / "timings.json"
    path.write_text(json.dumps([entry]))
    with pytest.raises(ValueError, match=f"is malformed .*{re.escape(message)}"):
        runtime.load_tile_timings(str(path), get_device("H200"))


def test_a_tile_config_timed_twice_is_malformed(tmp_path) -> None:
    """Two times of one config at one shape and variant: the plan took whichever came last in the
    file."""
    import json

    entry = {"device": "H200", "dtype": "bfloat16", "n": 4096, "k": 14336,
             "tile": {"block_m": 64, "block_n": 128, "block_k": 64, "num_warps": 4, "num_stages": 4},
             "tile_seconds": 3e-5}
    path = tmp_path / "timings.json"
    path.write_text(json.dumps([entry, {**entry, "tile_seconds": 9e-5}]))
    with pytest.raises(ValueError, match="is malformed .*timed twice for the same shape and variant"):
        runtime.load_tile_timings(str(path))


def test_listing_kernels_while_another_thread_builds_one() -> None:
    """`compiled_kernels` walked the live kernel cache: a kernel another thread built meanwhile
    (a serving thread's first call of a shape while a monitor lists the kernels) made it raise
    `dictionary changed size during iteration`. The listing takes a snapshot. Deterministic
    stand-in for the other thread: an `op` whose comparison builds a kernel mid-walk."""
    import threading

    from tileflow.kernel_spec import TileConfig
    from tileflow.lower import gemm_spec

    tile = TileConfig(16, 16, 16)
    runtime.get_kernel("reference", gemm_spec(dtype=torch.float32, out_dtype=torch.float32, n=3, k=5, tile=tile))
    # One build mid-walk is enough to change the cache's size (building at every comparison ran
    # out of widths where the worker's cache held over a thousand kernels); a width no kernel in
    # the cache has, so that the build really adds one.
    width = max([spec.param("n", 0) for _, spec in runtime._KERNELS if spec.op == "padded_gemm"], default=0) + 1
    built: list[int] = []

    class BuildsWhileCompared(str):
        def __eq__(self, other: object) -> bool:
            if not built:
                built.append(len(runtime._KERNELS))
                runtime.get_kernel("reference", gemm_spec(dtype=torch.float32, out_dtype=torch.float32, n=width,
                                                          k=5, tile=tile))
                built.append(len(runtime._KERNELS))
            return str.__eq__(self, other)

        __hash__ = str.__hash__

    assert runtime.compiled_kernels(BuildsWhileCompared("padded_gemm"))
    assert built[1] == built[0] + 1  # the walk met a kernel built during it
    # And with real threads (the race itself; it showed within a few builds).
    errors: list[BaseException] = []
    done = threading.Event()

    def lister() -> None:
        while not done.is_set():
            try:
                runtime.compiled_kernels("padded_gemm")
            except RuntimeError as exc:
                errors.append(exc)
                return

    thread = threading.Thread(target=lister)
    thread.start()
    try:
        for n in range(2000, 2100):
            runtime.get_kernel("reference", gemm_spec(dtype=torch.float32, out_dtype=torch.float32, n=n, k=5, tile=tile))
    finally:
        done.set()
        thread.join()
    assert not errors
