"""Evaluate a world model (+ IDM verifier) on an AURORA-format benchmark: best-of-N, metrics, judge, report.

    python jobs/evaluate.py                          # the toy models on the toy test set
    python jobs/evaluate.py bench=s3://bucket/aurora-bench/test.json world_model.model=<id|path> \\
        idm.model=<id|path> metrics.toy_judge=false judge.enabled=true judge.base_url=https://…/v1
    python jobs/evaluate.py endpoint=http://127.0.0.1:8000    # predictions from a running Serve app
"""

from cwm_ray.config import EvaluateConfig, exit_if_unbuilt, run_job


def main(cfg: EvaluateConfig) -> None:
    exit_if_unbuilt([("benchmark", cfg.bench, "jobs/make_toy_corpus.py"),
                     ("world model", cfg.world_model.model, "jobs/train_world_model.py"),
                     ("IDM", cfg.idm.model, "jobs/train_idm.py")],
                    hint="(`make toy-models` builds the corpus and both toy models)")
    from cwm_ray.evaluate.pipeline import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    run_job(main, EvaluateConfig, default_config="configs/evaluate.yaml")
