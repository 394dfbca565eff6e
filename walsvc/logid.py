"""The log's identity: a UUID in `DIR/log-id`, given at creation, so that (log id, LSN) names one record
world-wide (the mirror's message ids are `<log-id>:<lsn>`).

The file is one line, the UUID in its canonical 36-character form.  It is written once, with
write-to-temp, fsync, rename, fsync-directory, by the first writer that opens the log (old logs get one
then) or by `walsvc restore`, which gives a rebuilt log the identity of the log it restores.  Readers never
create it.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from .access import replace_file
from .errors import LogIdError

FILENAME = "log-id"


def load(directory: Path) -> str | None:
    """The log id, or None if the log has none yet (never opened by a writer of this version)."""
    try:
        text = (directory / FILENAME).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise LogIdError(f"{directory / FILENAME} is unreadable ({exc})") from None
    return check(text, directory / FILENAME)


def check(text: str, where: object) -> str:
    """`text` if it is a canonical UUID, else LogIdError naming `where`."""
    try:
        if str(uuid.UUID(text)) == text:
            return text
    except ValueError:
        pass
    raise LogIdError(f"{where}: {text[:60]!r} is not a log id (a UUID such as {uuid.UUID(int=0)})")


def store(directory: Path, log_id: str) -> None:
    """Record `log_id` durably (restore uses this before the first open of a rebuilt log)."""
    check(log_id, "log id")
    replace_file(directory / FILENAME, (log_id + "\n").encode("ascii"))


def ensure(directory: Path) -> str:
    """The log id, creating a new random one if the log has none (called by the writer, lock held)."""
    existing = load(directory)
    if existing is not None:
        return existing
    new = str(uuid.uuid4())
    store(directory, new)
    return new
