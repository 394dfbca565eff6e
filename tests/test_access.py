"""Who may read, produce and consume: file and socket modes checked by the kernel against real other accounts.

The account switches need root (CI runs as root): `nobody` is the outsider, and `nobody` with a temporary group
as its group is the member.  Each probe is a real process (tests/access_probe.py) that imports walsvc, drops
to the account, and reports what the kernel allowed.  The writer runs under umask 0, so every mode seen here
is one walsvc chose, not one the umask narrowed.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import flip_bit, frame_offsets, segment_paths
from helpers import REPO_ROOT, WriterProcess, python_env, run_cli, status
from walsvc import Log, Producer, Reader, Record, cursor
from walsvc import access
from walsvc import frame as F
from walsvc.config import LogConfig, load
from walsvc.errors import ConfigError, UnsafePermissionsError

PROBE = Path(__file__).resolve().parent / "access_probe.py"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another account needs root (CI runs as root)")


@pytest.fixture(scope="module")
def nobody() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("switching to another account needs root (CI runs as root)")
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("this host has no `nobody` account to run the other-account probes as")


@pytest.fixture(scope="module")
def group() -> tuple[str, int]:
    """A fresh group for the shared log, removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("creating a group needs root (CI runs as root)")
    groupadd, groupdel = shutil.which("groupadd"), shutil.which("groupdel")
    if not (groupadd and groupdel):
        pytest.skip("groupadd/groupdel not installed (package passwd)")
    name = f"walsvct{os.getpid() % 100000}"
    subprocess.run([groupadd, name], check=True, capture_output=True)
    try:
        import grp
        yield name, grp.getgrnam(name).gr_gid
    finally:
        subprocess.run([groupdel, name], capture_output=True)


@pytest.fixture
def base() -> Path:
    """A directory other accounts can traverse but not list (pytest's tmp dirs sit under a 0700 parent)."""
    path = Path(tempfile.mkdtemp(prefix="walsvc-access-", dir="/tmp"))
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def probe(user: pwd.struct_passwd, gid: int, actions: list[list]) -> list[str]:
    """Run `actions` as `user` with primary (and only) group `gid`; one result per action."""
    proc = subprocess.run([sys.executable, str(PROBE), str(user.pw_uid), str(gid), str(gid), json.dumps(actions)],
                          capture_output=True, text=True, timeout=90, cwd=REPO_ROOT, env=python_env())
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def start_writer(directory: Path, config: Path | None = None) -> WriterProcess:
    """The writer under umask 0: whatever it creates has the mode walsvc chose."""
    old = os.umask(0)
    try:
        return WriterProcess(directory, config=config).start()
    finally:
        os.umask(old)


def group_config(base: Path, group: str, produce: bool = False) -> Path:
    path = base / "group.toml"
    path.write_text(f'[log]\ndir = "log"\ngroup = "{group}"\n[service]\nproduce_group = {str(produce).lower()}\n')
    return path


