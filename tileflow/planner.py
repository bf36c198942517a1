"""Disaggregation planner: colocated vs model-attention-disaggregated decode, from the device table.

`tileflow plan disaggregate` answers Lamina's question (shared/seeds/001, arXiv 2405.01814) for a
model and two device pools before anything is deployed: if the dense layers run on *compute*
devices and attention (with the KV cache) on *memory* devices, what decode throughput, cost per
token and network bandwidth should one expect, against running everything on one kind of device?
Every figure is a roofline estimate from datasheet numbers (`tileflow.devices`); it ranks
placements, it does not predict a measured tokens/s.

Model of one decode iteration (every sequence of the batch produces one token)
------------------------------------------------------------------------------
Symbols: d hidden size, L layers, H query heads, Hkv KV heads, hd head dim (config `head_dim`, its
class default when the file leaves it out, else d/H), G = H/Hkv, I intermediate size, V vocab,
B batch, S context (tokens already in the cache), e bytes per element of `dtype` (weights,
activations and KV cache all in `dtype`).

Only dense decoders with one MLP per block and per-head K/V are modelled: a config with routed
experts (MoE), a compressed latent KV cache (MLA) or layers other than full and sliding-window
attention is refused rather than mis-counted.

GEMM weights (LLaMA-style block: fused QKV, O, SwiGLU gate/up/down, LM head)::

    P_layer = d·(H + 2·Hkv)·hd  +  H·hd·d  +  m·d·I      (m = 3 gated MLP, 2 for up/down only)
    P_dense = L·P_layer + d·V                       (the LM head is a GEMM)
    P_store = P_dense + d·V  (input embedding; not counted again when tied)

Dense stage (all GEMMs), a roofline over FLOPs and bytes::

    FLOPs_dense = 2·P_dense·B
    bytes_dense = e·P_dense + e·B·A                 (weights read once + GEMM inputs/outputs)
    A = L·[(d + (H+2Hkv)·hd) + (H·hd + d) + (m - 1)·(d + I) + (I + d)] + (d + V)

Attention stage (decode reads the whole KV cache once)::

    bytes_attn = 2·B·Σ_l S_l·Hkv·hd·e               (K and V; also the KV cache size)
    FLOPs_attn = 4·B·Σ_l S_l·H·hd                   (q·Kᵀ and p·V, 2 FLOPs per MAC each)

where S_l = S for a layer of full attention and min(S, w) for a sliding window of w keys (it
keeps and reads only its last w positions); Σ_l S_l = L·S without windows. Which layers slide is
read as transformers reads the config (`layer_types`, else `sliding_window` for every layer, as
Mistral does), with the class defaults of its `model_type` for keys the file leaves out.

Stage time on n devices of one kind, at fraction η (`efficiency`, default 1) of datasheet peak::

    T(FLOPs, bytes, f) = max(f·FLOPs / (η·peak), f·bytes / (η·bw))

where f is the busiest device's share: dense work is split evenly (tensor parallel, f = 1/n);
attention is split by KV head (f = ceil(Hkv/n)/Hkv: with 8 KV heads on 3 devices the busiest
holds 3, f = 3/8). Tensor-parallel collectives are not modelled.

Placements
----------
* **colocated** on the compute devices alone, and **colocated-equal-cost** on a homogeneous set of
  compute devices costing at most what compute + memory devices cost together
  (N = floor(total $/h ÷ compute $/h); equal device count when a price is unknown). Both stages
  run one after the other on the same devices: ``T_iter = T_dense(n) + T_attn(n)``.
* **disaggregated** with Lamina's staggered pipelining: batches are staggered so the dense stage of
  one overlaps the attention stage of another, and transfers overlap both, so the slowest of the
  three sets the period::

      T_iter = max(T_dense(n_compute), T_attn(n_memory), T_net),   T_net = cut_bytes / net_bw

  T_net is only counted when a network bandwidth is given (`network_gbs`); otherwise the network
  is assumed not to be the bottleneck and the planner reports the bandwidth it needs. This is the
  ideal steady state: it assumes the weights are still read once per step of the whole batch.

Network (Lamina's formula): per iteration the attention input q, k, v and output cross the cut in
every layer, ``cut_bytes = (2 + 2/G)·e·H·hd·B·L`` (Lamina writes d, which is H·hd for LLaMA; a
config with its own `head_dim` sends H·hd-wide q and output); needed bandwidth = cut_bytes / T_iter
(aggregate over all links).

Throughput = B / T_iter tokens/s; cost = total $/h · 10⁶ / (3600 · tokens/s) per million tokens.

Memory capacity (GB = 10⁹ bytes, as in the device table; activations and workspace ignored): a
placement fits when on every device weights + KV cache ≤ mem_gb: colocated ``e·P_store/n +
f·bytes_attn``; disaggregated ``e·P_store/n_compute`` on compute and ``f·bytes_attn`` on memory
devices. A placement that does not fit reports "does not fit" (and the largest batch that does)
instead of a throughput.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import click

from .devices import DeviceInfo, get_device

# Bytes per element for the dtypes the device table lists peak rates for.
ELEMENT_BYTES: dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


@dataclass(frozen=True)
class ModelShape:
    """The few numbers of a decoder-only transformer the planner needs."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int | None = None  # None: hidden_size // num_heads (LLaMA); some configs set it
    tie_word_embeddings: bool = False
    gated_mlp: bool = True  # gate, up and down projections (SwiGLU); False: up and down only
    # Per layer, the sliding window in keys, or None for full attention; None: every layer full.
    layer_windows: tuple[int | None, ...] | None = None

    def __post_init__(self) -> None:
        for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                    "intermediate_size", "vocab_size"):
            if int(getattr(self, key)) <= 0:
                raise ValueError(f"model {self.name!r}: {key} must be positive")
        # 0 or a negative head_dim would silently flip or zero every count; None means d/H.
        if self.head_dim is not None and int(self.head_dim) <= 0:
            raise ValueError(f"model {self.name!r}: head_dim must be positive (or None for "
                             f"hidden_size // num_heads), got {self.head_dim}")
        if self.layer_windows is not None:
            if len(self.layer_windows) != self.num_layers:
                raise ValueError(f"model {self.name!r}: layer_windows has {len(self.layer_windows)} entries for "
                                 f"{self.num_layers} layers")
            bad = [w for w in self.layer_windows if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w <= 0)]
            if bad:
                raise ValueError(f"model {self.name!r}: a sliding window must be a positive int (or None for full "
                                 f"attention), got {bad[0]!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model {self.name!r}: num_attention_heads={self.num_heads} is not a multiple "
                f"of num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def hd(self) -> int:
        """Head dimension."""
        return self.head_dim if self.head_dim else self.hidden_size // self.num_heads

    @property
    def group_size(self) -> int:
        """G: query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def layer_gemm_params(self) -> int:
        """P_layer: weights of one block's GEMMs (QKV, O, gate, up, down)."""
        d, hd = self.hidden_size, self.hd
        qkv = d * (self.num_heads + 2 * self.num_kv_heads) * hd
        o = self.num_heads * hd * d
        mlp = (3 if self.gated_mlp else 2) * d * self.intermediate_size
        return qkv + o + mlp

    @property
    def dense_params(self) -> int:
        """P_dense: weights every decode step multiplies by (all blocks + LM head)."""
        return self.num_layers * self.layer_gemm_params + self.hidden_size * self.vocab_size

    @property
    def stored_params(self) -> int:
        """P_store: weights held in memory (adds the input embedding unless tied). Norms ignored."""
        embed = 0 if self.tie_word_embeddings else self.hidden_size * self.vocab_size
        return self.dense_params + embed

    @property
    def activation_elems_per_token(self) -> int:
        """A: GEMM input + output elements per token per step (each GEMM reads its input)."""
        d, hd, i = self.hidden_size, self.hd, self.intermediate_size
        qkv = d + (self.num_heads + 2 * self.num_kv_heads) * hd
        o = self.num_heads * hd + d
        gate_up = (2 if self.gated_mlp else 1) * (d + i)  # gate and up read d and write I each
        down = i + d
        return self.num_layers * (qkv + o + gate_up + down) + d + self.vocab_size

    def cached_positions(self, context: int) -> int:
        """Σ_l S_l: the positions every layer keeps and reads at `context` tokens, summed over the
        layers (a sliding-window layer only its last w)."""
        if self.layer_windows is None:
            return self.num_layers * context
        return sum(context if w is None else min(context, w) for w in self.layer_windows)


# Published shapes. Sources: the config.json files of meta-llama/Meta-Llama-3-8B and
# meta-llama/Meta-Llama-3-70B on the Hugging Face hub (LLaMA 3.1 keeps the same shapes).
KNOWN_MODELS: dict[str, ModelShape] = {
    "llama3-8b": ModelShape("llama3-8b", hidden_size=4096, num_layers=32, num_heads=32,
                            num_kv_heads=8, intermediate_size=14336, vocab_size=128256),
    "llama3-70b": ModelShape("llama3-70b", hidden_size=8192, num_layers=80, num_heads=64,
                             num_kv_heads=8, intermediate_size=28672, vocab_size=128256),
}
_MODEL_ALIASES = {"llama3.1-8b": "llama3-8b", "llama3.1-70b": "llama3-70b",
                  "llama-3-8b": "llama3-8b", "llama-3-70b": "llama3-70b"}


# Config keys that hold a routed-expert count (Mixtral / GPT-OSS / PhiMoE, Qwen-MoE / OLMoE,
# DeepSeek): such a model stores every expert but reads only the routed ones, which the dense
# formulas above cannot express.
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _config_int(config: dict[str, Any], key: str, name: str) -> int:
    """`config[key]` as an int; a clear ValueError for null, text, lists or fractional values."""
    value = config[key]
    # bool is an int subclass, and int() would truncate 4096.5 or crash on None / a list / NaN.
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and not value.is_integer())):
        raise ValueError(f"{name}: config {key}={value!r} is not an integer")
    return int(value)


