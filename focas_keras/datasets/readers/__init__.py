"""Dataset readers. Each returns one :class:`~focas_keras.datasets.annotations.AnnotationSet`."""

from __future__ import annotations

from focas_keras.errors import InputError

FORMATS = ("icpr2012", "gzmh", "coco", "csv", "synth", "amibr")


def read_dataset(fmt: str, source, mpp: float | None = None, **kwargs):
    """Reads ``source`` in format ``fmt`` (one of :data:`FORMATS`).

    Args:
        fmt: dataset format name.
        source: dataset directory (icpr2012, gzmh, synth, amibr) or file (coco JSON, csv).
        mpp: pixel size in um/px; None keeps the reader's default.
        **kwargs: further reader arguments (e.g. ``box_size``).

    Returns:
        The dataset's :class:`~focas_keras.datasets.annotations.AnnotationSet`.
    """
    if mpp is not None:
        kwargs["mpp"] = mpp
    if fmt == "icpr2012":
        from focas_keras.datasets.readers.icpr2012 import read_icpr2012
        return read_icpr2012(source, **kwargs)
    if fmt == "synth":
        from focas_keras.datasets.readers.synth_reader import read_synth
        kwargs.pop("box_size", None)
        return read_synth(source, **kwargs)
    if fmt == "gzmh":
        from focas_keras.datasets.readers.gzmh import read_gzmh
        kwargs.pop("box_size", None)
        return read_gzmh(source, **kwargs)
    if fmt == "coco":
        from focas_keras.datasets.readers.coco import read_coco
        kwargs.pop("box_size", None)
        return read_coco(source, **kwargs)
    if fmt == "amibr":
        from focas_keras.datasets.readers.amibr import read_amibr
        kwargs.pop("box_size", None)  # boxes are sized in um from each crop's own mpp
        return read_amibr(source, **kwargs)
    if fmt == "csv":
        from focas_keras.datasets.readers.csv_table import read_csv_table
        return read_csv_table(source, **kwargs)
    raise InputError(f"unknown dataset format '{fmt}' (known: {', '.join(FORMATS)})")
