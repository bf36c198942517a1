"""Tests for the Ascend C meta-attention emitter (backends/ascend/attention.py).

The emitted kernels are compiled with g++ (warnings are errors) against the CPU test double of the
Ascend C API in tests/ascend_cpu/ and run block by block on the CPU. Every launch writes into an
output poisoned with NaN, and every KV-cache slot no sequence owns is NaN too (see
`attention_cases.make_batch`), so a row the kernel forgets to store, or an invisible position that
leaks into a result, shows up. Results are compared with the reference backend's dense definition
evaluated in float64 (the oracle), with the Triton tests' tolerances.

Each distinct spec is one g++ run: the specs are few and built once per module, in parallel.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from attention_cases import batch_lengths, batch_mixes, exact_batch, make_batch
from golden_files import check_golden
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from models import BLOOM_ALIBI, GEMMA2_SOFTCAP
from tileflow.backends.ascend.attention import (
    TILING_ERRORS,
    UB_BYTES,
    _bias_operand,
    _host_tiling,
    attention_entries,
    attention_layout,
    build_cpu_attention,
    render_attention_sources,
    task_pipeline,
)
from tileflow.backends.ascend.cpu_debug import build_cpu_debug
from tileflow.backends.reference.attention import (
    attention_reference_dense,
    merge_partials,
    run_task_table,
)

from tileflow.kernel_spec import KernelSpec, make_params
from tileflow.tasks import build_task_table

HEADERS = Path(__file__).parent / "ascend_cpu"
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
ARGS = ("q", "k_cache", "v_cache", "block_table", "cu_seqlens_q", "seqlens_kv")

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="CPU-debug builds need g++")


def attn_spec(dtype: str = "float32", *, head_dim: int = 16, gqa: int = 1, block_q: int = 4,
              block_kv: int = 16, causal: bool = True, sliding_window: bool = False,
              tree: bool = False, bias: bool = False, softcap: bool = False, sinks: bool = False,
              alibi: bool = False, key_starts: bool = False) -> KernelSpec:
    """A meta_attention KernelSpec."""
    features = {name: True for name, on in (("softcap", softcap), ("sinks", sinks), ("alibi", alibi),
                                            ("key_starts", key_starts)) if on}
    return KernelSpec(
        op="meta_attention", dtype=dtype, out_dtype=dtype,
        params=make_params(head_dim=head_dim, gqa=gqa, block_q=block_q, block_kv=block_kv,
                           causal=causal, sliding_window=sliding_window, tree=tree, bias=bias, **features),
    )


# The compiled specs. Hq/Hkv are launch-time: a gqa=4 kernel serves 8/2 (GQA) and 4/1 (MQA).
GQA4_TREE = attn_spec("float32", gqa=4, block_q=2, tree=True)
# The golden spec: fp16, GQA 2, tree verify and a sliding window, block_kv 32, head_dim 32.
FP16_TREE_WINDOW = attn_spec("float16", head_dim=32, gqa=2, block_q=4, block_kv=32, tree=True,
                             sliding_window=True)
BF16_GQA2 = attn_spec("bfloat16", gqa=2, block_q=4)
FP32_WINDOW = attn_spec("float32", gqa=2, block_q=4, sliding_window=True)
NOT_CAUSAL_TREE = attn_spec("float32", gqa=1, block_q=3, causal=False, tree=True)
# Additive bias: with the causal rule and tree verify (the rules override the bias), and as
# exported models use it (not causal: the model's own mask is the bias), fp16, 6-row tiles.
BIAS_TREE = attn_spec("float32", gqa=2, block_q=4, tree=True, bias=True)
BIAS_FP16 = attn_spec("float16", gqa=2, block_q=3, causal=False, bias=True)
# Gemma-2's logit soft-capping and gpt-oss's sinks with a window (fp16); ALiBi (BLOOM, MPT) with
# both (fp32).
CAP_SINKS_WINDOW = attn_spec("float16", gqa=2, block_q=4, sliding_window=True, softcap=True, sinks=True)
ALIBI_CAP_SINKS = attn_spec("float32", gqa=2, block_q=4, softcap=True, sinks=True, alibi=True)
# Key starts (sequences packed in a dense row): causal fp32 and causal with a window in fp16, GQA
# 2; not causal with soft-capping, sinks and ALiBi, GQA 4 over 2-position tiles.
STARTS_FP32 = attn_spec("float32", gqa=2, block_q=4, key_starts=True)
STARTS_FP16_WINDOW = attn_spec("float16", gqa=2, block_q=4, sliding_window=True, key_starts=True)
STARTS_NOT_CAUSAL = attn_spec("float32", gqa=4, block_q=2, causal=False, softcap=True, sinks=True, alibi=True,
                              key_starts=True)
# head_dim and block_kv differ (every spec above has them equal): the reduction scratch must hold
# the longer of a chunk's scores and a GEMV's products.
HEAD_DIM_OVER_KV = attn_spec("float32", head_dim=32, gqa=2, block_q=4, block_kv=16)
KV_OVER_HEAD_DIM = attn_spec("float16", head_dim=16, gqa=2, block_q=4, block_kv=48)
# A sliding window without the causal rule: a chunk may start many positions past a row's own.
NOT_CAUSAL_WINDOW = attn_spec("float32", gqa=1, block_q=4, causal=False, sliding_window=True)
SPECS = (GQA4_TREE, FP16_TREE_WINDOW, BF16_GQA2, FP32_WINDOW, NOT_CAUSAL_TREE, BIAS_TREE, BIAS_FP16,
         CAP_SINKS_WINDOW, ALIBI_CAP_SINKS, STARTS_FP32, STARTS_FP16_WINDOW, STARTS_NOT_CAUSAL,
         HEAD_DIM_OVER_KV, KV_OVER_HEAD_DIM, NOT_CAUSAL_WINDOW)


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's private build folder: its builds share one precompiled prelude."""
    return tmp_path_factory.mktemp("ascend_attention")


@pytest.fixture(scope="module")
def kernels(build_dir: Path) -> dict[KernelSpec, Any]:
    """Every spec of this module, compiled once (two g++ at a time) into a private build dir."""
    return _build_all(list(SPECS), build_dir, build=build_cpu_attention)


def causal_tree(batch: dict[str, Any], size: int = 4) -> torch.Tensor:
    """A lower-triangular tree mask for every sequence: the causal rule, for batches without
    verify sequences run on a tree kernel."""
    return torch.ones(batch["seqlens_kv"].shape[0], size, size, dtype=torch.bool).tril()


def starts_bias(batch: dict[str, Any], key_starts: torch.Tensor) -> torch.Tensor:
    """The key-start rule as the reference's additive bias, float64 ``[S, 1, max n_s, max L_s]``:
    row i of sequence s sees no key j < key_starts[s, i], so its bias there is -inf (which hides a
    key; a row hidden entirely outputs zeros) and 0 elsewhere."""
    q_lens, kv_lens = batch_lengths(batch)
    rows, keys = max(q_lens, default=0), max(kv_lens, default=0)
    hidden = torch.arange(keys)[None, None, :] < key_starts[:, :rows, None].long()
    return torch.zeros(hidden.shape, dtype=torch.float64).masked_fill(hidden, float("-inf"))[:, None]


def oracle(batch: dict[str, Any], spec: KernelSpec, *, tree_mask: torch.Tensor | None,
           window: int | None, scale: float | None = None,
           attn_bias: torch.Tensor | None = None, features: dict[str, Any] | None = None) -> torch.Tensor:
    """The reference backend's dense definition, evaluated in float64. `features`: softcap,
    sinks, alibi_slopes and key_starts, as the kernel takes them (key starts as `starts_bias`)."""
    args = [batch[k].double() if batch[k].is_floating_point() else batch[k] for k in ARGS]
    wide = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in (features or {}).items()}
    starts = (features or {}).get("key_starts")
    if starts is not None:  # the dense definition has no key starts: they go with no bias
        assert attn_bias is None
        attn_bias = starts_bias(batch, starts)
        del wide["key_starts"]
    return attention_reference_dense(*args, scale=scale, causal=spec.param("causal"),
                                     sliding_window=window, tree_mask=tree_mask,
                                     attn_bias=None if attn_bias is None else attn_bias.double(), **wide)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: str, what: str) -> None:
    """Every element written (no NaN left) and relative (Frobenius) error within tolerance."""
    assert out.dtype == getattr(torch, dtype)
    assert not torch.isnan(out).any(), f"{what}: some output elements were never written"
    rel = ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
    assert rel <= TOL[dtype], f"{what}: relative error {rel:.3g} > {TOL[dtype]}"


