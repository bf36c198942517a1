"""Disaggregated decoding across processes on gloo: `examples/disaggregate.py` under torchrun
against the single-process run, and what the other ranks do when an attention worker dies or
hangs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "disaggregate.py"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(EXAMPLE), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)


def test_bad_sizes_are_usage_errors_before_any_process_group(usage_error) -> None:
    """--batches 0 is refused up front (exit 2, naming the flag) by the argument parsing every
    rank runs before init_distributed. Unchecked, it 'passed' decoding 0 tokens in 0 batches."""
    assert "--batches must be >= 1, got 0" in usage_error("disaggregate", "--batches", "0")


def test_outside_torchrun_the_example_and_init_distributed_say_to_run_under_torchrun(monkeypatch, capsys) -> None:
    """Run as a plain script, the example failed in torch's process-group set-up ("environment
    variable RANK expected, but not set"), naming neither torchrun nor the other variables."""
    import runpy

    from tileflow.distributed import init_distributed

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    # The script run as `__main__` in this process (a fresh interpreter only adds torch's import).
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and "run it under torchrun: torchrun --nproc-per-node 3" in stderr, stderr[-3000:]
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(RuntimeError, match="RANK, MASTER_ADDR, MASTER_PORT are not set: run the script under torchrun"):
        init_distributed(5.0)


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan")])
def test_init_distributed_refuses_a_timeout_that_is_not_positive_before_the_process_group(monkeypatch, timeout) -> None:
    """A timeout of 0 or less reached torch's store first, which failed with "the client socket
    has timed out after 0ms while trying to connect" (after -1000ms for -1), naming neither the
    argument nor its value."""
    import torch.distributed as dist

    from tileflow.distributed import init_distributed

    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="timeout_s must be a positive number of seconds"):
        init_distributed(timeout)
    assert not dist.is_initialized()


@pytest.mark.parametrize("flag", ["--timeout", "--idle-timeout"])
def test_non_positive_timeouts_are_usage_errors(usage_error, flag: str) -> None:
    assert f"{flag} must be a positive number of seconds, got 0.0" in usage_error("disaggregate", flag, "0")


@pytest.mark.parametrize("args, message", [
    # A traceback from rank 0's model worker, after the model was built and traced, naming no flag.
    (("--arch", "llama4", "--block-size", "8"),
     "--block-size must divide Llama 4's attention chunk of 4 positions (1, 2 or 4), got 8"),
    # Silently ignored: a model whose layers all slide (or none does) has one KV group.
    (("--sliding-blocks", "4"), "--sliding-blocks applies to --arch gemma2 or gpt_oss only"),
    (("--arch", "mistral", "--sliding-blocks", "4"), "--sliding-blocks applies to --arch gemma2 or gpt_oss only"),
    # A ValueError traceback from ModelWorker on rank 0.
    (("--arch", "gemma2", "--sliding-blocks", "0"), "--sliding-blocks must be >= 1, got 0"),
])
def test_block_flags_the_model_cannot_take_are_usage_errors(usage_error, args: tuple[str, ...], message: str) -> None:
    assert message in usage_error("disaggregate", *args)


@pytest.mark.extended  # the rotation test below checks the same logits in its harder layout
def test_logits_match_single_process() -> None:
    # One KV head per query head, one attention worker. Query heads split over two workers in
    # groups that share a KV head (the case with the most to get wrong): the rotation test below.
    run = _torchrun(2, "--check", "--gqa", "1", "--steps", "10")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "check passed: 11 steps" in run.stdout
    assert "step 3: " in run.stdout  # the step where a sequence joins with its prompt


@pytest.mark.parametrize("arch", ["gpt_oss", *(pytest.param(arch, marks=pytest.mark.extended)
                                               for arch in ("mistral", "llama4"))])
def test_sliding_window_softcap_and_sink_layers_match_single_process(arch: str) -> None:
    # gpt-oss: the attention workers learn each layer's window and sinks (their shard's query
    # heads' share) from the cuts; Gemma-2's windows and soft-cap, the same way, in the test
    # below (one torchrun launch fewer: each costs ~25 s of CI). Mistral: every layer windowed, so
    # the workers give blocks behind the window back mid-sequence, and the sequence joining later
    # reuses them. Llama 4: chunks of 4 positions on every other layer, crossed by prompts and
    # decode steps.
    run = _torchrun(3, "--check", "--arch", arch, "--steps", "6")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "check passed: 7 steps" in run.stdout


