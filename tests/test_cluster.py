"""The cluster configs (cluster/, configs/cluster/) are valid for the tools that will read them.

Nothing here starts Ray or reaches a network: cluster/aws.yaml goes through the same two functions `ray up`
runs first (prepare_config, then validate_config against Ray's ray-schema.json), the KubeRay manifests are
checked for the fields KubeRay's CRDs require, and every entrypoint, import path and config profile they
name is resolved against this repository (files, functions, typed configs), never assumed.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from cwm_ray import config as cwm_config
from cwm_ray.config import AnnotateConfig, TrainIDMConfig, TrainWorldModelConfig, load
from cwm_ray.serve.app import serve_config

ROOT = Path(__file__).resolve().parent.parent
AWS = ROOT / "cluster" / "aws.yaml"
KUBERAY = ROOT / "cluster" / "kuberay"
PROFILES = ROOT / "configs" / "cluster"
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}
# A config profile's file name says which job it is for.
PROFILE_CLASSES = {"annotate_": AnnotateConfig, "train_world_model_": TrainWorldModelConfig,
                   "train_idm_": TrainIDMConfig}


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _aws() -> dict[str, Any]:
    return _yaml(AWS)


def _manifests() -> list[tuple[Path, dict[str, Any]]]:
    docs = [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    assert docs, "no manifests in cluster/kuberay"
    return docs


def _ray_docs(kind: str | None = None) -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in _manifests() if d["kind"] in RAY_KINDS and (kind is None or d["kind"] == kind)]


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster spec inside any of the three kinds."""
    return {"RayCluster": lambda: doc["spec"], "RayJob": lambda: doc["spec"]["rayClusterSpec"],
            "RayService": lambda: doc["spec"]["rayClusterConfig"]}[doc["kind"]]()


def _containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group["template"]["spec"]["containers"]


