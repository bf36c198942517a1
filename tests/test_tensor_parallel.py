"""Tensor-parallel models through tileflow on gloo: a transformers Llama sharded with
`torch.distributed.tensor.parallel` (DTensor; its row-parallel projections end in all-reduces),
compiled with nano-batching, against the unsharded model in eager."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

# Nano-batch counts each rank compiles the sharded model with (one spawn runs them all).
SPLITS = (2, 3)
LENGTHS = (5, 9, 16)
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tensor_parallel_rank(rank: int, port: int, out_dir: str) -> None:
    """Shard a small Llama over the ranks, compile it for each k in SPLITS with the schedule run on
    simulated streams (a different random interleaving on each rank and call), and write what
    it saw: the largest difference from the unsharded model, the compiles, and the schedule."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import tileflow
    from models import build
    from tileflow.runtime import nanobatch as nanobatch_runtime
    from tileflow.runtime.streams import SimulatedStreams

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    reference = build("llama")
    sharded = build("llama")  # the same seed: the same weights
    plan = {}
    for i in range(reference.config.num_hidden_layers):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"model.layers.{i}.{name}"] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{name}"] = RowwiseParallel()
    parallelize_module(sharded, mesh, plan)

    # Each rank interleaves its streams in its own random order: the collectives still pair up,
    # since they all run in order on the one network stream.
    runners, seeds = [], iter(range(1000 * rank, 1000 * (rank + 1)))

    def executor_for(self, device):  # noqa: ANN001, ANN202 -- NanoBatchRunner._executor_for's signature
        runners.append(self)
        return SimulatedStreams(seed=next(seeds))

    nanobatch_runtime.NanoBatchRunner._executor_for = executor_for
    result = {}
    for k in SPLITS:
        torch._dynamo.reset()
        runners.clear()
        report = tileflow.Report()
        options = {"passes": ["canonicalize", "attention", "gemm_padding", "nanobatch"], "nano_batches": k}
        compiled = torch.compile(sharded, backend=tileflow.TileflowBackend(options, report=report), dynamic=True)
        diffs = []
        with torch.no_grad():
            for n in LENGTHS:
                ids = torch.randint(0, reference.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
                want = reference(ids, use_cache=False).logits
                diffs.append((compiled(ids, use_cache=False).logits - want).abs().max().item())
        runner = runners[-1]
        result[k] = {
            "diffs": diffs,
            "graphs": len(report.graphs),
            "schedule": runner.last_schedule.to_dict(),
            "network_profile": [(p.name, p.bytes_per_token) for p in runner.plan.profile if p.resource == "network"],
            "hidden_bytes": reference.config.hidden_size * 4,
        }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def _reaches(ops: dict[str, dict], start: str, goal: str) -> bool:
    """Whether `goal` depends on `start` through the schedule's dependencies."""
    seen, stack = set(), [goal]
    while stack:
        name = stack.pop()
        if name == start:
            return True
        if name not in seen:
            seen.add(name)
            stack.extend(ops[name]["deps"])
    return False


@pytest.fixture(scope="module")
def tensor_parallel_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What each rank of one two-process run wrote."""
    import sys

    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("tensor_parallel")
    tests = str(Path(__file__).resolve().parent)
    if tests not in sys.path:  # the spawned ranks import this module and `models` from here
        sys.path.insert(0, tests)
    mp.spawn(_tensor_parallel_rank, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("k", SPLITS)
def test_a_sharded_llama_nano_batched_matches_the_unsharded_model(tensor_parallel_runs: list[dict], k: int) -> None:
    """Every rank's logits equal the unsharded model's at every length, with one compiled graph."""
    for rank, run in enumerate(tensor_parallel_runs):
        got = run[str(k)]
        assert max(got["diffs"]) <= 1e-5, f"rank {rank}, k={k}: {got['diffs']}"
        assert got["graphs"] == 1


@pytest.mark.parametrize("k", SPLITS)
def test_each_nano_batch_reduces_on_the_network_stream_beside_the_next_ones_gemm(
    tensor_parallel_runs: list[dict], k: int
) -> None:
    """The row-parallel projections' all-reduces run once per nano-batch on the network stream
    (before, each ran once over the whole step, after every nano-batch's GEMM), and nano-batch
    j's all-reduce neither waits for nor holds up nano-batch j + 1's GEMM that feeds the next."""
    run = tensor_parallel_runs[0][str(k)]
    ops = {op["name"]: op for op in run["schedule"]["ops"]}
    reduces = sorted({op["original"] for op in ops.values() if op["op"] == "all_reduce"})
    assert len(reduces) == 4  # o_proj and down_proj of both layers
    network = {op["stream"] for op in ops.values() if op["resource"] == "network"}
    assert len(network) == 1
    for original in reduces:
        pieces = sorted((op for op in ops.values() if op["original"] == original), key=lambda op: op["rows"])
        assert len(pieces) == k and {op["stream"] for op in pieces} == network
        assert pieces[0]["rows"][0] == 0 and all(a["rows"][1] == b["rows"][0] for a, b in zip(pieces, pieces[1:]))
        for j in range(k - 1):
            # The GEMM this all-reduce sums, nano-batch j + 1's piece of it.
            gemm = _producing_gemm(ops, pieces[j + 1]["name"])
            assert not _reaches(ops, pieces[j]["name"], gemm) and not _reaches(ops, gemm, pieces[j]["name"])
    waits = [op for op in ops.values() if op["op"] == "wait_tensor"]
    assert len(waits) == 4 * k


def _producing_gemm(ops: dict[str, dict], name: str) -> str:
    """The nearest `padded_gemm` nano-op `name` depends on."""
    stack = list(ops[name]["deps"])
    while stack:
        dep = stack.pop(0)
        if ops[dep]["op"] == "padded_gemm":
            return dep
        stack.extend(ops[dep]["deps"])
    raise AssertionError(f"no padded_gemm before {name}")


def test_the_split_search_counts_each_all_reduce_as_ring_traffic(tensor_parallel_runs: list[dict]) -> None:
    """Each all-reduce enters the cost model as a network op moving 2 (p - 1) / p of a hidden row
    per token (a ring over p = 2 ranks: one row)."""
    run = tensor_parallel_runs[0][str(SPLITS[0])]
    assert len(run["network_profile"]) == 4
    assert all(b == 2 * (WORLD - 1) / WORLD * run["hidden_bytes"] for _, b in run["network_profile"])
