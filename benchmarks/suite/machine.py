"""What the benchmarks ran on, recorded beside every result: figures mean little without the machine.

Everything is read from /proc, the standard library, or `--version` output, and a fact that cannot be found
is reported as "unknown" rather than failing the run.
"""

from __future__ import annotations

import datetime
import os
import platform
import sqlite3
import subprocess
from importlib import metadata


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def filesystem(path: str) -> dict[str, str]:
    """Filesystem type, device and mount options of `path`: the longest mount point containing it."""
    target = os.path.realpath(path)
    best = {"type": "unknown", "device": "unknown", "mount": "unknown", "options": ""}
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return best
    best_len = -1
    for device, mount, fstype, options, *_ in mounts:
        mount = mount.replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= best_len:  # later mounts over the same point win
            best_len = len(mount)
            best = {"type": fstype, "device": device, "mount": mount, "options": options}
    return best


def _command_output(*argv: str) -> str | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _redis_server_version() -> str:
    out = _command_output("redis-server", "--version")
    if not out:
        return "not installed"
    return next((w[2:] for w in out.split() if w.startswith("v=")), out)


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _libzmq_version() -> str:
    try:
        import zmq
    except ImportError:
        return "not installed"
    return zmq.zmq_version()


def load_average() -> str:
    """1/5/15-minute load: on a shared machine, the first thing to check when figures look off."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def describe(out_dir: str) -> dict[str, object]:
    """Machine, software and filesystem facts for the report header and JSON (taken when the suite starts)."""
    fs = filesystem(out_dir)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "load_average": load_average(),
        "kernel": platform.release(),
        "filesystem": fs["type"],
        "filesystem_device": fs["device"],
        "filesystem_mount": fs["mount"],
        "filesystem_options": fs["options"],
        "python": platform.python_version(),
        "pyzmq": _package_version("pyzmq"),
        "libzmq": _libzmq_version(),
        "redis_server": _redis_server_version(),
        "redis_py": _package_version("redis"),
        "sqlite": sqlite3.sqlite_version,
        "git_commit": _command_output("git", "describe", "--always", "--dirty") or "unknown",
    }
