"""Progress on a terminal, silence in a pipe: `walsvc verify` and a long `walsvc dump` into a file."""

from __future__ import annotations

from pathlib import Path

from helpers import run_cli, run_with_terminal_stderr

import walsvc


def test_progress_shows_on_a_terminal_and_never_in_a_pipe(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    with walsvc.Log.open(d, fsync="os", segment_bytes=1 << 20) as log:
        for i in range(40):
            log.append_batch([walsvc.Record.put(b"k%d-%d" % (i, j), b"v" * 1000) for j in range(100)])
    rc, _, shown = run_with_terminal_stderr("verify", "--dir", str(d))
    assert rc == 0 and "verify " in shown and "50%" in shown, shown  # 4 segments: a step each
    rc, _, shown = run_with_terminal_stderr("dump", "--dir", str(d))
    assert rc == 0 and "dump " in shown, shown
    piped = run_cli("verify", "--dir", str(d))
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr
    piped = run_cli("dump", "--dir", str(d), "--limit", "5")
    assert piped.returncode == 0 and piped.stderr == "" and len(piped.stdout.splitlines()) == 5
