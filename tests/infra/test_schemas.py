"""infra/kuberay/rayservice.yaml against KubeRay's RayService CRD, with unknown fields rejected.

A Kubernetes API server PRUNES fields a structural schema does not know (and `kubectl apply`
only warns), so a misspelt field is silently dropped at deploy time. Here the CRD's
openAPIV3Schema (vendored in tests/infra/schemas/, see its README) is converted to a strict
JSON Schema (draft 4) in which every closed object rejects unknown keys, and the manifest
is validated against it. Offline: no cluster, no network.

The cluster-launcher config (infra/aws/cluster.yaml) is validated against Ray's own
ray-schema.json in test_manifests.py::test_cluster_launcher_config; only negative tests
for that schema live here.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from jsonschema import Draft4Validator, FormatChecker, ValidationError, validators

ROOT = Path(__file__).resolve().parents[2]
RAYSERVICE_YAML = ROOT / "infra" / "kuberay" / "rayservice.yaml"
CLUSTER_YAML = ROOT / "infra" / "aws" / "cluster.yaml"
RAYSERVICE_CRD = Path(__file__).resolve().parent / "schemas" / "ray.io_rayservices.yaml"

# The CRD is ~1 MB of YAML: libyaml parses it in under a second, pure Python in ~4 s.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# metav1.ObjectMeta: the fields a manifest's top-level `metadata` may carry. The CRD leaves
# `metadata` as a bare `type: object` (the API server validates it itself), so check it here.
OBJECT_META_FIELDS = {
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels",
    "annotations", "ownerReferences", "finalizers", "managedFields",
}  # fmt: skip
# Core kinds the manifest may hold besides the RayService: their top-level fields. Anything
# else only gets the basic apiVersion / kind / metadata check.
CORE_KIND_FIELDS = {
    ("v1", "ServiceAccount"): {"automountServiceAccountToken", "imagePullSecrets", "secrets"},
    ("v1", "Secret"): {"data", "immutable", "stringData", "type"},
    ("v1", "ConfigMap"): {"binaryData", "data", "immutable"},
}


# --- OpenAPI v3 (structural schema) -> strict JSON Schema ---------------------------------


def strict_schema(node: Any) -> Any:
    """A copy of a Kubernetes structural schema in which unknown fields are errors.

    - Every object schema with `properties`, no `additionalProperties` of its own and no
      `x-kubernetes-preserve-unknown-fields: true` gets `additionalProperties: false`.
    - `x-kubernetes-int-or-string: true` allows an integer or a string.
    - `nullable: true` also allows null.
    - `x-kubernetes-embedded-resource: true` implies apiVersion, kind and metadata.
    - A `required` field that has a `default` is dropped from `required`: the API server
      applies defaults before it validates.
    Kept as they are and checked by the validator below: `format` (int32 / int64 ranges only)
    and `x-kubernetes-list-type` (map / set uniqueness). Not evaluated: the CEL rules in
    `x-kubernetes-validations` (in this CRD: managedBy's allowed values and immutability).
    """
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = dict(node)
    for key in ("properties", "patternProperties", "definitions"):
        if key in out:
            out[key] = {name: strict_schema(sub) for name, sub in out[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict | list):
            out[key] = strict_schema(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = strict_schema(out[key])

    preserve = out.get("x-kubernetes-preserve-unknown-fields") is True
    if out.get("x-kubernetes-embedded-resource") is True and "properties" in out:
        implied = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                   "metadata": {"type": "object"}}  # fmt: skip
        out["properties"] = {**implied, **out["properties"]}
    if out.get("x-kubernetes-int-or-string") is True:
        out["type"] = ["integer", "string"]
    if out.get("nullable") is True and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
    if (
        "properties" in out
        and out.get("type", "object") == "object"
        and "additionalProperties" not in out
        and not preserve
    ):
        out["additionalProperties"] = False
    if "required" in out:
        props = out.get("properties", {})
        out["required"] = [r for r in out["required"] if "default" not in props.get(r, {})]
        if not out["required"]:
            del out["required"]  # draft 4 wants a non-empty list
    return out


def _list_type(validator: Any, list_type: str, instance: Any, schema: dict[str, Any]) -> Any:
    """x-kubernetes-list-type: `map` items are unique by their keys, `set` items unique."""
    if not isinstance(instance, list):
        return
    if list_type == "set":
        seen_items: list[Any] = []
        for item in instance:
            if item in seen_items:
                yield ValidationError(f"duplicate entry {item!r} in a list-type=set list")
            seen_items.append(item)
    elif list_type == "map":
        props = schema.get("items", {}).get("properties", {})
        names = schema.get("x-kubernetes-list-map-keys", [])
        seen: set[str] = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            values = [item.get(n, props.get(n, {}).get("default")) for n in names]
            key = json.dumps(values)
            if key in seen:
                yield ValidationError(f"duplicate list-map entry: {names} = {values}")
            seen.add(key)


_formats = FormatChecker(formats=())


@_formats.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@_formats.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


KubernetesValidator = validators.extend(Draft4Validator, {"x-kubernetes-list-type": _list_type})


@functools.cache
def _crd_validator(api_version: str) -> Any:
    group, _, version = api_version.partition("/")
    crd = yaml.load(RAYSERVICE_CRD.read_text(), Loader=_Loader)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["group"] == group
    assert crd["spec"]["names"]["kind"] == "RayService"
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert entry["served"] and entry["storage"] and not entry.get("deprecated"), entry["name"]
    schema = strict_schema(entry["schema"]["openAPIV3Schema"])
    KubernetesValidator.check_schema(schema)
    return KubernetesValidator(schema, format_checker=_formats)


# --- helpers ---------------------------------------------------------------------------------


def _documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(RAYSERVICE_YAML.read_text()) if d is not None]


def _rayservice() -> dict[str, Any]:
    (doc,) = [d for d in _documents() if d.get("kind") == "RayService"]
    return doc


def _errors(doc: dict[str, Any]) -> list[str]:
    errors = _crd_validator(doc["apiVersion"]).iter_errors(doc)
    return [f"{_where(e.absolute_path)}: {e.message}" for e in _leaves(errors)]


def _leaves(errors: Any) -> Iterator[ValidationError]:
    # anyOf / oneOf failures carry the real reasons in their context.
    for error in errors:
        if error.context:
            yield from _leaves(error.context)
        else:
            yield error


def _where(path: Any) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path) or "."


DELETE = object()


def _with(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of doc with value set at (or, for DELETE, removed from) `a.b[0].c`."""
    out = copy.deepcopy(doc)
    *parents, last = _keys(path)
    node: Any = out
    for key in parents:  # missing objects on the way are created
        node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return out


def _keys(path: str) -> list[str | int]:
    keys: list[str | int] = []
    for part in path.split("."):
        name, *indexes = part.replace("]", "").split("[")
        keys.append(name)
        keys.extend(int(i) for i in indexes)
    return keys


HEAD = "spec.rayClusterConfig.headGroupSpec"
GPU = "spec.rayClusterConfig.workerGroupSpecs[0]"
GPU_CONTAINER = f"{GPU}.template.spec.containers[0]"


# --- the real manifest ---------------------------------------------------------------------


def test_rayservice_matches_the_crd() -> None:
    doc = _rayservice()
    assert doc["apiVersion"] == "ray.io/v1"
    errors = _errors(doc)
    assert not errors, "RayService fails the KubeRay CRD schema:\n" + "\n".join(errors)


def test_serve_config_v2_is_a_serve_config() -> None:
    # A string field in the CRD (a YAML block): the schema above only sees a string.
    raw = _rayservice()["spec"]["serveConfigV2"]
    assert isinstance(raw, str)
    serve_cfg = yaml.safe_load(raw)
    assert isinstance(serve_cfg, dict), type(serve_cfg)
    apps = serve_cfg.get("applications")
    assert isinstance(apps, list) and apps, "serveConfigV2 has no applications"
    assert all(isinstance(app, dict) and "import_path" in app for app in apps)


def _shape_problems(doc: Any) -> list[str]:
    """Basic checks for any document; top-level fields too for the kinds in CORE_KIND_FIELDS."""
    if not isinstance(doc, dict):
        return [f"not a mapping: {doc!r}"]
    problems = [f"no {k}" for k in ("apiVersion", "kind") if not isinstance(doc.get(k), str)]
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        return [*problems, "metadata.name missing"]
    problems += [f"unknown metadata field {k!r}" for k in sorted(set(meta) - OBJECT_META_FIELDS)]
    for field in ("labels", "annotations"):
        values = meta.get(field) or {}
        if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
            problems.append(f"metadata.{field} is not a map of strings")
    extra = CORE_KIND_FIELDS.get((doc.get("apiVersion"), doc.get("kind")))
    if extra is not None:
        unknown = set(doc) - {"apiVersion", "kind", "metadata"} - extra
        problems += [f"unknown field {k!r}" for k in sorted(unknown)]
    return problems


def test_every_document_has_a_known_shape() -> None:
    docs = _documents()
    assert [d.get("kind") for d in docs].count("RayService") == 1
    for doc in docs:
        assert not _shape_problems(doc), (doc.get("kind"), _shape_problems(doc))


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("ServiceAccount", "automountServiceAccountTokens", False),
        ("ServiceAccount", "metadata.annotation", {}),
        ("ServiceAccount", "metadata.labels", {"replicas": 2}),
        ("RayService", "metadata.nmae", "iris"),  # the CRD leaves metadata open
    ],
)
def test_shape_check_fails(kind: str, path: str, value: Any) -> None:
    (doc,) = [d for d in _documents() if d.get("kind") == kind]
    assert _shape_problems(_with(doc, path, value))


