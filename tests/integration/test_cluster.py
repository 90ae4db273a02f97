"""cluster/: what users apply to real clusters stays valid.

Static checks (no Ray runtime, a few seconds): the cluster-launcher YAML against the JSON schema that
ships with Ray and Ray's own `ray up` config checks; the KubeRay manifests' kinds, image, GPU
requests and entrypoints (parsed by the CLI's own parser, so a flag that does not exist fails); the
RayService's serveConfigV2 against Serve's schema and against serve_config.yaml (drift fails).

One integration test starts a real two-node Ray cluster on this machine (`ray start`, a head and a
worker node), submits the RayJob's training entrypoint through the Ray Jobs API and checks the
checkpoint it wrote to the shared storage.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import typing
import uuid
from pathlib import Path

import pytest
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CLUSTER = PROJECT_ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER = CLUSTER / "aws.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
DOCS = PROJECT_ROOT / "docs" / "cluster.md"
MANIFESTS = {
    "raycluster": ("RayCluster", KUBERAY / "raycluster.yaml"),
    "rayjob-train": ("RayJob", KUBERAY / "rayjob-train.yaml"),
    "rayjob-tune": ("RayJob", KUBERAY / "rayjob-tune.yaml"),
    "rayjob-score": ("RayJob", KUBERAY / "rayjob-score.yaml"),
    "rayservice": ("RayService", KUBERAY / "rayservice.yaml"),
}
GPU_WORKER_TYPE = "gpu_worker"  # in aws.yaml
GPU_GROUP = "gpu"  # in the KubeRay RayCluster (and the RayJobs' copies of it)
STORAGE_VARIABLE = "PNEUMONIA_STORAGE"
# The one deliberate difference between serve_config.yaml and the RayService's serveConfigV2.
SERVE_CONFIG_DIFFERENCES = [("applications", 0, "args", "artifact")]


# ----------------------------------------------------------------------------- helpers


def load_yaml(path: Path):
    with open(path) as handle:
        return yaml.safe_load(handle)


@functools.cache
def _launcher_text() -> str:
    return LAUNCHER.read_text()


def launcher() -> dict:
    return copy.deepcopy(yaml.safe_load(_launcher_text()))


@functools.cache
def _manifest(name: str) -> dict:
    return load_yaml(MANIFESTS[name][1])


def manifest(name: str) -> dict:
    return copy.deepcopy(_manifest(name))


def ray_schema() -> dict:
    """The cluster-launcher schema of the installed Ray (the file `ray up` validates against)."""
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert path.is_file(), f"Ray no longer ships {path}"
    return json.loads(path.read_text())


def cluster_spec(name: str) -> dict:
    """The RayCluster spec inside any manifest kind."""
    doc = manifest(name)
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])


def pod_specs(spec: dict) -> list[tuple[str, dict]]:
    """(group name, pod spec) of the head and every worker group."""
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    pods += [(group["groupName"], group["template"]["spec"]) for group in spec["workerGroupSpecs"]]
    return pods


def worker_group(spec: dict, name: str) -> dict:
    groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    assert name in groups, f"no worker group {name!r} (have {sorted(groups)})"
    return groups[name]


def cpu_quantity(value) -> float:
    """A Kubernetes CPU quantity ("7", "500m", 2) in cores."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def dockerfile_workdir() -> str:
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert workdirs, "cluster/Dockerfile sets no WORKDIR"
    return workdirs[-1]


def repo_path(path: str) -> Path:
    """A path as an entrypoint sees it (relative to the image's WORKDIR, or absolute in the image)
    mapped to this checkout."""
    workdir = dockerfile_workdir().rstrip("/") + "/"
    if path.startswith(workdir):
        path = path[len(workdir):]
    assert not Path(path).is_absolute(), f"{path} is outside the project's folder in the image"
    return PROJECT_ROOT / path


def parse_entrypoint(entrypoint: str):
    """argv of a `pneumonia ...` entrypoint, parsed by the CLI's own parser (unknown flags fail)."""
    from pneumonia.cli import build_parser

    argv = shlex.split(entrypoint)
    assert argv and argv[0] == "pneumonia", f"entrypoint does not run the pneumonia CLI: {entrypoint!r}"
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as exit_:
        raise AssertionError(f"not valid `pneumonia` arguments (exit {exit_.code}): {entrypoint!r}") from None


