"""tf.data input pipelines over the det and cls shards written by ``focas-keras prepare``.

Both pipelines interleave the shards of a split, shuffle, parse, augment, batch and prefetch
with AUTOTUNE. Augmentation randomness is stateless and keyed by (seed, element index), so a
given seed gives the same augmented examples however many threads run the map; with
``deterministic=True`` the element order is fixed too.
"""

from __future__ import annotations

import json
from pathlib import Path

import tensorflow as tf

from focas_keras.data import augment as aug
from focas_keras.data import records
from focas_keras.errors import InputError
from focas_keras.io import sha256_file

AUTOTUNE = tf.data.AUTOTUNE


def load_manifest(shard_dir) -> dict:
    """Reads ``shard_dir/manifest.json``; InputError when missing or malformed."""
    path = Path(shard_dir) / records.MANIFEST
    if not Path(shard_dir).is_dir():
        raise InputError("shard directory not found", shard_dir)
    if not path.is_file():
        raise InputError("no manifest.json (not a focas-keras shard directory?)", shard_dir)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"invalid JSON: {err.msg}", path, err.lineno) from None
    for key in ("shards", "splits", "tile_size", "patch_size"):
        if key not in manifest:
            raise InputError(f"manifest lacks '{key}'", path)
    return manifest


def shard_entries(manifest: dict, kind: str, split: str) -> list[dict]:
    """The manifest entries of one kind and split, in name order."""
    return [e for e in manifest["shards"] if e["kind"] == kind and e["split"] == split]


def verify_for_training(shard_dir, manifest: dict, kind: str) -> tuple[bool, list[str]]:
    """Verifies the train and val shards of one kind before a training run reads them.

    Returns:
        (whether the val split has records of ``kind``, the sha256 of every ``kind`` shard in
        manifest order, which identifies the data of a run).

    Raises:
        InputError: a missing or corrupt shard.
    """
    verify_shards(shard_dir, shard_entries(manifest, kind, "train")
                  + shard_entries(manifest, kind, "val"))
    has_val = manifest["splits"].get("val", {}).get(kind, {}).get("records", 0) > 0
    return has_val, [e["sha256"] for e in manifest["shards"] if e["kind"] == kind]


def data_mpp_identity(manifest: dict) -> dict:
    """``{"data_mpp": um/px}`` when the shards were rescaled (``prepare --target-mpp``), else
    ``{}``: merged into a run's identity, so detection knows each model's pixel size."""
    target = manifest.get("parameters", {}).get("target_mpp")
    return {} if target is None else {"data_mpp": float(target)}


def verify_shards(shard_dir, entries) -> None:
    """Checks that every shard exists with the size and sha256 the manifest records.

    Raises:
        InputError: naming the first shard that is missing or corrupt.
    """
    for entry in entries:
        path = Path(shard_dir) / entry["path"]
        if not path.is_file():
            raise InputError("shard listed in manifest.json is missing", path)
        if path.stat().st_size != entry["bytes"]:
            raise InputError(f"shard has {path.stat().st_size} bytes, manifest says "
                             f"{entry['bytes']} (truncated or replaced)", path)
        if sha256_file(path) != entry["sha256"]:
            raise InputError("shard fails its sha256 checksum (corrupt)", path)


def _shard_files(shard_dir, kind, split, verify):
    manifest = load_manifest(shard_dir)
    entries = [e for e in shard_entries(manifest, kind, split) if e["records"] > 0]
    if not entries:
        raise InputError(f"no {kind} records for split '{split}'", shard_dir)
    if verify:
        verify_shards(shard_dir, entries)
    return manifest, [str(Path(shard_dir) / e["path"]) for e in entries]


def _records(files, shuffle, seed, deterministic):
    files_ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        files_ds = files_ds.shuffle(len(files), seed=seed)
    # Unshuffled reads keep shard order (one shard at a time), so records come in file order.
    return files_ds.interleave(
        tf.data.TFRecordDataset, cycle_length=min(4, len(files)) if shuffle else 1,
        num_parallel_calls=AUTOTUNE, deterministic=deterministic)


def _finish(ds, batch_size, drop_remainder, deterministic):
    ds = ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = deterministic
    return ds.with_options(options)


def _label_is(value):
    feature = {"label": records.CLS_FEATURES["label"]}
    return lambda s: tf.equal(tf.io.parse_single_example(s, feature)["label"], value)


def _element_seed(seed, index):
    return tf.stack([tf.constant(seed, tf.int64), tf.cast(index, tf.int64)])


def pad_boxes(boxes, max_boxes: int):
    """Pads (or truncates) boxes to a fixed count.

    Args:
        boxes: float32 [N, 4].
        max_boxes: output count M.

    Returns:
        (boxes float32 [M, 4], mask bool [M]) where mask marks real boxes.
    """
    boxes = boxes[:max_boxes]
    count = tf.shape(boxes)[0]
    padded = tf.pad(boxes, [[0, max_boxes - count], [0, 0]])
    mask = tf.range(max_boxes) < count
    return tf.ensure_shape(padded, [max_boxes, 4]), mask


