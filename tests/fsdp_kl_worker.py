"""Run by tests/test_distributed.py under torchrun (2 gloo processes on CPU): KL-to-base through the
loss engine over the model's own logits, on a model sharded with FSDP 2's fully_shard, equals the
unsharded value, and its gradient reaches the adapter."""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import make_batch, make_peft, per_token_value  # noqa: E402
from workbench.scoring.masks import next_token_mask  # noqa: E402
from workbench.training.engine import base_reference, chunked_loss  # noqa: E402
from workbench.training.regularizers.kl import KLConfig, KLToBase  # noqa: E402

dist.init_process_group("gloo")
model, batch = make_peft(targets=("q_proj", "v_proj", "lm_head"), perturb=True), make_batch()
inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
penalty = KLToBase(KLConfig(weight=1.0))


def kl(model):
    return per_token_value(lambda base: penalty.term(model, batch, base), model, batch, fused=False)


expected = kl(model).item()
for layer in model.get_base_model().model.layers:
    fully_shard(layer)
fully_shard(model)
value = kl(model)
value.backward()
grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
reached = all(g is not None and float(g.full_tensor().abs().sum()) > 0 for g in grads)
# resharded (as with reshard_after_forward on the root, or offloading): the head cannot be called
# alone, so the reference is the wrapped model's own forward
outputs = model(**inputs)
model.reshard()
head_sharded = type(model.get_base_model().get_output_embeddings().weight).__name__ == "DTensor"
reference = base_reference(model, batch, fused=True)  # asked for the head path, it sees the shards
mask = next_token_mask(batch["labels"])
term = penalty.term(model, batch, lambda: reference)
resharded = (chunked_loss(outputs.logits, None, mask, [term], [1.0], 4)[0] / mask.sum()).item()
if dist.get_rank() == 0:
    print(json.dumps({"expected": expected, "value": value.item(), "gradient_reached": reached,
                      "head_sharded": head_sharded, "resharded": resharded}))
dist.destroy_process_group()
