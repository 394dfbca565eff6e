"""Who may touch a log: the modes of its directory and files, and the check the writer makes before opening it.

A log is private to the account that runs its writer: the directory is 0700 and every file in it 0600.
`[log] group = "NAME"` shares it with one group for reading: directories 2750 (setgid, so everything created
inside belongs to the group), files 0640; only `cursors/` is 3770 (group-writable so that readers running as
other members can keep named cursors; sticky, so that none can replace or delete another account's cursor).

A new file takes its mode from its directory (0640 if the directory is group-readable, else 0600) and is
created 0600 then fchmod'ed, so neither the umask nor a reader that never saw the config can open it wider.
The process umask is never changed: an embedding program shares it.

The writer refuses a log directory that others can write to, or that anyone outside the owner (and the
configured group) can read, naming each offending path; it never re-permissions an existing log.  Only an
empty directory (or a new one) is set up, as `initdb` does.
"""

from __future__ import annotations

import grp
import logging
import os
import stat
from pathlib import Path

from .errors import ConfigError, UnsafePermissionsError
from .fsync import sync_dir

PRIVATE_DIR = 0o700
GROUP_DIR = 0o2750
GROUP_CURSOR_DIR = 0o3770
PRIVATE_FILE = 0o600
GROUP_FILE = 0o640
CURSOR_DIRNAME = "cursors"  # cursor.DIRNAME; cursor.py imports this module
# Any name walsvc makes in a log directory (or a segment file) makes it a log, even one whose first start was
# cut short or whose segments are gone: lock, HEAD, log id (written first by restore), endpoints, stop record,
# sockets, cursors, quarantine, nori imports, mirror states, the spare segment.
LOG_MARKS = frozenset({"LOCK", "HEAD", "log-id", "ENDPOINTS", "STOPPED", "sockets", "cursors", "quarantine",
                       "nori-imports.json", "mirrors", "next-segment.tmp"})

logger = logging.getLogger("walsvc.access")