def run_and_check(kernel: Any, spec: KernelSpec, batch: dict[str, Any], *, window: int | None = None,
                  kv_split: int | None = 0, num_programs: int = 3, what: str = "",
                  attn_bias: torch.Tensor | None = None, features: dict[str, Any] | None = None) -> Any:
    """Build the task table, launch on a NaN-poisoned output, compare with the oracle; returns
    the table. `features`: softcap, sinks, alibi_slopes and key_starts for the specs that have them."""
    layout = attention_layout(spec)
    tree = None
    if layout.tree:
        tree = batch["tree_mask"] if batch["tree_mask"] is not None else causal_tree(batch)
    table = build_task_table(
        batch["cu_seqlens_q"], batch["seqlens_kv"], num_q_heads=batch["q"].shape[1],
        num_kv_heads=batch["k_cache"].shape[2], block_q=layout.block_q, num_programs=num_programs,
        sliding_window=window, causal=layout.causal, kv_split=kv_split,
    )
    out = torch.full_like(batch["q"], float("nan"))
    bias = {} if attn_bias is None else {"attn_bias": attn_bias}
    res = kernel(*[batch[k] for k in ARGS], table, tree_mask=tree, sliding_window=window, out=out, **bias,
                 **(features or {}))
    assert res is out
    ref = oracle(batch, spec, tree_mask=tree, window=window, attn_bias=attn_bias, features=features)
    assert_close(out, ref, spec.dtype, what)
    # Rows that see no key output exact zeros, as the reference's (not NaN, not a mean of V).
    empty = (ref == 0).all(dim=-1)
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), f"{what}: a hidden row is not zero"
    return table


def pipelines(table: Any, spec: KernelSpec, block_size: int) -> Counter:
    """How many tasks of the table run each pipeline (the kernel's own rule, see task_pipeline)."""
    block_kv = attention_layout(spec).block_kv
    return Counter(task_pipeline(t, block_kv, block_size) for t in table.tasks.tolist())


# --------------------------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------------------------

MIX = ["prefill", "chunked", "decode", "verify", "empty", "decode", "chunked"]

# (spec, block_size, Hq, Hkv, kinds, window, kv_split): R in {1, 2, 4}, MQA, page sizes 5 (divides
# no chunk) and 16, all dtypes, tree verify, windows, forced split-KV (the merge kernel).
MIXED_CASES = [
    (GQA4_TREE, 5, 8, 2, MIX, None, 0),
    (GQA4_TREE, 16, 4, 1, MIX, None, 16),
    (FP16_TREE_WINDOW, 5, 4, 2, MIX, 6, 0),
    (FP16_TREE_WINDOW, 16, 2, 1, MIX, 100, 16),
    (BF16_GQA2, 16, 4, 2, ["prefill", "decode", "chunked", "empty", "decode"], None, 0),
    (BF16_GQA2, 5, 2, 1, ["chunked", "decode", "prefill"], None, 32),
    (NOT_CAUSAL_TREE, 5, 2, 2, MIX, None, 16),
    (NOT_CAUSAL_TREE, 16, 3, 3, ["prefill", "verify", "decode"], None, 0),
]


@pytest.mark.parametrize("case", range(len(MIXED_CASES)))
def test_mixed_batch(kernels: dict[KernelSpec, Any], case: int) -> None:
    """Prefill, chunked prefill, decode, tree verify and empty sequences in one launch."""
    spec, block_size, hq, hkv, kinds, window, kv_split = MIXED_CASES[case]
    batch = make_batch(kinds, num_q_heads=hq, num_kv_heads=hkv, head_dim=spec.param("head_dim"),
                       block_size=block_size, dtype=getattr(torch, spec.dtype), seed=100 + case,
                       tree_size=6, max_len=40)
    table = run_and_check(kernels[spec], spec, batch, window=window, kv_split=kv_split,
                          what=f"case {case}: {spec.name} bs={block_size} {hq}/{hkv}")
    if kv_split:
        assert table.merges.shape[0] > 0, "the case should exercise the merge kernel"


def test_all_three_pipelines(kernels: dict[KernelSpec, Any]) -> None:
    """One launch whose tasks take the 2-stage (decode), 3-stage (one chunk) and 4-stage (many
    chunks, online rescale) pipelines, with and without split-KV (chunks of 24 positions cross
    the 16-position pages, so split tasks take the 4-stage pipeline too)."""
    lengths = [(1, 30), (3, 3), (9, 40), (2, 7), (1, 1)]
    batch = exact_batch(lengths, num_q_heads=8, num_kv_heads=2, head_dim=16, block_size=16,
                        dtype=torch.float32, seed=7)
    for kv_split in (0, 24):
        table = run_and_check(kernels[GQA4_TREE], GQA4_TREE, batch, kv_split=kv_split,
                              what=f"pipelines, kv_split={kv_split}")
        kinds = pipelines(table, GQA4_TREE, block_size=16)
        assert set(kinds) == {"2-stage", "3-stage", "4-stage"}, kinds


@pytest.mark.parametrize("window", [1, 5, 100])
def test_sliding_window_with_split(kernels: dict[KernelSpec, Any], window: int) -> None:
    """Sliding windows (1 = each row sees itself only; 100 = wider than any sequence) with forced
    split-KV chunks: some chunks are invisible to some rows (max -inf there) and the merge must
    ignore them."""
    lengths = [(9, 30), (1, 23), (17, 17), (0, 4), (3, 41)]
    batch = exact_batch(lengths, num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=7,
                        dtype=torch.float32, seed=window)
    # Chunks of 3 positions: a 4-row tile with window 1 reads 4 positions, so its second chunk
    # holds only the last row's own position.
    table = run_and_check(kernels[FP32_WINDOW], FP32_WINDOW, batch, window=window, kv_split=3,
                          what=f"window {window}")
    assert table.merges.shape[0] > 0


@pytest.mark.parametrize("spec", [CAP_SINKS_WINDOW, ALIBI_CAP_SINKS], ids=["softcap_sinks_window", "alibi"])
def test_softcap_sinks_and_alibi(kernels: dict[KernelSpec, Any], spec: KernelSpec) -> None:
    """Logit soft-capping (a cap of 0.7 against scores of a few units: it bends them all),
    attention sinks (large enough to take most of a row's weight) and ALiBi in the 2-, 3- and
    4-stage pipelines, whole and in split-KV chunks (the merge counts each row's sink once),
    against float64; each feature changes the result, and one kernel serves any cap."""
    lengths = [(1, 30), (3, 3), (9, 40), (2, 7), (1, 1), (0, 5)]
    batch = exact_batch(lengths, num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=16,
                        dtype=getattr(torch, spec.dtype), seed=17)
    batch["q"] = batch["q"] * 3
    window = 20 if spec.param("sliding_window", False) else None
    features: dict[str, Any] = {"softcap": 0.7, "sinks": torch.tensor([2.5, -1.0, 0.5, 4.0])}
    if spec.param("alibi", False):
        features["alibi_slopes"] = torch.tensor([0.5, 0.25, 0.125, 1.0 / 16])  # BLOOM's for 4 heads
    for cap in (0.7, 3.0):
        whole = run_and_check(kernels[spec], spec, batch, window=window, kv_split=0,
                              features={**features, "softcap": cap}, what=f"cap {cap}")
        split = run_and_check(kernels[spec], spec, batch, window=window, kv_split=16,
                              features={**features, "softcap": cap}, what=f"cap {cap}, split-KV")
    assert set(pipelines(whole, spec, block_size=16)) == {"2-stage", "3-stage", "4-stage"}
    assert split.merges.shape[0] > 0
    full = oracle(batch, spec, tree_mask=None, window=window, features=features)
    for name in features:
        without = oracle(batch, spec, tree_mask=None, window=window,
                         features={k: v for k, v in features.items() if k != name})
        assert (full - without).abs().max() > 0.05, f"{name} does not change the result"


