"""Where a log's writer listens, and how clients find it from the log directory alone.

By default the writer binds ipc:// sockets in `DIR/sockets/` (mode 0700: only the owner may connect).  An
AF_UNIX path is limited to about 107 bytes, and FUSE or network file systems cannot hold sockets at all
("Function not implemented"); then the sockets go to a private runtime directory (mode 0700) named after
the log's real path.  Either way the writer records the endpoints in `DIR/ENDPOINTS` (JSON, replaced
atomically), which every producer and reader reads first.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import zmq

from .config import ServiceConfig
from .errors import ServiceUnavailableError
from .fsync import sync_dir

FILENAME = "ENDPOINTS"
SOCKET_SUBDIR = "sockets"
MAX_IPC_PATH = 100  # sun_path is 108 bytes on Linux (104 on macOS); keep a margin


@dataclass(frozen=True)
class Endpoints:
    ingest: str
    publish: str
    control: str
    pid: int = 0
    curve_server_key: str = ""  # Z85 public key when the writer requires CURVE (non-loopback binds)

    def secure(self, sock: "zmq.Socket") -> "zmq.Socket":
        """Make a client socket speak CURVE to this writer (with a fresh key pair) when it requires it."""
        if self.curve_server_key:
            public, secret = zmq.curve_keypair()
            sock.curve_serverkey = self.curve_server_key.encode()
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        return sock

    def save(self, directory: Path) -> None:
        tmp = directory / f".{FILENAME}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.replace(tmp, directory / FILENAME)
        sync_dir(directory)


def load(directory: str | os.PathLike) -> Endpoints:
    """The endpoints the log's writer recorded; ServiceUnavailableError if no writer ever ran there."""
    path = Path(directory) / FILENAME
    try:
        data = json.loads(path.read_text())
        return Endpoints(data["ingest"], data["publish"], data["control"], int(data.get("pid", 0)),
                         str(data.get("curve_server_key", "")))
    except FileNotFoundError:
        raise ServiceUnavailableError(f"no writer has run for {directory} ({path} is missing); start one with "
                                      f"`walsvc serve --dir {directory}`") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ServiceUnavailableError(f"{path} is unreadable: {exc}") from None


def runtime_dir(directory: Path) -> Path:
    """A private directory for this log's sockets outside the log directory."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    digest = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]
    return Path(base) / f"walsvc-{os.getuid()}" / digest


def private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def ipc_candidates(directory: Path, cfg: ServiceConfig) -> list[Path]:
    """Socket directories to try, best first."""
    if cfg.socket_dir:
        return [Path(cfg.socket_dir)]
    inside = directory.resolve() / SOCKET_SUBDIR
    fallback = runtime_dir(directory)
    if len(str(inside / "control.sock")) + len("ipc://") > MAX_IPC_PATH + len("ipc://"):
        return [fallback]
    return [inside, fallback]


def ipc_endpoints(socket_dir: Path) -> Endpoints:
    return Endpoints(f"ipc://{socket_dir}/ingest.sock", f"ipc://{socket_dir}/publish.sock",
                     f"ipc://{socket_dir}/control.sock")
