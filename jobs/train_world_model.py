"""Train the world model (recognition-weighted loss) with Ray Train + DeepSpeed.

    python jobs/train_world_model.py                           # the toy world model, on CPU
    python jobs/train_world_model.py world_model.model=timbrooks/instruct-pix2pix \\
        world_model.lora.enabled=true world_model.resolution=256 scaling.num_workers=8 \\
        scaling.use_gpu=true train.storage_path=s3://bucket/runs \\
        data.sources='[{uri: s3://bucket/aurora/train.json}, {uri: s3://bucket/annotated/triplets, weight: 3}]'
"""

from cwm_ray.config import TrainWorldModelConfig, run_job
from cwm_ray.train import train

if __name__ == "__main__":
    run_job(train, TrainWorldModelConfig, default_config="configs/train_world_model.yaml")
