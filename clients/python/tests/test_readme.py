"""The README's Python example, run as written (the block after its marker), against ``comfyrelay dev``."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO, png

MARKER = "<!-- clients/python/tests/test_readme.py runs this block -->"


def readme_block() -> str:
    text = (REPO / "README.md").read_text()
    rest = text[text.index(MARKER) + len(MARKER):]
    body = rest[rest.index("```python") :]
    body = body[body.index("\n") + 1 :]
    return body[: body.index("```")]


def test_the_readme_example_runs(dev, tmp_path):
    code = readme_block().replace("127.0.0.1:50051", dev.target)
    (tmp_path / "photo.png").write_bytes(png(20, 20))
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "saved out/" in done.stdout, done.stdout
    assert "INVALID_ARGUMENT" in done.stdout, done.stdout
    assert (tmp_path / "out").is_dir()
