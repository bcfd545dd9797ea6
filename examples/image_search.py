"""Image search with Iris: embed every image of an S3 bucket (Iris fetches them itself, by
their s3:// URLs), then rank them against a text query by cosine similarity.

    python examples/image_search.py --bucket my-images [--prefix photos/] \\
        --query "a red bicycle" [--top 5] [--base-url http://127.0.0.1:8000/v1]

The bucket is listed with boto3's standard credential chain (AWS_PROFILE, AWS_ENDPOINT_URL,
...); the server needs read access to it too, and the bucket in fetch.s3_allowed_buckets.
With the random demo encoder the ranking is meaningless; with a real CLIP it is image search.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np
from openai import OpenAI

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif")


def list_images(s3: Any, bucket: str, prefix: str = "") -> list[str]:
    """s3:// URLs of the bucket's images under `prefix`."""
    urls = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        urls += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", [])
                 if o["Key"].lower().endswith(IMAGE_SUFFIXES)]
    return urls


def embed(client: OpenAI, model: str, items: list[Any], batch: int = 32) -> np.ndarray:
    """One normalised vector per item (a text, or an image part), in order."""
    vectors = []
    for start in range(0, len(items), batch):
        resp = client.embeddings.create(model=model, input=items[start:start + batch],
                                        encoding_format="float")
        vectors += [d.embedding for d in sorted(resp.data, key=lambda d: d.index)]
    out = np.asarray(vectors, dtype=np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def index(client: OpenAI, model: str, urls: list[str]) -> np.ndarray:
    return embed(client, model, [{"type": "image_url", "image_url": {"url": u}} for u in urls])


def search(client: OpenAI, model: str, urls: list[str], vectors: np.ndarray, query: str,
           top: int = 5) -> list[tuple[str, float]]:
    """The `top` images closest to the text query, best first, with their cosine scores."""
    q = embed(client, model, [query])[0]
    scores = vectors @ q
    best = np.argsort(-scores)[:top]
    return [(urls[i], float(scores[i])) for i in best]


def main() -> None:
    import boto3

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", default="")
    parser.add_argument("--query", required=True)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="demo-clip")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=os.environ.get("IRIS_API_KEY", "unused"))
    urls = list_images(boto3.client("s3"), args.bucket, args.prefix)
    print(f"indexing {len(urls)} images of s3://{args.bucket}/{args.prefix}")
    vectors = index(client, args.model, urls)
    for url, score in search(client, args.model, urls, vectors, args.query, args.top):
        print(f"{score:+.3f}  {url}")


if __name__ == "__main__":
    main()
