"""The IDM's accuracy: on an AURORA-format test set, or of the actions annotation kept.

    python jobs/evaluate_idm.py                                   # the toy IDM on the toy test set
    python jobs/evaluate_idm.py bench=null triplets=outputs/annotated/triplets   # annotation's kept actions
    python jobs/evaluate_idm.py --config configs/real/qwen25vl7b_ip2p.yaml root=s3://my-bucket/cwm --print-config
"""

import sys

from cwm_ray.config import EvaluateIDMConfig
from cwm_ray.job import exit_if_unbuilt, run_job


def main(cfg: EvaluateIDMConfig) -> None:
    exit_if_unbuilt([("benchmark", cfg.bench, "jobs/make_toy_corpus.py"),
                     ("IDM", cfg.idm.model if cfg.bench else None, "jobs/train_idm.py")])
    from cwm_ray.evaluate.idm import evaluate_idm

    try:
        evaluate_idm(cfg)
    except (ValueError, OSError) as exc:  # bad input or a missing file: one line, no traceback
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    run_job(main, EvaluateIDMConfig, default_config="configs/evaluate_idm.yaml")
