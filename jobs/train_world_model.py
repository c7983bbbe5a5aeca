"""Train the world model (recognition-weighted loss) with Ray Train + DeepSpeed.

    python jobs/train_world_model.py                           # the toy world model, on CPU
    python jobs/train_world_model.py --config configs/real/qwen25vl7b_ip2p.yaml root=s3://my-bucket/cwm --print-config
    ray job submit --working-dir . -- python jobs/train_world_model.py \\
        --config configs/real/qwen25vl7b_ip2p.yaml --config configs/cluster/train_world_model_p4d.yaml \\
        root=s3://my-bucket/cwm     # AURORA + annotate's triplets under ${root}, the LoRA export to ${root}/models/
"""

from cwm_ray.config import TrainWorldModelConfig
from cwm_ray.job import run_job


def main(cfg: TrainWorldModelConfig) -> None:
    from cwm_ray.train import train  # torch, diffusers and Ray Train: for a run only, so --help answers at once

    train(cfg)


if __name__ == "__main__":
    run_job(main, TrainWorldModelConfig, default_config="configs/train_world_model.yaml")
