"""build_app: compose the four deployments from one IrisConfig."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.fetcher import ImageFetcher
from deployments.ingress import ChatIngress
from deployments.llm_server import LLMServer, llm_serve_options
from deployments.preprocessor import ImagePreprocessor
from handlers.config import IrisConfig, load_config


def build_app(args: dict[str, Any] | IrisConfig | None = None) -> Application:
    """Serve app builder; `args` (from a Serve config) override YAML/env settings."""
    if isinstance(args, IrisConfig):
        cfg = args
    elif args:
        cfg = load_config(use_yaml=False, **args)  # inline Serve config: the whole config
    else:
        cfg = load_config()
    cfg = cfg.resolved()
    d = cfg.deployments
    fetcher = ImageFetcher.options(**d.fetcher.serve_options()).bind(cfg)
    preprocessor = ImagePreprocessor.options(**d.preprocessor.serve_options()).bind(cfg, fetcher)
    llm = LLMServer.options(**llm_serve_options(cfg)).bind(cfg)
    return ChatIngress.options(**d.ingress.serve_options()).bind(cfg, preprocessor, llm)
