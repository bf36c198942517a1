"""More transformers architectures through `backend="tileflow"` than the five of `test_models.py`:
each compiles to one graph over every length and matches eager, every linear becomes a
`padded_gemm`, and every attention either runs on the meta-kernel (Gemma-2's with its logit
soft-capping) or is left as it was with a reason in the report that names what the kernel lacks
(BLOOM's ALiBi)."""

from __future__ import annotations

from collections.abc import Callable

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


# name -> (model, the attention it must show: "meta" (rewritten) or the words its fallback reason must hold)
ZOO: dict[str, tuple[Callable[[], torch.nn.Module], str]] = {
    "gemma": (_causal_lm("GemmaConfig", "GemmaForCausalLM", head_dim=16), "meta"),
    # Logit soft-capping (its cap a tensor input under dynamic=True) and a sliding window in every other layer.
    "gemma2": (_causal_lm("Gemma2Config", "Gemma2ForCausalLM", head_dim=16, sliding_window=8,
                          attn_logit_softcapping=0.5, initializer_range=0.2), "meta"),  # scores the cap bends
    "phi3": (_causal_lm("Phi3Config", "Phi3ForCausalLM", pad_token_id=0), "meta"),
    "qwen3": (_causal_lm("Qwen3Config", "Qwen3ForCausalLM", head_dim=16), "meta"),
    # The manual attention, MQA by broadcasting one K/V head in the product, q and k each scaled.
    "falcon": (_causal_lm("FalconConfig", "FalconForCausalLM", num_key_value_heads=None, intermediate_size=None,
                          max_position_embeddings=None), "meta"),
    "bloom": (_causal_lm("BloomConfig", "BloomForCausalLM", n_layer=2, n_head=4, num_hidden_layers=None,
                         num_attention_heads=None, num_key_value_heads=None, intermediate_size=None,
                         max_position_embeddings=None), "ALiBi"),
    "gpt_neox": (_causal_lm("GPTNeoXConfig", "GPTNeoXForCausalLM"), "meta"),
    # Attention sinks, sliding windows on every other layer, MoE.
    "gpt_oss": (_causal_lm("GptOssConfig", "GptOssForCausalLM", head_dim=16, intermediate_size=64, num_local_experts=4,
                           num_experts_per_tok=2, sliding_window=8), "meta"),
    "deepseek_v3": (_causal_lm("DeepseekV3Config", "DeepseekV3ForCausalLM", num_key_value_heads=4, q_lora_rank=32,
                               kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                               n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                               first_k_dense_replace=1, n_group=1, topk_group=1), "meta"),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_architecture_compiles_once_and_matches_eager(name: str) -> None:
    make, attention = ZOO[name]
    torch.manual_seed(0)
    model = make().eval()
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"target": "reference"}, report=report), dynamic=True)
    with torch.no_grad():
        for seq_len in (3, 9, 14):  # 9 and 14 pass Gemma-2's sliding window of 8
            ids = torch.randint(0, VOCAB, (2, seq_len))
            got, want = compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits
            assert (got - want).abs().max().item() <= 1e-4, f"{name} at seq_len={seq_len}"
    assert len(report.graphs) == 1 and report.recompiles == 0
    rewrites = report.rewrites
    assert rewrites["canonical_linear"] == rewrites["padded_gemm"] + rewrites.get("fused_swiglu", 0) > 0
    attention_fallbacks = [f for f in report.fallbacks if f.pass_name == "attention"]
    if attention == "meta":
        assert rewrites["meta_attention"] == 2 and not report.fallbacks, report.fallbacks
        capped = model.config.to_dict().get("attn_logit_softcapping")
        assert rewrites.get("logit_softcap", 0) == (2 if capped else 0)
        assert rewrites.get("attention_sinks", 0) == (2 if name == "gpt_oss" else 0)
    else:
        assert "meta_attention" not in rewrites
        assert len(attention_fallbacks) == 2 == len(report.fallbacks), report.fallbacks
        assert all(attention in f.reason and "before the softmax" in f.reason for f in attention_fallbacks)
