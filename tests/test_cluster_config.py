"""ray_cluster.yaml: what `ray up` checks before it starts machines, and what it would get wrong silently."""

from __future__ import annotations

import copy
import json
import re
import shlex
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "ray_cluster.yaml"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def ec2_catalogue(monkeypatch_module):
    """EC2's DescribeInstanceTypes catalogue, as moto serves it (in process: only data is read)."""
    from moto import mock_aws

    for key in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch_module.delenv(key, raising=False)
    monkeypatch_module.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch_module.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        yield


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_matches_ray_schema_as_written(cluster):
    schema = json.loads(RAY_SCHEMA.read_text())
    jsonschema.validate(cluster, schema)


def test_passes_the_launchers_own_validation(cluster):
    # The steps `ray up` takes before it talks to AWS: defaults merged in, then validated.
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_node_type_limits_are_consistent(cluster):
    node_types = cluster["available_node_types"]
    head = cluster["head_node_type"]
    assert head in node_types
    workers = {name: spec for name, spec in node_types.items() if name != head}
    assert workers, "no worker node types: nothing could autoscale"
    for name, spec in workers.items():
        assert 0 <= spec.get("min_workers", 0) <= spec["max_workers"], name
        assert spec["max_workers"] <= cluster["max_workers"], name
    assert sum(spec.get("min_workers", 0) for spec in workers.values()) <= cluster["max_workers"]


def test_has_a_gpu_worker_type_and_a_cpu_worker_type(cluster):
    node_types = cluster["available_node_types"]
    head = cluster["head_node_type"]
    gpu_types = [n for n, s in node_types.items() if n != head and s["resources"].get("GPU", 0) > 0]
    cpu_types = [n for n, s in node_types.items()
                 if n != head and s["resources"].get("GPU", 0) == 0 and s["resources"].get("CPU", 0) > 0]
    assert gpu_types and cpu_types
    # The head keeps its CPUs for the drivers and the job server.
    assert node_types[head]["resources"].get("CPU") == 0
    assert node_types[head]["resources"].get("GPU", 0) == 0


def test_resources_match_the_instance_types(cluster, ec2_catalogue):
    """What Ray would detect on each instance type agrees with what the node type advertises."""
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider

    blank = copy.deepcopy(cluster)
    for spec in blank["available_node_types"].values():
        spec["resources"] = {}
    detected = AWSNodeProvider.fillout_available_node_types_resources(blank)["available_node_types"]
    for name, spec in cluster["available_node_types"].items():
        instance_type = spec["node_config"]["InstanceType"]
        found = detected[name]["resources"]
        assert "CPU" in found, f"{instance_type} of {name} is not an EC2 instance type"
        assert spec["resources"].get("GPU", 0) == found.get("GPU", 0), (name, instance_type, found)
        # A node may hold CPUs back (the head advertises none), never advertise more than it has.
        assert spec["resources"]["CPU"] <= found["CPU"], (name, instance_type, found)
        if name != cluster["head_node_type"]:
            assert spec["resources"]["CPU"] == found["CPU"], (name, instance_type, found)


def test_images_pin_this_ray_and_python(cluster):
    """Nodes must run the Ray (and Python) of the machine that launches and submits."""
    python_tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    docker = cluster["docker"]
    images = {"default": docker["image"], "head": docker["head_image"]}
    for name, spec in cluster["available_node_types"].items():
        if "docker" in spec:
            images[name] = spec["docker"]["worker_image"]
    for where, image in images.items():
        match = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-(?P<python>py\d+)-(gpu|cpu|cu\d+)", image)
        assert match, f"{where}: {image} is not a pinned rayproject/ray image"
        assert match["ray"] == ray.__version__, (where, image)
        assert match["python"] == python_tag, (where, image)
    # GPU nodes run the default (CUDA) image; the others a CPU one.
    head = cluster["head_node_type"]
    for name, spec in cluster["available_node_types"].items():
        image = images["head"] if name == head else images.get(name, images["default"])
        wants_gpu = spec["resources"].get("GPU", 0) > 0
        assert image.endswith("-cpu") != wants_gpu, (name, image)


