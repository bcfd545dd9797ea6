"""build_app: compose the deployments from one IrisConfig."""

from __future__ import annotations

from typing import Any, cast

from ray.serve import Application, Deployment

from deployments.fetcher import ImageFetcher
from deployments.ingress import ChatIngress
from deployments.llm_server import LLMServer
from deployments.preprocessor import ImagePreprocessor
from deployments.serve_options import (
    fetcher_options,
    ingress_options,
    llm_options,
    preprocessor_options,
)
from handlers.config import IrisConfig
from handlers.config_load import ConfigError, load_config
from handlers.imaging import read_processor_config


def with_processor(cfg: IrisConfig) -> IrisConfig:
    """The config with model.processor filled in from the checkpoint, read here, once: the
    CPU tier gets it inline and never needs the weights on its nodes."""
    if cfg.model.processor is not None:
        return cfg
    try:
        processor = read_processor_config(cfg.model.source)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model.processor is not set and the image processor config could not be read "
            f"from model.source ({cfg.model.source}): {exc}. Set model.processor to the "
            "checkpoint's preprocessor_config.json (scripts/gen_infra.py --processor-from "
            "<checkpoint> prints the block)."
        ) from exc
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"processor": processor})})


def build_app(args: dict[str, Any] | IrisConfig | None = None) -> Application:
    """Serve app builder; `args` (a Serve config's inline args) are the whole config."""
    if isinstance(args, IrisConfig):
        cfg = args
    elif args:
        cfg = load_config(use_yaml=False, **args)
    else:
        cfg = load_config()
    cfg = with_processor(cfg.resolved())
    cpu_tier = cfg.for_cpu_tier()
    fetcher = deployment(ImageFetcher).options(**fetcher_options(cfg)).bind(cpu_tier)
    preprocessor = deployment(ImagePreprocessor).options(**preprocessor_options(cfg)).bind(
        cpu_tier, fetcher)
    # The engine in its own deployment, or (engine_in_ingress) inside ChatIngress.
    llm = (None if cfg.deployments.engine_in_ingress
           else deployment(LLMServer).options(**llm_options(cfg)).bind(cfg))
    return deployment(ChatIngress).options(**ingress_options(cfg)).bind(cfg, preprocessor, llm)


def deployment(decorated: object) -> Deployment:
    """A @serve.deployment class as what the decorator made of it (typed as the class)."""
    return cast(Deployment, decorated)