# model_types whose MLP is an up and a down projection with no gate (GPT-NeoX, Phi-2, StarCoder2,
# Nemotron/Minitron, Persimmon/Fuyu, Arcee AFM, Apertus, ...); every other model_type is taken to
# be LLaMA-style (gate, up, down).
_UNGATED_MLP_MODEL_TYPES = frozenset({
    "gpt2", "gpt_neo", "gpt_neox", "gptj", "gpt_bigcode", "codegen", "phi", "starcoder2", "opt",
    "falcon", "bloom", "mpt", "nemotron", "persimmon", "arcee", "apertus", "apertus1p5",
    "apertus1p5_text", "jais2", "nanochat", "biogpt",
})


def _as_transformers_reads_it(config: dict[str, Any], name: str) -> Any:
    """The config as transformers reads it (class defaults filled in for the keys the file leaves
    out), or None without transformers or for a `model_type` it does not know.

    transformers omits values equal to a config class's defaults when it writes config.json (older
    versions): a Gemma config may lack `tie_word_embeddings` and still tie, and Gemma-2's
    alternating windows come from the class, not the file.
    """
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return None
    try:
        # Optional dependency, and a slow import: only for configs that name their model_type.
        from transformers import AutoConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:
        return None
    if model_type not in CONFIG_MAPPING:
        return None  # a model this transformers does not know: the file's own keys are all there is
    try:
        return AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"})
    except Exception as exc:  # the values themselves: say so rather than plan from half a config
        raise ValueError(f"{name}: transformers cannot read this {model_type} config: {exc}") from None


