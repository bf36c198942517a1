"""Tensor parallelism through tileflow: a model sharded over the ranks, compiled and nano-batched.

Every rank builds the same small random-weight model, shards it with
`torch.distributed.tensor.parallel` (column-parallel Q/K/V and gate/up projections, row-parallel
O and down projections, which end in all-reduces, a vocabulary-parallel embedding and an LM head
whose columns are gathered), compiles it with `backend="tileflow"` and nano-batching, and checks
its logits against the unsharded model at several lengths. Rank 0 prints where the collectives
ran: one all-reduce or gather per nano-batch on the network stream, beside the next nano-batch's
GEMMs. Exits non-zero on a mismatch.

    torchrun --standalone --nproc-per-node=2 examples/tensor_parallel.py \\
        [--model llama|qwen2|mistral] [--nano-batches 2] [--seq-lens 5,16,33]

NCCL with one GPU per rank where CUDA is available, gloo on the CPU otherwise.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import sys

import torch
import torch.distributed as dist

import tileflow
from demo import POSITIONS, build_model, parse_seq_lens  # (this folder: torchrun puts the script's folder on the path)

ARCHITECTURES = ("llama", "qwen2", "mistral")


def shard(model: torch.nn.Module, mesh) -> None:  # noqa: ANN001 -- a DeviceMesh
    """Shard `model` over `mesh` in place, Megatron-style."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Replicate())}
    for i in range(len(model.model.layers)):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"model.layers.{i}.{name}"] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{name}"] = RowwiseParallel()
    parallelize_module(model, mesh, plan)


def collectives_summary(report: tileflow.Report) -> str:
    """Where the first graph's schedule runs its collectives: per op, pieces and streams."""
    schedule = report.graphs[0].extra.get("nano_batch", {}).get("schedule")
    if schedule is None:
        return "no nano-batch schedule (the step was not split)"
    originals: dict[str, set[str]] = collections.defaultdict(set)
    streams: dict[str, set[int]] = collections.defaultdict(set)
    pieces: collections.Counter = collections.Counter()
    for op in schedule["ops"]:
        if op["resource"] == "network":
            originals[op["op"]].add(op["original"])
            streams[op["op"]].add(op["stream"])
            pieces[op["op"]] += 1
    parts = [f"{len(originals[kind])} {kind}, {pieces[kind] // len(originals[kind])} piece(s) each, on stream(s) "
             f"{sorted(streams[kind])}" for kind in sorted(originals)]
    return f"{schedule['num_tokens']} tokens: " + "; ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama", choices=ARCHITECTURES)
    parser.add_argument("--nano-batches", type=int, default=2, help="nano-batches per step (1: no split)")
    parser.add_argument("--seq-lens", default="5,16,33", help="comma-separated sequence lengths")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    seq_lens = parse_seq_lens(parser, args.seq_lens, 2, POSITIONS)  # (Dynamo specializes a length of 1)
    if args.nano_batches < 1:
        parser.error(f"--nano-batches must be >= 1, got {args.nano_batches}")
    if "RANK" not in os.environ:
        parser.error("run it under torchrun: torchrun --standalone --nproc-per-node=2 examples/tensor_parallel.py")
    from torch.distributed.device_mesh import init_device_mesh

    cuda = torch.cuda.is_available()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.manual_seed(0)
    reference = build_model(args.model)
    # The plan cuts the heads, the MLP's width and the vocabulary among the ranks: a count they
    # do not divide failed deep in the traced attention (a view of a rank's K of half a head).
    config = reference.config
    sizes = {"key/value heads": config.num_key_value_heads, "attention heads": config.num_attention_heads,
             "MLP width": config.intermediate_size, "vocabulary": config.vocab_size}
    uneven = [f"{n} {name}" for name, n in sizes.items() if n % world]
    if uneven:
        parser.error(f"{world} ranks cannot share the model's {', '.join(uneven)} evenly; run a number of ranks "
                     f"that divides {math.gcd(*sizes.values())}")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        mesh = init_device_mesh(device.type, (world,))
        reference = reference.to(device)
        sharded = build_model(args.model)
        sharded.load_state_dict(reference.state_dict())
        shard(sharded.to(device), mesh)
        report = tileflow.Report()
        options = {"passes": ["canonicalize", "attention", "gemm_padding", "nanobatch"], "nano_batches": args.nano_batches}
        compiled = torch.compile(sharded, backend=tileflow.TileflowBackend(options, report=report), dynamic=True)
        diffs = []
        with torch.no_grad():
            for n in seq_lens:
                ids = torch.randint(0, reference.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
                ids = ids.to(device)
                diff = (compiled(ids, use_cache=False).logits - reference(ids, use_cache=False).logits).abs().max().item()
                diffs.append(diff)
        if rank == 0:
            print(f"{args.model} over {world} ranks ({'nccl' if cuda else 'gloo'}), nano_batches={args.nano_batches}: "
                  f"{len(report.graphs)} graph(s)")
            print("collectives:", collectives_summary(report))
        # A NaN difference (NaN logits) fails, as NaN <= tolerance is False, and is what is
        # printed (a plain `max` keeps the earlier worst over a NaN).
        ok = all(d <= args.tolerance for d in diffs)
        worst = max(diffs, key=lambda d: math.inf if math.isnan(d) else d)
        print(f"rank {rank}: max |logits - unsharded| = {worst:.2e} over lengths {seq_lens}: "
              f"{'match' if ok else 'MISMATCH'}", flush=True)
        return 0 if ok else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
