"""Serve options follow the config: resources, shards, placement, layouts, draining, health."""

from __future__ import annotations

from deployments.serve_options import llm_options as llm_serve_options
from handlers.config_load import load_config


def cfg(**engine: object):
    return load_config(
        use_yaml=False,
        engine={"env": {"VLLM_CPU_KVCACHE_SPACE": "1"}, **engine},
        deployments={"llm": {"num_cpus": 2, "num_gpus": 1,
                             "autoscaling_config": {"min_replicas": 0, "max_replicas": 3}}},
    )


def test_single_gpu_replica_is_one_bundle() -> None:
    opts = llm_serve_options(cfg())
    assert opts["placement_group_bundles"] == [{"CPU": 2, "GPU": 1}]
    assert opts["ray_actor_options"]["num_gpus"] == 1
    assert opts["ray_actor_options"]["runtime_env"]["env_vars"] == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    assert opts["autoscaling_config"]["min_replicas"] == 0


def test_tensor_parallel_packs_one_gpu_bundle_per_shard() -> None:
    opts = llm_serve_options(cfg(tensor_parallel_size=4))
    assert opts["placement_group_bundles"] == [{"CPU": 2}] + [{"CPU": 1.0, "GPU": 1.0}] * 4
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    assert "num_gpus" not in opts["ray_actor_options"]


def test_pipeline_parallel_may_span_nodes() -> None:
    opts = llm_serve_options(cfg(tensor_parallel_size=2, pipeline_parallel_size=2))
    assert len(opts["placement_group_bundles"]) == 5
    assert opts["placement_group_strategy"] == "PACK"


def test_engine_args_use_ray_executor_when_sharded() -> None:
    from handlers.engine import engine_cli_args

    assert "--distributed-executor-backend" not in engine_cli_args(cfg())
    args = engine_cli_args(cfg(tensor_parallel_size=2))
    assert args[args.index("--distributed-executor-backend") + 1] == "ray"


def _ingress(engine_in_ingress: bool):
    from deployments.app import build_app

    c = cfg()
    d = c.deployments.model_copy(update={"engine_in_ingress": engine_in_ingress})
    return build_app(c.model_copy(update={"deployments": d}))._bound_deployment


def test_by_default_chat_ingress_calls_a_separate_llm_server() -> None:
    ingress = _ingress(False)
    assert ingress.init_args[2]._bound_deployment.name == "LLMServer"  # a handle at run time
    assert ingress.ray_actor_options["num_cpus"] == 0.5
    assert "num_gpus" not in ingress.ray_actor_options


def test_engine_in_ingress_gives_chat_ingress_the_engine_and_its_resources() -> None:
    ingress = _ingress(True)
    assert ingress.name == "ChatIngress"
    assert ingress.init_args[2] is None  # no LLMServer: the replica starts the engine itself
    assert ingress.ray_actor_options["num_gpus"] == 1
    assert ingress.ray_actor_options["runtime_env"]["env_vars"] == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    assert ingress._replica_config.placement_group_bundles == [{"CPU": 2, "GPU": 1}]
    assert ingress._deployment_config.autoscaling_config.max_replicas == 3
    # HTTP concurrency stays the ingress's; the engine's limits apply inside the replica.
    assert ingress.max_ongoing_requests == 256


def test_the_cpu_tier_gets_the_processor_config_and_never_the_checkpoint() -> None:
    """The deploy shape where CPU nodes have no weights: the fetcher and the preprocessor are
    bound to a config without model.source, and the processor settings inline."""
    from deployments.app import build_app

    ingress = build_app(cfg())._bound_deployment
    preprocessor = ingress.init_args[1]._bound_deployment
    fetcher = preprocessor.init_args[1]._bound_deployment
    for bound in (preprocessor, fetcher):
        config = bound.init_args[0]
        assert config.model.source == ""
        assert config.model.processor["patch_size"] == 14  # the demo model's, read once


def test_an_unreadable_processor_config_stops_the_build_with_what_to_do() -> None:
    import pytest

    from deployments.app import with_processor
    from handlers.config_load import ConfigError

    c = cfg()
    c = c.model_copy(update={"model": c.model.model_copy(update={"source": "/nonexistent/m"})})
    with pytest.raises(ConfigError, match=r"model\.processor"):
        with_processor(c)
    inline = c.model_copy(update={"model": c.model.model_copy(update={"processor": {"a": 1}})})
    assert with_processor(inline) is inline


def test_stopping_replicas_get_to_finish_their_longest_request() -> None:
    """Scale-down drains: a replica's graceful shutdown covers the longest request it may be
    serving (Serve's default, 20 s, would cut a long stream)."""
    from deployments.serve_options import fetcher_options, ingress_options, preprocessor_options

    c = load_config(use_yaml=False, limits={"request_timeout_s": 900},
                    fetch={"total_timeout_s": 30})
    assert llm_serve_options(c)["graceful_shutdown_timeout_s"] > 900
    assert ingress_options(c)["graceful_shutdown_timeout_s"] > 900
    assert fetcher_options(c)["graceful_shutdown_timeout_s"] > 30
    assert preprocessor_options(c)["graceful_shutdown_timeout_s"] > 30


def test_health_and_drain_settings_reach_serve() -> None:
    from deployments.serve_options import ingress_options

    c = load_config(use_yaml=False, deployments={"llm": {
        "health_check_period_s": 2, "health_check_timeout_s": 5,
        "graceful_shutdown_wait_loop_s": 1, "graceful_shutdown_timeout_s": 77}})
    opts = llm_serve_options(c)
    assert (opts["health_check_period_s"], opts["health_check_timeout_s"],
            opts["graceful_shutdown_wait_loop_s"], opts["graceful_shutdown_timeout_s"]) == (
        2, 5, 1, 77)
    # With the engine in ChatIngress, that replica is the engine's: llm's settings apply.
    d = c.deployments.model_copy(update={"engine_in_ingress": True})
    fused = ingress_options(c.model_copy(update={"deployments": d}))
    assert fused["health_check_period_s"] == 2 and fused["graceful_shutdown_timeout_s"] == 77


