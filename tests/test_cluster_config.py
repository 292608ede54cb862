"""cluster.yaml and kubernetes/rayjob.yaml, checked offline (no cluster is started).

cluster.yaml must pass Ray's own launcher validation (and broken copies must
not), and both files must say what deqray needs: the Ray that pyproject.toml
pins, a head that offers TRAIN_DRIVER and takes no CPU work, GPU workers for
Ray Train and CPU workers for Ray Data, shared s3:// storage and token auth.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
RAYJOB = ROOT / "kubernetes" / "rayjob.yaml"

# rayproject/ray:2.60.0-py311-gpu -> ("2.60.0", "3.11")
IMAGE_RE = re.compile(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)(?:-py(\d)(\d+))?(?:-[\w.]+)*")


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def _pyproject_project() -> dict:
    """[project]'s dependencies and requires-python (tomllib, or a regex on 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    if tomllib is not None:
        project = tomllib.loads(text)["project"]
        return {
            "dependencies": project["dependencies"],
            "requires-python": project["requires-python"],
        }
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)
    python = re.search(r'^requires-python = "([^"]+)"', text, re.M)
    assert block and python, "pyproject.toml: no dependencies / requires-python found"
    return {
        "dependencies": re.findall(r'^\s*"([^"]+)"', block.group(1), re.M),
        "requires-python": python.group(1),
    }


def _requirements() -> dict[str, Requirement]:
    return {(r := Requirement(d)).name.lower(): r for d in _pyproject_project()["dependencies"]}


def _ray_pin() -> SpecifierSet:
    ray = _requirements()["ray"]
    assert ray.specifier, "pyproject.toml does not pin ray"
    return ray.specifier


def _image_versions(image: str) -> tuple[str, str | None]:
    m = IMAGE_RE.fullmatch(image)
    assert m, f"{image}: not a rayproject/ray image with a Ray version in its tag"
    return m.group(1), (f"{m.group(2)}.{m.group(3)}" if m.group(2) else None)


def _assert_image_matches_pin(image: str) -> None:
    ray_version, python = _image_versions(image)
    pin = _ray_pin()
    assert pin.contains(ray_version), f"{image}: Ray {ray_version}, pyproject pins ray{pin}"
    if python is not None:
        requires = SpecifierSet(_pyproject_project()["requires-python"])
        assert requires.contains(python), f"{image}: Python {python}, project needs {requires}"


def _worker_types(cfg: dict) -> dict[str, dict]:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def _gpu_worker_types(cfg: dict) -> list[str]:
    return [k for k, v in _worker_types(cfg).items() if v["resources"].get("GPU", 0) >= 1]


def _cpu_worker_types(cfg: dict) -> list[str]:
    return [
        k
        for k, v in _worker_types(cfg).items()
        if v["resources"].get("GPU", 0) == 0 and v["resources"].get("CPU", 0) >= 1
    ]


def _ray_start_commands(cfg: dict, key: str) -> list[str]:
    return [c for c in cfg[key] if "ray start" in c]


def _token_auth_problems(cfg: dict) -> list[str]:
    """What keeps token auth from working on the launched cluster (empty: nothing)."""
    problems = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = _ray_start_commands(cfg, key)
        if not starts:
            problems.append(f"{key}: no `ray start`")
        problems += [
            f"{key}: no RAY_AUTH_MODE=token in {c!r}"
            for c in starts
            if "RAY_AUTH_MODE=token" not in c
        ]
    mounts = cfg.get("file_mounts", {})
    token_paths = [remote for remote in mounts if remote.endswith(".ray/auth_token")]
    if not token_paths:
        problems.append("file_mounts: no token file for ~/.ray/auth_token")
    return problems


@pytest.fixture(scope="module")
def cluster_cfg() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


