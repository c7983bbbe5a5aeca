"""Train the inverse dynamics model with Ray Train + DeepSpeed.

    python jobs/train_idm.py                                   # the toy IDM, from scratch, on CPU
    python jobs/train_idm.py idm.model=<hf id|path|s3://> idm.lora.enabled=true \\
        scaling.num_workers=8 scaling.use_gpu=true train.storage_path=s3://bucket/runs \\
        data.sources='[{uri: s3://bucket/aurora/train.json}]'
"""

from cwm_ray.config import TrainIDMConfig, run_job
from cwm_ray.train import train

if __name__ == "__main__":
    run_job(train, TrainIDMConfig, default_config="configs/train_idm.yaml")
