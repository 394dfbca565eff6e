"""Where a log's writer listens, and how clients find it from the log directory alone.

By default the writer binds ipc:// sockets in `DIR/sockets/` (mode 0700: only the owner may connect).  An
AF_UNIX path is limited to about 107 bytes, and FUSE or network file systems cannot hold sockets at all
("Function not implemented"); then the sockets go to a private runtime directory (mode 0700) named after
the log's real path.  Either way the writer records the endpoints in `DIR/ENDPOINTS` (JSON, replaced
atomically), which every producer and reader reads first.

Connecting to an ipc socket needs write permission on its file and search permission on its directory.  The
directory stays 0700 while the writer binds; then `share_sockets` makes the socket files 0600, or with
`[log] group` opens publish and control (and ingest only with `[service] produce_group`) to that group, 0660,
and only then the directory, 2750.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import zmq

from .access import group_id, open_file
from .config import ServiceConfig
from .errors import ServiceUnavailableError
from .fsync import sync_dir
from .lock import WriterProbe

FILENAME = "ENDPOINTS"
SOCKET_SUBDIR = "sockets"
MAX_IPC_PATH = 100  # sun_path is 108 bytes on Linux (104 on macOS); keep a margin
LIMITS = ("max_record_bytes", "max_batch_bytes", "max_message_bytes")


@dataclass(frozen=True)
class Endpoints:
    ingest: str
    publish: str
    control: str
    pid: int = 0
    curve_server_key: str = ""  # Z85 public key when the writer requires CURVE (non-loopback binds)
    codecs: tuple[str, ...] = ()  # compressions the writer decodes; () from a writer too old to say
    # The writer's limits ([log] max_record_bytes, max_batch_bytes, [service] max_message_bytes), so that a
    # client refuses what the writer would refuse before sending it; 0 from a writer too old to say.
    max_record_bytes: int = 0
    max_batch_bytes: int = 0
    max_message_bytes: int = 0

    def secure(self, sock: "zmq.Socket") -> "zmq.Socket":
        """Make a client socket speak CURVE to this writer (with a fresh key pair) when it requires it."""
        if self.curve_server_key:
            public, secret = zmq.curve_keypair()
            sock.curve_serverkey = self.curve_server_key.encode()
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        return sock

    def writer_running(self, directory: Path) -> bool:
        """Whether the process that recorded these endpoints still runs as `directory`'s writer: after a kill -9
        another process may have its PID (`lock.WriterProbe`)."""
        return WriterProbe(directory).running(self.pid)

    def save(self, directory: Path) -> None:
        tmp = directory / f".{FILENAME}.tmp"
        tmp.unlink(missing_ok=True)
        with os.fdopen(open_file(tmp, os.O_WRONLY | os.O_EXCL), "w") as f:
            f.write(json.dumps(asdict(self), indent=1) + "\n")
        os.replace(tmp, directory / FILENAME)
        sync_dir(directory)


def load(directory: str | os.PathLike) -> Endpoints:
    """The endpoints the log's writer recorded; ServiceUnavailableError if no writer ever ran there."""
    path = Path(directory) / FILENAME
    try:
        data = json.loads(path.read_text())
        return Endpoints(data["ingest"], data["publish"], data["control"], int(data.get("pid", 0)),
                         str(data.get("curve_server_key", "")), tuple(map(str, data.get("codecs", ()))),
                         *(int(data.get(key, 0)) for key in LIMITS))
    except FileNotFoundError:
        raise ServiceUnavailableError(f"no writer has run for {directory} ({path} is missing); start one with "
                                      f"`walsvc serve --dir {directory}`") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ServiceUnavailableError(f"{path} is unreadable: {exc}") from None


def runtime_dir(directory: Path, shared: bool = False) -> Path:
    """A directory for this log's sockets outside the log directory (under /tmp when a group shares them:
    XDG_RUNTIME_DIR is private to its user)."""
    base = (not shared and os.environ.get("XDG_RUNTIME_DIR")) or tempfile.gettempdir()
    digest = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]
    return Path(base) / _runtime_parent() / digest


def _runtime_parent() -> str:
    return f"walsvc-{os.getuid()}"


def private_dir(path: Path) -> Path:
    """Create (or reuse) a socket directory and close it (0700) for binding.

    Refuses one that another account owns, or whose parent another account could replace it in.
    """
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o711)  # traversable (a group may reach a shared socket directory), not listable
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st, parent = os.lstat(path), os.stat(path.parent)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise OSError(f"{path} is not a directory owned by uid {os.geteuid()}")
    if parent.st_uid not in (0, os.geteuid()) or (parent.st_mode & 0o022 and not parent.st_mode & stat.S_ISVTX):
        raise OSError(f"{path.parent} is writable by other accounts (mode {parent.st_mode & 0o7777:04o}, "
                      f"uid {parent.st_uid})")
    os.chmod(path, 0o700)
    return path


def share_sockets(eps: Endpoints, group: str, produce_group: bool) -> None:
    """After binding ipc sockets in a `private_dir`: open them (and then their directory) as the config says."""
    gid = group_id(group) if group else -1
    for endpoint, shared in ((eps.ingest, produce_group), (eps.publish, True), (eps.control, True)):
        path = endpoint[len("ipc://"):]
        os.chown(path, -1, gid)
        os.chmod(path, 0o660 if gid >= 0 and shared else 0o600)
    if gid >= 0:
        socket_dir = Path(eps.control[len("ipc://"):]).parent
        os.chown(socket_dir, -1, gid)
        os.chmod(socket_dir, 0o2750)
        if socket_dir.parent.name == _runtime_parent():  # ours; an older or private run may have left it 0700
            os.chmod(socket_dir.parent, 0o711)


def ipc_candidates(directory: Path, cfg: ServiceConfig, shared: bool = False) -> list[Path]:
    """Socket directories to try, best first (`shared`: a group will use them)."""
    if cfg.socket_dir:
        return [Path(cfg.socket_dir)]
    inside = directory.resolve() / SOCKET_SUBDIR
    fallback = runtime_dir(directory, shared)
    if len(str(inside / "control.sock")) + len("ipc://") > MAX_IPC_PATH + len("ipc://"):
        return [fallback]
    return [inside, fallback]


def ipc_endpoints(socket_dir: Path) -> Endpoints:
    return Endpoints(f"ipc://{socket_dir}/ingest.sock", f"ipc://{socket_dir}/publish.sock",
                     f"ipc://{socket_dir}/control.sock")
