"""Tests for tileflow.planner: every figure against arithmetic written out here by hand (with round
toy devices so the numbers are checkable), Lamina's cut-bytes formula, model loading, the CLI's
errors, the does-not-fit case and a LLaMA3-70B sanity check."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from tileflow.devices import DeviceInfo, get_device
from tileflow.planner import (
    KNOWN_MODELS,
    ModelShape,
    cut_bytes_per_iteration,
    format_plan,
    load_model,
    model_from_config,
    plan,
    plan_disaggregation,
)

# Toy devices with round numbers: C is "compute-optimized", M "memory-optimized".
C = DeviceInfo("C", "gpu", cores=4, peak_tflops={"bfloat16": 10.0}, mem_bw_gbs=100.0,
               mem_gb=1.0, smem_kib_per_core=64, price_per_hour=2.0)
M = DeviceInfo("M", "gpu", cores=4, peak_tflops={"bfloat16": 1.0}, mem_bw_gbs=200.0,
               mem_gb=0.5, smem_kib_per_core=64, price_per_hour=1.25)
# d=1024, L=2, H=8, Hkv=2 (G=4), I=4096, V=1000 -> head_dim 128.
TOY = ModelShape("toy", hidden_size=1024, num_layers=2, num_heads=8, num_kv_heads=2,
                 intermediate_size=4096, vocab_size=1000)
B, S = 16, 1000


def rel(x: float) -> object:
    return pytest.approx(x, rel=1e-12)


def test_toy_model_parameter_counts_by_hand():
    # QKV: 1024*(8+2*2)*128 = 1_572_864; O: 8*128*1024 = 1_048_576; MLP: 3*1024*4096 = 12_582_912
    assert TOY.layer_gemm_params == 1_572_864 + 1_048_576 + 12_582_912 == 15_204_352
    # two layers + LM head 1024*1000
    assert TOY.dense_params == 2 * 15_204_352 + 1_024_000 == 31_432_704
    # + input embedding (not tied)
    assert TOY.stored_params == 31_432_704 + 1_024_000 == 32_456_704
    # per layer: qkv (1024 in + 1536 out) + o (1024 + 1024) + gate/up 2*(1024 + 4096)
    # + down (4096 + 1024) = 19_968; two layers, plus LM head in/out 1024 + 1000
    assert TOY.activation_elems_per_token == 2 * 19_968 + 2_024 == 41_960


def test_toy_plan_every_figure_by_hand():
    r = plan_disaggregation(TOY, (C, 2), (M, 2), batch=B, context=S, dtype="bfloat16")

    # Dense stage: FLOPs = 2*P_dense*B; bytes = 2 bytes * (P_dense + B*A).
    dense_flops = 2 * 31_432_704 * 16  # 1_005_846_528
    dense_bytes = 2 * 31_432_704 + 2 * 16 * 41_960  # 62_865_408 + 1_342_720 = 64_208_128
    # On 2 x C: compute 1_005_846_528/2/1e13 = 5.03e-5 s < memory 64_208_128/2/1e11 = 3.21e-4 s.
    t_dense = 64_208_128 / 2 / 100e9
    # Attention: bytes = 2*L*B*S*Hkv*hd*e, FLOPs = 4*L*B*S*H*hd.
    attn_bytes = 2 * 2 * 16 * 1000 * 2 * 128 * 2  # 32_768_000
    attn_flops = 4 * 2 * 16 * 1000 * 8 * 128  # 131_072_000
    for p in r.placements:
        assert p.dense.flops == dense_flops and p.dense.bytes == dense_bytes
        assert p.attention.flops == attn_flops and p.attention.bytes == attn_bytes

    # --- colocated on 2 x C: 2 KV heads over 2 devices -> busiest holds half.
    co = r.colocated
    assert co.devices == "2 x C" and co.price_per_hour == 4.0
    assert co.dense.seconds == rel(t_dense) and co.dense.bound == "memory"
    t_attn_c2 = 32_768_000 * 0.5 / 100e9  # 1.6384e-4 s (compute: 131_072_000*0.5/1e13 = 6.6e-6)
    assert co.attention.seconds == rel(t_attn_c2) and co.attention.bound == "memory"
    t_co = t_dense + t_attn_c2  # sequential on the same devices: 4.8488064e-4 s
    assert co.iteration_s == rel(4.8488064e-4) == rel(t_co)
    assert co.fits
    assert co.tokens_per_s == rel(16 / 4.8488064e-4)  # ~32_998 tok/s
    assert co.cost_per_mtok == rel(4.0 * 1e6 / (3600 * 16 / 4.8488064e-4))
    # memory per device: weights 2*32_456_704/2 = 32_456_704 B + KV 32_768_000/2 = 16_384_000 B
    assert co.memory[0].need_gb == rel((32_456_704 + 16_384_000) / 1e9)
    # max batch: (1e9 - 32_456_704) / (16_384_000/16 = 1_024_000 per sequence) = 944.9 -> 944
    assert co.max_batch == 944
    assert co.network_bytes_per_iter == 0 and co.network_gbs_needed is None

    # --- equal cost: (2*2.0 + 2*1.25) $/h = 6.5 -> floor(6.5/2.0) = 3 x C
    eq = r.colocated_equal_cost
    assert eq.devices == "3 x C" and eq.price_per_hour == 6.0
    assert eq.dense.seconds == rel(64_208_128 / 3 / 100e9)
    # 2 KV heads on 3 devices: busiest holds ceil(2/3) = 1 head -> share 1/2 (no faster than 2)
    assert eq.attention.seconds == rel(t_attn_c2)
    assert eq.iteration_s == rel(64_208_128 / 3 / 100e9 + 1.6384e-4)
    assert any("2 KV heads" in n for n in eq.notes)

    # --- disaggregated: dense on 2 x C, attention on 2 x M
    dis = r.disaggregated
    assert dis.price_per_hour == 2 * 2.0 + 2 * 1.25 == 6.5
    assert dis.dense.seconds == rel(t_dense)
    # M: compute 131_072_000*0.5/1e12 = 6.5536e-5 < memory 32_768_000*0.5/200e9 = 8.192e-5
    assert dis.attention.seconds == rel(8.192e-5) and dis.attention.bound == "memory"
    assert dis.iteration_s == rel(t_dense) and dis.bottleneck == "dense"  # max, not sum
    assert dis.tokens_per_s == rel(16 / 3.2104064e-4)
    assert dis.cost_per_mtok == rel(6.5 * 1e6 / (3600 * 16 / 3.2104064e-4))
    cut = (2 + 2 / 4) * 2 * 1024 * 16 * 2  # 163_840 bytes
    assert dis.network_bytes_per_iter == cut == 163_840
    assert dis.network_gbs_needed == rel(163_840 / 3.2104064e-4 / 1e9)  # ~0.510 GB/s
    assert dis.network_gbs_per_memory_device == rel(163_840 / 3.2104064e-4 / 1e9 / 2)
    # weights 32_456_704 B per C; KV 16_384_000 B per M; max batch 0.5e9 / 1_024_000 = 488
    assert [c.need_gb for c in dis.memory] == [rel(0.032456704), rel(0.016384)]
    assert dis.fits and dis.max_batch == 488
    # re-planned at batch 488: dense (62_865_408 + 2*488*41_960) B / 2 / 100e9 = 5.19e-4 s, but
    # attention 488 seqs * 2_048_000 KV B/seq * share 0.5 / 200e9 = 2.49856e-3 s now dominates
    assert dis.max_batch_tokens_per_s == rel(488 / (488 * 2_048_000 * 0.5 / 200e9))
    assert dis.max_batch_tokens_per_s == rel(195_312.5)


def test_network_bottleneck_sets_the_period():
    # 163_840 B over 0.25 GB/s = 6.5536e-4 s > dense 3.21e-4 s
    r = plan_disaggregation(TOY, (C, 2), (M, 2), batch=B, context=S, network_gbs=0.25)
    dis = r.disaggregated
    assert dis.bottleneck == "network"
    assert dis.iteration_s == rel(163_840 / 0.25e9)
    assert dis.network_gbs_needed == rel(0.25)
    # colocated placements do not cross the network
    assert r.colocated.iteration_s == rel(4.8488064e-4)


def test_efficiency_scales_stage_times():
    r = plan_disaggregation(TOY, (C, 2), (M, 2), batch=B, context=S, efficiency=0.5)
    assert r.disaggregated.dense.seconds == rel(64_208_128 / 2 / (0.5 * 100e9))


def test_cut_bytes_formula():
    # Lamina: (2 + 2/G) * e * d * B * L
    assert cut_bytes_per_iteration(1024, 2, 16, 4, 2) == 2.5 * 2 * 1024 * 16 * 2 == 163_840
    # LLaMA3-70B, B=256, bf16: 2.25 * 2 * 8192 * 256 * 80 = 754_974_720 bytes
    assert cut_bytes_per_iteration(8192, 80, 256, 8, 2) == 754_974_720
    # MHA (G=1): q, k, v in and output back = 4 * d per layer and token
    assert cut_bytes_per_iteration(10, 3, 5, 1, 4) == 4 * 4 * 10 * 5 * 3
    with pytest.raises(ValueError, match="group_size must be positive"):
        cut_bytes_per_iteration(10, 3, 5, 0, 4)


def test_does_not_fit():
    # 489 sequences need 489 * 1_024_000 = 500_736_000 B of KV per M > 0.5 GB
    r = plan_disaggregation(TOY, (C, 2), (M, 2), batch=489, context=S)
    dis = r.disaggregated
    assert not dis.fits and dis.tokens_per_s is None and dis.cost_per_mtok is None
    assert dis.network_gbs_needed is None and dis.max_batch == 488
    assert not dis.memory[1].fits and dis.memory[0].fits
    assert "does not fit" in format_plan(r)
    # weights alone overflow: LLaMA3-70B bf16 (141 GB) on one 80 GB H100
    r = plan_disaggregation(KNOWN_MODELS["llama3-70b"], (get_device("H100"), 1),
                            (get_device("H20"), 4), batch=1, context=16)
    assert not r.disaggregated.fits and r.disaggregated.max_batch == 0
    assert not r.colocated.fits and r.colocated.max_batch == 0
    assert r.colocated.max_batch_tokens_per_s is None


def test_llama3_70b_h100x2_h20x4_is_sane():
    m = KNOWN_MODELS["llama3-70b"]
    # 80 * (8192*10240 + 8192*8192 + 3*8192*28672) + 2 * 8192*128256 = 70.55e9 (published: 70.6B)
    assert m.stored_params == 80 * (83_886_080 + 67_108_864 + 704_643_072) + 2 * 1_050_673_152
    r = plan_disaggregation(m, (get_device("H100"), 2), (get_device("H20"), 4), batch=256,
                            context=4096)
    # KV cache: 2*80*256*4096*8*128*2 B = 343.6 GB -> 85.9 GB per H20 (2 of 8 KV heads) <= 96;
    # weights 141.1 GB -> 70.6 GB per H100 <= 80. Colocated on 2 or 3 H100s cannot hold both.
    dis = r.disaggregated
    assert dis.fits and not r.colocated.fits and not r.colocated_equal_cost.fits
    assert r.colocated_equal_cost.devices == "3 x H100-SXM"  # floor(11.2 / 3.0)
    # attention on 4 H20: 343_597_383_680 B / 4 / 4000e9 B/s = 21.47 ms
    assert dis.attention.seconds == rel(343_597_383_680 / 4 / 4000e9)
    # dense on 2 H100: (2*69_501_714_432 + 2*256*11_769_088) B / 2 / 3350e9 = 21.65 ms
    assert dis.dense.seconds == rel((2 * 69_501_714_432 + 2 * 256 * 11_769_088) / 2 / 3350e9)
    assert dis.iteration_s == dis.dense.seconds  # the stages are nearly balanced
    assert 11_000 < dis.tokens_per_s < 12_500
    # The roofline iteration (21.6 ms at 100% of datasheet bandwidth) is the shortest possible,
    # so the bandwidth need (0.755 GB / 21.65 ms = 34.9 GB/s) is an upper bound. Lamina's
    # "<= 30 GB/s" corresponds to an iteration of >= 25.2 ms, i.e. the H100s reaching <= 86% of
    # datasheet bandwidth, which is what real decode GEMMs reach.
    assert dis.network_gbs_needed == rel(754_974_720 / dis.iteration_s / 1e9)
    assert 30 < dis.network_gbs_needed < 36
    r80 = plan_disaggregation(m, (get_device("H100"), 2), (get_device("H20"), 4), batch=256,
                              context=4096, efficiency=0.8)
    assert r80.disaggregated.network_gbs_needed <= 30
    # Disaggregation beats what the equal-cost colocated set can do at its largest batch.
    assert dis.cost_per_mtok < r.colocated_equal_cost.max_batch_cost_per_mtok


def test_load_model_known_and_config(tmp_path):
    assert load_model("llama3-8b") is KNOWN_MODELS["llama3-8b"]
    assert load_model("LLaMA3.1-70B") is KNOWN_MODELS["llama3-70b"]
    cfg = {"hidden_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 8,
           "num_key_value_heads": 2, "intermediate_size": 4096, "vocab_size": 1000,
           "model_type": "llama"}
    d = tmp_path / "toy"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    for spec in (str(d), str(d / "config.json")):
        m = load_model(spec)
        assert (m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads,
                m.intermediate_size, m.vocab_size, m.hd) == (1024, 2, 8, 2, 4096, 1000, 128)
        assert m.name == "toy"
    # no num_key_value_heads: plain multi-head attention; tied embeddings stored once
    cfg2 = {k: v for k, v in cfg.items() if k != "num_key_value_heads"}
    cfg2.update(tie_word_embeddings=True, head_dim=64)
    (d / "config.json").write_text(json.dumps(cfg2))
    m = load_model(str(d))
    assert m.num_kv_heads == 8 and m.group_size == 1 and m.hd == 64
    assert m.stored_params == m.dense_params
    with pytest.raises(ValueError, match="neither a known model"):
        load_model(str(tmp_path / "missing"))
    (d / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="lacks"):
        load_model(str(d))


ARGS = ["disaggregate", "--model", "llama3-70b", "--compute", "H100:2", "--memory", "H20:4",
        "--batch", "256", "--context", "4096"]


def test_cli_table_and_json(tmp_path):
    res = CliRunner().invoke(plan, ARGS)
    assert res.exit_code == 0, res.output
    assert "disaggregated" in res.output and "does not fit" in res.output
    assert "11,827" in res.output  # 256 / 21.65 ms
    res = CliRunner().invoke(plan, [*ARGS, "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["colocated"]["tokens_per_s"] is None
    assert data["disaggregated"]["network_gbs_needed"] == pytest.approx(34.87, abs=0.01)
    assert data["model"]["head_dim"] == 128


def test_cli_model_from_config_dir(tmp_path):
    cfg = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    args = ["disaggregate", "--model", str(tmp_path), "--compute", "H100", "--memory", "H20:2",
            "--batch", "8", "--context", "128", "--json"]
    res = CliRunner().invoke(plan, args)
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["model"]["hidden_size"] == 4096
    assert data["disaggregated"]["devices"] == "1 x H100-SXM + 2 x H20"  # bare name = 1 device


@pytest.mark.parametrize("flag,value,needle", [
    ("--compute", "H100:x", "count after ':' must be a positive integer"),
    ("--compute", "H100:0", "must be positive"),
    ("--memory", "B300:4", "unknown device 'B300'"),
    ("--memory", ":4", "expected DEVICE:COUNT"),
    ("--model", "no-such-model", "neither a known model"),
    ("--dtype", "int4", "int4"),
    ("--batch", "0", "--batch"),
])
def test_cli_errors_are_clear(flag, value, needle):
    args = list(ARGS)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    res = CliRunner().invoke(plan, args)
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert "Traceback" not in res.output


def test_cli_dtype_missing_from_device_table():
    # The table has no float64 rate for H20: a usage error, not a traceback.
    res = CliRunner().invoke(plan, [*ARGS, "--dtype", "float64"])
    assert res.exit_code == 2 and "no peak rate for dtype 'float64'" in res.output


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="device counts must be positive"):
        plan_disaggregation(TOY, (C, 0), (M, 2), batch=1, context=1)
    with pytest.raises(ValueError, match=r"efficiency must be in \(0, 1\], got 1.5"):
        plan_disaggregation(TOY, (C, 1), (M, 2), batch=1, context=1, efficiency=1.5)
    with pytest.raises(ValueError, match="multiple"):
        ModelShape("bad", 64, 1, 6, 4, 128, 10)
    assert math.isclose(TOY.group_size, 4)


BASE_CFG = {"hidden_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 8,
            "num_key_value_heads": 2, "intermediate_size": 4096, "vocab_size": 1000}


def _cli_with_config(tmp_path, cfg: dict, *extra: str):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    args = ["disaggregate", "--model", str(tmp_path), "--compute", "H100", "--memory", "H20:2",
            "--batch", "8", "--context", "128", *extra]
    return CliRunner().invoke(plan, args)


@pytest.mark.parametrize("extra,needle", [
    # Mixtral-style: 8 experts of the given intermediate size per block; counting one would
    # store ~1/8 of the MLP weights.
    ({"num_local_experts": 8, "num_experts_per_tok": 2}, "mixture-of-experts"),
    ({"num_experts": 60, "moe_intermediate_size": 1408}, "mixture-of-experts"),  # Qwen-MoE
    ({"n_routed_experts": 64, "moe_intermediate_size": 1408}, "mixture-of-experts"),  # DeepSeek
    ({"kv_lora_rank": 512}, "latent attention"),  # MLA caches a latent, not 2*Hkv*hd
])
def test_moe_and_mla_configs_are_refused(tmp_path, extra, needle):
    with pytest.raises(ValueError, match=needle):
        model_from_config({**BASE_CFG, **extra})
    res = _cli_with_config(tmp_path, {**BASE_CFG, **extra})
    assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("cfg,needle", [
    # transformers' class defaults: MixtralConfig has 8 local experts, Qwen2MoeConfig 60 experts,
    # DeepseekV3Config a latent KV of rank 512. A file leaving them out is still that model;
    # read from the file's keys alone, each was planned as a dense model.
    ({"model_type": "mixtral", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
      "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000}, "mixture-of-experts"),
    ({"model_type": "qwen2_moe", "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16,
      "num_key_value_heads": 16, "intermediate_size": 5632, "vocab_size": 151936}, "mixture-of-experts"),
    ({"model_type": "deepseek_v3", "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
      "num_key_value_heads": 128, "intermediate_size": 18432, "vocab_size": 129280, "n_routed_experts": 1},
     "latent attention"),
])
def test_moe_and_mla_class_defaults_are_refused_too(cfg, needle):
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match=needle):
        model_from_config(cfg)


@pytest.mark.parametrize("given", [{}, {"is_moe": False, "num_experts": 16384}])
def test_a_config_that_says_it_has_no_experts_is_dense(given):
    # Doge's class carries num_experts=16384 beside is_moe=False (its MLP is dense): read from
    # the file or from the class's defaults, the expert count it does not use was taken as MoE.
    pytest.importorskip("transformers")
    cfg = {"model_type": "doge", "hidden_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
           "num_key_value_heads": 4, "intermediate_size": 2048, "vocab_size": 32768, **given}
    assert model_from_config(cfg).dense_params > 0


def test_head_dim_class_default_is_read_when_the_file_leaves_it_out():
    # Qwen3Config's head_dim defaults to 128 whatever the hidden size: transformers builds 16
    # heads of 128 here, the planner counted 16 of 1024 / 16 = 64 (half the KV cache and QKV/O).
    AutoConfig = pytest.importorskip("transformers").AutoConfig
    cfg = {"model_type": "qwen3", "hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16,
           "num_key_value_heads": 8, "intermediate_size": 3072, "vocab_size": 151936}
    expected = AutoConfig.for_model("qwen3", hidden_size=1024, num_attention_heads=16).head_dim
    assert expected == 128
    assert model_from_config(cfg).hd == expected


def test_dense_config_with_one_expert_key_still_loads():
    m = model_from_config({**BASE_CFG, "num_experts": None, "num_local_experts": 1})
    assert m.dense_params == TOY.dense_params


@pytest.mark.parametrize("key,value", [
    ("hidden_size", None), ("hidden_size", [1024]), ("hidden_size", 1024.5),
    ("num_hidden_layers", "two"), ("vocab_size", True), ("head_dim", 0), ("head_dim", -128),
    ("num_key_value_heads", 0), ("tie_word_embeddings", "false"),
])
def test_bad_config_values_are_clear_errors(tmp_path, key, value):
    # Before: null / a list crashed with a TypeError traceback, 1024.5 was truncated, 0 KV heads
    # silently meant multi-head attention, a negative head_dim gave negative parameter counts, and
    # the string "false" tied the embeddings.
    with pytest.raises(ValueError, match=key if key != "num_key_value_heads" else "kv_heads"):
        model_from_config({**BASE_CFG, key: value})
    res = _cli_with_config(tmp_path, {**BASE_CFG, key: value})
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output


def test_model_shape_refuses_non_positive_head_dim():
    with pytest.raises(ValueError, match="head_dim"):
        ModelShape("bad", 1024, 2, 8, 2, 4096, 1000, head_dim=-128)
    # integral floats in a config are fine: JSON writers sometimes emit 1024.0
    assert model_from_config({**BASE_CFG, "hidden_size": 1024.0}).hidden_size == 1024


def test_missing_tie_word_embeddings_follows_transformers_default():
    # transformers (before 5) left out of config.json the values equal to a class's defaults, so
    # Gemma configs may lack tie_word_embeddings although Gemma ties its LM head to the input
    # embedding; LLaMA's default is untied.
    # (head_dim given: Gemma's class default is 256, not hidden_size / heads.)
    transformers = pytest.importorskip("transformers")
    cfg = {**BASE_CFG, "head_dim": 128}
    for model_type in ("gemma", "llama"):
        tied = transformers.AutoConfig.for_model(model_type).tie_word_embeddings
        m = model_from_config({**cfg, "model_type": model_type})
        embed = 0 if tied else 1024 * 1000
        assert m.stored_params == 2 * 15_204_352 + 1024 * 1000 + embed
    assert model_from_config({**cfg, "model_type": "gemma"}).stored_params == \
        TOY.dense_params
    # an explicit value always wins
    assert not model_from_config({**cfg, "model_type": "gemma",
                                  "tie_word_embeddings": False}).tie_word_embeddings


def test_network_gbs_nan_is_refused():
    # NaN compares False with everything, so it used to drop out of the max() that sets the
    # disaggregated period: the plan silently ignored the network.
    with pytest.raises(ValueError, match="network_gbs"):
        plan_disaggregation(TOY, (C, 2), (M, 2), batch=B, context=S, network_gbs=float("nan"))
    res = CliRunner().invoke(plan, [*ARGS, "--network-gbs", "nan"])
    assert res.exit_code == 2 and "network_gbs" in res.output


@pytest.mark.parametrize("counts", [((C, 1.5), (M, 2), 16, 1000), ((C, 2), (M, 2), 8.5, 1000),
                                    ((C, 2), (M, 2), 16, 10.0), ((C, True), (M, 2), 16, 1000)])
def test_counts_batch_and_context_must_be_integers(counts):
    compute, memory, batch, context = counts
    with pytest.raises(ValueError, match="integer"):
        plan_disaggregation(TOY, compute, memory, batch=batch, context=context)


def test_cut_uses_attention_width_when_head_dim_is_set():
    # d=1024 but H*hd = 8*64 = 512: q and the attention output are 512 wide, k and v 2*64 each,
    # so per layer and token (512 + 128 + 128 + 512) elements cross the cut.
    m = ModelShape("narrow", 1024, 2, 8, 2, 4096, 1000, head_dim=64)
    r = plan_disaggregation(m, (C, 2), (M, 2), batch=B, context=S)
    assert r.disaggregated.network_bytes_per_iter == (512 + 128 + 128 + 512) * 2 * 16 * 2


def test_an_mlp_without_a_gate_counts_two_matrices():
    """GPT-NeoX / Phi-2 / StarCoder2 blocks have an up and a down projection: counted as
    LLaMA's three, their MLP weights came out 1.5x too large."""
    m = model_from_config({**BASE_CFG, "model_type": "gpt_neox"})
    assert not m.gated_mlp
    # QKV 1024*(8+2*2)*128 + O 8*128*1024 + MLP 2*1024*4096, per layer
    assert m.layer_gemm_params == 1_572_864 + 1_048_576 + 8_388_608
    # GEMM inputs and outputs per token and layer: QKV (1024 + 1536), O (1024 + 1024), up
    # (1024 + 4096), down (4096 + 1024); then the LM head (1024 + 1000)
    assert m.activation_elems_per_token == 2 * (2560 + 2048 + 5120 + 5120) + 2024
    assert model_from_config({**BASE_CFG, "model_type": "llama"}).gated_mlp


