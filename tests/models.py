"""Small-config Hugging Face transformers models with random weights (no downloads) for tests."""

from __future__ import annotations

from typing import Callable

import torch

VOCAB = 128


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
