"""More transformers architectures through `backend="tileflow"` than the five of `test_models.py`:
each compiles to one graph over every length and matches eager, every linear becomes a
`padded_gemm`, and every attention runs on the meta-kernel (Gemma-2's with its logit soft-capping,
gpt-oss's with its sinks, BLOOM's and MPT's with ALiBi)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from models import VOCAB

import tileflow

_SMALL = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


def _causal_lm(config: str, model: str, **overrides) -> Callable[[], torch.nn.Module]:
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


# name -> (model, the attention features the pass must find in both of its layers)
ZOO: dict[str, tuple[Callable[[], torch.nn.Module], tuple[str, ...]]] = {
    "gemma": (_causal_lm("GemmaConfig", "GemmaForCausalLM", head_dim=16), ()),
    # Logit soft-capping (its cap a tensor input under dynamic=True) and a sliding window in every other layer.
    "gemma2": (_causal_lm("Gemma2Config", "Gemma2ForCausalLM", head_dim=16, sliding_window=8,
                          attn_logit_softcapping=0.5, initializer_range=0.2), ("logit_softcap",)),  # scores the cap bends
    "phi3": (_causal_lm("Phi3Config", "Phi3ForCausalLM", pad_token_id=0), ()),
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
    # Attention sinks, sliding windows on every other layer, MoE.
    "gpt_oss": (_causal_lm("GptOssConfig", "GptOssForCausalLM", head_dim=16, intermediate_size=64, num_local_experts=4,
                           num_experts_per_tok=2, sliding_window=8), ("attention_sinks",)),
    "deepseek_v3": (_causal_lm("DeepseekV3Config", "DeepseekV3ForCausalLM", num_key_value_heads=4, q_lora_rank=32,
                               kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                               n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                               first_k_dense_replace=1, n_group=1, topk_group=1), ()),
}


def _compiled(name: str) -> tuple[torch.nn.Module, Callable[..., Any], tileflow.Report]:
    """The zoo's model `name` (seeded), compiled for the reference target, and its report."""
    torch.manual_seed(0)
    model = ZOO[name][0]().eval()
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"target": "reference"}, report=report), dynamic=True)
    return model, compiled, report


@pytest.mark.parametrize("name", sorted(ZOO))
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
    assert rewrites["canonical_linear"] == rewrites["padded_gemm"] + rewrites.get("fused_swiglu", 0) > 0
    assert rewrites["meta_attention"] == 2 and not report.fallbacks, report.fallbacks
    for feature in ("logit_softcap", "attention_sinks", "alibi"):
        assert rewrites.get(feature, 0) == (2 if feature in features else 0), feature


@pytest.mark.parametrize("name", ["bloom", "mpt", "gpt_neo", "gemma2"])
def test_eager_masks_with_left_padding(name: str) -> None:
    """Models whose attention is their own code get transformers' eager masks, which hide keys
    with finfo.min instead of -inf: with a left-padded batch (query rows that see no key at all)
    the compiled model matches eager at every real token (the ranges of such masks:
    `test_attention_mask_ranges_op`). BLOOM, given a mask, counts its ALiBi positions along it (a cumulative sum of the mask): that attention is
    left as it is, with the reason."""
    model, compiled, report = _compiled(name)
    with torch.no_grad():
        for seq_len in (6, 11):
            ids = torch.randint(0, VOCAB, (2, seq_len))
            mask = torch.ones(2, seq_len, dtype=torch.long)
            mask[1, :4] = 0  # the second prompt is left-padded by 4 tokens
            got = compiled(ids, attention_mask=mask, use_cache=False).logits
            want = model(ids, attention_mask=mask, use_cache=False).logits
            keep = mask.bool()  # padded query rows are garbage on every backend: compare the rest
            torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-4)
    if name == "bloom":
        assert "meta_attention" not in report.rewrites and len(report.fallbacks) == 2
        assert all("counts ALiBi positions along a padding mask" in f.reason for f in report.fallbacks)
    else:
        assert report.rewrites["meta_attention"] == 2 and not report.fallbacks, report.fallbacks