def _validate(cfg: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


# --------------------------------------------------------------------------- #
# cluster.yaml: Ray's own validation
# --------------------------------------------------------------------------- #


def test_cluster_yaml_passes_rays_validation(cluster_cfg):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster_cfg))
    validate_config(prepared)
    # the defaults did not replace our node types
    assert set(prepared["available_node_types"]) == set(cluster_cfg["available_node_types"])
    assert prepared["head_node_type"] == cluster_cfg["head_node_type"]
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["cache_stopped_nodes"] is False
    # integers, as written (the schema also lets 4.0 through)
    for name, node_type in cluster_cfg["available_node_types"].items():
        for key, value in node_type["resources"].items():
            assert type(value) is int, f"{name}.resources.{key}: {value!r}"


@pytest.mark.parametrize("breakage", ["head type renamed", "head type deleted"])
def test_validation_rejects_a_missing_head_node_type(cluster_cfg, breakage):
    broken = copy.deepcopy(cluster_cfg)
    if breakage == "head type renamed":
        broken["head_node_type"] = "no-such-type"
    else:
        del broken["available_node_types"][broken["head_node_type"]]
    with pytest.raises(ValueError, match=re.escape("`head_node_type` must be one of")):
        _validate(broken)


@pytest.mark.parametrize(
    "kind, key, value",
    [("gpu", "GPU", 1.5), ("cpu", "CPU", "four"), ("head", "TRAIN_DRIVER", 0.01)],
)
def test_validation_rejects_non_integer_resources(cluster_cfg, kind, key, value):
    node_type = {
        "gpu": _gpu_worker_types(cluster_cfg)[0],
        "cpu": _cpu_worker_types(cluster_cfg)[0],
        "head": cluster_cfg["head_node_type"],
    }[kind]
    broken = copy.deepcopy(cluster_cfg)
    broken["available_node_types"][node_type]["resources"][key] = value
    with pytest.raises(jsonschema.ValidationError) as info:
        _validate(broken)
    assert info.value.validator == "type"
    assert info.value.message == f"{value!r} is not of type 'integer'"
    assert list(info.value.path) == ["available_node_types", node_type, "resources", key]


def test_validation_rejects_a_negative_resource(cluster_cfg):
    broken = copy.deepcopy(cluster_cfg)
    broken["available_node_types"][_gpu_worker_types(cluster_cfg)[0]]["resources"]["GPU"] = -1
    with pytest.raises(jsonschema.ValidationError, match="-1 is less than the minimum of 0"):
        _validate(broken)


# --------------------------------------------------------------------------- #
# cluster.yaml: what deqray needs
# --------------------------------------------------------------------------- #


def test_image_and_setup_match_pyprojects_ray_pin(cluster_cfg):
    docker = cluster_cfg["docker"]
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    images += [
        t["docker"]["worker_image"]
        for t in cluster_cfg["available_node_types"].values()
        if "worker_image" in t.get("docker", {})
    ]
    assert images
    for image in images:
        _assert_image_matches_pin(image)
    # the project is installed on every node, and the install is checked to keep the pinned Ray
    setup = cluster_cfg["setup_commands"]
    assert any(re.search(r"pip install .*-e ~/deqray\b", c) for c in setup)
    assert cluster_cfg["file_mounts"]["~/deqray"] == "."
    prefix = str(_ray_pin()).removeprefix("==").removesuffix("*")  # "2.60."
    assert any(f"startswith('{prefix}')" in c for c in setup), setup


def test_head_offers_train_driver_and_no_cpus(cluster_cfg):
    head = cluster_cfg["available_node_types"][cluster_cfg["head_node_type"]]
    # the name deqray's Tune trials request
    assert '"TRAIN_DRIVER"' in (ROOT / "deqray" / "tune" / "runner.py").read_text()
    assert isinstance(head["resources"].get("TRAIN_DRIVER"), int)
    assert head["resources"]["TRAIN_DRIVER"] >= 1
    assert head["resources"].get("CPU") == 0  # no Ray Data tasks or training workers there
    assert head["resources"].get("GPU", 0) == 0


def _gpus_the_shipped_studies_need() -> int:
    need = 0
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        study = yaml.safe_load(path.read_text())
        res = study.get("resources", {})
        need = max(
            need,
            study.get("concurrency", 1) * res.get("workers", 1) * res.get("gpus_per_worker", 0),
        )
    return need