def test_merge_kernel_alone(kernels: dict[KernelSpec, Any]) -> None:
    """The merge kernel on hand-made partials against the reference merge: rows whose slot saw no
    key (max -inf) have NaN partial outputs, which must be ignored; a row hidden in every slot
    becomes zeros; two blocks deal the merge rows between them."""
    spec = GQA4_TREE
    sources = kernels[spec].meta["sources"]
    lib = build_cpu_debug(sources, [HEADERS], build_dir=Path(kernels[spec].meta["library"]).parent.parent)
    batch = exact_batch([(3, 40), (1, 33), (2, 20)], num_q_heads=8, num_kv_heads=2, head_dim=16,
                        block_size=8, dtype=torch.float32, seed=3)
    table = build_task_table(batch["cu_seqlens_q"], batch["seqlens_kv"], num_q_heads=8,
                             num_kv_heads=2, block_q=2, num_programs=2, kv_split=8)
    rows = attention_layout(spec).rows
    gen = torch.Generator().manual_seed(0)
    partial_out = torch.randn(table.num_slots, rows, 16, generator=gen)
    # Each slot's rows: max (natural log units) and sum of exp against it, any positive sum.
    partial_stats = torch.stack([torch.randn(table.num_slots, rows, generator=gen) * 3,
                                 torch.rand(table.num_slots, rows, generator=gen) * 20 + 0.5], dim=1)
    hidden = torch.rand(table.num_slots, rows, generator=gen) < 0.3
    # Row 1 of the second split tile sees its keys only through a finfo.min mask (below): in
    # every slot, so none of them hides it.
    seq1, head1, start1, _, first1, count1 = table.merges[1].tolist()
    hidden[first1:first1 + count1, 1] = False
    partial_stats[:, 0][hidden] = float("-inf")
    partial_out[hidden] = float("nan")
    first, count = table.merges[0, 4:6].tolist()
    partial_stats[first:first + count, 0, 0] = float("-inf")  # row 0 of the first split tile: no key
    partial_out[first:first + count, 0] = float("nan")
    # Its slots' maxima are all about -3.4e38: only their sums tell the slots apart.
    partial_stats[first1:first1 + count1, 0, 1] = torch.finfo(torch.float32).min
    ref = merge_partials(table, partial_out, partial_stats, torch.full_like(batch["q"], float("nan")))
    out = torch.full_like(batch["q"], float("nan"))
    tiling = _host_tiling(lib.call, sources.ident, "merge test", (
        3, 8, 2, 8, batch["block_table"].shape[1], batch["k_cache"].shape[0], out.shape[0],
        table.num_tasks, table.num_slots, table.merges.shape[0], 2, 0, 0), (0.25,))
    lib.call(f"{sources.ident}_merge_run_cpu", ctypes.c_uint32(2), out, partial_out, partial_stats,
             table.merges, batch["cu_seqlens_q"], tiling, restype=None)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), "the merge wrote other rows than the reference"
    written = ~torch.isnan(ref)
    assert written.any() and (ref[written] == 0).any()
    torch.testing.assert_close(out[written], ref[written], rtol=1e-5, atol=1e-6)
    # The finfo.min row: its slots' outputs weighed by their sums (tile row 1 = position 0, head 1
    # of the KV head's group of 4).
    sums, parts = partial_stats[first1:first1 + count1, 1, 1], partial_out[first1:first1 + count1, 1]
    token = int(batch["cu_seqlens_q"][seq1]) + start1
    torch.testing.assert_close(out[token, head1 * 4 + 1], (sums[:, None] * parts).sum(0) / sums.sum(),
                               rtol=1e-5, atol=1e-6)


def test_strided_views_and_explicit_scale(kernels: dict[KernelSpec, Any]) -> None:
    """q, out and the caches as non-contiguous views (a fused qkv buffer, a kv-interleaved cache)
    and an explicit softmax scale: the launcher copies what the kernel reads densely and writes
    back into the caller's view only."""
    spec = BF16_GQA2
    base = exact_batch([(6, 14), (1, 30)], num_q_heads=4, num_kv_heads=2, head_dim=16,
                       block_size=8, dtype=torch.bfloat16, seed=6)
    q = base["q"]
    qkv = torch.randn(q.shape[0], 12, 16).to(torch.bfloat16)
    qkv[:, 4:8] = q
    kv = torch.stack([base["k_cache"], base["v_cache"]], dim=2)
    out_buf = torch.full((q.shape[0], 4, 32), float("nan"), dtype=torch.bfloat16)
    batch = dict(base, q=qkv[:, 4:8], k_cache=kv[:, :, 0], v_cache=kv[:, :, 1])
    assert not batch["q"].is_contiguous() and not batch["k_cache"].is_contiguous()
    table = build_task_table(batch["cu_seqlens_q"], batch["seqlens_kv"], num_q_heads=4,
                             num_kv_heads=2, block_q=4, num_programs=2)
    out = out_buf[:, :, 8:24]
    res = kernels[spec](*[batch[k] for k in ARGS], table, scale=0.3, out=out)
    assert res is out
    assert torch.isnan(out_buf[:, :, :8]).all() and torch.isnan(out_buf[:, :, 24:]).all()
    assert_close(out, oracle(batch, spec, tree_mask=None, window=None, scale=0.3), spec.dtype,
                 "strided views")


def test_empty_batch(kernels: dict[KernelSpec, Any]) -> None:
    """A batch with no query rows returns the output without launching anything."""
    batch = exact_batch([(0, 5), (0, 2)], num_q_heads=2, num_kv_heads=2, head_dim=16,
                        block_size=4, dtype=torch.float32)
    table = build_task_table(batch["cu_seqlens_q"], batch["seqlens_kv"], num_q_heads=2,
                             num_kv_heads=2, block_q=3, num_programs=2)
    out = kernels[NOT_CAUSAL_TREE](*[batch[k] for k in ARGS], table, tree_mask=causal_tree(batch))
    assert out.shape == (0, 2, 16)


