"""End-to-end step throughput: eager vs Inductor vs tileflow, without and with nano-batching.

On a GPU: a Llama-3-8B-shaped model (hidden 4096, 32 query / 8 KV heads, FFN 14336, vocabulary
128256) with random bf16 weights and `--layers` layers (default 4, so it fits beside the
baselines), one forward step of T tokens for T in 256..4096, in one run:

- eager PyTorch, `torch.compile` Inductor (dynamic shapes),
- tileflow (`backend="tileflow"`, Triton kernels) without nano-batching,
- tileflow with nano-batching (`nano_batches="auto"`: the split search, streams, CUDA graphs).

Each method is checked against eager (bf16 logits, relative error) before it is timed; times are
medians over CUDA events. Tokens/s is compared with the optimal-throughput bound NanoFlow uses,
measured peak FLOP/s / (2 x parameters) tokens/s (attention FLOPs ignored, as there; parameters
that multiply, so not the input embedding), and the
table is written under bench/results/ with the device, date, versions and command.

Not covered yet: mixed prefill/decode steps over a paged KV cache and the NanoFlow-like request
trace (input/output 512/512 and 1024/512) through `tileflow.serving`; the steps here are
prefill-shaped.

On a CPU-only machine it says so and runs a smoke check: a tiny Llama through both tileflow paths
(the nano-batched one on simulated streams), compared with eager.

    python bench/e2e.py [--layers N] [--tokens 256,1024,4096] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TOKENS = [256, 512, 1024, 2048, 4096]
PASSES_NANO = ("canonicalize", "attention", "gemm_padding", "nanobatch")


def _llama(layers: int, *, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=8192,
    )
    return LlamaForCausalLM(config).eval()


def smoke() -> int:
    """CPU: both tileflow paths of the benchmark on a tiny Llama, against eager."""
    import torch

    import tileflow
    import tileflow.runtime.nanobatch as nanobatch_runtime
    from common import rel_err
    from tileflow.runtime.streams import SimulatedStreams

    print("bench/e2e.py: no CUDA GPU here; timings need one. Running the CPU smoke check.")
    torch.manual_seed(0)
    model = _llama(2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=256)
    # On the CPU the nano-batched path runs its streams simulated (random valid interleavings).
    nanobatch_runtime.NanoBatchRunner._executor_for = lambda self, device: SimulatedStreams(seed=1)
    methods = {
        "tileflow": torch.compile(model, backend="tileflow", dynamic=True),
        "tileflow+nano": torch.compile(model, backend=tileflow.TileflowBackend({"passes": PASSES_NANO, "nano_batches": 2}),
                                       dynamic=True),
    }
    for tokens in (16, 40):
        ids = torch.randint(0, 256, (1, tokens))
        with torch.no_grad():
            want = model(ids, use_cache=False).logits
            for name, fn in methods.items():
                err = rel_err(fn(ids, use_cache=False).logits, want)
                print(f"  {name:14s} T={tokens:3d}: rel err {err:.1e}")
                if not err < 1e-5:
                    print(f"FAIL: {name} disagrees with eager", file=sys.stderr)
                    return 1
    print("smoke check passed")
    return 0


def run_gpu(layers: int, tokens: list[int], write: bool) -> int:
    import torch

    import tileflow
    from common import environment, markdown_table, measured_matmul_tflops, median_ms, rel_err, write_results

    torch.manual_seed(0)
    env = environment()
    peak = measured_matmul_tflops(torch.bfloat16)
    model = _llama(layers, hidden=4096, heads=32, kv_heads=8, ffn=14336, vocab=128256).to("cuda", torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    # Only weights that multiply do FLOPs: the input embedding is a lookup (with a 128k vocabulary
    # it is a third of this small model's parameters).
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    bound = peak * 1e12 / (2 * matmul_params)  # tokens/s at the compute ceiling
    print(f"{env['device']}: {layers} layers, {params / 1e9:.2f} B parameters ({matmul_params / 1e9:.2f} B in matmuls); "
          f"bf16 ceiling {peak:.0f} TFLOP/s -> optimal {bound:,.0f} tokens/s")
    methods = {
        "eager": model,
        "Inductor": torch.compile(model, dynamic=True),
        "tileflow": torch.compile(model, backend="tileflow", dynamic=True),
        "tileflow+nano": torch.compile(
            model, backend=tileflow.TileflowBackend({"passes": PASSES_NANO, "nano_batches": "auto"}), dynamic=True
        ),
    }
    rows, failures = [], []
    for t in tokens:
        inputs = [torch.randint(0, 128256, (1, t), device="cuda") for _ in range(2)]
        with torch.no_grad():
            want = model(inputs[0], use_cache=False).logits.float()
            rate: dict[str, float | None] = {}
            for name, fn in methods.items():
                # A failing method is reported in its cell and the run goes on (exit status 1).
                rate[name] = None
                try:
                    err = rel_err(fn(inputs[0], use_cache=False).logits.float(), want)
                    if not err < 3e-2:
                        raise AssertionError(f"relative error {err:.2e} against eager")
                    ms = median_ms(lambda i, fn=fn: fn(inputs[i], use_cache=False), sets=len(inputs), rep_ms=300)
                    rate[name] = t / ms * 1e3
                except Exception as exc:  # noqa: BLE001 -- reported, and the exit status is 1
                    failures.append(f"{name} at T={t}: {type(exc).__name__}: {exc}")
                    print(f"FAIL: {failures[-1]}", file=sys.stderr, flush=True)
                    traceback.print_exc()
        rows.append([t] + ["FAIL" if rate[n] is None else f"{rate[n]:,.0f}" for n in methods]
                    + [_ratio(rate["tileflow"], rate["Inductor"]), _ratio(rate["tileflow+nano"], rate["tileflow"]),
                       "FAIL" if rate["tileflow+nano"] is None else f"{100 * rate['tileflow+nano'] / bound:.0f}%"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    headers = ["tokens"] + [f"{n} tok/s" for n in methods] + ["tileflow / Inductor", "nano / tileflow", "nano % of bound"]
    summary = [
        f"- model: Llama-3-8B-shaped, {layers} layers, {params / 1e9:.2f} B parameters, random bf16 weights",
        f"- optimal throughput bound: measured {peak:.0f} TFLOP/s / (2 x {matmul_params / 1e9:.2f} B matmul parameters)"
        f" = {bound:,.0f} tokens/s (the input embedding is a lookup: no FLOPs)",
        "- steps are prefill-shaped forward passes of T tokens (no KV cache); times are medians over CUDA events",
    ] + [f"- FAILED: {failure}" for failure in failures]
    body = markdown_table(headers, rows) + "\n\n" + "\n".join(summary)
    print("\n" + "\n".join(summary))
    if write:
        print(f"wrote {write_results('e2e', 'End-to-end step throughput (bf16)', env, body)}")
    return 1 if failures else 0


def _ratio(a: float | None, b: float | None) -> str:
    """`a / b` as a table cell; FAIL when either method failed."""
    return "FAIL" if not (a and b) else f"{a / b:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the 8B-shaped model")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated step sizes")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        return smoke()
    return run_gpu(args.layers, [int(t) for t in args.tokens.split(",")], not args.no_write)


if __name__ == "__main__":
    sys.exit(main())
