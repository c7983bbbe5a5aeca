"""Write the toy corpus (videos + ground truth + AURORA-format gold sets) to a directory or s3:// prefix.

    python jobs/make_toy_corpus.py [--config configs/toy.yaml] [output=s3://bucket/toy] [num_videos=8]
"""

from cwm_ray.config import ToyCorpusConfig
from cwm_ray.job import run_job


def main(cfg: ToyCorpusConfig) -> None:
    from cwm_ray.toyworld.corpus import make_corpus  # video encoding and rendering: for a run only

    summary = make_corpus(cfg)
    print(
        f"toy corpus written to {summary['output']}: {summary['videos']} videos "
        f"({summary['frames']} frames), {summary['gold_train']} train / {summary['gold_test']} test gold "
        f"triplets in {summary['seconds']} s"
    )


if __name__ == "__main__":
    run_job(main, ToyCorpusConfig, default_config="configs/toy.yaml")
