"""Writing TFRecord shards safely: bounded size, temporary names, checksums."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import tensorflow as tf

from focas_keras.io import sha256_file


class ShardWriter:
    """Writes records of one kind and split into shards of at most ``max_bytes`` each.

    Shards are named ``<root>/<kind>/<split>-NNNNN.tfrecord``; each is written as ``.tmp`` and
    renamed when closed, so a reader never sees a partial shard.

    Args:
        root: output directory (the shards go under ``root/kind``).
        kind: ``det`` or ``cls``.
        split: split name (``train``, ``val``).
        max_bytes: size bound of one shard (a shard closes before it would pass it; a single
            record larger than the bound still gets a shard of its own).
    """

    def __init__(self, root, kind: str, split: str, max_bytes: int):
        self.root = Path(root)
        self.kind, self.split, self.max_bytes = kind, split, int(max_bytes)
        self.shards: list[dict] = []
        self._writer = None
        self._tmp = None
        self._bytes = 0
        self._records = 0

    def write(self, record: bytes) -> None:
        """Appends one serialised record."""
        size = len(record) + 16  # TFRecord framing: length, two CRCs
        if self._writer is not None and self._bytes + size > self.max_bytes:
            self._close_shard()
        if self._writer is None:
            self._open_shard()
        self._writer.write(record)
        self._bytes += size
        self._records += 1

    def close(self) -> list[dict]:
        """Closes the open shard; returns one manifest entry per shard written."""
        if self._writer is not None:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        """Closes and deletes the shard in progress (completed shards stay)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._tmp)

    def _final_path(self) -> Path:
        return self.root / self.kind / f"{self.split}-{len(self.shards):05d}.tfrecord"

    def _open_shard(self) -> None:
        final = self._final_path()
        final.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = final.with_name(final.name + ".tmp")
        self._writer = tf.io.TFRecordWriter(str(self._tmp))
        self._bytes = self._records = 0

    def _close_shard(self) -> None:
        self._writer.close()
        self._writer = None
        final = self._final_path()
        os.replace(self._tmp, final)
        self.shards.append({
            "path": final.relative_to(self.root).as_posix(),
            "kind": self.kind,
            "split": self.split,
            "records": self._records,
            "bytes": final.stat().st_size,
            "sha256": sha256_file(final),
        })
