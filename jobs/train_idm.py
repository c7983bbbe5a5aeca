"""Train the inverse dynamics model with Ray Train + DeepSpeed.

    python jobs/train_idm.py                                   # the toy IDM, from scratch, on CPU
    python jobs/train_idm.py --config configs/real/qwen25vl7b_ip2p.yaml root=s3://my-bucket/cwm --print-config
    ray job submit --working-dir . -- python jobs/train_idm.py --config configs/real/qwen25vl7b_ip2p.yaml \\
        --config configs/cluster/train_idm_p4d.yaml root=s3://my-bucket/cwm   # reads ${root}/aurora/train.json
"""

from cwm_ray.config import TrainIDMConfig
from cwm_ray.job import run_job


def main(cfg: TrainIDMConfig) -> None:
    from cwm_ray.train import train  # torch, peft and Ray Train: imported for a run only, so --help answers at once

    train(cfg)


if __name__ == "__main__":
    run_job(main, TrainIDMConfig, default_config="configs/train_idm.yaml")