def test_gpu_workers_fit_the_shipped_studies(cluster_cfg):
    gpu_types = _gpu_worker_types(cluster_cfg)
    assert gpu_types, "no worker type with GPU >= 1"
    capacity = 0
    for name in gpu_types:
        t = cluster_cfg["available_node_types"][name]
        assert t.get("min_workers", 0) == 0, f"{name}: GPU nodes should scale from zero"
        assert t["max_workers"] >= 1
        assert t["resources"]["CPU"] >= t["resources"]["GPU"]  # a CPU per Train worker
        capacity += t["resources"]["GPU"] * t["max_workers"]
    need = _gpus_the_shipped_studies_need()
    assert need >= 8  # deq_wt103 / mdeq_imagenet: 2 trials x 4 GPUs
    assert capacity >= need, f"{capacity} GPUs at most, the shipped studies run {need} at a time"


def test_cpu_workers_for_ray_data(cluster_cfg):
    cpu_types = _cpu_worker_types(cluster_cfg)
    assert cpu_types, "no CPU-only worker type"
    for name in cpu_types:
        t = cluster_cfg["available_node_types"][name]
        assert t.get("min_workers", 0) == 0 and t["max_workers"] >= 1
    # the global cap lets every type reach its own cap
    assert cluster_cfg["max_workers"] >= sum(
        t["max_workers"] for t in _worker_types(cluster_cfg).values()
    )


@pytest.mark.parametrize("dropped", ["gpu", "cpu"])
def test_the_content_checks_catch_a_dropped_worker_type(cluster_cfg, dropped):
    broken = copy.deepcopy(cluster_cfg)
    find = _gpu_worker_types if dropped == "gpu" else _cpu_worker_types
    for name in find(cluster_cfg):
        del broken["available_node_types"][name]
    _validate(broken)  # still a valid launcher config ...
    assert find(broken) == []  # ... but not one deqray can train (or preprocess) on


def test_shared_storage_and_example_commands(cluster_cfg):
    text = CLUSTER.read_text()
    assert "s3://YOUR-BUCKET/deqray" in text
    # the comments' commands, joined across their continuation lines
    joined = re.sub(r"\s*\\\n#\s*", " ", text)
    assert (
        "ray submit cluster.yaml pipelines/tune.py -- "
        "search_spaces/deq_wt103.yaml --storage s3://YOUR-BUCKET/deqray/tune"
    ) in joined
    m = re.search(
        r"ray submit cluster.yaml (pipelines/preprocess_\w+\.py) -- --src s3://\S+ --out s3://",
        joined,
    )
    assert m, "no preprocessing example writing to s3://"
    assert (ROOT / m.group(1)).is_file()
    assert (ROOT / "search_spaces" / "deq_wt103.yaml").is_file()
    # `ray submit` runs scripts from ~ on the head: search_spaces/ must resolve there
    assert any("~/deqray/search_spaces ~/search_spaces" in c for c in cluster_cfg["setup_commands"])


def test_start_commands(cluster_cfg):
    head, worker = cluster_cfg["head_start_ray_commands"], cluster_cfg["worker_start_ray_commands"]
    assert head[0] == "ray stop" and worker[0] == "ray stop"
    (head_start,) = _ray_start_commands(cluster_cfg, "head_start_ray_commands")
    (worker_start,) = _ray_start_commands(cluster_cfg, "worker_start_ray_commands")
    for flag in ("--head", "--port=6379", "--autoscaling-config=~/ray_bootstrap_config.yaml"):
        assert flag in head_start.split()
    assert "--dashboard-host=0.0.0.0" in head_start.split()
    assert "--address=$RAY_HEAD_IP:6379" in worker_start.split()


