"""Small-config Hugging Face transformers models with random weights (no downloads) for tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

VOCAB = 128


def needs_transformers(version: str, why: str) -> pytest.MarkDecorator:
    """Skip, with `why`, a test of a behaviour transformers `version` has and an older release
    that tileflow supports lacks (pyproject allows 5.17, the GPU machine's): README, "transformers
    versions". 5.24 is the oldest release known to have them all, not a measured boundary."""
    from importlib.metadata import version as installed  # (not importing transformers at collection)

    from packaging.version import Version

    return pytest.mark.skipif(Version(installed("transformers")) < Version(version),
                              reason=f"needs transformers >= {version}: {why}")


# The behaviours of transformers 5.24+ some tests look at, which 5.17 lacks.
GEMMA2_SOFTCAP = needs_transformers("5.24", "on 5.17 Gemma-2 runs transformers' SDPA path, which drops its soft-cap")
BLOOM_ALIBI = needs_transformers("5.24", "on 5.17 BLOOM derives its ALiBi from a mask's cumsum, which the "
                                         "attention pass leaves unrewritten with that reason")


def llama():
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return transformers.LlamaForCausalLM(cfg)


def qwen2():
    import transformers

    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return transformers.Qwen2ForCausalLM(cfg)


def mistral():
    import transformers

    # A window smaller than the longest test sequence, so the sliding mask really cuts.
    cfg = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256, sliding_window=8,
    )
    return transformers.MistralForCausalLM(cfg)


def mixtral():
    import transformers

    cfg = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        num_local_experts=4, num_experts_per_tok=2,
    )
    return transformers.MixtralForCausalLM(cfg)


def gpt2():
    import transformers

    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=256, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)


MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": llama,
    "qwen2": qwen2,
    "mistral": mistral,
    "mixtral": mixtral,
    "gpt2": gpt2,
}

# Five lengths, none of them 0 or 1 (Dynamo specializes those), one past Mistral's window.
SEQ_LENS = (3, 5, 8, 13, 21)


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """Model `name` in eval mode with seeded random weights, attention through SDPA."""
    torch.manual_seed(seed)
    model = MODELS[name]()
    return model.eval()


def one_layer(model: torch.nn.Module) -> torch.nn.Module:
    """A model of `model`'s kind and config with one decoder layer instead of its two, seeded as
    `build` seeds: for tests that count no layers, where the second layer, alike, repeats the
    first one's ops; a layer fewer is less to trace and compile. (Models whose layers differ, a
    sliding window or experts in every other one, keep two.)"""
    config = model.config
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1]
    torch.manual_seed(0)
    return type(model)(config).eval()


def compiled_dynamic(fn: Callable[..., Any], static: tuple[torch.Tensor, ...] = ()) -> tuple[Callable[..., Any], Any]:
    """`fn` compiled afresh (Dynamo reset) with `dynamic=True` for the reference target, and its
    report; the tensors of `static` marked static (`torch._dynamo.mark_static`)."""
    import tileflow

    torch._dynamo.reset()
    report = tileflow.Report()
    for tensor in static:
        torch._dynamo.mark_static(tensor)
    backend = tileflow.TileflowBackend({"target": "reference"}, report=report)
    return torch.compile(fn, backend=backend, dynamic=True), report


def export_logits(model: torch.nn.Module, target: str, max_len: int = 64) -> Any:
    """`tileflow.export.export_model` of `LogitsOnly(model)` (the CLI's wrapper) for `target`,
    the sequence length dynamic over 2..max_len."""
    from tileflow.cli import LogitsOnly
    from tileflow.export import export_model

    example = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
    return export_model(LogitsOnly(model), (example,), ({1: torch.export.Dim("seq", min=2, max=max_len)},),
                        options={"target": target})


# More architectures (tests/test_model_zoo.py, tests/test_ascend_attention.py).
_SMALL = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


def _causal_lm(config: str, model: str, **overrides) -> Callable[[], torch.nn.Module]:
    """A builder of transformers' `model` from `config` at _SMALL's sizes with `overrides` (None drops a key)."""
    def make() -> torch.nn.Module:
        import transformers

        args = {**_SMALL, **overrides}
        built = getattr(transformers, model)(getattr(transformers, config)(**{k: v for k, v in args.items() if v is not None}))
        with torch.no_grad():  # attention sinks start at zero: random ones, to matter
            for module in built.modules():
                if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
                    module.sinks.normal_(0.0, 2.0)
        return built
    return make


