"""More transformers architectures through `backend="tileflow"` than the five of `test_models.py`:
each compiles to one graph over every length and matches eager, every linear becomes a
`padded_gemm`, and every attention runs on the meta-kernel (Gemma-2's with its logit soft-capping,
gpt-oss's with its sinks, BLOOM's and MPT's with ALiBi); OPT's ReLU and Nemotron's squared ReLU
fuse into their GEMMs, and so do Gemma's GeGLU and Phi-3's SwiGLU over one stacked weight."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from models import BLOOM_ALIBI, GEMMA2_SOFTCAP, VOCAB, ZOO, _causal_lm, export_zoo_model

import tileflow
from tileflow.kernel_spec import GATED_ACTIVATIONS


def _compiled(name: str) -> tuple[torch.nn.Module, Callable[..., Any], tileflow.Report]:
    """The zoo's model `name` (seeded), compiled for the reference target, and its report."""
    torch.manual_seed(0)
    model = ZOO[name][0]().eval()
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"target": "reference"}, report=report), dynamic=True)
    return model, compiled, report


# SDPA models close to Llama (and DeepSeek-V3 beside its latent-attention variant) in the extended run;
# Nemotron's too (its squared-ReLU MLP fused in the default run: test_gemm_padding's
# test_relu_and_squared_relu_fuse).
_NEAR_LLAMA = ("gemma", "qwen3", "gpt_neox", "deepseek_v3", "nemotron")
# The newer architectures at the zoo's end (tests/models.py) as well: each compiled and checked
# once (about 5 s), beside the default run's near relatives.
_EXTENDED_ONLY = (*_NEAR_LLAMA, "gemma3", "cohere", "cohere2", "phi", "gptj", "codegen", "starcoder2", "olmo2", "exaone4",
                  "glm4", "apertus", "arcee", "granite", "smollm3", "olmoe", "granitemoe")


# Behaviours of newer transformers releases the test looks at, by model.
_NEWER = {"gemma2": GEMMA2_SOFTCAP, "bloom": BLOOM_ALIBI, "bloom_6_heads": BLOOM_ALIBI}


@pytest.mark.parametrize("name", [pytest.param(name, marks=[*([pytest.mark.extended] if name in _EXTENDED_ONLY else []),
                                                            *([_NEWER[name]] if name in _NEWER else [])])
                                  for name in sorted(ZOO)])
def test_architecture_compiles_once_and_matches_eager(name: str) -> None:
    features = ZOO[name][1]
    model, compiled, report = _compiled(name)
    with torch.no_grad():
        for seq_len in (3, 9, 14):  # 9 and 14 pass Gemma-2's sliding window of 8
            ids = torch.randint(0, VOCAB, (2, seq_len))
            got, want = compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits
            assert (got - want).abs().max().item() <= 1e-4, f"{name} at seq_len={seq_len}"
    assert len(report.graphs) == 1 and report.recompiles == 0
    rewrites = report.rewrites
    # Every linear is a padded_gemm, or shares one: an up projection its gate's gated kernel, a
    # K or V projection its Q's.
    # (A gated GEMM over one stacked gate-and-up weight, Phi-3's, merges none.)
    gated = sum(rewrites.get(f"fused_{name}", 0) for name in GATED_ACTIVATIONS) - rewrites.get("stacked_gate_up", 0)
    merged = gated + rewrites.get("fused_siblings", 0)
    assert rewrites["canonical_linear"] == rewrites["padded_gemm"] + merged > 0
    assert rewrites["meta_attention"] == 2 and not report.fallbacks, report.fallbacks
    for feature in ("logit_softcap", "attention_sinks", "alibi", *features):
        assert rewrites.get(feature, 0) == (2 if feature in features else 0), feature
    # gpt-oss's experts add their biases as `bias[sorted ids]`: each grouped GEMM takes its own,
    # and the gate-up one its clamped SwiGLU.
    assert rewrites.get("fused_grouped_bias", 0) == (4 if name == "gpt_oss" else 0)
    assert rewrites.get("fused_grouped_clamped_swiglu", 0) == (2 if name == "gpt_oss" else 0)


# The pinning alone, in the default run: test_heads_made_symbolic_by_a_graph_break_are_pinned_by_a_guard.
@pytest.mark.extended
def test_attention_after_graph_breaks_runs_on_the_meta_kernel() -> None:
    """JetMoE breaks its graph around each layer's attention, so under `dynamic=True` the
    attention's graph gets q, k and v as inputs whose head counts and head dims are symbolic:
    the pass pins them with a guard (they never change) and both layers' attention runs on the
    meta-kernel in every graph Dynamo compiles for it (its expert routing recompiles at some
    lengths, with or without the pinning); every length matches eager."""
    import transformers

    from models import _causal_lm

    torch.manual_seed(0)
    model = _causal_lm("JetMoeConfig", "JetMoeForCausalLM", kv_channels=16, num_key_value_heads=None)().eval()
    torch._dynamo.reset()
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"target": "reference"}, report=report), dynamic=True)
    with torch.no_grad():
        for seq_len in (3, 9, 14):
            ids = torch.randint(0, VOCAB, (2, seq_len))
            got, want = compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits
            assert (got - want).abs().max().item() <= 1e-4, f"seq_len={seq_len}"
    assert isinstance(model, transformers.JetMoeForCausalLM)
    assert report.rewrites.get("meta_attention", 0) >= model.config.num_hidden_layers, report.rewrites
    assert not [f for f in report.fallbacks if f.pass_name == "attention"], report.fallbacks


