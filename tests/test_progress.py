"""Progress on a terminal, silence in a pipe: `walsvc verify` and a long `walsvc dump` into a file."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import termios
from pathlib import Path

from helpers import REPO_ROOT, python_env, run_cli, walsvc_cmd

import walsvc


def _with_terminal_stderr(*args: str) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal (stdout to /dev/null); what the terminal showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a new pty is 0x0: tqdm hides
    proc = subprocess.Popen(walsvc_cmd(*args), stdout=subprocess.DEVNULL, stderr=slave, cwd=REPO_ROOT,
                            env=python_env())
    os.close(slave)
    shown = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    return proc.wait(60), shown.decode(errors="replace")


def test_progress_shows_on_a_terminal_and_never_in_a_pipe(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    with walsvc.Log.open(d, fsync="os", segment_bytes=1 << 20) as log:
        for i in range(40):
            log.append_batch([walsvc.Record.put(b"k%d-%d" % (i, j), b"v" * 1000) for j in range(100)])
    rc, shown = _with_terminal_stderr("verify", "--dir", str(d))
    assert rc == 0 and "verify " in shown and "50%" in shown, shown  # 4 segments: a step each
    rc, shown = _with_terminal_stderr("dump", "--dir", str(d))
    assert rc == 0 and "dump " in shown, shown
    piped = run_cli("verify", "--dir", str(d))
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr
    piped = run_cli("dump", "--dir", str(d), "--limit", "5")
    assert piped.returncode == 0 and piped.stderr == "" and len(piped.stdout.splitlines()) == 5