def group_id(name: str) -> int:
    """The gid of `name`; ConfigError if this host has no such group."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError("log.group", f"no group named {name!r} on this host (`getent group {name}`); "
                          "create it or leave log.group empty for a private log") from None


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _dir_modes(directory: Path) -> tuple[int, int]:
    """(mode, gid) for files created in `directory`: group-readable only if the directory is."""
    st = os.stat(directory)
    return (GROUP_FILE if st.st_mode & stat.S_IRGRP else PRIVATE_FILE), st.st_gid


def _own(fd_or_path: int | Path, mode: int, gid: int) -> None:
    """Set mode and (for a group-readable entry) group, whatever the umask and the setgid bit did."""
    if isinstance(fd_or_path, int):
        if mode & 0o070 and os.fstat(fd_or_path).st_gid != gid:
            os.fchown(fd_or_path, -1, gid)
        os.fchmod(fd_or_path, mode)
    else:
        if mode & 0o070 and os.lstat(fd_or_path).st_gid != gid:
            os.chown(fd_or_path, -1, gid)
        os.chmod(fd_or_path, mode)


def open_file(path: Path, flags: int) -> int:
    """Open `path`, creating it if it does not exist with the mode and group its directory calls for.

    Never through a symlink: in a group-writable cursors/ another member could plant one at a temp name.
    """
    flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    except FileExistsError:
        if flags & os.O_EXCL:
            raise
        return os.open(path, flags & ~os.O_CREAT)
    try:
        _own(fd, *_dir_modes(path.parent))
    except BaseException:
        os.close(fd)
        raise
    return fd


def replace_file(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably (temp file, fsync, rename, fsync the directory),
    with the mode its directory calls for: after any crash the file holds the old bytes or the new ones."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = open_file(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    sync_dir(path.parent)


def make_dir(path: Path) -> None:
    """Create a subdirectory of a log directory (no-op if it exists), shared like its parent."""
    try:
        os.mkdir(path, PRIVATE_DIR)
    except FileExistsError:
        return
    file_mode, gid = _dir_modes(path.parent)
    if file_mode == PRIVATE_FILE:
        os.chmod(path, PRIVATE_DIR)
    else:
        _own(path, GROUP_CURSOR_DIR if path.name == CURSOR_DIRNAME else GROUP_DIR, gid)


def prepare(directory: Path, group: str) -> None:
    """Create the log directory (or set up an empty one), or refuse an existing one that is open to others."""
    gid = group_id(group) if group else None
    if gid is not None and os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        raise ConfigError("log.group", f"the writer's account (uid {os.geteuid()}) is not a member of group "
                          f"{group!r}, so it cannot give the log to that group: add it (`usermod -aG {group} USER`)")
    directory.mkdir(parents=True, exist_ok=True)
    st = os.stat(directory)
    if st.st_uid != os.geteuid():
        raise UnsafePermissionsError(str(directory), [f"{directory} is owned by uid {st.st_uid}"],
                                     f"the writer runs as uid {os.geteuid()}: run it as the owner, or "
                                     f"`chown -R {os.geteuid()} {directory}`", what="belongs to another account")
    entries = os.listdir(directory)
    if not entries:
        if gid is None:
            os.chmod(directory, PRIVATE_DIR)
        else:
            _own(directory, GROUP_DIR, gid)
    else:
        problems = unsafe_paths(directory, gid)
        if problems:
            raise UnsafePermissionsError(str(directory), problems, _fix(directory, problems, group))
        if not any(name in LOG_MARKS or name.endswith(".wal") for name in entries):
            shown = ", ".join(sorted(entries)[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
            raise ConfigError("log.dir", f"{directory} is not empty and holds no walsvc log (it holds {shown}): "
                              "give a new or empty directory for a new log (as initdb does), or an existing log's")
        if gid is not None and not (st.st_gid == gid and st.st_mode & stat.S_IRGRP):
            logger.warning("log.group is %s but %s is not open to it (an existing log is never re-permissioned): "
                           "`chgrp -R %s %s && chmod -R g+rX %s && chmod g+s %s`", group, directory, group,
                           directory, directory, directory)
    if gid is not None:
        make_dir(directory / CURSOR_DIRNAME)  # readers of other accounts could not create it in a 2750 directory


def unsafe_paths(directory: Path, gid: int | None) -> list[str]:
    """Every entry under `directory` (itself included) that is open beyond the owner and group `gid`.

    Sockets are left out: the writer replaces them, with their modes, when it binds.
    """
    problems = []
    pending = [directory]
    while pending:
        path = pending.pop()
        try:
            st = os.lstat(path)
        except FileNotFoundError:  # a reader's temporary cursor file came and went
            continue
        if stat.S_ISSOCK(st.st_mode) or stat.S_ISLNK(st.st_mode):
            continue
        problem = _problem(st, gid, path.name == CURSOR_DIRNAME and path.parent == directory)
        if problem:
            problems.append(f"{path} ({stat.filemode(st.st_mode)[1:]}, group {_group_name(st.st_gid)}: {problem})")
        if stat.S_ISDIR(st.st_mode):
            try:
                pending.extend(sorted((path / name for name in os.listdir(path)), reverse=True))
            except FileNotFoundError:
                pass
    return problems


def _problem(st: os.stat_result, gid: int | None, cursors_dir: bool) -> str | None:
    mode = st.st_mode
    if mode & stat.S_IWOTH:
        return "others can write"
    if mode & (stat.S_IROTH | stat.S_IXOTH):
        return "others can read"
    if not mode & 0o070:
        return None
    if gid is None:
        return "its group can write" if mode & stat.S_IWGRP else "its group can read"
    if st.st_gid != gid:
        return f"group {_group_name(st.st_gid)} can read, not only {_group_name(gid)}"
    if mode & stat.S_IWGRP and not cursors_dir:
        return "its group can write"
    return None


def _fix(directory: Path, problems: list[str], group: str) -> str:
    if not group:
        if len(problems) == 1 and problems[0].startswith(f"{directory} ("):
            return f"fix with `chmod 700 {directory}`, or set [log] group to share it with one group"
        return f"fix with `chmod -R go-rwx {directory}`, or set [log] group to share it with one group"
    fix = f"chgrp -R {group} {directory} && chmod -R o-rwx,g-w {directory}"
    if (directory / CURSOR_DIRNAME).is_dir():
        fix += f" && chmod 3770 {directory / CURSOR_DIRNAME}"  # group readers keep their cursors there
    return f"fix with `{fix}`"
