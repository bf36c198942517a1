"""The benchmarks' CPU paths run (so they do not rot between GPU sessions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _dynamo_limits_restored():
    """The benchmarks run in-process here raise Dynamo's recompile limit and make reaching it an
    error (`common.allow_recompiles`): the later test files of this worker keep the defaults."""
    import torch._dynamo.config as dynamo_config

    names = [n for n in ("recompile_limit", "cache_size_limit", "fail_on_recompile_limit_hit") if hasattr(dynamo_config, n)]
    saved = {n: getattr(dynamo_config, n) for n in names}
    yield
    for name, value in saved.items():
        setattr(dynamo_config, name, value)


class _Ran:
    """What a benchmark run as `python bench/<script> <args>` would leave: exit status and output."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _run_bench(monkeypatch, capsys, script: str, *args: str) -> _Ran:
    """Run bench/`script` as its `__main__` in this process (a fresh interpreter's torch import
    costs seconds a run; none of these checks is about a fresh process). The globals the scripts
    replace (e2e.py's simulated streams, host_step.py's stubbed Triton launches) and sys.path and
    argv are put back afterwards, for the tests after them."""
    import runpy

    from triton.runtime import interpreter

    from tileflow.runtime.nanobatch import NanoBatchRunner

    monkeypatch.setattr(NanoBatchRunner, "_executor_for", NanoBatchRunner._executor_for)
    monkeypatch.setattr(interpreter.InterpretedFunction, "run", interpreter.InterpretedFunction.run)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(sys, "path", [str(ROOT / "bench"), *sys.path])
    monkeypatch.setattr(sys, "argv", [str(ROOT / "bench" / script), *args])
    capsys.readouterr()
    try:
        runpy.run_path(str(ROOT / "bench" / script), run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    out = capsys.readouterr()
    return _Ran(code, out.out, out.err)


# The three benchmarks of the issues' acceptance and the MoE experts' (7-9 s) in the default run;
# the profiling and sampling ones (and compile_time.py below) in the extended run, which goes
# before every GPU session.
@pytest.mark.parametrize("script", ["gemm.py", "attention.py", "e2e.py", "moe.py",
                                    *(pytest.param(script, marks=pytest.mark.extended)
                                      for script in ("profile_step.py", "sampling.py"))])
def test_benchmark_smoke_check_passes_on_cpu(script: str, monkeypatch, capsys) -> None:
    proc = _run_bench(monkeypatch, capsys, script)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "needs a GPU" in proc.stdout or "no CUDA GPU" in proc.stdout
    assert "smoke check passed" in proc.stdout


def test_host_planning_benchmark_runs(monkeypatch, capsys) -> None:
    """bench/host.py (host-side planning time, measured on any machine) prints a positive time for
    each call, and its long-context batch is balanced by the split."""
    proc = _run_bench(monkeypatch, capsys, "host.py", "--repeats", "1", "--decode-layers", "2", "--no-write")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines()
            if line.startswith(("| build", "| search", "| NanoBatchPlan", "| AutoSplit"))]
    assert [r[0].strip() for r in rows] == (["build_task_table"] * 3 + ["build_tile_plan"] * 3 + ["search_split"] * 2
                                           + ['NanoBatchPlan.sizes ("auto")'] * 2
                                           + ['AutoSplit.split (serving "auto")'] * 3)
    assert [r[1].strip().split(",")[:2] for r in rows[-6:-3]] == [
        ["2 Llama-like decode layers", f" {n} sequences"] for n in (256, 256, 200)]
    assert [r[1].strip().rsplit(": ", 1)[1] for r in rows[-3:]] == [
        "a new shape", "a kept shape, caches a token longer", "a new shape, its bucket searched before"]
    assert all(float(r[2]) > 0 for r in rows)
    assert float(rows[2][1].rsplit("max/avg", 1)[1]) <= 1.5


def test_host_step_benchmark_counts_one_launch_per_kernel(monkeypatch, capsys) -> None:
    """bench/host_step.py (a compiled step's host time with the launches stubbed, on any
    machine) prints a row per token count: positive times and exactly the step's launches, one
    per fused q/k/v, o, fused gate/up and down projection and attention in each layer plus the
    LM head (5 x 2 + 1), at every count."""
    proc = _run_bench(monkeypatch, capsys, "host_step.py", "--tokens", "9,40", "--layers", "2", "--hidden", "128",
                      "--repeats", "1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| tokens")]
    assert [r[0] for r in rows] == ["9", "40"]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 and r[3] == "11" for r in rows), rows


def test_host_calls_benchmark_counts_each_calls_launches(monkeypatch, capsys) -> None:
    """bench/host_calls.py (one op call's host time with the launches stubbed, on any machine)
    prints a row per call with a positive time and its exact launches: one kernel for a GEMM (Q,
    K and V's too, three for their three calls) and each attention call (no split-KV merge at
    these sizes), none for the mask's ranges."""
    proc = _run_bench(monkeypatch, capsys, "host_calls.py", "--repeats", "1", "--calls", "3")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| call")]
    assert len(rows) == 11 and all(float(r[1]) > 0 for r in rows), rows
    # Q, K and V: one launch over the three weights, or three calls of one.
    assert [r[2] for r in rows] == ["0" if r[0].startswith("attention_mask_ranges") else "3" if "three calls" in r[0]
                                    else "1" for r in rows]


@pytest.mark.parametrize("model", ["llama", *(pytest.param(m, marks=pytest.mark.extended) for m in ("bloom", "falcon"))])
def test_mask_memory_benchmark_runs(model: str, monkeypatch, capsys) -> None:
    """bench/mask_memory.py (a compiled forward's peak memory, on a Linux machine) runs and says
    the left-padded batch's mask became the kernel's rule and a key mask (memory and times are
    printed, never asserted); BLOOM's and Falcon's attention with their ALiBi biases beside them."""
    attention = ["--attention", "sdpa"] if model == "llama" else []
    proc = _run_bench(monkeypatch, capsys, "mask_memory.py", "--tokens", "96", "--model", model, *attention, "--left-padded")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    what = {"llama": "sdpa", "bloom": "own attention", "falcon": "sdpa with ALiBi"}[model]
    assert f"{model}, tokens 96, {what}, use_cache=False, left-padded batch of 2: peak" in proc.stdout, proc.stdout
    assert "mask_as_rule 2, key_mask 2," in proc.stdout, proc.stdout
    if model != "llama":
        assert f"meta_attention 2, product_bias {2 * (model == 'bloom')}, key_bias {2 * (model == 'falcon')}" in proc.stdout, \
            proc.stdout


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


def _session_tree(tmp_path, cases: str) -> tuple:
    """A tree holding bench/gpu_session.sh and an empty bench/results, a stand-in `python` that
    runs the bash `case` arms `cases` on its arguments (anything else exits 0), and $OUT's path."""
    tree = tmp_path / "tree"
    (tree / "bench" / "results").mkdir(parents=True)
    shutil.copy(BENCH / "gpu_session.sh", tree / "bench")
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/bash\ncase \"$*\" in\n{cases}  *) exit 0;;\nesac\n")
    fake.chmod(0o755)
    return tree, fake, tmp_path / "out"


@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("tar") is None, reason="needs coreutils and tar")
def test_gpu_session_packs_results_after_each_stage(tmp_path) -> None:
    """A stage cut by its limit (or a call stopped before the end) must not lose the tables the
    finished rows wrote: results.tar.gz is refreshed after every stage."""
    tree, fake, out = _session_tree(tmp_path, "  *gemm.py*) echo row > bench/results/gemm-partial.md; sleep 30;;\n"
                                              "  *sampling.py*) sleep 60;;\n")
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
    # A run narrowed to some token counts (E2E_TOKENS, moe.py --tokens) is named for them: it
    # replaced the full run's table of the same day and commit.
    assert all("-tokens-256-" in f.name for f in files)
    assert common.sized_name("moe", [1, 9], [1, 9]) == "moe"
    assert common.sized_name("moe", [1, 9], [1, 9, 64]) == "moe-tokens-1-9"


def test_attention_refuses_parts_that_name_no_table(monkeypatch, capsys) -> None:
    """`--parts ,` named no table and ran: an empty table under the full run's file name."""
    run = _run_bench(monkeypatch, capsys, "attention.py", "--parts", ",")
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
    assert len(calls) == 5  # one per method, before its check
    (path,) = tmp_path.iterdir()
    text = path.read_text()
    assert "FAILED: tileflow, causal on the 2048-token model mask: AssertionError: relative error nan" in text
    row = next(line for line in text.splitlines() if line.startswith("| 1x2048 |"))
    assert row.split("|")[4].strip() == "FAIL" and row.split("|")[2].strip() != "FAIL"


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
    # The % column reads against the device table's datasheet peak (the CPU's: 0.1 TFLOP/s), not
    # the measured ceiling (10), which short replays can beat.
    assert "tileflow % of datasheet peak" in text and row8[-4].strip() == "2000%", row8