# BLOOM in the default run; the others' left-padded batches there too, in half precision
# (test_attention's test_hand_written_attention_in_half_precision).
@pytest.mark.parametrize("name", ["bloom", *(pytest.param(name, marks=pytest.mark.extended)
                                            for name in ("mpt", "gpt_neo", "gemma2", "xglm"))])
def test_eager_masks_with_left_padding(name: str) -> None:
    """Models whose attention is their own code get transformers' eager masks, which hide keys
    with finfo.min instead of -inf: with a left-padded batch (query rows that see no key at all)
    the compiled model matches eager at every real token (the ranges of such masks:
    `test_attention_mask_ranges_op`). BLOOM, given a mask, counts its ALiBi positions along it
    (a cumulative sum of the mask): the kernel adds that [B, H, 1, S_kv] bias beside the mask's
    causal rule, and matches eager at every position, with holes in the mask too."""
    model, compiled, report = _compiled(name)
    with torch.no_grad():
        for seq_len in (6, 11):
            ids = torch.randint(0, VOCAB, (2, seq_len))
            mask = torch.ones(2, seq_len, dtype=torch.long)
            mask[1, :4] = 0  # the second prompt is left-padded by 4 tokens
            if name == "bloom":
                mask[0, [1, 3]] = 0  # positions counted past holes: no key-position rule gives these
            got = compiled(ids, attention_mask=mask, use_cache=False).logits
            want = model(ids, attention_mask=mask, use_cache=False).logits
            keep = mask.bool() if name != "bloom" else torch.ones_like(mask, dtype=torch.bool)
            torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-4)
    assert report.rewrites["meta_attention"] == 2 and not report.fallbacks, report.fallbacks
    if name == "bloom":
        assert report.rewrites["product_bias"] == 2 and report.rewrites["mask_as_rule"] == 2, report.rewrites