def _read_attr(read: Any, key: str, name: str) -> Any:
    """`read.key` (None when absent). A config whose value differs per layer (transformers raises
    a RuntimeError rather than give one global value) is refused with a ValueError."""
    try:
        return getattr(read, key, None)
    except Exception as exc:
        raise ValueError(f"{name}: transformers gives no single {key} for this config (per-layer "
                         f"configurations are not modelled): {exc}") from None


def _layer_windows(config: dict[str, Any], read: Any, num_layers: int, name: str) -> tuple[int | None, ...] | None:
    """Each layer's sliding window (None: full attention), or None when no layer slides."""
    def get(key: str) -> Any:
        return _read_attr(read, key, name) if read is not None else config.get(key)

    layer_types, window = get("layer_types"), get("sliding_window")
    if not layer_types:
        if window is None or (read is None and config.get("use_sliding_window") is False):
            return None
        if read is None:
            raise ValueError(f"{name}: config sets sliding_window={window!r} but not which layers slide "
                             "(layer_types): install transformers so the planner reads it as the model does, "
                             "or add layer_types")
        layer_types = ["sliding_attention"] * num_layers  # every layer slides (Mistral)
    if len(layer_types) != num_layers:
        raise ValueError(f"{name}: config layer_types has {len(layer_types)} entries for {num_layers} layers")
    unknown = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
    if unknown:
        raise ValueError(f"{name}: layers of type {unknown} are not modelled (only full_attention and "
                         "sliding_attention: the planner counts a KV cache of every position or of a window)")
    if "sliding_attention" in layer_types:
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            raise ValueError(f"{name}: config has sliding_attention layers but sliding_window={window!r}")
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return None


# Where configs that predate transformers' standard names keep their MLP width (GPT-2, GPT-J,
# CodeGen and StarCoder's `n_inner`, OPT's `ffn_dim`, Falcon's `ffn_hidden_size`).
_INTERMEDIATE_SIZE_KEYS = ("n_inner", "ffn_dim", "ffn_hidden_size")


def _with_standard_keys(config: dict[str, Any], name: str) -> dict[str, Any]:
    """`config` with the standard keys it spells otherwise filled in as transformers reads them.

    GPT-2's `n_embd`/`n_layer`/`n_head`, BLOOM's and MPT's names are `hidden_size`,
    `num_hidden_layers` and `num_attention_heads` through the config class's `attribute_map`
    (and Falcon's or StarCoder's multi-query `num_key_value_heads` through a property); their MLP
    width is one of `_INTERMEDIATE_SIZE_KEYS`, or, when unset, 4x the hidden size (MPT's
    `expansion_ratio` times it), as those models build it. Without this such configs, which
    `_UNGATED_MLP_MODEL_TYPES` names, were refused as lacking `hidden_size`.
    """
    standard = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    if all(k in config for k in standard) or config.get("model_type") is None:
        return config
    read = _as_transformers_reads_it(config, name)
    if read is None:
        return config
    filled = dict(config)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        value = _read_attr(read, key, name)
        if filled.get(key) is None and value is not None:
            filled[key] = value
    if filled.get("num_key_value_heads") is None and filled.get("model_type") == "falcon":
        # transformers before 5.24 has no such property for Falcon: its attention's own rule
        # (one KV head for the original multi-query architecture).
        multi_query = _read_attr(read, "multi_query", name) and not _read_attr(read, "new_decoder_architecture", name)
        filled["num_key_value_heads"] = 1 if multi_query else _read_attr(read, "num_kv_heads", name)
    if "intermediate_size" not in filled:
        width = next((_read_attr(read, k, name) for k in ("intermediate_size", *_INTERMEDIATE_SIZE_KEYS)
                      if _read_attr(read, k, name) is not None), None)
        hidden = filled.get("hidden_size")
        if width is None and filled.get("model_type") in _UNGATED_MLP_MODEL_TYPES and isinstance(hidden, int):
            ratio = _read_attr(read, "expansion_ratio", name)
            width = (ratio if isinstance(ratio, int) and not isinstance(ratio, bool) else 4) * hidden
        if width is not None:
            filled["intermediate_size"] = width
    return filled


