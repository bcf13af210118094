"""`RegularizedTrainer`: the HF Trainer's task loss plus a weighted sum of registered penalties."""

from __future__ import annotations

import contextlib
import functools
import math
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_callback import ProgressCallback, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from workbench.data.examples import EXAMPLE_WEIGHT, NOT_MODEL_INPUTS
from workbench.distributed import gathered
from workbench.errors import RunFailed, UsageError, WriteFailed
from workbench.formats.integrity import write_manifest
from workbench.io import read_json, write_json, writing
from workbench.config.recipe import HEAD_CHUNK
from workbench.modeling.head import causal_lm, check_head, hidden_states_out, lm_head, unsupported
from workbench.scoring.masks import next_token_mask
from workbench.training.engine import base_reference, chunked_loss
from workbench.training.regularizers import Penalty
from workbench.training.terms import TRAIN_KL, TaskLoss, kl_term, task_term


class TermsProgress(ProgressCallback):
    """The step bar shows the loss terms as a postfix; only evaluations get a line of their own."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None:
            return
        if "eval_loss" in logs:
            self.training_bar.write(f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}")
        elif "loss" in logs:
            shown = {k: v for k, v in logs.items() if k == "loss" or k == "task_loss"
                     or k.endswith("_weighted")}
            self.training_bar.set_postfix({k.removesuffix("_weighted"): f"{v:.3g}"
                                           for k, v in shown.items()}, refresh=False)


PENALTY_STATE = "penalties.json"  # in each checkpoint that has a controlled weight


class AfterOptimiserStep(TrainerCallback):
    """Runs the trainer's per-step hook on every rank, after the update and before the step is
    logged or checkpointed (so a checkpoint holds the weight its next step uses)."""

    def __init__(self, trainer: "RegularizedTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.update_penalty_weights()


class RegularizedTrainer(Trainer):
    """Adds `weight(step) * penalty` for each penalty to the task loss and logs every term.

    Terms are logged per step under their own names, unweighted and `<name>_weighted`, next to
    `task_loss`; a controlled weight (`Penalty.controlled`, e.g. a KL budget) also as
    `<name>_weight`, the weight in force during the step, and it is updated once per optimiser
    step (`update_penalty_weights`) and checkpointed. Per-token penalties are normalised exactly
    like the task loss (by the number of label tokens in the whole accumulated, all-rank batch),
    parameter penalties count once per optimisation step; so gradient accumulation and data
    parallelism change nothing, neither in the update nor in the logged terms (see `log`).
    """

    def __init__(self, *args, penalties: list[Penalty] = (), train_kl: bool = False, loss: TaskLoss = "nll",
                 loss_head: str = "fused", head_chunk_size: int = HEAD_CHUNK, **kwargs):
        """train_kl: log `retention_train_kl`, KL(base || tuned) per completion token of the training
        batch, at every logged step. loss: the task loss (`terms.task_term`). loss_head: "fused"
        stops the model's forward at its final hidden states and applies the LM head inside the loss
        engine, head_chunk_size positions at a time; "full" hands the engine the model's own logits.
        Fused becomes full, saying why, where the forward cannot stop early."""
        super().__init__(*args, **kwargs)
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(TermsProgress)
        # the loss is computed here, normalised by the tokens of the accumulated batch, which the
        # parent counts for a model that takes loss kwargs (and so does not divide by accumulation)
        self.label_smoother, self.compute_loss_func, self.model_accepts_loss_kwargs = None, None, True
        self.smoothing = self.args.label_smoothing_factor
        self.penalties = list(penalties)
        self.task_loss = loss
        self.run_identity: str | None = None  # the run's fingerprint, recorded in each checkpoint's manifest
        self._terms: dict[str, list[torch.Tensor]] = defaultdict(list)  # each as it entered the loss
        self._steps: list[float] = []  # step_scale per micro-batch: they sum to the steps since the last log
        self._controlled = [p for p in self.penalties if p.controlled]
        self._step_terms: dict[str, list[torch.Tensor]] = defaultdict(list)  # the same, this step only
        self._step_steps: list[float] = []
        if self._controlled:
            self.add_callback(AfterOptimiserStep(self))
        self.train_kl = train_kl and not any(TRAIN_KL in p.monitors for p in self.penalties)
        self._monitor_steps: list[float] = []  # step_scale of the micro-batches the monitor measured
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]  # parameter penalties read them
        self.head_chunk_size = head_chunk_size
        self.loss_head = loss_head
        why = self._full_head_reason() if loss_head == "fused" else None
        if why is not None:
            self.loss_head = "full"
            if self.is_world_process_zero():
                print(f"loss head: full logits, not fused: {why}")

    def _full_head_reason(self) -> str | None:
        """Why the forward cannot stop at the final hidden states here, or None."""
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return "FSDP/DeepSpeed hold the LM head sharded, whole only inside the wrapped forward"
        why = unsupported(self.model)
        if why is None:
            try:
                check_head(self.model, type(causal_lm(self.model)).__name__)
            except UsageError as exc:
                why = str(exc).split(": ", 1)[1]
        return why

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The task loss plus the weighted penalties, every per-token term in one pass of the loss
        engine; with the fused head, `outputs.logits` holds the final hidden states [B, T, H]. In
        evaluation, the plain NLL per label token (no smoothing, no DFT, no weights): comparable."""
        batch = dict(inputs)
        fused = self.loss_head == "fused"
        with hidden_states_out(model) if fused else contextlib.nullcontext():
            outputs = model(**{k: v for k, v in inputs.items() if k not in NOT_MODEL_INPUTS and k != "labels"})
        head = lm_head(model) if fused else None
        mask = next_token_mask(batch["labels"])
        tokens = mask.sum().clamp(min=1)
        if not model.training:
            loss, _ = chunked_loss(outputs.logits, head, mask, [task_term(batch["labels"])], [1.0], self.head_chunk_size)
            return (loss / tokens, outputs) if return_outputs else loss / tokens
        token_scale, step_scale = self._scales(batch, num_items_in_batch)
        per_token, step = token_scale / tokens, self.state.global_step
        base = functools.cache(lambda: base_reference(model, batch, fused))
        named = {"task_loss": (task_term(batch["labels"], self.task_loss, self.smoothing,
                                         batch.get(EXAMPLE_WEIGHT)), per_token)}
        monitor = self.train_kl and (step + 1) % self.args.logging_steps == 0
        # the base's forward and both heads in the tuned pass's precision (train.bf16), so that at the
        # base the two sides are the same computation and the KL is exactly 0
        with self.accelerator.autocast():
            for penalty in self.penalties:
                if penalty.per_token:
                    named[penalty.name] = (penalty.term(model, batch, base), penalty.weight(step) * per_token)
            if monitor:
                named[TRAIN_KL] = (kl_term(*base()), 0.0)  # measured, no gradient
            loss, totals = chunked_loss(outputs.logits, head, mask, [t for t, _ in named.values()],
                                        [c for _, c in named.values()], self.head_chunk_size)
        measured = dict(zip(named, totals / tokens))
        terms, scales = {"task_loss": measured["task_loss"]}, {"task_loss": token_scale}
        for penalty in self.penalties:
            weight = penalty.weight(step)
            scale = token_scale if penalty.per_token else step_scale
            if penalty.per_token:
                value = measured[penalty.name]
            else:  # in the tuned pass's precision (train.bf16); under ZeRO-3 with the LoRA factors gathered
                with self.accelerator.autocast(), gathered(self._trainable):
                    value = penalty.term(model, batch, base)
                loss = loss + weight * value * scale
            for name, term in ((penalty.name, value), (f"{penalty.name}_weighted", weight * value)):
                terms[name], scales[name] = term.detach(), scale
            if penalty.controlled:  # the same on every rank and micro-batch of the step
                terms[f"{penalty.name}_weight"] = value.new_tensor(weight)
                scales[f"{penalty.name}_weight"] = step_scale
                self._step_terms[penalty.name].append(value.detach() * scale)
            if TRAIN_KL in penalty.monitors and (step + 1) % self.args.logging_steps == 0:
                measured[TRAIN_KL] = measured[penalty.name]
        if TRAIN_KL in measured:
            terms[TRAIN_KL], scales[TRAIN_KL] = measured[TRAIN_KL], token_scale
            self._monitor_steps.append(step_scale)
        self._check_finite(terms)
        for name, value in terms.items():
            self._terms[name].append(value * scales[name])
        self._steps.append(step_scale)
        if self._controlled:
            self._step_steps.append(step_scale)
        return (loss, outputs) if return_outputs else loss

    def _check_finite(self, terms: dict[str, torch.Tensor]) -> None:
        """Stop before backward when a term is NaN or inf, naming it: no step is taken on it, so
        the last checkpoint is the last good state."""
        bad = [name for name, value in terms.items() if not torch.isfinite(value).all()]
        if bad:
            values = ", ".join(f"{name}={float(terms[name]):g}" for name in bad)
            raise RunFailed(f"training diverged at step {self.state.global_step + 1}: non-finite {values}; "
                            f"no update was made, the last good checkpoint is in {self.args.output_dir}")

    def _get_grad_norm(self, model, grad_norm=None):
        """The parent's gradient norm, refused when non-finite before the optimiser applies it
        (unless a loss scaler is there to skip that step)."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if self.accelerator.scaler is not None:  # fp16: the scaler skips an overflowed step and lowers its scale
            return grad_norm
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            raise RunFailed(f"training diverged at step {self.state.global_step + 1}: non-finite gradient "
                            f"(norm {float(grad_norm):g}) although every loss term was finite; no update "
                            f"was made, the last good checkpoint is in {self.args.output_dir}")
        return grad_norm

    def _scales(self, batch: dict, num_items_in_batch) -> tuple[float | torch.Tensor, float]:
        """How this micro-batch's terms are scaled. token_scale turns a per-token mean over this
        micro-batch into its share of the mean over the accumulated, all-rank batch (local tokens /
        tokens in the accumulated batch, times world size when tokens are averaged across devices,
        as the parent then averages the loss over ranks). step_scale makes a parameter penalty count
        once per optimiser step."""
        if num_items_in_batch is None:
            return 1.0, 1.0  # the parent divides the whole loss by the accumulation steps
        token_scale = next_token_mask(batch["labels"]).sum() / num_items_in_batch
        if self.args.average_tokens_across_devices:
            token_scale = token_scale * self.accelerator.num_processes
        return token_scale, 1.0 / self.current_gradient_accumulation_steps

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Flush every term since the last log into the log record, reduced the way the parent
        reduces `loss`, so that `loss` = task_loss + the sum of the `*_weighted` terms.

        Each micro-batch's term was stored as it entered this rank's loss (times token_scale or
        step_scale): their sum over a step is this rank's share of the step, the mean over ranks
        the step's term over the whole all-rank batch, and dividing by the steps since the last
        log gives the mean per step, like `loss`. So 1 micro-batch of 4 or 2 of 2, 1 process or
        2, log the same numbers; on the tiny recipe the plain mean of rank 0's micro-batch terms
        logged before was off by 1.3% of the KL's scale under 2x2 accumulation and by 4.7% under
        2 processes. The parent calls log() with `loss` on every rank, just after all-gathering
        `loss`, so every rank reaches the all-reduce here in step.
        """
        if self._terms and "loss" in logs:
            totals = torch.stack([torch.stack(values).float().sum() for values in self._terms.values()])
            steps = torch.tensor([sum(self._monitor_steps) if name == TRAIN_KL else sum(self._steps)
                                  for name in self._terms], dtype=totals.dtype, device=totals.device)
            totals = self._mean_over_ranks(totals) / steps
            logs.update(zip(self._terms, totals.tolist()))
            self._terms.clear()
            self._steps.clear()
            self._monitor_steps.clear()
        super().log(logs, *args, **kwargs)

    def update_penalty_weights(self) -> None:
        """Once per optimiser step, on every rank: hand each controlled penalty its term of the
        step just taken, reduced exactly as `log` reduces it (so with logging_steps 1 it is the
        logged value): summed over the step's micro-batches as they entered the loss, averaged
        over ranks, per step. Every rank gets the same value, so every rank holds the same weight."""
        if not self._step_terms:
            return
        totals = torch.stack([torch.stack(self._step_terms[p.name]).float().sum() for p in self._controlled])
        totals = self._mean_over_ranks(totals) / sum(self._step_steps)
        for penalty, measured in zip(self._controlled, totals.tolist()):
            penalty.update(measured)
        self._step_terms.clear()
        self._step_steps.clear()

    def _save_checkpoint(self, model, trial) -> None:
        """The parent's checkpoint, with the controlled penalties' state written first: the parent
        writes trainer_state.json last, which marks a checkpoint complete (`run.latest_checkpoint`),
        so a complete checkpoint always has it. Then, once every rank has written its share, the
        manifest of sizes and sha256s that resume checks (`faults.check_checkpoint`). A failed
        write removes the partial folder (it frees the space it took) and names the file."""
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        try:
            with writing(folder, ""):
                if self._controlled and self.args.should_save:
                    write_json(folder / PENALTY_STATE, {p.name: p.state_dict() for p in self._controlled})
                super()._save_checkpoint(model, trial)
                self.accelerator.wait_for_everyone()
                if self.args.should_save and folder.is_dir():
                    write_manifest(folder, run=self.run_identity)
        except WriteFailed:
            if self.args.should_save:
                shutil.rmtree(folder, ignore_errors=True)
            raise

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """The parent's `train`; resuming also restores each controlled weight from the checkpoint."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if checkpoint and self._controlled:
            path = Path(checkpoint) / PENALTY_STATE
            if not path.is_file():
                raise UsageError(f"{checkpoint}: no {PENALTY_STATE}, so the controlled weight of "
                                 f"{', '.join(p.name for p in self._controlled)} cannot be restored")
            state = read_json(path, PENALTY_STATE)
            for penalty in self._controlled:
                if penalty.name not in state:
                    raise UsageError(f"{path}: no state for {penalty.name}")
                penalty.load_state_dict(state[penalty.name])
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over data-parallel ranks: an all-reduce that every rank must call; one
        process: the values unchanged."""
        if self.accelerator.num_processes == 1:
            return values
        return self.accelerator.reduce(values, reduction="mean")

    def get_decay_parameter_names(self, model) -> list[str]:
        """Decoupled weight decay on weight matrices only: never biases, norms or other 1-D tensors."""
        names = set(super().get_decay_parameter_names(model))
        return [n for n, p in model.named_parameters() if n in names and p.ndim >= 2]

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.is_world_process_zero():
            groups = [sum(p.numel() for p in g["params"]) for g in optimizer.param_groups]
            tensors = [len(g["params"]) for g in optimizer.param_groups]
            print(f"optimizer: {type(optimizer).__name__}, weight decay {self.args.weight_decay} on "
                  f"{tensors[0]} tensors ({groups[0]:,} params), none on {sum(tensors[1:])} tensors "
                  f"({sum(groups[1:]):,} params)")
        return optimizer