# MPT's export with these checks in the default run: test_export's
# test_a_size_the_program_asserts_against_is_left_out_of_the_recorded_range (the same export).
@pytest.mark.parametrize("name", [pytest.param("mpt", marks=pytest.mark.extended), "falcon", "granite_swa", "phi3"])
def test_architecture_exports_with_attention_on_the_meta_kernel(name: str) -> None:
    """torch.export's graphs are not Dynamo's (core ATen: transposes are permutes, masked_fill
    is a `where`, BLOOM's baddbmm is a bmm, a mul and an add, `.to()` leaves checks behind,
    logsumexp is decomposed unless kept whole): `tileflow export` of MPT (ALiBi, a finfo.min
    fill), Falcon (SDPA over one K/V head that the products broadcast), GraniteSWA (sinks as
    a logsumexp gate) and Phi-3 (its stacked SwiGLU) still puts both attentions on the
    meta-kernel and the model's features in place, and the exported program matches eager. Gemma-2, gpt-oss and BLOOM are exported, and run on the Ascend
    kernels, in tests/test_ascend_attention.py."""
    model, archive = export_zoo_model(name, "reference")
    program = archive.program.module()
    with torch.no_grad():
        for seq_len in (3, 20):
            ids = torch.randint(0, VOCAB, (1, seq_len))
            torch.testing.assert_close(program(ids), model(ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)


def test_moonshine_decoder_fuses_its_mlp_gated_in_the_second_half() -> None:
    """Moonshine's decoder MLP gates the second half of one stacked weight (`h, gate =
    fc1(x).chunk(2); silu(gate) * h`, as diffusers' GeGLU does): compiled, each layer's MLP is
    one SwiGLU kernel over the weight's halves, and the decoder matches eager over several
    lengths in one graph."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MoonshineConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                          encoder_num_hidden_layers=1, decoder_num_hidden_layers=2,
                                          encoder_num_attention_heads=4, decoder_num_attention_heads=4,
                                          encoder_num_key_value_heads=4, decoder_num_key_value_heads=4)
    decoder = transformers.MoonshineForConditionalGeneration(config).eval().model.decoder
    report = tileflow.Report()
    compiled = torch.compile(decoder, backend=tileflow.TileflowBackend({"target": "reference"}, report=report),
                             dynamic=True)
    encoded = torch.randn(2, 7, 64)
    with torch.no_grad():
        for seq_len in (3, 9, 14):
            ids = torch.randint(0, VOCAB, (2, seq_len))
            got = compiled(input_ids=ids, encoder_hidden_states=encoded, use_cache=False).last_hidden_state
            want = decoder(input_ids=ids, encoder_hidden_states=encoded, use_cache=False).last_hidden_state
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert len(report.graphs) == 1 and report.recompiles == 0
    assert report.rewrites["fused_swiglu"] == report.rewrites["stacked_gate_up"] == 2


def test_first_call_with_batch_equal_to_length_runs_every_attention_on_the_meta_kernel() -> None:
    """Traced first at batch == sequence length (Dynamo gives both one symbol), layer 0's head
    count reaches the pass as an unsimplified constant expression of that symbol
    (`4*s*((s**2)//s)//s**2`): it is 4 at every length, so the attention is still the
    meta-kernel's, as layer 1's is, and no fallback blames a batch or sequence size."""
    from models import _causal_lm

    torch.manual_seed(0)
    model = _causal_lm("PhiConfig", "PhiForCausalLM")().eval()
    torch._dynamo.reset()
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"target": "reference"}, report=report), dynamic=True)
    ids = torch.randint(0, VOCAB, (5, 5))
    with torch.no_grad():
        got, want = compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits
    assert (got - want).abs().max().item() <= 1e-4
    assert report.rewrites["meta_attention"] == 2 and not report.fallbacks, report.fallbacks


# Eager attention (an explicit [B, 1, S, max_cache_len] bias), as Falcon's own: Llama's and
# Mistral's (its sliding layers' cache as long as the window) static caches.
_STATIC_CACHE_MODELS = {
    "falcon": ZOO["falcon"][0],
    "llama_eager": _causal_lm("LlamaConfig", "LlamaForCausalLM", attn_implementation="eager"),
    "mistral_eager": _causal_lm("MistralConfig", "MistralForCausalLM", attn_implementation="eager",
                                num_key_value_heads=1, sliding_window=8),
}


@pytest.mark.parametrize("name", ["falcon", "llama_eager", pytest.param("mistral_eager", marks=pytest.mark.extended)])
def test_static_cache_prefill_over_every_slot_runs_on_the_meta_kernel(name: str) -> None:
    """`generate(..., cache_implementation="static")` attends its prefill over every slot of the
    cache (`max_cache_len` keys, a size Dynamo traces apart from the queries' under
    `dynamic=True`), the unwritten slots and the future hidden by an explicit mask over them, a
    row of it left-padded. No rule that reads the queries' positions applies (the mask is given,
    not the kernel's causal rule), so whichever length is larger the prefill's attention is the
    meta-kernel's, as every decode step's: no attention falls back, and the tokens equal eager's.
    (The prefill fell back: 'the queries may outnumber the keys ... StaticCache'.)"""
    torch.manual_seed(0)
    model = _STATIC_CACHE_MODELS[name]().eval()
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :2] = 0  # the second prompt left-padded
    _generate_on_the_meta_kernel(model, ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False,
                                 pad_token_id=0, cache_implementation="static")


def _generate_on_the_meta_kernel(model: torch.nn.Module, ids: torch.Tensor, **kwargs: Any) -> None:
    """`model.generate(ids, **kwargs)` with its forward compiled (dynamic) gives eager's tokens,
    no attention falls back, and both layers of every graph (the prompt's, the decode steps')
    run on the meta-kernel."""
    forward = model.forward
    torch._dynamo.reset()
    report = tileflow.Report()
    with torch.no_grad():
        want = model.generate(ids, **kwargs)
        model.forward = torch.compile(forward, backend=tileflow.TileflowBackend({"target": "reference"}, report=report),
                                      dynamic=True)
        try:
            got = model.generate(ids, **kwargs)
        finally:
            model.forward = forward
    assert torch.equal(got, want)
    reasons = [f.reason for f in report.fallbacks if f.pass_name == "attention"]
    assert not reasons, reasons
    assert report.rewrites["meta_attention"] == 2 * len(report.graphs) >= 4, (report.rewrites, len(report.graphs))


def test_decode_steps_of_flattened_head_attention_run_on_the_meta_kernel() -> None:
    """XGLM's attention flattens q to [B * H, S, D] for `bmm`. In a decode step (one query a
    sequence) canonicalize folds q's `view(B, 1, H, D).transpose(1, 2).reshape(B * H, 1, D)` into
    views alone, so the 4-D source behind the flattening is [B, 1, H, D], heads after the unit
    length. Read as [B, H, S, D] it had one head, and every decode step's attention fell back
    ('1 query heads are not a multiple of 4 KV heads'). Greedy tokens equal eager's, and every
    graph's two layers (the prompt's and the decode steps') run on the meta-kernel."""
    torch.manual_seed(0)
    model = ZOO["xglm"][0]().eval()
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))  # (one sequence: folded)
    _generate_on_the_meta_kernel(model, ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
