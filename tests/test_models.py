"""Real transformers architectures through `torch.compile(backend="tileflow")`, against eager."""

from __future__ import annotations

import pytest
import torch

import tileflow
from models import MODELS, SEQ_LENS, VOCAB, build


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_matches_eager_with_one_graph(name: str) -> None:
    model = build(name)
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend(report=report), dynamic=True)
    with torch.no_grad():
        for seq_len in SEQ_LENS:
            ids = torch.randint(0, VOCAB, (2, seq_len))
            got = compiled(ids, use_cache=False).logits
            want = model(ids, use_cache=False).logits
            assert got.shape == want.shape == (2, seq_len, VOCAB)
            assert (got - want).abs().max().item() <= 1e-4, f"{name} at seq_len={seq_len}"
    # One compile serves every length: the token dimension stayed symbolic.
    assert len(report.graphs) == 1 and report.recompiles == 0
    graph = report.graphs[0]
    assert any(hi is None or hi >= max(SEQ_LENS) for _, hi in graph.symbols.values())
    assert report.rewrites.get("canonical_linear", 0) > 0
    assert report.fallbacks == []


def test_graph_break_each_frame_goes_through_tileflow() -> None:
    model = build("llama")

    def step(ids: torch.Tensor) -> torch.Tensor:
        logits = model(ids, use_cache=False).logits
        torch._dynamo.graph_break()  # a second frame after the break
        return torch.log_softmax(logits @ model.lm_head.weight, dim=-1)

    report = tileflow.Report()
    compiled = torch.compile(step, backend=tileflow.TileflowBackend(report=report), dynamic=True)
    with torch.no_grad():
        for seq_len in (3, 6, 11):
            ids = torch.randint(0, VOCAB, (1, seq_len))
            torch.testing.assert_close(compiled(ids), step(ids), rtol=1e-5, atol=1e-5)
    assert len(report.graphs) >= 2
    assert all(g.passes and g.passes[0].name == "canonicalize" for g in report.graphs)
