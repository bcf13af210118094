"""Self-distillation under two real data-parallel processes (gloo on CPU): each rank rewrites its
own share of the chunks once, and every rank trains on the same rewrites as one process does."""

import json

from tests.helpers import repo
from tests.training.test_base_replay_ranks import run_script

# 24 records at temperature 1: two chunks of prompts, 16 and 8
OVERRIDES = ["data.max_examples=24", "data.val_fraction=0", "data.self_distill.temperature=1.0",
             "data.self_distill.max_new_tokens=8", "train.batch_size=4", "train.eval_steps=null", "train.max_steps=1"]

WORKER = '''
import json, os, sys
from pathlib import Path
from workbench.config.recipe import load_recipe
from workbench.distributed import shutdown_distributed
from workbench.training import self_distill
from workbench.training.run import build_trainer

calls, real = [], self_distill.rewrite_chunk
self_distill.rewrite_chunk = lambda *a, **k: (calls.append(a[3]), real(*a, **k))[1]
out = Path(sys.argv[1])
trainer, record = build_trainer(load_recipe(sys.argv[2], sys.argv[3:]), out / "run")
(out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(
    {"calls": calls, "train": sorted(ex["input_ids"] for ex in trainer.train_dataset),
     "record": {k: v for k, v in record.data["self_distill"].items() if k not in ("path", "seconds")}}))
shutdown_distributed()
'''


def launch(tmp_path, processes):
    out = tmp_path / f"p{processes}"
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run_script(script, [str(out), repo("recipes/tiny.yaml"), *OVERRIDES], processes, tmp_path)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


def test_two_ranks_rewrite_their_own_chunks_once_and_train_on_the_same_rewrites(tmp_path):
    (one,) = launch(tmp_path, 1)
    ranks = launch(tmp_path, 2)
    assert one["calls"] == [0, 1]
    assert [r["calls"] for r in ranks] == [[0], [1]]  # each rank its own chunk, once
    assert ranks[0]["train"] == ranks[1]["train"] == one["train"]  # the rewrites do not depend on the world size
    assert ranks[0]["record"] == ranks[1]["record"] == one["record"]
    assert one["record"]["cached"] is False and one["record"]["n_records"] == 24
