"""Base-sample replay under two real data-parallel processes (gloo on CPU, about 40 s): each rank
generates its own chunks of the pool once, every rank ends up with the same whole pool, and the
ranks' batches hold disjoint shares of it that together cover it."""

import json
import os
import subprocess
import sys

from tests.helpers import REPO, repo
from tests.training.test_distributed import free_port

# 32 task examples, per-device batch 4 at ratio 0.5: 2 task + 2 replay a batch, 16 batches an epoch,
# 32 replay slots: one pass over a pool of 32 samples, generated as two chunks of 16
OVERRIDES = ["regularizers.base_replay.num_samples=32", "regularizers.base_replay.max_new_tokens=8",
             "regularizers.base_replay.ratio=0.5", "train.batch_size=4", "data.max_examples=32",
             "data.val_fraction=0", "train.eval_steps=null", "train.max_steps=1"]

WORKER = '''
import json, os, sys
from pathlib import Path
from workbench.config.recipe import load_recipe
from workbench.distributed import shutdown_distributed
from workbench.training import base_replay
from workbench.training.run import build_trainer

calls, real = [], base_replay.generate_chunk
base_replay.generate_chunk = lambda *a, **k: (calls.append(a[3]), real(*a, **k))[1]
out = Path(sys.argv[1])
trainer, record = build_trainer(load_recipe(sys.argv[2], sys.argv[3:]), out / "run")
n_task = record.data["base_replay"]["n_task"]
pool = [ex["input_ids"] for ex in trainer.train_dataset[n_task:]]
batches = [[ids[mask.bool()].tolist() for ids, mask in zip(b["input_ids"], b["attention_mask"])]
           for b in trainer.get_train_dataloader()]
(out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(
    {"calls": calls, "pool": pool, "batches": batches, "record": record.data["base_replay"]}))
shutdown_distributed()
'''


def launch(tmp_path, processes):
    out = tmp_path / f"p{processes}"
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run_script(script, [str(out), repo("recipes/tiny.yaml"), *OVERRIDES], processes, tmp_path)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


def run_script(script, args, processes, tmp_path):
    """`script ARGS` in 1 process or under `accelerate launch` in several, as test_distributed runs the CLI."""
    env = {**os.environ, "WORKBENCH_CACHE": str(tmp_path / f"cache{processes}"), "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port())]
    cmd = [*launcher, str(script)] if processes > 1 else [sys.executable, str(script)]
    done = subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_ranks_generate_their_chunks_and_replay_disjoint_shares_of_the_same_pool(tmp_path):
    (one,) = launch(tmp_path, 1)
    ranks = launch(tmp_path, 2)
    assert one["calls"] == [0, 1]
    assert [r["calls"] for r in ranks] == [[0], [1]]  # each rank its own chunk, once
    assert ranks[0]["pool"] == ranks[1]["pool"] == one["pool"]  # the pool does not depend on the world size
    assert all(not r["record"]["cached"] and r["record"]["num_samples"] == 32 for r in ranks)
    pool = {tuple(row): i for i, row in enumerate(one["pool"])}
    shares = []
    for r in ranks:
        assert len(r["batches"]) == 8  # 16 batches an epoch, every other one
        assert all(len(b) == 4 and sum(tuple(row) in pool for row in b) == 2 for b in r["batches"])
        shares.append([pool[tuple(row)] for b in r["batches"] for row in b if tuple(row) in pool])
    assert len(set(shares[0])) == len(set(shares[1])) == 16
    assert not set(shares[0]) & set(shares[1])
    assert set(shares[0]) | set(shares[1]) == set(range(32))
