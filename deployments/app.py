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
    if d.engine_in_ingress:
        # The engine lives in the ingress replica, which takes the engine's resources and
        # scaling, and the ingress's HTTP concurrency: the engine's own limits apply inside
        # (handlers.admission), where Serve's queue in front of LLMServer used to be.
        limits = ("max_ongoing_requests", "max_queued_requests")
        http = d.ingress.serve_options()
        opts = {k: v for k, v in llm_serve_options(cfg).items() if k not in limits}
        opts.update({k: http[k] for k in limits if k in http})
        return ChatIngress.options(**opts).bind(cfg, preprocessor, None)
    llm = LLMServer.options(**llm_serve_options(cfg)).bind(cfg)
    return ChatIngress.options(**d.ingress.serve_options()).bind(cfg, preprocessor, llm)
