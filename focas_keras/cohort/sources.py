"""Where a cohort's slides are: command-line paths and manifests, local or remote files.

A slide is a local path or a URI of any filesystem Apache Beam's ``FileSystems`` knows
(``gs://``, ``s3://``, ``hdfs://``, ... with the matching Beam extra installed). OpenSlide
reads only local files, so a remote slide is copied once per worker process into a local
temporary directory (removed when the process exits) and opened there; the reader still
reports the slide's own URI as its ``path``. A slide format made of several files (``.mrxs``
with its directory) must be given as a local path.
"""

from __future__ import annotations

import atexit
import csv
import io
import os
import shutil
import tempfile
import threading
from pathlib import Path, PurePosixPath

from focas_keras.errors import InputError

#: File suffixes read as manifests (one slide per line, or a CSV/TSV with a path column).
MANIFEST_SUFFIXES = (".txt", ".csv", ".tsv", ".lst")
#: Header names of a manifest's slide column (first match wins).
MANIFEST_COLUMNS = ("path", "slide", "file", "uri")

_LOCAL_COPIES: dict[str, str] = {}
_COPY_LOCK = threading.Lock()
_COPY_DIR: list[str] = []


def is_remote(path: str) -> bool:
    """True for a URI with a scheme other than ``file`` (``gs://...``)."""
    scheme, sep, _ = str(path).partition("://")
    return bool(sep) and scheme.lower() != "file" and "/" not in scheme


def local_path(path: str) -> str:
    """``path`` without a ``file://`` prefix."""
    text = str(path)
    return text[len("file://"):] if text.lower().startswith("file://") else text


def stem(path: str) -> str:
    """A slide's name: its file stem (names its output directory)."""
    return PurePosixPath(str(path).rstrip("/")).stem if is_remote(path) else Path(
        local_path(path)).stem


def join(directory: str, *names: str) -> str:
    """``directory/name/...`` for a local path or a URI."""
    if is_remote(directory):
        return "/".join([str(directory).rstrip("/"), *names])
    return str(Path(local_path(directory), *names))


def read_bytes(path: str) -> bytes:
    """A local or remote file's bytes.

    Raises:
        InputError: it cannot be read.
    """
    try:
        if is_remote(path):
            from apache_beam.io.filesystems import FileSystems

            with FileSystems.open(path) as handle:
                return handle.read()
        return Path(local_path(path)).read_bytes()
    except InputError:
        raise
    except Exception as error:  # IOError, Beam's BeamIOError, a missing filesystem
        raise InputError(f"cannot be read ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})", path) from None


def expand_sources(arguments) -> list[str]:
    """The slides named on the command line, manifests expanded, in order.

    A manifest (suffix in :data:`MANIFEST_SUFFIXES`) lists one slide per line (``#`` starts a
    comment), or is a CSV/TSV whose header has one of :data:`MANIFEST_COLUMNS`; a relative
    local path in it is relative to the manifest's directory.

    Raises:
        InputError: an unreadable or empty manifest, a table without a slide column, no
            slides at all, or two slides with the same file stem (the stem names the output
            directory).
    """
    sources = []
    for argument in arguments:
        argument = str(argument)
        if Path(argument.lower()).suffix in MANIFEST_SUFFIXES:
            sources += _manifest(argument)
        else:
            sources.append(argument)
    if not sources:
        raise InputError("no slides given")
    seen = {}
    for source in sources:
        name = stem(source)
        if name in seen:
            raise InputError(f"two slides named '{name}' (also {seen[name]}); the name is the "
                             "output directory", source)
        seen[name] = source
    return sources


def _manifest(path: str) -> list[str]:
    text = read_bytes(path).decode("utf-8-sig", errors="replace")
    lines = [line for line in text.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise InputError("manifest lists no slides", path)
    delimiter = "\t" if "\t" in lines[0] else ("," if "," in lines[0] else None)
    if delimiter is None:
        entries = [line.strip() for line in lines]
    else:
        rows = list(csv.reader(io.StringIO("\n".join(lines)), delimiter=delimiter))
        header = [h.strip().lower() for h in rows[0]]
        column = next((header.index(c) for c in MANIFEST_COLUMNS if c in header), None)
        if column is None:
            raise InputError(f"manifest table has no slide column (one of "
                             f"{', '.join(MANIFEST_COLUMNS)}; header: {', '.join(rows[0])})",
                             path)
        entries = [row[column].strip() for row in rows[1:]
                   if len(row) > column and row[column].strip()]
        if not entries:
            raise InputError("manifest lists no slides", path)
    if is_remote(path):
        base = str(path).rsplit("/", 1)[0]
        return [e if is_remote(e) or e.startswith("/") else f"{base}/{e}" for e in entries]
    base = Path(local_path(path)).parent
    return [e if is_remote(e) or Path(e).is_absolute() else str(base / e) for e in entries]


def fetch(source: str) -> str:
    """A local file holding ``source``: itself when local, else a copy made once per process.

    Raises:
        InputError: a remote file that cannot be read.
    """
    if not is_remote(source):
        return local_path(source)
    with _COPY_LOCK:
        if source in _LOCAL_COPIES and os.path.exists(_LOCAL_COPIES[source]):
            return _LOCAL_COPIES[source]
        if not _COPY_DIR:
            _COPY_DIR.append(tempfile.mkdtemp(prefix="focas-keras-cohort-"))
            atexit.register(shutil.rmtree, _COPY_DIR[0], True)
        folder = tempfile.mkdtemp(dir=_COPY_DIR[0])
        target = os.path.join(folder, PurePosixPath(source).name)
        from apache_beam.io.filesystems import FileSystems

        try:
            with FileSystems.open(source) as remote, open(target, "wb") as local:
                shutil.copyfileobj(remote, local, 1 << 22)
        except Exception as error:
            shutil.rmtree(folder, ignore_errors=True)
            raise InputError(f"cannot be copied to the worker ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else ''})",
                             source) from None
        _LOCAL_COPIES[source] = target
        return target


class SourceReader:
    """A :class:`~focas_keras.slides.reader.SlideReader` of a local copy that reports the
    slide's own URI as ``path`` (everything else is the reader's)."""

    def __init__(self, reader, path: str):
        self._reader = reader
        self.path = path

    def __getattr__(self, name):
        return getattr(self._reader, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self._reader.close()


def open_source(source: str, mpp: float | None = None):
    """Opens a slide (local, or fetched to local disk first).

    Returns:
        A :class:`~focas_keras.slides.reader.SlideReader` (local) or a :class:`SourceReader`
        around one (remote); the caller closes it.

    Raises:
        InputError: the slide cannot be fetched or opened (as ``SlideReader.open``).
    """
    from focas_keras.slides.reader import SlideReader

    if not is_remote(source):
        return SlideReader.open(local_path(source), mpp=mpp)
    return SourceReader(SlideReader.open(fetch(source), mpp=mpp), source)