def entrypoint_config(args):
    """The experiment config the entrypoint would run, built the way the CLI builds it."""
    from pneumonia.cli.commands import train_overrides
    from pneumonia.config import load_config, parse_set_option, with_overrides

    config_file = repo_path(args.config) if args.config else None
    if config_file is not None:
        assert config_file.is_file(), f"the entrypoint's --config {args.config} is not in the repository"
    if args.command == "train":
        overrides = train_overrides(args)
    elif args.command == "tune":
        overrides = {"run.storage": args.storage, "run.name": args.name, "tune.num_samples": args.samples,
                     **parse_set_option(args.set or [])}
    else:
        raise AssertionError(f"a RayJob should train or tune, not {args.command!r}")
    return with_overrides(load_config(config_file), overrides)


def differences(a, b, path=()) -> list[tuple]:
    """Paths at which two parsed YAML documents differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                found.append(path + (key,))
            else:
                found += differences(a[key], b[key], path + (key,))
        return found
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [diff for i, (x, y) in enumerate(zip(a, b)) for diff in differences(x, y, path + (i,))]
    return [] if a == b else [path]


def _models_in(annotation) -> list[type]:
    """The pydantic model classes inside a field's annotation (through Optional, Union, List...)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def unknown_keys(value: dict, model, where: str = "") -> list[str]:
    """Keys that `model` (a Serve schema) does not define, at any depth.

    ServeDeploySchema ignores unknown keys and accepts any dict as autoscaling_config, so a typo
    (`min_replica`) would pass validation and be dropped silently on deploy.
    """
    fields = model.model_fields
    names = set(fields) | {field.alias for field in fields.values() if field.alias}
    found = []
    for key, item in value.items():
        if key not in names:
            found.append(f"{where}{key}")
            continue
        for sub in _models_in(fields[key].annotation):
            items = item if isinstance(item, list) else [item]
            for index, element in enumerate(items):
                if isinstance(element, dict):
                    suffix = f"[{index}]" if isinstance(item, list) else ""
                    found += unknown_keys(element, sub, f"{where}{key}{suffix}.")
    return found


def job_runtime_env(spec: dict) -> dict | None:
    """A RayJob's runtime environment, as KubeRay passes it to the Jobs API."""
    return yaml.safe_load(spec["runtimeEnvYAML"]) if spec.get("runtimeEnvYAML") else None


def serve_config_v2() -> dict:
    return yaml.safe_load(manifest("rayservice")["spec"]["serveConfigV2"])


def check_serve_config(config: dict) -> None:
    """What Serve checks on deploy, plus unknown keys and the autoscaling values."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)
    assert unknown_keys(config, ServeDeploySchema) == []
    for app in config["applications"]:
        for deployment in app.get("deployments", []):
            if deployment.get("autoscaling_config") is not None:
                AutoscalingConfig.model_validate(deployment["autoscaling_config"])


# ----------------------------------------------------------------------------- cluster launcher


def test_launcher_yaml_validates_against_the_schema_ray_ships():
    import jsonschema

    jsonschema.validate(launcher(), ray_schema())


def _unknown_node_type_key(config):
    config["available_node_types"][GPU_WORKER_TYPE]["gpus"] = 1


def _gpu_count_as_text(config):
    config["available_node_types"][GPU_WORKER_TYPE]["resources"]["GPU"] = "one"


def _no_provider(config):
    del config["provider"]


def _misspelt_setup_commands(config):
    config["setup_command"] = config.pop("setup_commands")


@pytest.mark.parametrize("breakage", [_unknown_node_type_key, _gpu_count_as_text, _no_provider,
                                      _misspelt_setup_commands])
def test_a_broken_copy_of_the_launcher_yaml_fails_the_schema(breakage):
    """The check above can fail: the same schema refuses each of these edits."""
    import jsonschema

    broken = launcher()
    breakage(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema())


def test_launcher_yaml_passes_the_checks_ray_up_runs_before_contacting_the_cloud():
    """`ray up` merges the provider's defaults, checks the Docker settings, then validates again."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(launcher())
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_launcher_has_a_cpu_head_and_an_autoscaling_gpu_worker_type():
    config = launcher()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p")), "the head should be a CPU instance"
    gpu = types[GPU_WORKER_TYPE]
    assert gpu["resources"]["GPU"] >= 1 and gpu["resources"]["CPU"] >= 1
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= config["max_workers"]
    assert gpu["max_workers"] > gpu["min_workers"], "GPU workers should scale"
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p")), "GPU workers need a GPU instance"