# --- the validator can fail --------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "spec.serviceUnhealthySecondThresold",  # RayService spec
        f"{HEAD}.templat",  # HeadGroupSpec
        f"{GPU}.minReplica",  # WorkerGroupSpec
        "spec.rayClusterConfig.autoscalerOptions.idleTimeoutSecond",
        # The CRD embeds the full core/v1 PodTemplateSpec schema (no preserve-unknown-fields),
        # so typos inside the pod spec and its containers are caught too.
        f"{GPU}.template.spec.nodeSelectors",  # PodSpec
        f"{GPU}.template.metadata.label",  # PodTemplate's ObjectMeta (as the CRD trims it)
        f"{GPU_CONTAINER}.imagePullPolicyy",  # Container
        f"{GPU_CONTAINER}.resources.limit",  # ResourceRequirements
        f"{GPU_CONTAINER}.env[0].valueFrom.secretKeyRef.nam",  # SecretKeySelector
        f"{GPU}.template.spec.volumes[0].emptyDir.size",  # EmptyDirVolumeSource
    ],
)
def test_unknown_field_fails(path: str) -> None:
    field = path.rsplit(".", 1)[-1]
    errors = _errors(_with(_rayservice(), path, "x"))
    assert any(f"'{field}' was unexpected" in e for e in errors), errors


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (f"{GPU}.replicas", "two"),  # integer
        (f"{GPU}.maxReplicas", 2**31),  # format: int32
        (f"{GPU_CONTAINER}.resources.limits.cpu", [3]),  # int-or-string quantity
        (f"{GPU_CONTAINER}.resources.limits.cpu", "3 cores"),  # quantity pattern
        (f"{GPU_CONTAINER}.ports", [{"containerPort": 80}, {"containerPort": 80}]),  # list map
        (f"{GPU_CONTAINER}.volumeMounts[0].name", None),  # required string
        ("spec.rayClusterConfig.enableInTreeAutoscaling", "true"),  # boolean, not a string
    ],
)
def test_wrong_value_fails(path: str, value: Any) -> None:
    errors = _errors(_with(_rayservice(), path, value))
    assert any(e.startswith(f"{_where(_keys(path))}: ") for e in errors), errors


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (f"{HEAD}.rayStartParams.some-new-flag", "1"),  # a free map of strings
        (f"{GPU}.template.spec.nodeSelector.any/label", "x"),
        (f"{GPU}.template.metadata.annotations", {"any/annotation": "x"}),
        (f"{GPU_CONTAINER}.resources.limits.cpu", 3),  # int-or-string: the integer form
        (f"{GPU_CONTAINER}.resources.limits.cpu", "2500m"),
        (
            f"{GPU_CONTAINER}.ports",
            [{"containerPort": 80}, {"containerPort": 80, "protocol": "UDP"}],
        ),
        (f"{GPU}.minReplicas", DELETE),  # required, but defaulted by the API server
    ],
)
def test_open_maps_and_alternatives_still_pass(path: str, value: Any) -> None:
    # Compared with the real manifest's result: nothing new fails.
    assert _errors(_with(_rayservice(), path, value)) == _errors(_rayservice())