@pytest.mark.extended  # windows across processes in the default run: gpt-oss above; sliding_blocks in one: test_serving
def test_mixed_window_layers_in_their_own_kv_group_match_single_process() -> None:
    # Gemma-2 (sliding windows on every other layer, soft-capped scores) with `sliding_blocks`,
    # checked against the single-process run: the attention workers keep its sliding layers' blocks apart
    # (12 per worker, given back behind the window as the sequences decode) and its full layers
    # in 20 (the 16 of `num_blocks` and the 4 the sliding layers leave), where one pool of 16
    # blocks in every layer runs out.
    one_pool = _torchrun(3, "--check", "--arch", "gemma2", "--steps", "6", "--num-blocks", "16")
    assert one_pool.returncode != 0 and "KV cache full" in one_pool.stdout + one_pool.stderr
    run = _torchrun(3, "--check", "--arch", "gemma2", "--steps", "6", "--num-blocks", "16", "--sliding-blocks", "12")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "check passed: 7 steps" in run.stdout


def test_rotation_over_two_model_replicas_matches() -> None:
    # Lamina's rotation: 3 batches over 2 model replicas; 2 attention workers, each with one KV
    # head and the 4 query heads that share it (one launch for both: each costs ~25 s of CI).
    run = _torchrun(4, "--check", "--model-workers", "2", "--batches", "3", "--steps", "6")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "check passed: 7 steps" in run.stdout and "in 3 batches" in run.stdout
    assert "step 3: " in run.stdout  # the step where a sequence joins with its prompt


@pytest.mark.extended
def test_rotation_carries_complex_rope_factors_between_replicas() -> None:
    # Llama 4 hands its RoPE factors (complex64, from torch.polar) from stage 0 to every RoPE
    # layer: over 3 replicas and 4 layers they cross ranks, which the transport refused (the
    # transport alone, in the default run: test_the_transport_carries_complex_bool_and_number_values).
    run = _torchrun(4, "--check", "--arch", "llama4", "--model-workers", "3", "--batches", "3", "--layers", "4",
                    "--steps", "4")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "check passed: 5 steps" in run.stdout


def test_check_reports_a_mismatch() -> None:
    # A tolerance no float run meets: the comparison must fire and the run exit non-zero (one
    # layer: the comparison, not the depth, is what this checks).
    run = _torchrun(2, "--check", "--tolerance", "0", "--steps", "2", "--layers", "1")
    assert run.returncode != 0
    assert "MISMATCH step 0" in run.stdout


# A stand-in for a bug that makes every logit NaN: the leader's step outputs times NaN (loaded
# by the ranks through PYTHONPATH as `sitecustomize`).
_NAN_OUTPUTS = """
import tileflow.distributed as distributed

_step = distributed.ModelWorker.step


def _nan_step(self, batches):
    return [tuple(o * float("nan") for o in outputs) for outputs in _step(self, batches)]


distributed.ModelWorker.step = _nan_step
"""


@pytest.mark.extended  # a torchrun launch, as the mismatch test above
def test_check_reports_nan_logits_as_a_mismatch(tmp_path: Path) -> None:
    """NaN logits passed `--check`: `diff > tolerance` is False for a NaN difference."""
    (tmp_path / "sitecustomize.py").write_text(_NAN_OUTPUTS)
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(EXAMPLE),
           "--check", "--steps", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert run.returncode != 0 and "MISMATCH step 0" in run.stdout and "nan" in run.stdout, run.stdout[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_ranks(tmp_path: Path, timeout_s: float, *extra: str) -> list[subprocess.Popen]:
    """Start 3 ranks directly (torchrun would kill the survivors itself, hiding their behaviour),
    over a one-layer model: how a failure travels does not depend on the depth."""
    port = _free_port()
    procs = []
    for rank in range(3):
        env = _env() | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "3",
                        "RANK": str(rank), "LOCAL_RANK": str(rank)}
        log = open(tmp_path / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, str(EXAMPLE), "--steps", "400", "--step-delay", "0.05", "--timeout", str(timeout_s),
             "--layers", "1", "--pid-dir", str(tmp_path), *extra],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        ))
    return procs


