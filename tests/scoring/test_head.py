"""Eval scores from the final hidden states (only the scored positions through the LM head, a
chunk at a time) equal the scores from the model's whole logits, the path a model whose forward
cannot stop early still takes."""

import pytest
import torch

from tests.helpers import make_peft
from workbench.modeling.lora import adapter_scale, as_base
from workbench.modeling.tiny import tiny_tokenizer
from workbench.modeling import head
from workbench.scoring import general, tokens
from workbench.scoring.base_cache import BaseCache
from workbench.scoring.scorer import Request, Scorer

TOL = 1e-5


@pytest.fixture
def full_logits(monkeypatch):
    """Switch scoring to the whole-logits path (as for a model `head.unsupported` refuses), with
    a call counter showing the fallback was taken."""
    calls = []

    def refuse(model):
        calls.append(1)
        return "test: whole logits"

    return lambda: (monkeypatch.setattr(head, "unsupported", refuse), calls)[1]


def examples(n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, 259, (12 + 3 * i,), generator=gen).tolist()
        labels = [-100] * (2 + i) + ids[2 + i:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def general_scores(model, tmp_path, chunk):
    """(base side tensors, tuned side points) with SCORE_CHUNK = chunk."""
    tokens.SCORE_CHUNK = chunk
    data = examples()
    cache = BaseCache("m", root=tmp_path, enabled=False)
    base = general.base_side(model, data, top_k=7, batch_size=2, pad_id=0, cache=cache, key_parts=())
    with adapter_scale(model, 0.7):
        scores = general.tuned_side(model, data, base, batch_size=2, pad_id=0)
    return base, scores


@pytest.mark.parametrize("chunk", [1, 5, 512])
def test_general_text_scores_equal_the_whole_logits(tmp_path, full_logits, chunk):
    model = make_peft(targets=("q_proj", "v_proj", "lm_head")).eval()
    saved = tokens.SCORE_CHUNK
    try:
        base, scores = general_scores(model, tmp_path, chunk)
        calls = full_logits()
        base_full, scores_full = general_scores(model, tmp_path, saved)
    finally:
        tokens.SCORE_CHUNK = saved
    assert calls  # the second run took the whole-logits path
    torch.testing.assert_close(base["topk_values"], base_full["topk_values"], rtol=TOL, atol=TOL)
    assert torch.equal(base["topk_ids"], base_full["topk_ids"]) and torch.equal(base["offsets"], base_full["offsets"])
    for name, value in scores.points().items():
        assert value == pytest.approx(scores_full.points()[name], rel=TOL, abs=TOL), name
    assert scores.kl_low.mean() > 1e-4  # the scaled adapter moved the model, so the KL is measured


def test_token_logprobs_equal_the_whole_logits(full_logits):
    model = make_peft(targets=("q_proj", "lm_head")).eval()
    rows = tokens.token_logprobs(model, examples(), batch_size=3, pad_id=0)
    with as_base(model):
        base_rows = tokens.token_logprobs(model, examples(), batch_size=3, pad_id=0)
    full_logits()
    for ours, theirs in zip(rows, tokens.token_logprobs(model, examples(), batch_size=3, pad_id=0)):
        torch.testing.assert_close(ours, theirs, rtol=TOL, atol=TOL)
    with as_base(model):
        for ours, theirs in zip(base_rows, tokens.token_logprobs(model, examples(), batch_size=3, pad_id=0)):
            torch.testing.assert_close(ours, theirs, rtol=TOL, atol=TOL)


REQUESTS = [Request("The quick brown fox", c) for c in (" jumps", " sleeps all day", "!")] + [
    Request("", "empty context"), Request("Hi", " there")]


def test_multiple_choice_loglikelihoods_equal_the_whole_logits(full_logits):
    model, tok = make_peft(targets=("q_proj", "lm_head")).eval(), tiny_tokenizer()
    ours = {how: Scorer(model, tok, batch_size=2, share_context=how).loglikelihood(REQUESTS) for how in (True, False)}
    calls = full_logits()
    theirs = {how: Scorer(model, tok, batch_size=2, share_context=how).loglikelihood(REQUESTS) for how in (True, False)}
    assert calls
    for how in ours:
        for a, b in zip(ours[how], theirs[how]):
            assert a.n_tokens == b.n_tokens and a.is_greedy == b.is_greedy
            assert a.token_logprobs == pytest.approx(b.token_logprobs, rel=TOL, abs=TOL)


def test_softcapped_model_scores_through_the_capped_head():
    """A soft-capping config (Gemma 2's final_logit_softcapping) is applied by the head."""
    model = make_peft(targets=("q_proj",)).eval()
    inputs = {"input_ids": torch.randint(3, 259, (2, 7))}
    with torch.no_grad():
        raw = model(**inputs).logits
        model.get_base_model().config.final_logit_softcapping = 2.0
        at, _ = head.logits_at(model, **inputs)
        rows, cols = torch.tensor([0, 1]), torch.tensor([3, 6])
    torch.testing.assert_close(at(rows, cols), torch.tanh(raw[rows, cols] / 2.0) * 2.0, rtol=TOL, atol=TOL)
    assert model.get_base_model().config.final_logit_softcapping == 2.0  # restored after the forward
