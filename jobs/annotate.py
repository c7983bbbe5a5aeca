"""Annotate video corpora into IDM-labelled, recognition-weighted, stratified triplets (Ray Data).

    python jobs/annotate.py                                    # the toy corpus with the trained toy IDM
    ray job submit --working-dir . -- python jobs/annotate.py \\
        'inputs=[{name: kinetics, uri: s3://bucket/kinetics/}, {name: ucf, uri: s3://bucket/ucf.jsonl}]' \\
        output=s3://bucket/annotated idm.model=s3://bucket/models/idm \\
        idm_stage.concurrency=8 idm_stage.num_gpus=1 idm_stage.batch_size=64 decode.num_cpus=1
"""

import sys

from cwm_ray import storage
from cwm_ray.config import AnnotateConfig, run_job


def main(cfg: AnnotateConfig) -> None:
    # The embedded default needs the toy corpus and a trained toy IDM; say how to make them if missing.
    if cfg.idm.model != "toy" and not storage.is_s3(cfg.idm.model) and "/" in cfg.idm.model \
            and not storage.exists(cfg.idm.model):
        if cfg.idm.model.startswith("outputs/"):
            sys.exit(f"error: no IDM at {cfg.idm.model}. Train the toy IDM first:\n"
                     "  .venv/bin/python jobs/make_toy_corpus.py && .venv/bin/python jobs/train_idm.py\n"
                     "(or run `make demo`, which does all of it)")
    from cwm_ray.annotate import annotate

    annotate(cfg)


if __name__ == "__main__":
    run_job(main, AnnotateConfig, default_config="configs/annotate.yaml")