def modes(directory: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (permission bits incl. setgid/sticky, gid) of the directory and everything in it."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for p in [Path(root)] + [Path(root) / f for f in files]:
            st = os.lstat(p)
            out[str(p.relative_to(directory))] = (stat.S_IMODE(st.st_mode), st.st_gid)
    return out


def produce(directory: Path, values: list[str]) -> list[int]:
    with Producer(directory) as producer:
        return [producer.put(b"k", v.encode()).result(20) for v in values]


@needs_root
def test_default_log_is_private_to_its_owner(nobody, base):
    directory = base / "log"
    writer = start_writer(directory)
    try:
        assert produce(directory, ["a", "b", "c"]) == [1, 2, 3]
        with Reader(directory, "earliest", name="ops") as reader:
            assert len(reader.poll(10)) == 3
            reader.commit(3)
        seen = modes(directory)
        for rel, (mode, _) in seen.items():
            is_dir = (directory / rel).is_dir()
            assert mode == (0o700 if is_dir else 0o600), f"{rel} is {mode:04o}"
        assert {"ENDPOINTS", "HEAD", "LOCK", "cursors/ops.cursor", "sockets/ingest.sock",
                "sockets/control.sock"} <= set(seen)
        segment = next(directory.glob("*.wal"))
        got = probe(nobody, nobody.pw_gid, [
            ["read", str(segment)], ["read", str(directory / "cursors/ops.cursor")], ["read", str(directory / "HEAD")],
            ["read", str(directory / "ENDPOINTS")], ["list", str(directory)],
            ["connect", str(directory / "sockets/ingest.sock")], ["connect", str(directory / "sockets/control.sock")],
            ["connect", str(directory / "sockets/publish.sock")]])
        assert got == ["EACCES"] * 8
        assert writer.running()
    finally:
        writer.stop()


@needs_root
def test_group_member_reads_and_keeps_a_cursor_but_cannot_produce(nobody, group, base):
    name, gid = group
    directory = base / "log"
    writer = start_writer(directory, group_config(base, name))
    try:
        assert produce(directory, ["a", "b", "c"]) == [1, 2, 3]
        cursor.store(directory, "ops", 2)  # the owner's own reader
        seen = modes(directory)
        assert seen["."] == (0o2750, gid) and seen["cursors"] == (0o3770, gid) and seen["sockets"] == (0o2750, gid)
        assert seen["sockets/ingest.sock"][0] == 0o600
        assert seen["sockets/control.sock"] == seen["sockets/publish.sock"] == (0o660, gid)
        for rel in ("ENDPOINTS", "HEAD", "LOCK", next(directory.glob("*.wal")).name):
            assert seen[rel] == (0o640, gid), rel
        segment = str(next(directory.glob("*.wal")))
        member = probe(nobody, gid, [
            ["tail", str(directory), 3, "member"], ["write", segment],
            ["replace", str(directory / "cursors/ops.cursor")], ["write", str(directory / "cursors/ops.cursor")],
            ["connect", str(directory / "sockets/ingest.sock")], ["connect", str(directory / "sockets/control.sock")]])
        assert member == ["ok:1=a,2=b,3=c", "EACCES", "EPERM", "EACCES", "EACCES", "ok"]
        assert cursor.load(directory, "ops") == 2  # the sticky cursors/ kept the owner's cursor
        member_cursor = directory / "cursors/member.cursor"
        st = member_cursor.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (nobody.pw_uid, gid, 0o640)
        assert status(directory)["cursors"]["member"]["lsn"] == 3  # the writer reads the member's cursor
        outsider = probe(nobody, nobody.pw_gid, [
            ["read", segment], ["read", str(member_cursor)], ["list", str(directory)],
            ["connect", str(directory / "sockets/ingest.sock")], ["connect", str(directory / "sockets/control.sock")]])
        assert outsider == ["EACCES"] * 5
    finally:
        writer.stop()


@needs_root
def test_produce_group_lets_members_produce(nobody, group, base):
    name, gid = group
    directory = base / "log"
    writer = start_writer(directory, group_config(base, name, produce=True))
    try:
        assert modes(directory)["sockets/ingest.sock"] == (0o660, gid)
        assert probe(nobody, gid, [["produce", str(directory), "from-member"]]) == ["ok:1"]
        outsider = probe(nobody, nobody.pw_gid, [["connect", str(directory / "sockets/ingest.sock")],
                                                  ["open-log", str(base / "other"), name]])
        assert outsider[0] == "EACCES"
        assert outsider[1].startswith(f"ConfigError: log.group: the writer's account (uid {nobody.pw_uid}) is not a "
                                      f"member of group '{name}'"), outsider[1]
        with Reader(directory, "earliest") as reader:
            assert [r.value for r in reader.poll(10)] == [b"from-member"]
    finally:
        writer.stop()


@needs_root
def test_group_reaches_sockets_in_the_runtime_directory(nobody, group, base):
    name, gid = group
    directory = base / ("d" * 60) / ("e" * 60) / "log"  # too long for AF_UNIX inside the log directory
    directory.parent.mkdir(parents=True)
    for p in (directory.parent, directory.parent.parent):
        p.chmod(0o711)
    config = base / "long.toml"
    config.write_text(f'[log]\ndir = "{directory}"\ngroup = "{name}"\n')
    writer = start_writer(directory, config)
    try:
        eps = json.loads((directory / "ENDPOINTS").read_text())
        control_path = Path(eps["control"][len("ipc://"):])
        assert not str(control_path).startswith(str(directory))
        assert modes(control_path.parent)["."] == (0o2750, gid)
        assert probe(nobody, gid, [["connect", str(control_path)], ["connect", eps["ingest"][len("ipc://"):]]]) \
            == ["ok", "EACCES"]
        assert probe(nobody, nobody.pw_gid, [["connect", str(control_path)]]) == ["EACCES"]
    finally:
        writer.stop()
        shutil.rmtree(json.loads((directory / "ENDPOINTS").read_text())["control"][len("ipc://"):].rsplit("/", 1)[0],
                      ignore_errors=True)


def _existing_log(directory: Path) -> None:
    with Log.open(directory, segment_bytes=1 << 20) as log:
        log.append(Record.put(b"k", b"v"))


def _refused(directory: Path, *args: str) -> str:
    before = modes(directory)
    proc = run_cli("serve", "--dir", str(directory), *args, timeout=30)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"walsvc: error: log directory {directory} is open"), lines
    assert modes(directory) == before, "a refused log must not be re-permissioned"
    return lines[0]


