"""`make serve`: a local Ray instance + the Iris app until Ctrl-C."""

from __future__ import annotations

import os
import signal
import sys
import time

from handlers.config import IrisConfig, load_config


def start(cfg: IrisConfig, *, num_cpus: int | None = None) -> None:
    """Start Ray (more logical CPUs than cores, so all replicas fit) and deploy the app."""
    import ray
    from ray import serve

    from deployments.app import build_app

    if not ray.is_initialized():
        cpus = num_cpus or max(8, os.cpu_count() or 1)
        print(f">> starting a local Ray instance ({cpus} logical CPUs)", flush=True)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    print(f">> deploying {cfg.app_name!r} (model {cfg.model.id!r} from {cfg.model.source})",
          flush=True)
    # serve.run waits until every deployment is RUNNING (the engine has loaded).
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/", blocking=False)


def main() -> int:
    import ray
    from ray import serve

    cfg = load_config()
    t0 = time.monotonic()
    try:
        start(cfg)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
        return 130
    base = f"http://{cfg.http.host}:{cfg.http.port}/v1"
    print(f">> ready in {time.monotonic() - t0:.0f} s: OpenAI API at {base} "
          f"(model {cfg.model.id!r}). Ctrl-C stops everything.", flush=True)
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    while not stop:
        time.sleep(0.5)
    print(">> shutting down", flush=True)
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
