"""Reading an offline W&B run back, for the tracking tests: `read_wandb_records` decodes a run's
`.wandb` file into `wandb_internal_pb2.Record` messages; `read_folder` gathers one run folder's
identity, config, history, summary and artifacts from them.

wandb 0.31 has no Python reader of its own (its `DataStore` was removed), so this reads the
LevelDB-style log it writes: 32 KiB blocks of chunks, each a crc32/length/type header, the
chunks of one record joined; a chunk whose checksum fails ends the read (a torn tail).
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

LOG_HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version
RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, chunk type (full, first, middle, last)
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4  # chunk types; 0 is the zero padding of a block's tail


def read_wandb_records(path: str | Path) -> Iterator[Any]:
    """Every record of a run's `.wandb` file, in order, as `wandb_internal_pb2.Record` messages."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, _ = LOG_HEADER.unpack_from(data)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a W&B run file")
    pos, parts = LOG_HEADER.size, b""
    while pos + RECORD_HEADER.size <= len(data):
        if BLOCK - pos % BLOCK < RECORD_HEADER.size:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = RECORD_HEADER.unpack_from(data, pos)
        chunk = data[pos + RECORD_HEADER.size: pos + RECORD_HEADER.size + length]
        if kind == 0 or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            break
        pos += RECORD_HEADER.size + length
        parts = chunk if kind in (FULL, FIRST) else parts + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def items(entries) -> dict:
    """History or summary items as a dict; a logged dict (a table, an image) arrives as one item
    per field under `nested_key` and is put back together."""
    out: dict = {}
    for item in entries:
        *parents, leaf = list(item.nested_key) or [item.key]
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = json.loads(item.value_json)
    return out


def read_folder(folder: str | Path) -> dict:
    """What one offline run folder holds: the run's id, name, group, job type and tags, its config,
    history rows (with `_step`), summary and artifacts, and its `files` directory."""
    folder = Path(folder)
    (path,) = folder.glob("run-*.wandb")
    got: dict = {"folder": folder, "files": folder / "files", "config": {}, "history": [], "summary": {},
                 "artifacts": []}
    for record in read_wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            got.update(id=run.run_id, name=run.display_name, group=run.run_group, job_type=run.job_type,
                       tags=list(run.tags))
        if kind in ("run", "config"):
            config = record.run.config if kind == "run" else record.config
            got["config"].update({i.key: json.loads(i.value_json) for i in config.update})
        elif kind == "history":
            got["history"].append(items(record.history.item))
        elif kind == "summary":
            got["summary"].update(items(record.summary.update))
        elif kind == "artifact":
            got["artifacts"].append({"name": record.artifact.name, "type": record.artifact.type,
                                     "metadata": json.loads(record.artifact.metadata or "{}")})
    return got