def test_launcher_installs_the_project_on_every_node():
    config = launcher()
    mounted = [remote for remote, local in config["file_mounts"].items()
               if (PROJECT_ROOT / local).resolve() == PROJECT_ROOT]
    assert mounted, "file_mounts should copy the repository (run `ray up` from the repository root)"
    remote = mounted[0]
    assert remote == dockerfile_workdir(), "the launcher and the image should keep the project in the same folder"
    installs = [command for command in config["setup_commands"]
                if "pip install" in command and re.search(rf"-e\s+{re.escape(remote)}(\s|$)", command)]
    assert installs, f"no setup command installs the project from {remote}"
    assert ".gitignore" in config["rsync_filter"], "a local virtualenv or data folder would be uploaded"
    image = config["docker"]["image"]
    _assert_ray_image(image)


def test_launcher_sets_the_shared_storage_once():
    text = _launcher_text()
    exports = re.findall(rf"export {STORAGE_VARIABLE}=(\S+?)'", text)
    assert len(exports) == 1, f"{STORAGE_VARIABLE} should be exported exactly once"
    assert exports[0].startswith(("s3://", "gs://")), "checkpoints must go to storage every node reaches"
    assert text.count(exports[0]) == 1, "the storage URI should appear once (jobs use $PNEUMONIA_STORAGE)"
    exporting = [command for command in launcher()["setup_commands"] if f"export {STORAGE_VARIABLE}=" in command]
    assert exporting and "~/.bashrc" in exporting[0], "every Ray process must see it (ray start sources ~/.bashrc)"


def launcher_storage() -> str:
    return re.findall(rf"export {STORAGE_VARIABLE}=(\S+?)'", _launcher_text())[0]


# ----------------------------------------------------------------------------- image


def _assert_ray_image(image: str) -> None:
    import ray

    assert image == f"rayproject/ray:{ray.__version__}-py311-gpu", (
        f"{image}: the base image must run the Ray version the project pins ({ray.__version__}), Python 3.11, CUDA")


def test_dockerfile_builds_on_the_pinned_ray_and_installs_the_project():
    text = DOCKERFILE.read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert len(bases) == 1
    _assert_ray_image(bases[0])
    workdir = dockerfile_workdir()
    copied = [part for line in re.findall(r"^COPY\s+(.+)$", text, flags=re.MULTILINE)
              for part in shlex.split(line)[:-1] if not part.startswith("--")]
    for source in copied:
        assert (PROJECT_ROOT / source).exists(), f"COPY {source}: not in the repository"
    for needed in ("pyproject.toml", "pneumonia", "tune_configs", "serve_app.py"):
        assert needed in copied, f"the image needs {needed}"
    assert re.search(r"^RUN pip install .*\s\.(\s|$)", text, flags=re.MULTILINE), "the image should install the project"
    assert re.search(rf"PYTHONPATH={re.escape(workdir)}\b", text), "serve_app.py must be importable in the image"
    assert re.search(r"TF_USE_LEGACY_KERAS=1", text)


# ----------------------------------------------------------------------------- KubeRay manifests


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_parses_with_the_right_api_version_and_kind(name):
    kind, path = MANIFESTS[name]
    documents = list(yaml.safe_load_all(path.read_text()))
    assert len(documents) == 1, f"{path.name}: one resource per file"
    doc = documents[0]
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), "not a valid Kubernetes name"


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_every_ray_pod_runs_the_project_image_of_the_pinned_ray(name):
    import ray

    spec = cluster_spec(name)
    assert spec["rayVersion"] == ray.__version__
    assert spec.get("enableInTreeAutoscaling") is True, "the cluster should autoscale"
    images = {container["image"] for _, pod in pod_specs(spec) for container in pod["containers"]}
    expected = {container["image"] for _, pod in pod_specs(cluster_spec("raycluster"))
                for container in pod["containers"]}
    assert len(expected) == 1 and images == expected, f"{name}: every Ray container should run {expected}"
    assert not next(iter(images)).startswith("rayproject/"), "the image must contain the project (cluster/Dockerfile)"
    assert next(iter(images)) in DOCKERFILE.read_text(), "cluster/Dockerfile should say how to build this image"
    assert next(iter(images)) in DOCS.read_text(), "docs/cluster.md should say how to build this image"


