from __future__ import annotations

import pytest
from pydantic import ValidationError

from handlers.config import IrisConfig


def test_yaml_then_env_override(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: {id: m1}\nfetch: {max_image_bytes: 100}\n")
    monkeypatch.setenv("IRIS_CONFIG", str(cfg_file))
    monkeypatch.setenv("IRIS_FETCH__MAX_IMAGE_BYTES", "200")
    monkeypatch.setenv("IRIS_FETCH__S3_ALLOWED_BUCKETS", '["a", "b"]')
    cfg = IrisConfig()
    assert cfg.model.id == "m1"
    assert cfg.fetch.max_image_bytes == 200
    assert cfg.fetch.s3_allowed_buckets == ["a", "b"]


def test_unknown_fields_are_refused(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("fetch: {max_image_byte: 1}\n")
    monkeypatch.setenv("IRIS_CONFIG", str(cfg_file))
    with pytest.raises(ValidationError):
        IrisConfig()


def test_missing_config_file_is_a_clear_error(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("IRIS_CONFIG", "/nonexistent/iris.yaml")
    with pytest.raises(FileNotFoundError, match="IRIS_CONFIG"):
        IrisConfig()


def test_api_key_single_or_list(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("IRIS_API_KEY", "k1")
    assert [k.get_secret_value() for k in IrisConfig().api_key or []] == ["k1"]
    monkeypatch.setenv("IRIS_API_KEY", '["k1", "k2"]')
    assert len(IrisConfig().api_key or []) == 2


def test_defaults_deny_all_buckets(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("IRIS_CONFIG", raising=False)
    assert IrisConfig.model_fields["fetch"].default_factory().s3_allowed_buckets == []  # type: ignore[misc,call-arg]


def test_deployment_serve_options() -> None:
    cfg = IrisConfig()
    opts = cfg.deployments.preprocessor.serve_options()
    assert opts["ray_actor_options"]["num_cpus"] >= 0


def test_direct_ingress_env_puts_the_ingress_on_the_client_port(monkeypatch) -> None:  # type: ignore[no-untyped-def]
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
