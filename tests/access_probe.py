"""Run as root: import walsvc, become another account, then try each action and print what the kernel allowed.

    python tests/access_probe.py UID GID SUPPLEMENTARY_GIDS(comma-separated) ACTIONS_JSON

Imports happen before the switch, so the probe works wherever the checkout and venv live; every file open and
socket connect after it is checked against the new account.  Prints one JSON list: for each action "ok",
"ok:<detail>" or the errno name (EACCES) or exception class of the failure.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zmq  # noqa: E402,F401

from walsvc import Log, Producer, Reader  # noqa: E402


def _act(action: list) -> str:
    op, path = action[0], action[1]
    if op == "read":
        with open(path, "rb") as f:
            f.read(1)
        return "ok"
    if op == "write":
        os.close(os.open(path, os.O_WRONLY))
        return "ok"
    if op == "list":
        return f"ok:{len(os.listdir(path))}"
    if op == "connect":
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
        return "ok"
    if op == "replace":  # write a file beside `path` and rename it over `path`, as a cursor commit does
        tmp = Path(path).parent / f".probe.{os.getpid()}.tmp"
        tmp.write_bytes(b"x" * 12)
        os.rename(tmp, path)
        return "ok"
    if op == "tail":  # ["tail", dir, expected count, reader name]: read everything, then commit a cursor
        got = []
        deadline = time.monotonic() + 20
        with Reader(path, "earliest", name=action[3]) as reader:
            while len(got) < action[2] and time.monotonic() < deadline:
                got += reader.poll(1.0)
            if got:
                reader.commit(got[-1].lsn)
        return "ok:" + ",".join(f"{r.lsn}={r.value.decode()}" for r in got)
    if op == "produce":  # ["produce", dir, value]
        with Producer(path) as producer:
            return f"ok:{producer.put(b'probe', action[2].encode()).result(20)}"
    if op == "open-log":  # ["open-log", dir, group]: become a writer of a group-shared log
        Log.open(path, group=action[2]).close()
        return "ok"
    raise ValueError(f"unknown action {op!r}")


def main() -> int:
    uid, gid = int(sys.argv[1]), int(sys.argv[2])
    groups = [int(g) for g in sys.argv[3].split(",") if g]
    actions = json.loads(sys.argv[4])
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)
    assert os.geteuid() == uid and os.getegid() == gid, "the switch of account did not happen"
    out = []
    for action in actions:
        try:
            out.append(_act(action))
        except OSError as exc:
            out.append(errno.errorcode.get(exc.errno, type(exc).__name__) if exc.errno else type(exc).__name__)
        except Exception as exc:  # reported, so the test shows what a walsvc client saw
            out.append(f"{type(exc).__name__}: {exc}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
