"""Reading an offline W&B run back, for the tracking tests: `read_wandb_records` decodes a run's
`.wandb` file into `wandb_internal_pb2.Record` messages.

wandb 0.31 has no Python reader of its own (its `DataStore` was removed), so this reads the
LevelDB-style log it writes: 32 KiB blocks of chunks, each a crc32/length/type header, the
chunks of one record joined; a chunk whose checksum fails ends the read (a torn tail).
"""

from __future__ import annotations

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
