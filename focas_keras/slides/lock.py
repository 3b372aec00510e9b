"""One ``slide`` run per output directory: a lock file that a crashed run does not leave stuck.

The lock is ``OUT/.focas-keras.lock``, a JSON object ``{"pid", "host", "started"}`` of the run
holding it. It is written whole under a temporary name and hard-linked into place (``link``
fails when the name exists, like ``O_EXCL``), so no run ever sees a half-written lock. A lock
whose process is no longer alive on this host is stale (a run that crashed or was killed):
it is taken over, with a warning. A lock from another host cannot be checked: it is refused,
and the message says to remove the file when no run uses the directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from focas_keras.errors import InputError

LOCK_FILE = ".focas-keras.lock"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # Linux: a zombie (exited, not yet reaped) holds no lock
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _try_create(path: Path, payload: dict) -> bool:
    """Puts ``payload`` at ``path`` unless something is there; True when it did."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, sort_keys=True) + "\n", encoding="utf-8")
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def out_dir_lock(out_dir, warn=None):
    """Holds ``out_dir``'s lock for the block (``out_dir`` is created).

    Args:
        out_dir: the run's output directory.
        warn: callable taking a warning message (a stale lock taken over).

    Raises:
        InputError: another live run holds the lock (its pid, host and start time are named),
            or ``out_dir`` cannot be written.
    """
    out_dir = Path(out_dir)
    path = out_dir / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a takeover that races with another run's is retried
            if _try_create(path, me):
                break
            holder = _read(path)
            if holder is None:
                continue  # released meanwhile
            pid, host = holder.get("pid"), holder.get("host")
            if (host == me["host"] and isinstance(pid, int) and _alive(pid)) or (
                    host not in (None, me["host"])):
                raise InputError(
                    f"in use by another focas-keras run (pid {pid} on {host}, started "
                    f"{holder.get('started')}); wait for it, or use another --out (if no run "
                    f"uses it, remove {path})", out_dir)
            if warn is not None:
                warn(f"{path}: taking over the lock of a run that is no longer running "
                     f"(pid {pid}, started {holder.get('started')})")
            path.unlink(missing_ok=True)
        else:
            raise InputError(f"could not take the lock {path}; try again", out_dir)
    except OSError as error:
        raise InputError(f"cannot write the output directory ({error.strerror or error})",
                         out_dir) from None
    try:
        yield path
    finally:
        if _read(path) == me:
            path.unlink(missing_ok=True)
