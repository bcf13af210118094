"""The loss engine through the LM head (fused) against the full logits: every per-token term's
value and its gradients in the hidden states and the head's LoRA parameters, at several chunk
sizes, with ragged masks and an all-masked row; fp16; and the trainer's loss and LoRA gradients,
fused vs the engine over the model's own logits, for each term."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import make_batch, make_peft
from tests.training.regularizers.test_kl import lumped_tail_kl, reference_kl
from workbench.modeling.head import hidden_states_out, lm_head
from workbench.scoring.masks import next_token_mask, shifted_labels
from workbench.scoring.topk_kl import base_topk
from workbench.training.engine import chunked_loss as fused_loss
from workbench.training.reference import TopKReference
from workbench.training.regularizers import KLConfig, KLToBase
from workbench.training.terms import kl_term, task_term, topk_kl_term
from workbench.training.trainer import RegularizedTrainer
from transformers import TrainingArguments

TOL = 1e-5  # fp32: max |fused - full| over max |full|, per tensor
CHUNKS = (1, 4, 64)  # one position a chunk, a ragged last chunk, the whole batch in one chunk


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def ragged_labels(vocab: int, seed: int = 0) -> torch.Tensor:
    """[4, 9] labels: a prompt prefix, a right-padded row, an all-masked row, a full row."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (4, 9), generator=gen)
    labels[0, :3] = -100
    labels[1, 6:] = -100
    labels[2] = -100  # nothing to learn in this row: never projected, no gradient
    return labels


def setup(seed=0):
    """(hidden [4, 9, H] leaf, the LoRA-targeted head, labels, mask, base logits [4, 9, V], base head input)."""
    model = make_peft(targets=("q_proj", "lm_head"), seed=seed)
    head = lm_head(model)
    gen = torch.Generator().manual_seed(seed + 5)
    hidden = torch.randn(4, 9, 32, generator=gen).requires_grad_()
    ref_hidden = torch.randn(4, 9, 32, generator=gen)
    base_head = head.module.base_layer
    labels = ragged_labels(head.module.out_features, seed)
    return hidden, head, labels, next_token_mask(labels), base_head, ref_hidden


def cases(labels, mask, base_head, ref_hidden, temperature=1.5):
    """name -> (the term for the fused head, the full-logits reference sum as a function of logits)."""
    targets = shifted_labels(labels).reshape(-1)
    with torch.no_grad():
        base_logits = base_head(ref_hidden)
    values, ids = base_topk(F.log_softmax(base_logits[mask] / temperature, -1), 7)

    def dft(logits):
        log_q = F.log_softmax(logits.reshape(-1, logits.shape[-1]), -1)[targets != -100]
        log_qy = log_q.gather(-1, targets[targets != -100][:, None])
        return -(log_qy.exp().detach() * log_qy).sum()

    def ce(smoothing):
        return lambda logits: F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, ignore_index=-100,
                                              reduction="sum", label_smoothing=smoothing)

    return {
        "nll": (task_term(labels), ce(0.0)),
        "label_smoothing": (task_term(labels, "nll", 0.2), ce(0.2)),
        "dft": (task_term(labels, "dft"), dft),
        "kl_forward": (kl_term(ref_hidden, base_head, "forward", temperature),
                       lambda z: reference_kl(z, base_logits, mask, "forward", temperature)),
        "kl_reverse": (kl_term(ref_hidden, base_head, "reverse", temperature),
                       lambda z: reference_kl(z, base_logits, mask, "reverse", temperature)),
        "kl_topk": (topk_kl_term(values, ids, temperature), lambda z: lumped_tail_kl(z, values, ids, mask, temperature)),
    }


def both(name, chunk_size, mutate=None):
    """{'fused'|'full': (loss, grads of hidden and each trainable head parameter)} for one term."""
    hidden, head, labels, mask, base_head, ref_hidden = setup()
    term, reference = cases(labels, mask, base_head, ref_hidden)[name]
    count = int(mask.sum())
    params = [p for p in head.parameters() if p.requires_grad]
    assert len(params) == 2  # the head's lora_A and lora_B
    fused_mask, fused_count = (mask, count) if mutate is None else mutate(mask.clone(), count)
    loss, totals = fused_loss(hidden, head, fused_mask, [term], [1.0 / fused_count], chunk_size)
    out = {"fused": (loss, torch.autograd.grad(loss, [hidden, *params]))}
    full = reference(head(hidden)) / count
    out["full"] = (full, torch.autograd.grad(full, [hidden, *params]))
    torch.testing.assert_close(totals[0], loss.detach() * fused_count)
    return out


