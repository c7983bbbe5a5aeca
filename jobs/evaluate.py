"""Evaluate a world model (+ IDM verifier) on an AURORA-format benchmark: best-of-N, metrics, judge, report.

    python jobs/evaluate.py                          # the toy models on the toy test set
    python jobs/evaluate.py --config configs/real/qwen25vl7b_ip2p.yaml root=s3://my-bucket/cwm --print-config
    python jobs/evaluate.py endpoint=http://127.0.0.1:8000    # predictions from a running Serve app

With a profile: AURORA-Bench from ${root}/aurora-bench/test.json, the base world model plus its LoRA adapter and
the fine-tuned IDM from ${root}/models/, the LLM judge (its key in $OPENAI_API_KEY, checked before anything
runs), the report to ${root}/eval/<pair>. Predictions are saved there before judging, so a re-run resumes.
"""

from cwm_ray.config import EvaluateConfig
from cwm_ray.job import exit_if_unbuilt, run_job


def main(cfg: EvaluateConfig) -> None:
    exit_if_unbuilt([("benchmark", cfg.bench, "jobs/make_toy_corpus.py"),
                     ("world model", cfg.world_model.model, "jobs/train_world_model.py"),
                     ("IDM", cfg.idm.model, "jobs/train_idm.py")],
                    hint="(`make toy-models` builds the corpus and both toy models)")
    from cwm_ray.evaluate.pipeline import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    run_job(main, EvaluateConfig, default_config="configs/evaluate.yaml")
