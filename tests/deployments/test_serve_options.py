"""LLMServer's Serve options follow the config: resources, shards, placement."""

from __future__ import annotations

from deployments.llm_server import llm_serve_options
from handlers.config import load_config


def cfg(**engine: object):  # type: ignore[no-untyped-def]
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


def _ingress(engine_in_ingress: bool):  # type: ignore[no-untyped-def]
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
