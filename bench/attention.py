"""Meta-attention benchmark: decode, prefill and mixed serving batches vs SDPA and FlexAttention.

On a GPU (bf16, head_dim 128, 32 query heads over 4 KV heads, paged KV with 16-token pages), in one
run and against the copy bandwidth and matmul ceiling measured in the same run:
  (a) decode only: 64-256 sequences at 1k-32k context — GB/s of KV read, % of copy bandwidth;
  (b) prefill only: a few long prompts — TFLOP/s;
  (c) mixed batches under a 4096-token budget (about 1610 tokens each): prefill chunks over cached
      prefixes, hundreds of decodes and verify groups of 4-8 tokens;
  (d) one prompt with the causal mask a compiled transformers model materializes, given as an
      additive bias (the dense op the attention pass emits), against SDPA with that mask and
      SDPA `is_causal`;
  (e) Gemma-2-9B's attention (16 query heads over 8 KV heads of 256, scores soft-capped at 50):
      a prompt and a decode batch, tileflow with and without the cap against FlexAttention with
      the cap as its score_mod (SDPA has no soft-capping).
tileflow is timed as the serving engine calls it (host work per call included), as the checked
public op, and replayed from a CUDA graph (device time only).
Baselines: `scaled_dot_product_attention` called once per sequence (PyTorch picks its flash or
efficient backend) and FlexAttention with a block mask over the same packed batch. Every method is checked against a float32 reference before it is timed.
Writes the table under bench/results/. On a CPU-only machine: a small interpreter smoke check.

    python bench/attention.py [--quick] [--no-write]
    python bench/attention.py --sweep   # kernel configurations on a prefill and a decode batch
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

HQ, HKV, D, PAGE = 32, 4, 128, 16
# Gemma-2-9B's attention heads (query, KV), head dim and logit soft-cap, for part (e).
SOFTCAP_HEADS, SOFTCAP_HEAD_DIM, SOFTCAP = (16, 8), 256, 50.0
# Relative error allowed against the float32 reference for bf16 outputs (METHOD: bf16 operands
# land between 1e-3 and 1e-2; an attention output's own rounding is about 2e-3).
BF16_TOL = 1e-2


def paged_batch(q_lens, kv_lens, *, device, dtype, seed=0, heads=None, head_dim=None):
    """Packed q, a paged KV cache with shuffled pages, and the varlen metadata (`heads` =
    (query, KV) heads and `head_dim` default to the module's Llama-3-8B-like ones)."""
    import torch

    hq, hkv = heads or (HQ, HKV)
    d = head_dim or D
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # Values are drawn where they live: a 32k-context decode batch holds GBs of KV cache.
    values = torch.Generator(device=device).manual_seed(seed)
    pages_per_seq = [math.ceil(length / PAGE) for length in kv_lens]
    total_pages = sum(pages_per_seq)
    order = torch.randperm(total_pages, generator=gen)
    width = max(pages_per_seq)
    table = torch.zeros(len(kv_lens), width, dtype=torch.int32)
    start = 0
    for s, n in enumerate(pages_per_seq):
        table[s, :n] = order[start:start + n].int()
        start += n
    q = torch.randn(sum(q_lens), hq, d, generator=values, device=device, dtype=dtype)
    k_cache = torch.randn(total_pages, PAGE, hkv, d, generator=values, device=device, dtype=dtype)
    v_cache = torch.randn(total_pages, PAGE, hkv, d, generator=values, device=device, dtype=dtype)
    cu = torch.tensor([0] + list(_cumsum(q_lens)), dtype=torch.int32)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=table.to(device),
                cu_seqlens_q=cu.to(device), seqlens_kv=torch.tensor(kv_lens, dtype=torch.int32, device=device),
                _host=(tuple(cu.tolist()), tuple(kv_lens)))


def op_args(batch):
    """The public op's arguments (the batch without its private `_` entries)."""
    return {k: v for k, v in batch.items() if not k.startswith("_")}


def tileflow_checked(batch):
    """The public op as a user calls it eagerly: it validates the metadata, reading it back from
    the device."""
    import tileflow

    return tileflow.ops.meta_attention_varlen(**op_args(batch))


def tileflow_serving(batch, softcap=None):
    """The call the serving engine's paged KV cache makes: lengths known on the host, no
    validation on the hot path (the cache built the metadata), so nothing is read back."""
    from tileflow.runtime.attention import run_meta_attention_varlen

    return run_meta_attention_varlen(**op_args(batch), check=False, host_metadata=batch["_host"], softcap=softcap)


def tileflow_graphed(batch):
    """The serving call captured once in a CUDA graph and replayed: the kernels' device time
    without the host's work per call, as a step captured whole would see it (the serving
    engine's steps run attention uncaptured: the column "tileflow" is theirs)."""
    from common import capture_graph

    if "_graph" not in batch:
        graph, out = capture_graph(lambda: tileflow_serving(batch))
        # Nothing has run into the captured output yet: NaN, so the first replay (the check)
        # must write every element of it.
        out.fill_(float("nan"))
        batch["_graph"] = (graph, out)
    graph, out = batch["_graph"]
    graph.replay()
    return out


def checked_ms(label: str, name: str, call, want, out_dtype, failures: list[str], time_ms) -> float | None:
    """`common.checked_ms` for method `name` on batch `label` against the float32 reference."""
    from common import checked_ms as checked

    return checked(f"{name} on {label}", call, want, out_dtype=out_dtype, tol=BF16_TOL, time_ms=time_ms,
                   failures=failures, reference="the float32 reference", verbose=True)