def test_gemm_measured_peak_is_the_best_matmul_the_run_saw(monkeypatch, tmp_path) -> None:
    """An 8192^3 ceiling probe can run slower than the rows' short replays (a run read 100-107%
    of it): the measured peak at M >= 2048 is the best of the probe and the run's cuBLAS rows,
    and the datasheet's fraction stands beside it."""
    gemm = _bench_module("gemm", monkeypatch)
    common = importlib.import_module("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "measured_matmul_tflops", lambda *a, **k: 10.0)
    monkeypatch.setattr(gemm, "SHAPES", [(48, 40)])
    monkeypatch.setattr(gemm, "M_VALUES", [1, 2048])
    for table in ("run_swiglu", "run_qkv"):
        monkeypatch.setattr(gemm, table, lambda *a, **k: "")
    speeds = {"tileflow": 30.0, "cuBLAS": 40.0}
    monkeypatch.setattr(gemm, "checked_tflops", lambda fn, inputs, want, flops, failures, what:
                        speeds.get(what.split(" at ")[0], 1.0))
    assert gemm.run_gpu(False, True, variant_m=(), device="cpu") == 0
    (path,) = tmp_path.iterdir()
    # cuBLAS's 40 beat the probe's 10; the CPU's datasheet bf16 peak is 0.1 TFLOP/s.
    assert ("tileflow at M >= 2048 (geomean): 75% of the measured bf16 peak (40 TFLOP/s: the best of the 8192^3 "
            "matmul and this run's cuBLAS rows) and 30000% of the 0 TFLOP/s datasheet peak") in path.read_text()


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


def test_gpu_session_profile_base_runs_the_other_commits_tileflow(tmp_path) -> None:
    """profile-base profiles the steps with the tree PROFILE_BASE names first on the path (its
    backends and passes linked into its package, as an install maps them), and is refused
    before anything runs without such a tree."""
    rc, out, calls, _ = _dry_run_session(tmp_path, "sampling:5", "profile-base:5")
    assert rc == 2 and "profile-base needs PROFILE_BASE" in out and calls == []
    base = tmp_path / "base"
    for folder in ("tileflow", "backends", "passes"):
        (base / folder).mkdir(parents=True)
    rc, out, calls, _ = _dry_run_session(tmp_path, "profile-base:5", env={"PROFILE_BASE": str(base)})
    (profile,) = [(args, path) for args, path in calls if args.startswith("bench/profile_step.py")]
    assert profile[0] == "bench/profile_step.py --layers 2 --tokens 256 --steps-only --no-write"
    assert profile[1].split(":")[0] == str(base)
    assert (base / "tileflow" / "backends").resolve() == (base / "backends").resolve()
    assert (base / "tileflow" / "passes").resolve() == (base / "passes").resolve()


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


# ---------------------------------------------------------------------------------------------
# The published numbers' arithmetic, against hand-computed values (a mutation audit found these
# formulas unchecked: a dropped factor of 2 or a swapped ratio passed every test above).


def test_attention_flops_of_tiny_batches_by_hand(monkeypatch) -> None:
    """attention_flops on batches small enough to list every (query, key) pair the mask lets
    through: 4 FLOPs (two matmuls of 2) per pair, head and dim."""
    attention = _bench_module("attention", monkeypatch)
    # A 3-token prompt sees 1 + 2 + 3 keys; 2 heads of dim 4.
    assert attention.attention_flops([3], [3], 2, 4) == 4 * 6 * 2 * 4
    # A verify group of 2 over 5 keys (positions 3, 4) sees 4 + 5; a decode over 7 keys sees 7.
    assert attention.attention_flops([2, 1], [5, 7], 1, 1) == 4 * (4 + 5 + 7)
    # An empty sequence (no query this step) adds nothing.
    assert attention.attention_flops([0, 3], [9, 3], 1, 1) == 4 * 6


def test_geomean_is_geometric_and_skips_unmeasured_values(monkeypatch) -> None:
    """geomean (the published per-baseline ratios) is the geometric mean, not the arithmetic
    one, over positive finite values only."""
    import math

    common = _bench_module("common", monkeypatch)
    assert common.geomean([1.0, 4.0, 2.0, 8.0]) == pytest.approx(64 ** 0.25)
    assert common.geomean([2.0, 0.0, -1.0, float("nan"), float("inf"), 8.0]) == pytest.approx(4.0)
    assert math.isnan(common.geomean([])) and math.isnan(common.geomean([0.0]))


def test_measured_ceilings_count_two_flops_per_mac_and_copy_bytes_both_ways(monkeypatch) -> None:
    """The ceilings every table is reported against: a size^3 matmul is 2 size^3 FLOPs, and a
    copy of B bytes moves 2 B (read plus write)."""
    import torch

    common = _bench_module("common", monkeypatch)
    randn, empty = torch.randn, torch.empty
    monkeypatch.setattr(torch, "randn", lambda *a, device=None, **k: randn(*a, **k))  # "cuda" -> the CPU
    monkeypatch.setattr(torch, "empty", lambda *a, device=None, **k: empty(*a, **k))
    monkeypatch.setattr(common, "median_ms", lambda fn, **k: (fn(0), 2.0)[1])
    assert common.measured_matmul_tflops(torch.float32, size=64) == pytest.approx(2 * 64**3 / 2.0 / 1e9)
    assert common.measured_copy_gbs(2000) == pytest.approx(2 * 1000 / 2.0 / 1e6)


def test_gemm_table_flops_peak_share_ratio_cells_and_geomeans(monkeypatch, tmp_path) -> None:
    """bench/gemm.py's GPU path on the CPU (checks and timings stubbed): the FLOPs each cell is
    divided by (2 M N K; 2 M 2N K for the fused SwiGLU's two GEMMs), % of peak, the tileflow /
    cuBLAS cell, the geometric-mean ratio and the M >= 2048 share, against hand-computed values;
    the kernel count leaves out the variant columns' kernels."""
    gemm = _bench_module("gemm", monkeypatch)
    common = importlib.import_module("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "measured_matmul_tflops", lambda *a, **k: 10.0)
    monkeypatch.setattr(gemm, "SHAPES", [(56, 40)])  # a shape no other test compiles: counted kernels
    monkeypatch.setattr(gemm, "M_VALUES", [1, 33, 2048])
    monkeypatch.setattr(gemm, "swiglu_reference", lambda x, gate, up: None)  # float64 at 14336 x 4096: too slow here
    monkeypatch.setattr(gemm, "qkv_reference", lambda x, *weights: None)
    ours = {1: 1.0, 33: 4.0, 2048: 8.0, 16: 2.0}  # tileflow TFLOP/s per M; every other method 1.0
    flops_of: dict[str, float] = {}

    def checked_tflops(fn, inputs, want, flops, failures, what):
        flops_of[what] = flops
        name, m = what.split(" at ")[0], int(what.rsplit("M=", 1)[1])
        if m == 1 and name.startswith("tileflow"):
            fn(*inputs[0])  # builds the plan's kernel for M = 1 and each variant's
        return ours.get(m, 1.0) if name in ("tileflow", "SwiGLU tileflow", "QKV tileflow") else 1.0

    monkeypatch.setattr(gemm, "checked_tflops", checked_tflops)
    assert gemm.run_gpu(False, True, device="cpu") == 0
    assert flops_of["tileflow at N=56 K=40 M=33"] == 2 * 33 * 56 * 40
    assert flops_of["cuBLAS at N=56 K=40 M=2048"] == 2 * 2048 * 56 * 40
    assert flops_of["SwiGLU tileflow at M=16"] == 2 * 16 * 2 * 14336 * 4096
    assert flops_of["QKV cuBLAS, stacked weight at M=16"] == 2 * 16 * (4096 + 1024 + 1024) * 4096
    (path,) = tmp_path.iterdir()
    text = path.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| N x K |")).split("|")[1:-1]
    row33 = next(line for line in text.splitlines() if line.startswith("| 56x40 | 33 |")).split("|")[1:-1]
    cell = dict(zip((h.strip() for h in header), (c.strip() for c in row33)))
    assert cell["tileflow TFLOP/s"] == "4.0" and cell["cuBLAS TFLOP/s"] == "1.0"
    assert cell["tileflow % of datasheet peak"] == "4000%"  # 4 of the CPU's 0.1 TFLOP/s datasheet bf16 peak
    assert cell["tileflow / cuBLAS"] == "4.00"
    # tileflow / cuBLAS over M = 1, 33, 2048: (1 * 4 * 8)^(1/3) = 3.17, not the mean 4.33.
    assert "geomean tileflow / cuBLAS: **3.17x** (3 rows)" in text
    assert "tileflow at M >= 2048 (geomean): 80% of the measured bf16 peak (10 TFLOP/s" in text  # M = 2048 counts
    assert "| 16 | 2.0 | 1.0 | 2000% |" in text  # the SwiGLU table: 2 of the 0.1 TFLOP/s datasheet peak
    qkv = text.split("## Q, K and V projections", 1)[1]
    assert "| 16 | 2.0 | 1.0 | 1.0 | 1.0 | 2000% |" in qkv and "geomean tileflow / cuBLAS, stacked weight" in qkv
    # Not the stream-K and TMA kernels (other tests' shapes may be in the dict: the registry is per process).
    kernels = text.split("tileflow kernels compiled per (N, K): ", 1)[1].split(" (each serves", 1)[0]
    assert "'56x40': 1," in kernels.replace("}", ",")


@pytest.mark.parametrize("fixup", [1e-3, 6e-3])
def test_measure_tiles_per_tile_seconds_by_hand(monkeypatch, tmp_path, fixup: float) -> None:
    """`gemm.py --measure-tiles` arithmetic on one tile (16 x 32 x 32), N = 80, K = 128, on 4
    cores, every kernel timed at 8 ms: N tiles = 3, M = 16 * ceil(16 / 3) = 96, waves =
    ceil(6 * 3 / 4) = 5; stream-K: 18 tiles x 4 K steps over 4 cores = 18 units on the busiest,
    the fixup (stubbed) taken out but never more than half; split 4: M = 16 * ceil(16 / 12) = 32,
    waves = ceil(2 * 3 * 4 / 4) = 6, the reduce (stubbed, for M = 32) taken out. The one-wave
    times (one program per CPU core): plain and TMA at M = 16 * max(1, 4 // 3) = 16, 8 ms; the
    split at M = 16 (one BLOCK_M; 12 programs), less its reduce for M = 16; none for the
    persistent kernel (one program per core at any M)."""
    import dataclasses

    import tileflow.devices
    import tileflow.tiles
    from tileflow.tiles import TileConfig

    gemm = _bench_module("gemm", monkeypatch)
    device = dataclasses.replace(tileflow.devices.detect_device("cpu"), cores=4)
    tile = TileConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2, group_m=8)
    calls = []
    monkeypatch.setattr(tileflow.devices, "detect_device", lambda kind: device)
    monkeypatch.setattr(tileflow.tiles, "candidate_configs", lambda *a, **k: [tile])
    monkeypatch.setattr(tileflow.tiles, "split_k_factors", lambda *a, **k: (1, 4))
    monkeypatch.setattr(tileflow.tiles, "stream_k_fixup_seconds",
                        lambda *a, **k: (calls.append(("fixup", a)), fixup)[1])
    monkeypatch.setattr(tileflow.tiles, "split_reduce_seconds",
                        lambda *a, **k: (calls.append(("reduce", a[:3])), 1e-3)[1])
    path = tmp_path / "tiles.json"
    assert gemm.measure_tiles(str(path), shapes=[(80, 128)], device_type="cpu", time_ms=lambda fn: 8.0) == 0
    entries = json.loads(path.read_text())
    by_kind = {next((key for key in ("persistent", "tma", "stream_k", "split_k") if key in e), "plain"): e for e in entries}
    assert len(entries) == len(by_kind) == 5
    for kind in ("plain", "persistent", "tma"):
        assert by_kind[kind]["m"] == 96 and by_kind[kind]["tile_seconds"] == pytest.approx(8e-3 / 5)
    assert by_kind["stream_k"]["m"] == 96
    assert by_kind["stream_k"]["tile_seconds"] == pytest.approx(max(8e-3 - fixup, 4e-3) / 18)
    assert by_kind["split_k"]["split_k"] == 4 and by_kind["split_k"]["m"] == 32
    assert by_kind["split_k"]["tile_seconds"] == pytest.approx((8e-3 - 1e-3) / 6)
    assert [c for c in calls if c[0] == "fixup"] == [("fixup", (18, 16, 32, 4, device))]
    assert [c for c in calls if c[0] == "reduce"] == [("reduce", (32, 80, 4)), ("reduce", (16, 80, 4))]
    for kind in ("plain", "tma"):
        assert (by_kind[kind]["one_wave_m"], by_kind[kind]["one_wave_seconds"]) == (16, pytest.approx(8e-3))
    assert (by_kind["split_k"]["one_wave_m"], by_kind["split_k"]["one_wave_seconds"]) == (16, pytest.approx(7e-3))
    assert "one_wave_m" not in by_kind["persistent"] and "one_wave_m" not in by_kind["stream_k"]


def test_attention_rows_count_kv_bytes_visible_flops_and_ratios(monkeypatch, tmp_path) -> None:
    """bench/attention.py's main table on the CPU (device pieces stubbed; HQ 4, HKV 2, D 16): a
    mixed batch of q lengths 5, 1, 3 over 20, 9, 40 keys reads 69 x 2 x 16 x 2 (K and V) x 2
    (bf16) = 8832 KV bytes plus q read and output written, 2 x 9 x 4 x 16 x 2 = 2304; its visible
    pairs are 5 x 15 + 15, 8 + 1, 3 x 37 + 6 = 216, so 4 x 216 x 4 x 16 = 55296 FLOPs; the ratio
    columns are each method's time over tileflow's."""
    import itertools

    import torch

    attention, common = _attention_on_cpu(monkeypatch, tmp_path)
    # Per method, in the table's order: tileflow, checked op, graphed, SDPA per sequence, FlexAttention.
    times = itertools.cycle([1e-6, 2e-6, 0.5e-6, 4e-6, 8e-6])
    monkeypatch.setattr(common, "median_ms", lambda fn, **k: (fn(0), next(times))[1])
    paged_batch = attention.paged_batch
    monkeypatch.setattr(attention, "paged_batch", lambda q, kv, *, device, dtype, **k: paged_batch(
        q, kv, device="cpu", dtype=torch.float32, **k))
    monkeypatch.setattr(attention, "make_flex", lambda batch, score_mod=None: attention.sdpa_per_sequence)
    monkeypatch.setattr(attention, "mixed_lengths", lambda rng: ([5, 1, 3], [20, 9, 40]))

    class Graph:
        def __init__(self, fn, out):
            self.fn, self.out = fn, out

        def replay(self):
            self.out.copy_(self.fn())

    def capture_graph(fn):
        out = fn()
        return Graph(fn, out), out

    monkeypatch.setattr(common, "capture_graph", capture_graph)
    assert attention.run_gpu(True, True, ("mixed",)) == 0
    (path,) = tmp_path.iterdir()
    lines = path.read_text().splitlines()
    header = [c.strip() for c in next(line for line in lines if line.startswith("| batch |")).split("|")[1:-1]]
    row = [c.strip() for c in next(line for line in lines if line.startswith("| mixed #0")).split("|")[1:-1]]
    cell = dict(zip(header, row))
    assert cell["seqs"] == "3" and cell["q tokens"] == "9"
    # 11136 bytes in 1e-6 ms = 11136 GB/s, 1114% of the stubbed 1000 GB/s copy; graphed: half the time.
    assert cell["tileflow GB/s (% copy)"] == "11136 (1114%)"
    assert cell["tileflow graphed GB/s (% copy)"] == "22272 (2227%)"
    assert cell["tileflow TFLOP/s (visible scores)"] == "55.3"
    assert [cell[f"{n} / tileflow"] for n in ("tileflow checked op", "tileflow graphed", "SDPA per sequence",
                                               "FlexAttention")] == ["2.00x", "0.50x", "4.00x", "8.00x"]


def test_attention_sweep_counts_visible_flops_and_kv_bytes(monkeypatch, tmp_path) -> None:
    """`attention.py --sweep` columns on the CPU (HQ 4, HKV 2, D 16, each configuration timed at
    1e-6 ms): the batch above has 55296 FLOPs (55 TFLOP/s) and reads 8832 KV bytes (8832 GB/s)."""
    import torch

    attention, common = _attention_on_cpu(monkeypatch, tmp_path)
    monkeypatch.setattr(common, "median_ms", lambda fn, **k: (fn(0), 1e-6)[1])
    assert attention.run_sweep(True, [("mixed", [5, 1, 3], [20, 9, 40], [(4, 16, 4, 2, 1)])],
                               device="cpu", dtype=torch.float32) == 0
    (path,) = tmp_path.iterdir()
    row = next(line for line in path.read_text().splitlines() if line.startswith("| mixed |")).split("|")[1:-1]
    assert [c.strip() for c in row[3:5]] == ["55", "8832"]


def test_mixed_lengths_shape_of_a_serving_step(monkeypatch) -> None:
    """The mixed batches: 2 prompt chunks of 512 over 1024-4096 cached tokens, 32 verify groups
    of 4-8, then single-token decodes, at most 400 of them and within the budget (the table's
    "q tokens" column reports the actual count: the 400-decode cap ends the batch near 1.6k
    tokens, before the 4096-token budget)."""
    import random

    attention = _bench_module("attention", monkeypatch)
    q_lens, kv_lens = attention.mixed_lengths(random.Random(0))
    assert q_lens[:2] == [512, 512] and all(kv - 512 in (1024, 2048, 4096) for kv in kv_lens[:2])
    assert all(4 <= n <= 8 and 1024 + n <= kv <= 8192 + n for n, kv in zip(q_lens[2:34], kv_lens[2:34]))
    assert set(q_lens[34:]) == {1} and len(q_lens) == 2 + 32 + 400 and sum(q_lens) <= 4096
    assert all(512 <= kv <= 8192 for kv in kv_lens[34:])
    # With a small budget the decodes stop at it.
    q_lens, _ = attention.mixed_lengths(random.Random(0), budget=1300)
    assert sum(q_lens) == max(1300, sum(q_lens[:34]))


def _tiny_llama():
    """The e2e smoke check's model: 1 layer, hidden 64, 4/2 heads of 16, FFN 128, vocabulary 256."""
    import torch

    e2e = importlib.import_module("e2e")
    torch.manual_seed(0)
    return e2e._llama(1, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=e2e.SMOKE.vocab)


def test_e2e_model_is_built_on_the_device_it_is_asked_for(monkeypatch) -> None:
    """The benchmark model is initialized where it will run (on a GPU session, the GPU: a CPU
    initialization of the 8B-shaped model costs tens of seconds of device time): every parameter
    and buffer of one built for `meta` is there, and the model is in eval mode."""
    e2e = _bench_module("e2e", monkeypatch)
    model = e2e._llama(1, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=e2e.SMOKE.vocab, device="meta")
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    assert not model.training


def test_e2e_bound_is_peak_over_two_flops_per_matmul_parameter(monkeypatch) -> None:
    """NanoFlow's optimal-throughput bound = peak / (2 x matmul parameters): for the tiny Llama,
    q 64x64, k and v 32x64, o 64x64, gate, up and down 128x64 each, lm_head 256x64 = 53248
    (the 256x64 input embedding is a lookup, left out); 1 TFLOP/s -> 1e12 / 106496 tokens/s."""
    e2e = _bench_module("e2e", monkeypatch)
    text = e2e.run(e2e.SMOKE, _tiny_llama(), [], [], 1, 1.0, [])
    assert "(2 x 0.000 B matmul parameters) = 9,390,024 tokens/s" in text


def test_e2e_prefill_rows_tokens_per_second_ratios_and_bound_share(monkeypatch) -> None:
    """The prefill table's arithmetic (methods compiled as the eager model, step times stubbed at
    4, 2, 1 and 0.5 ms for eager, Inductor, tileflow and tileflow+nano): 16 tokens in 1 ms =
    16,000 tok/s; tileflow / Inductor 2.00; best nano / tileflow 2.00; 32,000 of a 100,000 bound = 32%."""
    import itertools

    import torch

    e2e = _bench_module("e2e", monkeypatch)
    model = _tiny_llama()
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    times = itertools.cycle([4.0, 2.0, 1.0, 0.5])
    monkeypatch.setattr(e2e, "step_ms", lambda fn, scale: (fn(), next(times))[1])
    failures: list[str] = []
    text = e2e.prefill_part(model, [16], 1e5, e2e.SMOKE, failures)
    assert failures == []
    row = next(line for line in text.splitlines() if line.startswith("| 16 |")).split("|")[1:-1]
    assert [c.strip() for c in row] == ["16", "4,000", "8,000", "16,000", "32,000", "2.00", "2.00", "32%"]


def test_e2e_mixed_step_has_exactly_the_asked_tokens(monkeypatch) -> None:
    """A mixed step of an odd token count: half (rounded down) in prompt chunks of at most
    `chunk` tokens, the rest as single-token decodes; each sequence gets its own whole blocks."""
    import random

    e2e = _bench_module("e2e", monkeypatch)
    entries, blocks = e2e.mixed_entries(21, random.Random(0), e2e.SMOKE)
    chunks = [e for e in entries if e.kind == "prefill"]
    decodes = [e for e in entries if e.kind == "decode"]
    assert [len(e.tokens) for e in chunks] == [8, 2] and len(decodes) == 11
    assert sum(len(e.tokens) for e in entries) == 21
    assert all(e.start in e2e.SMOKE.prefixes for e in chunks)
    assert all(e2e.SMOKE.contexts[0] <= e.start + 1 <= e2e.SMOKE.contexts[1] for e in decodes)
    assert blocks == sum(-(-(e.start + len(e.tokens)) // e2e.BLOCK) for e in entries)


# ---------------------------------------------------------------------------------------------
# The serving parts' and the remaining attention tables' arithmetic, against hand-computed values
# (a second mutation audit: a swapped ratio or a wrong divisor there passed every test above).


def test_e2e_step_ms_on_the_cpu_is_the_median_of_three_runs(monkeypatch) -> None:
    """step_ms's CPU path: three wall-clock runs of 5, 1 and 2 ms give 2 ms (the median, not
    the mean 2.67 or the first run)."""
    e2e = _bench_module("e2e", monkeypatch)
    clock = iter([0.0, 0.005, 1.0, 1.001, 2.0, 2.002])
    monkeypatch.setattr(e2e.time, "perf_counter", lambda: next(clock))
    calls = []
    assert e2e.step_ms(lambda: calls.append(1), e2e.SMOKE) == pytest.approx(2.0)
    assert len(calls) == 3


def test_e2e_mixed_rows_tokens_per_second_ratios_and_bound_share(monkeypatch) -> None:
    """The mixed table's arithmetic (the engine stubbed; each method's step stubbed at ATen 8,
    Inductor 4, tileflow 2, tileflow+nano 1, whole grids 1.6, tileflow+auto 1.25 and
    tileflow+graphs 0.5 ms): a 16-token step (1 chunk of 8 + 8 decodes) in 2 ms = 8,000 tok/s;
    tileflow / Inductor 2.00, nano / tileflow 2.00, nano SM shares / whole grids 1.60, auto /
    tileflow 1.60 with auto's cut the engine's (its decodes apart from its chunk), graphs /
    tileflow 4.00, and 8,000 of a 100,000 bound = 8%. A nano-batched step prepares its own inputs
    (given None), only the whole-grids method runs without SM shares, and the KV cache holds the
    largest step's blocks."""
    import torch

    e2e = _bench_module("e2e", monkeypatch)
    ms = {("ATen", 1, True): 8.0, ("Inductor", 1, True): 4.0, ("tileflow", 1, True): 2.0,
          ("tileflow", 2, True): 1.0, ("tileflow", 2, False): 1.6, ("tileflow", "auto", True): 1.25,
          ("tileflow+graphs", 1, True): 0.5}
    forwards = []

    class Engine:
        program, nano_batches, nano_shares = None, 1, True

        def prepare(self, entries):
            return ("inputs", len(entries))

        def nano_groups(self, entries):  # (the 16-token step splits; the 8-token one runs whole)
            assert self.nano_batches == "auto"
            if len(entries) < 9:
                return [list(entries)]
            return [[e for e in entries if e.kind == "decode"], [e for e in entries if e.kind != "decode"]]

        def forward(self, entries, inputs=None):
            forwards.append((self.program, self.nano_batches, self.nano_shares, inputs))
            return torch.ones(sum(len(e.tokens) for e in entries), 8)

    engine = Engine()
    made = []
    monkeypatch.setattr(e2e, "serving_engine", lambda program, scale, **kw: (made.append((program, kw)), engine)[1])
    monkeypatch.setattr(e2e, "step_ms", lambda fn, scale: (fn(), ms[engine.program, engine.nano_batches,
                                                                    engine.nano_shares])[1])
    programs = {name: name for name in e2e.SERVING_PROGRAMS}
    failures: list[str] = []
    text = e2e.mixed_part(programs, [8, 16], 1e5, e2e.SMOKE, failures)
    assert failures == []
    import random

    rng = random.Random(0)  # the steps' draws, in order: the cache holds the largest step's blocks
    blocks = [e2e.mixed_entries(t, rng, e2e.SMOKE)[1] for t in (8, 16)]
    assert blocks[0] != blocks[1] and made == [("ATen", {"num_blocks": max(blocks), "slots": 1})]
    header = [c.strip() for c in next(line for line in text.splitlines() if line.startswith("| tokens |")).split("|")[1:-1]]
    row = [c.strip() for c in next(line for line in text.splitlines() if line.startswith("| 16 |")).split("|")[1:-1]]
    cell = dict(zip(header, row))
    assert cell["step"] == "1 chunks + 8 decodes"
    assert [cell[f"{n} tok/s"] for n in e2e.MIXED_METHODS] == ["2,000", "4,000", "8,000", "16,000", "32,000", "10,000",
                                                               "12,800"]
    assert [cell[c] for c in ("tileflow / Inductor", "nano / tileflow", "nano SM shares / whole grids", "auto / tileflow",
                              "auto's cut", "graphs / tileflow", "tileflow % of bound")] == [
        "2.00", "2.00", "1.60", "1.60", "8+8", "4.00", "8%"]
    # (SM shares only matter to a nano-batched step: the reference step after the whole-grids one keeps False.)
    assert {(p, n, s or n == 1, i is None) for p, n, s, i in forwards} == {
        ("ATen", 1, True, False), ("Inductor", 1, True, False), ("tileflow", 1, True, False),
        ("tileflow", 2, True, True), ("tileflow", 2, False, True), ("tileflow", "auto", True, True),
        ("tileflow", "auto", True, False), ("tileflow+graphs", 1, True, False)}
    row8 = [c.strip() for c in next(line for line in text.splitlines() if line.startswith("| 8 |")).split("|")[1:-1]]
    assert dict(zip(header, row8))["auto's cut"] == "8"


def _trace_metrics(wall: float):
    """Metrics of a served trace: 3 requests, 10 steps of 51 tokens in all, 12 generated, TTFTs
    of 10, 20 and 60 ms, tokens 2, 5 and 9 ms apart (one request's), 25% of `wall` waiting."""
    from tileflow.serving.engine import Metrics

    return Metrics(steps=10, tokens_in_steps=51, generated=12, ttft={0: 0.01, 1: 0.02, 2: 0.06},
                   token_times={0: [1.0, 1.002, 1.007, 1.016], 1: [2.0], 2: []}, wall=wall, waited=wall / 4)


def test_e2e_trace_rows_processed_and_generated_rates_latencies_and_agreement(monkeypatch) -> None:
    """The request-trace table's arithmetic (the engine stubbed; every method's run returns the
    metrics above, its wall 0.5 s for ATen and 0.25 s for the rest): processed = 51 tokens in
    steps / 0.25 s = 204 tok/s, generated 12 / 0.25 = 48 tok/s, 204 of a 1,000 bound = 20%,
    mean TTFT (10 + 20 + 60) / 3 = 30 ms, mean time between tokens (2 + 5 + 9) / 3 = 5.3 ms (the
    gaps of consecutive tokens), host waiting 25%; a method whose second request's tokens differ
    has 2 of 3 equal to ATen's. The KV cache holds count x ceil((prompt + output) / 16) + 64
    blocks, every method but the steps-in-turn one overlaps, and the GPU's traces are 512/512 and
    1024/512 under a 4096-token budget."""
    import dataclasses

    e2e = _bench_module("e2e", monkeypatch)
    assert e2e.GPU.traces == ((512, 512), (1024, 512)) and e2e.GPU.budget == 4096
    scale = dataclasses.replace(e2e.SMOKE, device="cuda", traces=((12, 5),))  # reported, as on the GPU
    engines = []

    class Engine:
        def __init__(self, program, kw):
            self.program, self.kw = program, kw

        def run(self, requests):
            engines.append((self.program, self.kw, [(len(r.prompt), r.max_new_tokens) for r in requests]))
            for r in requests:
                r.tokens = r.prompt + [7] * r.max_new_tokens
                if self.program == "tileflow" and self.kw.get("nano") == 2 and r.id == 1:
                    r.tokens[-1] = 8
            return _trace_metrics(0.5 if self.program == "ATen" else 0.25)

    monkeypatch.setattr(e2e, "serving_engine", lambda program, scale, **kw: Engine(program, kw))
    warmed = []  # each program's warm-up steps once, and the nano-batched path's once more, before its timed runs
    monkeypatch.setattr(e2e, "warm_up", lambda program, scale, nano=1: warmed.append((program, nano, len(engines))))
    programs = {name: name for name in e2e.SERVING_PROGRAMS}
    failures: list[str] = []
    text = e2e.trace_part(programs, 3, 1000.0, scale, failures)
    assert failures == []
    assert warmed == [("ATen", 1, 0), ("Inductor", 1, 1), ("tileflow", 1, 2), ("tileflow", 2, 3),
                      ("tileflow+graphs", 1, 4)]
    timed = [(p, kw) for p, kw, shapes in engines if kw["slots"] == 3]
    assert [shapes for p, kw, shapes in engines if kw["slots"] == 3] == [[(12, 5)] * 3] * len(e2e.TRACE_METHODS)
    assert all(kw["num_blocks"] == 3 * 2 + 64 for _, kw in timed)
    assert [kw["overlap"] for _, kw in timed] == [name != e2e.IN_TURN for name in e2e.TRACE_METHODS]
    rows = {r[1].strip(): [c.strip() for c in r] for r in (line.split("|")[1:-1] for line in text.splitlines())
            if r and r[0].strip() == "3 x 12/5"}
    assert rows["ATen"] == ["3 x 12/5", "ATen", "10", "102", "24", "10%", "30", "5.3", "25%", "3/3"]
    assert rows["tileflow"] == ["3 x 12/5", "tileflow", "10", "204", "48", "20%", "30", "5.3", "25%", "3/3"]
    assert rows["tileflow+nano"][-1] == "2/3"
    assert set(rows) == set(e2e.TRACE_METHODS)


# 20 requests of 512/8, as on the GPU: 4096-token steps (8 prompts), mixed steps, then 20-token
# decode steps; of 24/8 (extended): a 480-token step (the 512 bucket), then the decodes.
@pytest.mark.parametrize("prompt", [512, pytest.param(24, marks=pytest.mark.extended)])
def test_e2e_trace_timed_runs_launch_no_kernel_first_and_capture_no_graph(monkeypatch, prompt: int) -> None:
    """Under the GPU's step budget (4096 tokens, programs built for 4096), every method's timed
    trace launches no kernel for the first time (a Triton compile on the GPU: a GEMM plan piece's
    kernel, an attention tile height) and captures no CUDA graph (`ReplayOnCpu` stands in): the
    warm-up ran each step size and tile height that needs one. Warm-ups of 1 and 4 requests of
    40/3 left the GEMM kernel of 17-32-token steps and the 32-token bucket to the timed run (and
    at 24/8 the 512 bucket)."""
    import dataclasses

    import torch
    from graph_doubles import ReplayOnCpu

    import tileflow.runtime.attention as attention_runtime
    from tileflow import runtime
    from tileflow.runtime import streams
    from tileflow.serving import ServingEngine

    e2e = _bench_module("e2e", monkeypatch)
    monkeypatch.setattr(streams, "GRAPH_FACTORY", ReplayOnCpu)
    monkeypatch.setattr(ReplayOnCpu, "captures", 0)
    launched: set = set()
    firsts: list[str] = []
    get_kernel = runtime.get_kernel

    class Recorded:  # a kernel whose first launch in this test is noted
        def __init__(self, kernel, spec):
            self.kernel, self.spec = kernel, spec

        def __call__(self, *args, **kwargs):
            if self.spec not in launched:
                launched.add(self.spec)
                firsts.append(self.spec.name)
            return self.kernel(*args, **kwargs)

    monkeypatch.setattr(runtime, "get_kernel", lambda target, spec, *a: Recorded(get_kernel(target, spec, *a), spec))
    attention_runtime._attention_kernel.cache_clear()  # (it holds kernels got before the wrapper)
    timed = []  # (program, captures, kernels launched first) of each ServingEngine.run: the timed runs
    run = ServingEngine.run

    def counted_run(self, requests=(), **kw):
        captures, first = ReplayOnCpu.captures, len(firsts)
        metrics = run(self, requests, **kw)
        timed.append((self.scheduler.decode_slots, ReplayOnCpu.captures - captures, firsts[first:]))
        return metrics

    monkeypatch.setattr(ServingEngine, "run", counted_run)
    # (tileflow+graphs runs tileflow's GEMMs, captured: the tileflow method would add nothing)
    names = ("ATen", "tileflow+graphs")
    monkeypatch.setattr(e2e, "TRACE_METHODS", {name: (name, 1) for name in names})
    scale = dataclasses.replace(e2e.SMOKE, traces=((prompt, 8),), budget=4096)
    programs = e2e.serving_programs(_tiny_llama(), max_tokens=4096, names=names)
    failures: list[str] = []
    with torch.no_grad():
        e2e.trace_part(programs, 20, 1e9, scale, failures)
    assert failures == []
    assert [(slots, captures, kernels) for slots, captures, kernels in timed if slots == 20] == [(20, 0, [])] * 2
    assert ReplayOnCpu.captures > 0 and firsts  # the warm-ups did capture and launch


def test_attention_softcap_rows_count_gemma_kv_bytes_flops_and_ratios(monkeypatch, tmp_path) -> None:
    """The soft-capped table (quick: one 2048-token prompt; kernels stubbed; tileflow 0.01 ms,
    no cap 0.02, FlexAttention 0.04): Gemma-2's 8 KV heads of 256 read 2048 x 8 x 256 x 2 x 2 =
    16,777,216 bytes, plus q (16 heads) read and written 2 x 2048 x 16 x 256 x 2 = 33,554,432: 5033
    GB/s, 503% of the stubbed 1000; 4 x 2048 x 2049 / 2 x 16 x 256 FLOPs = 3437.7 TFLOP/s; each
    baseline over tileflow; tileflow with the cap is checked against the capped reference."""
    import itertools
    import math

    import torch

    attention, common = _attention_on_cpu(monkeypatch, tmp_path)
    times = itertools.cycle([0.01, 0.02, 0.04])
    monkeypatch.setattr(common, "median_ms", lambda fn, **k: (fn(0), next(times))[1])
    shapes = []

    def paged_batch(q_lens, kv_lens, *, device, dtype, heads=None, head_dim=None, **k):
        shapes.append((heads, head_dim))
        return {"q": torch.zeros(sum(q_lens), heads[0], head_dim)}

    capped, plain = torch.full((2048, 16, 256), 1.0), torch.full((2048, 16, 256), 2.0)
    monkeypatch.setattr(attention, "paged_batch", paged_batch)
    monkeypatch.setattr(attention, "gather_dense", lambda batch, s: None)
    monkeypatch.setattr(attention, "capped_reference", lambda batch, cap: capped)
    monkeypatch.setattr(attention, "sdpa_per_sequence", lambda batch, reference=False: plain)
    caps = []
    monkeypatch.setattr(attention, "tileflow_serving",
                        lambda batch, softcap=None: (caps.append(softcap), capped if softcap == 50.0 else plain)[1])
    mods = []
    monkeypatch.setattr(attention, "make_flex", lambda batch, score_mod=None: (mods.append(score_mod), lambda b: capped)[1])
    assert attention.run_gpu(True, True, ("softcap",)) == 0
    assert shapes == [((16, 8), 256)] and set(caps) == {50.0, None}  # with the cap, and the "no cap" column
    assert float(mods[0](torch.tensor(100.0), 0, 0, 0, 0)) == pytest.approx(50 * math.tanh(2.0))
    (path,) = tmp_path.iterdir()
    row = next(line for line in path.read_text().splitlines() if line.startswith("| prefill 1x2048 |"))
    assert [c.strip() for c in row.split("|")[1:-1]] == [
        "prefill 1x2048", "0.010", "0.020", "0.040", "5033 (503%)", "3437.7", "2.00x", "4.00x"]


def test_attention_mask_rows_count_the_causal_half_and_ratios(monkeypatch, tmp_path) -> None:
    """The model-mask table (quick: 2048 tokens; HQ 4, D 16; the methods run at 40 tokens on the
    CPU; times 0.001, 0.001, 0.002, 0.004, 0.008 ms per method, 0.5 ms for the ranges): 4 x 2048
    x 2049 / 2 x 4 x 16 = 537,133,056 FLOPs, 537 TFLOP/s at 0.001 ms; SDPA's columns over the
    bias method's time."""
    import itertools

    import torch

    attention, common = _attention_on_cpu(monkeypatch, tmp_path)
    times = itertools.cycle([0.001, 0.001, 0.002, 0.004, 0.008, 0.5])
    monkeypatch.setattr(common, "median_ms", lambda fn, **k: (fn(0), next(times))[1])
    model_mask_methods = attention.model_mask_methods
    monkeypatch.setattr(attention, "model_mask_methods",
                        lambda s, *, device, dtype: model_mask_methods(40, device="cpu", dtype=torch.float32))
    assert attention.run_gpu(True, True, ("mask",)) == 0
    (path,) = tmp_path.iterdir()
    row = next(line for line in path.read_text().splitlines() if line.startswith("| 1x2048 |"))
    assert [c.strip() for c in row.split("|")[1:-1]] == [
        "1x2048", "0.001 (537)", "0.001 (537)", "0.002 (269)", "0.004 (134)", "0.008 (67)", "0.500", "4.00x", "8.00x"]


def test_attention_packed_rows_count_each_documents_causal_half(monkeypatch, tmp_path) -> None:
    """The packed-documents table (quick; documents of 3 and 5 tokens; HQ 4, D 16; times 1e-9,
    2e-9, 4e-9 ms for key starts, packed mask, SDPA): each document's causal half, 6 + 15 pairs,
    4 x 21 x 4 x 16 = 5376 FLOPs, 5376 TFLOP/s at 1e-9 ms (not the 36 pairs of one 8-token
    prompt); the plain causal kernel is n/a with two documents; ratios over key starts."""
    import itertools

    import torch

    attention, common = _attention_on_cpu(monkeypatch, tmp_path)
    times = itertools.cycle([1e-9, 2e-9, 4e-9])
    monkeypatch.setattr(common, "median_ms", lambda fn, **k: (fn(0), next(times))[1])
    monkeypatch.setattr(attention, "packed_document_lengths", lambda rng, total, shortest, longest: [3, 5])
    packed_methods = attention.packed_methods
    monkeypatch.setattr(attention, "packed_methods", lambda doc_lens, *, device, dtype: packed_methods(
        doc_lens, device="cpu", dtype=torch.float32, flex=False))
    assert attention.run_gpu(True, True, ("packed",)) == 0
    (path,) = tmp_path.iterdir()
    row = next(line for line in path.read_text().splitlines() if line.startswith("| 2048 tokens, "))
    assert [c.strip() for c in row.split("|")[1:-1]] == [
        "2048 tokens, 2 documents of 128-512", "0.000 (5376)", "n/a", "0.000 (2688)", "0.000 (1344)",
        "n/a", "2.00x", "4.00x"]


def test_profile_report_shares_of_device_time_and_of_wall(monkeypatch) -> None:
    """profile_step.report: kernels of 3 ms (GEMM), 1 ms (attention) and 0.5 + 0.5 ms (split-K
    reduce, which a "gemm" in its name must not claim) in a 10 ms wall: device 5 ms = 50% of wall;
    shares of the device time 60%, 20%, 10%, 10%."""
    profile_step = _bench_module("profile_step", monkeypatch)
    kernels = {"padded_gemm_kernel": 3.0, "meta_attention_kernel": 1.0, "gemm_split_reduce": 0.5, "triton_poi_add": 0.5}
    text = profile_step.report("x", {"wall_ms": 10.0, "device_ms": 5.0, "kernels": kernels})
    assert "device (kernels summed) 5.000 ms (50% of wall)" in text
    for line in ("| GEMM | 3.000 | 60% |", "| attention | 1.000 | 20% |", "| split-K reduce | 0.500 | 10% |",
                 "| elementwise / norm | 0.500 | 10% |"):
        assert line in text


def test_profile_host_functions_rank_own_time_per_step(monkeypatch) -> None:
    """profile_step.rank_host_functions: cProfile's stats over 4 steps become rows by own time,
    per step (6 ms own over 4 steps = 1.5 ms), C functions by name and Python ones as
    file:line name, cut at `top`; the report prints them. host_functions ranks a step that
    spends its time in one Python function (a pure Python loop) with that function first."""
    profile_step = _bench_module("profile_step", monkeypatch)
    stats = {
        ("/x/tileflow/runtime/__init__.py", 324, "run_padded_gemm"): (40, 40, 0.002, 0.010, {}),
        ("~", 0, "<method 'run' of 'CompiledKernel' objects>"): (40, 40, 0.006, 0.006, {}),
        ("/x/torch/nn/modules/module.py", 1782, "_call_impl"): (8, 4, 0.001, 0.020, {}),
    }
    rows = profile_step.rank_host_functions(stats, steps=4, top=2)
    assert rows == [("<method 'run' of 'CompiledKernel' objects>", 1.5, 1.5), ("__init__.py:324 run_padded_gemm", 0.5, 2.5)]
    text = profile_step.report("x", {"wall_ms": 20.0, "device_ms": 0.0, "kernels": {}, "host": rows})
    assert "Host functions by own time" in text and "| __init__.py:324 run_padded_gemm | 0.500 | 2.500 |" in text

    def busy_loop() -> int:
        total = 0
        for i in range(300_000):
            total += i
        return total

    assert "busy_loop" in profile_step.host_functions(busy_loop, device="cpu", steps=2)[0][0]


def test_profile_sums_kernel_rows_only_on_the_gpu(monkeypatch) -> None:
    """profile_step.profile on CUDA (the profiler stubbed with the rows an H200 gave for one bf16
    4096^3 matmul per step): the ATen op that launched a kernel carries that kernel's time as its
    self device time too, and so do CPU-side profiler rows and GPU user annotations; summing
    every row reported 0.37 ms of device time for a 0.175 ms matmul (CUDA events). Only the
    device rows that are not annotations count, as torch's own table sums them: 0.168 ms."""
    import types

    import torch
    import torch.profiler
    from torch.autograd import DeviceType

    profile_step = _bench_module("profile_step", monkeypatch)
    steps = 5

    def row(key, device_type, ms, annotation=False):
        return types.SimpleNamespace(key=key, device_type=device_type, self_device_time_total=ms * 1e3 * steps,
                                     self_cpu_time_total=10.0, is_user_annotation=annotation)

    rows = [row("aten::mm", DeviceType.CPU, 0.167), row("Activity Buffer Request", DeviceType.CPU, 0.034),
            row("Memset (Device)", DeviceType.CUDA, 0.001), row("nvjet_sm90_tst_256x128", DeviceType.CUDA, 0.167),
            row("## forward ##", DeviceType.CUDA, 0.170, annotation=True)]

    class Profile:
        def __init__(self, activities):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return rows

    monkeypatch.setattr(torch.profiler, "profile", Profile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    result = profile_step.profile(lambda: None, device="cuda", steps=steps)
    assert set(result["kernels"]) == {"Memset (Device)", "nvjet_sm90_tst_256x128"}
    assert result["device_ms"] == pytest.approx(0.168)


def test_sampling_table_logits_bandwidth_and_copy_share(monkeypatch) -> None:
    """bench/sampling.py's GPU table on the CPU (draws, checks and timings stubbed): 4 rows of a
    100-token vocabulary in bf16 are 4 x 100 x 2 = 800 bytes read once; at 1e-6 ms that is 800
    GB/s, 80% of the stubbed 1000 GB/s copy."""
    sampling = _bench_module("sampling", monkeypatch)
    setup = sampling._setup
    monkeypatch.setattr(sampling, "gpu_available", lambda: True)
    monkeypatch.setattr(sampling, "measured_copy_gbs", lambda *a, **k: 1000.0)
    monkeypatch.setattr(sampling, "median_ms", lambda fn, **k: (fn(0), 1e-6)[1])
    monkeypatch.setattr(sampling, "agreement", lambda *a: 1.0)
    monkeypatch.setattr(sampling, "_setup", lambda rows, vocab, device, dtype, **f: setup(rows, vocab, "cpu", dtype, **f))
    monkeypatch.setattr(sampling, "draw", lambda logits, s, fused: logits.argmax(-1))
    monkeypatch.setattr(sys, "argv", ["sampling.py", "--rows", "4", "--vocab", "100", "--no-write"])
    lines = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert sampling.main() == 0
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in "\n".join(lines).splitlines() if line.startswith("| 4 |")]
    assert [r[1] for r in rows][:4] == ["argmax (greedy)", "draw, eager", "draw, fused", "draw, top-p 0.9 + min-p 0.05 (eager sort)"]
    assert all(r[3:] == ["800", "80%"] for r in rows[:4])


def test_host_median_ms_and_cumulative_lengths(monkeypatch) -> None:
    """bench/host.py's rows (`common.wall_median_ms`): the median of the repeats (runs of 5, 1 and 2 ms give 2, not the
    mean or the last run), `before` called before each run untimed; cu_seqlens start at 0."""
    host = _bench_module("host", monkeypatch)
    common = _bench_module("common", monkeypatch)
    clock = iter([0.0, 0.005, 1.0, 1.001, 2.0, 2.002])
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    before = []
    assert host.wall_median_ms is common.wall_median_ms
    assert common.wall_median_ms(lambda: None, 3, before=lambda: before.append(1)) == pytest.approx(2.0)
    assert before == [1, 1, 1]
    assert host._cu([1, 3, 2]) == [0, 1, 4, 6]


# ---------------------------------------------------------------------------------------------
# A second reader's dry run of Session 43's GPU plan (the bench scripts on torch 2.11 / Triton
# 3.6 on the CPU): rows a cut call loses, kernels filed under the wrong category, a stage that
# measures nothing it is named for.


@pytest.mark.skipif(shutil.which("tar") is None or sys.platform != "linux", reason="needs tar and process groups")
def test_gpu_session_brings_back_the_rows_of_a_stage_the_call_cuts(tmp_path) -> None:
    """The device tool's timeout (timeout_s, the session's device time) kills the whole call,
    stage and script together: only $OUT comes back. The rows a stage wrote into bench/results
    before that were packed only after the stage ended, which a cut stage never does (the
    plan's second call: 360 s of stages in what its budget leaves, about 200 s)."""
    import signal
    import time

    tree, fake, out = _session_tree(tmp_path, "  *sampling.py*) echo row > bench/results/sampling-done.md;;\n"
                                              "  *moe.py*) echo row > bench/results/moe-rows-so-far.md; sleep 30;;\n")
    env = {**os.environ, "OUT": str(out), "PYTHON": str(fake), "GPU_SESSION_PACK_SECONDS": "1"}
    with open(tmp_path / "session.log", "w") as log:
        call = subprocess.Popen(["bash", "bench/gpu_session.sh", "sampling:5", "moe:50"], cwd=tree, stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        time.sleep(6)
        os.killpg(call.pid, signal.SIGKILL)  # the whole call, as the device tool stops it
        call.wait(timeout=10)
    listing = subprocess.run(["tar", "tzf", str(out / "results.tar.gz")], capture_output=True, text=True, check=True)
    assert "bench/results/sampling-done.md" in listing.stdout
    assert "bench/results/moe-rows-so-far.md" in listing.stdout


def test_profile_files_inductor_norm_and_cublas_kernels_by_what_they_do(monkeypatch) -> None:
    """Inductor names a fused kernel after its ATen ops: a bf16 Llama's RMSNorm is
    `triton_red_fused__to_copy_add_embedding_mean_mul_pow_rsqrt_0` (its float32 upcast is a
    `_to_copy`), its RoPE `..._cat_neg_slice_...`. The "copy" rule came first and took them."""
    profile_step = _bench_module("profile_step", monkeypatch)
    assert profile_step.category("triton_red_fused__to_copy_add_embedding_mean_mul_pow_rsqrt_0") == "elementwise / norm"
    assert profile_step.category("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_6") == "elementwise / norm"
    assert profile_step.category("triton_poi_fused__unsafe_view_cat_neg_slice_transpose_view_2") == "elementwise / norm"
    # What only moves data stays a copy; templates and tileflow's kernels keep their categories.
    assert profile_step.category("triton_poi_fused__to_copy_clone_0") == "copy"
    assert profile_step.category("Memcpy DtoD (Device -> Device)") == "copy"
    assert profile_step.category("triton_tem_fused__to_copy_mm_0") == "GEMM"
    assert profile_step.category("padded_gemm_128x128x64") == "GEMM"
    # cuBLAS on an H100/H200 names its GEMMs `nvjet_*`, its matrix-vector products `gemv*` and
    # its split-K pass `splitKreduce_kernel`: they were filed under "other", leaving the Inductor
    # step's GEMM share (cuBLAS through `extern_kernels.mm`) near zero.
    assert profile_step.category("nvjet_sm90_tst_256x128") == "GEMM"
    assert profile_step.category("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT") == "GEMM"
    assert profile_step.category("gemv2T_kernel_val<int, int, __nv_bfloat16, float, 128, 16>") == "GEMM"
    assert profile_step.category("void cublasLt::splitKreduce_kernel<32, 16, int, float>") == "split-K reduce"


def test_moe_gpu_run_keeps_its_rows_when_cut(monkeypatch, tmp_path) -> None:
    """bench/moe.py (the `moe` stage, last in the plan's second call, the likeliest to be cut)
    wrote its table and printed its rows only at the end: a cut stage left nothing. Its GPU path
    on the CPU (interpreter, fp32, ceilings stubbed), killed at the third method timed."""
    import torch

    moe = _bench_module("moe", monkeypatch)
    common = importlib.import_module("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "measured_matmul_tflops", lambda *a, **k: 100.0)

    class Killed(BaseException):
        pass

    timed = []

    def median_ms(fn, **kwargs):
        if len(timed) == 2:
            raise Killed
        timed.append(fn(0))
        return 1.0

    monkeypatch.setattr(common, "median_ms", median_ms)
    with pytest.raises(Killed):
        moe.run_gpu([1, 9], write=True, shapes=moe.SMOKE_SHAPES[:1], device="cpu", dtype=torch.float32, tol=1e-4)
    (path,) = tmp_path.iterdir()
    text = path.read_text()
    assert "partial" in text and "| small gate-up | 1 | tileflow grouped_gemm (epilogue fused) | 1.000 |" in text


def test_gemm_measured_plans_refuses_auto_where_no_tile_times_ship(monkeypatch, tmp_path) -> None:
    """`gemm-measured` runs `--tile-timings auto`; only H200 times ship, and the lender's default
    machine is an H100: there `auto` is the cost model, and the stage spent its 140 s re-measuring
    the `gemm` stage's table under the title "with measured tile plans". It must stop before any
    device work and say why."""
    gemm = _bench_module("gemm", monkeypatch)
    common = importlib.import_module("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)

    class Started(BaseException):
        pass

    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr(common, "measured_matmul_tflops", started)
    monkeypatch.setattr(gemm, "checked_tflops", started)
    assert gemm.run_gpu(True, True, "auto", device="cpu") == 2  # on the CPU no tile times ship either
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# A third reader's dry run of the bench scripts' GPU paths: cuBLAS's Hopper GEMMs filed under
# "other", a session whose exit status hides failed stages, a sampling table lost with one bad
# row count, and a compile-time table lost to a repeated depth.


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils")
def test_gpu_session_exit_status_says_a_stage_failed(tmp_path) -> None:
    """A failed (or timed-out) stage does not stop the next one, but the session then exited 0
    (its last command was `ls`): the device tool's `rc` read success for a call whose every
    stage failed. It must exit 1 and name the stages, having still run the later ones."""
    tree, fake, out = _session_tree(tmp_path, "  *gemm.py*) exit 1;;\n")
    env = {**os.environ, "OUT": str(out), "PYTHON": str(fake)}
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "gemm:5", "sampling:5"], cwd=tree, capture_output=True,
                          text=True, timeout=60, env=env)
    assert "=== gemm: exit 1" in proc.stdout and "=== sampling: exit 0" in proc.stdout
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "gemm:1" in proc.stdout.splitlines()[-1]
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "sampling:5"], cwd=tree, capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_sampling_keeps_its_rows_when_a_later_row_count_fails_or_is_cut(monkeypatch, tmp_path) -> None:
    """bench/sampling.py wrote its table only at the end, and returned at the first row count
    whose fused draws disagreed: a disagreement at 256 rows, or the stage's limit, lost the
    64-row table already measured (every other benchmark rewrites its file after each row)."""
    sampling = _bench_module("sampling", monkeypatch)
    common = importlib.import_module("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    setup = sampling._setup
    monkeypatch.setattr(sampling, "gpu_available", lambda: True)
    monkeypatch.setattr(sampling, "measured_copy_gbs", lambda *a, **k: 1000.0)
    monkeypatch.setattr(sampling, "median_ms", lambda fn, **k: (fn(0), 1e-6)[1])
    monkeypatch.setattr(sampling, "agreement", lambda rows, *a: 1.0 if rows == 4 else 0.5)
    monkeypatch.setattr(sampling, "_setup", lambda rows, vocab, device, dtype, **f: setup(rows, vocab, "cpu", dtype, **f))
    monkeypatch.setattr(sampling, "draw", lambda logits, s, fused: logits.argmax(-1))
    monkeypatch.setattr(sys, "argv", ["sampling.py", "--rows", "4,8", "--vocab", "100"])
    assert sampling.main() == 1
    (path,) = tmp_path.iterdir()
    text = path.read_text()
    assert "| 4 | argmax (greedy) | 0.000 | 800 | 80% |" in text
    assert "FAILED: fused and eager draws disagree on 50.0% of 8 rows" in text and "partial" not in text

    # Cut by the stage's limit while timing the second row count: the first one's rows are on disk.
    path.unlink()

    class Killed(BaseException):
        pass

    timed = []

    def median_ms(fn, **kwargs):
        if len(timed) == 4:
            raise Killed
        timed.append(fn(0))
        return 1e-6

    monkeypatch.setattr(sampling, "median_ms", median_ms)
    monkeypatch.setattr(sampling, "agreement", lambda *a: 1.0)
    with pytest.raises(Killed):
        sampling.main()
    (path,) = tmp_path.iterdir()
    text = path.read_text()
    assert "partial" in text and "| 4 | draw, fused |" in text


def test_compile_time_growth_skips_a_repeated_depth(monkeypatch, capsys) -> None:
    """`compile_time.py --layers 2,2,8` (a depth measured twice, to see the noise) raised
    ZeroDivisionError (log(2 / 2) = 0 in the growth's exponent) after every row was measured,
    and printed no table."""
    compile_time = _bench_module("compile_time", monkeypatch)
    row = {"canonicalize": 1.0, "dynamo": 10.0, "aot": 5.0, "tileflow": 20.0, "other": 1.0, "graphs": 1, "padding": 0.0,
           "gc": 0.0}
    monkeypatch.setitem(compile_time.MEASURE, "dynamo", lambda name, layers, options, batch: dict(row))
    monkeypatch.setattr(compile_time.torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(sys, "argv", ["compile_time.py", "--models", "llama", "--layers", "2,2,8"])
    compile_time.main()
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| llama")]
    assert [r[1] for r in rows] == ["2", "2", "8"]
    assert [r[-1] for r in rows] == ["", "", "1.0x / 1.0x"]  # the same times at 4x the depth: flat


def test_gemm_summary_counts_the_main_tables_kernels_only(monkeypatch, tmp_path) -> None:
    """The summary under the dynamic-M table ("tileflow kernels compiled per (N, K) ... no
    recompiles") is rewritten at every checkpoint, the SwiGLU and Q, K and V tables' too: it
    counted their kernels as the main table's (the H200's 62b821b file lists '14336x4096': 3,
    the SwiGLU projection, a shape the table does not have; Q, K and V's one kernel adds to the
    6144 x 4096 shape's count). Main table (96 x 24 here) on the CPU, the fused tables' kernels
    built at that shape's width."""
    import torch

    import tileflow

    gemm = _bench_module("gemm", monkeypatch)
    common = importlib.import_module("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "measured_matmul_tflops", lambda *a, **k: 10.0)
    monkeypatch.setattr(gemm, "SHAPES", [(96, 24)])
    monkeypatch.setattr(gemm, "M_VALUES", [33])
    bodies = []
    write_results = common.write_results
    monkeypatch.setattr(common, "write_results", lambda name, title, env, body, **k: (
        bodies.append(body), write_results(name, title, env, body, **k))[1])

    def checked_tflops(fn, inputs, want, flops, failures, what):
        if what.startswith("tileflow at"):
            fn(*inputs[0])  # builds the plan's kernels, as the real check does
        return 1.0

    def fused_tables(quick, peak, failures, checkpoint=None, *, device):
        config = tileflow.Config(target="triton", max_tokens=gemm.MAX_TOKENS)
        x = torch.randn(33, 24)
        weights = [torch.randn(rows, 24) for rows in (48, 24, 24)]  # 96 rows together: the main shape's N
        with tileflow.use_config(config):
            tileflow.ops.padded_gemm(x, weights[0], more_weights=weights[1:])
            for w in weights:
                tileflow.ops.padded_gemm(x, w)
            tileflow.ops.padded_gemm(x, weights[0], weight_up=torch.randn(48, 24), activation="swiglu")
        checkpoint("## a fused table")
        return "## a fused table"

    monkeypatch.setattr(gemm, "checked_tflops", checked_tflops)
    monkeypatch.setattr(gemm, "run_swiglu", fused_tables)
    monkeypatch.setattr(gemm, "run_qkv", lambda *a, **k: "")
    assert gemm.run_gpu(False, True, variant_m=[], device="cpu") == 0

    def counts(body: str) -> str:
        return next(line for line in body.splitlines() if "kernels compiled per (N, K)" in line)

    assert "96x24" in counts(bodies[0])
    assert counts(bodies[-1]) == counts(bodies[0])  # after the fused tables: the main table's kernels only


def test_attention_quick_run_does_not_replace_the_full_table(monkeypatch, tmp_path) -> None:
    """`attention.py --quick` (one smaller batch per part) wrote the full run's file name, so a
    quick check on the day and commit of a full run replaced its table (gemm.py's quick run
    writes `gemm-quick`)."""
    import torch

    attention, common = _attention_on_cpu(monkeypatch, tmp_path)
    model_mask_methods = attention.model_mask_methods
    monkeypatch.setattr(attention, "model_mask_methods",
                        lambda s, *, device, dtype: model_mask_methods(40, device="cpu", dtype=torch.float32))
    assert attention.run_gpu(False, True, ("mask",)) == 0
    assert attention.run_gpu(True, True, ("mask",)) == 0
    names = sorted(path.name for path in tmp_path.iterdir())
    assert len(names) == 2 and [name.startswith("attention-mask-quick-") for name in names].count(True) == 1, names


def test_allow_recompiles_makes_reaching_the_limit_an_error() -> None:
    """Each method of the e2e prefill part recompiles the model's forward: past Dynamo's limit
    the rest ran eagerly, timed under their names. The benchmarks now raise the limit, and
    reaching it raises."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from common import allow_recompiles

    allow_recompiles(limit=2)
    torch._dynamo.reset()
    fn = torch.compile(lambda x, n: x * n, backend="eager", dynamic=False)
    fn(torch.ones(2), 1)
    fn(torch.ones(2), 2)
    with pytest.raises(Exception, match="(?i)recompile|cache.?size"):
        fn(torch.ones(2), 3)
