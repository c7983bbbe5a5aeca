"""What every config shares: the error type, the choice check, the repository's paths, and the storage and
tracking sections every job has."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_OUTPUT_ROOT = "outputs"


class ConfigError(ValueError):
    """A config file or override that does not fit the job's typed config."""


def check_choice(key: str, value: str | None, choices: Sequence[str]) -> None:
    """Raise ConfigError unless `value` is one of `choices`.

    Why in `__post_init__`: OmegaConf's `to_object` builds every section through its dataclass, so a typo in
    a string setting is one line naming the key when the config is parsed, not an error row per video or a
    dead worker after Ray has started.
    """
    if value not in choices:
        raise ConfigError(f"bad value for config key '{key}': {value!r}; use one of {', '.join(map(str, choices))}")


@dataclass
class StorageConfig:
    """How to reach s3:// URIs. Local paths need nothing."""

    endpoint_url: str | None = None
    """S3 endpoint override (MinIO, moto, ...). Falls back to $AWS_ENDPOINT_URL(_S3)."""
    region: str | None = None
    """AWS region; falls back to $AWS_DEFAULT_REGION, then us-east-1."""
    retries: int = 5
    """Retry attempts for throttled or failed S3 calls (pyarrow's AWS standard retry strategy)."""


@dataclass
class TrackingConfig:
    """Experiment tracking in MLflow, through Ray's own integration (`ray.air.integrations.mlflow.setup_mlflow`):
    a run per job with the resolved config as its parameters, then its metrics (training: every `log_every` steps,
    on the rank-0 worker; evaluation: the summary table)."""

    enabled: bool = True
    """false = metrics only in the log and the job's own files."""
    uri: str | None = None
    """MLflow tracking URI: a tracking server (http://host:5000), `databricks`, or a directory for a local file
    store. None = $MLFLOW_TRACKING_URI, else outputs/mlruns (`mlflow ui --backend-store-uri outputs/mlruns`). On a
    cluster use a server or a directory every node shares: a worker node's disk goes with the node."""
    experiment: str = "cwm_ray"
    """MLflow experiment name (created when missing); each job's run is named after `train.name` or its output."""


ROOT_KEY = "root"
"""A profile's top-level storage root: each section gets it as its own `root` setting, so `${root}` in a section
resolves against the job's config, and `root=...` on the command line (or in Serve's args) moves every path."""
