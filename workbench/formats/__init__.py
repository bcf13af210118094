"""The file formats other commands read: run.json (RunRecord), results.json (Results, Entry) with its
metric catalogue, compare.json and calibration.json. No torch."""
