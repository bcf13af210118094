"""Models that read <bos> first (Gemma): the scorer encodes as lm-evaluation-harness does, and
general-text chunks start with <bos>. The tiny tokenizer stands in, flagged as `modeling.load`
flags Gemma's (`add_bos_token`); unflagged, nothing changes (the negative control)."""

from __future__ import annotations

import pytest

from tests.helpers import make_peft
from workbench.data.examples import general_text_examples
from workbench.modeling.tiny import tiny_tokenizer
from workbench.scoring.scorer import Request, Scorer

PAIRS = [("Question: red or blue?\nAnswer:", " blue"), ("The capital of France is ", "Paris"),
         ("", "a whole text scored from the start"), ("one two", " three four five")]


def flagged():
    tokenizer = tiny_tokenizer()
    tokenizer.add_bos_token = True  # encodings now start with <bos>, as Gemma's do
    return tokenizer


@pytest.mark.parametrize("make, starts_with_bos", [(flagged, True), (tiny_tokenizer, False)])
def test_the_scorer_encodes_each_request_as_lm_eval_does(make, starts_with_bos):
    HFLM = pytest.importorskip("lm_eval.models.huggingface").HFLM
    tokenizer = make()
    model = make_peft(perturb=False)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    scorer = Scorer(model, tokenizer, batch_size=4)
    for context, continuation in PAIRS:
        ours = scorer.encode(Request(context, continuation))
        theirs = lm._encode_pair(context, continuation) if context else (
            [lm.prefix_token_id], lm.tok_encode(continuation, add_special_tokens=False))
        assert (list(ours[0]), list(ours[1])) == (list(theirs[0]), list(theirs[1])), (context, continuation)
        assert (ours[0][0] == tokenizer.bos_token_id) == (starts_with_bos or not context)
    # the old encoding (no special tokens ever) differs from lm-eval's on a flagged tokenizer
    if starts_with_bos:
        plain = list(tokenizer(PAIRS[0][0], add_special_tokens=False)["input_ids"])
        assert plain != list(lm._encode_pair(*PAIRS[0])[0])


def test_general_text_chunks_start_with_bos_where_the_model_reads_it_first():
    for tokenizer, bos in ((flagged(), True), (tiny_tokenizer(), False)):
        chunks = general_text_examples("builtin:pydoc_heldout", tokenizer, 32, 6)
        assert all(len(c["input_ids"]) == 32 and c["labels"] == c["input_ids"] for c in chunks)
        assert all((c["input_ids"][0] == tokenizer.bos_token_id) == bos for c in chunks)
    # after <bos>, each flagged chunk is 31 tokens of the same text stream the plain chunks cut
    from workbench.data.examples import _token_stream

    stream = _token_stream("builtin:pydoc_heldout", tiny_tokenizer())
    for chunk in general_text_examples("builtin:pydoc_heldout", flagged(), 32, 6):
        assert any(stream[i:i + 31] == chunk["input_ids"][1:] for i in range(0, len(stream) - 30, 31))
