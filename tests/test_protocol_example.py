"""docs/PROTOCOL.md's minimal plain-pyzmq client, run as written against a real writer: a third-party
producer built from the document alone must get its first ack without waiting for a resend timeout."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from helpers import REPO_ROOT, python_env, verify_log


def doc_example() -> str:
    text = (REPO_ROOT / "docs" / "PROTOCOL.md").read_text()
    section = text.split("## A minimal client with plain pyzmq", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_documented_client_gets_its_ack_at_once(tmp_path: Path, writers) -> None:
    writers(tmp_path / "wal-data").start()
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", doc_example()], cwd=tmp_path, env=python_env(),
                          capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "1", "1", "2"]
    assert took < 4.0, f"{took:.1f} s: the ack waited for the 5 s resend"
    assert [(r.lsn, r.key, r.value) for r in verify_log(tmp_path / "wal-data")] == [(1, b"k", b"v"), (2, b"k2", b"v2")]
