"""Fine-tune causal LMs with LoRA under measurable regularization."""

__version__ = "0.1.0"