def _cumsum(values):
    total = 0
    for v in values:
        total += v
        yield total


def gather_dense(batch, s):
    """Sequence s's K/V as contiguous [1, Hkv, L, D] tensors (for the per-sequence baselines)."""
    import torch

    length = int(batch["seqlens_kv"][s])
    pos = torch.arange(length, device=batch["q"].device)
    pages = batch["block_table"][s, pos // PAGE].long()
    k = batch["k_cache"][pages, pos % PAGE].permute(1, 0, 2).unsqueeze(0)
    v = batch["v_cache"][pages, pos % PAGE].permute(1, 0, 2).unsqueeze(0)
    return k, v


def sdpa_per_sequence(batch, reference: bool = False):
    """One SDPA call per sequence (causal, bottom-right aligned via an explicit mask when needed).

    A single query row (a decode) sees every key: no mask, so SDPA can take its flash kernel.
    Flash takes no mask and `enable_gqa` is flash-only: a masked call (verify groups, prompt
    chunks over a prefix) repeats the KV heads as transformers' `repeat_kv` does, so it runs
    the efficient-attention kernel instead of the math one (which materializes the scores).
    `reference=True`: the same in float32 (upcast per sequence, KV heads repeated so the
    efficient kernel serves it on a GPU), the reference every method is checked against."""
    import torch
    import torch.nn.functional as F

    cu = batch["cu_seqlens_q"].tolist()
    out = torch.empty_like(batch["q"], dtype=torch.float32 if reference else batch["q"].dtype)
    for s in range(len(cu) - 1):
        n = cu[s + 1] - cu[s]
        if n == 0:
            continue
        k, v = batch["_dense"][s]
        q = batch["q"][cu[s]:cu[s + 1]].permute(1, 0, 2).unsqueeze(0)
        if reference:
            q, k, v = q.float(), k.float(), v.float()
        length = k.shape[2]
        mask = None
        if n != length and n > 1:
            mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril(length - n)
        if mask is not None or reference:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=n == length and n > 1)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=n == length and n > 1, enable_gqa=True)
        out[cu[s]:cu[s + 1]] = o[0].permute(1, 0, 2)
    return out