@given(
    kinds=batch_mixes(max_size=5),
    seed=st.integers(0, 2**16),
    block_size=st.sampled_from([1, 5, 16]),
    heads=st.sampled_from([(4, 1), (8, 2)]),
    kv_split=st.sampled_from([0, 16]),
    num_programs=st.sampled_from([1, 3, 8]),
)
@settings(max_examples=10, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_random_mixes(kernels: dict[KernelSpec, Any], kinds: list[str], seed: int, block_size: int,
                      heads: tuple[int, int], kv_split: int, num_programs: int) -> None:
    """Random batch mixes on the GQA-4 tree kernel (fresh inputs every example)."""
    hq, hkv = heads
    batch = make_batch(kinds, num_q_heads=hq, num_kv_heads=hkv, head_dim=16, block_size=block_size,
                       dtype=torch.float32, seed=seed, tree_size=4, max_len=36)
    run_and_check(kernels[GQA4_TREE], GQA4_TREE, batch, kv_split=kv_split,
                  num_programs=num_programs, what=f"{kinds} seed={seed}")


# --------------------------------------------------------------------------------------------
# Additive attention bias
# --------------------------------------------------------------------------------------------


def random_bias(batch: dict[str, Any], *, seqs: int, heads: int, causal: bool, seed: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A bias ``[seqs, heads, max n_s + 1, max L_s + 1]`` for `batch` (`seqs`/`heads` 1 to
    broadcast): N(0, 2) values, about a fifth -inf, and query row 0 of head 0 hidden entirely (its
    output must be zeros). NaN wherever no row may read it — the extra row and column, each
    sequence's entries beyond its n_s x L_s (per-sequence biases), and on causal kernels the keys
    after a row's own position, which the causal rule hides whatever the bias says — so a read
    out of range, or a bias that leaks past the mask, poisons the result."""
    q_lens, kv_lens = batch_lengths(batch)
    gen = torch.Generator().manual_seed(seed)
    shape = (seqs, heads, max(q_lens) + 1, max(kv_lens) + 1)
    bias = torch.randn(shape, generator=gen) * 2
    bias[torch.rand(shape, generator=gen) < 0.2] = float("-inf")
    bias[:, 0, 0] = float("-inf")
    bias[:, :, -1] = float("nan")
    bias[:, :, :, -1] = float("nan")
    if seqs > 1:
        for s, (n, kv) in enumerate(zip(q_lens, kv_lens)):
            bias[s, :, n:] = float("nan")
            bias[s, :, :, kv:] = float("nan")
            if causal:  # row i is at position kv - n + i: keys after it are hidden
                rows = torch.arange(n)[:, None]
                bias[s, :, :n, :kv][:, (torch.arange(kv)[None, :] > kv - n + rows)] = float("nan")
    return bias.to(dtype)


# (spec, block_size, Hq, Hkv, kinds, bias seqs / heads (1: broadcast), bias dtype, kv_split):
# per-sequence and broadcast shapes, a float16 bias (converted by the launcher), the causal rule
# and tree verify with a bias, split-KV (the merge kernel) with rows the bias hides in some chunks.
NO_VERIFY = ["prefill", "chunked", "decode", "empty", "decode", "chunked"]
BIAS_CASES = [
    (BIAS_TREE, 5, 4, 2, MIX, "S", "Hq", torch.float32, 0),
    (BIAS_TREE, 16, 2, 1, MIX, 1, "Hq", torch.float32, 16),
    (BIAS_FP16, 5, 4, 2, NO_VERIFY, "S", 1, torch.float16, 0),
    (BIAS_FP16, 16, 2, 1, NO_VERIFY, "S", "Hq", torch.float32, 16),
]


@pytest.mark.parametrize("case", range(len(BIAS_CASES)))
def test_bias_mixed_batch(kernels: dict[KernelSpec, Any], case: int) -> None:
    """An additive bias with -inf entries and fully hidden rows on a mixed batch, against the
    reference's semantics: bias added to the scaled scores, -inf hides a key, the visibility rules
    override the bias, a row hidden entirely outputs zeros."""
    spec, block_size, hq, hkv, kinds, seqs, heads, bias_dtype, kv_split = BIAS_CASES[case]
    batch = make_batch(kinds, num_q_heads=hq, num_kv_heads=hkv, head_dim=spec.param("head_dim"),
                       block_size=block_size, dtype=getattr(torch, spec.dtype), seed=200 + case,
                       tree_size=6, max_len=40)
    num_seqs = batch["seqlens_kv"].shape[0]
    bias = random_bias(batch, seqs=num_seqs if seqs == "S" else 1, heads=hq if heads == "Hq" else 1,
                       causal=spec.param("causal"), seed=case, dtype=bias_dtype)
    table = run_and_check(kernels[spec], spec, batch, kv_split=kv_split, attn_bias=bias,
                          what=f"bias case {case}: {spec.name} bias {list(bias.shape)}")
    if kv_split:
        assert table.merges.shape[0] > 0, "the case should exercise the merge kernel"


def test_bias_in_all_three_pipelines(kernels: dict[KernelSpec, Any]) -> None:
    """The bias reaches the 2-stage (decode), 3-stage and 4-stage pipelines, with and without
    split-KV; once as a float32 view (read in place) and once with strided keys (copied)."""
    lengths = [(1, 30), (3, 3), (9, 40), (2, 7), (1, 1)]
    batch = exact_batch(lengths, num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=16,
                        dtype=torch.float32, seed=8)
    bias = random_bias(batch, seqs=len(lengths), heads=1, causal=True, seed=8)
    strided_keys = bias.transpose(2, 3).contiguous().transpose(2, 3)
    for kv_split, b in ((0, bias), (24, strided_keys)):
        table = run_and_check(kernels[BIAS_TREE], BIAS_TREE, batch, kv_split=kv_split, attn_bias=b,
                              what=f"bias pipelines, kv_split={kv_split}")
        assert set(pipelines(table, BIAS_TREE, block_size=16)) == {"2-stage", "3-stage", "4-stage"}


def test_bias_operand_is_read_in_place_when_it_can_be() -> None:
    """The launcher hands the kernel a float32 bias with contiguous keys as it is (broadcast dims
    as stride 0, no copy) and copies only the distinct rows of anything else."""
    extent = (3, 7)  # the batch's longest query run and KV length
    shared = torch.randn(1, 4, 3, 7)
    operand, tiling = _bias_operand(shared.expand(2, 4, 3, 7), extent, "k")
    assert operand.data_ptr() == shared.data_ptr() and tiling == (0, 21, 7, 84)
    # A [S, 1, q, kv] float16 bias: one float32 copy per sequence, heads stay broadcast.
    half = torch.randn(2, 1, 3, 8).half()
    operand, tiling = _bias_operand(half.expand(2, 4, 3, 8), extent, "k")
    assert operand.dtype == torch.float32 and operand.untyped_storage().nbytes() == 2 * 3 * 8 * 4
    assert tiling == (24, 0, 8, 48) and torch.equal(operand[1, 3], half[1, 0].float())
    # Strided keys: copied with contiguous keys.
    strided = torch.randn(1, 1, 8, 3).transpose(2, 3)
    operand, tiling = _bias_operand(strided.expand(2, 4, 3, 8), extent, "k")
    assert operand.stride(3) == 1 and torch.equal(operand[0, 0], strided[0, 0])
    with pytest.raises(ValueError, match=r"k: attn_bias must cover every query row and key of the batch, "
                                         r"\[S, Hq, >= 3, >= 7\], got \[2, 4, 3, 6\]"):
        _bias_operand(torch.zeros(2, 4, 3, 6), extent, "k")


def test_bias_launch_validation(kernels: dict[KernelSpec, Any]) -> None:
    """A bias kernel needs its bias; a kernel without a bias path refuses one."""
    args = exact_args(4, 2)
    table = build_task_table([0, 2], [5], num_q_heads=4, num_kv_heads=2, block_q=4, num_programs=1)
    tree = torch.ones(1, 4, 4, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="built with an attention bias"):
        kernels[BIAS_TREE](*args, table, tree_mask=tree)
    with pytest.raises(ValueError, match="attn_bias must broadcast"):
        kernels[BIAS_TREE](*args, table, tree_mask=tree, attn_bias=torch.zeros(1, 3, 2, 5))
    short = torch.zeros(1, 4, 2, 4)  # 4 keys for a 5-position sequence
    with pytest.raises(ValueError, match="attn_bias must cover"):
        kernels[BIAS_TREE](*args, table, tree_mask=tree, attn_bias=short)
    # A hand-made table without the host metadata: the check reads the tasks instead.
    bare = dataclasses.replace(table, cu_seqlens_q=torch.zeros(1, dtype=torch.int32),
                               seqlens_kv=torch.zeros(0, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"attn_bias must cover .* >= 5\]"):
        kernels[BIAS_TREE](*args, bare, tree_mask=tree, attn_bias=short)
    with pytest.raises(ValueError, match="without bias support"):
        kernels[FP32_WINDOW](*args, table, sliding_window=3, attn_bias=torch.zeros(1, 4, 2, 5))


def test_bias_ranges_narrow_the_ascend_tasks(kernels: dict[KernelSpec, Any]) -> None:
    """The kernel narrows each task to the keys its bias ranges say the tile's rows see, and
    reads no bias in their zero-bias run: a prompt with a causal mask as its bias matches the
    reference; ranges ending early drop the keys past them, and ranges calling every key
    plain leave the mask unread (the future leaks in), so the kernel does follow them."""
    from tileflow.attention_inputs import bias_ranges

    batch = exact_batch([(20, 20)], num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=8,
                        dtype=torch.float16, seed=9)
    bias = torch.full((20, 20), float("-inf")).triu(1)[None, None]
    table = build_task_table(batch["cu_seqlens_q"], batch["seqlens_kv"], num_q_heads=4, num_kv_heads=2,
                             block_q=3, num_programs=2, causal=False)
    args = [batch[k] for k in ARGS]
    want = attention_reference_dense(*args, causal=False, attn_bias=bias)
    got = kernels[BIAS_FP16](*args, table, attn_bias=bias)
    assert_close(got, want, "float16", "causal mask as a bias")
    # The same mask as bool (True = attend), as the dense op now hands it over: the launcher's
    # float32 copy turns it into 0 / -inf (a bool read as 0 / 1 would add 1 to every score and
    # leave the future unmasked).
    keep = bias == 0
    assert_close(kernels[BIAS_FP16](*args, table, attn_bias=keep), want, "float16", "causal mask as bool")
    assert_close(attention_reference_dense(*args, causal=False, attn_bias=keep), want, "float16", "reference, bool")
    short = bias_ranges(bias)
    short[..., 3] = short[..., 3].clamp(max=6)  # every row's keys end at 6
    cut = kernels[BIAS_FP16](*args, table, attn_bias=bias, attn_bias_ranges=short)
    assert_close(cut[:6], want[:6], "float16", "rows that see keys 0-5 only")
    assert (cut[6:].float() - want[6:].float()).abs().max() > 1e-2
    all_plain = torch.tensor([0, 0, 20, 20], dtype=torch.int32).expand(1, 20, 4)
    leaked = kernels[BIAS_FP16](*args, table, attn_bias=bias, attn_bias_ranges=all_plain)
    assert_close(leaked, attention_reference_dense(*args, causal=False), "float16", "no bias read")


def _attention_specs(archive: Any) -> list[KernelSpec]:
    """The distinct meta-attention specs an exported archive's graphs call."""
    return list(dict.fromkeys(
        KernelSpec.from_dict(k.spec) for g in archive.report.graphs for k in g.kernels
        if k.spec is not None and k.spec["op"] == "meta_attention"))


def _build_all(specs: list[KernelSpec], build_dir: Path, build: Any = None) -> dict[KernelSpec, Any]:
    """Each spec built in CPU-debug mode by `build` (`build_cpu_debug_kernel` unless given), two
    g++ at a time after a first build alone: two first builds in a new folder at once would each
    precompile the prelude."""
    if build is None:
        from tileflow.backends.ascend import build_cpu_debug_kernel as build

    first, *rest = specs
    built = {first: build(first, [HEADERS], build_dir=build_dir)}
    with ThreadPoolExecutor(max_workers=2) as pool:
        built.update(zip(rest, pool.map(lambda s: build(s, [HEADERS], build_dir=build_dir), rest)))
    return built


def _check_exported_program(archive: Any, model: torch.nn.Module, built: dict[KernelSpec, Any],
                            monkeypatch: pytest.MonkeyPatch, lengths: tuple[int, ...], tol: float) -> None:
    """The exported program with its attention on the `built` Ascend kernels (any other
    attention spec would be a KeyError) and its GEMMs on the reference backend: logits match
    eager transformers at every length, and every built kernel ran."""
    from models import VOCAB

    from tileflow import runtime

    real_get_kernel = runtime.get_kernel
    used: set[KernelSpec] = set()

    def get_kernel(target: str, spec: KernelSpec, artifact_dir: Path | None = None) -> Any:
        if spec.op == "meta_attention":
            used.add(spec)
            return built[spec]
        return real_get_kernel("reference", spec, artifact_dir)

    monkeypatch.setattr(runtime, "get_kernel", get_kernel)
    program = archive.program.module()
    with torch.no_grad():
        for n in lengths:
            ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n))
            torch.testing.assert_close(program(ids), model(ids, use_cache=False).logits, rtol=tol, atol=tol)
    assert used == set(built)


