"""Test setup: Triton kernels run in the CPU interpreter unless a GPU is present; Dynamo is reset
between tests so each test's compiles are its own."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Must happen before anything imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER") and not torch.cuda.is_available():
    # Each xdist worker gets a core: torch's own thread pool per worker (and Inductor's pool of
    # compile processes) would oversubscribe the CPU, and two long files side by side then ran
    # about twice as long as either alone.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    share = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(share)
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    # The same share for the processes tests start (benchmarks' smoke runs, ranks, fresh
    # interpreters): with torch's default pool they spun on cores the other worker held (a bench
    # smoke run took 43 s beside a busy core with two threads, 36 s with one).
    os.environ.setdefault("OMP_NUM_THREADS", str(share))

from pathlib import Path  # noqa: E402
from typing import Callable, Iterator  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def private_triton_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Keep generated Triton sources out of ~/.cache and start from an empty in-process memo."""
    from tileflow.backends.triton.build import clear_memo

    root = tmp_path_factory.mktemp("tileflow_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TILEFLOW_CACHE_DIR", str(root))
        clear_memo()
        yield root
        clear_memo()


@pytest.fixture
def usage_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., str]:
    """`usage_error(example, *args)`: run `examples/<example>.py`'s argument handling in this
    process (its `main`, or `parse_args` where it has one) with `args` on the command line, and
    return what it wrote to stderr; it must stop with argparse's usage error (exit 2). In
    process: a subprocess per case spent seconds importing torch to test a few lines."""
    import importlib.util
    import sys

    def run(example: str, *args: str) -> str:
        path = Path(__file__).resolve().parents[1] / "examples" / f"{example}.py"
        spec = importlib.util.spec_from_file_location(f"_example_{example}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        monkeypatch.setattr(sys, "argv", [path.name, *args])
        with pytest.raises(SystemExit) as stop:
            getattr(module, "parse_args", module.main)()
        assert stop.value.code == 2
        return capsys.readouterr().err

    return run


# Seconds each test file takes on 2 CPU cores in the default run (`-m "not extended"`), for the
# files over 20 s: session 59's `--durations=0` run (Triton's cache empty as on CI; helpers ran
# beside it, so its seconds were taken as 1.4x CI's), each file's less the share session 59's
# trim took off it (each helper's before/after CPU seconds of the file), and session 60's of five
# files (bench smoke, tensor parallel, streams, export, Triton attention) alike. Only the order
# matters: with `--dist loadfile --no-loadscope-reorder` each xdist worker takes whole files in
# collection order, and longest first keeps one worker from running a long file alone at the end
# (xdist's own reorder counts tests, and most of the long files have few).
_FILE_SECONDS = {
    "test_attention.py": 322, "test_nanobatch.py": 196, "test_mask_rule.py": 168, "test_padding_safety.py": 158,
    "test_export.py": 124, "test_model_zoo.py": 126, "test_bench_smoke.py": 66, "test_disaggregate.py": 105,
    "test_distributed.py": 96, "test_grouped_gemm.py": 93, "test_triton_gemm.py": 91, "test_triton_attention.py": 75,
    "test_serving.py": 82, "test_sm90_compile.py": 80, "test_gemm_padding.py": 68, "test_models.py": 64,
    "test_ascend_gemm.py": 63, "test_ascend_attention.py": 61, "test_backend.py": 60, "test_streams.py": 57,
    "test_tensor_parallel.py": 38, "test_viz.py": 46, "test_attention_flat_scores.py": 38,
    "test_ascend_cpu_double.py": 34, "test_mask_rule_triangles.py": 23, "test_gemm.py": 22,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the files longest first (a stable sort: tests keep their order within a file)."""
    items.sort(key=lambda item: -_FILE_SECONDS.get(item.path.name, 0))


@pytest.fixture(scope="module")
def llama_program():
    """A tiny Llama (vocabulary 64, two layers, random weights) as a stage program for the
    serving engine (steps of up to 256 tokens), and its eager reference (SDPA attention)."""
    import copy

    import transformers

    from tileflow.distributed import CausalLMStep, build_stage_program

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    reference = copy.deepcopy(model)
    reference.config._attn_implementation = "sdpa"
    example = (torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None])
    return build_stage_program(CausalLMStep(model), example, max_tokens=256), reference
