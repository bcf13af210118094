"""Loading base models, LoRA, fingerprints, and the base as the adapter-disabled model."""
