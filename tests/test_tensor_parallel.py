"""Tensor-parallel models through tileflow on gloo: a transformers Llama sharded with
`torch.distributed.tensor.parallel` (DTensor: a vocabulary-parallel embedding and row-parallel
projections that end in all-reduces, an LM head whose columns are gathered), compiled with
nano-batching and with CUDA graphs (a CPU stand-in), against the unsharded model in eager."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

# Nano-batch counts each rank compiles the sharded model with: the default run's spawn compiles
# k = 2 (and the nano-batched CUDA-graph run); k = 3, a middle nano-batch between two others, has
# a spawn of its own in the extended run (with the whole-step CUDA-graph run).
SPLITS = (2, 3)
LENGTHS = (5, 9, 16)
# Token counts of the CUDA-graph run: buckets 16 and 32, three calls padded.
GRAPH_LENGTHS = (5, 9, 16, 20)
# The CUDA-graph runs: a whole step captured per bucket, and nano-batches on streams captured as
# one graph per bucket (as NanoFlow runs a step).
GRAPH_RUNS = ("cuda_graphs", "nano_cuda_graphs")
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tensor_parallel_rank(rank: int, port: int, out_dir: str, arch: str, splits: tuple[int, ...],
                          graphs: tuple[str, ...]) -> None:
    """Shard a small `arch` model (a Llama, or a Qwen2 with its Q, K and V biases) over the ranks;
    compile it for each k in `splits` with the schedule run on simulated streams (a different
    random interleaving on each rank and call), then with CUDA graphs through a CPU stand-in for
    each of `graphs` (GRAPH_RUNS: whole, nano-batched); write what each run saw: the largest
    difference from the unsharded model, the compiles, the schedule and the cost profile."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import tileflow
    from graph_doubles import ReplayOnCpu
    from models import build
    from tileflow.padding_safety import padding_hazard
    from tileflow.passes.nanobatch import token_symbol
    from tileflow.pipeline import PassResult
    from tileflow.runtime import nanobatch as nanobatch_runtime
    from tileflow.runtime import streams
    from tileflow.runtime.streams import SimulatedStreams

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    reference = build(arch)
    sharded = build(arch)  # the same seed: the same weights
    plan = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Replicate())}
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
    hazards = []

    @tileflow.register_pass
    class PaddingProbe:
        """Records what `cuda_graphs` would decide for the graph: captured at token buckets
        (no hazard) or only at exact token counts (the hazard)."""

        name = "padding_probe"

        def run(self, gm, ctx):  # noqa: ANN001, ANN202 -- the pass interface
            hazards.append(padding_hazard(gm, token_symbol(gm)[0]))
            return PassResult()

    def compiled_diffs(options: dict, lengths: tuple[int, ...]) -> tuple[list[float], tileflow.Report]:
        """The sharded model compiled afresh with `options`: its largest difference from the
        unsharded model at each length, and its report."""
        torch._dynamo.reset()
        report = tileflow.Report()
        compiled = torch.compile(sharded, backend=tileflow.TileflowBackend(options, report=report), dynamic=True)
        diffs = []
        with torch.no_grad():
            for n in lengths:
                ids = torch.randint(0, reference.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
                want = reference(ids, use_cache=False).logits
                diffs.append((compiled(ids, use_cache=False).logits - want).abs().max().item())
        return diffs, report

    result = {}
    for k in splits:
        runners.clear()
        diffs, report = compiled_diffs({"passes": ["canonicalize", "attention", "gemm_padding", "padding_probe",
                                                   "nanobatch"], "nano_batches": k}, LENGTHS)
        runner = runners[-1]
        result[k] = {
            "diffs": diffs,
            "graphs": len(report.graphs),
            "schedule": runner.last_schedule.to_dict(),
            "network_profile": {p.name: p.bytes_per_token for p in runner.plan.profile if p.resource == "network"},
            "row_bytes": {"hidden": reference.config.hidden_size * 4, "vocab": reference.config.vocab_size * 4},
            "padding_hazard": hazards[-1],
        }

    # CUDA graphs at token buckets, through a CPU stand-in that really runs the padded step: every
    # rank replays a call at the same bucket, so the all-reduces pair up over the padded rows too.
    streams.GRAPH_FACTORY = ReplayOnCpu
    if "cuda_graphs" in graphs:
        ReplayOnCpu.captures = ReplayOnCpu.replays = 0
        diffs, report = compiled_diffs({"cuda_graphs": True, "max_tokens": 32}, GRAPH_LENGTHS)
        result["cuda_graphs"] = {"diffs": diffs, "note": report.graphs[0].extra.get("cuda_graphs"),
                                 "captures": ReplayOnCpu.captures, "replays": ReplayOnCpu.replays}
    if "nano_cuda_graphs" in graphs:
        # And both, as NanoFlow runs a step: nano-batches on streams, captured as one graph per bucket.
        ReplayOnCpu.captures = ReplayOnCpu.replays = 0
        diffs, report = compiled_diffs({"passes": ["canonicalize", "attention", "gemm_padding", "nanobatch"],
                                        "nano_batches": 2, "cuda_graphs": True, "max_tokens": 32}, GRAPH_LENGTHS)
        result["nano_cuda_graphs"] = {"diffs": diffs, "note": report.graphs[0].extra.get("cuda_graphs"),
                                      "captures": ReplayOnCpu.captures, "replays": ReplayOnCpu.replays}
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


def _run_ranks(out: Path, arch: str, splits: tuple[int, ...] = SPLITS,
               graphs: tuple[str, ...] = GRAPH_RUNS) -> list[dict]:
    """What each rank of one two-process run of `arch` wrote (`_tensor_parallel_rank`)."""
    import sys

    import torch.multiprocessing as mp

    tests = str(Path(__file__).resolve().parent)
    if tests not in sys.path:  # the spawned ranks import this module and `models` from here
        sys.path.insert(0, tests)
    mp.spawn(_tensor_parallel_rank, args=(_free_port(), str(out), arch, splits, graphs), nprocs=WORLD, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def tensor_parallel_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What each rank of one two-process run of the Llama wrote: k = SPLITS[0] and nano-batched
    CUDA graphs."""
    return _run_ranks(tmp_path_factory.mktemp("tensor_parallel"), "llama", SPLITS[:1], ("nano_cuda_graphs",))


@pytest.fixture(scope="module")
def tensor_parallel_runs_at_more_splits(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The same for the other k of SPLITS (the extended run's), and the whole-step CUDA graphs."""
    return _run_ranks(tmp_path_factory.mktemp("tensor_parallel_more"), "llama", SPLITS[1:], ("cuda_graphs",))


def _runs_at(request: pytest.FixtureRequest, k: int) -> list[dict]:
    """The ranks' runs that compiled the Llama with k nano-batches."""
    return request.getfixturevalue("tensor_parallel_runs" if k == SPLITS[0] else "tensor_parallel_runs_at_more_splits")


# k = 3 in the extended run: k = 2 takes the same paths (a schedule per nano-batch count, the
# pieces of every collective, each all-reduce beside the next nano-batch's GEMM).
K_PARAMS = [SPLITS[0], *(pytest.param(k, marks=pytest.mark.extended) for k in SPLITS[1:])]


@pytest.mark.extended  # the same paths as the Llama's, with sharded biases
def test_a_sharded_qwen2_matches_the_unsharded_model(tmp_path: Path) -> None:
    """Qwen2's Q, K and V biases are sharded with their columns: nano-batched (k = 2, 3), replayed
    padded at token buckets, and both, every rank equals the unsharded model."""
    for rank, run in enumerate(_run_ranks(tmp_path, "qwen2")):
        for k in SPLITS:
            assert all(d <= 1e-5 for d in run[str(k)]["diffs"]) and run[str(k)]["graphs"] == 1, (rank, k)
        for key in ("cuda_graphs", "nano_cuda_graphs"):
            assert all(d <= 1e-5 for d in run[key]["diffs"]) and run[key]["captures"] == 2, (rank, key)


@pytest.mark.parametrize("k", K_PARAMS)
def test_a_sharded_llama_nano_batched_matches_the_unsharded_model(request: pytest.FixtureRequest, k: int) -> None:
    """Every rank's logits equal the unsharded model's at every length, with one compiled graph."""
    for rank, run in enumerate(_runs_at(request, k)):
        got = run[str(k)]
        assert all(d <= 1e-5 for d in got["diffs"]), f"rank {rank}, k={k}: {got['diffs']}"
        assert got["graphs"] == 1


@pytest.mark.parametrize("k", K_PARAMS)
def test_each_nano_batch_reduces_on_the_network_stream_beside_the_next_ones_gemm(
    request: pytest.FixtureRequest, k: int
) -> None:
    """The collectives run once per nano-batch on the network stream (before, each ran once over
    the whole step, after every nano-batch's producer): the embedding's and the row-parallel
    projections' all-reduces, and the LM head's gather (along dim 0, the tokens along dim 1).
    Nano-batch j's all-reduce of a projection neither waits for nor holds up nano-batch
    j + 1's GEMM of that projection."""
    run = _runs_at(request, k)[0][str(k)]
    ops = {op["name"]: op for op in run["schedule"]["ops"]}
    network = {op["stream"] for op in ops.values() if op["resource"] == "network"}
    assert len(network) == 1
    collectives = {op["original"]: op["op"] for op in ops.values() if op["resource"] == "network"}
    assert sorted(collectives.values()) == ["all_gather_into_tensor"] + ["all_reduce"] * 5
    overlapped = 0
    for original in collectives:
        pieces = sorted((op for op in ops.values() if op["original"] == original), key=lambda op: op["rows"])
        assert len(pieces) == k and {op["stream"] for op in pieces} == network
        assert pieces[0]["rows"][0] == 0 and all(a["rows"][1] == b["rows"][0] for a, b in zip(pieces, pieces[1:]))
        gemm = _producing_gemm(ops, pieces[-1]["name"])
        if collectives[original] == "all_reduce" and gemm is not None:
            overlapped += 1
            for j in range(k - 1):
                # The GEMM this all-reduce sums, nano-batch j + 1's piece of it.
                gemm = _producing_gemm(ops, pieces[j + 1]["name"])
                assert not _reaches(ops, pieces[j]["name"], gemm) and not _reaches(ops, gemm, pieces[j]["name"])
    assert overlapped == 4  # o_proj and down_proj of both layers
    waits = [op for op in ops.values() if op["op"] == "wait_tensor"]
    assert len(waits) == len(collectives) * k


def _producing_gemm(ops: dict[str, dict], name: str) -> str | None:
    """The nearest `padded_gemm` nano-op `name` depends on, if any."""
    stack = list(ops[name]["deps"])
    while stack:
        dep = stack.pop(0)
        if ops[dep]["op"] == "padded_gemm":
            return dep
        stack.extend(ops[dep]["deps"])
    return None


def test_the_split_search_counts_collectives_as_ring_traffic(tensor_parallel_runs: list[dict]) -> None:
    """Each collective enters the cost model as a network op with a ring's bytes per token and
    rank: an all-reduce 2 (p - 1) / p of a hidden row (p = 2: one row), the LM head's gather
    (p - 1) / p of its output row (the vocabulary's logits: half of them)."""
    run = tensor_parallel_runs[0][str(SPLITS[0])]
    rows, profile = run["row_bytes"], run["network_profile"]
    reduces = [b for name, b in profile.items() if name.startswith("all_reduce")]
    gathers = [b for name, b in profile.items() if name.startswith("all_gather")]
    assert reduces == [2 * (WORLD - 1) / WORLD * rows["hidden"]] * 5
    assert gathers == [(WORLD - 1) / WORLD * rows["vocab"]]


# The whole step in the extended run (beside k = 3): the nano-batched step takes the same padding
# analysis of the all-reduces and the same capture per bucket (tests/test_streams.py captures a
# whole step), with the collectives split per nano-batch besides.
@pytest.mark.parametrize("key", ["nano_cuda_graphs", pytest.param("cuda_graphs", marks=pytest.mark.extended)])
def test_cuda_graphs_may_pad_a_sharded_step_to_its_bucket(request: pytest.FixtureRequest, key: str) -> None:
    """The padding analysis takes an all-reduce as elementwise (every rank replays one call at one
    bucket, so real rows reduce real rows): a sharded step is captured at token buckets, where
    the all-reduce was a hazard that kept it at exact token counts, and its padded replays (a CPU
    stand-in for CUDA graphs) equal the unsharded model on every rank, nano-batched or whole."""
    k = SPLITS[0] if key == "nano_cuda_graphs" else SPLITS[1]
    step = {"cuda_graphs": "whole step", "nano_cuda_graphs": "nano-batched step"}[key]
    for run in _runs_at(request, k):
        assert run[str(k)]["padding_hazard"] is None
        graphs = run[key]
        assert graphs["note"].startswith(f"{step}, token buckets [16, 32]"), graphs["note"]
        assert (graphs["captures"], graphs["replays"]) == (2, len(GRAPH_LENGTHS))  # every call replays
        assert all(d <= 1e-5 for d in graphs["diffs"]), graphs["diffs"]


def _reduced_rows(x, w):  # noqa: ANN001, ANN202
    c10d = torch.ops._c10d_functional
    return c10d.wait_tensor(c10d.all_reduce(torch.nn.functional.linear(x, w), "sum", "0")) + 1


def _reduced_mean_over_tokens(x, w):  # noqa: ANN001, ANN202
    c10d = torch.ops._c10d_functional
    return x + c10d.wait_tensor(c10d.all_reduce(x.mean(0, keepdim=True) @ w, "sum", "0"))


@pytest.mark.parametrize(("fn", "hazard"), [(_reduced_rows, None), (_reduced_mean_over_tokens, "mean: reads across")])
def test_an_all_reduce_keeps_rows_apart_and_passes_hazards_on(fn, hazard: str | None) -> None:  # noqa: ANN001
    """The padding analysis alone, on graphs traced with a symbolic token count: an all-reduce of
    row-wise values is no hazard; one of a mean over the tokens keeps the mean's."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from tileflow.padding_safety import padding_hazard

    gm = make_fx(fn, tracing_mode="symbolic")(torch.randn(5, 8), torch.randn(8, 8))
    token = next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"].shape[0].node.expr
    got = padding_hazard(gm, token)
    assert got is None if hazard is None else got.startswith(hazard), got


def _gathered_along_tokens(x):  # noqa: ANN001, ANN202 -- [T, N] gathered: each rank's padding between real rows
    c10d = torch.ops._c10d_functional
    return c10d.wait_tensor(c10d.all_gather_into_tensor(x * 2, 2, "0"))


def _scattered_blocks(x):  # noqa: ANN001, ANN202 -- [2T, N] (two blocks of T rows) cut among the ranks
    c10d = torch.ops._c10d_functional
    blocks = (x * 2).view(x.shape[0], 2, 4).permute(1, 0, 2).reshape(-1, 4)
    return c10d.wait_tensor(c10d.reduce_scatter_tensor(blocks, "sum", 2, "0"))


def _gathered_off_tokens(x):  # noqa: ANN001, ANN202 -- [1, T, N] gathered along dim 0: rows kept apart
    c10d = torch.ops._c10d_functional
    return c10d.wait_tensor(c10d.all_gather_into_tensor((x * 2).unsqueeze(0), 2, "0")).sum(0)


def _scattered_off_tokens(x):  # noqa: ANN001, ANN202
    c10d = torch.ops._c10d_functional
    return c10d.wait_tensor(c10d.reduce_scatter_tensor(torch.stack([x, x * 2]), "sum", 2, "0")).squeeze(0)


def _reduced_positions_read(x):  # noqa: ANN001, ANN202 -- 2t on two ranks: no longer a position
    c10d = torch.ops._c10d_functional
    pos = c10d.wait_tensor(c10d.all_reduce(torch.arange(x.shape[0]), "sum", "0"))
    table = torch.arange(320, dtype=torch.float32).view(40, 8)  # (not drawn: a random draw is a hazard of its own)
    return x + torch.nn.functional.embedding(pos, table)


@pytest.mark.parametrize(("fn", "hazard"), [
    (_gathered_along_tokens, "all_gather_into_tensor: gathers"), (_scattered_blocks, "reduce_scatter_tensor: gathers"),
    (_gathered_off_tokens, None), (_scattered_off_tokens, None), (_reduced_positions_read, "embedding"),
])
def test_gathers_scatters_and_reduced_positions_under_padding(fn, hazard: str | None) -> None:  # noqa: ANN001
    """A gather or reduce-scatter along a token dim (tokens at dim 0, or two blocks of tokens
    flattened there) is a hazard, one along another dim is not; an all-reduced `arange` is no
    position (2t on two ranks), so a table read at it is not bounded by the table's rows."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from tileflow.padding_safety import check_padding

    gm = make_fx(fn, tracing_mode="symbolic")(torch.randn(5, 8))
    token = next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"].shape[0].node.expr
    got = check_padding(gm, token).hazard
    assert got is None if hazard is None else (got or "").startswith(hazard), got


def test_collective_profiles_at_four_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ring bytes per token row at p = 4 (at p = 2, (p - 1) / p and 1 / p agree): an all-reduce
    2 (p - 1) / p of its row, a gather (p - 1) / p of its output row (p input rows), a
    reduce-scatter (p - 1) / p of its input row."""
    from torch.fx.experimental.proxy_tensor import make_fx

    import tileflow.passes.nanobatch as nanobatch
    from tileflow.graph_utils import meta_val, token_dim

    c10d = torch.ops._c10d_functional

    def fn(x):  # noqa: ANN001, ANN202 -- x: [1, T, 1] float32 (a unit feature dim stays static), 4-byte rows
        a = c10d.wait_tensor(c10d.all_reduce(x, "sum", "0"))
        g = c10d.wait_tensor(c10d.all_gather_into_tensor(a, 4, "0"))  # [4, T, 8]
        return c10d.wait_tensor(c10d.reduce_scatter_tensor(g * 2, "sum", 4, "0"))  # [1, T, 8]

    monkeypatch.setattr(nanobatch, "_group_size", lambda name: 4)
    gm = make_fx(fn, tracing_mode="symbolic")(torch.randn(1, 5, 1))
    token = next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"].shape[1].node.expr
    dims = {n.name: token_dim(meta_val(n), token) for n in gm.graph.nodes}
    got = {str(n.target).split(".")[1]: nanobatch._profile(n, dims).bytes_per_token
           for n in gm.graph.nodes if n.target in nanobatch._MOVING_COLLECTIVES}
    assert got == {"all_reduce": 2 * 3 / 4 * 4, "all_gather_into_tensor": 3 / 4 * 16, "reduce_scatter_tensor": 3 / 4 * 16}


def test_an_all_reduce_of_rows_in_expert_order_keeps_their_order() -> None:
    """Tensor-parallel experts: each rank's GEMM gives partial sums of the rows in expert order
    (the router replicated, so every rank sorts alike), all-reduced before the rows are put back:
    row-wise on routed rows, no hazard."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from test_padding_safety import EXPERT_W, _route
    from tileflow.padding_safety import check_padding

    c10d = torch.ops._c10d_functional

    def moe(x):  # noqa: ANN001, ANN202
        weights, _, order, rows = _route(x, 2)
        y = rows @ EXPERT_W[0]  # (a grouped GEMM's data-dependent offsets checks do not trace under make_fx)
        y = c10d.wait_tensor(c10d.all_reduce(y, "sum", "0")) * weights.unsqueeze(-1)
        return y[torch.argsort(order)].view(-1, 2, y.shape[-1]).sum(1)  # (no in-place inverse: make_fx keeps it)

    gm = make_fx(moe, tracing_mode="symbolic", _allow_non_fake_inputs=True)(torch.randn(5, EXPERT_W.shape[1]))
    token = next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"].shape[0].node.expr
    assert check_padding(gm, token).hazard is None


@pytest.mark.extended  # the spawned ranks above run the same sharding in the default run
def test_the_example_runs_under_torchrun() -> None:
    """`examples/tensor_parallel.py` (the README's command, two gloo ranks) matches the unsharded
    model on every rank and says where its collectives ran."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(root / "examples" / "tensor_parallel.py"), "--seq-lens", "5,9"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count(": match") == 2
    assert "5 all_reduce, 2 piece(s) each, on stream(s) [2]" in done.stdout


@pytest.mark.parametrize("value, message", [("1", "--seq-lens must be >= 2"), ("600", "--seq-lens must be <= 512")])
def test_the_example_refuses_lengths_before_any_rank_starts(value: str, message: str, usage_error,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`examples/tensor_parallel.py` reads its lengths through the demo's parser (its models'
    positions too): a change there must keep this example's call in step (the extended run's
    torchrun test caught a signature the example did not follow)."""
    import sys

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))  # as torchrun puts it
    monkeypatch.delitem(sys.modules, "demo", raising=False)
    assert message in usage_error("tensor_parallel", "--seq-lens", value)