def test_strict_schema_handles_kubernetes_extensions() -> None:
    schema = strict_schema(
        {
            "type": "object",
            "properties": {
                "port": {"x-kubernetes-int-or-string": True,
                         "anyOf": [{"type": "integer"}, {"type": "string"}]},
                "when": {"type": "string", "nullable": True},
                "raw": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                        "properties": {"known": {"type": "string"}}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "inner": {"type": "object", "x-kubernetes-embedded-resource": True,
                          "properties": {"spec": {"type": "object"}}},
            },
        }
    )  # fmt: skip
    ok = {
        "port": 8080,
        "when": None,
        "raw": {"known": "a", "anything": [1]},
        "labels": {"a": "b"},
        "inner": {"apiVersion": "v1", "kind": "Pod", "metadata": {}, "spec": {"x": 1}},
    }
    assert not list(KubernetesValidator(schema).iter_errors(ok))
    assert not list(KubernetesValidator(schema).iter_errors({**ok, "port": "http"}))
    for bad in ({"typo": 1}, {"port": 1.5}, {"labels": {"a": 1}}, {"inner": {"spek": {}}}):
        assert list(KubernetesValidator(schema).iter_errors({**ok, **bad})), bad


# --- cluster launcher: Ray's ray-schema.json rejects typos too -----------------------------
# The positive check (cluster.yaml passes) is test_manifests.py::test_cluster_launcher_config.
# Ray's schema is closed at the top level, in auth, docker and each available_node_types
# entry, but OPEN in `provider` (provider-specific keys) and `node_config` (passed to EC2's
# RunInstances as is): typos there are not caught by any schema.


@functools.cache
def _ray_cluster_schema() -> dict[str, Any]:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return dict(json.loads(path.read_text()))


@pytest.mark.parametrize(
    "path",
    [
        "idle_timout_minutes",
        "auth.ssh_usr",
        "docker.imge",
        "available_node_types.gpu_worker.min_worker",
        "available_node_types.cpu_worker.resource",
    ],
)
def test_cluster_launcher_unknown_field_fails(path: str) -> None:
    cfg = _with(yaml.safe_load(CLUSTER_YAML.read_text()), path, 1)
    field = path.rsplit(".", 1)[-1]
    schema = _ray_cluster_schema()
    errors = jsonschema.validators.validator_for(schema)(schema).iter_errors(cfg)
    messages = [e.message for e in _leaves(errors)]
    assert any(f"'{field}' was unexpected" in m for m in messages), messages