def assert_same(out):
    (loss, grads), (full, full_grads) = out["fused"], out["full"]
    assert relative_difference(loss.detach(), full.detach()) <= TOL, (loss.item(), full.item())
    for what, a, b in zip(("hidden", "lora_A", "lora_B"), grads, full_grads):
        assert b.abs().max() > 0, what
        assert relative_difference(a, b) <= TOL, f"{what}: {relative_difference(a, b):.3g}"


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("name", ["nll", "label_smoothing", "dft", "kl_forward", "kl_reverse", "kl_topk"])
def test_fused_term_equals_the_full_logits_value_and_gradients(name, chunk_size):
    out = both(name, chunk_size)
    assert_same(out)
    hidden_grad = out["fused"][1][0]
    _, _, labels, mask, _, _ = setup()
    assert hidden_grad[~mask].abs().max() == 0 and hidden_grad[2].abs().max() == 0  # the all-masked row


def drop_last_chunk(mask, count):
    """Forget the batch's last completion position (a chunk of one at chunk_size 1)."""
    last = mask.reshape(-1).nonzero()[-1]
    mask.reshape(-1)[last] = False
    return mask, count


def off_by_one_token(mask, count):
    return mask, count + 1


@pytest.mark.parametrize("mutate", [drop_last_chunk, off_by_one_token])
@pytest.mark.parametrize("name", ["nll", "kl_forward"])
def test_the_comparison_catches_a_dropped_chunk_or_a_normalisation_off_by_one(name, mutate):
    """Negative control: the 1e-5 tolerance fails a fused head that drops the last chunk or divides
    by one token too many (about 1/24 of the value: 24 completion positions)."""
    with pytest.raises(AssertionError):
        assert_same(both(name, 1, mutate))


def test_only_completion_positions_are_projected():
    hidden, head, labels, mask, *_ = setup()
    rows = []
    head.module.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    fused_loss(hidden, head, mask, [task_term(labels)], [1.0], 5)
    assert sum(rows) == int(mask.sum()) and max(rows) <= 5


def test_softcapped_head_matches_the_capped_logits():
    """Logit soft-capping (Gemma 2's final_logit_softcapping) is part of the head."""
    hidden, head, labels, mask, *_ = setup()
    head.softcap = 3.0
    params = [p for p in head.parameters() if p.requires_grad]
    loss, _ = fused_loss(hidden, head, mask, [task_term(labels)], [1.0], 4)
    capped = torch.tanh(head.module(hidden) / 3.0) * 3.0
    full = F.cross_entropy(capped.reshape(-1, capped.shape[-1]), shifted_labels(labels).reshape(-1), reduction="sum")
    assert relative_difference(loss.detach(), full.detach()) <= TOL
    for a, b in zip(torch.autograd.grad(loss, [hidden, *params]), torch.autograd.grad(full, [hidden, *params])):
        assert relative_difference(a, b) <= TOL


def test_hidden_states_out_returns_the_final_hidden_states_and_restores_the_head():
    model, batch = make_peft(targets=("q_proj", "lm_head")), make_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = model(**inputs).logits
    with hidden_states_out(model):
        hidden = model(**inputs).logits
    assert hidden.shape[-1] == 32
    torch.testing.assert_close(lm_head(model)(hidden), logits)
    torch.testing.assert_close(model(**inputs).logits, logits)


# ------------------------------------------------------------------ the trainer, fused vs full


def topk_cache(model, batch, k):
    """A TopKReference of this batch's examples (example i = row i), from the base's logits."""
    mask = next_token_mask(batch["labels"])
    with torch.no_grad(), model.disable_adapter():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    values, ids = base_topk(F.log_softmax(logits[mask], -1), k)
    counts = mask.sum(1)
    return TopKReference(values, ids, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))


TRAINER_CASES = {  # name: (TrainingArguments, KL-to-base config or none, task loss)
    "nll": ({}, {}, "nll"),
    "label_smoothing": ({"label_smoothing_factor": 0.1}, {}, "nll"),
    "dft": ({}, {}, "dft"),
    "kl_forward": ({}, {"weight": 0.3, "temperature": 1.5}, "nll"),
    "kl_reverse": ({}, {"weight": 0.3, "direction": "reverse", "temperature": 0.7}, "nll"),
    "kl_topk": ({}, {"weight": 0.3, "reference": "topk_cache", "top_k": 11}, "nll"),
    "anchored_sft": ({}, {"weight": 0.3}, "dft"),
}


def trainer_loss_and_grads(loss_head, case, tmp_path, chunk_size=3):
    args, kl, task = TRAINER_CASES[case]
    model, batch = make_peft(targets=("q_proj", "v_proj", "lm_head")), make_batch(batch=4)
    batch["labels"][2] = -100  # an all-masked row
    batch["index"] = torch.arange(4)
    penalties = []
    if kl:
        cache = topk_cache(model, batch, kl["top_k"]) if kl.get("reference") == "topk_cache" else None
        penalties = [KLToBase(KLConfig(**kl), reference_cache=cache)]
    trainer = RegularizedTrainer(
        model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                            remove_unused_columns=False, disable_tqdm=True, logging_steps=1, **args),
        penalties=penalties, loss=task, loss_head=loss_head, head_chunk_size=chunk_size, train_kl=True)
    trainer.current_gradient_accumulation_steps = 1  # set by the train loop
    model.train()
    n_items = next_token_mask(batch["labels"]).sum()
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n_items)
    params = [p for p in model.parameters() if p.requires_grad]
    logs = {"loss": 0.0}
    trainer.log(logs)
    return loss, torch.autograd.grad(loss, params), logs


