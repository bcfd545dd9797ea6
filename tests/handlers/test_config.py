"""Every precedence rule handlers/config_load.py states (and the README repeats), one test each."""

from __future__ import annotations

from pathlib import Path

import pytest

from handlers.config import DeploymentsSettings, IrisConfig
from handlers.config_load import DEFAULT_CONFIG_PATH, ConfigError, load_config


@pytest.fixture
def yaml_file(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {id: m1}\n"
        "fetch: {max_image_bytes: 100, s3_allowed_buckets: [a]}\n"
        "engine: {env: {A: '1'}, extra_args: {max_num_batched_tokens: 32}}\n"
    )
    return path


def load(yaml_file: Path | None = None, use_yaml: bool = True, **env: str) -> IrisConfig:
    environ = {**env, **({"IRIS_CONFIG": str(yaml_file)} if yaml_file else {})}
    return load_config(use_yaml=use_yaml, environ=environ)


def test_defaults_then_the_yaml_file(yaml_file: Path) -> None:
    cfg = load(yaml_file)
    assert cfg.model.id == "m1" and cfg.fetch.max_image_bytes == 100
    assert cfg.limits == IrisConfig().limits  # what the file does not say stays default


def test_without_iris_config_the_file_is_infra_local_yaml() -> None:
    cfg = load_config(environ={})
    assert DEFAULT_CONFIG_PATH.name == "local.yaml"
    assert cfg.deployments.engine_in_ingress is True  # local.yaml's, not the default


def test_environment_over_the_file(yaml_file: Path) -> None:
    cfg = load(yaml_file, IRIS_FETCH__MAX_IMAGE_BYTES="200", IRIS_MODEL__SOURCE="/m")
    assert cfg.fetch.max_image_bytes == 200 and cfg.model.source == "/m"
    assert cfg.model.id == "m1"


def test_the_replica_cores_init_ray_sets_are_not_a_setting(yaml_file: Path) -> None:
    """An app built inside the Ray instance `make serve` started (Serve's import_path) sees
    init_ray's IRIS_REPLICA_CORES: not a field, and not refused as a typo either."""
    from handlers.cpu_affinity import REPLICA_CORES_ENV

    cfg = load(yaml_file, **{REPLICA_CORES_ENV: "1"})
    assert cfg.model.id == "m1"


def test_explicit_values_over_the_environment(yaml_file: Path) -> None:
    cfg = load_config(environ={"IRIS_CONFIG": str(yaml_file), "IRIS_MODEL__ID": "from-env"},
                      model={"id": "explicit"})
    assert cfg.model.id == "explicit"


def test_inline_args_take_no_file_but_the_environment(yaml_file: Path) -> None:
    cfg = load_config(use_yaml=False, environ={"IRIS_CONFIG": str(yaml_file),
                                               "IRIS_API_KEY": "k"}, app_name="x")
    assert cfg.model.id == IrisConfig().model.id  # nothing from the file
    assert cfg.api_key is not None and cfg.api_key[0].get_secret_value() == "k"


def test_maps_merge_key_by_key_keeping_keys_as_written(yaml_file: Path) -> None:
    cfg = load(yaml_file, IRIS_ENGINE__ENV__FOO="bar", IRIS_ENGINE__ENV__Mixed_Case="64",
               IRIS_ENGINE__EXTRA_ARGS__ENABLE_PREFIX_CACHING="false")
    assert cfg.engine.env == {"A": "1", "FOO": "bar", "Mixed_Case": "64"}
    assert cfg.engine.extra_args == {"max_num_batched_tokens": 32,
                                     "ENABLE_PREFIX_CACHING": False}


def test_values_are_json_unless_the_field_is_a_string(yaml_file: Path) -> None:
    cfg = load(yaml_file, IRIS_MODEL__ID="123", IRIS_ENGINE__ENV__N="64",
               IRIS_ENGINE__EXTRA_ARGS__X="64", IRIS_ENGINE__CPU_CORES="2",
               IRIS_IMAGING__FIDELITY="fast")
    assert cfg.model.id == "123" and cfg.engine.env["N"] == "64"
    assert cfg.engine.extra_args["X"] == 64 and cfg.engine.cpu_cores == 2
    assert cfg.imaging.fidelity == "fast"


def test_lists_and_scalars_are_replaced_not_merged(yaml_file: Path) -> None:
    cfg = load(yaml_file, IRIS_FETCH__S3_ALLOWED_BUCKETS='["b", "c"]')
    assert cfg.fetch.s3_allowed_buckets == ["b", "c"]