def test_exported_llama_attention_runs_on_the_ascend_kernels(build_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: the meta-attention specs a real (small) Llama exports for target 'ascend' —
    its causal mask, built from positions, proven the kernel's causal rule (no bias) — built in
    CPU-debug mode, (1) with a bias added (the form a model's padding mask takes) on a mixed batch
    against the reference, and (2) as they are, as the attention of the exported program itself
    (GEMMs on the reference backend), whose logits must match eager transformers."""
    from models import build, export_logits  # transformers: imported only here

    model = build("llama")
    archive = export_logits(model, "ascend")
    exported = _attention_specs(archive)
    assert exported and all(not s.param("bias") and s.param("causal") for s in exported), [s.name for s in exported]
    specs = [dataclasses.replace(s, params=tuple((k, True if k == "bias" else False if k == "causal" else v)
                                                 for k, v in s.params)) for s in exported]
    built = _build_all(specs + exported, build_dir)

    cfg = model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    for i, spec in enumerate(specs):
        batch = make_batch(NO_VERIFY, num_q_heads=hq, num_kv_heads=hkv, head_dim=spec.param("head_dim"),
                           block_size=16, dtype=getattr(torch, spec.dtype), seed=300 + i, max_len=70)
        bias = random_bias(batch, seqs=batch["seqlens_kv"].shape[0], heads=1, causal=False, seed=i)
        run_and_check(built[spec], spec, batch, kv_split=16 * i, attn_bias=bias,
                      what=f"exported {spec.name}")
    # decode-sized (block_q 8) and prefill-sized (block_q 32) tiles
    _check_exported_program(archive, model, {s: built[s] for s in exported}, monkeypatch, (3, 8, 20, 64), tol=1e-5)


@pytest.mark.parametrize("name", [pytest.param("gemma2", marks=GEMMA2_SOFTCAP), "gpt_oss",
                                  pytest.param("bloom", marks=BLOOM_ALIBI)])
def test_exported_softcap_sinks_and_alibi_run_on_the_ascend_kernels(name: str, build_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Gemma-2 (logit soft-capping; a window in every other layer's mask), gpt-oss (sinks,
    windows, MoE) and BLOOM (ALiBi inside the baddbmm that torch.export decomposes) exported for
    target 'ascend': both layers' attention on the meta-kernel with the model's feature, and the
    exported program on the CPU-debug Ascend kernels matches eager past the windows."""
    from models import export_zoo_model

    model, archive = export_zoo_model(name, "ascend")
    _check_exported_program(archive, model, _build_all(_attention_specs(archive), build_dir), monkeypatch,
                            (3, 20), tol=1e-4)


# --------------------------------------------------------------------------------------------
# Key starts (sequences packed in a dense row)
# --------------------------------------------------------------------------------------------

# (n_s, L_s): a 40-token prefill packing three sequences, a chunked prefill of 13 over a cached
# prefix of 17 packing two, a decode, an empty sequence, a chunk with stray starts and a 2-row
# chunk whose starts are past both rows' positions.
PACKED = [(40, 40), (13, 30), (1, 23), (0, 4), (9, 12), (2, 7)]


def packed_starts() -> torch.Tensor:
    """int32 [S, 40]: each query row's first key for `PACKED` (columns past n_s are -1, never read).

    Prefill rows 0-12 / 13-28 / 29-39 start at 0 / 13 / 29 (4-row tiles 12-15 and 28-31 straddle a
    start); the chunked prefill's rows at positions 17-21 start at 10, those at 22-29 at 22 (its
    tile of rows 4-7 straddles); the decode at 20. The stray chunk (positions 3-11) starts rows at
    arbitrary keys, rows 4 and 7 past their own positions (and row 4 past every key), which see no
    key and output zeros; so do both rows of the last sequence (positions 5 and 6, starts 9 and 7),
    whose tasks' KV ranges become empty."""
    starts = torch.full((len(PACKED), 40), -1, dtype=torch.int32)
    starts[0, :40] = torch.tensor([0] * 13 + [13] * 16 + [29] * 11)
    starts[1, :13] = torch.tensor([10] * 5 + [22] * 8)
    starts[2, :1] = 20
    starts[4, :9] = torch.tensor([0, 0, 5, 7, 20, 3, 11, 12, 9])
    starts[5, :2] = torch.tensor([9, 7])
    return starts


# (spec, block_size, Hq, Hkv, window, kv_split): GQA 2 and 4 (and MQA), pages of 7 (cutting
# chunks) and 16, windows of 5 and 100, forced split-KV (some slots see no key of some rows).
STARTS_CASES = [
    (STARTS_FP32, 7, 4, 2, None, 0),
    (STARTS_FP32, 16, 2, 1, None, 8),
    (STARTS_FP16_WINDOW, 7, 4, 2, 5, 0),
    (STARTS_FP16_WINDOW, 5, 4, 2, 100, 8),
    (STARTS_NOT_CAUSAL, 7, 8, 2, None, 0),
    (STARTS_NOT_CAUSAL, 16, 4, 1, None, 8),
]


@pytest.mark.parametrize("case", range(len(STARTS_CASES)))
def test_key_starts(kernels: dict[KernelSpec, Any], case: int) -> None:
    """Key starts on a mixed batch (prefill, chunked prefill over a prefix, decode, an empty
    sequence; starts that change inside a tile; rows whose start is past their position output
    zeros) with the causal rule, windows, soft-capping, sinks and ALiBi, whole and split-KV,
    against the float64 oracle; the oracle agrees with the reference backend's own executor, and
    the starts change the result."""
    spec, block_size, hq, hkv, window, kv_split = STARTS_CASES[case]
    batch = exact_batch(PACKED, num_q_heads=hq, num_kv_heads=hkv, head_dim=16, block_size=block_size,
                        dtype=getattr(torch, spec.dtype), seed=400 + case)
    starts = packed_starts()
    features: dict[str, Any] = {"key_starts": starts}
    if spec.param("softcap", False):
        features.update(softcap=3.0, sinks=torch.linspace(-1.0, 2.0, hq),
                        alibi_slopes=2.0 ** -torch.arange(1.0, hq + 1))
    table = run_and_check(kernels[spec], spec, batch, window=window, kv_split=kv_split, features=features,
                          what=f"key starts case {case}: {spec.name} bs={block_size} {hq}/{hkv}")
    if kv_split:
        assert table.merges.shape[0] > 0, "the case should exercise the merge kernel"
    want = oracle(batch, spec, tree_mask=None, window=window, features=features)
    wide = [batch[k].double() if batch[k].is_floating_point() else batch[k] for k in ARGS]
    executed = run_task_table(table, *wide, causal=spec.param("causal"), sliding_window=window,
                              **{k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                                 for k, v in features.items()})
    torch.testing.assert_close(executed, want, rtol=1e-9, atol=1e-9)
    cu = batch["cu_seqlens_q"].tolist()
    stray = [cu[4] + 4, cu[4] + 7, cu[5], cu[5] + 1]
    assert (want[stray] == 0).all() and (want[:cu[4]].abs().sum(-1) > 0).all()
    plain = oracle(batch, spec, tree_mask=None, window=window,
                   features={k: v for k, v in features.items() if k != "key_starts"})
    assert (want - plain).abs().max() > 0.1, "the starts should hide keys the plain rules show"


def test_key_starts_skip_the_keys_no_row_of_a_tile_sees(kernels: dict[KernelSpec, Any]) -> None:
    """Each task's KV range starts at the earliest start of its tile's rows (the host's table does
    not know the starts): with the keys before each sequence's earliest start NaN in both caches
    (a P of 0 times a NaN value would poison a row), the decode, single-chunk, multi-chunk and
    split-KV tasks still match the oracle of the clean batch."""
    block_size = 7
    batch = exact_batch(PACKED, num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=block_size,
                        dtype=torch.float32, seed=9)
    starts = packed_starts()
    want = oracle(batch, STARTS_FP32, tree_mask=None, window=None, features={"key_starts": starts})
    poisoned = dict(batch, k_cache=batch["k_cache"].clone(), v_cache=batch["v_cache"].clone())
    hidden = 0
    for s, (n, kv) in enumerate(PACKED):
        pos = torch.arange(min(int(starts[s, :n].min()), kv) if n else kv)
        pages = batch["block_table"][s, pos // block_size].long()
        for cache in ("k_cache", "v_cache"):
            poisoned[cache][pages, pos % block_size] = float("nan")
        hidden += len(pos) if n else 0
    assert hidden == 10 + 20 + 7
    for kv_split in (0, 8):
        table = build_task_table(batch["cu_seqlens_q"], batch["seqlens_kv"], num_q_heads=4, num_kv_heads=2,
                                 block_q=4, num_programs=3, kv_split=kv_split)
        poisoned_seqs = (table.tasks[:, 0] == 1) | (table.tasks[:, 0] == 2) | (table.tasks[:, 0] == 5)
        assert (poisoned_seqs & (table.tasks[:, 4] == 0)).any()  # the host's ranges reach the NaN keys
        out = torch.full_like(batch["q"], float("nan"))
        kernels[STARTS_FP32](*[poisoned[k] for k in ARGS], table, out=out, key_starts=starts)
        assert_close(out, want, "float32", f"poisoned keys before the starts, kv_split={kv_split}")


def test_key_starts_are_checked(kernels: dict[KernelSpec, Any]) -> None:
    """A key-starts kernel needs its starts, covering every query row of the batch (the shared
    launch checks); a kernel without them refuses them."""
    batch = exact_batch([(5, 5), (3, 9)], num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=4,
                        dtype=torch.float32, seed=5)
    args = [batch[k] for k in ARGS]
    table = build_task_table(batch["cu_seqlens_q"], batch["seqlens_kv"], num_q_heads=4, num_kv_heads=2,
                             block_q=4, num_programs=2)
    kernel = kernels[STARTS_FP32]
    with pytest.raises(ValueError, match="built with key starts: pass key_starts"):
        kernel(*args, table)
    with pytest.raises(ValueError, match="key_starts must cover every query row"):
        kernel(*args, table, key_starts=torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="key_starts must cover every query row"):
        kernel(*args, table, key_starts=torch.zeros(1, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="built without key starts"):
        kernels[FP32_WINDOW](*args, table, sliding_window=4, key_starts=torch.zeros(2, 5, dtype=torch.int32))
    # Starts as any integer tensor, wider than the batch needs: converted and read with their row length.
    starts = torch.tensor([[0, 0, 2, 2, 2, 9, 9], [7, 7, 8, 0, 0, 0, 0]])
    out = kernel(*args, table, key_starts=starts)
    assert_close(out, oracle(batch, STARTS_FP32, tree_mask=None, window=None, features={"key_starts": starts}),
                 "float32", "int64 starts, 7 columns")


# --------------------------------------------------------------------------------------------
# Specs, sources, validation
# --------------------------------------------------------------------------------------------


def test_golden_sources() -> None:
    """The emitted files of one representative spec, kept under tests/golden/ascend/."""
    sources = render_attention_sources(FP16_TREE_WINDOW)
    assert set(sources.kernels) == {e.name for e in attention_entries(FP16_TREE_WINDOW)}
    check_golden("ascend/meta_attention_float16_gqa2_tree_window.txt", sources.combined())


def test_source_shape() -> None:
    """Three pipelines as separate functions; mask code only for the rules the spec asks for;
    the buffer sizes the UB budget counted are the ones the kernel asks for."""
    text = render_attention_sources(FP16_TREE_WINDOW).files
    kernel = next(v for k, v in text.items() if k.startswith("op_kernel/"))
    for name in ("TwoStageDecode", "ThreeStageSingleChunk", "FourStageMultiChunk", "treeMaskGm",
                 "tiling.window", "REGIST_MATMUL_OBJ", "BUFFER_NUM = 2", "Cast(dst, src"):
        assert name in kernel, name
    plain = render_attention_sources(attn_spec(causal=False)).files
    plain_kernel = next(v for k, v in plain.items() if k.startswith("op_kernel/"))
    assert "MaskScores" not in plain_kernel and "treeMaskGm" not in plain_kernel
    assert "Cast(" not in plain_kernel  # fp32: no conversions
    layout = attention_layout(FP16_TREE_WINDOW)
    for buf in layout.main_buffers():
        assert f"pipe->InitBuffer({buf.member}, " in kernel
        assert f", {buf.nbytes});  // {buf.purpose}" in kernel
    assert "bias" not in kernel.lower()  # no bias path without bias=True
    # With a bias: the extra input, its tiling fields and UB tile, one load per pipeline.
    biased = render_attention_sources(BIAS_FP16).files
    bias_kernel = next(v for k, v in biased.items() if k.startswith("op_kernel/"))
    assert bias_kernel.count("LoadBiasChunk(t, ") == 3 and "AddBias(t, scores, chunkLen)" in bias_kernel
    assert "GM_ADDR attn_bias" in bias_kernel and "biasQue" in bias_kernel
    assert "int32_t biasStrideRow;" in next(v for k, v in biased.items() if k.endswith("_tiling.h"))
    # With key starts: the extra input, its row length in the tiling, the rule in MaskScores (a
    # kernel that is not causal has one only for them); none of it elsewhere.
    assert "keyStarts" not in kernel and "keyStarts" not in bias_kernel and "key_starts" not in kernel
    starts = render_attention_sources(STARTS_NOT_CAUSAL).files
    starts_kernel = next(v for k, v in starts.items() if k.startswith("op_kernel/"))
    assert "GM_ADDR key_starts" in starts_kernel and "MaskScores(t, scores, chunkStart, chunkLen);" in starts_kernel
    assert starts_kernel.count("keyStartsGm.GetValue(") == 2  # the task's first key, and the mask
    assert "int32_t startsRows;" in next(v for k, v in starts.items() if k.endswith("_tiling.h"))


@pytest.mark.parametrize("params,match", [
    ({"head_dim": 1024, "block_q": 16, "gqa": 4}, "unified buffer"),
    ({"head_dim": 24, "dtype": "float16"}, "multiple of 16"),
    ({"head_dim": 12}, "multiple of 8"),
    ({"block_kv": 24}, "block_kv=24"),
    ({"dtype": "float64"}, "dtype"),
    ({"alibi": True, "tree": True}, "ALiBi with tree verify is not supported"),
])
def test_bad_specs(params: dict, match: str) -> None:
    """Specs the Ascend kernel cannot implement are refused at render time, saying why."""
    dtype = params.pop("dtype", "float32")
    with pytest.raises(ValueError, match=match):
        render_attention_sources(attn_spec(dtype, **params))


def test_cube_outputs_hold_a_whole_base_block() -> None:
    """GetTensorC writes a whole baseM x baseN block (CANN: the C tensor must hold baseM * baseN
    elements) and the base M is the tile rows padded to 16: the S and P V queues are sized for
    CUBE_ROWS, not TILE_ROWS (rows 8 = block_q 4 x gqa 2 used to get half a base block; the
    mixed-batch tests run those specs through a double that enforces the rule)."""
    for spec in SPECS:
        layout = attention_layout(spec)
        sizes = {b.member: b.nbytes for b in layout.main_buffers()}
        assert sizes["scoreQue"] >= layout.cube_rows * layout.block_kv * 4, spec.name
        assert sizes["valueQue"] >= layout.cube_rows * layout.head_dim * 4, spec.name
    assert any(attention_layout(s).rows % 16 for s in SPECS)


def test_ub_budget_is_what_the_double_enforces() -> None:
    """The largest accepted spec of a family fits the UB exactly as counted (the double throws
    beyond 192 KiB), and the next size up is refused."""
    layout = attention_layout(attn_spec("float16", head_dim=128, gqa=4, block_q=8, block_kv=32))
    assert sum(b.total for b in layout.main_buffers()) <= UB_BYTES
    with pytest.raises(ValueError, match="unified buffer"):
        attention_layout(attn_spec("float16", head_dim=128, gqa=4, block_q=32, block_kv=64))
    # The bias tile is budgeted too: an fp32 prefill tile that fits without a bias does not with one.
    big = {"head_dim": 64, "gqa": 4, "block_q": 16, "block_kv": 64}
    plain = attention_layout(attn_spec("float32", **big))
    assert sum(b.total for b in plain.main_buffers()) <= UB_BYTES
    with pytest.raises(ValueError, match="unified buffer"):
        attention_layout(attn_spec("float32", bias=True, **big))


def test_launch_validation(kernels: dict[KernelSpec, Any]) -> None:
    """The shared launch checks (tileflow.attention_inputs) guard the Ascend launcher too."""
    batch = exact_batch([(3, 7), (1, 4)], num_q_heads=4, num_kv_heads=2, head_dim=16,
                        block_size=4, dtype=torch.bfloat16)
    table = build_task_table(batch["cu_seqlens_q"], batch["seqlens_kv"], num_q_heads=4,
                             num_kv_heads=2, block_q=4, num_programs=2)
    launch = kernels[BF16_GQA2]
    args = [batch[k] for k in ARGS]
    with pytest.raises(ValueError, match="head_dim"):
        launch(torch.zeros(4, 4, 32, dtype=torch.bfloat16), *args[1:], table)
    with pytest.raises(ValueError, match="bfloat16"):
        launch(args[0].float(), *args[1:], table)
    with pytest.raises(ValueError, match="built without one"):
        launch(*args, table, sliding_window=4)
    with pytest.raises(ValueError, match="without tree"):
        launch(*args, table, tree_mask=torch.ones(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_q"):
        bad = build_task_table(batch["cu_seqlens_q"], batch["seqlens_kv"], num_q_heads=4,
                               num_kv_heads=2, block_q=2, num_programs=2)
        launch(*args, bad)
    with pytest.raises(ValueError, match="tree_mask bool"):
        kernels[GQA4_TREE](*exact_args(8, 2), build_task_table(
            [0, 2], [5], num_q_heads=8, num_kv_heads=2, block_q=2, num_programs=1))


def test_host_tiling_refuses_bad_launches(kernels: dict[KernelSpec, Any]) -> None:
    """The emitted host tiling function checks its scalars and reports a status code."""
    sources = kernels[GQA4_TREE].meta["sources"]
    lib = build_cpu_debug(sources, [HEADERS], build_dir=Path(kernels[GQA4_TREE].meta["library"]).parent.parent)
    size = lib.call(f"{sources.ident}_tiling_size", restype=ctypes.c_uint32)
    buf = torch.zeros(size, dtype=torch.uint8)

    def tiling(**changes: int) -> int:
        # In the tiling function's parameter order.
        values = {"numSeqs": 1, "numQHeads": 8, "numKvHeads": 2, "blockSize": 16, "maxBlocks": 1,
                  "numBlocks": 1, "totalQ": 2, "numTasks": 2, "numSlots": 0, "numMerges": 0,
                  "numPrograms": 1, "treeSize": 4, "window": 0}
        values.update(changes)
        return lib.call(f"{sources.ident}_tiling", *(ctypes.c_int32(v) for v in values.values()),
                        ctypes.c_float(0.25), buf)

    codes = {name: code for code, (name, _) in TILING_ERRORS.items()}
    assert tiling() == 0
    assert tiling(numQHeads=6) == codes["TILING_BAD_HEADS"]
    assert tiling(blockSize=0) == codes["TILING_BAD_PAGES"]
    assert tiling(numTasks=-1) == codes["TILING_BAD_COUNTS"]
    assert tiling(numPrograms=0) == codes["TILING_BAD_PROGRAMS"]
    assert tiling(treeSize=-1) == codes["TILING_BAD_TREE"]


def test_softcap_launches_are_checked(kernels: dict[KernelSpec, Any]) -> None:
    """A soft-capping kernel needs its cap at launch (and a kernel without one refuses a cap);
    its host tiling refuses caps that are not finite and positive."""
    kernel = kernels[ALIBI_CAP_SINKS]
    batch = exact_batch([(2, 5)], num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=8,
                        dtype=torch.float32, seed=3)
    table = build_task_table(batch["cu_seqlens_q"], batch["seqlens_kv"], num_q_heads=4, num_kv_heads=2,
                             block_q=4, num_programs=1)
    per_head = {"sinks": torch.zeros(4), "alibi_slopes": torch.ones(4)}
    with pytest.raises(ValueError, match="built with logit soft-capping: pass softcap"):
        kernel(*[batch[k] for k in ARGS], table, **per_head)
    with pytest.raises(ValueError, match="softcap was given but the kernel was built without"):
        kernels[BF16_GQA2](*[batch[k].bfloat16() if batch[k].is_floating_point() else batch[k] for k in ARGS],
                           table, softcap=1.0)
    sources = kernel.meta["sources"]
    lib = build_cpu_debug(sources, [HEADERS], build_dir=Path(kernel.meta["library"]).parent.parent)
    sizes = (1, 4, 2, 8, 1, 1, 2, 1, 0, 0, 1, 0, 0)
    assert _host_tiling(lib.call, sources.ident, "cap", sizes, (0.25, 30.0)).numel() > 0
    for cap in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="the logit soft-cap must be a finite number > 0"):
            _host_tiling(lib.call, sources.ident, "cap", sizes, (0.25, cap))


# --------------------------------------------------------------------------------------------
# Batches with exact lengths
# --------------------------------------------------------------------------------------------


def exact_args(hq: int, hkv: int) -> list[torch.Tensor]:
    """The op's tensor arguments for one sequence with 2 new tokens over 5 positions (fp32)."""
    batch = exact_batch([(2, 5)], num_q_heads=hq, num_kv_heads=hkv, head_dim=16, block_size=8,
                        dtype=torch.float32)
    return [batch[k] for k in ARGS]


def test_batch_lengths_helper_agrees() -> None:
    """exact_batch's metadata is what it was asked for (guards the helper itself)."""
    batch = exact_batch([(3, 7), (0, 2)], num_q_heads=2, num_kv_heads=1, head_dim=16,
                        block_size=3, dtype=torch.float32)
    assert batch_lengths(batch) == ([3, 0], [7, 2])
    assert math.isnan(batch["k_cache"][int(batch["block_table"][1, 0]), 2, 0, 0])


# --------------------------------------------------------------------------------------------
# Mutation audit: buffer sizes when head_dim != block_kv, budget edges, launch sizes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,block_size", [(HEAD_DIM_OVER_KV, 8), (KV_OVER_HEAD_DIM, 64)],
                         ids=["head_dim>block_kv", "block_kv>head_dim"])
def test_head_dim_and_block_kv_differ(kernels: dict[KernelSpec, Any], spec: KernelSpec, block_size: int) -> None:
    """The reduction scratch holds max(block_kv, head_dim) floats: the decode GEMV reduces
    HEAD_DIM products per key and the softmax reduces a chunk's columns, so a kernel whose head_dim
    and block_kv differ (every other spec here has them equal) runs all three pipelines, and
    split-KV, within the buffers it asked for (pages of 64 let a chunk be longer than head_dim)."""
    layout = attention_layout(spec)
    assert layout.head_dim != layout.block_kv
    lengths = [(1, 30), (3, 3), (9, 60), (2, 7), (1, 70)]
    batch = exact_batch(lengths, num_q_heads=4, num_kv_heads=2, head_dim=layout.head_dim, block_size=block_size,
                        dtype=getattr(torch, spec.dtype), seed=21)
    for kv_split in (0, 24):
        table = run_and_check(kernels[spec], spec, batch, kv_split=kv_split,
                              what=f"{spec.name} bs={block_size}, kv_split={kv_split}")
        if kv_split:
            assert table.merges.shape[0] > 0
        else:
            assert set(pipelines(table, spec, block_size=block_size)) == {"2-stage", "3-stage", "4-stage"}


def test_ub_budget_admits_an_exact_fit() -> None:
    """A kernel whose buffers take exactly the 192 KiB of UB fits (the double's InitBuffer allows
    it too): the budget refuses only what goes beyond."""
    layout = attention_layout(attn_spec("float32", head_dim=56, gqa=3, block_q=32, block_kv=48))
    assert sum(b.total for b in layout.main_buffers()) == UB_BYTES


def _fake_host_call(calls: list[tuple[str, tuple[Any, ...]]]) -> Any:
    """A host_call standing in for the emitted host library: tiling size 64 bytes, tiling OK, a
    Matmul system workspace of 32 bytes; records each call."""

    def host_call(name: str, *args: Any, restype: Any = ctypes.c_int) -> int:
        calls.append((name, args))
        if name.endswith("_tiling_size"):
            return 64
        if name.endswith("_sys_workspace_size"):
            return 32
        return 0

    return host_call


def test_launch_block_counts() -> None:
    """The main kernel runs one block per task-table program, up to MAX_BLOCK_DIM (one more is
    refused before anything runs); the merge kernel min(merge rows, cores) blocks."""
    from tileflow.backends.ascend.attention import make_attention_launcher
    from tileflow.backends.ascend.gemm import MAX_BLOCK_DIM

    spec = attn_spec("float32", gqa=2, block_q=4)
    batch = exact_batch([(9, 40), (3, 30)], num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=8,
                        dtype=torch.float32, seed=4)
    args = [batch[k] for k in ARGS]
    runs: list[tuple[str, int]] = []

    def run(entry: Any, blocks: int, tensors: list[Any]) -> None:
        runs.append((entry.name, blocks))

    for programs, cores in ((3, 2), (3, 64), (MAX_BLOCK_DIM, 24)):
        runs.clear()
        launch = make_attention_launcher(spec, _fake_host_call([]), run, cores)
        table = build_task_table(batch["cu_seqlens_q"], batch["seqlens_kv"], num_q_heads=4, num_kv_heads=2,
                                 block_q=4, num_programs=programs, kv_split=8)
        merges = table.merges.shape[0]
        assert merges > 2
        launch(*args, table)
        main, merge = attention_entries(spec)
        assert runs == [(main.name, programs), (merge.name, min(merges, cores))], (programs, cores)
    too_many = build_task_table(batch["cu_seqlens_q"], batch["seqlens_kv"], num_q_heads=4, num_kv_heads=2,
                                block_q=4, num_programs=MAX_BLOCK_DIM + 1)
    runs.clear()
    with pytest.raises(ValueError, match=f"more than the {MAX_BLOCK_DIM} blocks"):
        launch(*args, too_many)
    assert runs == []


def test_host_tiling_refuses_sizes_beyond_int32() -> None:
    """A launch size the int32 tiling cannot hold is refused before the host function sees it
    (ctypes would wrap 2**31 to a negative number silently); the int32 extremes pass."""
    calls: list[tuple[str, tuple[Any, ...]]] = []
    host_call = _fake_host_call(calls)
    for v in (2**31 - 1, -(2**31)):
        assert _host_tiling(host_call, "k", "where", (1, v), (0.25,)).numel() == 64
        assert calls[-1][1][1].value == v
    calls.clear()
    for v in (2**31, -(2**31) - 1):
        with pytest.raises(ValueError, match=rf"where: a launch size \({v}\) does not fit the kernel's int32 tiling"):
            _host_tiling(host_call, "k", "where", (1, v), (0.25,))
    assert [name for name, _ in calls] == ["k_tiling_size", "k_tiling_size"]


def test_host_tiling_refuses_a_window_below_one(kernels: dict[KernelSpec, Any]) -> None:
    """The emitted host tiling of a sliding-window kernel refuses a window below 1 (the launcher
    checks it too; the host function guards callers that bypass it) and accepts 1."""
    kernel = kernels[FP32_WINDOW]
    sources = kernel.meta["sources"]
    lib = build_cpu_debug(sources, [HEADERS], build_dir=Path(kernel.meta["library"]).parent.parent)
    sizes = (1, 4, 2, 8, 1, 1, 2, 1, 0, 0, 1, 0)  # through treeSize; the window follows
    assert _host_tiling(lib.call, sources.ident, "window", (*sizes, 1), (0.25,)).numel() > 0
    for window in (0, -3):
        with pytest.raises(ValueError, match="the sliding window must be >= 1"):
            _host_tiling(lib.call, sources.ident, "window", (*sizes, window), (0.25,))


@pytest.mark.parametrize("window", [3, 2**31 - 9, 2**31 - 1])
def test_a_window_up_to_int32_max_hides_only_what_it_should(kernels: dict[KernelSpec, Any], window: int) -> None:
    """The window rule hides positions <= p - w. Without the causal rule a chunk may start past a
    row's own position (a prompt's first tile against its second page), where p - w + 1 - chunk
    start fell below INT32_MIN for a window near INT32_MAX (which the launch accepts): the int32
    wrapped to a large positive bound and the row lost every key of that chunk."""
    batch = exact_batch([(8, 8), (5, 13)], num_q_heads=1, num_kv_heads=1, head_dim=16, block_size=4,
                        dtype=torch.float32, seed=31)
    for kv_split in (0, 4):
        run_and_check(kernels[NOT_CAUSAL_WINDOW], NOT_CAUSAL_WINDOW, batch, window=window, kv_split=kv_split,
                      what=f"not causal, window {window}, kv_split={kv_split}")


@pytest.mark.parametrize("spec", [FP32_WINDOW, ALIBI_CAP_SINKS, CAP_SINKS_WINDOW], ids=lambda s: s.name)
def test_no_reciprocal_on_the_float_path(spec: KernelSpec) -> None:
    """CANN documents `Reciprocal` as short of float accuracy ("float 的算子结果对比误差不满足双万分之一的
    要求 ... 建议使用 Div 替代"), i.e. worse than 1e-4 relative, ten times the float32 tolerance these
    kernels are held to; the double computes 1 / x exactly and cannot show it. Every row of every
    output is divided by its softmax sum, and soft-capped scores by 1 + exp(2x): both must use Div."""
    sources = render_attention_sources(spec)
    kernel = sources.files[sources.kernel_file]
    assert "Reciprocal(" not in kernel