@needs_root
def test_writer_refuses_a_directory_open_to_others(tmp_path, group):
    name, gid = group
    directory = tmp_path / "log"
    _existing_log(directory)
    segment = next(directory.glob("*.wal"))

    directory.chmod(0o755)
    msg = _refused(directory)
    assert f"{directory} (rwxr-xr-x, group root: others can read)" in msg and f"`chmod 700 {directory}`" in msg

    directory.chmod(0o707)
    assert "others can write" in _refused(directory)

    directory.chmod(0o750)  # group access without the option
    assert "its group can read" in _refused(directory)

    directory.chmod(0o700)
    segment.chmod(0o644)
    (directory / "HEAD").chmod(0o660)
    msg = _refused(directory)
    assert f"{segment} (rw-r--r--, group root: others can read)" in msg
    assert f"{directory / 'HEAD'} (rw-rw----, group root: its group can write)" in msg
    fix = re.search(r"fix with `([^`]+)`", msg).group(1)
    assert fix == f"chmod -R go-rwx {directory}"
    subprocess.run(fix, shell=True, check=True)  # the command the error suggests is enough
    WriterProcess(directory).start().stop()

    # With [log] group: the group may read, but nothing may belong to (and be readable by) another group.
    config = tmp_path / "group.toml"
    config.write_text(f'[log]\ngroup = "{name}"\n')
    os.chown(directory, -1, gid)
    directory.chmod(0o2750)
    segment.chmod(0o640)
    msg = _refused(directory, "--config", str(config))
    assert f"{segment} (rw-r-----, group root: group root can read, not only {name})" in msg
    fix = re.search(r"fix with `([^`]+)`", msg).group(1)
    subprocess.run(fix, shell=True, check=True)
    WriterProcess(directory, config=config).start().stop()
    assert modes(directory)[segment.name] == (0o640, gid)


def test_new_and_empty_directories_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        empty = tmp_path / "empty"
        empty.mkdir(0o777)
        for directory in (tmp_path / "new" / "log", empty):
            with Log.open(directory, segment_bytes=1 << 20) as log:
                log.append(Record.put(b"k", b"v"))
            assert {m for m, _ in modes(directory).values()} == {0o700, 0o600}
    finally:
        os.umask(old)


def test_quarantine_and_cursors_are_private_whatever_the_umask(tmp_path):
    directory = tmp_path / "log"
    old = os.umask(0)
    try:
        with Log.open(directory, segment_bytes=1 << 20, fsync="os") as log:
            for i in range(20):
                log.append_batch([Record.put(b"k", b"v" * 100)] * 3)
        (path,) = segment_paths(directory)
        off, _ = frame_offsets(path)[7]
        flip_bit(path, off + F.FRAME_HEADER_SIZE + 40)
        with Log.open(directory, segment_bytes=1 << 20, fsync="os", on_corruption="truncate") as log:
            assert log.recovery.quarantined
        cursor.store(directory, "r", 1)
    finally:
        os.umask(old)
    seen = modes(directory)
    assert {"quarantine", f"quarantine/{path.name}.from-{off}", "cursors", "cursors/r.cursor"} <= set(seen)
    assert {m for m, _ in seen.values()} == {0o700, 0o600}