def det_dataset(shard_dir, split: str = "train", batch_size: int = 8,
                augment: aug.AugmentConfig | None = None, shuffle: bool = True,
                repeat: bool = False, seed: int = 0, deterministic: bool = False,
                max_boxes: int = 32, shuffle_buffer: int = 1024, drop_remainder: bool = False,
                verify: bool = True, extra_dirs=(), extra_share: float = 0.0
                ) -> tf.data.Dataset:
    """Batches of detection tiles with padded boxes.

    Args:
        shard_dir: directory written by ``focas-keras prepare``.
        split: ``train`` or ``val``.
        batch_size: tiles per batch B.
        augment: augmentation settings; None for none.
        shuffle: shuffle shards and records.
        repeat: repeat forever (before batching).
        seed: seed of shuffling and augmentation.
        deterministic: fixed element order (slower when the map is parallel).
        max_boxes: boxes per tile after padding M; extra boxes are dropped.
        shuffle_buffer: records in the shuffle buffer.
        drop_remainder: drop a last smaller batch.
        verify: check shard checksums against the manifest first.
        extra_dirs: further shard directories (e.g. ``prepare --det-small-images mosaic`` of
            other scanners' mitoses) whose ``split`` tiles are mixed in; same tile size.
        extra_share: share of the tiles drawn from ``extra_dirs`` (split evenly between
            them); the streams repeat, so the dataset is endless (take the steps needed).

    Returns:
        Dataset of ``(images, targets)``: images float32 [B, T, T, 3] in [0, 1]; targets dict
        with ``boxes`` float32 [B, M, 4] (x1, y1, x2, y2 tile pixels) and ``box_mask`` bool
        [B, M].
    """
    manifest, files = _shard_files(shard_dir, records.DET, split, verify)
    size = int(manifest["tile_size"])
    extra_dirs = list(extra_dirs)
    if not 0 <= extra_share < 1 or bool(extra_dirs) != (extra_share > 0):
        raise InputError(f"extra share must be in (0, 1) with extra shard directories and 0 "
                         f"without, got {extra_share!r}")
    sources = [files]
    for extra in extra_dirs:
        extra_manifest, extra_files = _shard_files(extra, records.DET, split, verify)
        if int(extra_manifest["tile_size"]) != size:
            raise InputError(f"tile size {extra_manifest['tile_size']} differs from {size} px "
                             f"of {shard_dir}", extra)
        sources.append(extra_files)
    streams = []
    for i, source in enumerate(sources):
        stream = _records(source, shuffle, seed + 7 * i, deterministic)
        if shuffle:
            stream = stream.shuffle(shuffle_buffer, seed=seed + 7 * i)
        streams.append(stream.repeat() if repeat or extra_dirs else stream)
    if extra_dirs:
        weights = [1.0 - extra_share] + [extra_share / len(extra_dirs)] * len(extra_dirs)
        ds = tf.data.Dataset.sample_from_datasets(streams, weights=weights, seed=seed)
    else:
        ds = streams[0]

    def parse(index, serialized):
        example = records.parse_det(serialized, size)
        image = tf.cast(example["image"], tf.float32) / 255.0
        boxes, mask = pad_boxes(example["boxes"], max_boxes)
        if augment is not None:
            image, boxes, mask = aug.augment_det(image, boxes, mask,
                                                 _element_seed(seed, index), augment)
        return image, {"boxes": boxes, "box_mask": tf.cast(mask, tf.bool)}

    ds = ds.enumerate().map(parse, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    return _finish(ds, batch_size, drop_remainder, deterministic)


def cls_dataset(shard_dir, split: str = "train", batch_size: int = 32,
                augment: aug.AugmentConfig | None = None, shuffle: bool = True,
                repeat: bool = False, seed: int = 0, deterministic: bool = False,
                positive_share: float | None = None, shuffle_buffer: int = 2048,
                drop_remainder: bool = False, verify: bool = True, extra_dirs=(),
                extra_share: float = 0.0) -> tf.data.Dataset:
    """Batches of classification patches and labels.

    Args:
        shard_dir: directory written by ``focas-keras prepare``.
        split: ``train`` or ``val``.
        batch_size: patches per batch B.
        augment: augmentation settings; None for none.
        shuffle: shuffle shards and records.
        repeat: repeat forever (before batching). Implied by ``positive_share``.
        seed: seed of shuffling, sampling and augmentation.
        deterministic: fixed element order.
        positive_share: when set, draw positives with this probability (weighted sampling
            over two endless streams), which balances the batches.
        shuffle_buffer: records in the shuffle buffer.
        drop_remainder: drop a last smaller batch.
        verify: check shard checksums against the manifest first.
        extra_dirs: further shard directories (other datasets, e.g. other scanners' mitoses)
            whose ``split`` records join the balanced draw; same patch size as ``shard_dir``.
        extra_share: share of each label's draws taken from ``extra_dirs`` (split evenly
            between them), where they have that label; a source without negatives (a
            positives-only set) gives positives only, and the negatives all come from the
            sources that have them. Needs ``positive_share``.

    Returns:
        Dataset of ``(images, labels)``: images float32 [B, P, P, 3] in [0, 1], labels float32
        [B] (1 = mitosis).
    """
    manifest, files = _shard_files(shard_dir, records.CLS, split, verify)
    size = int(manifest["patch_size"])
    extra_dirs = list(extra_dirs)
    if extra_dirs and positive_share is None:
        raise InputError("extra shard directories need balanced sampling (positive_share)")
    if not 0 <= extra_share < 1 or (extra_dirs and extra_share == 0):
        raise InputError(f"extra share must be in (0, 1) with extra shard directories and 0 "
                         f"without, got {extra_share!r}")
    if positive_share is not None:
        if not 0 < positive_share < 1:
            raise InputError("positive share must be in (0, 1)")
        counts = manifest["splits"][split]["cls"]
        if not counts["positive"] or not counts["negative"]:
            raise InputError(f"split '{split}' needs both positive and negative patches for "
                             "balanced sampling", shard_dir)
        sources = [(shard_dir, files, counts)]
        for extra in extra_dirs:
            extra_manifest, extra_files = _shard_files(extra, records.CLS, split, verify)
            if int(extra_manifest["patch_size"]) != size:
                raise InputError(f"patch size {extra_manifest['patch_size']} differs from "
                                 f"{size} px of {shard_dir}", extra)
            sources.append((extra, extra_files, extra_manifest["splits"][split]["cls"]))
        streams, weights = [], []
        for label, label_share, key in ((1, positive_share, "positive"),
                                        (0, 1.0 - positive_share, "negative")):
            extras = [i for i, src in enumerate(sources) if i and src[2][key]]
            shares = {0: 1.0 - extra_share if extras else 1.0}
            shares.update({i: extra_share / len(extras) for i in extras})
            for i, share in shares.items():
                stream = _records(sources[i][1], shuffle, seed + 7 * i, deterministic)
                stream = stream.filter(_label_is(label))
                if shuffle:
                    stream = stream.shuffle(shuffle_buffer, seed=seed + 7 * i + 1 - label)
                streams.append(stream.repeat())
                weights.append(label_share * share)
        ds = tf.data.Dataset.sample_from_datasets(streams, weights=weights, seed=seed)
    else:
        ds = _records(files, shuffle, seed, deterministic)
        if shuffle:
            ds = ds.shuffle(shuffle_buffer, seed=seed)
        if repeat:
            ds = ds.repeat()

    def parse(index, serialized):
        example = records.parse_cls(serialized, size)
        image = tf.cast(example["image"], tf.float32) / 255.0
        if augment is not None:
            image = aug.augment_cls(image, _element_seed(seed, index), augment)
        return image, tf.cast(example["label"], tf.float32)

    ds = ds.enumerate().map(parse, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    return _finish(ds, batch_size, drop_remainder, deterministic)


def read_records(shard_dir, kind: str, split: str, verify: bool = True) -> list[dict]:
    """Every record of one kind and split, decoded, in shard order (for checks and tools).

    Returns:
        list of dicts as from :func:`records.parse_det` / :func:`records.parse_cls`, with
        numpy values.
    """
    manifest, files = _shard_files(shard_dir, kind, split, verify)
    if kind == records.FIELD:
        ds = tf.data.TFRecordDataset(files).map(records.parse_field)
    else:
        size = int(manifest["tile_size" if kind == records.DET else "patch_size"])
        parse = records.parse_det if kind == records.DET else records.parse_cls
        ds = tf.data.TFRecordDataset(files).map(lambda s: parse(s, size))
    try:
        return [{k: v.numpy() for k, v in element.items()} for element in ds]
    except tf.errors.DataLossError as err:
        raise InputError(f"corrupt shard ({err.message.splitlines()[0]})", shard_dir) from None


def has_records(manifest: dict, kind: str, split: str) -> bool:
    """Whether the manifest lists non-empty shards of ``kind`` for ``split``."""
    return any(e["records"] > 0 for e in shard_entries(manifest, kind, split))


def read_fields(shard_dir, split: str = "val", verify: bool = True) -> list[dict]:
    """The whole fields of a split (``prepare --val-fields``): dicts with numpy ``image``
    uint8 (H, W, 3), ``points`` float32 (N, 2), ``mpp`` float, ``image_id``/``slide_id`` str."""
    fields = read_records(shard_dir, records.FIELD, split, verify)
    for field in fields:
        field["image_id"] = field["image_id"].decode()
        field["slide_id"] = field["slide_id"].decode()
        field["mpp"] = float(field["mpp"])
    return fields