def test_engine_extra_args_go_through_vllms_parser() -> None:
    """A typo in engine.extra_args stops the start with vLLM's own message."""
    import pytest

    from handlers.config_load import ConfigError
    from handlers.engine import parse_engine_args

    args = parse_engine_args(cfg(extra_args={"max_num_batched_tokens": 4096,
                                             "enable_prefix_caching": False}))
    assert args.max_num_batched_tokens == 4096 and args.enable_prefix_caching is False
    with pytest.raises(ConfigError, match="max_num_batched_tokenz"):
        parse_engine_args(cfg(extra_args={"max_num_batched_tokenz": 64}))
    with pytest.raises(ConfigError, match="max-num-batched-tokens"):
        parse_engine_args(cfg(extra_args={"max_num_batched_tokens": "many"}))


def test_scaling_a_deployment_changes_no_replicas_init_arguments() -> None:
    """Serve restarts every replica whose init arguments change: replicas get the config
    without the scaling settings, so scaling the preprocessor (or anything) is an in-place
    update of that deployment alone, not a restart of the engine."""
    from deployments.app import build_app

    def bound(preprocessors: int, ingress_cpus: float) -> dict[str, tuple[object, ...]]:
        c = cfg()
        d = c.deployments.model_copy(update={
            "preprocessor": c.deployments.preprocessor.model_copy(
                update={"num_replicas": preprocessors}),
            "ingress": c.deployments.ingress.model_copy(update={"num_cpus": ingress_cpus})})
        ingress = build_app(c.model_copy(update={"deployments": d}))._bound_deployment
        prep = ingress.init_args[1]._bound_deployment
        llm = ingress.init_args[2]._bound_deployment
        return {"ingress": ingress.init_args[0], "preprocessor": prep.init_args[0],
                "llm": llm.init_args[0], "prep_replicas": prep._deployment_config.num_replicas}

    one, two = bound(1, 0.5), bound(2, 1.0)
    assert (one["prep_replicas"], two["prep_replicas"]) == (1, 2)  # the option changed
    for name in ("ingress", "preprocessor", "llm"):
        assert one[name] == two[name]  # the replicas' arguments did not



def _access_logs(app) -> dict[str, bool | None]:
    """Each bound deployment's access log setting (None: Serve's default, on)."""
    out: dict[str, bool | None] = {}
    todo = [app._bound_deployment]
    while todo:
        d = todo.pop()
        out[d.name] = (d._deployment_config.logging_config or {}).get("enable_access_log")
        todo += [a._bound_deployment for a in d.init_args if hasattr(a, "_bound_deployment")]
    return out


def test_access_logs_are_serves_unless_a_deployment_turns_its_own_off() -> None:
    from deployments.app import build_app

    def logs(**deployments: object) -> dict[str, bool | None]:
        c = load_config(use_yaml=False, deployments=deployments)
        return _access_logs(build_app(
            c.model_copy(update={"model": c.model.model_copy(update={"processor": {}})})))

    assert logs() == dict.fromkeys(("ChatIngress", "ImagePreprocessor", "ImageFetcher",
                                    "LLMServer"))
    assert logs(preprocessor={"access_log": False}, ingress={"access_log": True}) == {
        "ChatIngress": True, "ImagePreprocessor": False, "ImageFetcher": None,
        "LLMServer": None}
    # With the engine inside ChatIngress, the ingress's setting is the replica's.
    assert logs(engine_in_ingress=True, ingress={"access_log": False},
                llm={"access_log": True}) == {
        "ChatIngress": False, "ImagePreprocessor": None, "ImageFetcher": None}


def test_encoder_in_ingress_gives_chat_ingress_the_encoder_and_no_embedding_server() -> None:
    from deployments.app import build_app

    c = load_config(use_yaml=False, engine={"env": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
                    encoder={"id": "clip", "source": "/nonexistent", "env": {"ENC": "1"},
                             "processor": {"size": {"shortest_edge": 224}}},
                    deployments={"engine_in_ingress": True, "encoder_in_ingress": True,
                                 "llm": {"num_cpus": 1}, "encoder": {"num_cpus": 0.5}})
    c = c.model_copy(update={"model": c.model.model_copy(update={"processor": {}})})
    ingress = build_app(c)._bound_deployment
    assert ingress.init_args[3] is None  # no EmbeddingServer: the replica starts the encoder
    assert ingress.init_args[0].deployments.encoder_in_ingress  # ...as its config tells it
    assert ingress.ray_actor_options["num_cpus"] == 1.5
    assert ingress._replica_config.placement_group_bundles == [{"CPU": 1.5}]
    assert ingress.ray_actor_options["runtime_env"]["env_vars"] == {
        "VLLM_CPU_KVCACHE_SPACE": "1", "ENC": "1"}
    assert c.engine.env == {"VLLM_CPU_KVCACHE_SPACE": "1"}  # the config is not changed
    # Without the chat engine inside, the ingress's own CPUs plus the encoder's.
    d = c.deployments.model_copy(update={"engine_in_ingress": False})
    ingress = build_app(c.model_copy(update={"deployments": d}))._bound_deployment
    assert ingress.ray_actor_options["num_cpus"] == 1.0
    assert ingress.init_args[2]._bound_deployment.name == "LLMServer"
