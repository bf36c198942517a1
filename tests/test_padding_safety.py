"""Padding safety of `cuda_graphs=True`: a step replayed at a token bucket must give the real rows
exactly, so graphs where padded rows could reach real ones run uncaptured, with the reason.

Graphs are replayed through `ReplayOnCpu` (a CPU stand-in for CUDA graphs that really runs the
padded step), with random values in the padded rows of float inputs (`replay_on_cpu`), so a
wrongly captured graph shows up as wrong outputs here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import tileflow

sys.path.insert(0, str(Path(__file__).parent))
from graph_doubles import ReplayOnCpu, replay_on_cpu_with_noise  # noqa: E402
from models import BLOOM_ALIBI, MOE, VOCAB, build, one_layer  # noqa: E402

H = 16


@pytest.fixture
def replay_on_cpu(monkeypatch: pytest.MonkeyPatch) -> type[ReplayOnCpu]:
    """Replays on the CPU, with random values in the padded rows of float inputs
    (`replay_on_cpu_with_noise`)."""
    return replay_on_cpu_with_noise(monkeypatch)


def _run(fn: Callable[..., torch.Tensor], make_inputs: Callable[[int], tuple], lengths=(3, 5, 11),
         **options: object) -> tileflow.Report:
    """Compile `fn` with `cuda_graphs=True` (and `options`) and check it against eager at each
    token count."""
    report = tileflow.Report()
    config = {"cuda_graphs": True, "max_tokens": 32, **options}
    compiled = torch.compile(fn, backend=tileflow.TileflowBackend(config, report=report))
    for tokens in lengths:
        args = make_inputs(tokens)
        for arg in args:  # only the token dim is dynamic, as in a serving step
            torch._dynamo.mark_dynamic(arg, list(arg.shape).index(tokens))
        with torch.no_grad():
            # fp32 noise of the kernels against eager reaches 1e-4 of an attention output, and
            # 3e-5 absolute where two attentions chain (a padded row reaching a real one shows
            # as whole units).
            torch.testing.assert_close(compiled(*args), fn(*args), rtol=1e-4, atol=1e-4)
    return report


def _cuda_graphs_notes(report: tileflow.Report) -> list[str]:
    return [g.extra.get("cuda_graphs", "") for g in report.graphs]


def _assert_not_captured(report: tileflow.Report, reason: str = "") -> None:
    """The step's one graph runs uncaptured, its note naming `reason`, and nothing was replayed:
    no replay, padded or not, could return its outputs (an in-place write, an output without one
    dim of exactly T rows)."""
    (note,) = _cuda_graphs_notes(report)
    assert note.startswith("not captured: a replay could differ from the step") and reason in note, note
    assert ReplayOnCpu.captures == ReplayOnCpu.replays == 0


def _assert_not_padded(report: tileflow.Report, reason: str = "") -> None:
    """The step's one graph is never replayed padded, its note naming `reason`: it is captured at
    each token count it is called with (all distinct and below `EXACT_GRAPH_TOKENS` in these
    tests), so each call captured its own graph and replayed it once (`_run` checked the
    replayed outputs against eager)."""
    (note,) = _cuda_graphs_notes(report)
    assert note.startswith("exact token counts only") and "could differ from the step" in note and reason in note, note
    assert ReplayOnCpu.captures == ReplayOnCpu.replays > 0


# Weights are globals, not arguments: Dynamo keeps their sizes static, as a model's parameters.
QKV = torch.randn(3 * H, H)
W = torch.randn(H, H)


def _tokens(tokens: int) -> tuple[torch.Tensor]:
    return (torch.randn(1, tokens, H),)


def _tokens_away_from_zero(tokens: int) -> tuple[torch.Tensor]:
    # |x| >= 0.5: reciprocal keys stay within 2 in real rows (a token near zero makes a large key
    # and the fp32 softmax ill-conditioned: kernel and eager differed by 7e-5 in a CI
    # simulation), while the padded rows, zeros, still make inf keys.
    x = torch.randn(1, tokens, H)
    return (x + 0.5 * x.sign(),)


def _rows(tokens: int) -> tuple[torch.Tensor]:
    return (torch.randn(tokens, H),)


def _heads(x: torch.Tensor) -> list[torch.Tensor]:
    """q, k, v [1, 2, T, H/2] projected from the same tokens (one token symbol)."""
    return [t.view(1, -1, 2, H // 2).transpose(1, 2) for t in (x @ QKV.t()).split(H, dim=-1)]


def _bidirectional(x: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(*_heads(x))


def _causal(x: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(*_heads(x), is_causal=True)


def _causal_mask_from_positions(x: torch.Tensor) -> torch.Tensor:
    # transformers' way: key position <= query position, as a 0/-inf bias.
    pos = torch.arange(x.shape[1])
    allowed = pos[None, :] <= pos[:, None]
    bias = torch.where(allowed, torch.tensor(0.0), torch.tensor(float("-inf")))
    return F.scaled_dot_product_attention(*_heads(x), attn_mask=bias)


def _causal_bool_mask_expanded(x: torch.Tensor) -> torch.Tensor:
    # A [1, 1, T, T] bool mask expanded (here over the heads), which the attention pass converts
    # to float32 before expanding it again.
    pos = torch.arange(x.shape[1])
    allowed = (pos[None, :] <= pos[:, None])[None, None].expand(1, 2, -1, -1)
    return F.scaled_dot_product_attention(*_heads(x), attn_mask=allowed)


def _anti_causal_mask(x: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(x.shape[1])
    return F.scaled_dot_product_attention(*_heads(x), attn_mask=pos[None, :] >= pos[:, None])


def _causal_mask_per_head_group(x: torch.Tensor) -> torch.Tensor:
    # A mask per KV-head group repeated for its query heads, [1, G, R, T, T] -> [1, G*R, T, T]:
    # the view merges dims before the token dims only.
    pos = torch.arange(x.shape[1])
    allowed = (pos[None, :] <= pos[:, None])[None, None, None].expand(1, 1, 2, -1, -1)
    return F.scaled_dot_product_attention(*_heads(x), attn_mask=allowed.reshape(1, 2, x.shape[1], x.shape[1]))


def _causal_mask_viewed_across_tokens(x: torch.Tensor) -> torch.Tensor:
    # [1, T, 2, T] read as [1, 2, T, T]: the view moves elements between query rows.
    pos = torch.arange(x.shape[1])
    allowed = (pos[None, :] <= pos[:, None])[None, :, None].expand(1, -1, 2, -1).contiguous()
    return F.scaled_dot_product_attention(*_heads(x), attn_mask=allowed.view(1, 2, x.shape[1], x.shape[1]))


def _centered(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(0)) @ W


def _last_row_added(x: torch.Tensor) -> torch.Tensor:
    return (x + x[-1]) @ W


def _scaled_by_token_count(x: torch.Tensor) -> torch.Tensor:
    return (x * x.shape[0]) @ W


def _row_after_tokens(x: torch.Tensor) -> torch.Tensor:
    y = torch.cat([x, W[:1]], dim=0)  # a row after the tokens: padding would come before it
    return (y[1:] @ W).relu()


def _token_mixing_matmul(x: torch.Tensor) -> torch.Tensor:
    return (x.t() @ x) @ W


def _shifted_rows(x: torch.Tensor) -> torch.Tensor:
    # A row before the tokens, then the first T rows: the diff transformers takes of positions.
    y = torch.cat([x[:1] - 1.0, x], dim=0)
    return (y[1:] - y[:-1]) @ W + x.cumsum(0)


@pytest.mark.parametrize("fn, reason", [
    (_bidirectional, "attention over the token dim that is not provably causal"),
    (_anti_causal_mask, "a mask that does not hide the padded keys"),
    (_causal_mask_viewed_across_tokens, "a view that merges or splits a token dim"),
])
def test_bidirectional_attention_is_never_replayed_padded(replay_on_cpu, fn, reason: str) -> None:
    """Real queries would see the padded keys: the step runs uncaptured and equals eager."""
    _assert_not_padded(_run(fn, _tokens), reason)


@pytest.mark.parametrize("fn", [_causal, _causal_mask_from_positions, _causal_mask_per_head_group,
                                _causal_bool_mask_expanded])
def test_causal_attention_is_captured(replay_on_cpu, fn) -> None:
    report = _run(fn, _tokens)
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 1


def _scaled_by_the_last_position(x: torch.Tensor) -> torch.Tensor:
    # The last position (T - 1, a replay's B - 1) read from the end of an arange.
    return (x * torch.arange(x.shape[0])[-1]) @ W


@pytest.mark.parametrize("fn, reason", [
    (_centered, "reads across the token dim"),
    (_last_row_added, "may be a padded row"),
    (_scaled_by_token_count, "token count as a value"),
    (_row_after_tokens, "padding would sit between real rows"),
    (_scaled_by_the_last_position, "may be a padded row"),
])
def test_reads_across_tokens_are_never_replayed_padded(replay_on_cpu, fn, reason: str) -> None:
    _assert_not_padded(_run(fn, _rows), reason)


def test_an_inductor_residual_is_replayed_at_buckets(replay_on_cpu) -> None:
    """The CUDA default, Inductor for the residual graph, under `cuda_graphs`: the replayed step
    calls the compiled graph with the inputs as arguments (Inductor's own takes one list)."""
    report = _run(lambda x: (x @ W).sin(), _rows, residual="inductor")
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert report.graphs[0].residual == "inductor" and replay_on_cpu.captures == 1


def test_an_output_without_the_token_dim_is_not_captured(replay_on_cpu) -> None:
    """[H, H] from a product over the tokens: no replay returns an output without them."""
    _assert_not_captured(_run(_token_mixing_matmul, _rows), "matmul that sums over the token dim")


def test_shifted_rows_and_scans_are_captured(replay_on_cpu) -> None:
    """A prefix row before the tokens, slices that stay inside the real rows, and a scan along
    the tokens read no padding."""
    report = _run(_shifted_rows, _rows)
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 1


def _running_extremes(x: torch.Tensor) -> torch.Tensor:
    # Running max and min along the tokens, values and indices (tileflow_causal's packed key starts).
    top, where_top = x.cummax(0)
    low, where_low = x.cummin(0)
    return (top - low) @ W + (where_top - where_low).float()


def _running_max_across_sequences(x: torch.Tensor) -> torch.Tensor:
    return (x.reshape(-1, H).cummax(0).values @ W).view(2, -1, H)


def test_running_extremes_are_scans(replay_on_cpu) -> None:
    """`cummax`/`cummin` along the tokens read only earlier rows, both of their outputs: captured
    at buckets (they were not known to keep padded rows apart); across sequences flattened into
    one dim they read the first one's padding."""
    report = _run(_running_extremes, _rows)
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 1
    torch._dynamo.reset()
    ReplayOnCpu.captures = ReplayOnCpu.replays = 0
    _assert_not_padded(_run(_running_max_across_sequences, _batch), "reads across the token dim")


def _rows_clamped(low: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Each token's previous row, clamped from below at row `low`, gated by a comparison of the
    clamped indices with themselves plus one (True everywhere)."""
    def step(x: torch.Tensor) -> torch.Tensor:
        before = (torch.arange(x.shape[0]) - 1).clamp(min=low)
        return (x[before] + x) @ W * (before + 1 > before).all()

    return step


def test_a_clamped_previous_row_is_replayed_padded(replay_on_cpu) -> None:
    """`x[(arange(T) - 1).clamp(min=0)]` (each token's previous row, token 0 its own; how
    tileflow_causal pairs adjacent tokens without a tensor of T - 1 elements) reads only real
    rows, and a clamped index compared with itself plus one is known: captured at buckets. A
    clamp to row 1 is safe too (a dynamic graph runs at least 2 tokens); one to row 2 reads a
    padded row when 2 tokens run in a bucket."""
    report = _run(_rows_clamped(0), _rows)
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 1
    for low, captured in ((1, True), (2, False)):
        torch._dynamo.reset()
        ReplayOnCpu.captures = ReplayOnCpu.replays = 0
        report = _run(_rows_clamped(low), _rows)
        if captured:
            assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
        else:
            _assert_not_padded(report, "may point at padded rows")


def _rows_before_the_clamped_previous_row(x: torch.Tensor) -> torch.Tensor:
    """Each token's previous row clamped at 0, minus one: token 0 reads row -1, the last row,
    which is a padded row in a replay."""
    before = (torch.arange(x.shape[0]) - 1).clamp(min=0) - 1
    return (x[before] + x) @ W


def test_a_clamped_previous_row_shifted_below_row_0_is_not_replayed_padded(replay_on_cpu) -> None:
    """A clamped index minus a number may be negative (here -1 at tokens 0 and 1): it wraps to the
    end of the token dim, a padded row in a replay, so the step is not replayed padded."""
    _assert_not_padded(_run(_rows_before_the_clamped_previous_row, _rows), "may point at padded rows")


def test_a_clamped_index_shifted_past_the_known_bound_is_not_known(replay_on_cpu) -> None:
    """Numbers added to a clamped index add up: past `_KNOWN_BOUND` its values may wrap inside a
    bucket (int32 after 2048 shifts of 2**20), so a comparison of it is left unknown, as a
    position's is (each shift alone was within the bound, and the sum was not checked)."""
    def gated(x: torch.Tensor) -> torch.Tensor:
        far = (torch.arange(x.shape[0], dtype=torch.int32) - 1).clamp(min=0) + 2**20 + 2**20
        return (x @ W) * (far + 1 > far).all()

    _assert_not_padded(_run(gated, _rows), "all is not known")


# (GPT-2's one sequence in the extended run: GPT-2 at three sequences, Mistral at one.)
@pytest.mark.parametrize("arch, batch", [("mistral", 1), pytest.param("gpt2", 1, marks=pytest.mark.extended),
                                         ("llama", 2), ("gpt2", 3), pytest.param("qwen2", 1, marks=pytest.mark.extended)])
def test_causal_models_are_captured(replay_on_cpu, arch: str, batch: int) -> None:
    """transformers' causal models (their masks built from positions) are captured and equal
    eager at lengths inside and across the buckets, one sequence or several (their rows
    flattened to [batch * T, H] for the GEMMs, each sequence padded at its end)."""
    torch.manual_seed(0)
    model = one_layer(build(arch))

    def make(tokens: int) -> tuple[torch.Tensor]:
        return (torch.randint(0, VOCAB, (batch, tokens)),)

    def logits(ids: torch.Tensor) -> torch.Tensor:
        return model(ids, use_cache=False).logits

    report = _run(logits, make, lengths=(5, 12, 20))
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 2


MOE_ARCHS = ["mixtral", "gpt_oss", "deepseek_v3", "qwen2_moe", "qwen3_moe", "phimoe", "llama4"]


# Every architecture with several sequences (rows padded between them) in the default run, but
# Qwen3-MoE (Qwen2-MoE's routing) and PhiMoE; those, three sequences and the single sequences in
# the extended run (one sequence's rows routed by expert: `test_expert_routing_is_captured`).
@pytest.mark.parametrize("arch, batch", [*((arch, 2) for arch in MOE_ARCHS if arch not in ("qwen3_moe", "phimoe")),
                                         *(pytest.param(arch, 2, marks=pytest.mark.extended) for arch in ("qwen3_moe", "phimoe")),
                                         pytest.param("mixtral", 3, marks=pytest.mark.extended),
                                         *(pytest.param(arch, 1, marks=pytest.mark.extended) for arch in MOE_ARCHS),
                                         pytest.param("llama4", 3, marks=pytest.mark.extended)])
def test_mixture_of_experts_models_are_captured(replay_on_cpu, arch: str, batch: int) -> None:
    """Mixtral, gpt-oss (expert biases gathered by id), DeepSeek-V3 (group-limited routing by
    scatter and gather), Qwen2-MoE, Qwen3-MoE and PhiMoE sort their rows by expert and back, and
    Llama-4 runs every token through every expert: captured, and equal to eager although the
    padded rows (zeros) join the experts' groups and shift every group's offsets. Batches above
    one flatten their sequences first ([b, T, H] -> [b*T, H], each padded at its end; the top-k
    ids [b*T, k] -> [b*T*k]), so the padded rows sort in among the real ones of every block."""
    from models import ZOO

    torch.manual_seed(0)
    model = (build(arch) if arch == "mixtral" else (MOE.get(arch) or ZOO[arch][0])()).eval()
    if arch in ("mixtral", "qwen2_moe", "qwen3_moe", "phimoe"):  # (each layer alike, experts in each)
        model = one_layer(model)

    def logits(ids: torch.Tensor) -> torch.Tensor:
        return model(ids, use_cache=False).logits

    # Lengths unlike the batch, so `_run` marks the token dim dynamic, not the batch's.
    report = _run(logits, lambda t: (torch.randint(0, VOCAB, (batch, t)),), lengths=(5, 12, 20))
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 2


# Mixture-of-experts routing written out as transformers' grouped-GEMM experts do it.
EXPERTS = 4
ROUTER = torch.randn(EXPERTS, H)
EXPERT_W = torch.randn(EXPERTS, H, H)
# Padded rows (zeros) go to experts 0 and 1, so they change those groups' counts and offsets.
ROUTER_BIAS = torch.tensor([3.0, 2.0, 0.0, 0.0])


def _route(x: torch.Tensor, top: int) -> tuple[torch.Tensor, ...]:
    """Rows sorted by expert id: (the weights per row, the sorted ids, the permutation, the rows)."""
    weights, ids = torch.topk((x @ ROUTER.T + ROUTER_BIAS).softmax(-1), top)
    keys, order = torch.sort(ids.reshape(-1))
    rows = x[order // top] if top > 1 else x[order]
    return weights.reshape(-1)[order], keys, order, rows


def _offsets(keys: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(torch.histc(keys.float(), EXPERTS, 0, EXPERTS - 1), 0, dtype=torch.int32)


def _unsort(y: torch.Tensor, order: torch.Tensor, top: int) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return y[inverse].view(-1, top, H).sum(1)


def _moe(x: torch.Tensor, top: int = 2) -> torch.Tensor:
    weights, keys, order, rows = _route(x, top)
    y = tileflow.ops.grouped_gemm(rows, EXPERT_W, _offsets(keys)) * weights[:, None]
    return _unsort(y, order, top)


def _moe_with_a_dense_projection(x: torch.Tensor, top: int) -> torch.Tensor:
    # A plain GEMM (a padded_gemm once compiled) on the rows in expert order: row-wise too.
    weights, keys, order, rows = _route(x, top)
    y = torch.relu(tileflow.ops.grouped_gemm(rows, EXPERT_W, _offsets(keys))) @ W * weights[:, None]
    return _unsort(y, order, top)


def _every_expert_sees_every_token(x: torch.Tensor) -> torch.Tensor:
    # Llama-4's experts: E copies of the rows (E blocks of T, each padded at its end), one bmm.
    return torch.bmm(x.repeat(EXPERTS, 1).view(EXPERTS, -1, H), EXPERT_W).sum(0)


def _running_sum_over_repeated_rows(x: torch.Tensor) -> torch.Tensor:
    # Into the second copy, the first copy's padded rows (+ 1: zeros would add nothing).
    return (x + 1).repeat(2, 1).cumsum(0).view(2, -1, H)[1]


def _batched_gemm_over_token_weights(x: torch.Tensor) -> torch.Tensor:
    # Each expert's "weights" are the tokens themselves: row t of the output reads every row.
    return tileflow.ops.grouped_gemm(x.repeat(EXPERTS, 1).view(EXPERTS, -1, H), x.expand(EXPERTS, -1, -1)).sum(-1)


def test_repeated_rows_are_blocks(replay_on_cpu) -> None:
    # The bmm becomes a batched grouped GEMM (no offsets): row-wise in each block.
    report = _run(_every_expert_sees_every_token, _rows, lengths=(3, 7, 12, 20))
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert report.rewrites["grouped_gemm"] == 1
    torch._dynamo.reset()
    replay_on_cpu.captures = replay_on_cpu.replays = 0
    _assert_not_padded(_run(_batched_gemm_over_token_weights, _rows), "a batched GEMM whose weights carry the token dim")
    torch._dynamo.reset()
    report = _run(_running_sum_over_repeated_rows, _rows, lengths=(3, 7, 12))
    (note,) = _cuda_graphs_notes(report)
    assert "could differ from the step" in note and "reads across the token dim" in note, note


def _moe_put_back_by_argsort(x: torch.Tensor, top: int) -> torch.Tensor:
    # The permutation's inverse as its argsort, instead of `inverse[order] = arange`.
    weights, keys, order, rows = _route(x, top)
    y = tileflow.ops.grouped_gemm(rows, EXPERT_W, _offsets(keys)) * weights[:, None]
    return y[torch.argsort(order)].view(-1, top, H).sum(1)


def _moe_with_the_last_expert_picks_sent_to_expert_0(x: torch.Tensor, top: int) -> torch.Tensor:
    # Zaya's "no expert" picks: the last expert's ids set to 0 (still ids in [0, E)), weight 0.
    weights, ids = torch.topk((x @ ROUTER.T + ROUTER_BIAS).softmax(-1), top)
    none = ids == EXPERTS - 1
    keys, order = torch.sort(ids.masked_fill(none, 0).reshape(-1))
    rows = x[order // top] if top > 1 else x[order]
    y = tileflow.ops.grouped_gemm(rows, EXPERT_W, _offsets(keys)) * weights.masked_fill(none, 0.0).reshape(-1)[order, None]
    return _unsort(y, order, top)


@pytest.mark.parametrize("top", [1, 2, 3])
@pytest.mark.parametrize("moe", [_moe, _moe_with_a_dense_projection, _moe_put_back_by_argsort,
                                 _moe_with_the_last_expert_picks_sent_to_expert_0])
def test_expert_routing_is_captured(replay_on_cpu, moe, top: int) -> None:
    report = _run(lambda x: moe(x, top), _rows, lengths=(3, 7, 12, 20))
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 2


def _sequences(tokens: int) -> tuple[torch.Tensor]:
    return (torch.randn(3, tokens, H),)


def _over_a_batch(moe: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, top: int) -> torch.Tensor:
    # Three sequences' rows flattened: each block's padded rows go to experts 0 and 1.
    return moe(x.reshape(-1, H), top).view(3, -1, H)


def _moe_over_a_batch_regrouped(x: torch.Tensor) -> torch.Tensor:
    # Rows put back in order, then read as [T, 3, H]: row t holds rows 3t..3t+2 of the flattened
    # batch, which cross into the next sequence at a different place once padded.
    return (_moe(x.reshape(-1, H), 2).view(-1, 3, H) @ W).sum(1)


def _moe_ids_of_a_batch_regrouped(x: torch.Tensor) -> torch.Tensor:
    # The top-k ids [3T, 2] read as [T, 6]: token t of the first sequence takes the ids of
    # flattened token 3t, another sequence's past the first third, and which one moves with the
    # padding.
    weights, ids = torch.topk((x.reshape(-1, H) @ ROUTER.T + ROUTER_BIAS).softmax(-1), 2)
    keys, order = torch.sort(ids.view(-1, 6)[:, :2].reshape(-1))
    y = tileflow.ops.grouped_gemm(x[0][order // 2], EXPERT_W, _offsets(keys))
    return _unsort(y, order, 2)


def _moe_permutation_of_a_batch_as_values(x: torch.Tensor) -> torch.Tensor:
    # P[j] is the flattened row b*T*k + t*k + s: a replay's is b*B*k + t*k + s.
    weights, keys, order, rows = _route(x.reshape(-1, H), 2)
    y = tileflow.ops.grouped_gemm(rows, EXPERT_W, _offsets(keys)) * order[:, None].float()
    return _unsort(y, order, 2).view(3, -1, H)


def _moe_tokens_of_a_batch_as_values(x: torch.Tensor) -> torch.Tensor:
    # P // k is the flattened token b*T + t.
    weights, keys, order, rows = _route(x.reshape(-1, H), 2)
    y = tileflow.ops.grouped_gemm(rows, EXPERT_W, _offsets(keys)) * (order // 2)[:, None].float()
    return _unsort(y, order, 2).view(3, -1, H)


def _moe_rows_of_a_batch_at_every_other_token(x: torch.Tensor) -> torch.Tensor:
    # P // 4 of two choices per token is (b*T + t) // 2, not a token: which rows it names moves
    # with the padding of the blocks before.
    weights, keys, order, rows = _route(x.reshape(-1, H), 2)
    y = tileflow.ops.grouped_gemm(x.reshape(-1, H)[order // 4], EXPERT_W, _offsets(keys))
    return _unsort(y, order, 2).view(3, -1, H)


def _moe_table_rows_at_a_batch_permutation(x: torch.Tensor) -> torch.Tensor:
    weights, keys, order, rows = _route(x.reshape(-1, H), 2)
    y = tileflow.ops.grouped_gemm(rows + BATCH_TABLE[order], EXPERT_W, _offsets(keys))
    return _unsort(y, order, 2).view(3, -1, H)


def _moe_batch_permutation_put_back(x: torch.Tensor) -> torch.Tensor:
    # P put back by its inverse is 0, 1, .. over the flattened batch: its values still number rows.
    weights, keys, order, rows = _route(x.reshape(-1, H), 1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return (x.reshape(-1, H) * order[inverse][:, None].float()).view(3, -1, H)


def _moe_batch_permutation_in_bfloat16(x: torch.Tensor) -> torch.Tensor:
    # A cast that does not keep every index loses the permutation's route, not its values.
    weights, keys, order, rows = _route(x.reshape(-1, H), 1)
    y = tileflow.ops.grouped_gemm(rows, EXPERT_W, _offsets(keys)) * order.bfloat16().float()[:, None]
    return _unsort(y, order, 1).view(3, -1, H)


def _moe_batch_inverse_from_repeated_positions(x: torch.Tensor) -> torch.Tensor:
    # 0..T-1 three times (an arange expanded) is no inverse: inv[P[j]] = j mod T, then mod B.
    weights, keys, order, rows = _route(x.reshape(-1, H), 1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(x.shape[1])[None].expand(3, -1).reshape(-1)
    y = tileflow.ops.grouped_gemm(rows, EXPERT_W, _offsets(keys)) * weights[:, None]
    return y[inverse].view(3, -1, H)


BATCH_TABLE = torch.randn(256, H)


def _moe_sorted_batch_permutation_as_values(x: torch.Tensor) -> torch.Tensor:
    # argsort(P) puts rows back, but the sorted P (0, 1, ..) numbers the batch's padded layout.
    flat = x.reshape(-1, H)
    weights, keys, order, rows = _route(flat, 2)
    y = tileflow.ops.grouped_gemm(rows, EXPERT_W, _offsets(keys)) * weights[:, None]
    numbers, inverse = torch.sort(order)
    return (y[inverse] * numbers[:, None].float()).view(-1, 2, H).sum(1).view(3, -1, H)


@pytest.mark.parametrize("top", [1, 2, 3])
@pytest.mark.parametrize("moe", [_moe, _moe_put_back_by_argsort])
def test_expert_routing_over_a_batch_is_captured(replay_on_cpu, moe, top: int) -> None:
    report = _run(lambda x: _over_a_batch(moe, x, top), _sequences, lengths=(4, 7, 12, 20))
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 2


@pytest.mark.parametrize("fn, reason", [
    (_moe_over_a_batch_regrouped, "moves elements between token rows"),
    (_moe_ids_of_a_batch_regrouped, "moves elements between token rows"),
    (_moe_permutation_of_a_batch_as_values, "a permutation of a batch's rows as values"),
    (_moe_tokens_of_a_batch_as_values, "a permutation of a batch's rows as values"),
    (_moe_rows_of_a_batch_at_every_other_token, "a permutation of a batch's rows as values"),
    (_moe_table_rows_at_a_batch_permutation, "a permutation of a batch's rows as values"),
    (_moe_batch_permutation_put_back, "a permutation of a batch's rows as values"),
    (_moe_batch_permutation_in_bfloat16, "a permutation of a batch's rows as values"),
    (_moe_batch_inverse_from_repeated_positions, "a permutation of a batch's rows as values"),
    (_moe_sorted_batch_permutation_as_values, "sorted values of a permutation of a batch's rows"),
])
def test_expert_routing_over_a_batch_that_mixes_sequences_is_not_captured(replay_on_cpu, fn, reason: str) -> None:
    report = _run(fn, _sequences, lengths=(4, 7, 12))
    _assert_not_padded(report, reason)


def _moe_counts_as_values(x: torch.Tensor) -> torch.Tensor:
    # How many rows expert 0 got: the padded rows' count too.
    weights, keys, order, rows = _route(x, 2)
    return _moe(x) * torch.histc(keys.float(), EXPERTS, 0, EXPERTS - 1)[0]


def _moe_offsets_of_other_ids(x: torch.Tensor) -> torch.Tensor:
    # Offsets counting another router's ids: groups do not follow the rows' own ids.
    weights, keys, order, rows = _route(x, 2)
    other = torch.sort(torch.topk(x @ ROUTER.T - ROUTER_BIAS, 2)[1].reshape(-1))[0]
    y = tileflow.ops.grouped_gemm(rows, EXPERT_W, _offsets(other)) * weights[:, None]
    return _unsort(y, order, 2)


def _moe_weights_in_token_order(x: torch.Tensor) -> torch.Tensor:
    # Rows in expert order times weights still in token order: rows of different tokens meet.
    weights, keys, order, rows = _route(x, 2)
    weights_by_token = torch.topk((x @ ROUTER.T + ROUTER_BIAS).softmax(-1), 2)[0].reshape(-1)
    y = tileflow.ops.grouped_gemm(rows, EXPERT_W, _offsets(keys)) * weights_by_token[:, None]
    return _unsort(y, order, 2)


def _moe_not_put_back(x: torch.Tensor) -> torch.Tensor:
    # Indexed by the permutation again instead of its inverse.
    weights, keys, order, rows = _route(x, 2)
    y = tileflow.ops.grouped_gemm(rows, EXPERT_W, _offsets(keys)) * weights[:, None]
    return y[order].view(-1, 2, H).sum(1)


def _moe_running_sum_over_expert_rows(x: torch.Tensor) -> torch.Tensor:
    weights, keys, order, rows = _route(x, 1)
    y = (tileflow.ops.grouped_gemm(rows, EXPERT_W, _offsets(keys)) + 1).cumsum(0)  # + 1: padded rows count
    return _unsort(y, order, 1)


def _moe_inverse_as_values(x: torch.Tensor) -> torch.Tensor:
    # Where each row went in the sort: padded rows sorted among real ones move it.
    weights, keys, order, rows = _route(x, 1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return x * inverse[:, None].float()


def _moe_put_back_by_a_descending_argsort(x: torch.Tensor) -> torch.Tensor:
    # The permutation's argsort descending: not its inverse, rows of other tokens come back.
    weights, keys, order, rows = _route(x, 2)
    y = tileflow.ops.grouped_gemm(rows, EXPERT_W, _offsets(keys)) * weights[:, None]
    return y[torch.argsort(order, descending=True)].view(-1, 2, H).sum(1)


def _moe_inverse_of_token_major_rows(x: torch.Tensor) -> torch.Tensor:
    # The inverse puts back rows in expert order only: rows in token-major order read through it
    # land where the padded rows' ids sorted.
    weights, keys, order, rows = _route(x, 2)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    y = tileflow.ops.grouped_gemm(rows, EXPERT_W, _offsets(keys)) * weights[:, None]
    major = x[:, None].expand(-1, 2, H).reshape(-1, H)
    return (y[inverse] + major[inverse]).view(-1, 2, H).sum(1)


def _moe_permutation_of_two_sequences_as_values(x: torch.Tensor) -> torch.Tensor:
    # Two sequences of two choices per token: P[j] is b*2T + 2t + s, a replay's b*2B + 2t + s.
    weights, keys, order, rows = _route(x.reshape(-1, H), 2)
    y = tileflow.ops.grouped_gemm(rows, EXPERT_W, _offsets(keys)) * order[:, None].float()
    return _unsort(y, order, 2).view(2, -1, H)


def test_a_permutation_of_two_sequences_as_values_is_not_captured(replay_on_cpu) -> None:
    """A batch of two sequences (as many blocks as rows per token over one sequence) numbers its
    rows per padded block too: its permutation's values differ in a replay."""
    report = _run(_moe_permutation_of_two_sequences_as_values, lambda tokens: (torch.randn(2, tokens, H),),
                  lengths=(4, 7, 12))
    _assert_not_padded(report, "a permutation of a batch's rows as values")


def _moe_returns_its_counts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # (A replay would also refuse an output without a token dim when capturing.)
    weights, keys, order, rows = _route(x, 2)
    return _moe(x), torch.histc(keys.float(), EXPERTS, 0, EXPERTS - 1)


def _moe_returns_rows_in_expert_order(x: torch.Tensor) -> torch.Tensor:
    # T rows, as many as the tokens, but sorted by expert: a replay would cut the wrong ones.
    weights, keys, order, rows = _route(x, 1)
    return tileflow.ops.grouped_gemm(rows, EXPERT_W, _offsets(keys))


def _moe_rows_regrouped_as_blocks(x: torch.Tensor) -> torch.Tensor:
    # [2T] rows in expert order read as two blocks of T tokens: the halves are no sequences.
    weights, keys, order, rows = _route(x, 2)
    y = tileflow.ops.grouped_gemm(rows, EXPERT_W, _offsets(keys))
    return y.view(2, -1, H)[0]


def _moe_split_rows_regrouped_as_blocks(x: torch.Tensor) -> torch.Tensor:
    # The same through a split of the features: its pieces keep the expert order.
    weights, keys, order, rows = _route(x, 2)
    first, _ = tileflow.ops.grouped_gemm(rows, EXPERT_W, _offsets(keys)).split(H // 2, dim=1)
    return first.reshape(2, -1, H // 2)[0]


def _moe_counts_floor_divided(x: torch.Tensor) -> torch.Tensor:
    # A division of the counts (no token dim) must not pass for a constant or for `P // k`.
    weights, keys, order, rows = _route(x, 2)
    return _moe(x) * (torch.histc(keys.float(), EXPERTS, 0, EXPERTS - 1) // 1)[0]


def _moe_sorted_counts(x: torch.Tensor) -> torch.Tensor:
    # A sort of the counts must not pass for a reduction over features.
    weights, keys, order, rows = _route(x, 2)
    return _moe(x) * torch.sort(torch.histc(keys.float(), EXPERTS, 0, EXPERTS - 1))[0][-1]


def _moe_table_rows_at_the_inverse(x: torch.Tensor) -> torch.Tensor:
    # Rows of a table picked by where each token sorted: padded rows sorted among real ones move it.
    weights, keys, order, rows = _route(x, 1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return x + TABLE[inverse]


def _moe_inverse_gathered_again(x: torch.Tensor) -> torch.Tensor:
    # inverse[P] is 0, 1, ... in sorted order: put back, it is the inverse again.
    weights, keys, order, rows = _route(x, 1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return x * inverse[order][inverse][:, None].float()


def _moe_sorted_descending(x: torch.Tensor) -> torch.Tensor:
    # Offsets end ascending groups: with the ids sorted descending, padded rows counted in expert
    # 0's group shift which real rows the other experts get.
    weights, ids = torch.topk((x @ ROUTER.T + ROUTER_BIAS).softmax(-1), 2)
    keys, order = torch.sort(ids.reshape(-1), descending=True)
    y = tileflow.ops.grouped_gemm(x[order // 2], EXPERT_W, _offsets(keys)) * weights.reshape(-1)[order][:, None]
    return _unsort(y, order, 2)


def _moe_counts_of_repeated_ids(x: torch.Tensor) -> torch.Tensor:
    # Each sorted id counted twice: the offsets end no group at its own ids.
    weights, keys, order, rows = _route(x, 1)
    y = torch.ops.tileflow.grouped_gemm(rows, EXPERT_W, _offsets(keys[None].expand(2, -1)))
    return _unsort(y * weights[:, None], order, 1)


def _moe_inverse_of_a_broadcast_permutation(x: torch.Tensor) -> torch.Tensor:
    # P broadcast to [T, T] writes inv[P[j], c] = c, no inverse: y[inv][:, 0] is sorted row 0
    # (a padded row: sorted by |x[:, 0]|, the zeros come first) for every token.
    n = x.shape[0]
    order = torch.sort(x[:, 0].abs())[1]
    inverse = torch.empty((n, n), dtype=torch.long)
    inverse[order[None].expand(n, n)] = torch.arange(n)
    return (x[order] * 2)[inverse][:, 0]


def _moe_grouped_mm_over_features(x: torch.Tensor) -> torch.Tensor:
    # A 2-D weight: the offsets split each row's 4 * H features into groups, which the padded
    # rows' counts move.
    weights, keys, order, rows = _route(x, 1)
    grouped = torch._grouped_mm(torch.cat([rows] * 4, dim=1).bfloat16(), FEATURE_GROUPS_W, offs=_offsets(keys))
    return _unsort(grouped.float().sum(0), order, 1)


def _moe_inverse_from_repeated_positions(x: torch.Tensor) -> torch.Tensor:
    # 0..T-1 twice (an arange expanded to [2, T], flattened) is no inverse of the 2T rows' P.
    weights, keys, order, rows = _route(x, 2)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(x.shape[0])[None].expand(2, -1).reshape(-1)
    y = tileflow.ops.grouped_gemm(rows, EXPERT_W, _offsets(keys)) * weights[:, None]
    return y[inverse].view(-1, 2, H).sum(1)


def _moe_permutation_as_values(x: torch.Tensor) -> torch.Tensor:
    # Over one sequence P[j] = t*k + s in either run: its values are clean.
    weights, keys, order, rows = _route(x, 2)
    y = tileflow.ops.grouped_gemm(rows, EXPERT_W, _offsets(keys)) * order[:, None].float()
    return _unsort(y, order, 2)


def test_a_permutation_of_one_sequence_as_values_is_captured(replay_on_cpu) -> None:
    report = _run(_moe_permutation_as_values, _rows, lengths=(3, 7, 12))
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]


TABLE = torch.randn(64, H)
FEATURE_GROUPS_W = torch.randn(4 * H, H).bfloat16()


@pytest.mark.parametrize("fn, reason", [
    (_moe_counts_as_values, "per-expert counts"),
    (_moe_offsets_of_other_ids, "not the ones sorted by the expert ids its offsets count"),
    (_moe_weights_in_token_order, "different orders"),
    (_moe_not_put_back, "indexes a token dim"),
    (_moe_running_sum_over_expert_rows, "reads along rows routed out of token order"),
    (_moe_inverse_as_values, "inverse permutation"),
    (_moe_put_back_by_a_descending_argsort, "reads across the token dim"),
    (_moe_returns_rows_in_expert_order, "an output whose rows are out of token order"),
    (_moe_rows_regrouped_as_blocks, "regroups rows routed out of token order"),
    (_moe_split_rows_regrouped_as_blocks, "regroups rows routed out of token order"),
    (_moe_counts_floor_divided, "per-expert counts"),
    (_moe_sorted_counts, "per-expert counts"),
    (_moe_table_rows_at_the_inverse, "inverse permutation"),
    (_moe_inverse_gathered_again, "inverse permutation"),
    (_moe_sorted_descending, "not of sorted expert ids"),
    (_moe_counts_of_repeated_ids, "not of sorted expert ids"),
    (_moe_inverse_of_a_broadcast_permutation, "index_put is not known"),
    (_moe_grouped_mm_over_features, "offsets split features, not rows"),
    (_moe_inverse_from_repeated_positions, "index_put is not known"),
    (_moe_inverse_of_token_major_rows, "inverse permutation"),
])
def test_expert_routing_that_mixes_rows_is_never_replayed_padded(replay_on_cpu, fn, reason: str) -> None:
    report = _run(fn, _rows, lengths=(3, 7, 12))
    _assert_not_padded(report, reason)


def test_a_step_that_writes_its_input_in_place_is_not_captured(replay_on_cpu) -> None:
    """A replay runs on static copies of the inputs, so an in-place update of an input would
    never reach the caller's tensor: such a step runs uncaptured, and the update lands."""
    def accumulate(x: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        total.add_(x)
        return x @ W

    report = tileflow.Report()
    compiled = torch.compile(accumulate, backend=tileflow.TileflowBackend({"cuda_graphs": True, "max_tokens": 32},
                                                                          report=report))
    for tokens in (3, 5):
        x, total = torch.randn(tokens, H), torch.randn(tokens, H)
        want = total + x
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(total, 0)
        torch.testing.assert_close(compiled(x, total), x @ W)
        torch.testing.assert_close(total, want)
    _assert_not_captured(report, "writes a tensor in place")


def _a_row_broadcast_of_the_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x @ W, x[..., :1].expand(x.shape)


def _columns_of_the_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x @ W, x[:, 2:]


@pytest.mark.parametrize("fn", [_a_row_broadcast_of_the_input, _columns_of_the_input])
def test_an_output_viewing_an_input_is_not_captured(replay_on_cpu, fn) -> None:
    """A replay returns copies of the graph's outputs, and AOT autograd rebuilds an output that
    views an input from the caller's input at the copy's strides and offset (0): captured, the
    expand of a column (stride 0) came back as the input's own columns (found by the random
    programs of `test_padding_safety_fuzz.py`), and columns 2: as columns 0:. Such a step runs
    uncaptured, equal to eager, and its output still views the input. (A row-major reshape of
    a whole input is rebuilt right: `test_streams.py`'s `x.view(T, 2, 4)` is replayed.)"""
    report = _run(fn, _rows)
    _assert_not_captured(report, "an output that views input")
    compiled = torch.compile(fn, backend=tileflow.TileflowBackend({"cuda_graphs": True}))
    x = torch.randn(5, H)
    assert compiled(x)[1].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


# Second reader's findings: each was captured, and its replay differed from the step.
def _bool_mask_as_additive(x: torch.Tensor) -> torch.Tensor:
    # A causal bool mask cast to float is an additive 0/1 mask: it hides nothing.
    pos = torch.arange(x.shape[1])
    return F.scaled_dot_product_attention(*_heads(x), attn_mask=(pos[None, :] <= pos[:, None]).float())


def _additive_mask_as_bool(x: torch.Tensor) -> torch.Tensor:
    # A 0/-inf bias cast to bool is True exactly where it masked: anti-causal.
    pos = torch.arange(x.shape[1])
    bias = torch.where(pos[None, :] <= pos[:, None], torch.tensor(0.0), torch.tensor(float("-inf")))
    return F.scaled_dot_product_attention(*_heads(x), attn_mask=bias.bool())


def _positions_as_bool(x: torch.Tensor) -> torch.Tensor:
    # bool(position) is no position: every key but the first compares as 1.
    pos = torch.arange(x.shape[1]).bool()
    return F.scaled_dot_product_attention(*_heads(x), attn_mask=pos[None, :] <= pos[:, None])


def _bf16_positions(x: torch.Tensor) -> torch.Tensor:
    # Positions past 256 round in bf16, so a key one past the query can compare equal to it.
    pos = (torch.arange(x.shape[1]) + 301).to(torch.bfloat16)
    return F.scaled_dot_product_attention(*_heads(x), attn_mask=pos[None, :] <= pos[:, None])


# A third reader's: positions made in a dtype that rounds or wraps them, masks whose visible keys
# hold the lowest value too, and one row's values compared at two of its columns.
def _causal_over(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(*_heads(x), attn_mask=pos[None, :] <= pos[:, None])


def _bf16_arange(x: torch.Tensor) -> torch.Tensor:
    return _causal_over(x, torch.arange(300, 300 + x.shape[1], dtype=torch.bfloat16))  # 301 rounds to 300


def _int8_arange(x: torch.Tensor) -> torch.Tensor:
    return _causal_over(x, torch.arange(125, 125 + x.shape[1], dtype=torch.int8))  # 128 wraps to -128


def _fp16_running_count(x: torch.Tensor) -> torch.Tensor:
    return _causal_over(x, torch.ones(x.shape[1], dtype=torch.float16).cumsum(0) + 3001)


def _positions_times_bf16_ones(x: torch.Tensor) -> torch.Tensor:
    return _causal_over(x, (torch.arange(x.shape[1]) + 301) * torch.ones(x.shape[1], dtype=torch.bfloat16))


def _lowest_everywhere(x: torch.Tensor) -> torch.Tensor:
    # Visible keys at the lowest value too: every key scores alike, and a row averages all of them.
    pos, lowest = torch.arange(x.shape[1]), torch.tensor(torch.finfo(torch.float32).min)
    return F.scaled_dot_product_attention(*_heads(x), attn_mask=torch.where(pos[None, :] <= pos[:, None], lowest, lowest))


def _infinite_mask_clamped_to_the_lowest(x: torch.Tensor) -> torch.Tensor:
    pos, lowest = torch.arange(x.shape[1]), torch.finfo(torch.float32).min
    bias = torch.where(pos[None, :] <= pos[:, None], torch.tensor(lowest), torch.tensor(float("-inf")))
    return F.scaled_dot_product_attention(*_heads(x), attn_mask=torch.clamp_min(bias, lowest))


def _one_row_at_two_columns(x: torch.Tensor) -> torch.Tensor:
    # ids[t, 0] == ids[t, 1] is no diagonal: a row whose two columns differ sees no key.
    ids = (x[0] > 0).long()[torch.arange(x.shape[1])]
    same = ids[:, 0][None, :] == ids[:, 1][:, None]
    pos, lowest = torch.arange(x.shape[1]), torch.tensor(torch.finfo(torch.float32).min)
    allowed = (pos[None, :] <= pos[:, None]) & same
    return F.scaled_dot_product_attention(*_heads(x), attn_mask=torch.where(allowed, torch.tensor(0.0), lowest))


def _packed_sequences_of_a_batch(x: torch.Tensor) -> torch.Tensor:
    # transformers' packed sequences over a batch: seq[b, q] == seq[b, k], read at one batch row.
    b, t = x.shape[:2]
    seq = (x[..., 0] > 1).long().cumsum(-1)
    pos, rows = torch.arange(t), torch.arange(b)[:, None, None]
    allowed = (pos[None, :] <= pos[:, None]) & (seq[rows, pos[:, None]] == seq[rows, pos[None, :]])
    bias = torch.where(allowed, torch.tensor(0.0), torch.tensor(torch.finfo(torch.float32).min))[:, None]
    q, k, v = (y.view(b, t, 2, H // 2).transpose(1, 2) for y in (x @ QKV.t()).split(H, dim=-1))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def test_packed_sequences_of_a_batch_are_captured(replay_on_cpu) -> None:
    """The row-source fact read at one batch row by the same index in both operands (unlike two
    columns of a row, below): the lowest-value mask sees its diagonal and is captured."""
    report = _run(_packed_sequences_of_a_batch, lambda tokens: (torch.randn(2, tokens, H),))
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 1


@pytest.mark.parametrize("fn", [
    _bool_mask_as_additive, _additive_mask_as_bool, _positions_as_bool, _bf16_positions, _bf16_arange, _int8_arange,
    _fp16_running_count, _positions_times_bf16_ones, _lowest_everywhere, _infinite_mask_clamped_to_the_lowest,
    _one_row_at_two_columns,
])
def test_a_cast_mask_or_position_is_not_taken_as_causal(replay_on_cpu, fn) -> None:
    report = _run(fn, _tokens, lengths=(3, 4, 5, 11))
    _assert_not_padded(report, "does not hide the padded keys")



def _token_count_tensor(x: torch.Tensor) -> torch.Tensor:
    return (x * torch.tensor(x.shape[0], dtype=torch.float32)) @ W  # scalar_tensor(T)


def _where_token_count(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, x.shape[0] * 1.0) @ W  # where(c, x, scalar_tensor(T))


def _feature_columns_at_token_count(x: torch.Tensor) -> torch.Tensor:
    wide = torch.cat([x, x, x, x], dim=1)  # [T, 64]: columns T..T+3 move with the bucket
    return wide.narrow(1, x.shape[0], H // 4) @ W[: H // 4]


@pytest.mark.parametrize("fn, reason", [
    (_token_count_tensor, "fills a tensor with the token count"),
    (_where_token_count, "fills a tensor with the token count"),
    (_feature_columns_at_token_count, "an index computed from the token count"),
])
def test_the_token_count_as_a_value_is_not_captured(replay_on_cpu, fn, reason: str) -> None:
    report = _run(fn, _rows)
    _assert_not_padded(report, reason)


def _twice_the_token_count(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    return x @ W, x.shape[0] * 2


def test_a_number_output_computed_from_the_token_count_is_computed_at_the_calls(replay_on_cpu) -> None:
    """A replay returns an int computed from T alone (a MoE stage hands the next its 2T flattened
    expert rows) at the call's T, not the bucket's."""
    report = _run(_twice_the_token_count, _rows, lengths=(3, 5, 11, 20))
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 2


def _scaled_by_a_comparison_of_the_token_count(x: torch.Tensor) -> torch.Tensor:
    # T > 4 is a SymBool: captured at the bucket (16 > 4), a replay at T = 3 would scale by 1, not 0.
    return ((x + 1) * (x.shape[0] > 4)) @ W


def _filled_with_a_comparison_of_the_token_count(x: torch.Tensor) -> torch.Tensor:
    return (x + torch.full((x.shape[0], H), x.shape[0] > 4)) @ W


@pytest.mark.parametrize("fn", [_scaled_by_a_comparison_of_the_token_count,
                                _filled_with_a_comparison_of_the_token_count])
def test_a_comparison_of_the_token_count_as_a_value_is_not_captured(replay_on_cpu, fn) -> None:
    report = _run(fn, _rows, lengths=(3, 5, 11))
    _assert_not_padded(report, "token count")


def _comparison_of_the_token_count_returned(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return x @ W, x.shape[0] > 4


def test_a_comparison_of_the_token_count_returned_is_not_captured(replay_on_cpu) -> None:
    """A SymBool output is returned as captured (16 > 4 at the bucket): refused, not a crash."""
    report = _run(_comparison_of_the_token_count_returned, _rows, lengths=(3, 5, 11))
    _assert_not_padded(report, "a number output")


def _rows_by_positions(x: torch.Tensor) -> torch.Tensor:
    return x[:, :1] * torch.arange(x.shape[0] + 1)[None, :]  # [T, T + 1]


def _pairs_of_rows(x: torch.Tensor) -> torch.Tensor:
    return x @ x.t()  # [T, T]: two dims of exactly T rows


def _centered_and_first_row_repeated(x: torch.Tensor) -> torch.Tensor:
    # A hazard (a read across the tokens) and an output of T + 1 rows: replayed even at the
    # call's own count, it would be cut back to T rows.
    y = _centered(x)
    return torch.cat([y, y[:1]], dim=0)


@pytest.mark.parametrize("fn, reason", [
    (_rows_by_positions, "cuts back only one dim"),
    (_pairs_of_rows, "cuts back only one dim"),
    (_moe_returns_its_counts, "an output of per-expert counts"),
    (_centered_and_first_row_repeated, "reads across the token dim"),
])
def test_outputs_a_replay_cannot_cut_back_are_not_captured(replay_on_cpu, fn, reason: str) -> None:
    """A replay cuts each output along its one dim of exactly T rows and returns numbers as
    captured (but ints computed from T alone): an output with another token-sized dim would come
    back at the bucket's size, and one without the token dim is not captured at all."""
    _assert_not_captured(_run(fn, _rows, lengths=(3, 7, 12)), reason)


def test_strict_refuses_a_step_no_replay_could_run(replay_on_cpu) -> None:
    """`strict=True` turns a fallback into an error: cuda_graphs asked for and not applied too."""
    with pytest.raises(Exception, match=r"cuda_graphs not applied to graph .*strict=True.*cuts back only one dim"):
        _run(_rows_by_positions, _rows, strict=True)


def test_strict_runs_a_static_graph_uncaptured_with_its_note(replay_on_cpu) -> None:
    """A graph compiled at static sizes (torch.compile's first compile of a frame, by default) has
    no symbolic token dim to bucket: it runs uncaptured with a note, under `strict=True` too.
    Raising there would refuse every first call; the recompile at a new size is dynamic and is
    captured. (A step no padded replay could run right raises: the test above.)"""
    report = tileflow.Report()
    config = {"cuda_graphs": True, "max_tokens": 32, "strict": True}
    layer = torch.nn.Linear(H, H).eval()
    compiled = torch.compile(layer, backend=tileflow.TileflowBackend(config, report=report))
    with torch.no_grad():
        for tokens in (4, 5):
            x = torch.randn(tokens, H)
            torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
    first, second = report.graphs
    assert first.extra["cuda_graphs"] == "not captured: no single symbolic token dimension to bucket"
    assert second.extra["cuda_graphs"] == "whole step, token buckets [16, 32]" and replay_on_cpu.captures == 1


def _batch(tokens: int) -> tuple[torch.Tensor]:
    return (torch.randn(2, tokens, H),)


def _scan_across_sequences(x: torch.Tensor) -> torch.Tensor:
    # Two sequences flattened to [2T, H]: a scan from the first into the second reads the first's padding.
    return (x.reshape(-1, H).cumsum(0) @ W).view(2, -1, H)


def _first_rows_of_the_flattened_batch(x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, H)
    return x + (rows[:1] @ W).sum()


def _causal_over_the_flattened_batch(x: torch.Tensor) -> torch.Tensor:
    q, k, v = [t.reshape(1, 1, -1, H) for t in (x, x * 2, x * 3)]  # keys of both sequences in one row
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).view(2, -1, H)


def _rowwise_over_the_flattened_batch(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.layer_norm((x.reshape(-1, H) @ W).relu(), (H,)).view(2, -1, H)


@pytest.mark.parametrize("fn, reason", [
    (_scan_across_sequences, "reads across the token dim"),
    (_causal_over_the_flattened_batch, "several sequences"),
    (_first_rows_of_the_flattened_batch, "several sequences"),
])
def test_reads_across_flattened_sequences_are_not_captured(replay_on_cpu, fn, reason: str) -> None:
    """Several sequences flattened into one dim are padded at the end of each: only row-wise
    ops keep the padding apart."""
    report = _run(fn, _batch)
    _assert_not_padded(report, reason)


HALVES = torch.tensor([[1.0], [10.0]])


def _token_major_rows_cut_in_halves(x: torch.Tensor) -> torch.Tensor:
    # [T, 2] -> [2T] (2 rows per token) -> [2, T]: the halves of one block of T tokens, cut at
    # row T, where a replay cuts at row B; scaled per half, then read back as [T, 2].
    y = (x @ W[:, :2]).reshape(-1) + 1
    z = y.view(2, -1) * HALVES
    return (z.reshape(-1) + 1).view(-1, 2) @ W[:2]


def _arange_of_two_rows_per_token_cut_in_halves(x: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(2 * x.shape[0]).view(2, -1) * torch.tensor([[1], [100]])
    return x * (pos.reshape(-1) + 0).view(-1, 2).float().sum(1, keepdim=True)


@pytest.mark.parametrize("fn", [_token_major_rows_cut_in_halves, _arange_of_two_rows_per_token_cut_in_halves])
def test_a_view_that_cuts_a_block_of_tokens_is_not_captured(replay_on_cpu, fn) -> None:
    report = _run(fn, _rows, lengths=(3, 7, 12))
    _assert_not_padded(report, "a view that regroups rows")


def test_rowwise_ops_over_flattened_sequences_are_captured(replay_on_cpu) -> None:
    report = _run(_rowwise_over_the_flattened_batch, _batch)
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 1


LOWEST = torch.finfo(torch.float32).min


def _lowest_filled(allowed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    bias = torch.where(allowed, torch.tensor(0.0), torch.tensor(LOWEST))
    return F.scaled_dot_product_attention(*_heads(x), attn_mask=bias)


def _causal_window_lowest(x: torch.Tensor) -> torch.Tensor:
    # transformers' sliding-window mask (Gemma-2, gpt-oss): key <= query and key > query - 4,
    # filled with the dtype's lowest value: each real query keeps its own key.
    pos = torch.arange(x.shape[1])
    return _lowest_filled((pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - 4), x)


def _strictly_causal_lowest(x: torch.Tensor) -> torch.Tensor:
    # key < query: the first query sees no key, so its softmax averages every key, padding too.
    pos = torch.arange(x.shape[1])
    return _lowest_filled(pos[None, :] < pos[:, None], x)


def test_a_lowest_value_mask_with_its_diagonal_is_captured(replay_on_cpu) -> None:
    report = _run(_causal_window_lowest, _tokens, lengths=(3, 7, 12))
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 1


def test_a_lowest_value_mask_without_its_diagonal_is_not_captured(replay_on_cpu) -> None:
    """Were it captured, the first row would average the padded keys' values too."""
    report = _run(_strictly_causal_lowest, _tokens)
    _assert_not_padded(report)


def _clamped_inf_mask(allowed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # XGLM: an -inf mask, clamped at the lowest value (hidden keys then hide only beside a seen one).
    bias = torch.clamp_min(torch.where(allowed, torch.tensor(0.0), torch.tensor(float("-inf"))), LOWEST)
    return F.scaled_dot_product_attention(*_heads(x), attn_mask=bias)


def _causal_clamped(x: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(x.shape[1])
    return _clamped_inf_mask(pos[None, :] <= pos[:, None], x)


def _strictly_causal_clamped(x: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(x.shape[1])
    return _clamped_inf_mask(pos[None, :] < pos[:, None], x)


def test_a_clamped_mask_is_captured_only_with_its_diagonal(replay_on_cpu) -> None:
    """Clamped at the lowest value, an -inf mask keeps its padded keys out only of rows that see
    a key: a causal one is captured; a strictly causal one, whose first row would average the
    padded keys too, is not."""
    report = _run(_causal_clamped, _tokens, lengths=(3, 7, 12))
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 1
    torch._dynamo.reset()
    replay_on_cpu.captures = replay_on_cpu.replays = 0
    _assert_not_padded(_run(_strictly_causal_clamped, _tokens))


def _half_mask_lowered(below: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """A causal float16 mask (float16's lowest on hidden keys) taken to float32, its entries at
    most `below` sent to float32's lowest: the attention pass's form for XGLM in float16."""
    def attend(x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1])
        half = torch.where(pos[None, :] <= pos[:, None], torch.tensor(0.0, dtype=torch.float16),
                           torch.tensor(torch.finfo(torch.float16).min, dtype=torch.float16))
        bias = half.float()
        return F.scaled_dot_product_attention(*_heads(x), attn_mask=torch.where(bias <= below, LOWEST, bias))
    return attend


def test_a_half_mask_lowered_to_float32s_lowest_is_captured_while_its_visible_keys_stay(replay_on_cpu) -> None:
    """`where(mask <= c, lowest, mask)` of a causal float16 mask widened to float32 keeps its
    causal facts while its visible keys (0) are above c: captured at c = float16's lowest. At
    c = 0 it hides every key, each row would average the padded keys too: not captured."""
    report = _run(_half_mask_lowered(torch.finfo(torch.float16).min), _tokens, lengths=(3, 7, 12))
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 1
    torch._dynamo.reset()
    replay_on_cpu.captures = replay_on_cpu.replays = 0
    _assert_not_padded(_run(_half_mask_lowered(0.0), _tokens))


def _half_lowest_mask_in(dtype: torch.dtype, widen: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """A causal mask hiding keys with float16's lowest value (-65504), built in `dtype` (and
    taken to float32 with `widen`), over float32 scores: q = -k, so every real score is far
    below -65504."""
    def attend(x: torch.Tensor) -> torch.Tensor:
        k = x.view(1, -1, 2, H // 2).transpose(1, 2)
        pos = torch.arange(x.shape[1])
        mask = torch.where(pos[None, :] <= pos[:, None], torch.tensor(0.0, dtype=dtype),
                           torch.tensor(torch.finfo(torch.float16).min, dtype=dtype))
        return F.scaled_dot_product_attention(-k, k, k, attn_mask=mask.float() if widen else mask)
    return attend


@pytest.mark.parametrize("dtype, widen", [(torch.float32, False), (torch.bfloat16, True), (torch.float16, True)])
def test_float16s_lowest_hides_no_key_from_float32_scores(replay_on_cpu, dtype: torch.dtype, widen: bool) -> None:
    """-65504 is the lowest only of float16: beside float32 scores far below it (a float32 or
    bfloat16 mask holding it, or a float16 one widened to float32) a padded key, whose score is
    just -65504, outweighs every real key. Such a step is not captured and equals eager."""
    _assert_not_padded(_run(_half_lowest_mask_in(dtype, widen), lambda t: (1000 + torch.randn(1, t, H),)),
                         "does not hide the padded keys")


def _latent_attention(x: torch.Tensor) -> torch.Tensor:
    # Queries and keys wider than values (DeepSeek-V3's latent attention): the attention pass
    # gives the values zero columns along their head size and cuts the output back.
    q, k, v = _heads(x)
    pos = torch.arange(x.shape[1])
    return F.scaled_dot_product_attention(q, k, v[..., : H // 4], attn_mask=pos[None, :] <= pos[:, None])


def _rows_padded_then_shifted(x: torch.Tensor) -> torch.Tensor:
    # Zero rows after the tokens, then the rows shifted onto them: the last real rows read the
    # zeros, which a replay's padded rows replace.
    return F.pad(x, (0, 0, 0, 3))[:, 3:] @ W


def test_padding_off_the_token_dims_is_captured_and_along_them_is_not(replay_on_cpu) -> None:
    """`constant_pad_nd` of a head size keeps each row apart (latent attention is captured and
    equals eager); padding the token dim itself puts rows after the tokens, which a replay's
    padded rows stand in front of: not captured."""
    report = _run(_latent_attention, _tokens, lengths=(3, 7, 12))
    assert report.rewrites.get("head_size_padded") == 1
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 1
    torch._dynamo.reset()
    replay_on_cpu.captures = replay_on_cpu.replays = 0
    _assert_not_padded(_run(_rows_padded_then_shifted, _tokens), "pads along the token dim")


def _clamped_bool_mask(x: torch.Tensor) -> torch.Tensor:
    # A bool mask promoted by the clamp: 1.0 where seen, 0.0 where "hidden" (nothing is hidden).
    pos = torch.arange(x.shape[1])
    return F.scaled_dot_product_attention(*_heads(x), attn_mask=torch.clamp_min(pos[None, :] <= pos[:, None], LOWEST))


def _float_mask_read_as_bool(x: torch.Tensor) -> torch.Tensor:
    # `logical_and` of an additive mask is True where it is not 0: on the keys it hides.
    pos = torch.arange(x.shape[1])
    additive = torch.where(pos[None, :] <= pos[:, None], torch.tensor(0.0), torch.tensor(LOWEST))
    hides = torch.logical_and(additive, torch.ones((), dtype=torch.bool))
    return F.scaled_dot_product_attention(*_heads(x), attn_mask=torch.where(hides, 0.0, float("-inf")))


@pytest.mark.parametrize("fn", [_clamped_bool_mask, _float_mask_read_as_bool])
def test_float_and_bool_masks_are_not_read_as_each_other(replay_on_cpu, fn) -> None:
    """A second reader's finds: a bool mask's facts say where it is True, an additive mask's what
    it hides; read as the other, both were captured and replayed wrong (15 and 32 of 48 outputs)."""
    _assert_not_padded(_run(fn, _tokens))


@pytest.mark.parametrize("arch", ["gemma2", pytest.param("bloom", marks=BLOOM_ALIBI), "xglm"])
def test_zoo_models_with_lowest_value_masks_are_captured(replay_on_cpu, arch: str) -> None:
    """Gemma-2 (sliding windows, soft-capping) and BLOOM (ALiBi) fill their masks with the
    dtype's lowest value, XGLM clamps its masked scores at it; each real query keeps its own
    key, so they are captured, and equal eager at lengths past Gemma-2's window of 8."""
    from models import ZOO

    torch.manual_seed(0)
    model = ZOO[arch][0]().eval()
    if arch != "gemma2":  # (its sliding window in every other layer)
        model = one_layer(model)

    def logits(ids: torch.Tensor) -> torch.Tensor:
        return model(ids, use_cache=False).logits

    report = _run(logits, lambda t: (torch.randint(0, VOCAB, (1, t)),), lengths=(5, 12, 20))
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 2


def test_a_padding_mask_of_ones_built_at_the_bucket_is_hidden_by_the_causal_flag(replay_on_cpu) -> None:
    """BioGPT builds its padding mask in the graph, `ones(B, T)`: in a replay it spans the bucket,
    so its padded keys hold True, and the key ranges of the mask (`attention_mask_ranges`) reach
    them. Every attention reading those ranges is causal over the tokens, which hides the padded
    keys whatever the ranges say: the step is captured at buckets (it ran only at exact token
    counts) and equals eager."""
    from models import _causal_lm

    torch.manual_seed(0)
    model = one_layer(_causal_lm("BioGptConfig", "BioGptForCausalLM", num_key_value_heads=None)().eval())

    def logits(ids: torch.Tensor) -> torch.Tensor:
        return model(ids, use_cache=False).logits

    report = _run(logits, lambda t: (torch.randint(0, VOCAB, (1, t)),), lengths=(5, 12, 20))
    assert report.rewrites["mask_ranges"] == 1, report.rewrites
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 2


@pytest.mark.parametrize("arch", ["xglm", "gemma2", pytest.param("bloom", marks=BLOOM_ALIBI)])
def test_zoo_models_in_float16_are_captured(replay_on_cpu, arch: str) -> None:
    """In float16 the masks hide keys with float16's lowest value (-65504), and for XGLM the
    attention pass sends those to float32's lowest (`where(mask <= lowest16, lowest32, mask)`):
    both keep the mask causal with its diagonal, so the steps are captured (they ran uncaptured),
    and are as close to eager as float16 allows."""
    from models import ZOO

    torch.manual_seed(0)
    model = ZOO[arch][0]().eval()
    if arch != "gemma2":  # (its sliding window in every other layer)
        model = one_layer(model)
    model = model.half()
    report = tileflow.Report()
    compiled = torch.compile(lambda ids: model(ids, use_cache=False).logits,
                             backend=tileflow.TileflowBackend({"cuda_graphs": True, "max_tokens": 32}, report=report))
    for tokens in (5, 12, 20):
        ids = torch.randint(0, VOCAB, (1, tokens))
        torch._dynamo.mark_dynamic(ids, 1)
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids), model(ids, use_cache=False).logits, rtol=1e-2, atol=1e-2)
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 2


# Third reader's findings on flattened sequences.
TABLE = torch.randn(64, H)


def _table_rows_for_the_flattened_batch(x: torch.Tensor) -> torch.Tensor:
    # The first 2T rows of a fixed table are one run of rows, not two blocks of T: the bucket's
    # run would give the second sequence rows B.., where the step gives it rows T..
    return (x.reshape(-1, H) + TABLE[: 2 * x.shape[1]]).view(2, -1, H)


def test_a_run_of_twice_the_token_count_rows_is_not_taken_for_blocks(replay_on_cpu) -> None:
    report = _run(_table_rows_for_the_flattened_batch, _batch)
    _assert_not_padded(report, "one run of rows")


def test_an_input_the_replay_cannot_pad_is_not_captured(replay_on_cpu) -> None:
    """A replay pads an input only along its one dim of exactly T rows: an input of 2T rows (here
    Dynamo ties its size to twice x's token count) would be copied whole, at the call's size,
    into a step run at the bucket's. It is refused before any capture is tried."""
    def add_flattened(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((x.reshape(-1, H) + y) @ W).view(2, -1, H)

    report = tileflow.Report()
    compiled = torch.compile(add_flattened, backend=tileflow.TileflowBackend({"cuda_graphs": True, "max_tokens": 32},
                                                                             report=report))
    for tokens in (3, 5, 11):
        x, y = torch.randn(2, tokens, H), torch.randn(2 * tokens, H)
        torch._dynamo.mark_dynamic(x, 1)
        torch._dynamo.mark_dynamic(y, 0)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, y), add_flattened(x, y), rtol=1e-5, atol=1e-5)
    _assert_not_padded(report, "a replay pads only one dim")


def test_capped_buckets_keep_the_bound_once() -> None:
    """The buckets up to the bound, and the bound itself when it falls between two buckets: a
    bound that is a bucket is kept once, the largest one included."""
    from tileflow.padding_safety import capped_buckets

    assert capped_buckets((16, 32), None) == (16, 32)
    assert capped_buckets((16, 32), 20) == (16, 20)
    assert capped_buckets((16, 32), 16) == (16,)
    assert capped_buckets((16, 32), 32) == (16, 32)
    assert capped_buckets((16, 32), 40) == (16, 32)
    assert capped_buckets((16, 32), 8) == (8,)


def test_an_input_with_a_row_before_its_tokens_is_not_captured(replay_on_cpu) -> None:
    """An input of T + 1 rows (Dynamo ties its size to x's token count plus one) has no dim of
    exactly T rows to pad: a replay would copy it whole, at the call's size."""
    def add_shifted(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x + y[1:]) @ W

    report = tileflow.Report()
    compiled = torch.compile(add_shifted, backend=tileflow.TileflowBackend({"cuda_graphs": True, "max_tokens": 32},
                                                                           report=report))
    for tokens in (3, 5, 11):
        x, y = torch.randn(tokens, H), torch.randn(tokens + 1, H)
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(y, 0)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, y), add_shifted(x, y), rtol=1e-5, atol=1e-5)
    _assert_not_padded(report, "a replay pads only one dim")


TABLE20 = torch.randn(20, H)


def _first_rows_of_a_table(x: torch.Tensor) -> torch.Tensor:
    return (x + TABLE20[: x.shape[0]]) @ W  # Dynamo guards T <= 20


def test_buckets_stay_within_the_token_counts_guarded_range(replay_on_cpu) -> None:
    """A replay runs the graph at its bucket's size: past the range the graph's guards allow
    (T <= 20 here) it would read past the table, so the buckets stop at the bound, which
    becomes a bucket itself."""
    report = _run(_first_rows_of_a_table, _rows, lengths=(5, 18, 20))
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 20]"]
    assert replay_on_cpu.captures == 2


TABLE22 = torch.randn(22, H)


def _embedded_positions(x: torch.Tensor) -> torch.Tensor:
    return (x + F.embedding(torch.arange(x.shape[0]), TABLE20)) @ W


def _selected_positions(x: torch.Tensor) -> torch.Tensor:
    return (x + TABLE22.index_select(0, torch.arange(x.shape[0]) + 2)) @ W


def _indexed_positions(x: torch.Tensor) -> torch.Tensor:
    return (x + TABLE22[torch.arange(2, x.shape[0] + 2)]) @ W


def _sliced_40_read_20(x: torch.Tensor) -> torch.Tensor:
    return (x + TABLE40_ROWS[: x.shape[0]] + F.embedding(torch.arange(x.shape[0]), TABLE20)) @ W  # guards T <= 40


def _sliced_20_read_40(x: torch.Tensor) -> torch.Tensor:
    return (x + TABLE20[: x.shape[0]] + F.embedding(torch.arange(x.shape[0]), TABLE40_ROWS)) @ W  # guards T <= 20


@pytest.mark.parametrize("fn", [_embedded_positions, _selected_positions, _indexed_positions, _sliced_40_read_20,
                                _sliced_20_read_40])
def test_buckets_stay_within_a_table_read_at_positions(replay_on_cpu, monkeypatch: pytest.MonkeyPatch, fn) -> None:
    """A table of 20 rows read at positions arange(T) + c guards nothing, and a replay at the
    32-token bucket read rows up to 31 + c: past the table (a device-side assert on a GPU). The
    buckets stop at rows - c, which becomes a bucket itself; no replay reads past the table. With
    a second bound, the token count's guarded range (a table sliced by T, of 40 rows or of 20),
    they stop at the tighter of the two, whichever it is."""
    failed = []
    capture = ReplayOnCpu.capture

    def recording_capture(self, step):
        try:
            return capture(self, step)
        except Exception as exc:  # a read past the table; the runner would run the step uncaptured
            failed.append(exc)
            raise

    monkeypatch.setattr(ReplayOnCpu, "capture", recording_capture)
    report = _run(fn, _rows, lengths=(5, 18, 20))
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 20]"]
    assert replay_on_cpu.captures == 2 and not failed


def _rotary_rows_gathered(x: torch.Tensor) -> torch.Tensor:
    # GPT-J before transformers 5.24: the table gathered along the tokens at the positions
    # repeated across its width.
    positions = torch.arange(x.shape[0])[None]
    index = positions.unsqueeze(-1).repeat(1, 1, H)
    return (x * torch.gather(TABLE20_ROWS[None], 1, index)[0]) @ W


def _rows_gathered_at_their_values(x: torch.Tensor) -> torch.Tensor:
    # Row t picks row `|x[t]| * 10 % 20` of the table, a value of its own: any row, in range.
    index = ((x[:, :1].abs() * 10).long() % 20).expand(-1, H)
    return (x + torch.gather(TABLE20_ROWS, 0, index)) @ W


@pytest.mark.parametrize("fn", [_rotary_rows_gathered, _rows_gathered_at_their_values])
def test_a_gather_along_the_tokens_from_a_table_is_a_lookup(replay_on_cpu, fn) -> None:
    """A gather along the token dim from a table without one reads, for each element, the table
    at its own index: a lookup, bounded as a lookup at positions (the buckets stop at the
    table's 20 rows; `repeat` across the width keeps the positions) or by the values' range (a
    remainder by the rows). Both were refused as gathers along the token dim (GPT-J's step on
    transformers 5.17 was captured only at exact token counts)."""
    report = _run(fn, _rows, lengths=(5, 18, 20))
    bound = "16, 20" if fn is _rotary_rows_gathered else "16, 32"
    assert _cuda_graphs_notes(report) == [f"whole step, token buckets [{bound}]"]
    assert replay_on_cpu.captures == 2


def _counted_positions(x: torch.Tensor) -> torch.Tensor:
    # OPT without a padding mask: positions = cumsum(ones) * ones - 1, offset by 2 (a 22-row table).
    ones = torch.ones(1, x.shape[0])
    positions = (torch.cumsum(ones, dim=1) * ones).long() - 1
    return (x + F.embedding(positions[0] + 2, TABLE22)) @ W


def _doubled_positions(x: torch.Tensor) -> torch.Tensor:
    return (x + F.embedding(torch.arange(x.shape[0]) * 2, TABLE40_ROWS)) @ W


TABLE40_ROWS = torch.randn(40, H)


def _table_rows_in_token_order(x: torch.Tensor) -> torch.Tensor:
    # The tokens' sort order reads rows up to T - 1, a replay's up to B - 1: past 20 rows at 32.
    order = x[:, 0].sort().indices
    return (x + TABLE20_ROWS[order][torch.argsort(order)]) @ W


TABLE20_ROWS = torch.randn(20, H)


def test_tables_read_at_counted_positions_cap_and_other_computed_indices_refuse(replay_on_cpu) -> None:
    """OPT's positions, a running count of ones, are positions: the buckets stop at the table
    (they read past it at 32 before); indices computed from the token count otherwise (`arange(T)
    * 2`, which read row 62 at 32) are refused."""
    report = _run(_counted_positions, _rows, lengths=(5, 18, 20))
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 20]"]
    assert replay_on_cpu.captures == 2
    torch._dynamo.reset()
    replay_on_cpu.captures = replay_on_cpu.replays = 0
    _assert_not_padded(_run(_doubled_positions, _rows, lengths=(5, 18, 20)), "indices computed from the token count")
    torch._dynamo.reset()
    replay_on_cpu.captures = replay_on_cpu.replays = 0
    _assert_not_padded(_run(_table_rows_in_token_order, _rows, lengths=(5, 18, 20)),
                         "indices computed from the token count")


# Architecture sweep (cuda_graphs=True over ~90 transformers models): GPT-J's, GLM's and Cohere's
# interleaved RoPE (a stack), LFM2's short convolution, XGLM's position table (index_select) and
# DBRX's router norm (linalg_vector_norm) were refused though row-safe.
def _interleaved_rotary(x: torch.Tensor) -> torch.Tensor:
    # rotate_half of interleaved pairs: (x0, x1) -> (-x1, x0), stacked along a new last dim.
    pairs = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
    return (x + pairs) @ W


def _stacked_along_the_tokens(x: torch.Tensor) -> torch.Tensor:
    # A new dim before the token dim: row t of each piece stays row t.
    return torch.stack([x, x.relu()], dim=0).sum(0) @ W


CONV_W = torch.randn(H, 1, 4)


def _causal_short_conv(x: torch.Tensor) -> torch.Tensor:
    # transformers' short conv: padding K - 1 on both sides, the first T rows kept (+ 1: padded
    # rows that are not the conv's zeros).
    y = F.conv1d((x + 1).transpose(1, 2), CONV_W, padding=3, groups=H)[..., : x.shape[1]]
    return F.silu(y).transpose(1, 2) @ W


def _dilated_causal_short_conv(x: torch.Tensor) -> torch.Tensor:
    y = F.conv1d((x + 1).transpose(1, 2), CONV_W, padding=6, dilation=2, groups=H)[..., : x.shape[1]]
    return y.transpose(1, 2) @ W


POSITION_TABLE = torch.randn(40, H)


def _position_table_rows(x: torch.Tensor) -> torch.Tensor:
    # XGLM's sinusoidal positions: rows arange(T) + 2 of a fixed table.
    return (x + POSITION_TABLE.index_select(0, torch.arange(x.shape[1]) + 2)) @ W


def _feature_columns_selected(x: torch.Tensor) -> torch.Tensor:
    return x.index_select(2, torch.arange(H).flip(0)) @ W


def _normalized_by_vector_norm(x: torch.Tensor) -> torch.Tensor:
    # DBRX's router: top-k weights divided by their norm over the features.
    return (x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)) @ W


def _projected_as_columns(x: torch.Tensor) -> torch.Tensor:
    # W @ x^T: the tokens are the columns of the right operand, not the dim it sums over.
    return (W @ x.transpose(-1, -2)).transpose(-1, -2)


@pytest.mark.parametrize("fn", [_interleaved_rotary, _stacked_along_the_tokens, _causal_short_conv,
                                _dilated_causal_short_conv, _position_table_rows, _feature_columns_selected,
                                _normalized_by_vector_norm, _projected_as_columns])
def test_stacks_convolutions_and_lookups_are_captured(replay_on_cpu, fn) -> None:
    report = _run(fn, _tokens, lengths=(3, 5, 11, 20))
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 2


def _short_conv_shifted_by_one_row(x: torch.Tensor) -> torch.Tensor:
    # Rows 1..T: the last reads the first padded row (+ 1: padded zeros would read as the conv's).
    y = F.conv1d((x + 1).transpose(1, 2), CONV_W, padding=3, groups=H)[..., 1 : x.shape[1] + 1]
    return y.transpose(1, 2) @ W


def _short_conv_row_past_the_prefix(x: torch.Tensor) -> torch.Tensor:
    # Row 3 of T + 3 (no later than its size's prefix) reads token 3: a padded row at T = 3.
    y = F.conv1d((x + 1).transpose(1, 2), CONV_W, padding=3, groups=H)
    return (x + y[..., 3][:, None]) @ W


def _centered_conv(x: torch.Tensor) -> torch.Tensor:
    # A kernel of 3 padded by 1 ("same"): row t reads row t + 1, a padded row for the last real one.
    return F.conv1d((x + 1).transpose(1, 2), CONV_W[..., :3], padding=1, groups=H).transpose(1, 2) @ W


def _dilated_conv_padded_as_undilated(x: torch.Tensor) -> torch.Tensor:
    # Dilation 2 needs padding 6 for a kernel of 4 (3 would do undilated); with 4, row t reads row t + 2.
    y = F.conv1d((x + 1).transpose(1, 2), CONV_W, padding=4, dilation=2, groups=H)[..., : x.shape[1]]
    return y.transpose(1, 2) @ W


def _short_conv_cut_one_row_past_the_tokens(x: torch.Tensor) -> torch.Tensor:
    # The first T + 1 rows, then rows 1..T of them: the last reads the first padded row.
    y = F.conv1d((x + 1).transpose(1, 2), CONV_W, padding=3, groups=H)[..., : x.shape[1] + 1]
    return y[..., 1:].transpose(1, 2) @ W


@pytest.mark.parametrize("fn, reason", [
    (_short_conv_shifted_by_one_row, "used beyond its first T rows"),
    (_short_conv_row_past_the_prefix, "used beyond its first T rows"),
    (_centered_conv, "read later rows"),
    (_dilated_conv_padded_as_undilated, "read later rows"),
    (_short_conv_cut_one_row_past_the_tokens, "used beyond its first T rows"),
])
def test_convolutions_reading_padded_rows_are_not_captured(replay_on_cpu, fn, reason: str) -> None:
    report = _run(fn, _tokens)
    _assert_not_padded(report, reason)


# Padded rows hold finite values computed from the pad value (0), but an op undefined at some
# finite values makes them inf or NaN where real rows are finite: attention multiplies the
# padded values by weight 0 (0 * NaN = NaN), and under a finite mask adds it to the padded keys'
# scores (NaN + lowest = NaN), so real rows would come out NaN.
def _split(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 2, H // 2).transpose(1, 2)


def _values_normalized_without_eps(x: torch.Tensor) -> torch.Tensor:
    q, k, _ = _heads(x)
    v = _split(x)
    return F.scaled_dot_product_attention(q, k, v / v.norm(dim=-1, keepdim=True), is_causal=True)  # 0 / 0


def _values_floor_divided_without_eps(x: torch.Tensor) -> torch.Tensor:
    q, k, _ = _heads(x)
    v = _split(x)
    return F.scaled_dot_product_attention(q, k, v // v.norm(dim=-1, keepdim=True), is_causal=True)  # 0 // 0


def _log_values(x: torch.Tensor) -> torch.Tensor:
    q, k, _ = _heads(x)
    return F.scaled_dot_product_attention(q, k, _split(torch.log(x.abs())), is_causal=True)  # log 0 = -inf


def _fractional_power_values(x: torch.Tensor) -> torch.Tensor:
    q, k, _ = _heads(x)
    return F.scaled_dot_product_attention(q, k, _split(x.abs().pow(-0.5)), is_causal=True)  # 0 ** -0.5 = inf


def _reciprocal_keys(x: torch.Tensor, **mask: torch.Tensor | bool) -> torch.Tensor:
    q, _, v = _heads(x)
    return F.scaled_dot_product_attention(q, _split(1.0 / x), v, **mask)  # 1 / 0 = inf


def _reciprocal_keys_under_a_lowest_mask(x: torch.Tensor) -> torch.Tensor:
    # Causal over positions counted by a running sum (OPT's), which the padding analysis reads
    # and `tileflow.mask_rule` does not: the finite mask stays (it is not replaced by the
    # kernel's causal rule) and is added to the padded keys' scores.
    pos = torch.ones(x.shape[1], dtype=torch.long).cumsum(0)
    bias = torch.where(pos[None, :] <= pos[:, None], torch.tensor(0.0), torch.tensor(LOWEST))
    return _reciprocal_keys(x, attn_mask=bias)


def _weighted_by(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return _causal(x * weights[..., :1])


def _router_logits_over_their_sum(x: torch.Tensor) -> torch.Tensor:
    logits = torch.topk(x @ ROUTER.T, 2).values  # padded rows: 0 / 0
    return _weighted_by(x, logits / logits.sum(-1, keepdim=True))


def _smallest_softmax_weights_over_their_sum(x: torch.Tensor) -> torch.Tensor:
    # The top-k of the smallest softmax scores holds no peak: each may underflow to 0, so may
    # their sum (0 / 0).
    weights = torch.topk((x @ ROUTER.T).softmax(-1), 2, largest=False).values
    return _weighted_by(x, weights / weights.sum(-1, keepdim=True))


def _sigmoid_router_weights_in_float16(x: torch.Tensor) -> torch.Tensor:
    # MiniMax-M2's weights with float16 scores: sigmoid(-20) is 2e-9, below float16's smallest
    # value (6e-8), so a score and the sum of the top-k may be 0 (0 / 0).
    scores = torch.sigmoid((x @ ROUTER.T).half())
    weights = scores.gather(-1, torch.topk(scores + ROUTER_BIAS.half(), 2).indices)
    return _weighted_by(x, (weights / weights.sum(-1, keepdim=True)).float())


def _values_over_rsqrt(x: torch.Tensor, denominator: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Causal attention over values scaled by `rsqrt(denominator(v))` (an RMSNorm's form)."""
    q, k, _ = _heads(x)
    v = _split(x)
    return F.scaled_dot_product_attention(q, k, v * torch.rsqrt(denominator(v)), is_causal=True)


def _values_over_a_shifted_mean(x: torch.Tensor) -> torch.Tensor:
    # mean(v) + c is of unknown sign, however large c: rsqrt of it may be NaN.
    return _values_over_rsqrt(x, lambda v: v.mean(-1, keepdim=True) + 100.0)


def _rms_normed_values_with_an_eps_below_float32s_range(x: torch.Tensor) -> torch.Tensor:
    # 1e-46 is 0 in float32: mean(v^2) + eps is only non-negative, and rsqrt(0) = inf.
    return _values_over_rsqrt(x, lambda v: v.pow(2).mean(-1, keepdim=True) + 1e-46)


def _values_over_a_root_mean_square(x: torch.Tensor) -> torch.Tensor:
    # sqrt(mean(v^2)) is only non-negative: 0 at a row of zeros, and v / 0 = NaN.
    q, k, _ = _heads(x)
    v = _split(x)
    return F.scaled_dot_product_attention(q, k, v / v.pow(2).mean(-1, keepdim=True).sqrt(), is_causal=True)


def _square_rooted_values(x: torch.Tensor) -> torch.Tensor:
    q, k, _ = _heads(x)
    return F.scaled_dot_product_attention(q, k, _split((x + 100.0).pow(0.5)), is_causal=True)  # (-1) ** 0.5 = NaN


@pytest.mark.parametrize("fn, reason", [
    (_values_normalized_without_eps, "values (V) whose padded rows may be inf or NaN (from div"),
    (_values_over_a_root_mean_square, "values (V) whose padded rows may be inf or NaN (from div"),
    (_values_floor_divided_without_eps, "values (V) whose padded rows may be inf or NaN (from floor_divide"),
    (_router_logits_over_their_sum, "values (V) whose padded rows may be inf or NaN (from div"),
    (_smallest_softmax_weights_over_their_sum, "values (V) whose padded rows may be inf or NaN (from div"),
    (_sigmoid_router_weights_in_float16, "values (V) whose padded rows may be inf or NaN (from div"),
    (_log_values, "values (V) whose padded rows may be inf or NaN (from log"),
    (_fractional_power_values, "values (V) whose padded rows may be inf or NaN (from pow"),
    (_values_over_a_shifted_mean, "values (V) whose padded rows may be inf or NaN (from rsqrt"),
    (_square_rooted_values, "values (V) whose padded rows may be inf or NaN (from pow"),
    (_rms_normed_values_with_an_eps_below_float32s_range, "values (V) whose padded rows may be inf or NaN (from rsqrt"),
    (_reciprocal_keys_under_a_lowest_mask, "keys (K) whose padded rows may be inf or NaN (from reciprocal"),
])
def test_padded_rows_made_inf_or_nan_that_reach_real_rows_are_not_captured(replay_on_cpu, fn, reason: str) -> None:
    _assert_not_padded(_run(fn, _inputs_for(fn)), reason)


def _rms_normed_values(x: torch.Tensor) -> torch.Tensor:
    # Llama's RMSNorm: mean(v^2) + eps is positive, so rsqrt of it is finite.
    return _values_over_rsqrt(x, lambda v: v.pow(2).mean(-1, keepdim=True) + 1e-6)


def _normalized_values(x: torch.Tensor) -> torch.Tensor:
    # F.normalize: x / norm.clamp_min(eps).
    q, k, _ = _heads(x)
    return F.scaled_dot_product_attention(q, k, F.normalize(_split(x), dim=-1), is_causal=True)


def _values_over_a_clamped_root_mean_square(x: torch.Tensor) -> torch.Tensor:
    # Gemma-3n's AltUp: v / sqrt(mean(v^2).clamp(min=1e-5)); the root of a positive value is positive.
    q, k, _ = _heads(x)
    v = _split(x)
    return F.scaled_dot_product_attention(q, k, v / v.pow(2).mean(-1, keepdim=True).clamp(min=1e-5).sqrt(),
                                          is_causal=True)


def _reciprocal_keys_causal(x: torch.Tensor) -> torch.Tensor:
    # The causal flag hides the padded keys' scores (inf or NaN) before the softmax.
    return _reciprocal_keys(x, is_causal=True)


def _inputs_for(fn: Callable[..., torch.Tensor]) -> Callable[[int], tuple[torch.Tensor]]:
    """The token inputs `fn` is checked on: away from zero where it takes their reciprocals."""
    return _tokens_away_from_zero if fn in (_reciprocal_keys_causal, _reciprocal_keys_under_a_lowest_mask) else _tokens


def _softmax_router_weights(x: torch.Tensor) -> torch.Tensor:
    # Mixtral's: the top-k of a softmax over their sum, which holds its largest (at least 1/n).
    weights = torch.topk((x @ ROUTER.T).softmax(-1), 2).values
    return _weighted_by(x, weights / weights.sum(-1, keepdim=True))


def _sigmoid_router_weights(x: torch.Tensor) -> torch.Tensor:
    # DeepSeek-V3's: sigmoid scores at the top-k ids over their sum plus an epsilon.
    scores = torch.sigmoid(x @ ROUTER.T)
    weights = scores.gather(-1, torch.topk(scores + ROUTER_BIAS, 2).indices)
    return _weighted_by(x, weights / (weights.sum(-1, keepdim=True) + 1e-20))


def _sigmoid_router_weights_without_eps(x: torch.Tensor) -> torch.Tensor:
    # MiniMax-M2's: a sigmoid is positive while exp(-x) stays in float32's range, so is their sum.
    scores = torch.sigmoid(x @ ROUTER.T)
    weights = scores.gather(-1, torch.topk(scores + ROUTER_BIAS, 2).indices)
    return _weighted_by(x, weights / weights.sum(-1, keepdim=True))


def _position_scaled_queries(x: torch.Tensor) -> torch.Tensor:
    # Ministral-3's: queries scaled by 1 + b * log(1 + floor(position / n)); positions are >= 0.
    # The output is the next attention's values (as a layer's output reaches the next layer's V).
    q, k, v = _heads(x)
    scale = 1 + 0.1 * torch.log(1 + torch.floor(torch.arange(x.shape[1]) / 4))
    out = F.scaled_dot_product_attention(q * scale[:, None], k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, out, is_causal=True)


def _rms_normed_values_by_a_product(x: torch.Tensor) -> torch.Tensor:
    # RMSNorm with v * v for the square: non-negative as v.pow(2) is.
    return _values_over_rsqrt(x, lambda v: (v * v).mean(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("fn", [_rms_normed_values, _rms_normed_values_by_a_product, _normalized_values,
                                _values_over_a_clamped_root_mean_square, _reciprocal_keys_causal,
                                _softmax_router_weights, _sigmoid_router_weights,
                                _sigmoid_router_weights_without_eps, _position_scaled_queries])
def test_padded_rows_kept_finite_or_hidden_are_captured(replay_on_cpu, fn) -> None:
    report = _run(fn, _inputs_for(fn))
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 1


def _values_normed_by_an_input_eps(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    q, k, _ = _heads(x)
    v = _split(x)
    return F.scaled_dot_product_attention(q, k, v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps), is_causal=True)


def test_an_input_eps_is_taken_as_positive_and_checked_at_each_call(replay_on_cpu) -> None:
    """Under `dynamic=True` Dynamo passes a model's eps as a 0-d input: RMSNorm's `mean(x^2) +
    eps` is positive only while it is. The step is captured, replayed at calls with a positive
    eps, and runs uncaptured at one with eps 0 (a replay would give NaN: padded rows of zeros)."""
    report = tileflow.Report()
    compiled = torch.compile(_values_normed_by_an_input_eps, dynamic=True,
                             backend=tileflow.TileflowBackend({"cuda_graphs": True, "max_tokens": 32}, report=report))
    for tokens, eps in ((3, 1e-6), (5, 1e-6), (5, 0.0)):
        x = torch.randn(1, tokens, H)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, torch.tensor(eps)), _values_normed_by_an_input_eps(x, torch.tensor(eps)),
                                       rtol=1e-5, atol=1e-5)
        if eps:
            replays = replay_on_cpu.replays
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 1 and replays > 0 and replay_on_cpu.replays == replays


def _positions_rounded_in_float32(x: torch.Tensor) -> torch.Tensor:
    # 0, 0, 2, 4, 4, 4, 6, ...: in a bucket, real query 4 sees padded key 5 (both "4").
    p = (torch.arange(x.shape[1], dtype=torch.float32) + 2**24) - 2**24
    return F.scaled_dot_product_attention(*_heads(x), attn_mask=p[None, :] <= p[:, None])


def _float_positions_cast_to_int(x: torch.Tensor) -> torch.Tensor:
    p = torch.arange(2**24, 2**24 + x.shape[1], dtype=torch.float32).long()
    return F.scaled_dot_product_attention(*_heads(x), attn_mask=p[None, :] <= p[:, None])


def _int32_positions_wrapping_negative(x: torch.Tensor) -> torch.Tensor:
    # Padded rows from row 18 wrap past 2**31 - 1: log of a negative, NaN, reaches V.
    q, k, v = _heads(x)
    scale = torch.log((torch.arange(x.shape[1], dtype=torch.int32) + (2**31 - 18)).float() + 1)
    return F.scaled_dot_product_attention(q, k, v * scale[:, None], is_causal=True)


def _int32_positions_wrapped_into_a_table(x: torch.Tensor) -> torch.Tensor:
    # arange(T) after two wraps, though the offsets sum to -2**32: a bucket of 32 reads row 31 of 20.
    return x + TABLE20[torch.arange(x.shape[0], dtype=torch.int32) - (2**31 - 1) - (2**31 - 1) - 2]


@pytest.mark.parametrize("fn, lengths", [(_positions_rounded_in_float32, (3, 5, 11)),
                                         (_float_positions_cast_to_int, (3, 5, 11)),
                                         (_int32_positions_wrapping_negative, (17, 18)),
                                         (_int32_positions_wrapped_into_a_table, (17, 18))])
def test_positions_a_dtype_cannot_hold_exactly_are_none(replay_on_cpu, fn, lengths) -> None:
    """A position is a tensor equal to its token index plus a constant, in a replay's padded rows
    too; float32 rounds past 2**24 and int32 wraps past 2**31, so a position with such a
    constant is not one (found by a second reader: each was captured at buckets, and masks,
    signs and table bounds built on it were wrong in a replay: real queries saw padded keys,
    NaN reached V, a lookup read past its table)."""
    make = _tokens if fn is not _int32_positions_wrapped_into_a_table else _rows
    report = _run(fn, make, lengths=lengths)
    (note,) = _cuda_graphs_notes(report)
    assert note.startswith("exact token counts only"), note


def _router_over_a_float_mask(ids: torch.Tensor, fill: str = "masked_fill") -> torch.Tensor:
    # `ids.float() > 0.5` is True at real ids (>= 1) and False at padded ones (0), which the proof
    # cannot see through the float: every padded row is filled with -inf (by `masked_fill`, or
    # `where` keeping the scores), its softmax is NaN, and V carries it into real rows.
    x = EMBED10[ids]
    q, k, v = _heads(x[None])
    keep, scores = (ids.float() > 0.5)[:, None], x @ ROUTER.T
    if fill == "masked_fill":
        probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    else:
        probs = torch.where(keep, scores, float("-inf")).softmax(-1)
    return F.scaled_dot_product_attention(q, k, v * probs[:, :1], is_causal=True)


def _router_masked_below_its_largest(x: torch.Tensor, shift: float | None = None) -> torch.Tensor:
    # PhiMoE's sparse mixer: scores far below the row's largest (then the second largest) are
    # masked with -inf before a softmax; the output feeds an attention's V.
    scores = x[0] @ ROUTER.T
    largest, first = scores.max(dim=-1, keepdim=True)
    # (With a shift, the fill is of other values than those whose largest the mask keeps.)
    filled = scores if shift is None else scores + shift
    gates = filled.masked_fill((largest - scores) / scores.abs().clamp(min=largest) > 0.02, float("-inf"))
    rest = torch.scatter(scores, -1, first, float("-inf"))
    second, _ = rest.max(dim=-1, keepdim=True)
    gates2 = rest.masked_fill((second - scores) / scores.abs().clamp(min=second) > 0.02, float("-inf"))
    weights = gates.softmax(-1)[:, :1] + gates2.softmax(-1)[:, 1:2]
    q, k, v = _heads(x)
    return F.scaled_dot_product_attention(q, k, v * weights, is_causal=True)


def test_an_infinite_fill_under_a_mask_unknown_at_padded_rows_is_not_replayed(replay_on_cpu) -> None:
    """A -inf fill under a mask the proof knows nothing of at padded rows may cover a whole
    padded row where it covers no real one (found by a second reader: captured, the replay's
    real rows were NaN). A mask that keeps each row's largest score, as PhiMoE's router's
    (`_keeps_each_largest`), still is; not when the fill is of other values (`scores + 1`)."""
    for fill in ("masked_fill", "where"):
        torch._dynamo.reset()
        report = _run(lambda ids: _router_over_a_float_mask(ids, fill), lambda t: (torch.randint(1, 10, (t,)),))
        (note,) = _cuda_graphs_notes(report)
        assert note.startswith("exact token counts only") and f"(from {fill})" in note, note
    torch._dynamo.reset()
    report = _run(_router_masked_below_its_largest, _tokens)
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    torch._dynamo.reset()
    report = _run(lambda x: _router_masked_below_its_largest(x, shift=1.0), _tokens)
    (note,) = _cuda_graphs_notes(report)
    assert note.startswith("exact token counts only") and "(from masked_fill)" in note, note


def _randomly_rotated(x: torch.Tensor) -> torch.Tensor:
    # Reformer's LSH hashing: a random rotation drawn in the step (seeded by the caller).
    return x @ torch.randn(H, H)


def test_a_step_drawing_random_numbers_is_never_replayed(replay_on_cpu) -> None:
    """A capture draws the step's random numbers too, and each replay draws them again from the
    generator as it then stands: seeded alike, the call and eager would draw other numbers
    (found by the padded-replay sweep: Reformer's hashing, seeded at each call, hashed with other
    rotations at a new bucket). Such a step runs uncaptured, equal to eager."""
    report = tileflow.Report()
    compiled = torch.compile(_randomly_rotated, backend=tileflow.TileflowBackend(
        {"cuda_graphs": True, "max_tokens": 32}, report=report))
    for tokens in (3, 5, 11):
        x = torch.randn(1, tokens, H)
        torch._dynamo.mark_dynamic(x, 1)
        torch.manual_seed(tokens)
        got = compiled(x)
        torch.manual_seed(tokens)
        torch.testing.assert_close(got, _randomly_rotated(x), rtol=1e-5, atol=1e-5)
    _assert_not_captured(report, "randn: aten::randn draws random numbers")


# A replay pads integer inputs with 0, a row of every table; arithmetic can move it out of one,
# and on a GPU an out-of-range lookup is a device-side assert no later call recovers from.
EMBED10 = torch.randn(10, H)
POSITIONS8 = torch.randn(8, H)


def _ids(tokens: int) -> tuple[torch.Tensor]:
    return (torch.randint(1, 10, (1, tokens)),)


def _ids_and_divisors(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, 10, (1, tokens)), torch.randint(1, 3, (1, tokens))


def _ids_and_mask(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, 10, (1, tokens)), torch.ones(1, tokens, dtype=torch.int64)


def _looked_up_shifted(ids: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids - 1, EMBED10) @ W  # padded rows: row -1


def _looked_up_divided(ids: torch.Tensor, divisors: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids // divisors, EMBED10) @ W  # padded rows: 0 // 0 (garbage on a GPU)


def _gathered_shifted(ids: torch.Tensor) -> torch.Tensor:
    logits = F.embedding(ids, EMBED10) @ EMBED10.t()  # [1, T, 10]
    return torch.gather(logits, -1, (ids - 1)[..., None]) * 2


def _positions_counting_padded_rows(ids: torch.Tensor) -> torch.Tensor:
    # RoBERTa-style positions from ids != 1: padded ids (0) count on, up to the bucket (past 8 rows).
    positions = torch.cumsum(ids.ne(1).long(), dim=1) + 1
    return (F.embedding(ids, EMBED10) + F.embedding(positions.clamp(max=7), POSITIONS8) * 0
            + F.embedding(positions, POSITIONS8)) @ W


def _ids_from_1_and_mask(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(1, 10, (1, tokens)), torch.ones(1, tokens, dtype=torch.int64)


def _looked_up_past_the_table_where_masked(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.embedding(torch.where(mask > 0, ids, 10), EMBED10) @ W  # padded rows: row 10 of 10


def _looked_up_masked_and_shifted(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids * mask - 1, EMBED10) @ W  # padded rows: 0 * 0 - 1, row -1


ROWS7 = torch.randn(7, H)


def _rows_without_the_last_feature(tokens: int) -> tuple[torch.Tensor]:
    x = torch.randn(1, tokens, 8)
    x[..., 7] = -100.0  # real rows never pick feature 7; padded rows may
    return (x,)


ROWS4 = torch.randn(4, H)


def _rows_with_four_low_features(tokens: int) -> tuple[torch.Tensor]:
    x = torch.randn(1, tokens, 8)
    x[..., 4:] = -100.0  # real rows pick among the first 4 features; padded rows may not
    return (x,)


def _looked_up_at_two_top_k_choices(x: torch.Tensor) -> torch.Tensor:
    # Ids of 4 and of 8 features side by side (PhiMoE's two choices): below 8, not 4.
    ids = torch.cat([x[..., :4].topk(1, dim=-1).indices, x.topk(1, dim=-1).indices], dim=-1)
    return ROWS4[ids].sum(-2) @ W


def _looked_up_at_top_k_of_more_features(x: torch.Tensor) -> torch.Tensor:
    return ROWS7[x.topk(2, dim=-1).indices].sum(-2) @ W  # top-k of 8 features in a table of 7 rows


@pytest.mark.parametrize("fn, make_inputs", [(_looked_up_shifted, _ids), (_looked_up_divided, _ids_and_divisors),
                                             (_gathered_shifted, _ids), (_positions_counting_padded_rows, _ids),
                                             (_looked_up_past_the_table_where_masked, _ids_and_mask),
                                             (_looked_up_masked_and_shifted, _ids_from_1_and_mask),
                                             (_looked_up_at_top_k_of_more_features, _rows_without_the_last_feature),
                                             (_looked_up_at_two_top_k_choices, _rows_with_four_low_features)])
def test_lookups_whose_padded_indices_leave_the_table_are_refused(replay_on_cpu, fn, make_inputs) -> None:
    _assert_not_padded(_run(fn, make_inputs, lengths=(3, 5)), "padded rows may")


def _equal_ids(tokens: int) -> tuple[torch.Tensor]:
    return (torch.full((1, tokens), 3),)


def _looked_up_at_id_differences(ids: torch.Tensor) -> torch.Tensor:
    # ids[q] - ids[k] over [1, T, T]: 0 for equal ids, and 0 - 0 where both are padded, but
    # 0 - 3 (row -3) where a padded query meets a real key.
    return F.embedding(ids[:, :, None] - ids[:, None, :], EMBED10)[:, :, 0] @ W


def _looked_up_at_id_products(ids: torch.Tensor) -> torch.Tensor:
    # ids[q] * (ids[k] - 1): a product with a padded 0 where the query is padded, but 3 * (0 - 1)
    # (row -3) where a real query meets a padded key.
    return F.embedding(ids[:, :, None] * (ids[:, None, :] - 1), EMBED10)[:, :, 0] @ W


def _looked_up_at_expanded_differences(ids: torch.Tensor) -> torch.Tensor:
    # e[q, k] = ids[q]: its padded keys hold the real query's id, not the pad value.
    e = ids[:, :, None].expand(-1, -1, ids.shape[1])
    return F.embedding(e - e.transpose(1, 2), EMBED10)[:, :, 0] @ W


@pytest.mark.parametrize("fn", [_looked_up_at_id_differences, _looked_up_at_id_products,
                                _looked_up_at_expanded_differences])
def test_padded_values_along_two_token_dims_are_not_the_corners(replay_on_cpu, fn) -> None:
    """An integer value with two token dims (a broadcast of `[T, 1]` against `[1, T]`, an expand)
    holds at an element padded along one dim and real along the other a value of neither the
    padded nor the real run: the walk evaluated the op at its operands' padded values alone and
    captured the step at buckets, whose replay looks row -3 up (on the CPU stand-in the capture
    fails with an IndexError and the step runs uncaptured; on CUDA a device-side assert)."""
    _assert_not_padded(_run(fn, _equal_ids, lengths=(3, 5)), "padded rows may")


def _looked_up_in_range(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Clamped, wrapped and masked ids; OPT-style positions from the mask: (cumsum * mask) - 1 + 2 is
    # 1 at padded rows, whatever the running count holds there.
    positions = torch.cumsum(mask, dim=1) * mask - 1 + 2
    # transformers' generate: cumsum(mask) - 1, filled with 1 where the mask is 0 (padded rows too).
    filled = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    rows = F.embedding((ids - 1).clamp(min=0), EMBED10) + EMBED10[ids - 1] + F.embedding(ids % 10, EMBED10)
    return (rows + F.embedding(torch.where(ids > 20, 0, ids), EMBED10) + POSITIONS8[positions.clamp(max=7)]
            + F.embedding(filled.clamp(max=7), POSITIONS8)) @ W


def test_lookups_whose_padded_indices_stay_in_the_table_are_captured(replay_on_cpu) -> None:
    report = _run(_looked_up_in_range, _ids_and_mask, lengths=(3, 5, 11))
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 1


W10 = torch.randn(H, 10)


def _gathered_by_argsort(x: torch.Tensor) -> torch.Tensor:
    logits = x @ W10
    return torch.gather(logits, -1, torch.argsort(logits, -1)) @ W10.t()


def _top_p_filtered(x: torch.Tensor) -> torch.Tensor:
    # transformers' top-p warper: the sort's indices scatter the removal mask back.
    logits = x @ W10
    ordered, index = torch.sort(logits, -1, descending=True)
    remove = ordered.softmax(-1).cumsum(-1) > 0.9
    # (-100 lies below any logit here, std 4; the -1e4 of transformers makes terms of 1e4 that an
    # output sums and nearly cancels, 7e-4 off in fp32 on torch 2.14 with a seeded draw.)
    return logits.masked_fill(remove.scatter(-1, index, remove), -100.0) @ W10.t()


@pytest.mark.parametrize("fn", [_gathered_by_argsort, _top_p_filtered])
def test_gathers_at_a_sorts_indices_over_features_are_captured(replay_on_cpu, fn) -> None:
    """A sort's indices over a fixed dim are a permutation of it, padded rows too: refused by the
    lookup rule until sorts gave their indices a range. Seeded, and the top-p fill is -100: with
    transformers' -1e4 a draw of the global generator (whatever the worker ran before) made terms
    of 1e4 that nearly cancelled (2.3 left), whose fp32 rounding (about 1e-3) a summation order
    other than eager's moved past the tolerance."""
    torch.manual_seed(0)
    report = _run(fn, _tokens, lengths=(3, 5, 11))
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 1


EXPERT_BIAS = torch.randn(EXPERTS, H)


def _expert_bias_at_clamped_ids(x: torch.Tensor) -> torch.Tensor:
    # transformers 5.17's grouped experts clamp the top-k ids to E - 1 before reading each row's
    # expert bias: top-k ids of E experts are rows of the E-row table, clamped or not.
    ids = torch.topk(x @ ROUTER.T + ROUTER_BIAS, 2).indices.clamp(max=EXPERTS - 1)
    return (x + EXPERT_BIAS[ids[..., 0]]) @ W


def test_clamped_top_k_ids_stay_in_their_table(replay_on_cpu) -> None:
    """Top-k ids clamped below their range (gpt-oss on transformers 5.17) were no longer known to
    name a row of the experts' table, so its step ran uncaptured."""
    report = _run(_expert_bias_at_clamped_ids, _tokens, lengths=(3, 5, 11))
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 1


TABLE300 = torch.randn(300, H)


def _uint8_shifted(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return table[(ids.to(torch.uint8) - torch.ones((), dtype=torch.long)).long()] @ W


def test_padded_values_follow_the_ops_own_dtypes() -> None:
    """uint8 ids minus an int64 number stay uint8 and wrap (0 - 1 = 255): evaluated on 0-d
    operands the walk saw -1, a valid wrapped index of a 10-row table, and captured a step whose
    padded rows read row 255; a 300-row table, where 255 is a row, was refused."""
    from torch._functorch.aot_autograd import aot_module_simplified

    from tileflow.padding_safety import check_padding
    from tileflow.passes.nanobatch import token_symbol

    for table, safe in ((EMBED10, False), (TABLE300, True)):
        graphs: list = []

        def keep(gm, example_inputs):
            graphs.append(gm)
            return gm

        torch._dynamo.reset()
        ids = torch.randint(1, 10, (1, 5))
        torch._dynamo.mark_dynamic(ids, 1)
        torch.compile(lambda i: _uint8_shifted(i, table),
                      backend=lambda gm, ex: aot_module_simplified(gm, ex, fw_compiler=keep))(ids)
        (gm,) = graphs
        check = check_padding(gm, token_symbol(gm)[0])
        assert (check.hazard is None) == safe, check.hazard


def _rows_checked_for_restarts(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    # An in-graph check over an input: every position follows the one before it (a padded
    # position, 0, does not).
    torch._assert_async((positions[1:] == positions[:-1] + 1).all(), "the positions restart")
    return (x + positions[:, None]) @ W


def _assert_checked_before_replays(report: tileflow.Report, replay_on_cpu: type[ReplayOnCpu]) -> None:
    """The step's one graph is replayed at token buckets (one capture for `_run`'s three calls, all
    below 16), its assert run on each call's own rows before the replay."""
    (graph,) = report.graphs
    assert graph.extra["cuda_graphs"] == "whole step, token buckets [16, 32]"
    checks = graph.extra["cuda_graphs_checks"]
    assert checks.count("_assert_async") == 1 and "run on each call's own rows before its replay" in checks
    assert replay_on_cpu.captures == 1 and replay_on_cpu.replays == 3


def test_an_assert_over_padded_rows_runs_on_the_calls_rows(replay_on_cpu) -> None:
    """An assert reaches no output, so the walk passed it: a replay runs it over the padded rows
    too, where it fails though the call's rows pass (on CUDA a device-side assert at replay; the
    CPU stand-in failed the capture). Over position ids (an input, padded with 0), it leaves the
    replayed graph and runs on each call's own rows before the replay: captured at buckets,
    equal to eager, and a call with restarting positions still raises. (It was captured at
    exact token counts only.)"""
    def rows_and_positions(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(tokens, H), torch.arange(tokens) + 3

    _assert_checked_before_replays(_run(_rows_checked_for_restarts, rows_and_positions), replay_on_cpu)
    compiled = torch.compile(_rows_checked_for_restarts,
                             backend=tileflow.TileflowBackend({"cuda_graphs": True, "max_tokens": 32}))
    x, positions = torch.randn(5, H), torch.tensor([0, 1, 2, 0, 1])
    for arg in (x, positions):
        torch._dynamo.mark_dynamic(arg, 0)
    replays = replay_on_cpu.replays
    with pytest.raises(RuntimeError, match="the positions restart"):
        compiled(x, positions)
    assert replay_on_cpu.replays == replays  # raised before the replay
    # A first call that fails: its graph is split at its compile, and the check still raises.
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="the positions restart"):
        compiled(x, positions)
    assert replay_on_cpu.replays == replays


def test_a_nano_batched_step_keeps_its_asserts(replay_on_cpu) -> None:
    """A nano-batch plan covers every node of its graph, asserts too: they stay in the graph (at
    exact token counts), which is split and replayed as planned, and still raises."""
    def rows_and_positions(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(tokens, H), torch.arange(tokens) + 3

    options = {"nano_batches": 2, "passes": ["canonicalize", "attention", "gemm_padding", "nanobatch"]}
    report = _run(_rows_checked_for_restarts, rows_and_positions, **options)
    assert "nano_batch" in report.graphs[0].extra and "cuda_graphs_checks" not in report.graphs[0].extra
    _assert_not_padded(report, "an assert over values")
    compiled = torch.compile(_rows_checked_for_restarts, backend=tileflow.TileflowBackend(
        {"cuda_graphs": True, "max_tokens": 32, **options}))
    with pytest.raises(RuntimeError, match="the positions restart"):
        compiled(torch.randn(5, H), torch.tensor([0, 1, 2, 0, 1]))


def test_the_asserts_run_before_a_replay_are_written_to_the_debug_dir(replay_on_cpu, tmp_path) -> None:
    """With `debug_dir`, the module of asserts split off the graph is written beside the graph's
    dump (`cuda_graphs_checks.py`), and the dump no longer holds them."""
    compiled = torch.compile(_rows_checked_for_restarts, backend=tileflow.TileflowBackend(
        {"cuda_graphs": True, "max_tokens": 32, "debug_dir": str(tmp_path)}))
    x, positions = torch.randn(5, H), torch.arange(5) + 3
    for arg in (x, positions):
        torch._dynamo.mark_dynamic(arg, 0)
    compiled(x, positions)
    (graph_dir,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    assert "_assert_async" in (graph_dir / "cuda_graphs_checks.py").read_text()
    assert "_assert_async" not in (graph_dir / "output.json").read_text()


def _rows_checked_after_a_gemm(x: torch.Tensor) -> torch.Tensor:
    # An assert over a GEMM's rows: running it again on the call's rows would repeat the GEMM.
    y = x @ W
    torch._assert_async(y.isfinite().all(), "not finite")
    return y + 1


def _rows_checked_after_a_product_with_a_vector(x: torch.Tensor) -> torch.Tensor:
    torch._assert_async((x @ W[0]).isfinite().all(), "not finite")  # (`mv`)
    return x @ W


def _rows_checked_by_their_distances(x: torch.Tensor) -> torch.Tensor:
    torch._assert_async((torch.cdist(x, x) < 1e6).all(), "too far apart")  # T^2 * H work
    return x @ W


def _rows_checked_with_noise(x: torch.Tensor) -> torch.Tensor:
    # Run apart, the check would draw other numbers than the graph's.
    noisy = x + torch.rand_like(x)
    torch._assert_async((noisy > -100).all(), "too low")
    return noisy @ W


def _rows_checked_after_many_ops(x: torch.Tensor) -> torch.Tensor:
    y = x
    for _ in range(70):  # more than `_MOST_CHECK_OPS`
        y = y * 0.5 + 1
    torch._assert_async((y < 1e6).all(), "too large")
    return x @ W


def _rows_checked_by_their_spectrum(x: torch.Tensor) -> torch.Tensor:
    torch._assert_async((torch.fft.rfft(x, dim=-1).abs() < 1e6).all(), "too large")
    return x @ W


def _rows_checked_by_their_singular_values(x: torch.Tensor) -> torch.Tensor:
    torch._assert_async(torch.linalg.svdvals(x).isfinite().all(), "not finite")
    return x @ W


def _rows_checked_by_their_norm(x: torch.Tensor) -> torch.Tensor:
    # Over every row: padded rows would change it.
    torch._assert_async(x.norm() < 1e6, "too large")
    return x @ W


@pytest.mark.parametrize("fn", [_rows_checked_after_a_gemm, _rows_checked_after_a_product_with_a_vector,
                                _rows_checked_by_their_distances, _rows_checked_after_many_ops,
                                _rows_checked_by_their_spectrum, _rows_checked_by_their_singular_values])
def test_an_assert_over_heavy_ops_stays_in_the_graph(replay_on_cpu, fn) -> None:
    """An assert that reads a GEMM (here left as ATen's `mm`: only the first passes run), a
    matrix-vector product, distances, an FFT or a decomposition (ops of `_HEAVY_OPS` and
    `_HEAVY_PREFIXES`), or more than `_MOST_CHECK_OPS` ops, stays in the graph, which is then
    captured at exact token counts only: running it apart would do that work twice."""
    _assert_not_padded(_run(fn, _rows, passes=["canonicalize"]), "an assert over values")


def test_an_assert_over_a_norm_is_split_off(replay_on_cpu) -> None:
    """A norm (`linalg_vector_norm`) is a reduction, light, though its name is linear algebra's."""
    _assert_checked_before_replays(_run(_rows_checked_by_their_norm, _rows), replay_on_cpu)


def test_an_assert_over_random_numbers_is_never_replayed(replay_on_cpu) -> None:
    """Run apart, an assert over random numbers would check other draws than the graph's; and a
    step drawing random numbers is never replayed at all (`_random_draw`)."""
    report = tileflow.Report()  # (random outputs: not compared with eager's, unlike `_run`)
    compiled = torch.compile(_rows_checked_with_noise,
                             backend=tileflow.TileflowBackend({"cuda_graphs": True, "max_tokens": 32}, report=report))
    for tokens in (3, 5, 11):
        x = torch.randn(tokens, H)
        torch._dynamo.mark_dynamic(x, 0)
        compiled(x)
    _assert_not_captured(report, "rand_like: aten::rand_like draws random numbers")


def _rows_checked_past_a_table(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    # A lookup past the table's end at every token count (`max_bucket` 0): no bucket is left,
    # and eager raises at every call.
    torch._assert_async((EMBED10[torch.arange(x.shape[0]) + 10].sum(-1) < 1e9).all(), "too large")
    return (x + positions[:, None]) @ W


def test_an_assert_is_split_off_only_for_a_replayed_step(replay_on_cpu) -> None:
    """With no bucket left to replay at, the step runs uncaptured with its asserts in the graph.
    (They used to be split off anyway, and the step ran with no check at all: it returned where
    eager raised.)"""
    report = tileflow.Report()
    compiled = torch.compile(_rows_checked_past_a_table,
                             backend=tileflow.TileflowBackend({"cuda_graphs": True, "max_tokens": 32}, report=report))
    x, positions = torch.randn(5, H), torch.arange(5)
    for arg in (x, positions):
        torch._dynamo.mark_dynamic(arg, 0)
    with pytest.raises(IndexError):
        _rows_checked_past_a_table(x, positions)
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        compiled(x, positions)
    (graph,) = report.graphs
    assert "cuda_graphs_checks" not in graph.extra
    assert replay_on_cpu.captures == replay_on_cpu.replays == 0


def _rows_checked_for_restarts_of_own_positions(x: torch.Tensor) -> torch.Tensor:
    # The check over positions the step computes itself (transformers' `cache_position` when the
    # caller passes no position ids): a replay's arange runs over the bucket's rows too.
    return _rows_checked_for_restarts(x, torch.arange(x.shape[0]) + 3)


def _rows_checked_against_a_count(x: torch.Tensor) -> torch.Tensor:
    # Positions of their own again, but a check the real rows pass (fewer than 12 here) and
    # a replay's padded rows at bucket 16 fail.
    positions = torch.arange(x.shape[0])
    torch._assert_async((positions < 12).all(), "too many positions")
    return (x + positions[:, None]) @ W


def test_an_assert_over_positions_computed_in_the_step_is_replayed_padded(replay_on_cpu) -> None:
    """Positions computed in the step (`arange`) follow one another in a replay's padded rows
    too, so the check that none restarts (`pos[1:] == pos[:-1] + 1`, then `all`) holds at every
    row: the walk knows the comparison's value everywhere (True) and the step is captured at
    buckets. (No call can pack sequences: the positions are not an input.) A check of the same
    positions that padded rows fail (`pos < 12`) runs on each call's rows before its replay
    instead, as one over positions passed in (`test_an_assert_over_padded_rows_runs_on_the_calls_rows`)."""
    report = _run(_rows_checked_for_restarts_of_own_positions, _rows)
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert "cuda_graphs_checks" not in report.graphs[0].extra
    assert replay_on_cpu.captures == 1 and replay_on_cpu.replays == 3

    torch._dynamo.reset()
    ReplayOnCpu.captures = ReplayOnCpu.replays = 0
    _assert_checked_before_replays(_run(_rows_checked_against_a_count, _rows), replay_on_cpu)


def _rows_checked_by_differences_of_own_positions(x: torch.Tensor) -> torch.Tensor:
    # The same check by differences: of two positions (`pos[1:] - pos[:-1]`), and torch.diff's
    # with a row before the first (`prepend=pos[:1] - 1`).
    positions = torch.arange(x.shape[0]) + 3
    torch._assert_async(((positions[1:] - positions[:-1]) == 1).all(), "the positions restart")
    torch._assert_async((torch.diff(positions, prepend=positions[:1] - 1) == 1).all(), "the positions restart")
    return (x + positions[:, None]) @ W


def test_an_assert_over_differences_of_positions_is_known(replay_on_cpu) -> None:
    """A difference of two positions on one token dim is a fill (1 here), in a replay's padded
    rows too, so a check over it holds at every row: captured at buckets, no check split off."""
    report = _run(_rows_checked_by_differences_of_own_positions, _rows)
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert "cuda_graphs_checks" not in report.graphs[0].extra
    assert replay_on_cpu.captures == 1 and replay_on_cpu.replays == 3


def _previous_rows(x: torch.Tensor) -> torch.Tensor:
    # Each token after the first reads the one before it (the packed check's `kv = q - 1`).
    return torch.cat([x[:1], x[torch.arange(1, x.shape[0]) - 1]]) @ W


def _previous_rows_wrapping(x: torch.Tensor) -> torch.Tensor:
    # Token 0 reads row -1: the last row, a padded one in a replay.
    return x[torch.arange(x.shape[0]) - 1] @ W


def test_rows_read_at_an_earlier_token_are_captured(replay_on_cpu) -> None:
    """An index at positions of an earlier token reads real rows for real ones (and stays inside
    the rows in a replay); one that wraps to the end reads a padded row."""
    report = _run(_previous_rows, _rows)
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    torch._dynamo.reset()
    ReplayOnCpu.captures = ReplayOnCpu.replays = 0
    _assert_not_padded(_run(_previous_rows_wrapping, _rows), "may point at padded rows")


def test_a_tileflow_causal_model_without_position_ids_is_replayed_padded(replay_on_cpu) -> None:
    """A compiled plain-causal model on "tileflow_causal" without a cache checks in its graph that
    no token sees the one after it, and finds its packed sequences' key starts (`_traced_rule`).
    Called without position ids, the positions are its own `arange`: captured at buckets, equal
    to eager across them. With position ids passed in, the check compares them, unknown at padded
    rows: it runs on each call's own rows before the replay (the step was captured at exact
    token counts only), and the step is replayed at buckets too, packed sequences kept apart as
    SDPA's packed mask keeps them."""
    tileflow.register_transformers()
    model = one_layer(build("llama"))
    model.config._attn_implementation = "tileflow_causal"

    def logits(ids: torch.Tensor) -> torch.Tensor:
        return model(ids, use_cache=False).logits

    report = _run(logits, lambda t: (torch.randint(0, VOCAB, (1, t)),), lengths=(5, 20))
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 2

    report = tileflow.Report()
    with_positions = torch.compile(lambda ids, pos: model(ids, position_ids=pos, use_cache=False).logits,
                                   backend=tileflow.TileflowBackend({"cuda_graphs": True, "max_tokens": 32}, report=report))
    captures, replays = replay_on_cpu.captures, replay_on_cpu.replays
    for packed in ([0, 1, 2, 0, 1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13], [0, 1, 2, 3, 0, 1, 0, 0, 1, 2, 3]):
        ids, pos = torch.randint(0, VOCAB, (1, len(packed))), torch.tensor([packed])
        for arg in (ids, pos):
            torch._dynamo.mark_dynamic(arg, 1)
        model.config._attn_implementation = "sdpa"
        with torch.no_grad():
            want = model(ids, position_ids=pos, use_cache=False).logits
        model.config._attn_implementation = "tileflow_causal"
        with torch.no_grad():
            torch.testing.assert_close(with_positions(ids, pos), want, rtol=1e-5, atol=1e-5)
    assert (replay_on_cpu.captures, replay_on_cpu.replays) == (captures + 1, replays + 3)  # all at bucket 16
    (graph,) = report.graphs
    assert graph.extra["cuda_graphs"] == "whole step, token buckets [16, 32]"
    assert "run on each call's own rows before its replay" in graph.extra["cuda_graphs_checks"]


def _rows_of_a_causal_overlay(x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    # tileflow_causal's check over a mask function with an or-overlay (bidirectional image
    # tokens, an input), as a compiled model calls it.
    from transformers.masking_utils import causal_mask_function, or_masks

    from tileflow.transformers_integration import _traced_rule

    overlay = or_masks(causal_mask_function, lambda b, h, q, kv: image[b, q] & image[b, kv])
    _traced_rule(overlay, image.shape[0], image.shape[1], None, image.device)
    return (x + image[0, :, None]) @ W


def test_a_replayed_step_still_refuses_an_overlay_that_shows_later_tokens(replay_on_cpu) -> None:
    """tileflow_causal's check that no token sees the one after it, over an input's values, runs on
    each call's rows before the replay: calls without the overlay at work are replayed at a
    bucket, and one whose image tokens see each other still raises, before any replay."""
    report = _run(_rows_of_a_causal_overlay, lambda t: (torch.randn(t, H), torch.zeros(1, t, dtype=torch.bool)))
    _assert_checked_before_replays(report, replay_on_cpu)
    compiled = torch.compile(_rows_of_a_causal_overlay,
                             backend=tileflow.TileflowBackend({"cuda_graphs": True, "max_tokens": 32}))
    image = torch.zeros(1, 9, dtype=torch.bool)
    image[0, 3:6] = True
    for arg in (x := torch.randn(9, H), image):
        torch._dynamo.mark_dynamic(arg, list(arg.shape).index(9))
    replays = replay_on_cpu.replays
    with pytest.raises(RuntimeError, match="lets a token see the one after it"):
        compiled(x, image)
    assert replay_on_cpu.replays == replays


@pytest.mark.parametrize("dtype, start", [(torch.float32, 2**24 - 4), (torch.int32, 2**31 - 6)])
def test_positions_that_round_or_wrap_inside_a_bucket_are_not_known(replay_on_cpu, dtype, start) -> None:
    """Positions near their dtype's limit round (float32 past 2**24) or wrap (int32) in a bucket's
    padded rows, so `p[1:] > p[:-1]` is not True there: the step must not be replayed padded (it
    was, and came back zero)."""
    def gated(x: torch.Tensor) -> torch.Tensor:
        p = torch.arange(x.shape[0], dtype=dtype) + start
        return (x @ W) * (p[1:] > p[:-1]).all()

    _assert_not_padded(_run(gated, _rows))


def test_integer_divisions_of_known_values_are_not_evaluated(replay_on_cpu) -> None:
    """The walk leaves integer divisions unknown (the dtype's minimum over -1 traps on a CPU,
    which no except catches), floor divisions among them: a second set of divisions, the domain
    checks', had the same name and replaced the first, so `//` of known values was evaluated."""
    def gated(x: torch.Tensor) -> torch.Tensor:
        p = torch.arange(x.shape[0])
        return (x @ W) * ((p[1:] - p[:-1]) // 1 == 1).all()

    _assert_not_padded(_run(gated, _rows), "all is not known")


def _causal_over_rounded_positions(x: torch.Tensor) -> torch.Tensor:
    # float32 holds no integer past 2**24 exactly: from 2**30 on, 128 neighbouring positions round
    # to one value, so every key compares <= every query, padded keys too.
    pos = torch.arange(x.shape[1], dtype=torch.float32) + 2**30
    return F.scaled_dot_product_attention(*_heads(x), attn_mask=pos[None, :] <= pos[:, None])


def test_a_mask_of_positions_that_round_inside_a_bucket_is_not_taken_as_causal(replay_on_cpu) -> None:
    """A comparison of positions builds a causal mask only where they are exact at every row a
    replay runs: float32 positions past 2**24 round (as bfloat16's past 256), and the mask shows
    real queries the padded keys (the replayed step differed from eager at every token count)."""
    _assert_not_padded(_run(_causal_over_rounded_positions, _tokens), "key ranges of a mask")


def _left_padded(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones(1, tokens, dtype=torch.long)
    mask[0, :2] = 0
    return torch.randn(1, tokens, H), mask


def _causal_and_a_padding_term(x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    # The rule of positions `&` the padding term, the attention mask over the keys.
    pos = torch.arange(x.shape[1])
    keys = attention_mask.bool()[:, None, None, :]
    return F.scaled_dot_product_attention(*_heads(x), attn_mask=(pos[None, :] <= pos[:, None])[None, None] & keys)


def test_a_padding_term_read_at_each_key_is_replayed_padded(replay_on_cpu) -> None:
    """A causal mask `&` an attention mask over the keys (transformers' padding term) becomes
    the kernel's causal rule plus a key mask whose ranges the attention reads: the padded keys
    hold the attention mask's pad value, 0, so False, and each real row's ranges are its own. Such a
    step was captured only at exact token counts (every model called with an attention mask)."""
    report = _run(_causal_and_a_padding_term, _left_padded, lengths=(5, 12, 20))
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 2


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_models_called_with_an_attention_mask_are_captured(replay_on_cpu, arch: str) -> None:
    """transformers' causal models called with a (left-padded) attention mask, as a serving step
    calls them: replayed at the buckets, equal to eager."""
    torch.manual_seed(0)
    model = one_layer(build(arch))

    def make(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.ones(1, tokens, dtype=torch.long)
        mask[0, :2] = 0
        return torch.randint(0, VOCAB, (1, tokens)), mask

    def logits(ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return model(ids, attention_mask=attention_mask, use_cache=False).logits

    report = _run(logits, make, lengths=(5, 12, 20))
    assert _cuda_graphs_notes(report) == ["whole step, token buckets [16, 32]"]
    assert replay_on_cpu.captures == 2


def _uniform(tokens: int) -> tuple[torch.Tensor]:
    # Real rows inside every op's domain below, (0.1, 0.9); the padded rows hold noise (`replay_on_cpu`).
    return (torch.rand(1, tokens, H) * 0.8 + 0.1,)


def _values_of(op: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Causal attention whose values are `op` of the tokens: finite at real rows, inf or NaN at
    padded ones, which the kernel's zero weights turn into NaN in real rows."""
    def step(x: torch.Tensor) -> torch.Tensor:
        q, k, _ = _heads(x)
        return F.scaled_dot_product_attention(q, k, op(x.view(1, -1, 2, H // 2).transpose(1, 2)), is_causal=True)

    return step


@pytest.mark.parametrize("op", [
    torch.special.ndtri, torch.special.bessel_y0, torch.special.modified_bessel_k0, torch.special.entr,
    lambda u: torch.special.gammainc(u, u), lambda u: torch.xlogy(2.0, u), lambda u: torch.special.xlog1py(u, u),
    lambda u: torch.sqrt(F.softplus(u, beta=-1.0) + 1.0),  # negative for a negative beta
], ids=["ndtri", "bessel_y0", "modified_bessel_k0", "entr", "igamma", "xlogy_of_a_number", "xlog1py",
        "softplus_of_a_negative_beta"])
def test_values_outside_an_ops_domain_are_not_replayed_padded(replay_on_cpu, op) -> None:
    _assert_not_padded(_run(_values_of(op), _uniform), "inf or NaN")


def _tokens_and_ids(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(1, tokens, H), torch.randint(1, 5, (tokens,))


@pytest.mark.parametrize("op", [lambda ids: 3.0 % ids, lambda ids: torch.addcdiv(ids, ids, ids)],
                         ids=["number_modulo_ids", "addcdiv"])
def test_divisions_by_padded_ids_are_not_replayed_padded(replay_on_cpu, op) -> None:
    """Ids pad with 0: `3 % ids` and `addcdiv`'s quotient are NaN or inf at padded rows."""
    def step(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        q, k, v = _heads(x)
        return F.scaled_dot_product_attention(q, k, v * op(ids.float()).view(1, 1, -1, 1), is_causal=True)

    _assert_not_padded(_run(step, _tokens_and_ids), "inf or NaN")


def _softmax_over_kept_features(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # A per-token mask of features (a bool input: False at padded rows) filled with -inf: a padded
    # row keeps nothing, and a softmax over nothing but -inf is NaN.
    q, k, _ = _heads(x)
    v = x.masked_fill(~keep, float("-inf")).softmax(-1).view(1, -1, 2, H // 2).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _tokens_and_kept_features(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.rand(1, tokens, H) > 0.5
    keep[..., 0] = True  # every real row keeps a feature
    return torch.randn(1, tokens, H), keep


def test_infinities_put_into_values_are_not_replayed_padded(replay_on_cpu) -> None:
    _assert_not_padded(_run(_softmax_over_kept_features, _tokens_and_kept_features), "inf or NaN")


LEARNED_QUERY = torch.randn(1, 2, 1, H // 2)


def _learned_query_over_the_tokens(x: torch.Tensor) -> torch.Tensor:
    # `causal` puts the last query at the last key (flash attention's alignment): one fixed query
    # sees every key, a replay's padded ones too.
    _, k, v = _heads(x)
    return x + tileflow.ops.meta_attention(LEARNED_QUERY, k, v, causal=True).reshape(1, 1, H)


def test_causal_attention_of_queries_that_are_not_the_tokens_is_not_replayed_padded(replay_on_cpu) -> None:
    _assert_not_padded(_run(_learned_query_over_the_tokens, _tokens), "queries are not the tokens")


FOUR_ROWS = torch.randn(4, H)


def _previous_id_looked_up(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    # `ids[:-1]`'s row T - 1 is padded (token T's previous id) but holds the real id T - 1, not
    # the pad value: at a replay's row T, `where` takes the branch of padded ids (0) over it, a
    # row past the table (an IndexError here, a device-side assert on a GPU).
    previous = torch.cat([ids[:1], ids[:-1]])
    return x + F.embedding(torch.where(ids == 0, previous * 100, previous), FOUR_ROWS)


def test_a_shifted_slice_does_not_keep_the_pad_value(replay_on_cpu) -> None:
    def make(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(tokens, H), torch.randint(1, 4, (tokens,))

    _assert_not_padded(_run(_previous_id_looked_up, make), "may hold no row")