def attention_flops(q_lens, kv_lens, heads: int, head_dim: int) -> int:
    """FLOPs of causal attention over a packed batch, counting only the scores a query sees
    (bottom-right aligned: the i-th of n queries over L keys sees L - n + 1 + i of them): two
    matmuls of 2 FLOPs per (query, key, head, dim). A prompt of S tokens counts S(S+1)/2 pairs,
    not S^2: the whole square would report twice the rate the kernel achieves."""
    pairs = sum(n * (length - n) + n * (n + 1) // 2 for n, length in zip(q_lens, kv_lens))
    return 4 * pairs * heads * head_dim


def capped_reference(batch, cap):
    """float32 causal attention of each sequence with its scores soft-capped at `cap`."""
    import torch

    cu = batch["cu_seqlens_q"].tolist()
    out = torch.empty_like(batch["q"], dtype=torch.float32)
    for s in range(len(cu) - 1):
        n = cu[s + 1] - cu[s]
        k, v = (t[0].float() for t in batch["_dense"][s])  # [Hkv, L, D]
        q = batch["q"][cu[s]:cu[s + 1]].float().transpose(0, 1)  # [Hq, n, D]
        group = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
        scores = cap * torch.tanh(scores / cap)
        hidden = ~torch.ones(n, k.shape[1], dtype=torch.bool, device=q.device).tril(k.shape[1] - n)
        out[cu[s]:cu[s + 1]] = (scores.masked_fill(hidden, float("-inf")).softmax(-1) @ v).transpose(0, 1)
    return out


def make_flex(batch, score_mod=None):
    """Build the FlexAttention call (block mask over the packed layout, and `score_mod` when
    given) for one batch."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    device = batch["q"].device
    cu = batch["cu_seqlens_q"].tolist()
    lens = batch["seqlens_kv"].tolist()
    q_doc = torch.repeat_interleave(torch.arange(len(lens), device=device), torch.tensor([cu[i + 1] - cu[i] for i in range(len(lens))], device=device))
    q_pos = torch.cat([torch.arange(cu[i + 1] - cu[i], device=device) + lens[i] - (cu[i + 1] - cu[i]) for i in range(len(lens))])
    kv_doc = torch.repeat_interleave(torch.arange(len(lens), device=device), torch.tensor(lens, device=device))
    kv_pos = torch.cat([torch.arange(n, device=device) for n in lens])

    def mask_mod(b, h, qi, ki):
        return (q_doc[qi] == kv_doc[ki]) & (kv_pos[ki] <= q_pos[qi])

    total_q, total_kv = len(q_doc), len(kv_doc)
    # Compiled, so the [total_q, total_kv] mask is never materialized (GBs for a mixed batch).
    block_mask = create_block_mask(mask_mod, 1, 1, total_q, total_kv, device=device, _compile=True)
    k = torch.cat([batch["_dense"][s][0][0] for s in range(len(lens))], dim=1).unsqueeze(0)
    v = torch.cat([batch["_dense"][s][1][0] for s in range(len(lens))], dim=1).unsqueeze(0)
    q = batch["q"].permute(1, 0, 2).unsqueeze(0)
    flex = torch.compile(flex_attention, dynamic=False)

    # The standard Triton kernel: the flex-decoding one packs GQA heads into its rows and finds
    # no valid config for 64 queries x 8 heads (torch 2.11 raised NoValidChoicesError).
    options = {"BACKEND": "TRITON"}

    def run(_batch):
        return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True,
                    kernel_options=options)[0].permute(1, 0, 2)

    return run


def mixed_lengths(rng: random.Random, budget: int = 4096):
    """A serving step: 2 prefill chunks over cached prefixes, verify groups, then decodes, at most
    400 of them: about 1610 query tokens, well within the default budget of 4096, which they
    never fill (the rows' labels say so)."""
    q_lens, kv_lens = [], []
    for _ in range(2):
        chunk, prefix = 512, rng.choice([1024, 2048, 4096])
        q_lens.append(chunk)
        kv_lens.append(prefix + chunk)
    for _ in range(32):
        n = rng.randint(4, 8)
        q_lens.append(n)
        kv_lens.append(rng.randint(1024, 8192) + n)
    while sum(q_lens) < budget and len(q_lens) < 2 + 32 + 400:
        q_lens.append(1)
        kv_lens.append(rng.randint(512, 8192))
    return q_lens, kv_lens


# Kernel configurations the sweep times, per batch kind: (block_q, block_kv, num_warps,
# num_stages, programs per SM). block_q x GQA rows make a tile (GQA = 8 here).
# The first sweep (bench/results/attention_sweep-*-97eab47.md) ranged over block_q 8/16, block_kv
# 64/128, 4/8 warps and 2/3 stages; these are its leaders and their neighbours (block_kv 32,
# whose 4-warp tile spills outside the KV loop only, where the 64-position one spills inside).
SWEEP_PREFILL = [(16, bkv, w, st, 4) for bkv, w, st in
                 [(64, 4, 3), (64, 8, 3), (128, 8, 2), (32, 4, 3), (32, 8, 3), (64, 4, 2)]]
# (A 128-position KV block with 4 stages would need 256 KiB of shared memory: left out.)
SWEEP_DECODE = [(2, bkv, 4, st, pps) for bkv, st, pps in [(128, 3, 8), (128, 2, 8), (128, 3, 4), (64, 3, 4), (128, 3, 12)]]


def compiled_resources(kernel) -> str:
    """'registers/spill bytes' of the main Triton kernel behind a tileflow launcher, as the GPU
    compiler built it ('?' where this Triton keeps them elsewhere)."""
    jit = getattr(getattr(kernel, "launch", kernel), "kernel", None)
    try:
        compiled = [c for caches in jit.device_caches.values() for c in caches[0].values()]
        return ", ".join(f"{c.n_regs}/{c.n_spills}" for c in compiled) or "?"
    except (AttributeError, TypeError, IndexError):
        return "?"


def model_mask_methods(s: int, *, device, dtype):
    """Dense causal attention of one s-token prompt the way a compiled transformers model runs
    it: its causal mask materialized as an additive float bias [1, 1, s, s] (transformers builds
    it under torch.compile). Returns ({method: fn()}, ranges(), reference()): the methods are tileflow's dense
    op as the attention pass emits it (the bias, and its ranges computed once per model for every
    layer), the same with `causal=True`, SDPA with the bias (the efficient-attention kernel
    Inductor runs) and SDPA `is_causal` (flash); `ranges()` computes the once-per-model ranges;
    `reference()` is float32 causal attention of the same inputs. The dense op also takes the
    mask as bool, as transformers builds it (converted to a float32 bias in each call)."""
    import torch
    import torch.nn.functional as F

    import tileflow

    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, HQ, s, D, device=device, dtype=dtype, generator=gen)
    k, v = (torch.randn(1, HKV, s, D, device=device, dtype=dtype, generator=gen) for _ in range(2))
    mask = torch.full((s, s), float("-inf"), device=device).triu(1)[None, None]  # float32, as the graph has it
    keep = mask == 0  # the same mask as bool (True = attend): its ranges are the bias's
    ranges = tileflow.ops.attention_mask_ranges(mask)
    # SDPA's efficient-attention kernel (the one that takes a bias) wants the bias in q's dtype
    # (a float32 bias with bf16 q fails there: "invalid dtype for bias") and no GQA
    # (`enable_gqa` is flash-only; otherwise SDPA falls back to the math kernel, which
    # materializes the scores): the masked baseline gets the bias in q's dtype and repeated KV
    # heads, as a transformers model's `repeat_kv` hands them over (repeated here once, untimed).
    group = q.shape[1] // k.shape[1]
    sdpa_mask = mask.to(dtype)
    k_rep, v_rep = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    methods = {
        "tileflow, mask as bias": lambda: torch.ops.tileflow.meta_attention(q, k, v, mask, False, None, "", ranges),
        # The bool mask transformers builds: the launcher makes its float32 form per call, as an
        # eager attn_implementation="tileflow" layer does (compiled graphs make it once per step).
        "tileflow, bool mask": lambda: torch.ops.tileflow.meta_attention(q, k, v, keep, False, None, "", ranges),
        "tileflow, causal": lambda: tileflow.ops.meta_attention(q, k, v, causal=True),
        "SDPA, mask": lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=sdpa_mask),
        "SDPA, is_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
    }

    def reference():
        """float32 causal attention (KV heads repeated: the efficient kernel serves it)."""
        return F.scaled_dot_product_attention(q.float(), k_rep.float(), v_rep.float(), is_causal=True)

    return methods, lambda: tileflow.ops.attention_mask_ranges(mask), reference


