"""The one Iris configuration: every field, its default and what it means. Where values come
from (YAML, IRIS_* variables, explicit values) is handlers/config_load.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator

from handlers.moderation import ModerationSettings

REPO_ROOT = Path(__file__).resolve().parent.parent


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Strict):
    id: str = Field("demo-vlm", description="Model id clients send and /v1/models lists.")
    source: str = Field(
        ".models/demo-vlm",
        description="Local directory or Hugging Face id of the checkpoint vLLM loads.",
    )
    processor: dict[str, Any] | None = Field(
        None,
        description="The image processor's settings (the checkpoint's preprocessor_config.json). "
        "Unset: read from `source` once, where the app is built, and handed to the CPU "
        "tier, which never reads the checkpoint. Set it (scripts/gen_infra.py does) when the "
        "node that builds the app cannot read the checkpoint either.",
    )


# engine.cpu_cores: how many cores a CPU engine's worker gets to itself.
CpuCores = int | Literal["auto", "off"]


class EngineSettings(_Strict):
    max_model_len: int = Field(4096, gt=0, description="Context length given to vLLM.")
    dtype: str = Field("auto", description="vLLM dtype (auto, float32, bfloat16, float16).")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs / torch.compile.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per model shard group.")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages (may span nodes).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM GPU memory share.")
    max_num_seqs: int = Field(64, gt=0, description="Max sequences the engine batches at once.")
    limit_images_per_prompt: int = Field(8, ge=0, description="vLLM limit_mm_per_prompt image.")
    extra_args: dict[str, Any] = Field(
        default_factory=dict, description="Any other vllm AsyncEngineArgs fields, passed as-is."
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment for the engine replica (e.g. VLLM_CPU_KVCACHE_SPACE).",
    )
    cpu_cores: CpuCores = Field(
        "off",
        description="CPU engines only (vLLM's CPU backend, one shard), applied when Iris "
        "starts Ray (`make serve`): the engine's worker and its core process (the scheduler, "
        "which takes turns with it) get the first cpu_cores cores, and every replica the "
        "rest (Ray's own processes: ray_cores), so the scheduler never shares a core with "
        "request handling. "
        "auto: half the cores. off: leave placement to vLLM and the OS.",
    )
    cpu_worker_threads: Literal["engine", "all"] = Field(
        "engine",
        description="With cpu_cores placing a CPU engine: where its worker's OpenMP threads "
        "run. engine: only on the engine's cores. all: also one on each of the replicas' "
        "cores, so the forward pass takes what request handling leaves idle (the scheduler, "
        "Ray and the replicas stay where cpu_cores put them): conversations 1.5x, "
        "never-seen images even (docs/benchmarks.md, compare-34; infra/local.yaml's "
        "choice). Earlier runs, with more CPU per image in the replicas, had it losing on "
        "big images (compare-28).",
    )

    ray_cores: Literal["replicas", "engine"] = Field(
        "replicas",
        description="With cpu_cores placing a CPU engine: where Ray's own processes run (the "
        "GCS, the raylet, its agents, Serve's controller and proxy; ~140 ms of CPU per second "
        "on an idle `make serve`). replicas: beside the replicas, as everything Ray starts. "
        "engine: on the engine's cores, and each replica moves itself to the replicas' cores "
        "when it starts: Ray's processes then run in the gaps the engine's busy-polling "
        "leaves, not in turns with request handling (12 MP images 1.11x, c=1 first token "
        "18 ms sooner, the rest even: docs/benchmarks.md, compare-52; infra/local.yaml's "
        "choice).",
    )

    tool_call_parser: str | None = Field(
        "hermes",
        description="vLLM's tool-call parser for the model's chat template, with auto tool "
        "choice on: tools with tool_choice auto, required or a named function work. hermes "
        "fits Qwen2.5-VL's tool format (and the demo model's); other families have their own "
        "(vLLM's --tool-call-parser). null: no tool calling (tool requests are refused).",
    )
    metrics: bool = Field(
        True,
        description="Export vLLM's own statistics (running/waiting requests, KV-cache use, "
        "prefix- and multimodal-cache hits, TTFT, time per output token) through Ray's "
        "metrics, as ray_vllm_*, tagged with the Serve replica.",
    )
    stall_timeout_s: float = Field(
        120.0, gt=0,
        description="With requests in flight and no output from the engine for this long, it "
        "counts as stuck: its replica reports unhealthy and Serve replaces it.",
    )
    restart_attempts: int = Field(
        3, ge=1,
        description="A dead engine is restarted in its replica (which keeps answering 503 "
        "with Retry-After meanwhile); after this many failed restarts in a row the replica "
        "reports unhealthy and Serve replaces it.",
    )

    @field_validator("cpu_cores")
    @classmethod
    def _positive_cores(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("cpu_cores must be at least 1 (or auto, or off)")
        return v


class EncoderSettings(_Strict):
    """An image-text encoder (CLIP, SigLIP) on vLLM's pooling runner, for /v1/embeddings and
    /v1/moderations. It runs in an engine of its own (EmbeddingServer): a vLLM engine either
    generates or pools."""

    id: str = Field("demo-clip", description="Model id clients send and /v1/models lists.")
    source: str = Field(
        ".models/demo-clip",
        description="Local directory or Hugging Face id of the encoder checkpoint "
        "(e.g. openai/clip-vit-base-patch32).",
    )
    processor: dict[str, Any] | None = Field(
        None, description="The encoder's image processor settings (preprocessor_config.json); "
        "as model.processor: read from source where the app is built when unset.",
    )
    dtype: str = Field("auto", description="vLLM dtype.")
    max_model_len: int | None = Field(
        None, gt=0, description="Longest text in tokens (None: the model's own, 77 for CLIP).")
    max_num_seqs: int = Field(64, gt=0, description="Items the engine pools at once.")
    kv_cache_memory_bytes: int | None = Field(
        64 << 20, gt=0,
        description="Memory for the encoder's attention cache (pooling needs little); None: "
        "vLLM's default share of the device.",
    )
    extra_args: dict[str, Any] = Field(
        default_factory=dict, description="Any other vLLM engine argument, as for engine.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment for the EmbeddingServer replica.")


class LimitSettings(_Strict):
    max_body_bytes: int = Field(64 << 20, gt=0, description="Largest accepted request body.")
    max_images_per_request: int = Field(8, ge=0, description="Images allowed in one request.")
    max_total_pixels: int = Field(
        16_000_000, gt=0, description="Pixels (after resizing) a request's images may total."
    )
    request_timeout_s: float = Field(600.0, gt=0, description="Whole-request deadline.")
    max_embedding_inputs: int = Field(
        256, gt=0, description="Items (texts and images) one /v1/embeddings or "
        "/v1/moderations request may hold.",
    )


class FetchSettings(_Strict):
    max_image_bytes: int = Field(32 << 20, gt=0, description="Largest image download.")
    connect_timeout_s: float = Field(5.0, gt=0, description="TCP/TLS connect timeout.")
    read_timeout_s: float = Field(10.0, gt=0, description="Timeout between received bytes.")
    total_timeout_s: float = Field(30.0, gt=0, description="Deadline for one whole fetch.")
    allow_private_networks: bool = Field(
        False, description="Allow http(s) fetches to private/loopback addresses."
    )
    allowed_domains: list[str] | None = Field(
        None, description="If set, http(s) hosts must match one of these (suffix match)."
    )
    s3_allowed_buckets: list[str] = Field(
        default_factory=list, description='S3 buckets images may come from; ["*"] allows all.'
    )
    cache_max_bytes: int = Field(256 << 20, ge=0, description="Fetcher LRU cache size in bytes.")
    s3_threads: int = Field(
        32, ge=2,
        description="Threads for S3 calls (boto3 blocks), per fetcher replica; one bucket may "
        "use at most half, so a hung bucket cannot starve the others.",
    )
    dns_threads: int = Field(
        8, ge=1, description="Threads for DNS look-ups (getaddrinfo blocks), per fetcher replica."
    )
    ca_bundle: str | None = Field(
        None, description="PEM file of CAs to trust for https images (e.g. an internal CA) "
        "instead of the public ones; the environment's SSL_CERT_FILE is deliberately ignored.",
    )


# Fast mode drafts a JPEG only if the reduced decode is still this many times the target
# size. libjpeg's scaled IDCT is a sharper low-pass than the bicubic antialias filter, so
# the closer the draft is to the target, the more fine detail differs. Measured PSNR
# against exact (geometry-aligned resize): photo-like content >= 44 dB from 1.1x, white
# noise 31 dB at 1.5x / 37 dB at 2x / 41 dB at 2.5x, 2 px text 33 / 36 / 38 dB. 2.0 keeps
# photos above 40 dB, so it does not draft a 12 MP photo for a ~1 MP target (1/2 scale of
# 4000x3000 is only 1.74x Qwen2-VL's 1148x840 for it): `fast` then helps low detail and
# bigger photos. 1.5 drafts 12 MP photos too, but saves only ~15% of a q90 one's decode
# (the Huffman decoding of the whole file stays; docs/benchmarks.md, compare-37).
FAST_MIN_HEADROOM = 2.0


class ImagingSettings(_Strict):
    fidelity: Literal["exact", "fast"] = Field(
        "exact",
        description="exact: the model processor's pixels; fast: big JPEGs decoded at 1/2-1/8.",
    )
    fast_min_headroom: float = Field(
        FAST_MIN_HEADROOM, ge=1.0,
        description="fast: draft a JPEG only if the reduced decode stays this many times the "
        "target (2.0 keeps photos > 40 dB PSNR from exact; 3.0 any content).",
    )
    min_pixels: int | None = Field(None, description="Override the model's min_pixels.")
    max_pixels: int | None = Field(None, description="Override the model's max_pixels.")
    low_detail_max_pixels: int = Field(
        200704, gt=0, description="Pixel budget for detail=low (256 tokens on Qwen2-VL)."
    )
    default_detail: Literal["low", "high"] = Field(
        "high", description="What detail=auto (or no detail) means."
    )
    cache_max_bytes: int = Field(
        256 << 20, ge=0,
        description="Resized pixels kept per preprocessor replica (object store), by content "
        "hash and target size; a repeated image skips decoding. 0 disables.",
    )
    max_decoded_pixels: int = Field(
        100_000_000, gt=0, description="Refuse images whose header says more pixels than this."
    )


class DeploymentSettings(_Strict):
    num_replicas: int | None = Field(None, ge=0, description="Fixed replicas (no autoscaling).")
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Ray Serve autoscaling_config; overrides num_replicas."
    )
    max_ongoing_requests: int | None = Field(None, gt=0, description="Per replica concurrency.")
    max_queued_requests: int | None = Field(None, description="Queue cap per handle (-1 = none).")
    num_cpus: float | None = Field(None, ge=0, description="CPUs reserved per replica.")
    num_gpus: float | None = Field(None, ge=0, description="GPUs reserved per replica.")
    resources: dict[str, float] | None = Field(None, description="Custom Ray resources.")
    placement_group_bundles: list[dict[str, float]] | None = Field(
        None, description="Placement group bundles for one replica (first one hosts the actor)."
    )
    placement_group_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] | None = (
        Field(None, description="Placement group strategy for the bundles.")
    )

    access_log: bool | None = Field(
        None, description="Ray Serve's access log: a line per call a replica handles, with "
        "its request id and duration, in the replica's log file. None: Serve's default (on). "
        "Off saves the line's cost, ~1-2 ms CPU per call on this 2-core machine "
        "(docs/benchmarks.md, compare-43), but a grep for a request id then no longer finds "
        "its calls there. Only ChatIngress's lines (one per HTTP request) also reach make "
        "serve's console.",
    )
    health_check_period_s: float | None = Field(
        None, gt=0, description="Seconds between Serve's health checks of a replica (Serve "
        "replaces one after 3 failures in a row). None: Serve's default, 10.",
    )
    health_check_timeout_s: float | None = Field(
        None, gt=0, description="How long one health check may take. None: Serve's default, 30."
    )
    graceful_shutdown_wait_loop_s: float | None = Field(
        None, gt=0, description="How often a stopping replica checks whether its requests "
        "are done. None: Serve's default, 2.",
    )
    graceful_shutdown_timeout_s: float | None = Field(
        None, gt=0, description="How long a stopping replica (scale-down, update) may finish "
        "its requests before it is killed. None: Iris's default for the deployment: the "
        "longest request it may serve (limits.request_timeout_s for ChatIngress and "
        "LLMServer, fetch.total_timeout_s for the fetcher and preprocessor) plus a margin.",
    )


class DeploymentsSettings(_Strict):
    ingress: DeploymentSettings = Field(
        default_factory=lambda: DeploymentSettings(
            num_replicas=1, num_cpus=0.5, max_ongoing_requests=256
        ),
        description="ChatIngress (HTTP).",
    )
    fetcher: DeploymentSettings = Field(
        default_factory=lambda: DeploymentSettings(
            num_replicas=1, num_cpus=0.25, max_ongoing_requests=128
        ),
        description="ImageFetcher (I/O bound).",
    )
    preprocessor: DeploymentSettings = Field(
        default_factory=lambda: DeploymentSettings(
            num_replicas=1, num_cpus=1, max_ongoing_requests=32
        ),
        description="ImagePreprocessor (CPU bound, one per core).",
    )
    llm: DeploymentSettings = Field(
        default_factory=lambda: DeploymentSettings(
            num_replicas=1, num_cpus=1, max_ongoing_requests=128
        ),
        description="LLMServer (vLLM engine).",
    )
    encoder: DeploymentSettings = Field(
        default_factory=lambda: DeploymentSettings(
            num_replicas=1, num_cpus=1, max_ongoing_requests=64
        ),
        description="EmbeddingServer (the encoder's vLLM engine).",
    )
    llm_router: Literal["image_affinity", "power_of_two"] = Field(
        "image_affinity",
        description="How ChatIngress picks an LLMServer replica. image_affinity: requests with "
        "the same key (the client's prompt_cache_key, else the conversation's first image) "
        "go to the same replica, whose vLLM prefix and multimodal caches then hit (rendezvous "
        "hashing, no shared state; a load guard sends a request elsewhere when its replica is "
        "full or much busier than the least busy). power_of_two: Serve's default.",
    )
    llm_router_imbalance_margin: float = Field(
        16, ge=0,
        description="image_affinity: a request leaves its replica when that replica's queue is "
        "longer than the shortest by more than this (or the replica is full).",
    )
    engine_in_ingress: bool = Field(
        False,
        description="Run the vLLM engine inside the ChatIngress replica instead of its own "
        "LLMServer deployment: one Ray Serve hop less per request (less CPU and latency on "
        "a small machine), but the engine then scales with the HTTP tier. ChatIngress takes "
        "llm's resources, placement and autoscaling, keeps ingress's max_ongoing_requests "
        "and max_queued_requests for HTTP, and applies llm's to the engine inside (beyond "
        "them requests are refused with 503, as Serve does in front of LLMServer).",
    )

    encoder_in_ingress: bool = Field(
        False,
        description="Run the encoder's vLLM engine (encoder) inside the ChatIngress replica "
        "instead of its own EmbeddingServer deployment: one Ray Serve hop and one process "
        "less per /v1/embeddings and /v1/moderations request (on a small machine a fifth less "
        "CPU per fresh image: docs/benchmarks.md, compare-44), but the encoder then scales "
        "with the HTTP tier. ChatIngress adds encoder's num_cpus and env to its own; a "
        "replica whose encoder cannot be brought back fails its health check.",
    )

    data_uris_in_ingress: bool = Field(
        False,
        description="Prepare images sent as data: URIs inside the ChatIngress replica (their "
        "bytes are already there) instead of in the ImagePreprocessor deployment; http(s) "
        "and s3 images still go through the fetcher and the preprocessor. One Ray call and "
        "one process less per image: on a small machine (infra/local.yaml turns it on) "
        "fresh images 1.2x for chat and 1.5x for embeddings (docs/benchmarks.md, "
        "compare-45). The cost: those images no longer scale with the CPU tier, and "
        "decoding shares the ingress's cores with HTTP handling.",
    )

    @field_validator("ingress", "fetcher", "preprocessor", "llm", "encoder", mode="before")
    @classmethod
    def _over_defaults(cls, value: Any, info: ValidationInfo) -> Any:
        """A deployment's section keeps the defaults for the fields it leaves out: a config
        that only says `fetcher: {num_replicas: 2}` must not drop the fetcher's concurrency
        (128) to Serve's default of 5, where a few hung sources would block every fetch."""
        if not isinstance(value, dict):
            return value
        field = cls.model_fields[str(info.field_name)]
        default = field.get_default(call_default_factory=True).model_dump(exclude_none=True)
        if "autoscaling_config" in value and "num_replicas" not in value:
            default.pop("num_replicas", None)  # autoscaling replaces a fixed count
        return {**default, **value}