def _refuse_experts_and_latent_kv(get: Any, name: str, dense: bool = False) -> None:
    """A ValueError for a mixture-of-experts or latent-attention (MLA) config; `get(key)` gives a
    config value, or None when it has none. `dense`: the config says it has no experts (Doge's
    `is_moe: false`, beside an expert count it does not use)."""
    experts = {} if dense else {k: get(k) for k in _EXPERT_COUNT_KEYS
                                if isinstance(get(k), (int, float)) and not isinstance(get(k), bool) and get(k) > 1}
    if experts:
        raise ValueError(f"{name}: mixture-of-experts configs ({experts}) are not supported: "
                         "the planner models one dense MLP per block")
    if get("kv_lora_rank") is not None:
        raise ValueError(f"{name}: multi-head latent attention (kv_lora_rank) is not supported: "
                         "the planner models a KV cache of 2·Hkv·head_dim per token and layer")


def model_from_config(config: dict[str, Any], name: str = "config") -> ModelShape:
    """ModelShape from a transformers config dict (uses `text_config` when nested).

    Raises ValueError for a missing or non-integer field, and for MoE or MLA configs (see the
    module docstring).
    """
    if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
        config = config["text_config"]  # multimodal wrappers keep the LM shape here
    config = _with_standard_keys(config, name)
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "vocab_size") if k not in config]
    if missing:
        raise ValueError(f"{name}: config lacks {missing}")
    _refuse_experts_and_latent_kv(config.get, name, dense=config.get("is_moe") is False)
    heads = _config_int(config, "num_attention_heads", name)
    # Absent (or null) in pre-GQA configs: every head has its own K and V. An explicit 0 is an
    # error (ModelShape refuses it), not MHA.
    kv_heads = (heads if config.get("num_key_value_heads") is None
                else _config_int(config, "num_key_value_heads", name))
    head_dim = None if config.get("head_dim") is None else _config_int(config, "head_dim", name)
    tie = config.get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):
        raise ValueError(f"{name}: config tie_word_embeddings={tie!r} is not true or false")
    num_layers = _config_int(config, "num_hidden_layers", name)
    hidden, inter, vocab = (_config_int(config, key, name) for key in ("hidden_size", "intermediate_size", "vocab_size"))
    read = _as_transformers_reads_it(config, name)  # after the checks above: their messages are clearer
    if read is not None:
        # The keys the file leaves out are the class's defaults (Mixtral's 8 experts, DeepSeek-V3's
        # latent KV, Qwen3's or Gemma's head_dim): read from the file alone, such a config was
        # planned as a dense model of another head size.
        dense = (config["is_moe"] if "is_moe" in config else _read_attr(read, "is_moe", name)) is False
        _refuse_experts_and_latent_kv(lambda key: None if key in config else _read_attr(read, key, name), name, dense)
        default_head_dim = _read_attr(read, "head_dim", name) if "head_dim" not in config else None
        if (head_dim is None and isinstance(default_head_dim, int) and not isinstance(default_head_dim, bool)
                and default_head_dim > 0):
            head_dim = default_head_dim
    if tie is None:  # the class default when transformers knows the model (LLaMA's, untied, if not)
        tie = bool(_read_attr(read, "tie_word_embeddings", name))
    return ModelShape(
        name=name,
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        intermediate_size=inter,
        vocab_size=vocab,
        head_dim=head_dim,
        tie_word_embeddings=tie,
        gated_mlp=config.get("model_type") not in _UNGATED_MLP_MODEL_TYPES,
        layer_windows=_layer_windows(config, read, num_layers, name),
    )


def load_model(spec: str) -> ModelShape:
    """A known model name (`llama3-70b`, `llama3-8b`), or a config.json path / its directory."""
    key = spec.lower()
    key = _MODEL_ALIASES.get(key, key)
    if key in KNOWN_MODELS:
        return KNOWN_MODELS[key]
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise ValueError(
            f"{spec!r} is neither a known model {sorted(KNOWN_MODELS)} nor a config.json file "
            "or a directory holding one"
        )
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object")
    label = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
    return model_from_config(config, name=label)


def cut_bytes_per_iteration(hidden_size: int, num_layers: int, batch: int, group_size: int,
                            elem_bytes: int) -> float:
    """Bytes crossing the model/attention cut per decode iteration: (2 + 2/G)·e·d·B·L.

    Per layer and token, q (d) goes to the attention devices with k and v (d/G each) and the
    attention output (d) comes back: (2 + 2/G)·d elements (Lamina, arXiv 2405.01814).
    """
    if group_size <= 0:
        raise ValueError("group_size must be positive")
    return (2 + 2 / group_size) * elem_bytes * hidden_size * batch * num_layers


