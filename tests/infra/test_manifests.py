"""The deployment files parse, and carry what the job relies on: image, entrypoint, resources, config path."""

from __future__ import annotations

import os
import re

import yaml

from jobs.job_config import load_job_config

INFRA = os.path.join(os.path.dirname(__file__), "..", "..", "infra")


def documents(name: str) -> list[dict]:
    with open(os.path.join(INFRA, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def test_the_example_job_spec_is_a_valid_job_spec():
    values = load_job_config(os.path.join(INFRA, "job.example.yaml"))
    assert values["base"].startswith("s3://") and values["output"].startswith("s3://")
    assert values["adapters"] and values["resume"] is True and values["ray_address"] == "auto"


def test_rayjob_runs_lora_merge_on_gpu_workers_with_the_mounted_spec(tmp_path):
    config_map, job = documents("kuberay-rayjob.yaml")
    assert config_map["kind"] == "ConfigMap" and job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    mount = "/etc/lora-merge"
    assert spec["entrypoint"].split()[:4] == ["lora-merge", "merge", "--config", f"{mount}/job.yaml"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 1
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}, "Ray 2.60 needs a token; KubeRay makes it"
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "shard tasks stay off the head"
    (gpu,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    container = gpu["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for pod in (head["template"]["spec"], gpu["template"]["spec"]):
        (c,) = pod["containers"]
        assert c["image"] == "lora-merge:0.1.0"
        assert {"name": "job-spec", "mountPath": mount} in c["volumeMounts"]
        assert pod["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]
    # The spec in the ConfigMap is itself a valid job spec.
    (tmp_path / "job.yaml").write_text(config_map["data"]["job.yaml"])
    assert load_job_config(str(tmp_path / "job.yaml"))["ray_address"] == "auto"


def test_schedule_creates_the_rayjob_and_never_overlaps():
    (cron,) = documents("kuberay-cronjob.yaml")
    assert cron["kind"] == "CronJob" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(cron["spec"]["schedule"].split()) == 5
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert "kubectl apply -f /etc/lora-merge/rayjob.yaml" in container["args"][0]


def test_cluster_launcher_has_a_gpu_worker_type_and_s3_through_an_instance_role():
    (cluster,) = documents("ray-cluster.yaml")
    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"]["CPU"] == 0
    assert types["gpu_worker"]["resources"]["GPU"] == 1
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())
    assert cluster["docker"]["image"] == "lora-merge:0.1.0"


def test_dockerfile_installs_the_package_on_a_cuda_ray_image():
    text = open(os.path.join(INFRA, "Dockerfile")).read()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert base.startswith("rayproject/ray:") and "-cu" in base
    assert re.search(r"^RUN pip install --no-cache-dir \. && lora-merge --version", text, re.M)
    for path in ("merge_core", "jobs", "pyproject.toml"):
        assert path in text