# Ray Serve reads this at import time in every Ray process, so it must be in the
# environment before Ray starts.
DIRECT_INGRESS_FLAG = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
# Ingress replicas that land on one node take ports http.port, http.port + 1, ...
DIRECT_INGRESS_PORT_SPAN = 16


class HttpSettings(_Strict):
    host: str = Field("127.0.0.1", description="Address clients connect to.")
    port: int = Field(8000, gt=0, lt=65536, description="Port clients connect to.")
    direct_ingress: bool = Field(
        False,
        description="ChatIngress itself listens on host:port (Ray Serve direct ingress), so "
        "requests skip Serve's proxy actor: one process hop and two copies of each body "
        "fewer. Applied when Iris starts Ray (`make serve`); on a cluster started elsewhere "
        "it needs RAY_SERVE_ENABLE_DIRECT_INGRESS=1 on every node. Extra ingress replicas on "
        "a node take the next ports; Serve's proxy still runs, on proxy_port.",
    )
    proxy_port: int | None = Field(
        None, gt=0, lt=65536,
        description="With direct_ingress: port of Serve's proxy (routes to ingress replicas "
        "on any node). None picks a free port.",
    )
    stream_batch_ms: float = Field(
        50.0, ge=0,
        description="After the first token, streamed chunks produced within this many ms "
        "travel together (fewer messages between replicas; Ray Serve LLM's default is also "
        "50). 0 sends every chunk on its own.",
    )

    def direct_ingress_env(self) -> dict[str, str]:
        """Ray Serve settings, for the environment Ray starts with, that put the ingress
        replica of each node on `port` (the next ports for extra ones)."""
        if not self.direct_ingress:
            return {}
        return {
            DIRECT_INGRESS_FLAG: "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(self.port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(self.port + DIRECT_INGRESS_PORT_SPAN - 1),
            # A restarted ingress replica gets `port` back at once rather than the next one.
            "RAY_SERVE_PORT_QUARANTINE_S": "0",
            # Serve holds a stopping ingress replica 30 s for an external load balancer to
            # notice; with clients connecting straight to it there is none to wait for.
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
        }

    def direct_ingress_active(self) -> bool:
        """Asked for, and this Ray process's environment has Serve's switch on."""
        return self.direct_ingress and os.environ.get(DIRECT_INGRESS_FLAG) == "1"


