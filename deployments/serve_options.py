"""Ray Serve options of every deployment, from the config: replicas and autoscaling, queue
limits, resources, placement groups for sharded engines, health checks and draining."""

from __future__ import annotations

from typing import Any

from handlers.config import DeploymentSettings, IrisConfig

# A stopping replica gets its longest request's time plus this to finish.
DRAIN_MARGIN_S = 30.0
QUEUE_LIMITS = ("max_ongoing_requests", "max_queued_requests")


def deployment_options(s: DeploymentSettings, *, longest_request_s: float) -> dict[str, Any]:
    """Options for `Deployment.options(...)`: those the settings set, and a graceful
    shutdown long enough for the longest request the deployment may be serving."""
    opts: dict[str, Any] = {}
    if s.access_log is not None:  # Serve's LoggingConfig, only this changed from its defaults
        opts["logging_config"] = {"enable_access_log": s.access_log}
    if s.autoscaling_config is not None:
        opts["autoscaling_config"] = s.autoscaling_config
    elif s.num_replicas is not None:
        opts["num_replicas"] = s.num_replicas
    for name in (*QUEUE_LIMITS, "health_check_period_s", "health_check_timeout_s",
                 "graceful_shutdown_wait_loop_s"):
        if (value := getattr(s, name)) is not None:
            opts[name] = value
    opts["graceful_shutdown_timeout_s"] = (
        s.graceful_shutdown_timeout_s or longest_request_s + DRAIN_MARGIN_S
    )
    actor: dict[str, Any] = {}
    if s.num_cpus is not None:
        actor["num_cpus"] = s.num_cpus
    if s.num_gpus is not None:
        actor["num_gpus"] = s.num_gpus
    if s.resources:
        actor["resources"] = s.resources
    if actor:
        opts["ray_actor_options"] = actor
    if s.placement_group_bundles:
        opts["placement_group_bundles"] = s.placement_group_bundles
        opts["placement_group_strategy"] = s.placement_group_strategy or "PACK"
    return opts


def fetcher_options(cfg: IrisConfig) -> dict[str, Any]:
    return deployment_options(cfg.deployments.fetcher,
                              longest_request_s=cfg.fetch.total_timeout_s)


def preprocessor_options(cfg: IrisConfig) -> dict[str, Any]:
    return deployment_options(cfg.deployments.preprocessor,
                              longest_request_s=cfg.fetch.total_timeout_s)


def engine_placement(cfg: IrisConfig) -> dict[str, Any]:
    """Placement group for one engine replica: the replica actor's bundle, then one bundle
    per model shard (tensor x pipeline parallel). Tensor-parallel shards share a node
    (STRICT_PACK); pipeline stages may span nodes (PACK). CPU-only configs take the same
    path with CPU bundles, so tests exercise it."""
    e, d = cfg.engine, cfg.deployments.llm
    shards = e.tensor_parallel_size * e.pipeline_parallel_size
    cpus = d.num_cpus if d.num_cpus is not None else 1.0
    gpus = d.num_gpus or 0.0
    if shards == 1:
        bundles = [{"CPU": cpus, **({"GPU": gpus} if gpus else {})}]
    else:
        shard = {"CPU": 1.0, **({"GPU": 1.0} if gpus else {})}
        bundles = [{"CPU": cpus}] + [dict(shard) for _ in range(shards)]
    strategy = "STRICT_PACK" if e.pipeline_parallel_size == 1 else "PACK"
    return {"placement_group_bundles": bundles, "placement_group_strategy": strategy}


def llm_options(cfg: IrisConfig) -> dict[str, Any]:
    """The engine replica's options (LLMServer's, or ChatIngress's when it holds the
    engine): the config's, the engine's environment, its placement group."""
    opts = deployment_options(cfg.deployments.llm,
                              longest_request_s=cfg.limits.request_timeout_s)
    actor = opts.setdefault("ray_actor_options", {})
    # vLLM reads its settings from the environment of the replica process.
    actor["runtime_env"] = {"env_vars": dict(cfg.engine.env)}
    if "placement_group_bundles" not in opts:
        opts.update(engine_placement(cfg))
        if len(opts["placement_group_bundles"]) > 1:
            actor.pop("num_gpus", None)  # the shards' bundles hold the GPUs
    return opts


def ingress_options(cfg: IrisConfig) -> dict[str, Any]:
    """ChatIngress's options. When it holds the engine (deployments.engine_in_ingress) it
    takes the engine replica's resources, placement, scaling and health checks, and keeps
    the ingress's HTTP limits: the engine's own apply inside (deployments.backend)."""
    d = cfg.deployments
    opts = deployment_options(d.ingress, longest_request_s=cfg.limits.request_timeout_s)
    if d.engine_in_ingress and cfg.serve_chat:
        http = opts
        kept = (*QUEUE_LIMITS, "logging_config")
        opts = {k: v for k, v in llm_options(cfg).items() if k not in kept}
        opts.update({k: http[k] for k in kept if k in http})
    if d.encoder_in_ingress and cfg.encoder is not None:
        with_encoder(opts, cfg)
    return opts


def with_encoder(opts: dict[str, Any], cfg: IrisConfig) -> None:
    """ChatIngress's options when it also holds the encoder (deployments.encoder_in_ingress):
    the encoder's CPUs on top of its own (in the bundle it runs in, when it has one) and the
    encoder's environment."""
    assert cfg.encoder is not None
    actor = opts.setdefault("ray_actor_options", {})
    env = actor.setdefault("runtime_env", {}).setdefault("env_vars", {})
    actor["runtime_env"]["env_vars"] = {**env, **cfg.encoder.env}
    cpus = cfg.deployments.encoder.num_cpus or 0.0
    if cpus:
        actor["num_cpus"] = actor.get("num_cpus", 0.0) + cpus
        if bundles := opts.get("placement_group_bundles"):
            first = dict(bundles[0])
            first["CPU"] = first.get("CPU", 0.0) + cpus
            opts["placement_group_bundles"] = [first, *bundles[1:]]


def llm_server_options(cfg: IrisConfig) -> dict[str, Any]:
    """LLMServer's options: the engine replica's, and the router its callers use."""
    opts = llm_options(cfg)
    d = cfg.deployments
    if d.llm_router == "image_affinity":
        opts["request_router_config"] = {  # Serve's RequestRouterConfig
            # Serve pickles the router's module by value into every caller (ChatIngress).
            "request_router_class": "deployments.router:ImageAffinityRouter",
            "request_router_kwargs": {"imbalance_margin": d.llm_router_imbalance_margin},
        }
    return opts


def encoder_options(cfg: IrisConfig) -> dict[str, Any]:
    """EmbeddingServer's options: the config's, and the encoder's environment."""
    assert cfg.encoder is not None
    opts = deployment_options(cfg.deployments.encoder,
                              longest_request_s=cfg.limits.request_timeout_s)
    opts.setdefault("ray_actor_options", {})["runtime_env"] = {
        "env_vars": dict(cfg.encoder.env)}
    return opts
