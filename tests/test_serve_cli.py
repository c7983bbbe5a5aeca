"""configs/serve.yaml itself: valid for Ray Serve, typed args, and `serve run` of it answers the openai client."""

from __future__ import annotations

import io
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image
from ray.serve.schema import ServeDeploySchema

from cwm_ray.config import ConfigError, ServeConfig, ToyWorldConfig, TrainWorldModelConfig, from_dict, load
from cwm_ray.toyworld.idm_model import build_toy_idm
from cwm_ray.toyworld.render import render
from cwm_ray.toyworld.token_model import build_toy_token_world_model
from cwm_ray.toyworld.world import random_scene

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "serve.yaml"
ACTION = "remove the red circle"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png() -> bytes:
    world = ToyWorldConfig()
    buf = io.BytesIO()
    Image.fromarray(render(random_scene(random.Random(1), world), world)).save(buf, "PNG")
    return buf.getvalue()


def test_serve_yaml_is_a_valid_serve_config_with_typed_args() -> None:
    raw = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") else \
        ServeDeploySchema.parse_obj(raw)
    (app,) = schema.applications
    assert app.import_path == "cwm_ray.serve.app:build_app"
    cfg = from_dict(ServeConfig, app.args)
    # `make serve` serves the toy that learns the toy world: the token one `make toy-models` trains (issue 36)
    assert (cfg.world_model.backend, cfg.world_model.model) == ("token", "outputs/models/toy_token_world_model")
    assert cfg.idm.model == "outputs/models/toy_idm"
    # ... and `make toy-models` (the Makefile's TOY_WM) builds what it serves: the token config's export
    trained = load(TrainWorldModelConfig, REPO / "configs" / "train_token_world_model.yaml", [])
    (toy_wm,) = re.findall(r"^TOY_WM := (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert trained.train.export == cfg.world_model.model == str(Path(toy_wm).parent)
    assert trained.world_model.backend == "token"
    assert {d.name if hasattr(d, "name") else d["name"] for d in app.deployments} == {
        "WorldModel", "Verifier", "Ingress"}
    with pytest.raises(ConfigError, match="best_off"):
        from_dict(ServeConfig, {"best_off": 2})


def test_a_missing_model_is_one_clear_error(tmp_path: Path) -> None:
    from cwm_ray.serve.app import build_app

    with pytest.raises(ConfigError, match="make toy-models"):
        build_app({"world_model": {"model": str(tmp_path / "nothing" / "here")}})


def test_serve_run_of_the_config_file_answers_the_openai_client(tmp_path: Path) -> None:
    """The shipped file with only its model paths moved (to tiny models of the same kinds) and a free port."""
    build_toy_token_world_model(str(tmp_path / "wm"), resolution=32, hidden_size=32, num_layers=1, num_heads=2)
    build_toy_idm(str(tmp_path / "idm"), image_size=32, hidden_size=32, text_layers=1)
    raw = yaml.safe_load(CONFIG.read_text())
    port = _free_port()
    raw["http_options"]["port"] = port
    args = raw["applications"][0]["args"]
    args["world_model"]["model"] = str(tmp_path / "wm")
    args["idm"] = {"model": str(tmp_path / "idm"), "image_size": 32}
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(raw))

    env = os.environ | {"RAY_AUTH_MODE": "disabled", "CWM_API_KEYS": ""}
    env.pop("RAY_ADDRESS", None)
    serve_bin = str(Path(sys.executable).with_name("serve"))
    proc = subprocess.Popen([serve_bin, "run", str(config)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 240
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("serve run did not come up in 240 s")
        from openai import OpenAI

        result = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0).images.edit(
            image=("frame.png", _png(), "image/png"), prompt=ACTION, response_format="b64_json")
        assert len(result.data) == 1 and result.data[0].b64_json
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # serve run shuts the app and its Ray down on Ctrl-C
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
