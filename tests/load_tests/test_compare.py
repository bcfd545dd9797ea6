from __future__ import annotations

import pytest

from load_tests.compare import parse_variant, servers


def test_iris_variant_is_iris_with_extra_settings() -> None:
    name, env = parse_variant("proxy:IRIS_HTTP__DIRECT_INGRESS=false,IRIS_ENGINE__CPU_CORES=off")
    assert name == "iris-proxy"
    assert env == {"IRIS_HTTP__DIRECT_INGRESS": "false", "IRIS_ENGINE__CPU_CORES": "off"}
    base, variant = servers(["iris", name], {"IRIS_X": "1"}, {name: env})
    assert variant.command == base.command and variant.port != base.port
    assert variant.env == {"IRIS_HTTP__PORT": str(variant.port), "IRIS_X": "1", **env}
    with pytest.raises(ValueError, match="NAME:KEY=VALUE"):
        parse_variant("proxy")
