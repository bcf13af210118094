"""The file formats other commands read: run.json (RunRecord) and results.json with its metric catalogue. No torch."""