# A stand-in for a compiler bug that makes every logit NaN: the compiled graph's float outputs
# times NaN (loaded by the ranks through PYTHONPATH as `sitecustomize`).
_NAN_OUTPUTS = '''
import torch
import tileflow

_compile = tileflow.TileflowBackend.__call__


def _nan_outputs(self, gm, example_inputs):
    fn = _compile(self, gm, example_inputs)

    def run(*args):
        out = fn(*args)
        return type(out)(o * float("nan") if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in out)

    return run


tileflow.TileflowBackend.__call__ = _nan_outputs
'''


@pytest.mark.extended  # a torchrun launch, as the test of the example above
def test_the_example_fails_on_nan_logits(tmp_path: Path) -> None:
    """`examples/tensor_parallel.py` exits non-zero on a mismatch: NaN logits are one (`max`
    kept the old worst over a NaN difference, and every rank printed `0.00e+00 ... match`)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "sitecustomize.py").write_text(_NAN_OUTPUTS)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(root / "examples" / "tensor_parallel.py"), "--seq-lens", "5,9"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert done.returncode != 0, done.stdout[-2000:]
    assert done.stdout.count("= nan over lengths [5, 9]: MISMATCH") == 2, done.stdout[-2000:]


@pytest.mark.parametrize("world", ["3", "4"])
def test_the_example_refuses_a_rank_count_that_does_not_divide_the_heads(world: str, usage_error,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Two key/value heads cannot be cut among 3 or 4 ranks: the example says so before any rank
    joins a group (it failed inside Dynamo's trace of the attention: "shape '[1, s81, -1, 32]'
    is invalid for input of size 16*s81")."""
    import sys

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
    monkeypatch.delitem(sys.modules, "demo", raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", world)
    assert f"{world} ranks cannot share the model's 2 key/value heads" in usage_error("tensor_parallel", "--seq-lens", "5")


def test_a_batch_gathered_or_scattered_along_its_sequences_stays_whole() -> None:
    """Split over sequences, a gather along dim 0 of `[B, S, N]` (as a column-parallel LM head's
    `all_gather_tensor(..., gather_dim=-1)` starts) holds `2*B` rows, which read as 2 rows per
    sequence: it was split, each nano-batch gathering its own sequences, and the pieces joined
    interleaved the ranks' (a 2-rank gloo run of such a step differed from eager by ~90). A
    gather along another dim, and an all-reduce, still split."""
    from torch.fx.experimental.proxy_tensor import make_fx

    import tileflow.passes.nanobatch as nanobatch
    from tileflow.graph_utils import meta_val

    c10d = torch.ops._c10d_functional

    def fn(x):  # noqa: ANN001, ANN202 -- x: [B, S, 4]
        g = c10d.wait_tensor(c10d.all_gather_into_tensor(x * 2, 2, "0"))  # [2B, S, 4]
        s = c10d.wait_tensor(c10d.reduce_scatter_tensor(torch.cat([x, x]) * 3, "sum", 2, "0"))  # [B, S, 4]
        t = c10d.wait_tensor(c10d.all_gather_into_tensor(x.transpose(0, 1).contiguous(), 2, "0"))  # [2S, B, 4]
        r = c10d.wait_tensor(c10d.all_reduce(x + 1, "sum", "0"))
        return g, s, t, r

    gm = make_fx(fn, tracing_mode="symbolic")(torch.randn(3, 5, 4))
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    batch = meta_val(x).shape[0].node.expr
    symbols = nanobatch._input_symbols(gm)
    rows = {n.name: nanobatch._sequence_rows_of(n, batch, symbols) for n in gm.graph.nodes}
    dims = {name: r[0] if r is not None else None for name, r in rows.items()}
    seqs = nanobatch._SequenceRows(frozenset())
    split = {n.name: nanobatch._is_token_wise(n, dims, seqs) for n in gm.graph.nodes if n.op == "call_function"}
    collectives = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in nanobatch._TOKENWISE_COLLECTIVES]
    got = [(str(n.target).split(".")[1], split[n.name]) for n in collectives]
    assert got == [("all_gather_into_tensor", False), ("wait_tensor", False),
                   ("reduce_scatter_tensor", False), ("wait_tensor", False),
                   ("all_gather_into_tensor", True), ("wait_tensor", True),
                   ("all_reduce", True), ("wait_tensor", True)], got
