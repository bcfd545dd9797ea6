"""vLLM's own OpenAI server on the same model, as the reference for faithfulness."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx


class VllmReferenceServer:
    def __init__(self, model_dir: Path, model_id: str, port: int, env: dict[str, str]) -> None:
        self.url = f"http://127.0.0.1:{port}/v1"
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir), "--served-model-name", model_id,
            "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", "4096", "--dtype", "float32", "--enforce-eager",
            "--max-num-seqs", "16", "--disable-log-stats",
            # Every request prefilled in full, as Iris's engines prefill an image they have
            # not seen: with more than one worker thread, a prefill resumed from cached
            # blocks (the other layout's same case, sent earlier) rounds differently.
            "--no-enable-prefix-caching",
        ]
        self._log = open(os.devnull, "wb")
        self._proc = subprocess.Popen(
            cmd, env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"vLLM reference server exited with {self._proc.returncode}")
            try:
                if httpx.get(self.url.removesuffix("/v1") + "/health", timeout=2).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError("vLLM reference server did not become ready")

    def close(self) -> None:
        import signal

        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
        self._log.close()
