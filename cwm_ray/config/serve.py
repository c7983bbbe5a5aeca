"""Serving settings (cwm_ray/serve/): the best-of-N app's config and its limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cwm_ray.config.base import REPO_ROOT, StorageConfig
from cwm_ray.config.core import from_dict
from cwm_ray.config.models import IDMConfig, WorldModelConfig


@dataclass
class ServeLimits:
    """Per-request limits: a request beyond one is a 4xx naming the parameter, never work for a replica."""

    max_image_bytes: int = 4 * 1024 * 1024
    """Upload size of one image (multipart file or base64-decoded JSON field)."""
    max_pixels: int = 1024 * 1024
    """Width × height of an uploaded image and of a requested output `size`."""
    max_n: int = 8
    """Images returned per request (OpenAI's `n`)."""
    max_best_of: int = 16
    """Candidates sampled and verified per request: the search width of best-of-N."""
    max_prompt_chars: int = 1000
    max_rollout_actions: int = 16


@dataclass
class ServeConfig:
    """The `args` of the Serve application (`applications[].args` in configs/serve.yaml).

    Replicas, autoscaling, `num_gpus` and `@serve.batch` sizes are not here: they are Ray Serve's own
    per-deployment settings (`deployments:` with `user_config`), in the same file.
    """

    root: str | None = None
    """The storage root of a model profile (configs/real/): its sections write every path as `${root}/…`, so each
    stage reads what the one before it wrote. Set it once per run (`root=s3://<bucket>/<prefix>`); a placeholder
    bucket (s3://your-bucket/…) is refused before anything starts. Unused (None) by the toy YAMLs."""
    world_model: WorldModelConfig = field(default_factory=WorldModelConfig)
    idm: IDMConfig = field(default_factory=IDMConfig)
    """The verifier: best-of-N keeps the candidate under which the IDM finds the action most likely."""
    served_model_name: str = "cwm-world-model"
    """The model id clients see (`GET /v1/models`, OpenAI's `model` field)."""
    best_of: int = 4
    """Default search width when a request gives none (at least the request's `n`)."""
    api_keys_env: str = "CWM_API_KEYS"
    """Environment variable with comma-separated bearer keys; unset or empty = open: a warning is logged, and on a
    non-loopback host the app refuses to start unless `allow_open_endpoint`."""
    retries: int = 2
    """Times the ingress re-sends a call whose replica died (sampling is seeded, so a retry is identical)."""
    allow_open_endpoint: bool = False
    """Serve with no API keys on a non-loopback host (`http_options.host`, e.g. 0.0.0.0). Off, `build_app` refuses
    to start such an app: anyone who can reach the node could then run the GPUs."""
    limits: ServeLimits = field(default_factory=ServeLimits)
    storage: StorageConfig = field(default_factory=StorageConfig)


def serve_config(args: dict[str, Any] | None) -> ServeConfig:
    """The Serve application's `args` as a typed ServeConfig; `profile: PATH` lays them over a model profile's
    `serve` section (configs/real/), so the pair's models, sizes and sampling are written once for every stage, and
    `root:` moves its paths as on a job's command line. Here, not in cwm_ray.serve.app, so that a dry run of the
    args (`python -m cwm_ray.serve --print-config`) needs neither Ray Serve nor torch."""
    args = dict(args or {})
    profile = args.pop("profile", None)
    if profile is not None and not Path(profile).exists() and (REPO_ROOT / profile).exists():
        profile = str(REPO_ROOT / profile)  # a path relative to the repository, wherever `serve` runs
    return from_dict(ServeConfig, args, source="serve application args", config_file=profile)
