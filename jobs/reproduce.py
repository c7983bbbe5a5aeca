"""The paper's ablation table in miniature on the toy world, from nothing: on 2 cores about 80 minutes a seed for
its three regimes (63 for the from-scratch and fine-tuned rows, 20 for the single-model rows, measured on
2026-12-06), and 10 minutes of pretraining once (`'regimes=[scratch]'`: about 27 minutes a seed).

    python jobs/reproduce.py                                   # writes outputs/reproduce/{table.md,report/}
    python jobs/reproduce.py 'world_model_overrides=[optim.max_steps=200]' output=/tmp/quick
"""

from cwm_ray.config import ReproduceConfig
from cwm_ray.job import run_job


def main(cfg: ReproduceConfig) -> None:
    from cwm_ray.evaluate.reproduce import reproduce

    reproduce(cfg)


if __name__ == "__main__":
    run_job(main, ReproduceConfig, default_config="configs/reproduce.yaml")