def test_the_gpu_worker_group_requests_nvidia_gpus_and_scales_from_zero():
    spec = cluster_spec("raycluster")
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "training should never land on the head"
    for container in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {}), "the head needs no GPU"
    group = worker_group(spec, GPU_GROUP)
    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert group["maxReplicas"] > group["minReplicas"]
    (container,) = group["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    requests = container["resources"]["requests"]
    assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]
    tolerated = {t.get("key") for t in group["template"]["spec"].get("tolerations", [])}
    assert "nvidia.com/gpu" in tolerated, "GPU nodes are usually tainted nvidia.com/gpu"


@pytest.mark.parametrize("name", ["rayjob-train", "rayjob-tune", "rayjob-score"])
def test_rayjobs_run_on_the_raycluster_spec(name):
    """One cluster definition: a RayJob's cluster is raycluster.yaml's (change both or neither)."""
    assert differences(cluster_spec(name), cluster_spec("raycluster")) == []
    spec = manifest(name)["spec"]
    assert spec.get("shutdownAfterJobFinishes") is True, "a RayJob's GPU nodes should go away with the job"


@pytest.mark.parametrize("name", ["rayjob-train", "rayjob-tune", "rayjob-score"])
def test_rayjob_runtime_env_does_not_clash_with_the_drivers(name):
    """ray.init refuses a job whose runtime_env sets an env var that the driver's ray.init also
    sets (pneumonia.local_ray.WORKER_ENV): the job fails at once (the integration test found this)."""
    from pneumonia.local_ray import WORKER_ENV

    runtime_env = job_runtime_env(manifest(name)["spec"]) or {}
    assert not set(runtime_env.get("env_vars", {})) & set(WORKER_ENV)
    assert "working_dir" not in runtime_env, "the code is in the image; a local working_dir would be uploaded"


@pytest.mark.parametrize("name,command", [("rayjob-train", "train"), ("rayjob-tune", "tune")])
def test_rayjob_entrypoint_is_a_valid_pneumonia_command(name, command):
    args = parse_entrypoint(manifest(name)["spec"]["entrypoint"])
    assert args.command == command
    config = entrypoint_config(args)  # also: every value is valid and the --config file exists
    assert args.storage and args.storage.startswith("s3://"), "checkpoints must go to shared storage"
    assert args.data and args.data.startswith("s3://"), "the data must be readable from every pod"
    assert config.scaling.gpu, "the job should train on the GPU workers"
    assert config.run.storage == args.storage


@pytest.mark.parametrize("extra,message", [
    ("--epochz 3", "not valid `pneumonia` arguments"),  # a flag that does not exist
    ("--workers zero", "not valid `pneumonia` arguments"),  # a value of the wrong type
])
def test_a_broken_entrypoint_fails_the_check(extra, message):
    entrypoint = manifest("rayjob-train")["spec"]["entrypoint"] + " " + extra
    with pytest.raises(AssertionError, match=message):
        parse_entrypoint(entrypoint)


def test_an_invalid_value_in_an_entrypoint_fails_the_check():
    # Out-of-range numbers are refused while the arguments are parsed (as the CLI would, exit 2).
    with pytest.raises(AssertionError, match="not valid `pneumonia` arguments"):
        parse_entrypoint(manifest("rayjob-train")["spec"]["entrypoint"] + " --workers 0")