@dataclass
class StageCost:
    """One stage on one pool of devices: totals, and the busiest device's roofline time."""

    flops: float
    bytes: float
    seconds: float
    bound: str  # "compute" or "memory": which roofline side sets `seconds`


@dataclass
class MemoryCheck:
    """Capacity check of one device pool (per device)."""

    pool: str
    need_gb: float
    capacity_gb: float
    fits: bool


@dataclass
class Placement:
    """Estimate for one placement. Throughput figures are None when it does not fit."""

    name: str
    devices: str
    basis: str
    price_per_hour: float | None
    dense: StageCost
    attention: StageCost
    iteration_s: float
    bottleneck: str
    memory: list[MemoryCheck]
    fits: bool
    max_batch: int | None  # largest batch whose KV cache fits (None: not bounded by memory)
    tokens_per_s: float | None
    cost_per_mtok: float | None
    network_bytes_per_iter: float  # 0 for colocated (tensor-parallel traffic not modelled)
    network_gbs_needed: float | None  # aggregate over the cut
    network_gbs_per_memory_device: float | None  # each memory device's link (its KV heads' share)
    notes: list[str] = field(default_factory=list)
    # The same placement re-planned at `max_batch` (so a placement that does not fit at the asked
    # batch still gets a comparable figure). None when max_batch is None or 0.
    max_batch_tokens_per_s: float | None = None
    max_batch_cost_per_mtok: float | None = None


@dataclass
class PlanResult:
    """`plan_disaggregation`'s answer: the inputs and the three placements."""

    model: ModelShape
    batch: int
    context: int
    dtype: str
    efficiency: float
    network_gbs: float | None
    colocated: Placement  # on the compute devices alone
    colocated_equal_cost: Placement  # homogeneous compute devices costing the same (rounded down)
    disaggregated: Placement

    @property
    def placements(self) -> list[Placement]:
        """The three placements compared, in the order the report prints them."""
        return [self.colocated, self.colocated_equal_cost, self.disaggregated]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        data = asdict(self)
        data["model"]["head_dim"] = self.model.hd
        return data


def _roofline(flops: float, nbytes: float, share: float, dev: DeviceInfo, dtype: str,
              efficiency: float) -> StageCost:
    """Busiest device's time for a stage of which it does `share`."""
    t_compute = share * flops / (efficiency * dev.peak_flops(dtype))
    t_memory = share * nbytes / (efficiency * dev.mem_bw_bytes)
    if t_compute >= t_memory:
        return StageCost(flops, nbytes, t_compute, "compute")
    return StageCost(flops, nbytes, t_memory, "memory")


def _kv_share(model: ModelShape, n: int) -> float:
    """Fraction of the KV heads (and so of attention work and cache) on the busiest device."""
    return math.ceil(model.num_kv_heads / n) / model.num_kv_heads


def _stage_work(model: ModelShape, batch: int, context: int, e: int) -> tuple[float, ...]:
    """(FLOPs_dense, bytes_dense, FLOPs_attn, bytes_attn) of one decode iteration."""
    p = model.dense_params
    flops_dense = 2.0 * p * batch
    bytes_dense = float(e * p + e * batch * model.activation_elems_per_token)
    positions = model.cached_positions(context)
    bytes_attn = 2.0 * batch * positions * model.num_kv_heads * model.hd * e
    flops_attn = 4.0 * batch * positions * model.num_heads * model.hd
    return flops_dense, bytes_dense, flops_attn, bytes_attn


def _max_batch(capacity_gb: float, fixed_bytes: float, per_seq_bytes: float) -> int | None:
    """Largest B with fixed + B·per_seq ≤ capacity (None when per_seq is 0)."""
    if per_seq_bytes <= 0:
        return None
    return max(0, math.floor((capacity_gb * 1e9 - fixed_bytes) / per_seq_bytes))


def _window_note(model: ModelShape, context: int, kv_bytes: float, batch: int, capacity_gb: float,
                 fixed_bytes: float) -> list[str]:
    """For a model whose layers mix sliding windows and full attention, placed disaggregated: the
    KV cache above counts a sliding layer's last w positions, as the serving engine holds them
    (its KV groups, `tileflow.serving.kv_groups`); tileflow's attention workers do so only when
    told how many blocks the sliding layers get (`ModelWorker(sliding_blocks=...)`), and keep
    every position otherwise, so say what they then hold."""
    windows = model.layer_windows
    if windows is None or all(w is not None for w in windows) or all(w is None for w in windows):
        return []
    kept = model.cached_positions(context)
    if kept >= model.num_layers * context:
        return []
    full = kv_bytes * model.num_layers * context / kept
    bound = _max_batch(capacity_gb, fixed_bytes, full / batch)
    return [f"the KV cache counts each sliding-window layer's last w positions; tileflow's attention workers "
            f"keep every position while any layer attends fully, unless given sliding_blocks: {full / 1e9:.1f} GB "
            f"per device at this batch, max batch {bound}"]


def _min_bound(values: list[int | None]) -> int | None:
    bounded = [v for v in values if v is not None]
    return min(bounded) if bounded else None


def _pool_price(dev: DeviceInfo, n: int) -> float | None:
    return None if dev.price_per_hour is None else dev.price_per_hour * n


