"""The README's first example works as written, against the running app."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.support import API_KEYS, ROOT


def first_python_block() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_the_first_example_runs_as_written(iris: str) -> None:
    block = first_python_block()
    # The only changes: this app's address and key (the README's server needs none).
    code = block.replace('base_url="http://127.0.0.1:8000/v1", api_key="unused"',
                         f'base_url="{iris}", api_key="{API_KEYS[0]}"')
    assert code != block
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout  # the answer was printed (the random model may say nothing readable)
