import os

import pytest

from workbench.modeling.tiny import tiny_tokenizer

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()