def _throughput(batch: int, iteration_s: float, price: float | None) -> tuple[float, float | None]:
    tps = batch / iteration_s
    cost = None if price is None else price * 1e6 / (3600.0 * tps)
    return tps, cost


def _colocated(model: ModelShape, dev: DeviceInfo, n: int, batch: int, context: int, dtype: str,
               efficiency: float, name: str, basis: str) -> Placement:
    e = ELEMENT_BYTES[dtype]
    fd, bd, fa, ba = _stage_work(model, batch, context, e)
    share = _kv_share(model, n)
    dense = _roofline(fd, bd, 1.0 / n, dev, dtype, efficiency)
    attn = _roofline(fa, ba, share, dev, dtype, efficiency)
    # Same devices run both stages, one after the other.
    iteration = dense.seconds + attn.seconds
    weights = e * model.stored_params / n
    need = weights + share * ba
    check = MemoryCheck(f"{n} x {dev.name}", need / 1e9, dev.mem_gb, need <= dev.mem_gb * 1e9)
    max_batch = _max_batch(dev.mem_gb, weights, share * ba / batch)
    price = _pool_price(dev, n)
    # Colocated, the serving engine runs the model: it holds a sliding layer's window only, as counted.
    notes = []
    if n > model.num_kv_heads:
        notes.append(f"only {model.num_kv_heads} KV heads: attention uses "
                     f"{model.num_kv_heads} of the {n} devices")
    tps, cost = _throughput(batch, iteration, price) if check.fits else (None, None)
    return Placement(
        name=name, devices=f"{n} x {dev.name}", basis=basis, price_per_hour=price,
        dense=dense, attention=attn, iteration_s=iteration,
        bottleneck="dense" if dense.seconds >= attn.seconds else "attention",
        memory=[check], fits=check.fits, max_batch=max_batch, tokens_per_s=tps,
        cost_per_mtok=cost, network_bytes_per_iter=0.0, network_gbs_needed=None,
        network_gbs_per_memory_device=None, notes=notes,
    )


def _disaggregated(model: ModelShape, cdev: DeviceInfo, nc: int, mdev: DeviceInfo, nm: int,
                   batch: int, context: int, dtype: str, efficiency: float,
                   network_gbs: float | None) -> Placement:
    e = ELEMENT_BYTES[dtype]
    fd, bd, fa, ba = _stage_work(model, batch, context, e)
    share = _kv_share(model, nm)
    dense = _roofline(fd, bd, 1.0 / nc, cdev, dtype, efficiency)
    attn = _roofline(fa, ba, share, mdev, dtype, efficiency)
    # Lamina's formula is in terms of d; the attention width H·hd equals d for LLaMA-style models
    # and is what really crosses the cut when a config sets head_dim.
    width = model.num_heads * model.hd
    cut = cut_bytes_per_iteration(width, model.num_layers, batch, model.group_size, e)
    # Staggered pipelining overlaps the stages (and the transfers): the slowest sets the period.
    stages = {"dense": dense.seconds, "attention": attn.seconds}
    if network_gbs is not None:
        stages["network"] = cut / (network_gbs * 1e9)
    bottleneck = max(stages, key=stages.__getitem__)
    iteration = stages[bottleneck]
    weights = e * model.stored_params / nc
    kv = share * ba
    checks = [
        MemoryCheck(f"{nc} x {cdev.name} (weights)", weights / 1e9, cdev.mem_gb,
                    weights <= cdev.mem_gb * 1e9),
        MemoryCheck(f"{nm} x {mdev.name} (KV cache)", kv / 1e9, mdev.mem_gb,
                    kv <= mdev.mem_gb * 1e9),
    ]
    fits = all(c.fits for c in checks)
    max_batch = _min_bound([
        0 if weights > cdev.mem_gb * 1e9 else None,  # weights alone overflow: nothing fits
        _max_batch(mdev.mem_gb, 0.0, kv / batch),
    ])
    pc, pm = _pool_price(cdev, nc), _pool_price(mdev, nm)
    price = None if pc is None or pm is None else pc + pm
    notes = _window_note(model, context, kv, batch, mdev.mem_gb, 0.0)
    if nm > model.num_kv_heads:
        notes.append(f"only {model.num_kv_heads} KV heads: attention uses "
                     f"{model.num_kv_heads} of the {nm} memory devices (a run takes at most "
                     f"{model.num_kv_heads} attention workers; the price counts all {nm})")
    tps, cost = _throughput(batch, iteration, price) if fits else (None, None)
    need = cut / iteration / 1e9 if fits else None
    return Placement(
        name="disaggregated", devices=f"{nc} x {cdev.name} + {nm} x {mdev.name}",
        basis="dense layers on the compute devices, attention + KV cache on the memory devices "
              "(by KV head), staggered pipelining",
        price_per_hour=price, dense=dense, attention=attn, iteration_s=iteration,
        bottleneck=bottleneck, memory=checks, fits=fits, max_batch=max_batch,
        tokens_per_s=tps, cost_per_mtok=cost, network_bytes_per_iter=cut,
        network_gbs_needed=need,
        # q/k/v/out of a KV head's query group go to the device holding that head.
        network_gbs_per_memory_device=None if need is None else need * share,
        notes=notes,
    )


