"""build_app: compose the deployments from one IrisConfig."""

from __future__ import annotations

from typing import Any, cast

from ray.serve import Application, Deployment

from deployments.embedding_server import EmbeddingServer
from deployments.fetcher import ImageFetcher
from deployments.ingress import ChatIngress
from deployments.llm_server import LLMServer
from deployments.preprocessor import ImagePreprocessor
from deployments.serve_options import (
    encoder_options,
    fetcher_options,
    ingress_options,
    llm_server_options,
    preprocessor_options,
)
from handlers.config import IrisConfig
from handlers.config_load import ConfigError, load_config
from handlers.imaging import read_processor_config


def processor_of(source: str, field: str) -> dict[str, Any]:
    """A checkpoint's image processor config, read here, once: the CPU tier gets it inline
    and never needs the weights on its nodes."""
    try:
        return read_processor_config(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{field} is not set and the image processor config could not be read from "
            f"{source}: {exc}. Set {field} to the checkpoint's preprocessor_config.json "
            "(scripts/gen_infra.py --processor-from <checkpoint> prints the block)."
        ) from exc


def with_processor(cfg: IrisConfig) -> IrisConfig:
    """The config with model.processor (and encoder.processor) filled in."""
    if cfg.serve_chat and cfg.model.processor is None:
        model = cfg.model.model_copy(update={
            "processor": processor_of(cfg.model.source, "model.processor")})
        cfg = cfg.model_copy(update={"model": model})
    if cfg.encoder is not None and cfg.encoder.processor is None:
        encoder = cfg.encoder.model_copy(update={
            "processor": processor_of(cfg.encoder.source, "encoder.processor")})
        cfg = cfg.model_copy(update={"encoder": encoder})
    return cfg


def build_app(args: dict[str, Any] | IrisConfig | None = None) -> Application:
    """Serve app builder; `args` (a Serve config's inline args) are the whole config."""
    if isinstance(args, IrisConfig):
        cfg = args
    elif args:
        cfg = load_config(use_yaml=False, **args)
    else:
        cfg = load_config()
    cfg = with_processor(cfg.resolved())
    # Scaling and placement go to Serve as options; replicas get the rest (for_replicas).
    replica_cfg = cfg.for_replicas()
    cpu_tier = replica_cfg.for_cpu_tier()
    fetcher = deployment(ImageFetcher).options(**fetcher_options(cfg)).bind(cpu_tier)
    preprocessor = deployment(ImagePreprocessor).options(**preprocessor_options(cfg)).bind(
        cpu_tier, fetcher)
    # The chat engine in its own deployment, or (engine_in_ingress) inside ChatIngress.
    llm = (deployment(LLMServer).options(**llm_server_options(cfg)).bind(replica_cfg)
           if cfg.serve_chat and not cfg.deployments.engine_in_ingress else None)
    # The encoder has an engine of its own (vLLM's pooling runner), in its own deployment or
    # (encoder_in_ingress) inside ChatIngress.
    encoder = (deployment(EmbeddingServer).options(**encoder_options(cfg)).bind(replica_cfg)
               if cfg.encoder is not None and not cfg.deployments.encoder_in_ingress else None)
    return deployment(ChatIngress).options(**ingress_options(cfg)).bind(
        replica_cfg, preprocessor, llm, encoder)


def deployment(decorated: object) -> Deployment:
    """A @serve.deployment class as what the decorator made of it (typed as the class)."""
    return cast(Deployment, decorated)
