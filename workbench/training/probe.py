"""The retention probe: `workbench eval`'s general-text retention, measured while training.

Every `every` optimiser steps, at the last step and (under `train.select`) at every checkpoint,
the tuned model is scored in eval mode on a few held-out chunks of general text against the base
side, which is computed once and cached exactly as `workbench eval` caches it (the same entry for
the same settings: `scoring.general`). The values are the eval's point values, logged into the
Trainer's history as `retention_ppl_ratio`, `retention_kl`, `retention_kl_upper`,
`retention_top1_agreement`, `retention_ppl` and `retention_seconds` (the probe's own cost).
Checkpoints keep the history, so a resumed run keeps its probes.
"""

from __future__ import annotations

import time

from transformers.trainer_callback import TrainerCallback

from workbench.config.recipe import RetentionProbe
from workbench.data.examples import data_fingerprint, general_text_examples
from workbench.errors import UsageError
from workbench.scoring import general
from workbench.scoring.base_cache import BaseCache


def probe_chunks(config: RetentionProbe, tokenizer) -> list[dict]:
    """The probe's chunks; a bad source is one line naming the recipe key."""
    try:
        return general_text_examples(config.source, tokenizer, config.chunk_length, config.num_chunks,
                                     seed=config.seed)
    except UsageError as exc:
        raise UsageError(f"train.retention_probe.source: {exc}") from None


class RetentionProbeCallback(TrainerCallback):
    """Runs on every rank (the chunks are shared out across ranks and gathered back); each rank
    logs the same values."""

    def __init__(self, trainer, config: RetentionProbe, chunks: list[dict], base_fingerprint: str,
                 every_checkpoint: bool = False):
        if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
            raise UsageError("train.retention_probe: not available under FSDP or DeepSpeed (sharded weights "
                             "would need every rank in each forward); run it with DDP or measure with "
                             "`workbench eval --suite ... --run DIR` after training")
        self.trainer, self.config, self.chunks = trainer, config, chunks
        self.every_checkpoint = every_checkpoint
        self.cache = BaseCache(base_fingerprint)
        tokenizer = trainer.processing_class
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.batch_size = trainer.args.per_device_eval_batch_size
        self._base = None

    def base(self):
        """The base side, from the cache or scored once with the adapter disabled."""
        if self._base is None:
            key = (self.config.general().model_dump(), data_fingerprint(self.chunks))
            self._base = general.base_side(self.trainer.model, self.chunks, self.config.top_k, self.batch_size,
                                           self.pad_id, self.cache, key)
        return self._base

    def measure(self) -> dict[str, float]:
        """The probe's values for the model as it stands, in eval mode (no dropout); the mode is restored."""
        model = self.trainer.model
        base = self.base()
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            scores = general.tuned_side(model, self.chunks, base, self.batch_size, self.pad_id)
        finally:
            model.train(was_training)
        values = {f"retention_{name}": value for name, value in scores.points().items()}
        return {**values, "retention_seconds": time.perf_counter() - started}

    def on_train_begin(self, args, state, control, **kwargs):
        self.base()  # once, before the first step, so no step's timing carries it

    def on_step_end(self, args, state, control, **kwargs):
        """After the DefaultFlowCallback, so control.should_save says whether this step is checkpointed
        (the probe's record then lands in the checkpoint's history)."""
        step = state.global_step
        due = step % self.config.every == 0 or step >= state.max_steps
        if self.every_checkpoint and control.should_save:
            due = True
            control.should_evaluate = self.trainer.eval_dataset is not None  # the metric, at every candidate
        if due:
            should_log = control.should_log
            self.trainer.log(self.measure())  # which clears control.should_log: the step's own log is still due
            control.should_log = should_log