def _quantity(value: Any) -> float:
    """A Kubernetes CPU quantity ("500m", "4", 4) in cores."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _gpus(group: dict[str, Any]) -> int:
    return int(_containers(group)[0]["resources"]["limits"].get("nvidia.com/gpu", 0))


def _cpus(group: dict[str, Any]) -> float:
    return _quantity(_containers(group)[0]["resources"]["limits"]["cpu"])


def _serve_applications(path: Path) -> list[dict[str, Any]]:
    return _yaml(path)["applications"]


# --------------------------------------------------------------------------------------------------
# cluster/aws.yaml
# --------------------------------------------------------------------------------------------------


def test_aws_config_passes_ray_autoscaler_validation():
    # What `ray up` does before it talks to AWS: fill Ray's AWS defaults, then check against ray-schema.json
    # plus the cross-field rules (head type exists, sum of min_workers <= max_workers, ...).
    prepared = prepare_config(copy.deepcopy(_aws()))
    validate_config(prepared)
    # Our empty command lists must survive the merge: Ray's defaults would pip-install another Ray.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands"):
        assert prepared[key] == [], key


def test_aws_validation_can_fail():
    # The check above is only worth something if a broken config fails it.
    broken = copy.deepcopy(_aws())
    broken["available_node_types"]["gpu_infer"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
    broken = copy.deepcopy(_aws())
    broken["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError):
        validate_config(prepare_config(broken))


def test_aws_node_types_scale_gpu_groups_from_zero():
    cfg = _aws()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must schedule no tasks or actors"
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    for name, node_type in workers.items():
        assert node_type["min_workers"] == 0, f"{name} must scale from zero"
        assert "InstanceType" in node_type["node_config"]
    gpu = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    assert any(t["resources"]["GPU"] == 1 and t["max_workers"] > 0 for t in gpu.values()), "single-GPU inference"
    assert any(t["resources"]["GPU"] >= 8 and t["max_workers"] > 0 for t in gpu.values()), "multi-GPU training"
    assert any(t["resources"].get("GPU", 0) == 0 and t["max_workers"] > 0 for t in workers.values()), "CPU decode"
    assert cfg["idle_timeout_minutes"] > 0
    assert cfg["max_workers"] == sum(t["max_workers"] for t in workers.values())


def test_aws_s3_access_is_an_instance_profile_not_keys():
    cfg = _aws()
    for name, node_type in cfg["available_node_types"].items():
        assert "Name" in node_type["node_config"]["IamInstanceProfile"] or \
            "Arn" in node_type["node_config"]["IamInstanceProfile"], name
    text = AWS.read_text() + "".join(p.read_text() for p in KUBERAY.glob("*.yaml"))
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY", text)
    # The profiles the config names are the ones cluster/aws_iam.sh creates.
    script = (ROOT / "cluster" / "aws_iam.sh").read_text()
    for node_type in cfg["available_node_types"].values():
        assert f"make_role {node_type['node_config']['IamInstanceProfile']['Name']} " in script


def test_one_image_everywhere_built_from_the_dockerfile():
    image = _aws()["docker"]["image"]
    for path, doc in _ray_docs():
        spec = _cluster_spec(doc)
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            assert _containers(group)[0]["image"] == image, path.name
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    assert image in dockerfile, "the Dockerfile's build command names the image the configs run"
    major_minor = ".".join(ray.__version__.split(".")[:2])
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", dockerfile, re.M).group(1)
    assert f":{major_minor}." in base and "py311" in base and "gpu" in base, base
    # torch first, then DeepSpeed without its ops, then the project (scripts/setup.sh's order).
    steps = ('pip install "torch==', "deepspeed>=", "pip install --no-deps -e")
    torch_at, ds_at, repo_at = (dockerfile.index(step) for step in steps)
    assert torch_at < ds_at < repo_at
    assert "DS_BUILD_OPS=0" in dockerfile
    assert re.search(r"^WORKDIR /app$", dockerfile, re.M)


# --------------------------------------------------------------------------------------------------
# cluster/kuberay/
# --------------------------------------------------------------------------------------------------


def test_kuberay_manifests_have_what_kuberay_requires():
    kinds = set()
    for path, doc in _manifests():
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"]["name"], path.name
        if doc["kind"] not in RAY_KINDS:
            continue
        kinds.add(doc["kind"])
        assert doc["apiVersion"] == "ray.io/v1", path.name
        spec = _cluster_spec(doc)
        assert spec["rayVersion"].startswith(".".join(ray.__version__.split(".")[:2]) + "."), path.name
        assert spec["enableInTreeAutoscaling"] is True, f"{path.name}: autoscaling"
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", f"{path.name}: the head schedules no heavy work"
        groups = spec["workerGroupSpecs"]
        assert groups, path.name
        names = [g["groupName"] for g in groups]
        assert len(set(names)) == len(names), path.name
        for group in [head, *groups]:
            assert isinstance(group["rayStartParams"], dict)  # required by KubeRay's v1alpha1 / older CRDs
            pod = group["template"]["spec"]
            assert pod["serviceAccountName"] == "cwm-ray", path.name
            container = pod["containers"][0]
            assert container["name"] and container["image"], path.name
            assert container["workingDir"] == "/app", f"{path.name}: jobs/… paths resolve from /app"
            for part in ("limits", "requests"):
                assert {"cpu", "memory"} <= set(container["resources"][part]), f"{path.name}: {part}"
        for group in groups:
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]
            if _gpus(group):
                requests = _containers(group)[0]["resources"]["requests"]
                assert requests["nvidia.com/gpu"] == _gpus(group)
                tolerations = group["template"]["spec"].get("tolerations", [])
                assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), group["groupName"]
        if doc["kind"] == "RayCluster":
            assert any(_gpus(g) == 0 for g in groups) and any(_gpus(g) > 0 for g in groups), "CPU and GPU groups"
    assert kinds == RAY_KINDS
    accounts = [d["metadata"]["name"] for _, d in _manifests() if d["kind"] == "ServiceAccount"]
    assert accounts == ["cwm-ray"]


def _entrypoint_script(entrypoint: str) -> tuple[Path, list[str]]:
    """`python jobs/x.py [--config F] k=v ...` → (the script, its arguments), as the job's shell splits it."""
    argv = shlex.split(entrypoint)
    assert argv[0] == "python" and argv[1].endswith(".py"), entrypoint
    return ROOT / argv[1], argv[2:]


