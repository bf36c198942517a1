"""The benchmarks' CPU paths run (so they do not rot between GPU sessions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# The three benchmarks of the issues' acceptance in the default run; the profiling and sampling
# ones (and compile_time.py below) in the extended run, which goes before every GPU session.
@pytest.mark.parametrize("script", ["gemm.py", "attention.py", "e2e.py",
                                    *(pytest.param(script, marks=pytest.mark.extended)
                                      for script in ("profile_step.py", "sampling.py"))])
def test_benchmark_smoke_check_passes_on_cpu(script: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "needs a GPU" in proc.stdout or "no CUDA GPU" in proc.stdout
    assert "smoke check passed" in proc.stdout


def test_host_planning_benchmark_runs() -> None:
    """bench/host.py (host-side planning time, measured on any machine) prints a positive time for
    each call, and its long-context batch is balanced by the split."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "host.py"), "--repeats", "1", "--no-write"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| build") or line.startswith("| search")]
    assert [r[0].strip() for r in rows] == ["build_task_table"] * 3 + ["build_tile_plan"] * 3 + ["search_split"]
    assert all(float(r[2]) > 0 for r in rows)
    assert float(rows[2][1].rsplit("max/avg", 1)[1]) <= 1.5


@pytest.mark.extended
def test_compile_time_benchmark_runs() -> None:
    """bench/compile_time.py (compile time by model depth, on any machine) prints one row per
    depth with tileflow's time split by pass (times are measured there, never asserted)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_time.py"), "--models", "gpt2", "--layers", "1,2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("|")]
    header, rows = [c.strip() for c in lines[0]], lines[2:]
    assert {"canonicalize ms", "attention ms", "gemm_padding ms", "tileflow ms"} <= set(header)
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("gpt2", "1"), ("gpt2", "2")]
    assert all(float(r[header.index("tileflow ms")]) > 0 for r in rows)


# ---------------------------------------------------------------------------------------------
# The GPU paths' arithmetic and plumbing, checked on the CPU (the device minutes are scarce: a
# wrong count or a lost table there costs a session).

import importlib
import json
import os
import shutil

BENCH = ROOT / "bench"


def _bench_module(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return importlib.import_module(name)


def test_attention_flops_count_the_scores_each_query_sees(monkeypatch) -> None:
    attention = _bench_module("attention", monkeypatch)
    # A causal prompt: S(S+1)/2 pairs, not S^2 (runs 1-3 reported twice the achieved rate).
    assert attention.attention_flops([4096], [4096], 32, 128) == 4 * 32 * 128 * 4096 * 4097 // 2
    # A decode sees its whole context; a chunk of n over a prefix p sees n*p + n(n+1)/2.
    assert attention.attention_flops([1], [1000], 32, 128) == 4 * 32 * 128 * 1000
    assert attention.attention_flops([512], [2048 + 512], 1, 1) == 4 * (512 * 2048 + 512 * 513 // 2)


def test_sdpa_baseline_avoids_the_math_kernel_and_matches_the_float32_reference(monkeypatch) -> None:
    """SDPA's flash kernel takes no mask and `enable_gqa` is flash-only: a decode must go
    unmasked, a masked sequence must come with repeated KV heads (else the math kernel)."""
    import torch
    import torch.nn.functional as F

    attention = _bench_module("attention", monkeypatch)
    monkeypatch.setattr(attention, "HQ", 4)
    monkeypatch.setattr(attention, "HKV", 2)
    monkeypatch.setattr(attention, "D", 16)
    batch = attention.paged_batch([1, 1, 5, 3], [20, 9, 33, 3], device="cpu", dtype=torch.float32)
    batch["_dense"] = [attention.gather_dense(batch, s) for s in range(4)]
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kw):
        calls.append((q.shape[2], q.shape[1], k.shape[1], attn_mask is not None, enable_gqa, q.dtype))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    got = attention.sdpa_per_sequence(batch)
    assert [c[3] for c in calls] == [False, False, True, False]  # only the chunk over a prefix is masked
    assert all(hq == hkv for _, hq, hkv, masked, _, _ in calls if masked)  # masked: heads repeated
    assert all(not gqa for *_, masked, gqa, _ in calls if masked)
    calls.clear()
    want = attention.sdpa_per_sequence(batch, reference=True)
    assert all(dtype == torch.float32 and hq == hkv for _, hq, hkv, _, _, dtype in calls)
    # Against a plain float64 softmax(QK^T)V with bottom-right causal masks.
    cu = batch["cu_seqlens_q"].tolist()
    for s in range(4):
        k, v = (t[0].double().repeat_interleave(2, 0) for t in batch["_dense"][s])
        q = batch["q"][cu[s]:cu[s + 1]].double().transpose(0, 1)
        n, length = q.shape[1], k.shape[1]
        scores = (q @ k.transpose(1, 2)) / 4.0
        hidden = ~torch.ones(n, length, dtype=torch.bool).tril(length - n)
        ref = (scores.masked_fill(hidden, float("-inf")).softmax(-1) @ v).transpose(0, 1)
        for out in (got, want):
            assert torch.allclose(out[cu[s]:cu[s + 1]].double(), ref, atol=1e-5)


def test_model_mask_sdpa_baseline_takes_the_bias_in_q_dtype_over_repeated_heads(monkeypatch) -> None:
    """A float32 bias with bf16 q fails in SDPA's efficient kernel on CUDA ("invalid dtype for
    bias"), and GQA with a mask falls back to the math kernel: table (d) never ran on a GPU."""
    import torch
    import torch.nn.functional as F

    attention = _bench_module("attention", monkeypatch)
    monkeypatch.setattr(attention, "HQ", 4)
    monkeypatch.setattr(attention, "HKV", 2)
    monkeypatch.setattr(attention, "D", 16)
    methods, _, reference = attention.model_mask_methods(24, device="cpu", dtype=torch.bfloat16)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((attn_mask.dtype if attn_mask is not None else None, q.shape[1], k.shape[1], kw.get("enable_gqa", False)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    methods["SDPA, mask"]()
    assert seen == [(torch.bfloat16, 4, 4, False)]
    assert reference().dtype == torch.float32


def test_write_results_marks_partial_tables_and_replaces_them(monkeypatch, tmp_path) -> None:
    common = _bench_module("common", monkeypatch)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    env = {"date": "2026-12-01", "commit": "abc", "device": "NVIDIA H200 (132 SMs, 139 GiB)"}
    path = common.write_results("x", "T", env, "| row 1 |", partial=True)
    assert "partial" in path.read_text() and "| row 1 |" in path.read_text()
    assert common.write_results("x", "T", env, "| row 1 |\n| row 2 |") == path
    assert "partial" not in path.read_text() and "| row 2 |" in path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def _attention_on_cpu(monkeypatch, tmp_path):
    """bench/attention.py's GPU path made to run on the CPU: small heads, results in tmp_path,
    ceilings and timings stubbed. Returns (attention, common)."""
    attention = _bench_module("attention", monkeypatch)
    common = importlib.import_module("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "measured_copy_gbs", lambda *a, **k: 1000.0)
    monkeypatch.setattr(common, "measured_matmul_tflops", lambda *a, **k: 100.0)
    monkeypatch.setattr(common, "median_ms", lambda fn, **k: (fn(0), 1.0)[1])
    monkeypatch.setattr(attention, "HQ", 4)
    monkeypatch.setattr(attention, "HKV", 2)
    monkeypatch.setattr(attention, "D", 16)
    return attention, common


def test_attention_gpu_run_follows_the_parts_order_and_keeps_rows_when_cut(monkeypatch, tmp_path) -> None:
    """bench/attention.py's GPU path on the CPU (device-only pieces stubbed): `--parts mask,...`
    runs the mask table first, and a stage killed in the next part leaves its table on disk (runs
    1 and 3 lost their attention tables to the stage limit)."""
    import torch

    attention, common = _attention_on_cpu(monkeypatch, tmp_path)
    model_mask_methods = attention.model_mask_methods
    monkeypatch.setattr(attention, "model_mask_methods",
                        lambda s, *, device, dtype: model_mask_methods(40, device="cpu", dtype=torch.float32))

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(attention, "paged_batch", killed)  # the decode part: "the stage limit"
    with pytest.raises(Killed):
        attention.run_gpu(True, True, ("mask", "decode"))
    (path,) = tmp_path.iterdir()
    text = path.read_text()
    assert "partial" in text and "## A model's causal mask given as a bias" in text and "| 1x2048 |" in text


def test_measure_tiles_keeps_finished_shapes_when_cut(monkeypatch, tmp_path) -> None:
    """`gemm.py --measure-tiles` (the `tiles` stage: about 120 kernels to build and time) wrote its
    file only at the end: a stage limit lost every timing. Now each finished shape is on disk and
    loads as tile timings."""
    import torch

    gemm = _bench_module("gemm", monkeypatch)
    from tileflow.runtime import gemm_plan, load_tile_timings

    class Killed(BaseException):
        pass

    shapes_seen = []

    def time_ms(fn):
        out = fn()
        shapes_seen.append(tuple(out.shape[1:]))
        if out.shape[1] == 32:
            raise Killed
        return 1.0

    path = tmp_path / "tiles.json"
    with pytest.raises(Killed):
        gemm.measure_tiles(str(path), shapes=[(48, 40), (32, 64)], device_type="cpu", time_ms=time_ms)
    entries = json.loads(path.read_text())
    assert entries and {(e["n"], e["k"]) for e in entries} == {(48, 40)}
    assert load_tile_timings(str(path))
    gemm_plan(48, 40, torch.float32, "triton", "cpu", m_max=256, tile_timings=str(path))


@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("tar") is None, reason="needs coreutils and tar")
def test_gpu_session_packs_results_after_each_stage(tmp_path) -> None:
    """A stage cut by its limit (or a call stopped before the end) must not lose the tables the
    finished rows wrote: results.tar.gz is refreshed after every stage."""
    tree = tmp_path / "tree"
    (tree / "bench" / "results").mkdir(parents=True)
    shutil.copy(BENCH / "gpu_session.sh", tree / "bench")
    fake = tmp_path / "python"
    fake.write_text("#!/bin/bash\ncase \"$*\" in\n  *gemm.py*) echo row > bench/results/gemm-partial.md; sleep 30;;\n"
                    "  *sampling.py*) sleep 60;;\n  *) exit 0;;\nesac\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    log = tmp_path / "session.log"
    # The call itself is stopped during the second stage (the device tool's timeout, the
    # session's device time): the script never reaches its end.
    with open(log, "w") as f:
        subprocess.run(["timeout", "-s", "KILL", "12", "bash", "bench/gpu_session.sh", "gemm:3", "sampling:50"], cwd=tree,
                       stdout=f, stderr=subprocess.STDOUT, timeout=60, env={**os.environ, "OUT": str(out), "PYTHON": str(fake)})
    assert "gemm: exit 124" in log.read_text()
    listing = subprocess.run(["tar", "tzf", str(out / "results.tar.gz")], capture_output=True, text=True, check=True)
    assert "bench/results/gemm-partial.md" in listing.stdout


# ---------------------------------------------------------------------------------------------
# A reviewer's dry run of the GPU session on the CPU (Session 16's plan): lost tables, checks
# that pass on stale data, stages that die without a trace.


def test_e2e_stages_of_different_parts_write_different_files(monkeypatch, tmp_path) -> None:
    """e2e-serving and e2e-prefill run in one session on one commit: both wrote `e2e-...md`, so
    the second stage replaced the first one's tables."""
    e2e = _bench_module("e2e", monkeypatch)
    common = importlib.import_module("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "measured_matmul_tflops", lambda *a, **k: 100.0)

    class Model:
        def to(self, *args, **kwargs):
            return self

    monkeypatch.setattr(e2e, "_llama", lambda *a, **k: Model())

    def run(scale, model, tokens, parts, trace_count, peak, failures, checkpoint=None):
        checkpoint(f"| {'+'.join(parts)} row |")  # a row measured, as the parts report them
        return f"| {'+'.join(parts)} row |"

    monkeypatch.setattr(e2e, "run", run)
    assert e2e.run_gpu(2, [256], ["mixed", "trace"], 8, True) == 0  # the e2e-serving stage
    assert e2e.run_gpu(2, [256], ["prefill"], 8, True) == 0  # the e2e-prefill stage
    files = sorted(tmp_path.iterdir())
    assert len(files) == 2
    assert sorted("| mixed+trace row |" in f.read_text() for f in files) == [False, True]
    assert common.results_name("e2e", ["trace", "mixed"], e2e.PARTS) == common.results_name("e2e", ["mixed", "trace"], e2e.PARTS)
    assert common.results_name("e2e", list(e2e.PARTS), e2e.PARTS) == "e2e"


def test_attention_refuses_parts_that_name_no_table() -> None:
    """`--parts ,` named no table and ran: an empty table under the full run's file name."""
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "attention.py"), "--parts", ","],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--parts names no table" in run.stderr


def test_poison_next_output_fills_a_block_of_the_output_size_with_nan_and_frees_it(monkeypatch) -> None:
    import weakref

    import torch

    common = _bench_module("common", monkeypatch)
    made = []
    full = torch.full

    def spy(*args, **kwargs):
        made.append(full(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(torch, "full", spy)
    common.poison_next_output(torch.Size([3, 5]), torch.bfloat16, "cpu")
    (block,) = made
    assert block.shape == (3, 5) and block.dtype == torch.bfloat16 and block.isnan().all()
    alive = weakref.ref(made.pop())
    del block
    assert alive() is None  # freed: on a GPU the caching allocator hands this block to the method


def _stale_output_poisoned_by(monkeypatch, common, stale):
    """Stand in for the CUDA caching allocator on the CPU: the method under test returns `stale`
    (the previous method's freed output, right values) without writing it, and the poisoning
    helper fills that block with NaN, as taking and freeing it does on a GPU."""
    import torch

    calls = []

    def poison(shape, dtype, device):
        calls.append((tuple(shape), dtype))
        for t in stale:
            t.fill_(float("nan"))

    monkeypatch.setattr(common, "poison_next_output", poison, raising=False)
    return calls, torch


def test_gemm_check_fails_a_method_that_leaves_its_output_unwritten(monkeypatch) -> None:
    """A kernel that writes nothing passed the check when the allocator handed it the block of
    the previous method's output (the same size, from the same inputs)."""
    import torch

    gemm = _bench_module("gemm", monkeypatch)
    common = importlib.import_module("common")
    monkeypatch.setattr(common, "graph_median_ms", lambda fns, **k: 1.0)
    x, w = torch.randn(5, 8), torch.randn(6, 8)
    want = x.double() @ w.double().t()
    stale = [x @ w.t()]
    calls, _ = _stale_output_poisoned_by(monkeypatch, common, stale)
    failures: list[str] = []
    assert gemm.checked_tflops(lambda x, w: stale[0], [(x, w)], want, 2e9, failures, "lazy") is None
    assert calls == [((5, 6), torch.float32)] and "relative error nan" in failures[0]
    assert gemm.checked_tflops(lambda x, w: x @ w.t(), [(x, w)], want, 2e9, failures, "writes") == 2.0


def test_attention_check_fails_a_method_that_leaves_its_output_unwritten(monkeypatch, tmp_path) -> None:
    """bench/attention.py's GPU path on the CPU: the model-mask table's method returning the
    previous method's freed output (right values, unwritten) must fail its check."""
    import torch

    attention, common = _attention_on_cpu(monkeypatch, tmp_path)
    stale = []
    model_mask_methods = attention.model_mask_methods

    def with_a_lazy_method(s, *, device, dtype):
        methods, ranges, reference = model_mask_methods(40, device="cpu", dtype=torch.float32)
        stale.append(reference().clone())
        methods["tileflow, causal"] = lambda: stale[0]
        return methods, ranges, reference

    monkeypatch.setattr(attention, "model_mask_methods", with_a_lazy_method)
    calls, _ = _stale_output_poisoned_by(monkeypatch, common, stale)
    assert attention.run_gpu(True, True, ("mask",)) == 1
    assert len(calls) == 4  # one per method, before its check
    (path,) = tmp_path.iterdir()
    text = path.read_text()
    assert "FAILED: tileflow, causal on the 2048-token model mask: AssertionError: relative error nan" in text
    row = next(line for line in text.splitlines() if line.startswith("| 1x2048 |"))
    assert row.split("|")[3].strip() == "FAIL" and row.split("|")[2].strip() != "FAIL"


def test_attention_sweep_keeps_configurations_when_cut(monkeypatch, tmp_path) -> None:
    """`attention.py --sweep` wrote its table only at the end: a stage cut by its limit lost every
    configuration it had timed."""
    import torch

    attention = _bench_module("attention", monkeypatch)
    common = importlib.import_module("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(attention, "HQ", 4)
    monkeypatch.setattr(attention, "HKV", 2)
    monkeypatch.setattr(attention, "D", 16)

    class Killed(BaseException):
        pass

    timed = []

    def median_ms(fn, **kwargs):
        timed.append(fn)
        if len(timed) == 2:
            raise Killed  # the stage limit, while the second configuration is timed
        fn(0)
        return 1.0

    monkeypatch.setattr(common, "median_ms", median_ms)
    with pytest.raises(Killed):
        attention.run_sweep(True, [("mixed", [5, 1, 3], [20, 9, 40], [(4, 16, 4, 2, 1), (8, 32, 4, 3, 2)])],
                            device="cpu", dtype=torch.float32)
    (path,) = tmp_path.iterdir()
    text = path.read_text()
    assert "partial" in text and "block_q=4 block_kv=16" in text and "block_q=8" not in text


def test_gemm_variant_columns_on_a_subset_of_m_and_summary_at_every_checkpoint(monkeypatch, tmp_path) -> None:
    """bench/gemm.py's GPU path on the CPU (timing stubbed): the stream-K and TMA columns are
    timed at `--variant-m` rows only ("-" elsewhere), and a stage cut mid-table leaves the
    summary (geomeans over rows where both sides were measured) beside its rows."""
    gemm = _bench_module("gemm", monkeypatch)
    common = importlib.import_module("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "measured_matmul_tflops", lambda *a, **k: 10.0)
    monkeypatch.setattr(gemm, "SHAPES", [(48, 40), (32, 40)])
    monkeypatch.setattr(gemm, "M_VALUES", [1, 8, 64, 100])

    class Killed(BaseException):
        pass

    speeds = {"tileflow": 2.0, "cuBLAS": 1.0, "Inductor-dynamic": 1.0, "Inductor-max-autotune": 1.0,
              "tileflow stream-K": 4.0, "tileflow TMA": 0.5}
    called = []

    def checked_tflops(fn, inputs, want, flops, failures, what):
        name, where = what.split(" at ")
        m = int(where.rsplit("M=", 1)[1])
        if "N=32" in where:
            raise Killed  # the stage limit, in the second shape
        called.append((name, m))
        if name == "cuBLAS" and m == 64:
            failures.append(f"{what}: a failed check")
            return None
        return speeds[name]

    monkeypatch.setattr(gemm, "checked_tflops", checked_tflops)
    with pytest.raises(Killed):
        gemm.run_gpu(False, True, device="cpu")  # the default --variant-m: 1, 64, 512, 4096
    assert sorted(m for name, m in called if name == "tileflow stream-K") == [1, 64]
    assert sorted(m for name, m in called if name == "tileflow") == [1, 8, 64, 100]
    (path,) = tmp_path.iterdir()
    text = path.read_text()
    assert "partial" in text
    row8 = next(line for line in text.splitlines() if line.startswith("| 48x40 | 8 |")).split("|")[1:-1]
    assert [c.strip() for c in row8[-2:]] == ["-", "-"] and row8[6].strip() == "-"
    # tileflow / cuBLAS over M = 1, 8, 100 (cuBLAS failed at 64); stream-K / cuBLAS at M = 1 only.
    assert "geomean tileflow / cuBLAS: **2.00x** (3 rows)" in text
    assert "geomean tileflow stream-K / cuBLAS: **4.00x** (1 rows" in text
    assert "geomean tileflow TMA / cuBLAS: **0.50x** (1 rows" in text
    assert "FAILED: cuBLAS at N=48 K=40 M=64" in text


def test_measure_tiles_measures_the_down_projection_first(monkeypatch, tmp_path) -> None:
    """The tiles stage's cut loses its last shape: that must not be the down projection
    (N=4096, K=14336), whose split-K plans matter most."""
    gemm = _bench_module("gemm", monkeypatch)
    import tileflow.tiles

    class Killed(BaseException):
        pass

    shapes = []

    def candidate_configs(n, k, *args, **kwargs):
        shapes.append((n, k))
        raise Killed

    monkeypatch.setattr(tileflow.tiles, "candidate_configs", candidate_configs)
    with pytest.raises(Killed):
        gemm.measure_tiles(str(tmp_path / "tiles.json"), device_type="cpu", time_ms=lambda fn: 1.0)
    assert shapes == [(4096, 14336)]
    assert sorted(gemm.TILE_SHAPES) == sorted(gemm.SHAPES)


def _dry_run_session(tmp_path, *stages: str, pip_fails: bool = False, env: dict | None = None):
    """gpu_session.sh in a copy of the tree with a fake python that logs each call's arguments
    and PYTHONPATH (and fails `-m pip` when asked): returns (exit status, output, calls, the
    run's folder: tree/ is the working tree, out/ the session's $OUT)."""
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(dir=tmp_path))
    tree = tmp_path / "tree"
    (tree / "bench" / "results").mkdir(parents=True)
    (tree / "tileflow").mkdir()
    shutil.copy(BENCH / "gpu_session.sh", tree / "bench")
    shutil.copy(ROOT / "pyproject.toml", tree)
    calls = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text("#!/bin/bash\nargs=\"$*\"\n"  # one line per call: a `-c` program's newlines as spaces
                    f"printf '%s\\t%s\\n' \"${{args//$'\\n'/ }}\" \"${{PYTHONPATH:-}}\" >> {calls}\n"
                    + ("case \"$*\" in *'-m pip'*) exit 1;; esac\n" if pip_fails else "")
                    + "exit 0\n")
    fake.chmod(0o755)
    proc = subprocess.run(["bash", "bench/gpu_session.sh", *stages], cwd=tree, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": str(fake), "TMPDIR": str(tmp_path),
                               **(env or {})})
    lines = calls.read_text().splitlines() if calls.exists() else []
    return proc.returncode, proc.stdout + proc.stderr, [line.split("\t") for line in lines], tmp_path


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils")
def test_gpu_session_per_test_timeout_is_below_the_stage_limit(tmp_path) -> None:
    """tests-gpu ran pytest with --timeout=150 under a 150 s stage: the stage was killed first,
    so a hung test left no stack dump and no name."""
    rc, out, calls, _ = _dry_run_session(tmp_path, "tests-gpu:150")
    (pytest_args,) = [args for args, _ in calls if "pytest" in args]
    timeout = int(pytest_args.split("--timeout=", 1)[1].split()[0])
    assert timeout <= 150 - 30, pytest_args


def test_gpu_session_logs_its_command_and_refuses_a_stage_without_a_limit(tmp_path) -> None:
    """`gemm` without `:seconds` ran `timeout gemm ...` (exit 125: silently skipped); env.log did
    not say which command and narrowing produced the tables."""
    rc, out, calls, _ = _dry_run_session(tmp_path, "attention:60", "gemm")
    assert rc == 2 and "stage 'gemm' needs a time limit" in out and calls == []
    rc, out, calls, _ = _dry_run_session(tmp_path, "atention:60")
    assert rc == 2 and "unknown stage 'atention'" in out and calls == []
    rc, out, calls, run = _dry_run_session(tmp_path, "sampling:5", env={"ATTENTION_PARTS": "mask,softcap",
                                                                         "BENCH_COMMIT": "abc123"})
    log = (run / "out" / "env.log").read_text()
    assert "command: bench/gpu_session.sh sampling:5" in log
    assert "ATTENTION_PARTS=mask,softcap" in log
    assert "BENCH_COMMIT=abc123" in log and "E2E_TRACE_REQUESTS unset" in log
    rc, out, calls, run = _dry_run_session(tmp_path, "gemm:5", env={"GEMM_VARIANT_M": "512,4096"})
    assert any(args.startswith("bench/gemm.py --variant-m 512,4096") for args, _ in calls)
    assert "GEMM_VARIANT_M=512,4096" in (run / "out" / "env.log").read_text()


def test_gpu_session_fallback_install_registers_the_dynamo_backend(tmp_path) -> None:
    """Where `pip install -e .` fails, the session runs tileflow from the working tree; without
    the install's entry point, backend="tileflow" (e2e.py, tests/test_gpu.py) raised
    InvalidBackend. The fallback's path must resolve it, and to tileflow's backend."""
    rc, out, calls, run = _dry_run_session(tmp_path, pip_fails=True)
    assert rc == 0, out
    path = calls[-1][1]  # what the session's Python runs with after the fallback
    assert str(run / "tree") in path.split(":")
    # Dynamo finds backend names with importlib.metadata.entry_points over sys.path (torch's own
    # tests mock that function too). This machine has tileflow installed: let the lookup see the
    # session's path only.
    check = (
        "import importlib.metadata, sys, tileflow.backend, torch._dynamo\n"
        "entry_points = importlib.metadata.entry_points\n"
        "entry_points(group='torch_dynamo_backends')  # imports what reading metadata needs\n"
        "def on_session_path(**params):\n"
        "    saved, sys.path[:] = sys.path[:], sys.argv[1].split(':')\n"
        "    try:\n"
        "        return entry_points(**params)\n"
        "    finally:\n"
        "        sys.path[:] = saved\n"
        "importlib.metadata.entry_points = on_session_path\n"
        "assert torch._dynamo.lookup_backend('tileflow') is tileflow.backend.tileflow_backend\n"
        "print('found')\n"
    )
    proc = subprocess.run([sys.executable, "-c", check, path], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "found" in proc.stdout, proc.stderr[-2000:]


def test_packed_documents_methods_agree_on_the_cpu(monkeypatch, tmp_path) -> None:
    """The packed-documents table: each method (FlexAttention aside, GPU only) equals float32
    attention of each document alone, and the GPU path writes its table (device pieces stubbed)."""
    import random

    import torch

    attention, _ = _attention_on_cpu(monkeypatch, tmp_path)
    lengths = attention.packed_document_lengths(random.Random(1), 40, 3, 12)
    assert sum(lengths) == 40 and all(1 <= n <= 12 for n in lengths) and len(lengths) > 2
    methods, reference = attention.packed_methods(lengths, device="cpu", dtype=torch.float32, flex=False)
    want = reference()
    assert methods.pop("tileflow, causal only") is None  # the plain causal kernel: one document only
    for name, fn in methods.items():
        torch.testing.assert_close(fn().float(), want, rtol=1e-4, atol=1e-4, msg=name)
    whole, one_document = attention.packed_methods([40], device="cpu", dtype=torch.float32, flex=False)
    assert (one_document() - want).abs().max() > 0.1  # same inputs (seeded): the documents matter
    for name, fn in whole.items():
        torch.testing.assert_close(fn().float(), one_document(), rtol=1e-4, atol=1e-4, msg=name)

    packed_methods = attention.packed_methods
    monkeypatch.setattr(attention, "packed_methods", lambda doc_lens, *, device, dtype: packed_methods(
        attention.packed_document_lengths(random.Random(2), 48, 4, 16), device="cpu", dtype=torch.float32, flex=False))
    assert attention.run_gpu(True, True, ("packed",)) == 0
    (path,) = tmp_path.iterdir()
    text = path.read_text()
    assert "## Documents packed in one row" in text and "| 2048 tokens, " in text and "FAIL" not in text