@needs_root
def test_a_log_owned_by_another_account_is_refused(tmp_path, nobody):
    directory = tmp_path / "log"
    _existing_log(directory)
    os.chown(directory, nobody.pw_uid, -1)
    with pytest.raises(UnsafePermissionsError,
                       match=rf"{directory} is owned by uid {nobody.pw_uid}.*run it as the owner"):
        Log.open(directory)


def test_new_files_are_never_created_through_a_symlink(tmp_path):
    target = tmp_path / "segment"
    target.write_bytes(b"data")
    link = tmp_path / ".r.1.tmp"
    link.symlink_to(target)
    with pytest.raises(OSError) as exc:
        access.open_file(link, os.O_WRONLY | os.O_TRUNC)
    assert exc.value.errno == errno.ELOOP and target.read_bytes() == b"data"


def test_a_nonempty_directory_is_refused_in_process_too(tmp_path):
    directory = tmp_path / "log"
    directory.mkdir()
    (directory / "stray").write_text("x")
    os.chmod(directory / "stray", 0o604)
    os.chmod(directory, 0o700)
    with pytest.raises(UnsafePermissionsError, match=r"stray \(rw----r--, group \w+: others can read\)"):
        Log.open(directory)
    assert stat.S_IMODE(os.stat(directory / "stray").st_mode) == 0o604


def test_config_holding_a_secret_key_must_be_private(tmp_path):
    import zmq
    public, secret = zmq.curve_keypair()
    path = tmp_path / "curve.toml"
    path.write_text(f'[service]\ncurve_public_key = "{public.decode()}"\ncurve_secret_key = "{secret.decode()}"\n')
    for mode in (0o644, 0o640, 0o604):
        path.chmod(mode)
        with pytest.raises(ConfigError, match=rf"service.curve_secret_key: .*mode is {mode:04o}.*`chmod 600 {path}`"):
            load(path)
    path.chmod(0o600)
    assert load(path).service.curve_secret_key == secret.decode()
    path.chmod(0o644)
    proc = run_cli("serve", "--config", str(path), timeout=30)
    assert proc.returncode == 2 and f"`chmod 600 {path}`" in proc.stderr, proc.stderr
    plain = tmp_path / "plain.toml"
    plain.write_text("[log]\nfsync = \"os\"\n")
    plain.chmod(0o644)  # no secret: anyone may read it
    assert load(plain).log.fsync == "os"


def test_group_options_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="log.group: no group named 'no-such-walsvc-group'"):
        LogConfig(group="no-such-walsvc-group")
    path = tmp_path / "c.toml"
    path.write_text("[service]\nproduce_group = true\n")
    with pytest.raises(ConfigError, match=r"service.produce_group: needs \[log\] group"):
        load(path)


def test_a_private_nonempty_directory_that_is_no_log_is_refused(tmp_path):
    """`walsvc serve --dir ~/project` (a typo, a 0700 directory of other files) made a log in it, among the
    user's files.  A new log needs a new or empty directory, as initdb does; an existing log opens as before."""
    directory = tmp_path / "project"
    directory.mkdir(mode=0o700)
    (directory / "notes.txt").write_text("mine")
    os.chmod(directory / "notes.txt", 0o600)
    with pytest.raises(ConfigError, match=r"project is not empty and holds no walsvc log \(it holds notes.txt\)"):
        Log.open(directory)
    assert sorted(os.listdir(directory)) == ["notes.txt"]
    Log.open(tmp_path / "wal").close()
    with Log.open(tmp_path / "wal") as log:  # an existing log is no stranger
        assert log.committed_lsn == 0
