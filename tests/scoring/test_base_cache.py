"""The base cache: computed once under concurrency, never torn, recomputed when unreadable."""

import multiprocessing
import time

import torch

from workbench.scoring.base_cache import BaseCache, ragged, unragged


def compute_slowly(marker):
    def compute():
        with open(marker, "a") as f:
            f.write("computed\n")
        time.sleep(0.5)  # long enough for the other process to arrive while this one computes
        return {"x": torch.arange(1000, dtype=torch.float64)}
    return compute


def worker(root, marker, queue):
    cache = BaseCache("model", root=root)
    tensors = cache.get("general", ("settings",), compute_slowly(marker))
    queue.put((float(tensors["x"].sum()), cache.hits, cache.misses))


def test_concurrent_evals_compute_a_component_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(tmp_path / "cache", tmp_path / "marker", queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert (tmp_path / "marker").read_text() == "computed\n"
    assert {r[0] for r in results} == {float(sum(range(1000)))}
    assert sorted(len(r[1]) for r in results) == [0, 1]  # one miss, then one hit
    assert not list((tmp_path / "cache").glob("*.tmp")) and not list((tmp_path / "cache").glob(".*tmp"))


def test_a_torn_entry_is_recomputed(tmp_path):
    cache = BaseCache("model", root=tmp_path)
    path = cache.path("general", "settings")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00\x01 not safetensors")
    tensors = cache.get("general", ("settings",), lambda: {"x": torch.ones(3)})
    assert tensors["x"].tolist() == [1.0, 1.0, 1.0] and cache.misses == ["general"]
    assert BaseCache("model", root=tmp_path).get("general", ("settings",), lambda: 1 / 0)["x"].sum() == 3


def test_keys_separate_models_and_settings(tmp_path):
    a = BaseCache("model-a", root=tmp_path).path("general", {"k": 1})
    assert a != BaseCache("model-b", root=tmp_path).path("general", {"k": 1})
    assert a != BaseCache("model-a", root=tmp_path).path("general", {"k": 2})


def test_ragged_round_trip():
    rows = [torch.tensor([1.0, 2.0]), torch.tensor([]), torch.tensor([3.0])]
    stored = ragged(rows)
    assert [r.tolist() for r in unragged(stored["values"], stored["offsets"])] == [[1.0, 2.0], [], [3.0]]
