"""vLLM's own statistics: exported through Ray's metrics system (running and waiting
requests, KV-cache use, prefix-cache and multimodal-cache hits, TTFT, time per output token,
tagged with the Serve replica), and the cache counts kept in-process for the replica's
stats (benchmarks and tests read them through a handle)."""

from __future__ import annotations

from typing import Any


def stat_loggers(export: bool) -> tuple[Any, list[Any]]:
    """(the in-process totals, the stat logger factories for AsyncLLM.from_vllm_config)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class CacheTotals(StatLoggerBase):
        """Prefix-cache tokens queried/hit, multimodal-cache items queried/hit and requests
        finished, summed."""

        def __init__(self, vllm_config: Any = None, engine_index: int = 0) -> None:
            self.prefix_queries = self.prefix_hits = 0
            self.mm_queries = self.mm_hits = 0
            self.finished = 0

        def record(self, scheduler_stats: Any, iteration_stats: Any,
                   mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                prefix = scheduler_stats.prefix_cache_stats
                self.prefix_queries += prefix.queries
                self.prefix_hits += prefix.hits
            if iteration_stats is not None:
                self.finished += len(iteration_stats.finished_requests)
            if mm_cache_stats is not None:
                self.mm_queries += mm_cache_stats.queries
                self.mm_hits += mm_cache_stats.hits

        def log_engine_initialized(self) -> None:
            pass

        def as_dict(self) -> dict[str, int]:
            return {"prefix_cache_queries": self.prefix_queries,
                    "prefix_cache_hits": self.prefix_hits,
                    "mm_cache_queries": self.mm_queries, "mm_cache_hits": self.mm_hits,
                    "requests_finished": self.finished}

    totals = CacheTotals()
    loggers: list[Any] = [lambda vllm_config, engine_index: totals]
    if export:
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        loggers.append(RayPrometheusStatLogger)
    return totals, loggers