def plan_disaggregation(model_shape: ModelShape, compute: tuple[DeviceInfo, int],
                        memory: tuple[DeviceInfo, int], batch: int, context: int,
                        dtype: str = "bfloat16", *, efficiency: float = 1.0,
                        network_gbs: float | None = None) -> PlanResult:
    """Estimate colocated and disaggregated decode for `model_shape` (formulas: module docstring).

    Args:
        compute: (device, count) running the dense layers when disaggregated.
        memory: (device, count) holding the KV cache and running attention when disaggregated.
        batch, context: concurrent sequences and tokens in each one's KV cache.
        dtype: weights, activations and KV cache dtype (a key of the devices' `peak_tflops`).
        efficiency: fraction of datasheet peak FLOP/s and bandwidth reached (1 = roofline).
        network_gbs: aggregate bandwidth of the cut in GB/s; None = not a bottleneck.

    Raises ValueError on a bad count, batch, context, efficiency or dtype.
    """
    (cdev, nc), (mdev, nm) = compute, memory
    # Whole devices, sequences and tokens: 1.5 devices or 8.5 sequences would plan silently.
    for label, value in (("compute device count", nc), ("memory device count", nm),
                         ("batch", batch), ("context", context)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{label} must be an integer, got {value!r}")
    if nc <= 0 or nm <= 0:
        raise ValueError("device counts must be positive")
    if batch <= 0 or context <= 0:
        raise ValueError("batch and context must be positive")
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency must be in (0, 1], got {efficiency}")
    # `not x > 0` also refuses NaN, which compares False with everything and would drop the
    # network from the max() that sets the disaggregated period.
    if network_gbs is not None and not network_gbs > 0:
        raise ValueError(f"network_gbs must be positive, got {network_gbs}")
    if dtype not in ELEMENT_BYTES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(ELEMENT_BYTES)}")
    for dev in (cdev, mdev):
        dev.peak_flops(dtype)  # raises a clear error if the table lacks this dtype

    def at_max_batch(p: Placement, build: Any) -> Placement:
        if p.max_batch:  # neither None (unbounded) nor 0 (nothing fits)
            q = build(p.max_batch)
            p.max_batch_tokens_per_s, p.max_batch_cost_per_mtok = q.tokens_per_s, q.cost_per_mtok
        return p

    def colocated_on(n: int, name: str, basis: str) -> Placement:
        def build(b: int) -> Placement:
            return _colocated(model_shape, cdev, n, b, context, dtype, efficiency, name, basis)
        return at_max_batch(build(batch), build)

    colocated = colocated_on(nc, "colocated", "both stages on the compute devices alone")
    # Homogeneous set of compute devices costing at most what both pools cost together.
    pc, pm = _pool_price(cdev, nc), _pool_price(mdev, nm)
    if pc is None or pm is None:
        n_eq = nc + nm
        basis = "equal device count (a price is unknown)"
    else:
        n_eq = max(1, math.floor((pc + pm) / cdev.price_per_hour + 1e-9))
        basis = (f"homogeneous {cdev.name} set costing <= ${pc + pm:.2f}/h "
                 "(whole devices, rounded down)")
    equal_cost = colocated_on(n_eq, "colocated-equal-cost", basis)

    def build_disagg(b: int) -> Placement:
        return _disaggregated(model_shape, cdev, nc, mdev, nm, b, context, dtype, efficiency,
                              network_gbs)
    disagg = at_max_batch(build_disagg(batch), build_disagg)
    return PlanResult(model_shape, batch, context, dtype, efficiency, network_gbs,
                      colocated, equal_cost, disagg)


def _fmt_money(x: float | None, unit: str) -> str:
    return "n/a (price unknown)" if x is None else f"${x:,.3f}{unit}"


def _fmt_stage(s: StageCost) -> str:
    return f"{s.seconds * 1e3:.2f} ms ({s.bound})"


def _describe_windows(windows: tuple[int | None, ...]) -> str:
    """`4096 in 13 of 26 layers` (each distinct window and its layer count)."""
    sizes = sorted({w for w in windows if w is not None})
    return ", ".join(f"{w} in {sum(1 for x in windows if x == w)} of {len(windows)} layers" for w in sizes)


