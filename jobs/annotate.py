"""Annotate video corpora into IDM-labelled, recognition-weighted, stratified triplets (Ray Data).

    python jobs/annotate.py                                    # the toy corpus with the trained toy IDM
    python jobs/annotate.py --config configs/real/qwen25vl7b_ip2p.yaml root=s3://my-bucket/cwm --print-config
    ray job submit --working-dir . -- python jobs/annotate.py --config configs/real/qwen25vl7b_ip2p.yaml \\
        --config configs/cluster/annotate_g5_8x.yaml root=s3://my-bucket/cwm \\
        'inputs=[{name: kinetics, uri: s3://my-bucket/kinetics/}, {name: ucf, uri: s3://my-bucket/ucf.jsonl}]'

With a profile, the videos are ${root}/videos/ unless `inputs` (or `input=PATH`) names others; the IDM is
train_idm's export under ${root}/models/, and the triplets go to ${root}/annotated/<pair>, where the world
model's training reads them.
"""

import sys

from cwm_ray.config import AnnotateConfig
from cwm_ray.job import run_job


def main(cfg: AnnotateConfig) -> None:
    from cwm_ray import storage  # pyarrow's filesystems: for a run only, so --help answers at once

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
