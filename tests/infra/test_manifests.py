"""infra/ manifests: parse, validate against IrisConfig / Ray schemas, agree with each other.

Fast and offline: no Ray cluster, no network (build_app is called with sockets blocked)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from handlers.config import IrisConfig
from tests.support import load_generator

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
SERVE_YAML = INFRA / "serve.yaml"
RAYSERVICE_YAML = INFRA / "kuberay" / "rayservice.yaml"
CLUSTER_YAML = INFRA / "aws" / "cluster.yaml"
IAM_POLICY = INFRA / "aws" / "iam-policy.json"
PRODUCTION_YAML = INFRA / "production.yaml"
DEPLOYMENT_NAMES = ("ingress", "fetcher", "preprocessor", "llm")


gen = load_generator()


@pytest.fixture(autouse=True)
def _no_iris_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests here decide which IRIS_* variables exist."""
    for key in [k for k in os.environ if k.startswith("IRIS_")]:
        monkeypatch.delenv(key)


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _rayservice_docs() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(RAYSERVICE_YAML.read_text()) if doc}


def _rayservice() -> dict[str, Any]:
    return _rayservice_docs()["RayService"]


def _groups() -> dict[str, dict[str, Any]]:
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    return {g["groupName"]: g for g in cluster["workerGroupSpecs"]}


def _container(group: dict[str, Any]) -> dict[str, Any]:
    (container,) = group["template"]["spec"]["containers"]
    return container


def _serve_configs() -> dict[str, dict[str, Any]]:
    return {
        "serve.yaml": _yaml(SERVE_YAML),
        "serveConfigV2": yaml.safe_load(_rayservice()["spec"]["serveConfigV2"]),
    }


def _production() -> Any:
    return gen.load_source(PRODUCTION_YAML)


def _same_config(a: Any, b: Any) -> bool:
    return bool(a.model_dump(mode="json") == b.model_dump(mode="json"))


def _custom_resources(group: dict[str, Any]) -> dict[str, float]:
    raw = group.get("rayStartParams", {}).get("resources")
    # KubeRay's format: a JSON object wrapped in one more pair of quotes.
    return json.loads(raw.strip('"').replace('\\"', '"')) if raw else {}


# --- parsing and generation ----------------------------------------------------------------


def test_every_manifest_parses() -> None:
    for path in (SERVE_YAML, CLUSTER_YAML, PRODUCTION_YAML):
        assert isinstance(_yaml(path), dict), path
    assert set(_rayservice_docs()) == {"ServiceAccount", "RayService"}
    assert isinstance(json.loads(IAM_POLICY.read_text()), dict)


def test_generated_files_match_the_generator(capsys: pytest.CaptureFixture[str]) -> None:
    assert gen.main(["--check"]) == 0, capsys.readouterr().err