def _wait_for_steps(tmp_path: Path, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 120
    while "step 3:" not in (tmp_path / "rank0.log").read_text():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), (tmp_path / "rank0.log").read_text()
        time.sleep(0.2)


@pytest.mark.parametrize("failure", [pytest.param("killed", marks=pytest.mark.extended), "stuck"])
def test_failed_attention_worker_stops_every_rank_with_a_clear_error(tmp_path: Path, failure: str) -> None:
    timeout_s = 6.0
    procs = _launch_ranks(tmp_path, timeout_s)
    try:
        _wait_for_steps(tmp_path, procs)
        victim = procs[2]
        victim.send_signal(signal.SIGKILL if failure == "killed" else signal.SIGSTOP)
        start = time.monotonic()
        codes = [p.wait(timeout=timeout_s + 30) for p in procs[:2]]
        elapsed = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert codes == [2, 2], logs
    # Within the configured receive timeout (plus process start-up slack for the abort to land).
    assert elapsed < timeout_s + 5, elapsed
    assert "[rank 0 model] error: rank 0:" in logs[0] and "rank 2" in logs[0]
    # The other attention worker hears rank 0's abort, or its own wait on rank 0 ends first (the
    # same timeout runs out, or rank 0 has already exited).
    assert "[rank 1 attention] error: rank 1: " in logs[1]
    assert "rank 0 reported a failure" in logs[1] or "from rank 0 failed (limit" in logs[1]
    assert "Traceback" not in logs[0] + logs[1]


def test_attention_worker_error_reaches_the_leader_with_its_reason(tmp_path: Path) -> None:
    # Six 4-token KV blocks per worker cannot hold the prompts: the attention workers fail, and
    # rank 0 reports their reason instead of timing out. Told apart by rank 0's message, not by
    # the wall clock (a loaded runner can take longer than any bound to start the ranks): a wait
    # that timed out or lost its peer says "failed (limit 120s)", a reported failure names rank 1
    # and its reason.
    procs = _launch_ranks(tmp_path, 120.0, "--num-blocks", "6")
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(3)]
    assert codes[0] == 2 and codes[1] != 0 and codes[2] != 0, logs
    assert "failed (limit" not in logs[0], "rank 0's wait failed instead of hearing the reported failure"
    assert "[rank 0 model] error: rank 0: rank 1 reported a failure" in logs[0]
    assert "KV cache full" in logs[0]


def _exchange(rank: int, port: int, out_dir: str) -> None:
    """Rank 0 sends one value of each kind the transport carries; rank 1 writes what it got."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from tileflow.distributed.transport import Transport

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    t = Transport(30.0)
    values = [torch.polar(torch.ones(2, 3), torch.randn(2, 3, generator=torch.Generator().manual_seed(0))),
              torch.tensor([True, False, True]), 2.5, 7, np.int64(9), True, torch.arange(6).view(2, 3).t()]
    if rank == 0:
        for v in values:
            t.send(v, 1)
        t.flush()
    else:
        got = [t.recv(0, f"value {i}") for i in range(len(values))]
        torch.save({"got": got, "want": values}, os.path.join(out_dir, "exchange.pt"))
    dist.destroy_process_group()


def test_the_transport_carries_complex_bool_and_number_values(tmp_path: Path) -> None:
    """Complex values (Llama-4's RoPE factors) raised TypeError, bools too, and a float crossing
    ranks came back truncated to an int."""
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_exchange, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    data = torch.load(tmp_path / "exchange.pt", weights_only=False)
    for got, want in zip(data["got"], data["want"]):
        if isinstance(want, torch.Tensor):
            assert got.dtype == want.dtype and torch.equal(got, want)
        else:
            assert got == want and type(got) is (float if isinstance(want, float) else int)
