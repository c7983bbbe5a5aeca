"""The Serve application: `build_app(args)` is the `import_path` of configs/serve.yaml.

    serve run configs/serve.yaml                 # local, in the foreground
    serve deploy configs/serve.yaml              # onto a running cluster (KubeRay: the same file's app)

`args` is a `ServeConfig` (typed, unknown keys are errors), optionally laid over a model profile's `serve`
section: `serve run cwm_ray.serve.app:build_app profile=configs/real/qwen25vl7b_ip2p.yaml root=s3://my-bucket/cwm`
(the profile's base model plus the LoRA adapter its training wrote under `root`). A dry run of the args, with no
Ray and no model: `python -m cwm_ray.serve --print-config configs/cluster/serve_g5.yaml root=...`. Replicas,
autoscaling, `num_gpus` and batch sizes are Ray Serve's per-deployment settings in the same file, so a
cluster operator tunes them without touching Python.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime (a string
# annotation on a Serve ingress method is not resolved, and the JSON body would become a query parameter).
import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from cwm_ray import storage
from cwm_ray.config import (
    ConfigError,
    ServeConfig,
    find_placeholders,
    from_dict,
    placeholder_message,
    serve_config,
    to_dict,
)
from cwm_ray.serve.api import PredictRequest, RolloutRequest, Service, create_app, playground_html
from cwm_ray.serve.deployments import VerifierDeployment, WorldModelDeployment

app = create_app()


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    """HTTP in, best-of-N out: checks the request, then awaits the WorldModel and Verifier replicas."""

    def __init__(self, world_model: DeploymentHandle, verifier: DeploymentHandle, cfg: dict[str, Any]) -> None:
        self.service = Service(world_model, verifier, from_dict(ServeConfig, cfg))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        return HTMLResponse(playground_html())

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return await self.service.health()

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self.service.authorize(request)
        return self.service.models()

    @app.post("/v1/images/edits")
    async def images_edits(self, request: Request) -> dict[str, Any]:
        self.service.authorize(request)
        return await self.service.images_edits(request)

    @app.post("/v1/predict")
    async def predict(self, body: PredictRequest, request: Request) -> dict[str, Any]:
        self.service.authorize(request)
        return await self.service.predict(body)

    @app.post("/v1/rollout")
    async def rollout(self, body: RolloutRequest, request: Request) -> dict[str, Any]:
        self.service.authorize(request)
        return await self.service.rollout(body)


def _resolved(cfg: ServeConfig) -> ServeConfig:
    """Relative model paths are taken from where the app is built (the repo root for `serve run`), and a
    missing local model is a clear error here rather than a replica that fails to start over and over."""
    cfg = dataclasses.replace(cfg, world_model=storage.with_local_paths(cfg.world_model),
                              idm=storage.with_local_paths(cfg.idm))
    for field, model in (("world_model", cfg.world_model.model), ("idm", cfg.idm.model)):
        looks_local = not storage.is_s3(model) and (model.startswith((".", "/", "~")) or model.count("/") >= 2)
        if model != "toy" and looks_local and not Path(model).exists():
            raise ConfigError(f"{field}.model: no model at {model}. Train the toy models with `make toy-models`, "
                              f"or set args.{field}.model to a Hugging Face id, a local path or an s3:// URI.")
    return cfg


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: assume it is reachable from elsewhere
        return False


def check_open_endpoint(cfg: ServeConfig, host: str | None, environ: Mapping[str, str] | None = None) -> None:
    """Refuse an app bound beyond loopback with no API keys, unless `allow_open_endpoint` says it is meant.

    Why here: `build_app` runs in Serve's build task, whose environment is the app's `runtime_env` (the one the
    replicas get), so an empty key variable here is an open endpoint there. Before, it was a log warning that a
    cluster operator was unlikely to read, and `http_options.host: 0.0.0.0` exposed the GPUs to anyone.
    """
    environ = os.environ if environ is None else environ
    if host is None or is_loopback(host) or cfg.allow_open_endpoint:
        return
    if any(k.strip() for k in environ.get(cfg.api_keys_env, "").split(",")):
        return
    raise ConfigError(f"http_options.host is {host}, reachable from other machines, and ${cfg.api_keys_env} is empty "
                      f"in the replicas' environment: set it (e.g. the app's runtime_env.env_vars.{cfg.api_keys_env}, "
                      f"or the Secret in cluster/kuberay/rayservice.yaml), bind 127.0.0.1, or set "
                      f"args.allow_open_endpoint: true to serve an open endpoint on purpose")


def serve_http_host() -> str | None:
    """The host Serve's HTTP proxies bind (`http_options.host`), from the running Serve controller; None when
    there is none to ask (e.g. `build_app` called outside Ray, as tests do)."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        from ray.serve.context import _get_global_client  # Serve keeps no public getter for http_options

        client = _get_global_client(raise_if_no_controller_running=False)
        return None if client is None else client.http_config.host
    except Exception:  # noqa: BLE001 (an unknown host skips the check; the Ingress still warns when open)
        return None


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The application graph: Ingress → (WorldModel, Verifier). Called by `serve run` / `serve deploy`."""
    cfg = serve_config(args)
    if found := find_placeholders(cfg):  # before a replica asks for a GPU and fails to load from it
        raise ConfigError(placeholder_message(found))
    cfg = _resolved(cfg)
    from cwm_ray.preflight import preflight

    preflight(cfg)  # models on S3 or the Hub: found, and fetchable
    check_open_endpoint(cfg, serve_http_host())
    largest = cfg.limits.max_best_of
    world_model = WorldModelDeployment.bind(to_dict(cfg.world_model), largest)
    verifier = VerifierDeployment.bind(to_dict(cfg.idm), largest)
    return Ingress.bind(world_model, verifier, to_dict(cfg))
