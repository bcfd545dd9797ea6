"""Preprocessing throughput on one core: our exact and fast modes vs the model's HF processor.

    .venv/bin/python -m load_tests.preprocess_bench [--count 12] [--repeat 3] [--pin-cpu N]

A deterministic mixed set (0.3-12 MP, JPEG and PNG alternating) is generated on the fly.
Every path runs single-threaded (torch intra-op threads = 1), one image at a time:

- exact: `prepare_image(fidelity="exact")`, bytes -> uint8 at the model's target size
- fast:  `prepare_image(fidelity="fast")` (JPEG draft decoding)
- hf:    what vLLM does per image without us: PIL open + EXIF + RGB (vLLM's loader), then
         the HF image processor call producing pixel_values
- hf-on-prepared: the processor call on our exact output (what vLLM still does after us)
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / ".models" / "demo-vlm"


@dataclass(frozen=True)
class Sample:
    fmt: str
    width: int
    height: int
    data: bytes

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6


def synth(width: int, height: int, seed: int) -> Image.Image:
    """Photo-ish content, cheap to make: smooth colour fields, edges and mild noise."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    f = rng.uniform(2, 9, 3).astype(np.float32)
    r = 128 + 100 * np.sin(f[0] * 6.28 * x + 3 * y)
    g = 128 + 100 * np.cos(f[1] * 6.28 * y - 2 * x)
    b = 255 * ((x * f[2] + y * 3) % 1.0)  # sawtooth: hard edges
    arr = np.stack(np.broadcast_arrays(r, g, b), axis=-1)
    arr += rng.integers(-8, 9, size=(height, width, 1), dtype=np.int8)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def build_set(count: int, seed: int, log: Callable[[str], None]) -> list[Sample]:
    """`count` images: count/2 sizes log-spaced 0.3..12 MP (varied aspect ratios), each
    as a q90 JPEG and as a PNG, so the per-format numbers cover the same pixels."""
    sizes = np.geomspace(0.3, 12.0, max(1, (count + 1) // 2))
    aspects = (4 / 3, 3 / 2, 16 / 9, 1.0, 3 / 4)
    samples: list[Sample] = []
    for i, mp in enumerate(sizes):
        aspect = aspects[i % len(aspects)]
        w = round((mp * 1e6 * aspect) ** 0.5)
        h = round(mp * 1e6 / w)
        img = synth(w, h, seed + i)
        for fmt in ("JPEG", "PNG")[: count - len(samples)]:
            buf = io.BytesIO()
            img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            samples.append(Sample(fmt, w, h, buf.getvalue()))
            log(f"  made {len(samples)}/{count}: {fmt:4} {w}x{h} ({mp:.1f} MP, "
                f"{len(buf.getvalue()) >> 10} KiB)")
    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--count", type=int, default=12, help="images in the set (default 12)")
    ap.add_argument("--repeat", type=int, default=3, help="passes over the set per mode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pin-cpu", type=int, default=None, help="pin the process to this core")
    ap.add_argument("--model", type=Path, default=MODEL_DIR, help="model dir (processor config)")
    ap.add_argument("--detail", choices=["high", "low"], default="high")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local model dir only; never the network
    if args.pin_cpu is not None:
        os.sched_setaffinity(0, {args.pin_cpu})

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    import torch
    from transformers import AutoImageProcessor

    from handlers.imaging import configure_threads, load_geometry, pixel_bounds, prepare_image

    configure_threads(1)
    geometry = load_geometry(args.model)
    min_px, max_px = pixel_bounds(geometry, args.detail, "high", 200704)
    processor = AutoImageProcessor.from_pretrained(
        str(args.model), min_pixels=min_px, max_pixels=max_px
    )
    log(f"torch threads {torch.get_num_threads()}, processor {type(processor).__name__}, "
        f"detail {args.detail} (pixels {min_px}..{max_px})")

    log(f"building {args.count} images ...")
    samples = build_set(args.count, args.seed, log)

    def ours(fidelity: str) -> Callable[[Sample], object]:
        return lambda s: prepare_image(s.data, geometry, min_pixels=min_px, max_pixels=max_px,
                                       fidelity=fidelity)  # type: ignore[arg-type]

    def hf(s: Sample) -> object:
        img = ImageOps.exif_transpose(Image.open(io.BytesIO(s.data)))
        return processor(images=[img.convert("RGB")], return_tensors="pt")["pixel_values"]

    prepared = {id(s): Image.fromarray(ours("exact")(s).array) for s in samples}  # type: ignore[attr-defined]

    def hf_on_prepared(s: Sample) -> object:
        return processor(images=[prepared[id(s)]], return_tensors="pt")["pixel_values"]

    modes: dict[str, Callable[[Sample], object]] = {
        "exact": ours("exact"), "fast": ours("fast"), "hf": hf, "hf-on-prepared": hf_on_prepared,
    }
    times: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for name, fn in modes.items():
        fn(samples[0])  # warm up (imports, allocator)
        log(f"{name}:")
        for r in range(args.repeat):
            for i, s in enumerate(samples):
                t0 = time.perf_counter()
                fn(s)
                dt = time.perf_counter() - t0
                times[name][s.fmt].append(dt)
                log(f"  [{r + 1}/{args.repeat}] {i + 1:2}/{len(samples)} {s.fmt:4} "
                    f"{s.width}x{s.height}: {dt * 1e3:7.1f} ms")

    total_mp = sum(s.megapixels for s in samples)
    print(f"\n{len(samples)} images ({total_mp:.1f} MP total, 0.3-12 MP, JPEG+PNG) "
          f"x {args.repeat}, one thread, torch threads 1, detail={args.detail}")
    print(f"{'mode':16} {'images/s':>9} {'ms/image':>9} {'median':>8} {'JPEG ms':>8} "
          f"{'PNG ms':>8} {'vs hf':>6}")
    hf_total = sum(sum(v) for v in times["hf"].values())
    for name in modes:
        per_fmt = times[name]
        every = [t for v in per_fmt.values() for t in v]
        total = sum(every)
        fmt_ms = {f: 1e3 * sum(v) / len(v) for f, v in per_fmt.items()}
        print(f"{name:16} {len(every) / total:9.2f} {1e3 * total / len(every):9.1f} "
              f"{1e3 * statistics.median(every):8.1f} {fmt_ms.get('JPEG', float('nan')):8.1f} "
              f"{fmt_ms.get('PNG', float('nan')):8.1f} {hf_total / total:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
