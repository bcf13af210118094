"""Run by tests/test_distributed.py under torchrun (2 gloo processes on CPU): KL-to-base on a model
sharded with FSDP 2's fully_shard equals the unsharded value, and its gradient reaches the adapter."""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import make_batch, make_peft  # noqa: E402
from workbench.training.regularizers.kl import KLConfig, KLToBase

dist.init_process_group("gloo")
model, batch = make_peft(targets=("q_proj", "v_proj", "lm_head"), perturb=True), make_batch()
inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
penalty = KLToBase(KLConfig(weight=1.0, chunk_size=4))
model.train()
expected = penalty.penalty(model, batch, model(**inputs)).item()
for layer in model.get_base_model().model.layers:
    fully_shard(layer)
fully_shard(model)
# after its forward the root keeps its own parameters (the LM head) gathered: the decoder-and-head path
value = penalty.penalty(model, batch, model(**inputs))
value.backward()
grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
reached = all(g is not None and float(g.full_tensor().abs().sum()) > 0 for g in grads)
# resharded (as with reshard_after_forward on the root, or offloading): the head cannot be called
# alone, so the reference is the wrapped model's own forward
outputs = model(**inputs)
model.reshard()
head_sharded = type(model.get_base_model().get_output_embeddings().weight).__name__ == "DTensor"
resharded = penalty.penalty(model, batch, outputs).item()
if dist.get_rank() == 0:
    print(json.dumps({"expected": expected, "value": value.item(), "gradient_reached": reached,
                      "head_sharded": head_sharded, "resharded": resharded}))
dist.destroy_process_group()
