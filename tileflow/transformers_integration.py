"""transformers integration: `attn_implementation="tileflow"` runs attention on the meta-kernel.

    import tileflow
    tileflow.register_transformers()
    model = transformers.LlamaForCausalLM(config)          # config._attn_implementation = "tileflow"

The model builds the same masks it builds for SDPA (boolean, True = attend); tileflow applies them
as an additive bias inside the kernel, or its causal rule (the last query at the last key) when
the model passes no mask. Compiled with `backend="tileflow"`, a mask the attention pass proves to
be that rule (with its sliding window) is not built at all (`tileflow.mask_rule`).
"""

from __future__ import annotations

import inspect
import re
import sys
from typing import Any

import torch

from .ops import meta_attention

ATTENTION_NAME = "tileflow"
# Every attention is causal self-attention over the tokens in order, and no mask tensor is built:
# the form serving steps are traced in (`tileflow.distributed`), where the attention stages apply
# the causal rule per sequence against their own KV cache.
CAUSAL_ATTENTION_NAME = "tileflow_causal"


def tileflow_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q [B, Hq, S, D], k/v [B, Hkv, S_kv, D] (GQA unrepeated)
    -> ([B, S, Hq, D], None), like the SDPA integration (its mask, its T5-style `position_bias`).
    Without a mask the causal rule puts the last query at the last key, as flash attention does
    (Gemma-4's shared-KV layers cut the queries to the last few and keep every key); the mask
    function (`causal_mask`) never leaves out a mask where SDPA's first-key rule would differ."""
    if dropout and module.training:
        raise ValueError("tileflow attention is for inference: dropout during training is not supported")
    _refuse_sparse(ATTENTION_NAME, kwargs)
    _refuse_attention_weights(ATTENTION_NAME, kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers' SDPA path: an explicit mask wins, and one query row needs no causal rule.
    causal = bool(causal and attention_mask is None and query.shape[2] > 1)
    mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        # T5's relative attention bias joins the scores where the mask lets them through (the
        # causal rule, if any, still applies on top).
        if mask is None:
            mask = position_bias
        elif mask.dtype == torch.bool:
            mask = position_bias.masked_fill(~mask, torch.finfo(position_bias.dtype).min)
        else:
            mask = position_bias + mask
    query, key, value, scaling, width = _one_head_size(query, key, value, scaling)
    out = meta_attention(query, key, value, mask, causal=causal, scale=scaling, softcap=kwargs.get("softcap"),
                         sinks=_head_sinks(ATTENTION_NAME, query, kwargs))
    return out[..., :width].transpose(1, 2).contiguous(), None


def _refuse_sparse(name: str, kwargs: dict[str, Any]) -> None:
    """Refuse the keys a sparse attention selected (DeepSeek-V3.2-style indexers): models hand
    them to every attention function but eager's and SDPA's (those get them as a mask), and
    attending to every key instead would be silently wrong."""
    for arg in ("indices", "block_indices"):
        if kwargs.get(arg) is not None:
            raise ValueError(
                f"attn_implementation={name!r} runs dense attention, but the model passes {arg}= (the keys its "
                "sparse attention selects), which it would ignore: use attn_implementation='sdpa' or 'eager', "
                "which get them as a mask"
            )


def _refuse_attention_weights(name: str, kwargs: dict[str, Any]) -> None:
    """Refuse `output_attentions=True` given to a call (`model(..., output_attentions=True)`,
    `generate(..., output_attentions=True)`): the meta-kernel never forms the attention weights,
    and the model would return an empty `attentions` tuple without a word (transformers refuses
    the config flag for any implementation but eager's, but not the call's)."""
    if kwargs.get("output_attentions"):
        raise ValueError(
            f"attn_implementation={name!r} does not return attention weights (the kernel never forms them), but "
            "output_attentions=True asks for them: use attn_implementation='eager' for the weights"
        )


def _head_sinks(name: str, query: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """Attention sinks, one logit per query head (gpt-oss's `s_aux`); per-token sinks (a `sinks`
    tensor of another shape, Inkling-2's) are refused, not dropped."""
    sinks = kwargs.get("s_aux")
    if sinks is None and kwargs.get("sinks") is not None:
        sinks = kwargs["sinks"]
        if sinks.dim() != 1 or sinks.shape[0] != query.shape[1]:
            raise ValueError(
                f"attn_implementation={name!r} takes attention sinks as one logit per query head ([{query.shape[1]}]), "
                f"but the model passes sinks of shape {list(sinks.shape)} (per token): use attn_implementation='eager'"
            )
    return sinks


def _one_head_size(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   scale: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, int]:
    """q, k, v with one head size, the scale, and v's own head size to cut the output back to.
    The meta-kernel takes one head size; multi-head latent attention (DeepSeek-V3) has values
    narrower than queries and keys. Zero columns change neither q.k nor P @ v's first columns,
    as transformers' flash-attention path pads them too; the default scale is the queries'."""
    d_qk, d_v = query.shape[-1], value.shape[-1]
    scale = scale if scale is not None else d_qk ** -0.5
    if d_v < d_qk:
        value = torch.nn.functional.pad(value, (0, d_qk - d_v))
    elif d_v > d_qk:
        query = torch.nn.functional.pad(query, (0, d_v - d_qk))
        key = torch.nn.functional.pad(key, (0, d_v - d_qk))
    return query, key, value, scale, d_v


def causal_attention_forward(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """`"tileflow_causal"`: always causal (within the layer's sliding window or attention chunk,
    with its logit soft-cap and attention sinks, when it has them), never a mask tensor, no branch on the token count (so one traced
    graph serves every count, 1 included). Padding masks, caches whose keys run past the
    queries (a StaticCache), non-causal layers (encoders, cross-attention) and position biases
    are refused. Several sequences packed in one row (position ids that restart, with no mask and
    no cache) are kept apart: each token sees no key before its sequence's first, or its chunk's
    (`packed_key_starts`, the op's `key_starts`; no [S, S] mask)."""
    window, chunk, key_offset = kwargs.get("sliding_window"), None, 0
    if attention_mask is BIDIRECTIONAL:
        raise ValueError(
            f"attn_implementation='tileflow_causal' is causal, but {type(module).__name__}'s mask is bidirectional "
            "(an encoder's or a cross-attention's): use attn_implementation='tileflow'"
        )
    if isinstance(attention_mask, CausalRule):
        # The layer's window may live only in its mask (Phi-3.5-MoE passes none to the attention
        # function), as Llama 4's chunks do: SDPA and eager apply the mask, so it is the one to follow.
        if window is not None and attention_mask.window is not None and window != attention_mask.window:
            raise ValueError(
                f"attn_implementation='tileflow_causal': the layer's mask slides a window of {attention_mask.window} "
                f"keys but its attention function is given sliding_window={window}; the two would disagree"
            )
        window = attention_mask.window if attention_mask.window is not None else window
        chunk, key_offset, key_starts = attention_mask.chunk, attention_mask.key_offset, attention_mask.key_starts
        attention_mask = None
    else:
        key_starts = None
    if attention_mask is not None:
        raise ValueError(
            "attn_implementation='tileflow_causal' takes no attention mask: pass packed tokens without "
            "padding, or use attn_implementation='tileflow'"
        )
    if kwargs.get("dropout") and module.training:
        raise ValueError("tileflow attention is for inference: dropout during training is not supported")
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
        # An encoder's or a cross-attention's layer: no mask is built for it, so the mask
        # function never sees it; the causal rule would hide every later key.
        raise ValueError(
            f"attn_implementation='tileflow_causal' is causal, but {type(module).__name__} is not (an encoder's or a "
            "cross-attention layer): use attn_implementation='tileflow'"
        )
    if kwargs.get("position_bias") is not None:
        raise ValueError(
            "attn_implementation='tileflow_causal' takes no mask tensor, but the model adds a position bias to the "
            "scores (T5's relative attention), which it would drop: use attn_implementation='tileflow'"
        )
    _refuse_sparse(CAUSAL_ATTENTION_NAME, kwargs)
    _refuse_attention_weights(CAUSAL_ATTENTION_NAME, kwargs)
    sinks = _head_sinks(CAUSAL_ATTENTION_NAME, query, kwargs)
    query, key, value, scaling, width = _one_head_size(query, key, value, kwargs.get("scaling"))
    mask = None
    if chunk is not None and key_offset:
        # The op numbers positions from the first key, but a sliding cache has dropped the keys
        # before `key_offset`: chunks, unlike windows, sit at absolute positions, so they come
        # as a mask (the causal rule and the window stay the op's).
        keys = torch.arange(key.shape[2], device=query.device) + key_offset
        queries = keys[key.shape[2] - query.shape[2]:, None]
        mask, chunk = (keys[None, :] // chunk == queries // chunk)[None, None], None
    out = meta_attention(query, key, value, mask, causal=True, scale=scaling, softcap=kwargs.get("softcap"),
                         sliding_window=window, sinks=sinks, attention_chunk=chunk, key_starts=key_starts)
    return out[..., :width].transpose(1, 2).contiguous(), None


class CausalRule:
    """What `"tileflow_causal"`'s mask function returns for a causal mask with a sliding window,
    attention chunks or packed sequences: no [S, S] tensor, the rule for the attention function to
    apply, which the layer need not pass it: `window` (a query sees keys at positions > its own -
    window) and `chunk` (Llama 4's chunked attention: positions cut into chunks of `chunk`, a query
    sees only its own chunk's keys), either None when the mask has none. `key_offset`: the
    absolute position of the first key (a sliding cache drops earlier ones), which places the
    chunks. `packed`: the position ids pack several sequences in a row (read eagerly), and
    `key_starts` (int [B, S] or None): each token's first key, its sequence's (or chunk's) first
    token (`packed_key_starts`)."""

    __slots__ = ("window", "chunk", "key_offset", "packed", "key_starts")

    def __init__(self, window: int | None, chunk: int | None = None, key_offset: int = 0, *, packed: bool = False,
                 key_starts: torch.Tensor | None = None) -> None:
        self.window, self.chunk, self.key_offset = window, chunk, key_offset
        self.packed, self.key_starts = packed, key_starts

    def __repr__(self) -> str:
        return (f"CausalRule(window={self.window}, chunk={self.chunk}, key_offset={self.key_offset}, "
                f"packed={self.packed}, key_starts={'None' if self.key_starts is None else 'tensor'})")

    def __getattr__(self, name: str) -> Any:
        # Model code that uses its mask as a tensor outside the attention function (Doge's).
        # Dunder probes (copy, Dynamo) and an unset slot get a plain AttributeError: the message
        # reads no attribute, which would recurse here.
        if name.startswith("__") or name in self.__slots__:
            raise AttributeError(name)
        raise AttributeError(
            "attn_implementation='tileflow_causal' builds no mask tensor (this mask is a causal rule: its window, "
            "chunks or packed sequences' key starts), "
            f"but the model reads the mask's {name!r} outside its attention function, or transformers does: "
            "`generate` with a static cache (a compileable one) builds the masks ahead and hands them back to the "
            "model, so use a DynamicCache, or attn_implementation='tileflow'"
        )


# transformers' mask functions (`transformers.masking_utils`) the causal rule covers: the causal
# rule itself, and the packed-sequence ones (the serving attention keeps each sequence apart).
_PACKED_PART = "packed_sequence_mask_function.<locals>.inner_mask"
_CAUSAL_PARTS = frozenset({
    "causal_mask_function", _PACKED_PART,
    "remap_positions_for_packed_sequence.<locals>.inner_mask", "and_masks.<locals>.and_mask",
})
_WINDOW_PART = "sliding_window_overlay.<locals>.inner_mask"
_CHUNK_PART = "chunked_overlay.<locals>.inner_mask"
_OVERLAY_REFUSAL = (
    "attn_implementation='tileflow_causal' applies the causal rule only, but the model's mask lets a token see the "
    "one after it (an overlay such as bidirectional image or prompt tokens), which it would silently drop: use "
    "attn_implementation='tileflow', which applies the mask"
)


class _Bidirectional:
    """`"tileflow_causal"`'s mask for a plain bidirectional mask (`BIDIRECTIONAL`): no tensor; a
    layer that reads it is refused (the causal rule would hide every later key)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "BIDIRECTIONAL"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            "attn_implementation='tileflow_causal' builds no mask tensor (this is a bidirectional mask's stand-in), "
            f"but the model reads the mask's {name!r} outside its attention function"
        )


BIDIRECTIONAL = _Bidirectional()


def _mask_rule(mask_function: Any, key_offset: int = 0) -> CausalRule | None:
    """The sliding window and attention chunks of a transformers mask function built of the
    causal rule (None: neither; `key_offset` is the first key's position); ValueError for any
    other mask (bidirectional, or/and overlays such as image tokens), which the causal rule would
    silently replace. Sequences packed in a row outside a trace (see `_packs_sequences`) make the
    rule's `packed` True, and their chunks its key starts' (no `chunk`)."""
    windows: list[int] = []
    chunks: list[int] = []
    causal = packed = False
    pending = [mask_function]
    while pending:
        fn = pending.pop()
        name = getattr(fn, "__qualname__", type(fn).__name__)
        known = getattr(fn, "__module__", None) == "transformers.masking_utils"
        cells = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]
        if known and name in (_WINDOW_PART, _CHUNK_PART):
            # The chunks' other cell is the rows' left padding, none here: `_no_mask` refuses a
            # padding mask, and without one transformers counts none.
            (windows if name == _WINDOW_PART else chunks).extend(c for c in cells if isinstance(c, int))
            continue
        if not known or name not in _CAUSAL_PARTS:
            raise ValueError(
                f"attn_implementation='tileflow_causal' applies the causal rule (with a sliding window or attention "
                f"chunks) only, but the model's mask also has {name}, which it would silently drop "
                "(attn_implementation='tileflow' applies it)"
            )
        causal |= name == "causal_mask_function"
        packed |= name == _PACKED_PART and any(_packs_sequences(c) for c in cells)
        for cell in cells:
            pending.extend(f for f in (cell if isinstance(cell, tuple) else (cell,)) if callable(f)
                           and not isinstance(f, torch.Tensor))
    if not causal:
        raise ValueError(f"attn_implementation='tileflow_causal' is causal, but the model's mask "
                         f"({getattr(mask_function, '__qualname__', mask_function)}) is not (attn_implementation='tileflow' "
                         "applies it)")
    if len(set(chunks)) > 1:
        raise ValueError(f"attn_implementation='tileflow_causal': the model's mask has chunks of {sorted(set(chunks))} "
                         "positions at once, which no one chunk size applies")
    window, chunk = min(windows, default=None), (chunks or [None])[0]
    if packed:
        # Each sequence's chunks start at its own positions (transformers numbers them by the
        # position ids): a token at a chunk's start does not see the one before it either, so
        # the key starts the mask function gives (`packed_key_starts`) are the chunks' too.
        chunk = None
    return None if window is None and chunk is None and not packed else CausalRule(window, chunk, key_offset, packed=packed)


def _packs_sequences(sequence_ids: Any) -> bool:
    """Whether transformers' packed-sequence ids (a sequence index per token) hold real, several
    sequences in a row. Traced (export, compile) they are always there, values unknown, and this
    says no: under torch.compile `_no_mask` finds the sequences in the graph instead; a serving
    step (exported without Dynamo) packs sequences by design and keeps them apart in its
    attention stages."""
    if not isinstance(sequence_ids, torch.Tensor):
        return False
    from transformers.utils.import_utils import is_tracing

    return not is_tracing(sequence_ids) and bool((sequence_ids[:, -1] != 0).any())


def _plain_causal(config: Any) -> bool:
    """Whether a transformers config asks only for the causal rule: no sliding window, no
    attention chunks and no layer type but full attention (None: unknown, so not plain)."""
    if config is None:
        return False
    types = getattr(config, "layer_types", None) or ()
    return (getattr(config, "sliding_window", None) is None and getattr(config, "attention_chunk_size", None) is None
            and all(t == "full_attention" for t in types))


def _no_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> CausalRule | None:
    """`"tileflow_causal"`'s mask function: no mask tensor (a sliding window's or chunked
    attention's mask: its rule, `CausalRule`). A padding mask that masks a token is refused (the
    attention would silently attend to the padding); an all-ones one is no mask. So is any mask
    other than the causal rule, a sliding window and chunks (a bidirectional one), which it would drop.
    Sequences packed in a row (restarting position ids, no cache) get their key starts
    (`packed_key_starts`): found eagerly (`_mask_rule`), or in the graph under torch.compile for
    a config with neither window nor chunks (`_traced_rule`: no graph break). A plain
    bidirectional mask (an encoder's, or a cross-attention's, which Bart's decoder builds even
    with no encoder) is `BIDIRECTIONAL`, refused by the attention function of a layer that reads it."""
    from transformers.masking_utils import bidirectional_mask_function

    _refuse_attention_of_its_own(CAUSAL_ATTENTION_NAME, kwargs.get("config"))
    if kwargs.get("mask_function") is bidirectional_mask_function:
        return BIDIRECTIONAL
    kv_length, kv_offset = kwargs.get("kv_length"), kwargs.get("kv_offset", 0)
    q_length, q_offset = kwargs.get("q_length"), kwargs.get("q_offset", 0)
    if None not in (kv_length, q_length) and kv_offset + kv_length != q_offset + q_length:
        # The rule puts the last query at the last key: a cache whose keys run past the
        # queries (a static cache's empty slots at prefill) would be attended to.
        raise ValueError(
            f"attn_implementation='tileflow_causal' needs the keys to end at the last query, but the cache "
            f"holds {kv_offset + kv_length} positions for queries ending at {q_offset + q_length} (a static "
            "cache?): use attn_implementation='tileflow', or a DynamicCache"
        )
    mask_function = kwargs.get("mask_function")
    batch_size, device = kwargs.get("batch_size"), kwargs.get("device")
    if mask_function is None:
        rule = None
    elif torch.compiler.is_dynamo_compiling() and _plain_causal(kwargs.get("config")):
        rule = _traced_rule(mask_function, batch_size, q_length, kv_length, device)
    else:
        # Dynamo cannot trace into a function's closure: under torch.compile the rule is read
        # eagerly, a graph break that a model whose config sets no window or chunk is spared
        # (Dynamo wraps even the plain causal rule in packed-sequence masks; the branch above
        # finds their sequences in the graph). Read eagerly, the packed ids are real.
        rule = torch._dynamo.disable(_mask_rule)(mask_function, kv_offset)
        if rule is not None and rule.packed:
            rule.key_starts = packed_key_starts(mask_function, batch_size, q_length, device)
    if attention_mask is None:
        return rule
    try:
        # Under torch.compile the check is a graph break (the mask's values are only known at run time).
        masks_tokens = not bool(attention_mask.all())
    except Exception as exc:  # export: the values are unknown while tracing
        raise ValueError(
            "attn_implementation='tileflow_causal' takes no attention mask when exported (its values are unknown "
            "there): pass packed tokens without padding and no attention_mask; a model that builds a mask of ones "
            "itself when given none (OPT before transformers 5.24) cannot be exported this way"
        ) from exc
    if masks_tokens:
        raise ValueError(
            "attn_implementation='tileflow_causal' takes no attention mask, and this one masks tokens (padding): "
            "pass packed tokens without padding, or use attn_implementation='tileflow'"
        )
    return rule


def packed_key_starts(mask_function: Any, batch_size: int, q_length: int, device: Any) -> torch.Tensor:
    """For queries that are their rows' keys (no cache), int64 [B, S]: each token's first key, the
    first token of its sequence, sequences packed in a row by restarting position ids. The mask
    function tells, traceably (no host read): a token starts a sequence when it does not see the
    one before it (transformers' packed-sequence mask hides it), and so does a token that starts
    an attention chunk of the mask's (numbered by the position ids), whose keys start there. A
    running max of those starts gives each token its own, O(tokens) work where the packed mask
    is [S, S]."""
    rows, tokens, before = _adjacent_tokens(batch_size, q_length, device)
    # Token 0 is paired with itself, which it sees: its start is 0 either way.
    continues = mask_function(rows, 0, tokens, before).expand(batch_size, q_length)
    return torch.where(continues, 0, tokens).cummax(dim=1).values


def _adjacent_tokens(batch_size: Any, q_length: Any, device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(rows [B, 1], tokens [1, S], before [1, S])`: the indices a mask function is called with to
    compare each token t with its neighbour t - 1; token 0 is paired with itself. Every index
    tensor has the S tokens (none S - 1): Dynamo would guard on whether S - 1 is 1, which fails
    the compile of a 2-token call whose length is marked dynamic (ConstraintViolationError)."""
    tokens = torch.arange(q_length, device=device)[None, :]
    return torch.arange(batch_size, device=device)[:, None], tokens, (tokens - 1).clamp(min=0)


def _traced_rule(mask_function: Any, batch_size: Any, q_length: Any, kv_length: Any, device: Any) -> CausalRule | None:
    """Under torch.compile, a plain causal config's rule, found in the graph: its packed
    sequences' key starts (None: no cache step packs them).

    Dynamo cannot read the mask function's closure (`_mask_rule`), and without a graph break
    transformers cannot look at the position ids either, so it wraps every compiled call's causal
    rule in its packed-sequence masks, values unknown. Calling that function is traceable: a
    restart of the positions (a new sequence) hides the token before it (`packed_key_starts`),
    and none may see the one after it, which an or-overlay shows (bidirectional tokens: a block
    of them holds such a pair): an `_assert_async` in the graph, no host sync, a RuntimeError
    with `_OVERLAY_REFUSAL` on the CPU, a device-side assert on CUDA. An and-overlay that hid a
    token's previous key would read as a sequence start here; transformers builds and-overlays
    only as sliding windows (which a plain config has none of) and packed-sequence masks, and a
    check of it (a token sees the first key exactly when its start is 0) would cost the padding
    walk its proof for steps without position ids. The plain causal rule (a cache: transformers
    packs no sequences then) gets neither, any other mask with a cache no key starts. Under
    `Config.cuda_graphs` the key starts of a replay's real rows are the call's (a running max
    reads only earlier rows), so steps are captured at token buckets (`tileflow.padding_safety`);
    the check stays in the replayed graph over positions from `arange`, and runs on each call's
    rows before the replay over position ids passed in."""
    from transformers.masking_utils import causal_mask_function

    if mask_function is causal_mask_function or batch_size is None or q_length is None:
        return None
    if q_length > 1:  # (a dynamic length is at least 2: no guard)
        rows, _, before = _adjacent_tokens(batch_size, q_length, device)
        # Each token t >= 1 with the one before it (token 0's pair repeats token 1's).
        sees_next = mask_function(rows, 0, before, before + 1)
        torch._assert_async(~sees_next.any(), _OVERLAY_REFUSAL)
    if kv_length is not None and kv_length != q_length:
        return None  # a cache: no sequences packed (and the keys would not be the queries)
    return CausalRule(None, key_starts=packed_key_starts(mask_function, batch_size, q_length, device))


@torch.compiler.assume_constant_result
def _attention_of_its_own(config_class: type) -> bool:
    """Whether the models of a transformers config class compute attention in their own code:
    their attention layers never call transformers' attention functions, so `"tileflow"` would
    not run, while the mask built for it (none, or a boolean one) would be added to the scores by
    code that expects eager's additive mask. transformers' own test
    (`PreTrainedModel._can_set_attn_implementation`), on transformers' own models only: the
    modeling module beside the config's has an `*Attention*(nn.Module)` class and never names
    `ALL_ATTENTION_FUNCTIONS` (older transformers indexed it rather than asking `get_interface`).
    False for other modules, and when the module is not loaded or its source cannot be read."""
    name = config_class.__module__
    if not name.startswith("transformers.models.") or ".configuration_" not in name:
        return False
    module = sys.modules.get(name.replace(".configuration_", ".modeling_"))
    try:
        code = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        return False
    return (re.search(r"^class \w*Attention\w*\(nn\.Module\):", code, re.MULTILINE) is not None
            and "ALL_ATTENTION_FUNCTIONS" not in code)


def _refuse_attention_of_its_own(name: str, config: Any) -> None:
    """ValueError when `config`'s model computes attention itself (`_attention_of_its_own`)."""
    if config is not None and _attention_of_its_own(type(config)):
        raise ValueError(
            f"attn_implementation={name!r}: {type(config).__name__}'s model computes its attention in its own code, "
            "so tileflow's attention function would never run, and the mask built for it would be read by that "
            "code: keep the model's own attention (attn_implementation='eager'); torch.compile(backend='tileflow') "
            "still puts its attention on the meta-kernel where the pass recognises it"
        )


def causal_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """`"tileflow"`'s mask function: transformers' SDPA mask, built whenever the queries and keys
    differ in number. SDPA's mask builder leaves the mask out for a static cache's prefill and
    relies on SDPA's causal rule, which puts the first query at the first key; tileflow's puts
    the last query at the last key (so that a model cutting its queries after the mask was made,
    as Gemma-4's shared-KV layers do, gets flash attention's rule), so that case gets its mask."""
    from transformers.masking_utils import sdpa_mask

    _refuse_attention_of_its_own(ATTENTION_NAME, kwargs.get("config"))
    q_length = kwargs.get("q_length")
    if q_length != 1 and q_length != kwargs.get("kv_length"):  # one query: no causal rule to place
        kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register_transformers() -> None:
    """Register `"tileflow"` and `"tileflow_causal"` with transformers' attention and mask
    registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, tileflow_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, causal_mask)
    AttentionInterface.register(CAUSAL_ATTENTION_NAME, causal_attention_forward)
    AttentionMaskInterface.register(CAUSAL_ATTENTION_NAME, _no_mask)
