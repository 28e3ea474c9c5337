"""Files that hold secrets (keys, dotenv files with credentials): readable by the owner only from the moment they
exist. Writing a file and then ``chmod``-ing it leaves a moment when another user can open it, and an open
descriptor outlives the ``chmod``; so the file is created 0600 (the umask can only narrow that), written in full
under a temporary name, and renamed over the old one, which also replaces a file an earlier version left readable."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, as a new file readable and writable by the owner only."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # O_EXCL below: never write through a file (or link) someone else put there
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