def packed_methods(doc_lens: list[int], *, device, dtype, flex: bool = True):
    """Causal attention over documents packed in one row (`[1, 32, S, 128]`, S = sum of
    `doc_lens`), each token seeing only its own document's earlier tokens, the way a model given
    restarting position ids runs it. Returns ({method: fn()}, reference()): tileflow's dense op
    with each token's first key (`key_starts`, what "tileflow_causal" passes: O(S) metadata), the
    same with the packed mask as an additive bias and its ranges (what "tileflow" gets from
    transformers: an [S, S] mask), SDPA with that mask in q's dtype over repeated KV heads (what
    transformers' SDPA path runs), and FlexAttention with a document block mask (`flex`: GPU
    only); "tileflow, causal only" (the plain causal kernel) is None unless there is one document;
    `reference()` is float32 SDPA per document."""
    import torch
    import torch.nn.functional as F

    import tileflow

    s = sum(doc_lens)
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, HQ, s, D, device=device, dtype=dtype, generator=gen)
    k, v = (torch.randn(1, HKV, s, D, device=device, dtype=dtype, generator=gen) for _ in range(2))
    doc = torch.repeat_interleave(torch.arange(len(doc_lens), device=device), torch.tensor(doc_lens, device=device))
    firsts = [0, *list(_cumsum(doc_lens))[:-1]]
    starts = torch.tensor(firsts, device=device)[doc][None]  # [1, S]: each token's document's first token
    tokens = torch.arange(s, device=device)
    seen = (doc[:, None] == doc[None, :]) & (tokens[None, :] <= tokens[:, None])
    mask = torch.zeros(s, s, device=device).masked_fill(~seen, float("-inf"))[None, None]  # float32, as transformers'
    ranges = tileflow.ops.attention_mask_ranges(mask)
    group = HQ // HKV
    k_rep, v_rep = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    sdpa_mask = mask.to(dtype)
    methods = {
        "tileflow, key starts": lambda: tileflow.ops.meta_attention(q, k, v, causal=True, key_starts=starts),
        # What the starts cost where they hide nothing (one document: a compiled model's unpacked call).
        "tileflow, causal only": (lambda: tileflow.ops.meta_attention(q, k, v, causal=True)) if len(doc_lens) == 1 else None,
        "tileflow, packed mask": lambda: torch.ops.tileflow.meta_attention(q, k, v, mask, False, None, "", ranges),
        "SDPA, packed mask": lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=sdpa_mask),
    }
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def document_causal(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (ki <= qi)

        block_mask = create_block_mask(document_causal, 1, 1, s, s, device=device, _compile=True)
        compiled = torch.compile(flex_attention, dynamic=False)
        methods["FlexAttention, document mask"] = lambda: compiled(
            q, k, v, block_mask=block_mask, enable_gqa=True, kernel_options={"BACKEND": "TRITON"})

    def reference():
        """float32 causal attention of each document alone."""
        out = torch.empty(1, HQ, s, D, device=device, dtype=torch.float32)
        for first, n in zip(firsts, doc_lens):
            piece = slice(first, first + n)
            out[:, :, piece] = F.scaled_dot_product_attention(
                q[:, :, piece].float(), k_rep[:, :, piece].float(), v_rep[:, :, piece].float(), is_causal=True)
        return out

    return methods, reference


def packed_document_lengths(rng: random.Random, total: int, shortest: int, longest: int) -> list[int]:
    """Document lengths in [shortest, longest] filling exactly `total` tokens (the last one cut)."""
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(min(rng.randint(shortest, longest), total - sum(lengths)))
    return lengths


def sweep_configs(batches, *, device, dtype, time_ms, check_tol, progress=None):
    """Time the meta-attention kernel of each batch under each configuration.

    `batches` is a list of (label, q_lens, kv_lens, configs). Each configuration builds its own
    kernel (a TileConfig on the spec: block_q, block_kv, warps, stages) and task table (block_q
    and the persistent grid), is checked against SDPA per sequence (its output starting as NaN),
    then timed by `time_ms(fn)`. Returns rows of (label, config, ms or None, error or ""), best
    first per batch; `progress(rows)` gets the rows so far after every configuration.
    """
    import torch

    from common import poison_next_output, rel_err
    from tileflow.kernel_spec import KernelSpec, TileConfig, dtype_name, make_params
    from tileflow.runtime import get_kernel
    from tileflow.tasks import build_task_table

    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 1
    rows = []
    for label, q_lens, kv_lens, configs in batches:
        batch = paged_batch(q_lens, kv_lens, device=device, dtype=dtype)
        batch["_dense"] = [gather_dense(batch, s) for s in range(len(kv_lens))]
        want = sdpa_per_sequence(batch, reference=True)
        cu, lens = batch["_host"]
        results = []
        for block_q, block_kv, warps, stages, per_sm in configs:
            name = f"block_q={block_q} block_kv={block_kv} warps={warps} stages={stages} programs/SM={per_sm}"
            spec = KernelSpec(
                op="meta_attention", dtype=dtype_name(dtype), out_dtype=dtype_name(dtype),
                tile=TileConfig(block_q, block_kv, D, num_warps=warps, num_stages=stages),
                params=make_params(head_dim=D, gqa=HQ // HKV, block_q=block_q, block_kv=block_kv, causal=True,
                                   sliding_window=False, tree=False, bias=False),
            )
            try:
                kernel = get_kernel("triton", spec)
                table = build_task_table(list(cu), list(lens), num_q_heads=HQ, num_kv_heads=HKV, block_q=block_q,
                                         num_programs=sms * per_sm, causal=True)
                table = table.to(device)  # on the device before timing: no copy per call
                args = (batch["q"], batch["k_cache"], batch["v_cache"], batch["block_table"], batch["cu_seqlens_q"],
                        batch["seqlens_kv"], table)
                poison_next_output(want.shape, dtype, device)  # the previous config's output was just freed
                err = rel_err(kernel(*args), want)
                if not err < check_tol:
                    raise AssertionError(f"relative error {err:.2e} against SDPA")
                ms = time_ms(lambda: kernel(*args))
                results.append((label, f"{name} (regs/spills {compiled_resources(kernel)})", ms, ""))
            except Exception as exc:  # noqa: BLE001 -- a config that does not build or fit is reported
                results.append((label, name, None, f"{type(exc).__name__}: {str(exc)[:120]}"))
            print(" | ".join(str(c) for c in results[-1]), flush=True)
            if progress:
                progress(rows + _best_first(results))
        rows += _best_first(results)
    return rows


def _best_first(results):
    """Sweep rows by time, failed configurations last."""
    return sorted(results, key=lambda r: (r[2] is None, r[2] or 0.0))


def smoke() -> int:
    """CPU: the tileflow path of this benchmark on a tiny mixed batch, under the interpreter."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    import tileflow
    from common import rel_err

    global HQ, HKV, D
    HQ, HKV, D = 4, 2, 16
    print("bench/attention.py: no CUDA GPU here; timings need one. Running the interpreter smoke check.")
    batch = paged_batch([5, 1, 1, 3], [20, 9, 33, 40], device="cpu", dtype=torch.float32)
    batch["_dense"] = [gather_dense(batch, s) for s in range(4)]
    want = sdpa_per_sequence(batch, reference=True)
    # The timed SDPA baseline (flash-style GQA for the decodes, repeated heads where it is masked).
    err = rel_err(sdpa_per_sequence(batch), want)
    if not err < 1e-5:
        print(f"FAIL: the SDPA per-sequence baseline disagrees with the float32 reference ({err:.1e})", file=sys.stderr)
        return 1
    for name, call in (("checked op", tileflow_checked), ("serving path", tileflow_serving)):
        with tileflow.use_config(tileflow.Config(target="triton")):
            got = call(batch)
        err = rel_err(got, want)
        print(f"  mixed batch (prefill chunk, decodes, verify), {name}: rel err vs SDPA {err:.1e}")
        if not err < 1e-5:
            print(f"FAIL: meta-attention ({name}) disagrees with SDPA", file=sys.stderr)
            return 1
    # The soft-capped rows' tileflow call and their float32 reference (a cap that bends the scores).
    capped = paged_batch([5, 1, 3], [20, 9, 33], device="cpu", dtype=torch.float32, heads=(4, 2), head_dim=32)
    capped["q"] *= 4
    capped["_dense"] = [gather_dense(capped, s) for s in range(3)]
    with tileflow.use_config(tileflow.Config(target="triton")):
        err = rel_err(tileflow_serving(capped, 2.0), capped_reference(capped, 2.0))
    print(f"  soft-capped batch: rel err vs the capped reference {err:.1e}")
    if not err < 1e-5:
        print("FAIL: soft-capped meta-attention disagrees with the capped reference", file=sys.stderr)
        return 1
    # The model-mask rows' methods: a causal mask given as a bias, against SDPA is_causal.
    with tileflow.use_config(tileflow.Config(target="triton")):
        methods, _, reference = model_mask_methods(40, device="cpu", dtype=torch.float32)
        want = reference()
        for name, fn in methods.items():
            err = rel_err(fn(), want)
            if not err < 1e-5:
                print(f"FAIL: {name} disagrees with the float32 causal reference (rel err {err:.1e})", file=sys.stderr)
                return 1
    print("  model mask (as a bias and as bool), causal dense op and both SDPA baselines: match the float32 reference")
    # The configuration sweep's path, on two configurations of a tiny batch.
    rows = sweep_configs([("mixed", [5, 1, 3], [20, 9, 40], [(4, 16, 4, 2, 1), (8, 32, 4, 3, 2)])],
                         device="cpu", dtype=torch.float32, time_ms=lambda fn: 0.0, check_tol=1e-5)
    failed = [r for r in rows if r[2] is None]
    print(f"  configuration sweep: {len(rows) - len(failed)} of {len(rows)} configurations match SDPA")
    if failed:
        print(f"FAIL: sweep configurations failed: {failed}", file=sys.stderr)
        return 1
    print("smoke check passed")
    return 0


ATTENTION_PARTS = ("decode", "prefill", "mixed", "mask", "softcap", "packed")


def run_gpu(quick: bool, write: bool, parts: tuple[str, ...] = ATTENTION_PARTS) -> int:
    """The tables named in `parts`, in that order; the results file is rewritten (marked
    partial) after every row, so a stage cut by its time limit keeps what it measured."""
    import torch

    import tileflow
    from common import (allow_recompiles, environment, markdown_table, measured_copy_gbs, measured_matmul_tflops, median_ms,
                        results_name, write_results)

    dtype = torch.bfloat16
    env = environment()
    copy_gbs, peak_tflops = measured_copy_gbs(), measured_matmul_tflops(dtype)
    print(f"{env['device']}: copy {copy_gbs:.0f} GB/s, bf16 matmul {peak_tflops:.0f} TFLOP/s")
    config = tileflow.Config(target="triton")
    rows = []
    failures: list[str] = []
    # Every batch compiles its own FlexAttention (new shapes, new block mask); past Dynamo's
    # default recompile limit it would silently fall back to eager (and materialize the scores).
    allow_recompiles()

    def under_config(fn):
        def call(batch):
            with tileflow.use_config(config):
                return fn(batch)
        return call

    def time_call(call) -> float:
        return median_ms(lambda _: call())

    def measure(label, q_lens, kv_lens, baselines):
        batch = paged_batch(q_lens, kv_lens, device="cuda", dtype=dtype)
        batch["_dense"] = [gather_dense(batch, s) for s in range(len(kv_lens))]
        want = sdpa_per_sequence(batch, reference=True)
        methods = {"tileflow": under_config(tileflow_serving), "tileflow checked op": under_config(tileflow_checked),
                   "tileflow graphed": under_config(tileflow_graphed), **baselines(batch)}
        kv_bytes = sum(kv_lens) * HKV * D * 2 * 2 + 2 * batch["q"].numel() * 2
        flops = attention_flops(q_lens, kv_lens, HQ, D)
        # A failing method is reported in its cell and the run goes on (exit status 1). tileflow
        # looks its task table up (or builds it) on the host per call, as a serving step would.
        times: dict[str, float | None] = {
            name: checked_ms(label, name, lambda fn=fn: fn(batch), want, dtype, failures, time_call)
            for name, fn in methods.items()}
        row = [label, len(q_lens), sum(q_lens)]
        row += ["FAIL" if ms is None else f"{ms:.3f}" for ms in times.values()]
        t = times["tileflow"]
        for ms in (t, times["tileflow graphed"]):
            row += [f"{kv_bytes / ms / 1e6:.0f} ({100 * kv_bytes / ms / 1e6 / copy_gbs:.0f}%)" if ms else "FAIL"]
        row += [f"{flops / t / 1e9:.1f}" if t else "FAIL"]
        row += [f"{times[n] / t:.2f}x" if t and times[n] else "FAIL" for n in times if n != "tileflow"]
        rows.append((list(times), row))
        print(" | ".join(str(c) for c in row), flush=True)

    def with_flex(batch):
        return {"SDPA per sequence": sdpa_per_sequence, "FlexAttention": make_flex(batch)}

    def part_decode():
        for n_seqs, ctx in [(64, 1024), (256, 1024), (64, 8192), (128, 32768)] if not quick else [(64, 4096)]:
            measure(f"decode {n_seqs}x{ctx}", [1] * n_seqs, [ctx] * n_seqs, with_flex)
            checkpoint()

    def part_prefill():
        for n_seqs, length in [(2, 4096), (1, 8192)] if not quick else [(1, 2048)]:
            measure(f"prefill {n_seqs}x{length}", [length] * n_seqs, [length] * n_seqs, with_flex)
            checkpoint()

    def part_mixed():
        rng = random.Random(0)
        for i in range(3 if not quick else 1):
            q_lens, kv_lens = mixed_lengths(rng)
            measure(f"mixed #{i} ({sum(q_lens)} tokens, 4096-token budget)", q_lens, kv_lens, with_flex)
            checkpoint()

    # A compiled transformers model hands attention its causal mask as a float bias: the dense
    # op, against the kernels Inductor would run, on one prompt.
    mask_rows = []
    mask_names: list[str] = []

    def part_mask():
        for s in [4096, 8192] if not quick else [2048]:
            with tileflow.use_config(config):
                methods, mask_ranges, reference = model_mask_methods(s, device="cuda", dtype=dtype)
                mask_names[:] = list(methods)
                want = reference()
                flops = attention_flops([s], [s], HQ, D)  # the causal half, diagonal included
                times = {name: checked_ms(f"the {s}-token model mask", name, fn, want, dtype, failures, time_call)
                         for name, fn in methods.items()}
                ranges_ms = median_ms(lambda _: mask_ranges())
                del want
            t = times["tileflow, mask as bias"]
            mask_rows.append([f"1x{s}"] + ["FAIL" if ms is None else f"{ms:.3f} ({flops / ms / 1e9:.0f})" for ms in times.values()]
                             + [f"{ranges_ms:.3f}"]
                             + [f"{times[n] / t:.2f}x" if t and times[n] else "FAIL" for n in ("SDPA, mask", "SDPA, is_causal")])
            print(" | ".join(str(c) for c in mask_rows[-1]), flush=True)
            checkpoint()

    # Gemma-2's soft-capped attention: what the cap costs tileflow, and FlexAttention with it.
    softcap_rows = []

    def part_softcap():
        softcap_batches = ([("prefill 1x4096", [4096], [4096]), ("decode 64x4096", [1] * 64, [4096] * 64)]
                           if not quick else [("prefill 1x2048", [2048], [2048])])
        for label, q_lens, kv_lens in softcap_batches:
            batch = paged_batch(q_lens, kv_lens, device="cuda", dtype=dtype, heads=SOFTCAP_HEADS,
                                head_dim=SOFTCAP_HEAD_DIM)
            batch["_dense"] = [gather_dense(batch, s) for s in range(len(kv_lens))]
            capped, plain = capped_reference(batch, SOFTCAP), sdpa_per_sequence(batch, reference=True)

            def cap_mod(score, b, h, qi, ki):
                return SOFTCAP * torch.tanh(score / SOFTCAP)

            methods = {"tileflow": (under_config(lambda b: tileflow_serving(b, SOFTCAP)), capped),
                       "tileflow, no cap": (under_config(tileflow_serving), plain),
                       "FlexAttention": (make_flex(batch, cap_mod), capped)}
            times = {name: checked_ms(f"soft-capped {label}", name, lambda fn=fn, batch=batch: fn(batch), want, dtype,
                                      failures, time_call)
                     for name, (fn, want) in methods.items()}
            hq, hkv = SOFTCAP_HEADS
            kv_bytes = sum(kv_lens) * hkv * SOFTCAP_HEAD_DIM * 2 * 2 + 2 * batch["q"].numel() * 2
            flops = attention_flops(q_lens, kv_lens, hq, SOFTCAP_HEAD_DIM)
            t = times["tileflow"]
            softcap_rows.append([label] + ["FAIL" if ms is None else f"{ms:.3f}" for ms in times.values()]
                                + [f"{kv_bytes / t / 1e6:.0f} ({100 * kv_bytes / t / 1e6 / copy_gbs:.0f}%)" if t else "FAIL",
                                   f"{flops / t / 1e9:.1f}" if t else "FAIL"]
                                + [f"{times[n] / t:.2f}x" if t and times[n] else "FAIL" for n in ("tileflow, no cap", "FlexAttention")])
            print(" | ".join(str(c) for c in softcap_rows[-1]), flush=True)
            checkpoint()

    # Documents packed in one row (a model given restarting position ids): each token's first key
    # against the [S, S] mask the other paths need, and FlexAttention's document mask.
    packed_rows = []
    packed_names: list[str] = []

    def part_packed():
        rng = random.Random(0)
        # The last row is one document: the key-starts kernel against the plain causal one.
        shapes = ([(8192, 512, 2048), (8192, 64, 512), (8192, 8192, 8192)] if not quick else [(2048, 128, 512)])
        for total, shortest, longest in shapes:
            doc_lens = packed_document_lengths(rng, total, shortest, longest)
            with tileflow.use_config(config):
                methods, reference = packed_methods(doc_lens, device="cuda", dtype=dtype)
                packed_names[:] = list(methods)
                want = reference()
                flops = attention_flops(doc_lens, doc_lens, HQ, D)
                label = f"{total} tokens, {len(doc_lens)} documents of {shortest}-{longest}"
                times = {name: None if fn is None else checked_ms(label, name, fn, want, dtype, failures, time_call)
                         for name, fn in methods.items()}
                del want
            t = times["tileflow, key starts"]
            packed_rows.append([label] + ["n/a" if methods[n] is None else "FAIL" if ms is None
                                          else f"{ms:.3f} ({flops / ms / 1e9:.0f})" for n, ms in times.items()]
                               + ["n/a" if methods[n] is None else f"{times[n] / t:.2f}x" if t and times[n] else "FAIL"
                                  for n in packed_names[1:]])
            print(" | ".join(str(c) for c in packed_rows[-1]), flush=True)
            checkpoint()

    def body() -> str:
        text = ""
        if rows:
            names = rows[0][0]
            headers = (["batch", "seqs", "q tokens"] + [f"{n} ms" for n in names]
                       + ["tileflow GB/s (% copy)", "tileflow graphed GB/s (% copy)", "tileflow TFLOP/s (visible scores)"]
                       + [f"{n} / tileflow" for n in names[1:]])
            text += markdown_table(headers, [r for _, r in rows])
            text += ("\n\n- times: median of `triton.testing.do_bench`; tileflow includes finding its task table on the host."
                     "\n- tileflow: the serving engine's call (host lengths, no validation on the hot path); tileflow checked op: "
                     "`tileflow.ops.meta_attention_varlen`, which validates the metadata and reads it from the device per call; "
                     "tileflow graphed: the serving call captured in a CUDA graph and replayed (device time only)."
                     "\n- SDPA per sequence: decodes unmasked with `enable_gqa` (flash); masked sequences (prompt chunks "
                     "over a prefix, verify groups) with KV heads repeated per call, as `repeat_kv` does (efficient kernel)."
                     "\n- every method checked against float32 SDPA of the same inputs (relative error < "
                     f"{BF16_TOL:g}) before timing; TFLOP/s count the scores each query sees (a causal prompt's "
                     "half square, diagonal included), not the whole square as runs 1-3 did.")
        text += f"\n- ceilings measured in this run: copy {copy_gbs:.0f} GB/s, bf16 matmul {peak_tflops:.0f} TFLOP/s."
        if mask_rows:
            text += ("\n\n## A model's causal mask given as a bias\n\n"
                     + markdown_table(["prompt"] + [f"{n} ms (TFLOP/s)" for n in mask_names] + ["mask ranges ms (once per model)"]
                                      + ["SDPA, mask / tileflow, mask", "SDPA, is_causal / tileflow, mask"], mask_rows)
                     + "\n\n- dense `[1, 32, S, 128]` attention over 4 KV heads; the mask is the additive float32 causal "
                       "mask a compiled transformers model materializes; tileflow reads it with its ranges, which the "
                       "attention pass computes once per model for every layer (timed apart); SDPA, mask: the same mask in "
                       "bf16 over repeated KV heads (the efficient-attention kernel; the repeat untimed); TFLOP/s count the "
                       "causal half")
        if softcap_rows:
            text += ("\n\n## Gemma-2's soft-capped attention\n\n"
                     + markdown_table(["batch", "tileflow ms", "tileflow, no cap ms", "FlexAttention ms",
                                       "tileflow GB/s (% copy)", "tileflow TFLOP/s (visible scores)", "no cap / tileflow",
                                       "FlexAttention / tileflow"], softcap_rows)
                     + f"\n\n- {SOFTCAP_HEADS[0]} query heads over {SOFTCAP_HEADS[1]} KV heads of {SOFTCAP_HEAD_DIM}, causal, "
                       f"scores capped at {SOFTCAP:g} (`cap * tanh(scores / cap)`); tileflow as the serving engine calls it; "
                       "FlexAttention with the cap as its score_mod and a block mask over the packed batch; both checked "
                       "against a float32 reference with the cap, \"no cap\" against float32 SDPA per sequence.")
        if packed_rows:
            text += ("\n\n## Documents packed in one row\n\n"
                     + markdown_table(["row"] + [f"{n} ms (TFLOP/s)" for n in packed_names]
                                      + [f"{n} / tileflow, key starts" for n in packed_names[1:]], packed_rows)
                     + "\n\n- dense `[1, 32, S, 128]` causal attention over 4 KV heads, each token seeing only its own "
                       "document; tileflow, key starts: each token's first key (what \"tileflow_causal\" passes for "
                       "restarting position ids); tileflow, causal only: the plain causal kernel, on the one-document row "
                       "(what the starts cost where they hide nothing); tileflow, packed mask: the float32 [S, S] mask as a bias with its ranges "
                       "(untimed, once per model); SDPA, packed mask: that mask in bf16 over repeated KV heads (untimed "
                       "repeat); FlexAttention with a document-causal block mask (built untimed); TFLOP/s count each "
                       "document's causal half; every method checked against float32 SDPA per document")
        text += "".join(f"\n- FAILED: {failure}" for failure in failures)
        return text

    title = "Meta-attention vs SDPA and FlexAttention (bf16, D=128, 32/4 heads)"

    # ATTENTION_PARTS=mask,softcap and a later decode,prefill run on one commit: two files.
    file_name = results_name("attention", parts, ATTENTION_PARTS)
    if quick:
        file_name += "-quick"  # smaller batches: a quick run must not replace the full table of the same day and commit

    def checkpoint() -> None:
        if write:
            write_results(file_name, title, env, body(), partial=True)

    runners = {"decode": part_decode, "prefill": part_prefill, "mixed": part_mixed, "mask": part_mask,
               "softcap": part_softcap, "packed": part_packed}
    for part in parts:  # in the order asked for: a stage cut by its limit loses the last ones
        runners[part]()
    if write:
        print(f"wrote {write_results(file_name, title, env, body())}")
    return 1 if failures else 0


def run_sweep(write: bool, batches=None, *, device: str = "cuda", dtype=None) -> int:
    """GPU: the kernel configuration sweep on a prefill and a long-context decode batch (a
    configuration that does not compile, e.g. past the shared memory, is reported, not fatal).
    The table is rewritten (marked partial) after every configuration, so a stage cut by its
    limit keeps what it measured. `batches` (as `sweep_configs` takes them), `device` and
    `dtype` are for the CPU check of this path."""
    import torch

    from common import environment, markdown_table, median_ms, write_results

    env = environment()
    batches = batches or [("prefill 2x4096", [4096] * 2, [4096] * 2, SWEEP_PREFILL),
                          ("decode 128x32768", [1] * 128, [32768] * 128, SWEEP_DECODE)]
    work = {label: (attention_flops(q, kv, HQ, D), sum(kv) * HKV * D * 2 * 2) for label, q, kv, _ in batches}
    title = "Meta-attention kernel configurations (bf16, D=128, 32/4 heads)"

    def table(rows) -> str:
        cells = [[label, name, "FAIL" if ms is None else f"{ms:.3f}",
                  "" if ms is None else f"{work[label][0] / ms / 1e9:.0f}",
                  "" if ms is None else f"{work[label][1] / ms / 1e6:.0f}", error]
                 for label, name, ms, error in rows]
        return (markdown_table(["batch", "configuration", "ms", "TFLOP/s (visible scores)", "KV GB/s", "error"], cells)
                + "\n\n- each configuration checked against SDPA per sequence, then timed (median of "
                  "`triton.testing.do_bench`); rows best first per batch; no host-side metadata work is timed")

    def checkpoint(rows) -> None:
        if write:
            write_results("attention_sweep", title, env, table(rows), partial=True)

    rows = sweep_configs(batches, device=device, dtype=dtype or torch.bfloat16,
                         time_ms=lambda fn: median_ms(lambda _: fn()), check_tol=BF16_TOL, progress=checkpoint)
    body = table(rows)
    print(body)
    if write:
        print(f"wrote {write_results('attention_sweep', title, env, body)}")
    return 0 if any(ms is not None for _, _, ms, _ in rows) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="time kernel configurations (tile, warps, stages, grid)")
    parser.add_argument("--parts", default=",".join(ATTENTION_PARTS),
                        help=f"comma-separated tables of {ATTENTION_PARTS} (GPU run)")
    args = parser.parse_args()
    parts = tuple(p for p in args.parts.split(",") if p)
    if unknown := set(parts) - set(ATTENTION_PARTS):
        parser.error(f"unknown parts {sorted(unknown)}: choose from {ATTENTION_PARTS}")
    if not parts:  # it would write an empty table under the full run's file name
        parser.error(f"--parts names no table: choose from {ATTENTION_PARTS}")
    import torch

    if not torch.cuda.is_available():
        return smoke()
    if args.sweep:
        return run_sweep(not args.no_write)
    return run_gpu(args.quick, not args.no_write, parts)


if __name__ == "__main__":
    sys.exit(main())