def _gpu_capacity(cluster: str) -> tuple[float, int, int]:
    """(CPUs per GPU worker node, GPUs per node, max nodes) of the GPU worker type."""
    if cluster == "aws.yaml":
        node = launcher()["available_node_types"][GPU_WORKER_TYPE]
        return float(node["resources"]["CPU"]), int(node["resources"]["GPU"]), int(node["max_workers"])
    group = worker_group(cluster_spec("raycluster"), GPU_GROUP)
    (container,) = group["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    return cpu_quantity(limits["cpu"]), int(limits["nvidia.com/gpu"]), int(group["maxReplicas"])


@pytest.mark.parametrize("cluster", ["aws.yaml", "kuberay"])
@pytest.mark.parametrize("name", ["rayjob-train", "rayjob-tune"])
def test_the_job_fits_the_gpu_workers(cluster, name):
    """Ray waits forever for resources no node type can offer: every worker (and a trial's driver)
    must fit one GPU node, and the sweep's concurrent trials must fit the maximum node count."""
    from pneumonia.training.launcher import DRIVER_CPU

    config = entrypoint_config(parse_entrypoint(manifest(name)["spec"]["entrypoint"]))
    cpus, gpus, max_nodes = _gpu_capacity(cluster)
    concurrent = config.tune.max_concurrent_trials if config.tune else 1
    driver = DRIVER_CPU if config.tune else 0.0
    assert config.scaling.cpus_per_worker + driver <= cpus, f"a worker needs more CPUs than a {cluster} GPU node has"
    assert config.scaling.workers * concurrent <= max_nodes * gpus, (
        f"{concurrent} x {config.scaling.workers} GPU workers, but {cluster} scales to {max_nodes * gpus} GPUs")


def test_every_job_uses_the_same_shared_storage():
    storages = {name: parse_entrypoint(manifest(name)["spec"]["entrypoint"]).storage
                for name in ("rayjob-train", "rayjob-tune")}
    assert set(storages.values()) == {launcher_storage()}, f"{storages} vs aws.yaml's {launcher_storage()}"


# ----------------------------------------------------------------------------- RayService


def test_rayservice_serve_config_validates_against_the_serve_schema():
    config = serve_config_v2()
    check_serve_config(config)
    for app in config["applications"]:
        for deployment in app["deployments"]:
            autoscaling = deployment.get("autoscaling_config")
            assert autoscaling, f"{deployment['name']} should autoscale"
            assert autoscaling["max_replicas"] > autoscaling["min_replicas"] >= 1
            assert "num_replicas" not in deployment or deployment["num_replicas"] == "auto"


@pytest.mark.parametrize("breakage", [
    lambda c: c["applications"][0]["deployments"][0]["autoscaling_config"].update(min_replica=1),
    lambda c: c["applications"][0]["deployments"][0].update(max_replica=4),
    lambda c: c["applications"][0]["deployments"][0]["autoscaling_config"].update(min_replicas=99),
    lambda c: c["applications"][0].pop("import_path"),
], ids=["autoscaling-typo", "deployment-typo", "min-above-max", "no-import-path"])
def test_a_broken_serve_config_fails_the_check(breakage):
    config = serve_config_v2()
    breakage(config)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's ValidationError or our AssertionError
        check_serve_config(config)


def test_rayservice_serves_serve_config_yaml_apart_from_the_artifact_location():
    """serveConfigV2 is the project's serve config: any other difference is drift and fails."""
    local = load_yaml(PROJECT_ROOT / "serve_config.yaml")  # as it is now, not a copy
    service = serve_config_v2()
    drift = [path for path in differences(service, local) if path not in SERVE_CONFIG_DIFFERENCES]
    assert drift == [], (
        f"cluster/kuberay/rayservice.yaml's serveConfigV2 differs from serve_config.yaml at {drift}: copy the "
        "change over (the artifact location is the only intended difference)")
    assert differences(service, local) == SERVE_CONFIG_DIFFERENCES
    assert Path(service["applications"][0]["args"]["artifact"]).is_absolute()


def test_rayservice_artifact_is_synced_into_every_pod():
    artifact = serve_config_v2()["applications"][0]["args"]["artifact"]
    for group, pod in pod_specs(cluster_spec("rayservice")):
        volumes = {volume["name"] for volume in pod.get("volumes", [])}
        for container in pod["containers"]:
            mounts = [m for m in container.get("volumeMounts", [])
                      if artifact == m["mountPath"] or artifact.startswith(m["mountPath"].rstrip("/") + "/")]
            assert mounts, f"{group}: the artifact {artifact} is not on a volume in {container['name']}"
            assert mounts[0]["name"] in volumes
            syncs = [init for init in pod.get("initContainers", [])
                     if any(m["name"] == mounts[0]["name"] for m in init.get("volumeMounts", []))
                     and artifact in init.get("args", []) + init.get("command", [])]
            assert syncs, f"{group}: nothing fills {artifact} before Ray starts"


def test_rayservice_pods_run_serve_in_throughput_mode():
    """HAProxy in front of the replicas, as `pneumonia serve` runs it: set on every Ray pod,
    since Ray reads it when its processes start."""
    from pneumonia.serving.local_service import THROUGHPUT_MODE

    for group, pod in pod_specs(cluster_spec("rayservice")):
        for container in pod["containers"]:
            env = {item["name"]: item.get("value") for item in container.get("env", [])}
            assert THROUGHPUT_MODE.items() <= env.items(), f"{group}/{container['name']}: {env}"


def test_the_launcher_sets_serve_throughput_mode_for_every_node():
    from pneumonia.serving.local_service import THROUGHPUT_MODE

    text = _launcher_text()
    for name, value in THROUGHPUT_MODE.items():
        assert f"{name}={value}" in text


def test_rayservice_workers_can_hold_every_replica_at_its_maximum():
    spec = cluster_spec("rayservice")
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    wanted = sum(deployment["autoscaling_config"]["max_replicas"]
                 * deployment.get("ray_actor_options", {}).get("num_cpus", 1)
                 for app in serve_config_v2()["applications"] for deployment in app["deployments"])
    capacity = 0.0
    for group in spec["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        capacity += group["maxReplicas"] * cpu_quantity(container["resources"]["limits"]["cpu"])
    assert wanted <= capacity, f"replicas at max need {wanted} CPUs, the worker groups scale to {capacity}"
    head_ports = {port["containerPort"] for port in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert serve_config_v2()["http_options"]["port"] in head_ports


def test_serve_app_import_path_exists_in_the_image():
    import ast

    module, _, attribute = serve_config_v2()["applications"][0]["import_path"].partition(":")
    source = PROJECT_ROOT / f"{module.replace('.', '/')}.py"
    assert source.is_file()
    tree = ast.parse(source.read_text())
    names = {alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
             for alias in node.names}
    names |= {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert attribute in names, f"{source.name} defines no {attribute}"


# ----------------------------------------------------------------------------- docs


def _doc_commands() -> list[str]:
    """Shell commands in docs/cluster.md's code blocks, with continuation lines joined."""
    # Every fenced block paired in order (a ```text block must not shift the pairing), shell ones kept.
    blocks = [body for language, body in re.findall(r"```(\w*)\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
              if language in ("", "bash", "sh", "shell")]
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip()
                     and not line.lstrip().startswith("#")]
    return commands


def test_docs_cover_every_asset_and_their_pneumonia_commands_parse():
    text = DOCS.read_text()
    for path in [LAUNCHER, DOCKERFILE, *(path for _, path in MANIFESTS.values())]:
        assert str(path.relative_to(PROJECT_ROOT)) in text, f"docs/cluster.md does not mention {path.name}"
    submitted = [command.split(" -- ", 1)[1] for command in _doc_commands() if " -- pneumonia " in command]
    assert len(submitted) >= 2, "docs/cluster.md should show `ray job submit ... -- pneumonia ...`"
    for entrypoint in submitted:
        parse_entrypoint(entrypoint)


# ----------------------------------------------------------------------------- a real multi-node cluster


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        ports.append(sock.getsockname()[1])
    for sock in sockets:
        sock.close()
    return ports


def _node_ports() -> list[str]:
    """Every fixed-by-default port of a node, freshly chosen: another Ray may run on this machine."""
    names = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port"]
    return [f"{name}={port}" for name, port in zip(names, _free_ports(len(names)))]


def _processes_using(marker: str) -> list[int]:
    """Live processes whose command line mentions marker (our cluster's unique temp dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((line for line in (entry / "status").read_text().splitlines()
                          if line.startswith("State:")), "")
        except OSError:
            continue
        if marker in cmdline and "zombie" not in state:
            found.append(int(entry.name))
    return found


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:  # the whole group is gone
        pass


class LocalCluster:
    """A head node and a worker node, each a `ray start --block` in its own process group.

    Its own temp dir (so `ray.init()` elsewhere on this machine never finds it), its own ports, and
    its own token (Ray 2.60 turns token authentication on when ~/.ray/auth_token exists).
    """

    def __init__(self, ray_cli: str, cwd: Path, env: dict[str, str], logs: Path):
        self.ray_cli, self.cwd, self.logs = ray_cli, cwd, logs
        token = uuid.uuid4().hex
        self.env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
        self.headers = {"Authorization": f"Bearer {token}"}
        # Short: Ray's socket paths (<temp>/session_<date>_<pid>/sockets/...) must stay under 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="pnc-", dir="/tmp")
        self.gcs_port, self.dashboard_port, self.client_port, metrics_port = _free_ports(4)
        # The dashboard's own Prometheus port is fixed by default (44227): the test session's Ray has it.
        self.env["DASHBOARD_METRIC_PORT"] = str(metrics_port)
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.processes: list[subprocess.Popen] = []

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        process = subprocess.Popen(
            [self.ray_cli, "start", "--block", f"--temp-dir={self.temp_dir}", "--num-gpus=0",
             "--object-store-memory=200000000", "--disable-usage-stats", *_node_ports(), *args],
            cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.processes.append(process)
        return process

    def log_tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}"
                         for path in sorted(self.logs.glob("*.log")))

    def _session_logs(self, chars: int = 1500) -> str:
        """The tails of the head session's dashboard logs: why an API did not answer."""
        logs = sorted(Path(self.temp_dir).glob("session_2*/logs"))
        if not logs:
            return ""
        names = ("dashboard.log", "dashboard.err", "dashboard_JobHead.log", "dashboard_JobHead.err")
        return "\n".join(f"--- {name}\n{(logs[-1] / name).read_text(errors='replace')[-chars:]}"
                         for name in names if (logs[-1] / name).is_file())

    def _wait(self, what: str, ready, deadline_s: float) -> None:
        deadline = time.monotonic() + deadline_s
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise AssertionError(f"`ray start` exited ({process.returncode}) while waiting for {what}\n"
                                         + self.log_tail())
            try:
                if ready():
                    return
                last_error = "answered, but not ready"
            except Exception as error:  # noqa: BLE001 - not up yet; kept for the failure message
                last_error = f"{type(error).__name__}: {str(error)[:500]}"
            time.sleep(1)
        raise AssertionError(f"timed out waiting for {what} (last: {last_error})\n" + self.log_tail()
                             + "\n" + self._session_logs())

    def client(self):
        """A Jobs API client of this cluster. Ray's client takes $RAY_ADDRESS (or
        $RAY_API_SERVER_ADDRESS) over the address it is given, and in a test session that names
        the session's own Ray, whose dashboard refuses this cluster's token: hidden while it is made."""
        from ray.job_submission import JobSubmissionClient

        hidden = {name: os.environ.pop(name) for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if name in os.environ}
        try:
            return JobSubmissionClient(self.dashboard, headers=self.headers)
        finally:
            os.environ.update(hidden)

    def alive_nodes(self) -> list[dict]:
        """The state API's alive nodes (node_id, is_head_node, resources_total, ...)."""
        import requests

        response = requests.get(f"{self.dashboard}/api/v0/nodes", headers=self.headers, timeout=10, params={
            "filter_keys": "state", "filter_predicates": "=", "filter_values": "ALIVE", "detail": "true"})
        response.raise_for_status()
        return response.json()["data"]["result"]["result"]

    def start_head(self, cpus: int) -> None:
        self._start("head", ["--head", f"--port={self.gcs_port}", f"--num-cpus={cpus}",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={self.dashboard_port}",
                             f"--ray-client-server-port={self.client_port}"])
        # Patient: a busy 2-core machine has taken over 2 minutes to bring the dashboard up.
        self._wait("the head's Jobs API", lambda: self.client().list_jobs() is not None, 300)

    def start(self, head_cpus: int, worker_cpus: int) -> None:
        self.start_head(head_cpus)
        self._start("worker", [f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={worker_cpus}"])
        self._wait("two alive nodes", lambda: len(self.alive_nodes()) == 2, 120)

    def stop(self, markers: tuple[str, ...] = (), grace_s: float = 5.0) -> list[int]:
        """Stop both nodes: SIGTERM to both process groups, then SIGKILL to what is left of them
        after grace_s (a head takes about 40 s to stop by itself, and this cluster is thrown away).

        Returns the pids of this cluster's processes (their command line names its temp dir or one
        of markers) that outlived their process group; those are killed too.
        """
        for process in self.processes:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(process.poll() is None for process in self.processes):
            time.sleep(0.5)
        for process in self.processes:
            _signal_group(process, signal.SIGKILL)  # the rest of the group (raylet, GCS, workers)
            process.wait(timeout=10)
        markers = (self.temp_dir, *markers)
        deadline = time.monotonic() + 10
        while (left := [pid for marker in markers for pid in _processes_using(marker)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


def _ray_cli() -> str:
    candidate = Path(sys.executable).parent / "ray"
    ray_cli = str(candidate) if candidate.is_file() else shutil.which("ray")
    if ray_cli is None:
        pytest.skip("the `ray` command is not installed")
    try:
        subprocess.run([ray_cli, "start", "--help"], check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"`ray start` is not usable here: {error}")
    return ray_cli


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_the_rayjob_training_entrypoint_runs_on_a_two_node_cluster(synthetic_data, tmp_path):
    """`ray start` a head and a worker node; submit rayjob-train.yaml's entrypoint through the Jobs
    API, as KubeRay does, with overrides for a tiny CPU run; the checkpoint lands in shared storage.

    The head offers no CPUs (as in the manifests), so the driver runs on the head and the Ray Train
    worker on the worker node. The storage is passed as --storage "$PNEUMONIA_STORAGE", the variable
    set in every node's environment (as cluster/aws.yaml does), so the shell on the cluster expands it.
    """
    from ray.job_submission import JobStatus

    ray_cli = _ray_cli()
    storage = tmp_path / "shared-storage"  # one folder both nodes see, as S3 or NFS on a real cluster
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update({
        # The image puts `pneumonia` on PATH; here it is this virtualenv's.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        STORAGE_VARIABLE: str(storage),
        "RAY_USAGE_STATS_ENABLED": "0",
    })
    job = manifest("rayjob-train")["spec"]
    overrides = ["--data", str(synthetic_data), "--workers", "1", "--epochs", "1", "--image-size", "64",
                 "--batch-size", "16", "--name", "multinode", "--set", "scaling.gpu=false"]
    entrypoint = f"{job['entrypoint']} {shlex.join(overrides)} --storage \"${STORAGE_VARIABLE}\""
    parse_entrypoint(entrypoint.replace(f"${STORAGE_VARIABLE}", str(storage)))  # valid flags, before starting anything

    # The image's WORKDIR is the checkout; Ray starts there, so --config tune_configs/... resolves.
    cluster = LocalCluster(ray_cli, cwd=PROJECT_ROOT, env=env, logs=logs)
    started = time.monotonic()
    try:
        cluster.start(head_cpus=0, worker_cpus=2)
        nodes = {node["is_head_node"]: node for node in cluster.alive_nodes()}
        assert nodes[True]["resources_total"].get("CPU", 0) == 0 and nodes[False]["resources_total"]["CPU"] == 2
        print(f"cluster up in {time.monotonic() - started:.1f}s")

        client = cluster.client()
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=job_runtime_env(job))
        deadline = time.monotonic() + 420
        terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
        while (status := client.get_job_status(job_id)) not in terminal and time.monotonic() < deadline:
            time.sleep(2)
        job_logs = client.get_job_logs(job_id)
        print(f"job {status} after {time.monotonic() - started:.1f}s")
        if status not in terminal:
            client.stop_job(job_id)
        assert status == JobStatus.SUCCEEDED, f"job {job_id}: {status}\n{job_logs[-6000:]}\n{cluster.log_tail()}"
    finally:
        stopping = time.monotonic()
        leftovers = cluster.stop(markers=(str(storage),))  # the driver's command line names the storage
        print(f"cluster stopped in {time.monotonic() - stopping:.1f}s")
    assert leftovers == [], f"cluster processes outlived `ray start`: {leftovers}"

    # --json: the driver's last JSON line is the result (Ray may log after it).
    result = next(json.loads(line) for line in reversed(job_logs.splitlines())
                  if line.startswith("{") and '"best_checkpoint"' in line)
    checkpoint = Path(result["best_checkpoint"])
    assert checkpoint.parent == storage / "multinode", f"{checkpoint} is not in the shared storage {storage}"
    assert (checkpoint / "model.keras").is_file() and (checkpoint / "pneumonia.json").is_file()
    assert result["epochs_completed"] == 1
    info = json.loads((checkpoint / "pneumonia.json").read_text())
    assert info["epoch"] == 1
    config = info["config"]
    assert config["run"]["storage"] == str(storage)  # "$PNEUMONIA_STORAGE" was expanded on the cluster
    assert config["data"]["augment"]["enabled"] is True  # --config tune_configs/xraynet.yaml was read
    assert config["scaling"]["gpu"] is False and config["data"]["image_size"] == 64