@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_trainer_fused_head_equals_the_full_logits(case, tmp_path):
    """The trainer's loss, every LoRA gradient (the head's included) and the logged terms, the
    training-batch KL monitor (`retention_train_kl`) among them."""
    loss, grads, logs = trainer_loss_and_grads("fused", case, tmp_path)
    full, full_grads, full_logs = trainer_loss_and_grads("full", case, tmp_path)
    assert relative_difference(loss.detach(), full.detach()) <= TOL
    assert len(grads) == 10  # A and B of q and v in 2 layers, and of the head
    for a, b in zip(grads, full_grads):
        assert b.abs().max() > 0 and relative_difference(a, b) <= TOL
    assert logs.keys() == full_logs.keys() and "retention_train_kl" in logs
    for name in logs:
        assert logs[name] == pytest.approx(full_logs[name], rel=TOL, abs=1e-9), name


@pytest.mark.parametrize("through_head", [True, False])
def test_a_loss_scale_above_the_fp16_range_multiplies_the_handed_on_gradients_in_fp32(through_head):
    """fp16 training scales the loss by 65,536 (GradScaler's first scale) before backward. That is
    above fp16's largest number, so backward must multiply the gradients worked out in forward by
    the fp32 scale as it is; cast to fp16 first, the scale is inf and every gradient inf or NaN.
    Through the head (fused) and over the model's own logits alike."""
    hidden, head, labels, mask, *_ = setup()
    head = head.half()
    source = (hidden.half() if through_head else head(hidden.half())).detach().requires_grad_()
    engine_head = head if through_head else None
    loss, _ = fused_loss(source, engine_head, mask, [task_term(labels)], [1.0 / int(mask.sum())], 4)
    (unscaled,) = torch.autograd.grad(loss, source)
    loss, _ = fused_loss(source, engine_head, mask, [task_term(labels)], [1.0 / int(mask.sum())], 4)
    (scaled,) = torch.autograd.grad(loss * 65536.0, source)
    assert torch.isfinite(scaled).all() and unscaled.abs().max() > 0
    assert relative_difference(scaled.float() / 65536.0, unscaled.float()) < 1e-3  # fp16 rounding of each


def test_fp16_gradients_keep_what_an_fp16_head_would_round_to_zero():
    """With fp16 inputs the engine runs the head in fp32 and keeps the gradients fp32 until the
    loss scale reaches them: with a per-token weight of 1e-6 (a million-token batch) the scaled
    gradients match fp64 to 0.2%; the negative control, the head's backward in fp16 before the
    scale, loses most of them to underflow (fp16's smallest number is 6e-8)."""
    hidden, head, labels, mask, *_ = setup()
    head = head.half()
    source = hidden.detach().half().requires_grad_()
    loss, _ = fused_loss(source, head, mask, [task_term(labels)], [1e-6], 4)
    (ours,) = torch.autograd.grad(loss * 65536.0, source)
    exact_head = lm_head(make_peft(targets=("q_proj", "lm_head"))).double()
    exact_head.load_state_dict({k: v.double() for k, v in head.state_dict().items()})
    exact_source = source.detach().double().requires_grad_()
    logits = exact_head(exact_source)
    full = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted_labels(labels).reshape(-1), reduction="sum")
    (exact,) = torch.autograd.grad(full * 1e-6 * 65536.0, exact_source)
    assert relative_difference(ours.double(), exact) < 2e-3
    fp16_logits = head(source)  # the control: fp16 logits, their gradient unscaled and fp16
    per_token = (torch.softmax(fp16_logits.float(), -1) - F.one_hot(shifted_labels(labels).clamp(min=0),
                                                                     fp16_logits.shape[-1])) * mask[..., None]
    (control,) = torch.autograd.grad(fp16_logits, source, (per_token * 1e-6).half())
    control = control.float() * 65536.0
    assert relative_difference(control.double(), exact) > 0.1


def test_a_multimodal_wrapper_is_headed_as_its_own_forward_heads_it():
    """Gemma 3's image-text model keeps the soft-cap in its text config but its forward applies
    none: the head and the pass-through read the wrapper's own config, as its forward does."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    torch.manual_seed(0)
    config = Gemma3Config(
        text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.1,
                         sliding_window=8),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14), mm_tokens_per_image=4)
    model = Gemma3ForConditionalGeneration(config).eval()
    ids = torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=ids).logits
    assert logits.abs().max() > 0.3  # a cap of 0.1 applied anywhere would show
    with hidden_states_out(model):
        hidden = model(input_ids=ids).logits
    torch.testing.assert_close(lm_head(model)(hidden), logits)
