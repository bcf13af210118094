"""Fine-tune causal LMs with LoRA under measurable regularization."""

import logging

__version__ = "0.1.0"

# bitsandbytes (imported by peft) warns at every CPU-only import that an optional kernel package
# is missing; that is expected here and says nothing about the user's run.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