# name -> (model, the features the passes must find in both of its layers: attention features, or
# a fused GEMM activation)
ZOO: dict[str, tuple[Callable[[], torch.nn.Module], tuple[str, ...]]] = {
    # GeGLU MLPs (the tanh GELU of the gate times the up projection), one kernel each.
    "gemma": (_causal_lm("GemmaConfig", "GemmaForCausalLM", head_dim=16), ("fused_geglu_tanh",)),
    # Logit soft-capping (its cap a tensor input under dynamic=True) and a sliding window in every other layer.
    "gemma2": (_causal_lm("Gemma2Config", "Gemma2ForCausalLM", head_dim=16, sliding_window=8,
                          attn_logit_softcapping=0.5, initializer_range=0.2),  # scores the cap bends
               ("logit_softcap", "fused_geglu_tanh")),
    # SwiGLU over one stacked gate-and-up weight, chunked in halves.
    "phi3": (_causal_lm("Phi3Config", "Phi3ForCausalLM", pad_token_id=0), ("fused_swiglu", "stacked_gate_up")),
    "qwen3": (_causal_lm("Qwen3Config", "Qwen3ForCausalLM", head_dim=16), ()),
    # The manual attention, MQA by broadcasting one K/V head in the product, q and k each scaled.
    "falcon": (_causal_lm("FalconConfig", "FalconForCausalLM", num_key_value_heads=None, intermediate_size=None,
                          max_position_embeddings=None), ()),
    # ALiBi: BLOOM's bias inside a baddbmm over flattened heads, k transposed after flattening.
    "bloom": (_causal_lm("BloomConfig", "BloomForCausalLM", n_layer=2, n_head=4, num_hidden_layers=None,
                         num_attention_heads=None, num_key_value_heads=None, intermediate_size=None,
                         max_position_embeddings=None), ("alibi",)),
    # Six heads: slopes for the nearest power of two and interleaved ones for the rest (a cat).
    "bloom_6_heads": (_causal_lm("BloomConfig", "BloomForCausalLM", n_layer=2, n_head=6, hidden_size=96,
                                 num_hidden_layers=None, num_attention_heads=None, num_key_value_heads=None,
                                 intermediate_size=None, max_position_embeddings=None), ("alibi",)),
    # ALiBi added to the scaled scores, sliced from a table for the longest sequence; a bool mask
    # filled in with finfo.min.
    "mpt": (_causal_lm("MptConfig", "MptForCausalLM", d_model=64, n_layers=2, n_heads=4, max_seq_len=64,
                       hidden_size=None, intermediate_size=None, num_hidden_layers=None, num_attention_heads=None,
                       num_key_value_heads=None, max_position_embeddings=None), ("alibi",)),
    # No scale, a causal fill of finfo.min (a constant tensor) and the padding mask added after it.
    "gpt_neo": (_causal_lm("GPTNeoConfig", "GPTNeoForCausalLM", num_layers=2, num_heads=4,
                           attention_types=[[["global", "local"], 1]], window_size=8, num_hidden_layers=None,
                           num_attention_heads=None, num_key_value_heads=None), ()),
    "gpt_neox": (_causal_lm("GPTNeoXConfig", "GPTNeoXForCausalLM"), ()),
    # MLPs of one ReLU: OPT's (with biases), Nemotron's squared ("relu2", no gate).
    "opt": (_causal_lm("OPTConfig", "OPTForCausalLM", ffn_dim=128, word_embed_proj_dim=64, intermediate_size=None,
                       num_key_value_heads=None, max_position_embeddings=64), ("fused_relu",)),
    "nemotron": (_causal_lm("NemotronConfig", "NemotronForCausalLM"), ("fused_relu2",)),
    # Scores from `baddbmm(zeros, q, k^T, alpha=1/sqrt(d))`.
    "gpt_neox_japanese": (_causal_lm("GPTNeoXJapaneseConfig", "GPTNeoXJapaneseForCausalLM", intermediate_multiple_size=2,
                                     intermediate_size=None, num_key_value_heads=None), ()),
    # Masked scores clamped at finfo.min, between views of [B*H, S, L] and [B, H, S, L].
    "xglm": (_causal_lm("XGLMConfig", "XGLMForCausalLM", d_model=64, ffn_dim=128, num_layers=2, attention_heads=4,
                        hidden_size=None, intermediate_size=None, num_hidden_layers=None, num_attention_heads=None,
                        num_key_value_heads=None, max_position_embeddings=64), ()),
    # Attention sinks, sliding windows on every other layer, MoE.
    "gpt_oss": (_causal_lm("GptOssConfig", "GptOssForCausalLM", head_dim=16, intermediate_size=64, num_local_experts=4,
                           num_experts_per_tok=2, sliding_window=8), ("attention_sinks",)),
    # Sinks applied after the attention, as out * sigmoid(logsumexp(scores) - sink).
    "granite_swa": (_causal_lm("GraniteSWAConfig", "GraniteSWAForCausalLM"), ("attention_sinks",)),
    "deepseek_v3": (_causal_lm("DeepseekV3Config", "DeepseekV3ForCausalLM", num_key_value_heads=4, q_lora_rank=32,
                               kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                               n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                               first_k_dense_replace=1, n_group=1, topk_group=1), ()),
    # Latent attention as DeepSeek-V3 has it: queries and keys (nope + rope) wider than values.
    "deepseek_v3_mla": (_causal_lm("DeepseekV3Config", "DeepseekV3ForCausalLM", num_key_value_heads=4, q_lora_rank=32,
                                   kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                                   n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                   first_k_dense_replace=1, n_group=1, topk_group=1), ()),
    # Newer architectures (the extended run; `test_model_zoo._EXTENDED_ONLY`), each with what sets
    # it apart from Llama's graph.
    # Sliding layers with their own RoPE base, q/k norms, post-norms after attention and MLP.
    "gemma3": (_causal_lm("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=16, sliding_window=8), ("fused_geglu_tanh",)),
    # Attention and MLP side by side off one LayerNorm, interleaved RoPE, scaled logits; Cohere 2
    # with sliding layers.
    "cohere": (_causal_lm("CohereConfig", "CohereForCausalLM"), ("fused_swiglu",)),
    "cohere2": (_causal_lm("Cohere2Config", "Cohere2ForCausalLM", sliding_window=8), ("fused_swiglu",)),
    # Parallel blocks with biases and a plain tanh-GELU MLP: RoPE over part of the head (Phi),
    # interleaved over part of it (GPT-J), and CodeGen's one qkv projection cut per model-parallel slice.
    "phi": (_causal_lm("PhiConfig", "PhiForCausalLM"), ("fused_gelu_tanh",)),
    "gptj": (_causal_lm("GPTJConfig", "GPTJForCausalLM", n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256),
             ("fused_gelu_tanh",)),
    "codegen": (_causal_lm("CodeGenConfig", "CodeGenForCausalLM", n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                           n_positions=256, n_ctx=256), ("fused_gelu_tanh",)),
    # Biases everywhere and a sliding window.
    "starcoder2": (_causal_lm("Starcoder2Config", "Starcoder2ForCausalLM", sliding_window=8), ("fused_gelu_tanh",)),
    # Norms after the attention and the MLP (OLMo-2's q/k norms over all heads at once); EXAONE 4's
    # layers all sliding here.
    "olmo2": (_causal_lm("Olmo2Config", "Olmo2ForCausalLM"), ("fused_swiglu",)),
    "exaone4": (_causal_lm("Exaone4Config", "Exaone4ForCausalLM", sliding_window=8), ("fused_swiglu",)),
    # Partial interleaved RoPE, one stacked gate-and-up weight, post-norms.
    "glm4": (_causal_lm("Glm4Config", "Glm4ForCausalLM", head_dim=16, pad_token_id=0), ("fused_swiglu", "stacked_gate_up")),
    # xIELU activation (not fused: no kernel epilogue has it) and a squared-ReLU MLP.
    "apertus": (_causal_lm("ApertusConfig", "ApertusForCausalLM"), ()),
    "arcee": (_causal_lm("ArceeConfig", "ArceeForCausalLM"), ("fused_relu2",)),
    # Multipliers on the embedding, attention scores, residuals and logits.
    "granite": (_causal_lm("GraniteConfig", "GraniteForCausalLM"), ("fused_swiglu",)),
    # Layers without RoPE (every fourth in the released models; here the second).
    "smollm3": (_causal_lm("SmolLM3Config", "SmolLM3ForCausalLM", pad_token_id=0, no_rope_layers=[1, 0]),
                ("fused_swiglu",)),
    # Experts as grouped GEMMs: OLMoE's with q/k norms, Granite-MoE's with Granite's multipliers.
    "olmoe": (_causal_lm("OlmoeConfig", "OlmoeForCausalLM", num_experts=4, num_experts_per_tok=2),
              ("fused_grouped_swiglu",)),
    "granitemoe": (_causal_lm("GraniteMoeConfig", "GraniteMoeForCausalLM", num_local_experts=4, num_experts_per_tok=2),
                   ("fused_grouped_swiglu",)),
}


def export_zoo_model(name: str, target: str) -> tuple[torch.nn.Module, Any]:
    """The zoo's model `name` (seeded) and its `export_logits` for `target`, checked to have
    both attentions on the meta-kernel, each with the model's features, and no fallback."""
    torch.manual_seed(0)
    model = ZOO[name][0]().eval()
    archive = export_logits(model, target)
    rewrites = archive.report.rewrites
    assert rewrites["meta_attention"] == 2 and not archive.report.fallbacks, archive.report.fallbacks
    for feature in ZOO[name][1]:
        assert rewrites[feature] == 2, feature
    return model, archive


# MoE architectures beyond the zoo's (the shared expert with its sigmoid gate; normalized top-k).
MOE = {
    "qwen2_moe": _causal_lm("Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=32, shared_expert_intermediate_size=64),
    "qwen3_moe": _causal_lm("Qwen3MoeConfig", "Qwen3MoeForCausalLM", num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=32, head_dim=16),
    # Sparse-mixer routing: two `max` picks side by side (`cat`) instead of a top-k.
    "phimoe": _causal_lm("PhimoeConfig", "PhimoeForCausalLM", num_local_experts=4, num_experts_per_tok=2),
    # Every expert sees every token (`repeat`, then one bmm over stacked weights: a batched grouped
    # GEMM once compiled), complex RoPE, attention in chunks of 8.
    "llama4": _causal_lm("Llama4TextConfig", "Llama4ForCausalLM", head_dim=16, intermediate_size=64,
                         intermediate_size_mlp=128, num_local_experts=4, num_experts_per_tok=1,
                         interleave_moe_layer_step=1, attention_chunk_size=8),
}
