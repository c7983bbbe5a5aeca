"""Evaluation (paper §Evaluation): AURORA-format sets, predictions with best-of-N, metrics, an LLM judge,
and an HTML report. `cwm_ray.evaluate.pipeline.evaluate(cfg)` runs it all; `jobs/evaluate.py` is its CLI."""