def test_token_auth_is_configured(cluster_cfg):
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    assert _token_auth_problems(cluster_cfg) == []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for c in _ray_start_commands(cluster_cfg, key):
            assert "RAY_AUTH_MODE=token ray start" in c
    # clients inside the container (`ray submit` scripts) run in token mode too
    assert "--env RAY_AUTH_MODE=token" in cluster_cfg["docker"]["run_options"]
    # the token lands where Ray looks by default on the nodes
    default = "~/" + _get_default_token_path().relative_to(Path.home()).as_posix()
    assert default == "~/.ray/auth_token"
    assert cluster_cfg["file_mounts"][default]
    # broken copies are caught
    no_mode = copy.deepcopy(cluster_cfg)
    no_mode["worker_start_ray_commands"] = [
        c.replace("RAY_AUTH_MODE=token ", "") for c in no_mode["worker_start_ray_commands"]
    ]
    assert _token_auth_problems(no_mode)
    no_token = copy.deepcopy(cluster_cfg)
    del no_token["file_mounts"][default]
    assert _token_auth_problems(no_token) == ["file_mounts: no token file for ~/.ray/auth_token"]


# --------------------------------------------------------------------------- #
# kubernetes/rayjob.yaml
# --------------------------------------------------------------------------- #


def _containers(rayjob: dict) -> list[dict]:
    spec = rayjob["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_rayjob_is_a_kuberay_v1_rayjob(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", rayjob["metadata"]["name"])
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert isinstance(group["rayStartParams"], dict)


def test_rayjob_entrypoint_runs_the_tune_pipeline(rayjob):
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:3] == ["python", "pipelines/tune.py", "search_spaces/deq_wt103.yaml"]
    assert (ROOT / argv[2]).is_file()
    assert argv[argv.index("--storage") + 1].startswith("s3://")


def test_rayjob_images_match_pyprojects_ray_pin(rayjob):
    images = [c["image"] for c in _containers(rayjob)]
    assert len(images) == 3  # head, GPU group, CPU group
    for image in images:
        _assert_image_matches_pin(image)
    ray_version = rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    assert _ray_pin().contains(ray_version)
    assert {_image_versions(i)[0] for i in images} == {ray_version}


def test_rayjob_worker_groups(rayjob):
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]

    def gpus(group: dict) -> int:
        (c,) = group["template"]["spec"]["containers"]
        limits, requests = c["resources"]["limits"], c["resources"].get("requests", {})
        if "nvidia.com/gpu" in requests:  # Kubernetes: extended resources request == limit
            assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
        return int(limits.get("nvidia.com/gpu", 0))

    assert any(gpus(g) >= 1 for g in groups), "no worker group requests nvidia.com/gpu"
    assert any(gpus(g) == 0 for g in groups), "no CPU worker group"
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_rayjob_head_offers_train_driver_and_no_cpus(rayjob):
    params = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    assert params["num-cpus"] == "0"
    # KubeRay's format: a JSON string of the JSON object, quotes escaped
    resources = json.loads(json.loads(params["resources"]))
    assert isinstance(resources["TRAIN_DRIVER"], int) and resources["TRAIN_DRIVER"] >= 1


def test_rayjob_token_auth_from_a_secret(rayjob):
    auth = rayjob["spec"]["rayClusterSpec"]["authOptions"]
    assert auth["mode"] == "token"
    secret = auth["secretName"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", secret)
    # the documented command creates that Secret, with the key KubeRay reads
    text = RAYJOB.read_text()
    assert f"kubectl create secret generic {secret}" in text
    assert "--from-literal=auth_token=" in text


def test_rayjob_runtime_env_installs_the_project(rayjob):
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**env)  # Ray accepts it
    assert env["working_dir"]
    packages = env["pip"]["packages"] if isinstance(env["pip"], dict) else env["pip"]
    wanted = {name: str(r.specifier) for name, r in _requirements().items() if name != "ray"}
    got = {(r := Requirement(p)).name.lower(): str(r.specifier) for p in packages}
    assert got == wanted, "runtimeEnvYAML's pip packages differ from pyproject's dependencies"
    assert Version(_image_versions(_containers(rayjob)[0]["image"])[0]) in _ray_pin()
