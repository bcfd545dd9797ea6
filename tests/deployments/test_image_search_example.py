"""examples/image_search.py, as the README runs it: index an S3 bucket's images through
Iris (which fetches them by their s3:// URLs) and rank them for a text query."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid

import openai

from tests.images import encode, natural
from tests.servers import S3Server
from tests.support import API_KEY, ENCODER, ROOT, IrisApp


def test_indexes_a_bucket_and_answers_a_query(iris_apps: dict[str, IrisApp],
                                              s3: S3Server) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import image_search
    finally:
        sys.path.remove(str(ROOT / "examples"))
    bucket = f"search-{uuid.uuid4().hex[:12]}"
    for i in range(5):
        s3.put(bucket, f"photos/p{i}.jpg", encode(natural(200, 150, seed=700 + i), "JPEG"))
    s3.put(bucket, "photos/notes.txt", b"not an image")
    urls = image_search.list_images(s3.client(), bucket, "photos/")
    assert len(urls) == 5 and all(u.startswith(f"s3://{bucket}/") for u in urls)
    client = openai.OpenAI(base_url=iris_apps["local"].base, api_key=API_KEY, max_retries=0)
    vectors = image_search.index(client, ENCODER, urls)
    found = image_search.search(client, ENCODER, urls, vectors, "a red bicycle", top=3)
    assert len(found) == 3 and [s for _, s in found] == sorted((s for _, s in found),
                                                                reverse=True)
    assert found == image_search.search(client, ENCODER, urls, vectors, "a red bicycle", 3)
    # The command itself, as the README has it.
    env = {**os.environ, **s3.env, "IRIS_API_KEY": API_KEY}
    out = subprocess.run([sys.executable, "examples/image_search.py", "--bucket", bucket,
                          "--prefix", "photos/", "--query", "a red bicycle", "--top", "2",
                          "--base-url", iris_apps["local"].base], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    hits = re.findall(rf"^-?\d+\.\d+\s+s3://{bucket}/photos/p\d\.jpg$", out.stdout, re.M)
    assert len(hits) == 2, out.stdout