def _kv_bytes(model: ModelShape, context: int) -> float:
    r = plan_disaggregation(model, (C, 2), (M, 2), batch=B, context=context)
    return r.disaggregated.attention.bytes


@pytest.mark.parametrize("context", [1000, 3000])
def test_sliding_window_layers_keep_only_their_window(context: int):
    """A layer with a window of w keys keeps and reads its last min(S, w) positions; counting
    every layer at S overstated Mistral v0.1's or Gemma-2's cache and decode time."""
    full = _kv_bytes(TOY, context)
    per_layer = 2 * B * context * 2 * 128 * 2  # K and V, B sequences, Hkv 2, hd 128, bf16
    assert full == rel(2 * per_layer)
    windows = model_from_config({**BASE_CFG, "layer_types": ["sliding_attention", "full_attention"],
                                 "sliding_window": 2048})
    assert windows.layer_windows == (2048, None)
    assert _kv_bytes(windows, context) == rel(per_layer * (min(context, 2048) / context) + per_layer)
    r = plan_disaggregation(windows, (C, 2), (M, 2), batch=B, context=context)
    assert r.disaggregated.attention.flops == rel(4 * B * (min(context, 2048) + context) * 8 * 128)


def test_mixed_windows_note_what_tileflows_attention_workers_hold():
    """The workers give blocks back only when every layer slides: for a model mixing windows and
    full layers the plan's KV figure (a sliding layer's last w positions) was optimistic for
    tileflow's own runtime, unsaid. The note gives the full cache and its max batch. Colocated,
    the serving engine holds a sliding layer's window only (its KV groups): no note there."""
    mixed = model_from_config({**BASE_CFG, "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 2048})
    r = plan_disaggregation(mixed, (C, 2), (M, 2), batch=B, context=8192)
    [note] = [n for n in r.disaggregated.notes if "tileflow's attention workers" in n]
    assert not [n for p in (r.colocated, r.colocated_equal_cost) for n in p.notes if "attention workers" in n]
    kept = r.disaggregated.memory[1].need_gb
    assert f"{kept * 2 * 8192 / (2048 + 8192):.1f} GB" in note
    assert not [n for n in plan_disaggregation(TOY, (C, 2), (M, 2), batch=B, context=8192).disaggregated.notes
                if "tileflow's attention workers" in n]


def test_windows_are_read_as_transformers_reads_the_config():
    """Keys a config file leaves out take the class defaults of its model_type: Mistral slides
    in every layer, Gemma-2 in every other one, Qwen2 not unless use_sliding_window."""
    pytest.importorskip("transformers")
    mistral = model_from_config({**BASE_CFG, "model_type": "mistral", "sliding_window": 512})
    assert mistral.layer_windows == (512, 512)
    assert model_from_config({**BASE_CFG, "model_type": "mistral", "sliding_window": None}).layer_windows is None
    gemma2 = model_from_config({**BASE_CFG, "model_type": "gemma2", "num_hidden_layers": 4, "sliding_window": 256})
    assert gemma2.layer_windows == (256, None, 256, None)
    qwen2 = {**BASE_CFG, "model_type": "qwen2", "sliding_window": 256}
    assert model_from_config({**qwen2, "use_sliding_window": False}).layer_windows is None
    assert model_from_config({**qwen2, "use_sliding_window": True, "max_window_layers": 1}).layer_windows == (None, 256)


@pytest.mark.parametrize("extra, needle", [
    ({"sliding_window": 512}, "not which layers slide"),  # no model_type to read the layers from
    ({"layer_types": ["full_attention", "linear_attention"]}, r"\['linear_attention'\] are not modelled"),
    ({"layer_types": ["full_attention"]}, "1 entries for 2 layers"),
    ({"layer_types": ["sliding_attention", "full_attention"], "sliding_window": None}, "sliding_window=None"),
])
def test_windows_the_planner_cannot_read_are_refused(extra: dict, needle: str):
    with pytest.raises(ValueError, match=needle):
        model_from_config({**BASE_CFG, **extra})


def test_model_shape_checks_its_windows():
    with pytest.raises(ValueError, match="3 entries for 2 layers"):
        ModelShape("bad", 1024, 2, 8, 2, 4096, 1000, layer_windows=(8, 8, 8))
    with pytest.raises(ValueError, match="positive int"):
        ModelShape("bad", 1024, 2, 8, 2, 4096, 1000, layer_windows=(0, None))


def test_the_plan_names_the_windows_and_an_ungated_mlp(tmp_path):
    cfg = {**BASE_CFG, "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 64}
    res = _cli_with_config(tmp_path, cfg)
    assert res.exit_code == 0, res.output
    assert "sliding windows 64 in 1 of 2 layers" in res.output


@pytest.mark.parametrize("model_type", ["nemotron", "persimmon", "arcee", "apertus", "jais2", "nanochat"])
def test_other_ungated_mlps_count_two_matrices(model_type: str):
    """Nemotron/Minitron (relu² up/down), Persimmon (and Fuyu's text model), Arcee AFM, Apertus,
    Jais-2 and nanochat have no gate either: counted as gated they came out 1.5x too large."""
    m = model_from_config({**BASE_CFG, "model_type": model_type})
    assert not m.gated_mlp
    assert m.layer_gemm_params == 1_572_864 + 1_048_576 + 8_388_608


def test_a_per_layer_config_is_a_clear_error(monkeypatch):
    """transformers raises a RuntimeError (not AttributeError) for a global read of a per-layer
    attribute of a heterogeneous config; the CLI catches ValueError only, so it escaped as a
    traceback."""
    import tileflow.planner as planner

    class PerLayer:
        @property
        def sliding_window(self):
            raise RuntimeError("'sliding_window' is a per-layer attribute and may vary across layers")

        layer_types = None
        tie_word_embeddings = False

    monkeypatch.setattr(planner, "_as_transformers_reads_it", lambda config, name: PerLayer())
    with pytest.raises(ValueError, match="no single sliding_window"):
        model_from_config({**BASE_CFG, "model_type": "llama"})


def test_a_heterogeneous_transformers_config_is_a_clear_error():
    pytest.importorskip("transformers")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "neomme" not in CONFIG_MAPPING:
        pytest.skip("this transformers has no per-layer (heterogeneous) model config")
    with pytest.raises(ValueError, match="per-layer"):
        model_from_config({**BASE_CFG, "model_type": "neomme"})


# The toy model as a config file says it (for `model_from_config`).
_TOY_CONFIG = {"hidden_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
               "intermediate_size": 4096, "vocab_size": 1000}


def test_weights_exactly_filling_a_compute_device_fit() -> None:
    """a placement fits when weights <= mem_gb (docstring), equality included."""
    m = ModelShape("t", 1024, 2, 8, 2, 4096, 1001)
    weights = 2 * m.stored_params  # 64_917_504 B on one device
    c = DeviceInfo("C", "gpu", cores=4, peak_tflops={"bfloat16": 10.0}, mem_bw_gbs=100.0,
                   mem_gb=weights / 1e9, smem_kib_per_core=64, price_per_hour=2.0)
    assert c.mem_gb * 1e9 == weights
    r = plan_disaggregation(m, (c, 1), (M, 2), batch=1, context=16)
    assert r.disaggregated.memory[0].fits and r.disaggregated.fits


def test_equal_cost_count_of_an_exact_price_ratio_is_not_rounded_down_by_float_error() -> None:
    """(0.1 + 2*0.3)/0.1 is 7 but 6.999999999999999 in floats: the 1e-9 keeps it 7."""
    c = DeviceInfo("C", "gpu", cores=4, peak_tflops={"bfloat16": 10.0}, mem_bw_gbs=100.0,
                   mem_gb=1.0, smem_kib_per_core=64, price_per_hour=0.1)
    m = DeviceInfo("M", "gpu", cores=4, peak_tflops={"bfloat16": 1.0}, mem_bw_gbs=200.0,
                   mem_gb=0.5, smem_kib_per_core=64, price_per_hour=0.3)
    r = plan_disaggregation(TOY, (c, 1), (m, 2), batch=16, context=1000)
    assert r.colocated_equal_cost.devices == "7 x C"


def test_use_sliding_window_false_without_transformers_reading_means_no_windows() -> None:
    """a config with no model_type (not read by transformers) that turns sliding off keeps
    every layer full instead of being refused for not naming its sliding layers."""
    m = model_from_config({**_TOY_CONFIG, "sliding_window": 4096, "use_sliding_window": False})
    assert m.layer_windows is None


def test_mixed_windows_below_the_window_add_no_worker_note() -> None:
    """at a context no longer than the window every layer keeps every position, so the
    'attention workers keep every position' note has nothing to add."""
    mixed = model_from_config({**_TOY_CONFIG, "layer_types": ["sliding_attention", "full_attention"],
                               "sliding_window": 2048})
    r = plan_disaggregation(mixed, (C, 2), (M, 2), batch=16, context=2048)
    assert not [n for n in r.disaggregated.notes if "attention workers" in n]


def test_as_many_memory_devices_as_kv_heads_add_no_idle_device_note() -> None:
    """2 KV heads on 2 memory devices use both: no 'only N KV heads' note."""
    r = plan_disaggregation(TOY, (C, 2), (M, 2), batch=16, context=1000)
    assert not [n for n in r.disaggregated.notes if "KV heads" in n]


def test_per_memory_device_bandwidth_is_the_busiest_devices_kv_head_share() -> None:
    """8 KV heads on 3 memory devices: the busiest holds 3, so its link carries 3/8 of the
    cut traffic, not 1/3."""
    m8 = ModelShape("m8", hidden_size=1024, num_layers=2, num_heads=8, num_kv_heads=8,
                    intermediate_size=4096, vocab_size=1000)
    dis = plan_disaggregation(m8, (C, 2), (M, 3), batch=4, context=100).disaggregated
    assert dis.fits
    assert abs(dis.network_gbs_per_memory_device - dis.network_gbs_needed * 3 / 8) <= 1e-12 * dis.network_gbs_needed


@pytest.mark.parametrize(("model_type", "values", "shape"), [
    # GPT-2 spells hidden size, layers and heads n_embd / n_layer / n_head; its MLP is 4x wide
    ("gpt2", dict(n_embd=1024, n_layer=2, n_head=8, vocab_size=1000), (1024, 2, 8, 8, 4096)),
    ("opt", dict(hidden_size=1024, num_hidden_layers=2, num_attention_heads=8, ffn_dim=2048, vocab_size=1000),
     (1024, 2, 8, 8, 2048)),
    ("bloom", dict(hidden_size=1024, n_layer=2, n_head=8, vocab_size=1000), (1024, 2, 8, 8, 4096)),
    # Falcon-7B's multi-query attention: one KV head
    ("falcon", dict(hidden_size=1024, num_hidden_layers=2, num_attention_heads=8, vocab_size=1000),
     (1024, 2, 8, 1, 4096)),
    # Falcon-40B's: grouped KV heads (transformers < 5.24 has no num_key_value_heads for Falcon)
    ("falcon", dict(hidden_size=1024, num_hidden_layers=2, num_attention_heads=8, vocab_size=1000,
                    new_decoder_architecture=True, num_kv_heads=2), (1024, 2, 8, 2, 4096)),
])
def test_configs_read_through_transformers_attribute_names(model_type, values, shape, tmp_path):
    """The README: a config.json's keys are read as transformers reads them. GPT-2, OPT, BLOOM and
    Falcon (named among the ungated MLPs) were refused as lacking hidden_size / intermediate_size."""
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(model_type, **values).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    m = load_model(str(tmp_path))
    assert (m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.intermediate_size) == shape
    assert not m.gated_mlp


def test_memory_devices_past_the_kv_heads_are_priced_and_named_as_idle() -> None:
    """With more memory devices than KV heads, attention uses one per head: the note says the
    others idle while priced, and that a run takes at most that many attention workers (the
    runtime refuses more: `kv_shards`)."""
    four = plan_disaggregation(TOY, (C, 2), (M, 4), batch=B, context=S).disaggregated
    two = plan_disaggregation(TOY, (C, 2), (M, 2), batch=B, context=S).disaggregated
    assert four.attention.seconds == two.attention.seconds
    assert four.price_per_hour == two.price_per_hour + 2 * 1.25
    [note] = [n for n in four.notes if "KV heads" in n]
    assert "uses 2 of the 4 memory devices" in note and "at most 2 attention workers" in note
    assert not [n for n in two.notes if "KV heads" in n]