def format_plan(result: PlanResult) -> str:
    """A table: one column per placement, one row per figure."""
    m = result.model
    head = (f"model {m.name}: d={m.hidden_size} L={m.num_layers} H={m.num_heads} "
            f"Hkv={m.num_kv_heads} I={m.intermediate_size} V={m.vocab_size}"
            + ("" if m.gated_mlp else " MLP up/down")
            + (f" sliding windows {_describe_windows(m.layer_windows)}" if m.layer_windows else "")
            + f" ({m.stored_params / 1e9:.2f}B params); batch {result.batch}, context "
            f"{result.context}, {result.dtype}, efficiency {result.efficiency:g}"
            + (f", network {result.network_gbs:g} GB/s" if result.network_gbs else ""))

    def cell(p: Placement, key: str) -> str:
        nofit = "does not fit"
        if key == "devices":
            return p.devices
        if key == "price":
            return _fmt_money(p.price_per_hour, "/h")
        if key == "dense":
            return _fmt_stage(p.dense)
        if key == "attn":
            return _fmt_stage(p.attention)
        if key == "iter":
            return f"{p.iteration_s * 1e3:.2f} ms ({p.bottleneck})"
        if key == "tps":
            return nofit if not p.fits else f"{p.tokens_per_s:,.0f}"
        if key == "cost":
            if not p.fits:
                return nofit
            return _fmt_money(p.cost_per_mtok, "")
        if key == "net":
            if p.network_bytes_per_iter == 0:
                return "-"
            if not p.fits:
                return nofit
            return (f"{p.network_gbs_needed:.1f} ({p.network_gbs_per_memory_device:.1f} per "
                    f"memory device; {p.network_bytes_per_iter / 1e9:.3f} GB/iter)")
        if key == "mem":
            return "; ".join(f"{c.need_gb:.1f} of {c.capacity_gb:g}" + ("" if c.fits else " (over)")
                             for c in p.memory)
        if key == "maxb":
            return "unbounded" if p.max_batch is None else str(p.max_batch)
        if key == "atmax":
            if p.max_batch_tokens_per_s is None:
                return "-"
            return (f"{p.max_batch_tokens_per_s:,.0f} tok/s, "
                    + _fmt_money(p.max_batch_cost_per_mtok, "/1M"))
        raise KeyError(key)

    rows = [("devices", "devices"), ("price", "price"), ("dense", "dense stage"),
            ("attn", "attention stage"), ("iter", "iteration"), ("tps", "decode tokens/s"),
            ("cost", "$ per 1M tokens"), ("net", "network needed GB/s"),
            ("mem", "GB per device need/cap"), ("maxb", "max batch that fits"),
            ("atmax", "at max batch")]
    cols = result.placements
    table = [["", *[p.name for p in cols]]] + [[label, *[cell(p, k) for p in cols]]
                                                for k, label in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = [head, ""]
    for j, r in enumerate(table):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    for p in cols:
        lines.append(f"{p.name}: {p.basis}")
        for note in p.notes:
            lines.append(f"  note: {note}")
    lines.append("roofline estimates from datasheet numbers; stage times are the busiest device's.")
    return "\n".join(lines)


class DeviceCount(click.ParamType):
    """Click type for `NAME[:COUNT]`, e.g. `H100:2` -> (DeviceInfo, 2)."""

    name = "DEVICE:COUNT"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[DeviceInfo, int]:
        """`NAME[:COUNT]` as (the device table's entry, count); a bad name or count fails with click's usage error."""
        if isinstance(value, tuple):
            return value
        name, sep, count_text = str(value).partition(":")
        if not name:
            self.fail(f"{value!r}: expected DEVICE:COUNT, e.g. H100:2", param, ctx)
        try:
            count = int(count_text) if sep else 1
        except ValueError:
            self.fail(f"{value!r}: the count after ':' must be a positive integer, "
                      f"got {count_text!r}", param, ctx)
        if count <= 0:
            self.fail(f"{value!r}: the count must be positive", param, ctx)
        try:
            return get_device(name), count
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@click.group("plan", context_settings={"help_option_names": ["-h", "--help"]})
def plan() -> None:
    """Placement planners: estimate a deployment from the device table."""


@plan.command("disaggregate")
@click.option("--model", "model_spec", required=True,
              help="llama3-70b, llama3-8b, or a transformers config.json (file or directory).")
@click.option("--compute", required=True, type=DeviceCount(),
              help="Dense-layer devices, DEVICE:COUNT (e.g. H100:2).")
@click.option("--memory", required=True, type=DeviceCount(),
              help="Attention / KV-cache devices, DEVICE:COUNT (e.g. H20:4).")
@click.option("--batch", required=True, type=click.IntRange(min=1), help="Concurrent sequences.")
@click.option("--context", required=True, type=click.IntRange(min=1),
              help="Tokens in each sequence's KV cache.")
@click.option("--dtype", default="bfloat16", show_default=True,
              type=click.Choice(sorted(ELEMENT_BYTES)), help="Weights / activations / KV dtype.")
@click.option("--network-gbs", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Aggregate cut bandwidth in GB/s (default: assume it is not the bottleneck).")
@click.option("--efficiency", type=click.FloatRange(0, 1, min_open=True), default=1.0,
              show_default=True, help="Fraction of datasheet FLOP/s and bandwidth reached.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def disaggregate_command(model_spec: str, compute: tuple[DeviceInfo, int],
                         memory: tuple[DeviceInfo, int], batch: int, context: int, dtype: str,
                         network_gbs: float | None, efficiency: float, as_json: bool) -> None:
    """Colocated vs model-attention-disaggregated decode: tokens/s, $/1M tokens, network need."""
    try:
        model = load_model(model_spec)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--model'") from None
    try:
        result = plan_disaggregation(model, compute, memory, batch, context, dtype,
                                     efficiency=efficiency, network_gbs=network_gbs)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(format_plan(result))