def _module_defines(module: str, name: str) -> bool:
    """Whether `module` (found in this repository, not imported) defines or imports `name` at top level."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, f"no module {module}"
    assert Path(spec.origin).resolve().is_relative_to(ROOT), f"{module} is not this repository's"
    tree = ast.parse(Path(spec.origin).read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name == name:
            return True
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            return _module_defines(node.module, name) if (node.module or "").startswith("cwm_ray") else True
    return False


def _job_entry(script: Path) -> tuple[type, str]:
    """The config class and default YAML a `jobs/*.py` passes to run_job, checked to exist."""
    tree = ast.parse(script.read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "run_job"]
    assert len(calls) == 1, f"{script.name}: one run_job(...) call"
    main_fn, cls_name = (a.id for a in calls[0].args[:2])
    local = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    imported = {(a.asname or a.name): n.module for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert main_fn in local or _module_defines(imported[main_fn], main_fn), f"{script.name}: {main_fn}"
    default = next(k.value.value for k in calls[0].keywords if k.arg == "default_config")
    assert (ROOT / default).exists(), default
    return getattr(cwm_config, cls_name), default


def _split_configs(args: list[str]) -> tuple[list[Path], list[str]]:
    """An entrypoint's `--config FILE` layers (in order) and its other arguments."""
    files = [ROOT / a for flag, a in zip(args, args[1:], strict=False) if flag == "--config"]
    rest = [a for i, a in enumerate(args) if a != "--config" and (i == 0 or args[i - 1] != "--config")]
    return files, rest


def test_rayjob_entrypoints_are_real_jobs_with_valid_configs():
    scripts = set()
    for path, doc in _ray_docs("RayJob"):
        script, args = _entrypoint_script(doc["spec"]["entrypoint"])
        assert script.exists(), f"{path.name}: no {script}"
        cls, default = _job_entry(script)
        config_files, args = _split_configs(args)
        # The overrides in the manifest load through the job's typed config: a wrong key fails here.
        load(cls, config_files or ROOT / default, args)
        scripts.add(script.relative_to(ROOT).as_posix())
    assert {"jobs/annotate.py", "jobs/train_world_model.py"} <= scripts


def test_serve_import_paths_exist():
    sources = [*(ROOT / "configs").glob("serve*.yaml"), *PROFILES.glob("serve_*.yaml")]
    apps = [a for p in sources for a in _serve_applications(p)]
    apps += [a for _, d in _ray_docs("RayService") for a in yaml.safe_load(d["spec"]["serveConfigV2"])["applications"]]
    assert len(apps) >= 3
    for app in apps:
        module, function = app["import_path"].split(":")
        assert _module_defines(module, function), app["import_path"]
    assert not _module_defines("cwm_ray.serve.app", "no_such_builder")  # the check can fail