def test_a_whole_section_as_json_merges_too(yaml_file: Path) -> None:
    cfg = load(yaml_file, IRIS_FETCH='{"read_timeout_s": 3}')
    assert cfg.fetch.read_timeout_s == 3 and cfg.fetch.max_image_bytes == 100


def test_field_names_are_case_insensitive(yaml_file: Path) -> None:
    assert load(yaml_file, IRIS_fetch__Max_Image_Bytes="7").fetch.max_image_bytes == 7


@pytest.mark.parametrize(("name", "closest"), [
    ("IRIS_API_KEYS", "IRIS_API_KEY"),
    ("IRIS_FETCH__MAX_IMAGE_BYTE", "IRIS_FETCH__MAX_IMAGE_BYTES"),
    ("IRIS_DEPLOYMENT__LLM__NUM_CPUS", "IRIS_DEPLOYMENTS__LLM__NUM_CPUS"),
    ("IRIS_TYPO", None),
])
def test_an_unknown_variable_stops_the_load_naming_the_closest_field(
    yaml_file: Path, name: str, closest: str | None
) -> None:
    with pytest.raises(ConfigError) as info:
        load(yaml_file, **{name: "1"})
    assert name in str(info.value)
    if closest:
        assert f"did you mean {closest}?" in str(info.value)


def test_a_key_inside_a_map_that_takes_none_is_refused(yaml_file: Path) -> None:
    with pytest.raises(ConfigError, match="IRIS_MODEL__ID__X"):
        load(yaml_file, IRIS_MODEL__ID__X="1")


def test_unknown_fields_in_the_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("fetch: {max_image_byte: 1}\n")
    with pytest.raises(ConfigError, match="max_image_byte"):
        load(path)


def test_a_missing_config_file_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="IRIS_CONFIG"):
        load_config(environ={"IRIS_CONFIG": "/nonexistent/iris.yaml"})


@pytest.mark.parametrize(("raw", "keys"), [
    ("k1", ["k1"]), ("k1, k2", ["k1", "k2"]), ('["k1", "k2"]', ["k1", "k2"]),
    ("12345", ["12345"]),
])
def test_api_key_one_a_list_or_json(yaml_file: Path, raw: str, keys: list[str]) -> None:
    cfg = load(yaml_file, IRIS_API_KEY=raw)
    assert [k.get_secret_value() for k in cfg.api_key or []] == keys


def test_defaults_deny_all_buckets() -> None:
    assert IrisConfig().fetch.s3_allowed_buckets == []


def test_direct_ingress_env_puts_the_ingress_on_the_client_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from handlers.config import DIRECT_INGRESS_FLAG, HttpSettings

    assert HttpSettings(port=8000).direct_ingress_env() == {}
    http = HttpSettings(port=8000, direct_ingress=True)
    env = http.direct_ingress_env()
    assert env[DIRECT_INGRESS_FLAG] == "1"
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "8000"
    assert int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) > 8000
    # Active only where Ray's processes carry Serve's switch.
    monkeypatch.delenv(DIRECT_INGRESS_FLAG, raising=False)
    assert not http.direct_ingress_active()
    monkeypatch.setenv(DIRECT_INGRESS_FLAG, "1")
    assert http.direct_ingress_active()
    assert not HttpSettings(port=8000).direct_ingress_active()


def test_a_deployment_section_keeps_the_defaults_it_does_not_name() -> None:
    # `fetcher: {num_replicas: 2}` alone must not drop its concurrency to Serve's default (5).
    cfg = load_config(use_yaml=False, deployments={
        "fetcher": {"num_replicas": 2},
        "llm": {"autoscaling_config": {"min_replicas": 0, "max_replicas": 2}},
        "preprocessor": {"max_ongoing_requests": None}})
    d, defaults = cfg.deployments, DeploymentsSettings()
    assert (d.fetcher.num_replicas, d.fetcher.max_ongoing_requests) == (
        2, defaults.fetcher.max_ongoing_requests)
    assert d.fetcher.num_cpus == defaults.fetcher.num_cpus
    # Autoscaling replaces the default fixed count; an explicit null stays null.
    assert d.llm.num_replicas is None and d.llm.autoscaling_config == {
        "min_replicas": 0, "max_replicas": 2}
    assert d.preprocessor.max_ongoing_requests is None
