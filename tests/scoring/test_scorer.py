import math

import pytest
import torch

from tests.helpers import make_peft
from workbench.scoring.scorer import Request, Response, Scorer, multiple_choice
from workbench.modeling.lora import adapter_scale
from workbench.modeling.tiny import tiny_tokenizer

REQUESTS = [
    Request("The quick brown fox", " jumps over"),
    Request("Hi", "!"),
    Request("A longer context with several more words in it, ", "and a tail."),
    Request("", "empty context"),
    Request("x", " yz"),
]


def naive(model, tokenizer, request):
    """One request at a time: full forward, log_softmax over all positions, gather."""
    def tok(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    context, continuation = request.context, request.continuation
    if context:
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        context_ids = tok(stripped)
        cont_ids = tok(stripped + continuation)[len(context_ids):]
    else:
        context_ids, cont_ids = [tokenizer.bos_token_id], tok(continuation)
    ids = torch.tensor([context_ids + cont_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
    positions = range(len(context_ids) - 1, ids.shape[1] - 1)
    token_lps = [logprobs[p, ids[0, p + 1]].item() for p in positions]
    greedy = all(logprobs[p].argmax().item() == ids[0, p + 1].item() for p in positions)
    return sum(token_lps), len(cont_ids), greedy


@pytest.fixture(scope="module")
def model():
    return make_peft().eval()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def assert_same(a: list[Response], b: list[Response]):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.n_tokens == y.n_tokens and x.is_greedy == y.is_greedy
        assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
        assert x.token_logprobs == pytest.approx(y.token_logprobs, abs=1e-4)


def test_matches_naive_and_batch_size_invariant(model, tok):
    one = Scorer(model, tok, batch_size=1).loglikelihood(REQUESTS)
    three = Scorer(model, tok, batch_size=3).loglikelihood(REQUESTS)
    assert_same(one, three)
    for request, response in zip(REQUESTS, three):
        logprob, n_tokens, greedy = naive(model, tok, request)
        assert response.n_tokens == n_tokens == len(response.token_logprobs) > 0
        assert response.logprob == pytest.approx(logprob, abs=1e-4)
        assert response.is_greedy == greedy
    # trailing space moves onto the continuation: "...it," + " and a tail."
    assert three[2].n_tokens == len(" and a tail.")


def test_order_preserved_with_shuffled_input(model, tok):
    scorer = Scorer(model, tok, batch_size=2)
    base = scorer.loglikelihood(REQUESTS)
    reordered = scorer.loglikelihood(REQUESTS[::-1])
    assert_same(base[::-1], reordered)


def test_left_truncation(model, tok):
    request = Request("abcdefghij", "klm")
    response = Scorer(model, tok, max_length=6).loglikelihood([request])[0]
    # the window is the last 7 tokens "ghijklm"; inputs "ghijkl", score k, l, m
    ids = torch.tensor([tok("ghijklm", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), -1)[0]
    expected = sum(lp[p, ids[0, p + 1]].item() for p in (3, 4, 5))
    assert response.n_tokens == 3
    assert response.logprob == pytest.approx(expected, abs=1e-4)


def greedy_continuation(model, tok, context, n=3):
    ids = tok(context, add_special_tokens=False)["input_ids"]
    generated = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids + generated])).logits[0, -1]
            generated.append(int(logits.argmax()))
    return ids, generated


def test_is_greedy(model, tok):
    # a random byte-level model may greedily emit bytes that are not printable text; take the first
    # context whose greedy 2 tokens survive decode -> encode unchanged (about 1 in 7 contexts do)
    contexts = [f"{word} {letter}" for word in ("Once", "The", "Q:") for letter in "abcdefghijklmnopqrstuvwxyz"]
    for context in contexts:
        ids, generated = greedy_continuation(model, tok, context, n=2)
        greedy_text = tok.decode(generated)
        if greedy_text.isprintable() and \
                tok(context + greedy_text, add_special_tokens=False)["input_ids"] == ids + generated:
            break
    else:
        pytest.fail("no context with a text-round-tripping greedy continuation")
    scorer = Scorer(model, tok, batch_size=2)
    wrong_first = "a" if not greedy_text.startswith("a") else "b"  # not the argmax first token
    responses = scorer.loglikelihood([Request(context, greedy_text),
                                      Request(context, wrong_first + greedy_text)])
    assert responses[0].is_greedy is True and responses[0].n_tokens == 2
    assert responses[1].is_greedy is False


def test_base_adapter_and_scale(model, tok):
    scorer = Scorer(model, tok, batch_size=3)
    base = scorer.loglikelihood(REQUESTS, adapter="base")
    tuned = scorer.loglikelihood(REQUESTS, adapter="tuned")
    with adapter_scale(model, 0.0):
        zeroed = scorer.loglikelihood(REQUESTS)
    assert_same(base, zeroed)
    assert_same(base, scorer.loglikelihood(REQUESTS, scale=0.0))
    assert max(abs(b.logprob - t.logprob) for b, t in zip(base, tuned)) > 1e-3
    # the adapter is back on afterwards
    assert_same(tuned, scorer.loglikelihood(REQUESTS))
    with pytest.raises(ValueError):
        scorer.loglikelihood(REQUESTS, adapter="other")


def test_training_mode_restored_and_forward_calls(tok):
    model = make_peft().train()
    scorer = Scorer(model, tok, batch_size=2)
    scorer.loglikelihood(REQUESTS)  # 5 requests -> 3 batches
    assert model.training and scorer.forward_calls == 3
    scorer.loglikelihood(REQUESTS[:2], adapter="base")
    assert scorer.forward_calls == 4
    model.eval()
    scorer.loglikelihood(REQUESTS[:1])
    assert not model.training and scorer.forward_calls == 5


class FakeScorer:
    def __init__(self, logprobs):
        self.logprobs = logprobs
        self.requests = None
        self.adapter = None

    def loglikelihood(self, requests, adapter="tuned", scale=1.0):
        self.requests, self.adapter = list(requests), adapter
        return [Response(lp, 1, False, (lp,)) for lp in self.logprobs]


def test_multiple_choice_acc_vs_acc_norm():
    # lengths (lm-eval: the choice without its leading space): "yes" 3, "a very long answer" 18, "no" 2
    choices = ["yes", "a very long answer", "no"]
    fake = FakeScorer([-6.0, -5.0, -1.8])  # per char: -2.0, -0.278, -0.9
    result = multiple_choice(fake, "Q?", choices, gold=2, adapter="base")
    assert [r.continuation for r in fake.requests] == [" yes", " a very long answer", " no"]
    assert all(r.context == "Q?" for r in fake.requests) and fake.adapter == "base"
    # acc: argmax total = index 2 (-1.8) -> correct; acc_norm: argmax per char = index 1 -> wrong
    assert result["pred"] == 2 and result["acc"] == 1.0
    assert result["pred_norm"] == 1 and result["acc_norm"] == 0.0
    expected = [math.exp(x) for x in (-6.0, -5.0, -1.8)]
    assert result["probs"] == pytest.approx([e / sum(expected) for e in expected])
    assert result["logprobs"] == [-6.0, -5.0, -1.8]


def test_multiple_choice_long_choice_wins_total_not_norm():
    choices = ["a very long answer", "ok"]  # 18 and 2 characters
    fake = FakeScorer([-3.8, -4.0])  # totals: 0 wins; per char: -0.211 vs -2.0 -> 0 wins too
    assert multiple_choice(fake, "Q", choices, gold=0)["acc_norm"] == 1.0
    fake = FakeScorer([-1.0, -0.9])  # total: 1 wins; per char: -0.056 vs -0.45 -> 0 wins
    result = multiple_choice(fake, "Q", choices, gold=0)
    assert result["acc"] == 0.0 and result["acc_norm"] == 1.0


def test_acc_norm_length_excludes_the_leading_space():
    # "a" 1 char, "bb" 2 chars: -1.0/1 = -1.0 < -1.9/2 = -0.95 -> "bb" wins.
    # Counting the space (2 and 3 chars) would give -0.5 > -0.633 and pick "a".
    result = multiple_choice(FakeScorer([-1.0, -1.9]), "Q", ["a", "bb"], gold=1)
    assert result["pred_norm"] == 1 and result["acc_norm"] == 1.0


SHARED = [  # three items of choices: contexts of different lengths (left padding), continuations of
    # one token and of several, and a lone request scored the ordinary way
    *(Request("Question: which colour is the sky? Answer:", c) for c in (" blue", " green", " a deep red", "!")),
    *(Request("Pick one", c) for c in (" x", " yy", " zzz zz")),
    Request("Alone here", " and on its own"),
    *(Request("Two", c) for c in ("!", "?")),
]


def test_shared_contexts_match_one_sequence_per_request(model, tok):
    shared = Scorer(model, tok, batch_size=2)
    separate = Scorer(model, tok, batch_size=2, share_context=False)
    ours = shared.loglikelihood(SHARED)
    assert_same(ours, separate.loglikelihood(SHARED))
    for request, response in zip(SHARED, ours):
        logprob, n_tokens, greedy = naive(model, tok, request)
        assert (response.n_tokens, response.is_greedy) == (n_tokens, greedy)
        assert response.logprob == pytest.approx(logprob, abs=1e-4)
    # 3 shared contexts in 2 batches: the longest two take a context pass and two continuation
    # passes (their 6 multi-token choices, 4 rows at a time), "Two" (single-token choices) only a
    # context pass; plus the lone request: 5 calls, as many as one sequence per request in batches
    # of 2, but over far fewer tokens
    assert shared.forward_calls == 5 and separate.forward_calls == 5


def test_shared_contexts_under_base_and_scaled_adapter(model, tok):
    for kwargs in ({"adapter": "base"}, {"scale": 0.5}):
        ours = Scorer(model, tok, batch_size=3).loglikelihood(SHARED, **kwargs)
        assert_same(ours, Scorer(model, tok, batch_size=3, share_context=False).loglikelihood(SHARED, **kwargs))