class IrisConfig(_Strict):
    """Everything Iris can be told. Loaded by handlers.config_load.load_config (YAML file,
    IRIS_* variables, explicit values); constructing it directly uses defaults only."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: ModelSettings = Field(default_factory=ModelSettings, description="What to serve.")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="vLLM engine.")
    limits: LimitSettings = Field(default_factory=LimitSettings, description="Request limits.")
    fetch: FetchSettings = Field(default_factory=FetchSettings, description="Image fetching.")
    imaging: ImagingSettings = Field(
        default_factory=ImagingSettings, description="Image preprocessing."
    )
    deployments: DeploymentsSettings = Field(
        default_factory=DeploymentsSettings, description="Serve options per deployment."
    )
    http: HttpSettings = Field(default_factory=HttpSettings, description="HTTP endpoint.")
    serve_chat: bool = Field(
        True, description="Serve the chat model (model, engine). False: only the encoder.")
    encoder: EncoderSettings | None = Field(
        None, description="The image-text encoder for /v1/embeddings and /v1/moderations; "
        "null: neither route serves a model.",
    )
    moderation: ModerationSettings = Field(
        default_factory=ModerationSettings,
        description="How /v1/moderations scores inputs with the encoder (handlers/moderation.py).",
    )
    api_key: list[SecretStr] | None = Field(
        None, description="Bearer key(s) required on every route but /health (IRIS_API_KEY: "
        "one key, a comma-separated list, or a JSON list)."
    )
    app_name: str = Field("iris", description="Serve application name.")
    metrics_port: int = Field(
        8080, gt=0, lt=65536,
        description="Port of the node's Prometheus endpoint (Ray's metrics agent: every Iris "
        "and Ray metric of the node's replicas, at /metrics) when Iris starts Ray itself "
        "(`make serve`). On a cluster Ray's own --metrics-export-port sets it (KubeRay: 8080).",
    )

    @field_validator("api_key", mode="before")
    @classmethod
    def _one_or_many_keys(cls, v: Any) -> Any:
        # One key, a comma-separated list, or a JSON list (as IRIS_API_KEY is written).
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                return json.loads(v)
            return [k for k in (s.strip() for s in v.split(",")) if k] or None
        return v

    def resolved(self) -> IrisConfig:
        """Copy with relative local checkpoint paths made absolute (replicas run elsewhere)."""
        out = self.model_copy(update={
            "model": self.model.model_copy(update={"source": _absolute(self.model.source)})})
        if self.encoder is not None:
            out = out.model_copy(update={"encoder": self.encoder.model_copy(
                update={"source": _absolute(self.encoder.source)})})
        return out

    def for_replicas(self) -> IrisConfig:
        """What replicas are started with: everything but how Serve scales and places them
        (bar the engine's queue limits, which the in-process engine applies itself). A
        change to replicas, autoscaling, resources or health checks is then an in-place
        update of the deployment it concerns, not a restart of every replica (Serve restarts
        a replica when its init arguments change)."""
        d, llm = self.deployments, self.deployments.llm
        kept = DeploymentsSettings(
            engine_in_ingress=d.engine_in_ingress,
            data_uris_in_ingress=d.data_uris_in_ingress,
            encoder_in_ingress=d.encoder_in_ingress,
            llm=DeploymentSettings(max_ongoing_requests=llm.max_ongoing_requests,
                                   max_queued_requests=llm.max_queued_requests),
        )
        return self.model_copy(update={"deployments": kept})

    def for_cpu_tier(self) -> IrisConfig:
        """What the fetcher and preprocessor get: no checkpoint location, so they cannot
        depend on the weights being on their node (they use the processor configs)."""
        out = self.model_copy(update={"model": self.model.model_copy(update={"source": ""})})
        if self.encoder is not None:
            out = out.model_copy(update={"encoder": self.encoder.model_copy(
                update={"source": ""})})
        return out


def _absolute(source: str) -> str:
    """A relative local checkpoint path as an absolute one (a Hugging Face id unchanged)."""
    src = Path(source)
    if not src.is_absolute() and not src.exists() and (REPO_ROOT / src).exists():
        src = REPO_ROOT / src
    return str(src.resolve()) if src.exists() else source