def test_rayservice_serves_configs_serve_yaml():
    reference = _serve_applications(ROOT / "configs" / "serve.yaml")
    (path, doc), = _ray_docs("RayService")
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    assert serve_config["applications"] == reference
    ServeDeploySchema.model_validate(serve_config)
    # Serve's deploy default host is 0.0.0.0, so the keys must reach every replica: from a Secret.
    spec = _cluster_spec(doc)
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        env = {e["name"]: e for e in _containers(group)[0].get("env", [])}
        ref = env["CWM_API_KEYS"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "cwm-api-keys" and not ref.get("optional", False)
    # The app's replicas fit its worker groups (no group would be needed that does not exist).
    for deployment in reference[0]["deployments"]:
        options = deployment.get("ray_actor_options", {})
        assert any(_cpus(g) >= options.get("num_cpus", 1) and _gpus(g) >= options.get("num_gpus", 0)
                   for g in spec["workerGroupSpecs"]), deployment["name"]


def test_gpu_serve_profile_differs_from_serve_yaml_only_where_documented():
    reference = _serve_applications(ROOT / "configs" / "serve.yaml")
    profile = _yaml(PROFILES / "serve_g5.yaml")
    ServeDeploySchema.model_validate(profile)
    gpu_apps = profile["applications"]

    def strip(apps: list[dict[str, Any]]) -> list[dict[str, Any]]:
        apps = copy.deepcopy(apps)
        for app in apps:  # the models come from configs/serve.yaml's toy paths or a model profile (and its root)
            for key in ("world_model", "idm", "profile", "root"):
                app["args"].pop(key, None)
            for deployment in app["deployments"]:
                deployment.get("ray_actor_options", {}).pop("num_gpus", None)
                deployment.get("ray_actor_options", {}).pop("num_cpus", None)
                deployment.get("autoscaling_config", {}).pop("max_replicas", None)
                deployment.pop("user_config", None)
        return apps

    assert strip(gpu_apps) == strip(reference)
    cfg = serve_config(gpu_apps[0]["args"])
    assert cfg.world_model.model != "toy" and cfg.idm.model.startswith("s3://")
    assert cwm_config.find_placeholders(cfg)[0] == "root=s3://your-bucket/cwm"  # refused by build_app until set
    gpus = {d["name"]: d.get("ray_actor_options", {}).get("num_gpus", 0) for d in gpu_apps[0]["deployments"]}
    assert gpus["WorldModel"] > 0 and gpus["Verifier"] > 0
    gpu_infer = _aws()["available_node_types"]["gpu_infer"]
    replicas = sum(d["autoscaling_config"]["max_replicas"] * d["ray_actor_options"]["num_gpus"]
                   for d in gpu_apps[0]["deployments"] if "autoscaling_config" in d)
    assert replicas <= gpu_infer["max_workers"] * gpu_infer["resources"]["GPU"]


def _serves_the_trained_pair(args: dict[str, Any], root: str) -> None:
    """A Serve app's args serve what the profile's stages trained under `root`: the base world model plus the LoRA
    adapter its training exported (never the adapter folder as the base), and the fine-tuned IDM."""
    cfg = serve_config(args)
    profile = ROOT / args["profile"]
    trained_wm = load(TrainWorldModelConfig, profile, [f"root={root}"])
    assert cfg.world_model.model == trained_wm.world_model.model  # the hub's base checkpoint
    assert cfg.world_model.adapter == trained_wm.train.export and trained_wm.world_model.lora.enabled
    assert cfg.idm.model == load(TrainIDMConfig, profile, [f"root={root}"]).train.export  # merged LoRA: a model
    assert cfg.root == root


def test_the_serve_recipes_set_the_root_and_serve_base_model_plus_adapter():
    """docs/cluster.md's yq recipes (AWS, KubeRay) once replaced the base model with the adapter-only export."""
    text = (ROOT / "docs" / "cluster.md").read_text()
    recipes = [r for r in re.findall(r"yq '(.*?)'", text, re.S) if ".applications[0]" in r]  # the app's args
    assert len(recipes) == 2 and all("configs/cluster/serve_g5.yaml" in text.split(r, 1)[1][:100] for r in recipes)
    for recipe in recipes:
        assert ".args.root = " in recipe and ".model =" not in recipe, recipe
        root = re.search(r'\.args\.root = "([^"]+)"', recipe).group(1)
        _serves_the_trained_pair(_serve_applications(PROFILES / "serve_g5.yaml")[0]["args"] | {"root": root}, root)


def test_the_one_gpu_serve_config_binds_loopback_and_fits_one_gpu():
    from cwm_ray.serve.app import check_open_endpoint, is_loopback

    local = _yaml(ROOT / "configs" / "serve_gpu_local.yaml")
    ServeDeploySchema.model_validate(local)
    assert is_loopback(local["http_options"]["host"])
    (app,) = local["applications"]
    deployments = {d["name"]: d for d in app["deployments"]}
    gpus = sum(d.get("num_replicas", 1) * d.get("ray_actor_options", {}).get("num_gpus", 0)
               for d in deployments.values())
    assert deployments["WorldModel"]["ray_actor_options"]["num_gpus"] > 0 and 0 < gpus <= 1
    assert all("autoscaling_config" not in d for d in deployments.values())  # one node: nothing to scale onto
    _serves_the_trained_pair(app["args"] | {"root": "s3://acme/cwm"}, "s3://acme/cwm")
    check_open_endpoint(serve_config(app["args"]), local["http_options"]["host"], environ={})  # no keys needed


# --------------------------------------------------------------------------------------------------
# configs/cluster/: profiles per cluster size, and how they map onto node types
# --------------------------------------------------------------------------------------------------


def _profile_class(path: Path) -> type:
    matches = [cls for prefix, cls in PROFILE_CLASSES.items() if path.name.startswith(prefix)]
    assert len(matches) == 1, f"{path.name}: name it annotate_*, train_world_model_* or train_idm_*"
    return matches[0]


def test_every_profile_loads_through_its_typed_config():
    profiles = [p for p in sorted(PROFILES.glob("*.yaml")) if not p.name.startswith("serve_")]
    assert {_profile_class(p) for p in profiles} == set(PROFILE_CLASSES.values())
    for path in profiles:
        load(_profile_class(path), path)


def _fits_annotation(cfg: AnnotateConfig, gpus_per_node: int, cpus_per_node: float, nodes: int) -> None:
    idm, rec, decode = cfg.idm_stage, cfg.recognition_stage, cfg.decode
    # One IDM and one recognition actor share a single GPU of an inference node.
    assert idm.num_gpus + rec.num_gpus <= gpus_per_node and idm.num_cpus + rec.num_cpus <= cpus_per_node
    assert idm.concurrency * idm.num_gpus + rec.concurrency * rec.num_gpus <= nodes * gpus_per_node
    assert decode.num_gpus == 0 and decode.num_cpus <= cpus_per_node


def _fits_training(cfg: TrainWorldModelConfig | TrainIDMConfig, train_groups: list[tuple[int, float, int]],
                   infer_cpus: float) -> None:
    scaling = cfg.scaling
    assert scaling.use_gpu and scaling.gpus_per_worker >= 1
    # More CPUs per worker than an inference node has: Train workers can only land on training nodes.
    assert scaling.cpus_per_worker > infer_cpus
    capacity = 0
    for gpus, cpus, nodes in train_groups:
        per_node = int(min(gpus // scaling.gpus_per_worker, cpus // scaling.cpus_per_worker))
        capacity = max(capacity, per_node * nodes)
    assert scaling.num_workers <= capacity, "not enough training nodes for the workers"


def test_annotation_profile_fits_the_inference_nodes():
    types = _aws()["available_node_types"]
    (path, doc), = [(p, d) for p, d in _ray_docs("RayJob") if "annotate.py" in d["spec"]["entrypoint"]]
    _, args = _entrypoint_script(doc["spec"]["entrypoint"])
    profile = _split_configs(args)[0]
    cfg = load(AnnotateConfig, profile)
    gpu_infer = types["gpu_infer"]["resources"]
    _fits_annotation(cfg, gpu_infer["GPU"], gpu_infer["CPU"], types["gpu_infer"]["max_workers"])
    (group,) = [g for g in _cluster_spec(doc)["workerGroupSpecs"] if _gpus(g)]
    _fits_annotation(cfg, _gpus(group), _cpus(group), group["maxReplicas"])
    with pytest.raises(AssertionError):  # the wiring check can fail: 9 IDM actors do not fit 8 GPUs
        _fits_annotation(load(AnnotateConfig, profile, ["idm_stage.concurrency=9"]), 1, 8, 8)


def test_training_profiles_fit_the_training_nodes():
    types = _aws()["available_node_types"]
    aws_train = [(t["resources"]["GPU"], t["resources"]["CPU"], t["max_workers"])
                 for t in types.values() if t["resources"].get("GPU", 0) > 1]
    infer_cpus = types["gpu_infer"]["resources"]["CPU"]
    for path in PROFILES.glob("train_*.yaml"):
        _fits_training(load(_profile_class(path), path), aws_train, infer_cpus)
    (path, doc), = [(p, d) for p, d in _ray_docs("RayJob") if "train_world_model.py" in d["spec"]["entrypoint"]]
    _, args = _entrypoint_script(doc["spec"]["entrypoint"])
    cfg = load(TrainWorldModelConfig, _split_configs(args)[0])
    groups = [g for g in _cluster_spec(doc)["workerGroupSpecs"] if _gpus(g)]
    # KubeRay's single-GPU pods (RayCluster, RayService) must not fit a Train worker either.
    k8s_infer_cpus = max(_cpus(g) for _, d in _ray_docs() for g in _cluster_spec(d)["workerGroupSpecs"]
                         if _gpus(g) == 1)
    _fits_training(cfg, [(_gpus(g), _cpus(g), g["maxReplicas"]) for g in groups], k8s_infer_cpus)
    with pytest.raises(AssertionError):  # 24 workers do not fit 2 nodes of 8 GPUs
        _fits_training(load(TrainWorldModelConfig, _split_configs(args)[0],
                            ["scaling.num_workers=24", "optim.batch_size=4"]), aws_train, infer_cpus)