def test_every_node_installs_this_repository(cluster):
    mounts = cluster["file_mounts"]
    (remote, local), = mounts.items()
    # `ray up` resolves the local side from where it runs: the repository root.
    pyproject = tomllib.loads((REPO / local / "pyproject.toml").read_text())
    assert pyproject["project"]["name"] == "mtcnn-jobs"
    assert "jobs" in pyproject["project"]["optional-dependencies"]
    remote_dir = remote.replace("~", "$HOME", 1)
    installs = [c for c in cluster["setup_commands"] if "pip install" in c]
    assert any(f'"{remote_dir}[jobs]"' in c for c in installs), installs
    # Runs/ and build outputs must not be copied to every node.
    assert ".gitignore" in cluster["rsync_filter"]


def _image_tag_parts(image: str) -> tuple[str, str]:
    match = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-(?P<python>py\d+)-\w+", image)
    assert match, image
    return match["ray"], match["python"]


def test_dockerfile_builds_on_this_ray_and_copies_what_the_package_needs():
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", dockerfile, re.M)[1]
    assert _image_tag_parts(base) == (ray.__version__, f"py{sys.version_info.major}{sys.version_info.minor}")
    copied = {name for line in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, re.M)
              for name in line.split()}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"],
              *project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert {name.rstrip("*") for name in needed} <= copied


def test_kuberay_job_is_consistent_and_its_command_parses():
    from jobs.cli import build_parser

    job = yaml.safe_load((REPO / "cluster" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1, images  # one image: the same code and Ray everywhere
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpus = {}
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus[group["groupName"]] = int(limits.get("nvidia.com/gpu", 0))
    assert any(gpus.values()) and not all(gpus.values())
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[0] == "mtcnn-jobs"
    build_parser().parse_args(command[1:])
    env_vars = yaml.safe_load(job["spec"]["runtimeEnvYAML"]).get("env_vars", {})
    assert not [name for name in env_vars if any(s in name.lower() for s in ("key", "secret", "token"))]


def test_a_command_imports_only_its_own_module():
    """`mtcnn-jobs annotate` must not pay for importing Ray Train and the training code."""
    import subprocess
    import sys

    probe = ("import sys\nfrom jobs import cli\n"
             "try:\n    cli.main(['annotate', '--help'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('jobs.commands.annotate', 'jobs.commands.train', 'jobs.training.trainer', 'ray.train')"
             " if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip().splitlines()[-1] == "['jobs.commands.annotate']"


def _pins() -> dict[str, str]:
    """constraints.txt as {normalised name: version}."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_cluster_installs_the_tested_versions(cluster):
    # Every way a cluster gets the project installs it with the set CI ran.
    installs = [c for c in cluster["setup_commands"] if "pip install" in c]
    assert installs and all("constraints.txt" in c for c in installs), installs
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    assert "COPY" in dockerfile and "constraints.txt ./" in dockerfile
    runs = [line for line in dockerfile.splitlines() if line.startswith("RUN") and "pip install" in line]
    assert runs and all("-c constraints.txt" in line for line in runs), runs


def test_pinned_ray_matches_the_cluster_images(cluster):
    pins = _pins()
    docker = cluster["docker"]
    for image in {docker["image"], docker["head_image"]} | {
            spec["docker"]["worker_image"] for spec in cluster["available_node_types"].values()
            if "docker" in spec}:
        ray_version, _ = _image_tag_parts(image)
        assert pins["ray"] == ray_version, (image, pins["ray"])


def test_pins_satisfy_the_declared_ranges():
    # The tested set must be one that the extras' ranges allow, or `-c` would make pip fail.
    from packaging.requirements import Requirement

    pins = _pins()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    declared = list(pyproject["project"]["dependencies"])
    for extra in pyproject["project"]["optional-dependencies"].values():
        declared += [r for r in extra if not r.startswith("mtcnn-jobs")]
    assert "torch" not in pins  # the user's first command picks the torch build
    for text in declared:
        requirement = Requirement(text)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name == "torch":
            continue
        assert name in pins, f"{name} is required but not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (text, pins[name])