def test_generator_ignores_iris_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each of these would change the config if it leaked in (local.yaml allows private
    # networks and sets engine.env; the dict field would deep-merge).
    monkeypatch.setenv("IRIS_CONFIG", str(INFRA / "local.yaml"))
    monkeypatch.setenv("IRIS_ENGINE__ENV", '{"LEAK": "1"}')
    monkeypatch.setenv("IRIS_FETCH__ALLOW_PRIVATE_NETWORKS", "true")
    monkeypatch.setenv("IRIS_API_KEY", "secret-from-env")
    rendered = gen.render()
    assert rendered == {p: p.read_text() for p in rendered}
    assert all("secret-from-env" not in text for text in rendered.values())
    assert os.environ["IRIS_API_KEY"] == "secret-from-env"  # restored after generation


def test_generator_rejects_secrets_and_typos(tmp_path: Path) -> None:
    for bad in ("api_key: [k]\n", "fetch: {max_image_byte: 1}\n"):
        src = tmp_path / "c.yaml"
        src.write_text(bad)
        with pytest.raises(ValueError):  # pydantic's ValidationError is a ValueError
            gen.load_source(src)


def test_block_replacement_keeps_the_rest_of_the_manifest() -> None:
    manifest = "a: 1\nspec:\n  serveConfigV2: |\n    old: 1\n\n    old: 2\n  other: x\n"
    out = gen.replace_serve_config_block(manifest, "new: 1\n")
    assert out == "a: 1\nspec:\n  serveConfigV2: |\n    new: 1\n  other: x\n"


# --- the Serve config ----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["serve.yaml", "serveConfigV2"])
def test_serve_config_app_is_the_production_iris_config(where: str) -> None:
    serve_cfg = _serve_configs()[where]
    (app,) = serve_cfg["applications"]
    assert app["import_path"] == "deployments.app:build_app"
    assert app["route_prefix"] == "/"
    assert "api_key" not in app["args"]
    cfg = IrisConfig.model_validate(app["args"])  # extra=forbid: a typo in any key fails here
    assert _same_config(cfg, _production())
    assert app["name"] == cfg.app_name
    assert serve_cfg["http_options"] == {"host": "0.0.0.0", "port": 8000}
    # The inline args are the whole config: no YAML on the node is merged under them.
    assert "IRIS_CONFIG" not in app.get("runtime_env", {}).get("env_vars", {})


def test_both_serve_configs_are_identical() -> None:
    configs = _serve_configs()
    assert configs["serve.yaml"] == configs["serveConfigV2"]


def test_serve_config_passes_rays_schema() -> None:
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(_serve_configs()["serve.yaml"])
    # IrisConfig keeps autoscaling_config a free dict: Ray's own model catches typos there.
    deployments = _production().deployments
    for name in DEPLOYMENT_NAMES:
        auto = getattr(deployments, name).autoscaling_config
        assert auto is not None, f"{name} is not autoscaled"
        assert set(auto) <= set(AutoscalingConfig.model_fields), name
        AutoscalingConfig(**auto)


def test_llm_scales_to_zero_and_cpu_deployments_stay_up() -> None:
    d = _production().deployments
    assert d.llm.autoscaling_config["min_replicas"] == 0
    assert d.llm.num_gpus and d.llm.num_gpus >= 1
    for name in ("ingress", "fetcher", "preprocessor"):
        assert getattr(d, name).autoscaling_config["min_replicas"] >= 1, name
        assert not getattr(d, name).num_gpus, name
    engine = _production().engine
    # The engine's shards run in the replica's process tree: it must own that many GPUs.
    assert d.llm.num_gpus == engine.tensor_parallel_size * engine.pipeline_parallel_size


# --- KubeRay --------------------------------------------------------------------------------


def test_rayservice_autoscaling_and_head() -> None:
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    assert _rayservice()["apiVersion"] == "ray.io/v1"
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in _container(head)["resources"]["limits"]


def test_rayservice_gpu_group_scales_to_zero() -> None:
    gpu = _groups()["gpu"]
    assert gpu["minReplicas"] == 0 and gpu["replicas"] == 0
    limits = _container(gpu)["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 1
    spec = gpu["template"]["spec"]
    assert spec["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    llm = _production().deployments.llm
    assert llm.num_gpus is not None and llm.num_gpus <= int(limits["nvidia.com/gpu"])
    assert llm.num_cpus is not None and llm.num_cpus <= float(limits["cpu"])
    max_gpus = gpu["maxReplicas"] * int(limits["nvidia.com/gpu"])
    assert llm.autoscaling_config["max_replicas"] * llm.num_gpus <= max_gpus


def test_rayservice_cpu_group_hosts_the_cpu_deployments() -> None:
    groups = _groups()
    cpu = groups["cpu"]
    assert cpu["minReplicas"] >= 1
    offered = _custom_resources(cpu)
    assert not _custom_resources(groups["gpu"]), "GPU pods must not offer CPU-pool resources"
    d = _production().deployments
    for name in ("ingress", "fetcher", "preprocessor"):
        wanted = getattr(d, name).resources or {}
        assert wanted, f"{name} could land on a GPU pod and keep it from scaling down"
        assert all(offered.get(r, 0) >= n for r, n in wanted.items()), name


def test_rayservice_pods_share_image_identity_and_key() -> None:
    docs = _rayservice_docs()
    account = docs["ServiceAccount"]["metadata"]
    assert account["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    cluster = docs["RayService"]["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    assert {p["template"]["spec"]["serviceAccountName"] for p in pods} == {account["name"]}
    assert len({_container(p)["image"] for p in pods}) == 1
    for pod in pods:
        env = {e["name"]: e for e in _container(pod)["env"]}
        assert "secretKeyRef" in env["IRIS_API_KEY"]["valueFrom"]


def test_rayservice_pods_carry_the_ray_settings_make_serve_uses() -> None:
    from deployments.run import RAY_TUNING_ENV

    cluster = _rayservice()["spec"]["rayClusterConfig"]
    for pod in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        env = {e["name"]: e.get("value") for e in _container(pod)["env"]}
        assert {k: env.get(k) for k in RAY_TUNING_ENV} == RAY_TUNING_ENV


# --- cluster launcher ----------------------------------------------------------------------


def test_cluster_launcher_config() -> None:
    import jsonschema
    import ray.autoscaler

    cfg = _yaml(CLUSTER_YAML)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["provider"]["type"] == "aws"
    assert cfg["idle_timeout_minutes"] > 0
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    gpu, cpu = types["gpu_worker"], types["cpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["resources"]["GPU"] >= 1
    d = _production().deployments
    assert d.llm.autoscaling_config["max_replicas"] * (d.llm.num_gpus or 0) <= (
        gpu["max_workers"] * gpu["resources"]["GPU"]
    )
    for name in ("ingress", "fetcher", "preprocessor"):
        for res, n in (getattr(d, name).resources or {}).items():
            assert cpu["resources"].get(res, 0) >= n and res not in gpu["resources"], name
    for worker in (gpu, cpu):
        assert "iris-ray-worker" in worker["node_config"]["IamInstanceProfile"]["Arn"]
    assert gen.NODE_PROJECT_DIR in cfg["file_mounts"]
    from deployments.run import RAY_TUNING_ENV

    for start in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        exports = " ".join(start)
        assert all(f"{k}={v}" in exports for k, v in RAY_TUNING_ENV.items())
    assert any(gen.NODE_PROJECT_DIR in c and "install" in c for c in cfg["setup_commands"])


# --- IAM --------------------------------------------------------------------------------


def _statements() -> list[dict[str, Any]]:
    policy = json.loads(IAM_POLICY.read_text())
    assert policy["Version"] == "2012-10-17"
    return policy["Statement"]


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def test_iam_policy_is_read_only() -> None:
    read_actions = {"s3:GetObject", "s3:GetObjectVersion", "s3:ListBucket"}
    for st in _statements():
        assert st["Effect"] == "Allow"
        assert "NotAction" not in st and "NotResource" not in st
        actions = set(_as_list(st["Action"]))
        assert actions <= read_actions, actions
        assert all("*" not in a for a in actions)
        for res in _as_list(st["Resource"]):
            assert res.startswith("arn:aws:s3:::") and res != "arn:aws:s3:::*", res


def test_iam_policy_covers_the_allowed_image_buckets_without_listing_them() -> None:
    buckets = _production().fetch.s3_allowed_buckets
    assert buckets and "*" not in buckets
    readable: set[str] = set()
    for st in _statements():
        for res in _as_list(st["Resource"]):
            bucket = res.removeprefix("arn:aws:s3:::").split("/", 1)[0]
            if "s3:GetObject" in _as_list(st["Action"]) and res.endswith("/*"):
                readable.add(bucket)
            if "s3:ListBucket" in _as_list(st["Action"]):
                # Image keys may name users' data: no enumeration (docs/deploy.md explains).
                assert bucket not in buckets, bucket
    assert set(buckets) <= readable


# --- the app builder with the shipped args -----------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Refuse (and record) any connection or DNS lookup that is not loopback / a UNIX socket."""
    attempts: list[Any] = []
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> Any:
        if self.family == socket.AF_UNIX or (
            isinstance(address, tuple) and address[0] in ("127.0.0.1", "::1", "localhost")
        ):
            return real_connect(self, address)
        attempts.append(address)
        raise OSError(f"network access during build_app: {address!r}")

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        attempts.append(host)
        raise OSError(f"DNS lookup during build_app: {host!r}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts


def _bound_config(app: Any) -> Any:
    # Application keeps its bound deployment privately; its init args are what replicas get.
    return app._bound_deployment.init_args[0]


def test_build_app_from_serve_yaml_args(
    monkeypatch: pytest.MonkeyPatch, no_network: list[Any]
) -> None:
    from ray.serve import Application

    from deployments.app import build_app

    (app_cfg,) = _yaml(SERVE_YAML)["applications"]
    # As on a node: IRIS_CONFIG names production.yaml (here: the repo's copy of it).
    monkeypatch.setenv("IRIS_CONFIG", str(PRODUCTION_YAML))
    app = build_app(app_cfg["args"])
    assert isinstance(app, Application)
    assert no_network == []
    # Replicas get production.yaml minus how Serve scales them (applied as options below).
    assert _same_config(_bound_config(app), _production().for_replicas())
    llm_app = app._bound_deployment.init_args[2]
    assert llm_app._bound_deployment._deployment_config.autoscaling_config.min_replicas == 0
    assert llm_app._bound_deployment.ray_actor_options["num_gpus"] == 1


def test_build_app_args_alone_give_the_production_config(no_network: list[Any]) -> None:
    from deployments.app import build_app

    (app_cfg,) = _yaml(SERVE_YAML)["applications"]
    cfg = _bound_config(build_app(app_cfg["args"]))
    assert cfg.engine.env == {}, cfg.engine.env
    assert _same_config(cfg, _production().for_replicas())


def test_the_pod_monitor_scrapes_a_metrics_port_every_ray_container_declares() -> None:
    monitor = _yaml(INFRA / "kuberay" / "podmonitor.yaml")
    assert monitor["kind"] == "PodMonitor"
    assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        # KubeRay starts Ray with --metrics-export-port=8080 unless told otherwise.
        assert ports.get(endpoint["port"]) == 8080, group.get("groupName", "head")
        assert "metrics-export-port" not in group.get("rayStartParams", {})


def test_every_metric_the_dashboard_plots_is_one_iris_or_vllm_exports() -> None:
    """A renamed metric would leave a panel silently empty."""
    import re

    import vllm.v1.metrics.loggers as vllm_loggers

    dashboard = json.loads((INFRA / "grafana" / "iris-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    used = {re.sub(r"_(bucket|count|sum|total)$", "", m)
            for m in re.findall(r"\bray_(?:iris|vllm)_\w+", exprs)}
    ours = " ".join(p.read_text() for p in (ROOT / "deployments").glob("*.py"))
    theirs = Path(vllm_loggers.__file__).read_text()
    for name in sorted(used):
        if name.startswith("ray_iris_"):
            assert f'"{name[len("ray_"):]}' in ours, name
        else:  # vLLM's "vllm:x" is exported through Ray as ray_vllm_x
            assert f'"vllm:{name[len("ray_vllm_"):]}"' in theirs, name
    assert any(n.startswith("ray_vllm_") for n in used) and any(
        n.startswith("ray_iris_") for n in used)
