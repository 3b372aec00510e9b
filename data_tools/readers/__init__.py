"""Dataset readers. Each returns one :class:`~data_tools.annotations.AnnotationSet`."""

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
        The dataset's :class:`~data_tools.annotations.AnnotationSet`.
    """
    if mpp is not None:
        kwargs["mpp"] = mpp
    if fmt == "icpr2012":
        from data_tools.readers.icpr2012 import read_icpr2012
        return read_icpr2012(source, **kwargs)
    if fmt == "synth":
        from data_tools.readers.synth_reader import read_synth
        kwargs.pop("box_size", None)
        return read_synth(source, **kwargs)
    if fmt == "gzmh":
        from data_tools.readers.gzmh import read_gzmh
        kwargs.pop("box_size", None)
        return read_gzmh(source, **kwargs)
    if fmt == "coco":
        from data_tools.readers.coco import read_coco
        kwargs.pop("box_size", None)
        return read_coco(source, **kwargs)
    if fmt == "amibr":
        from data_tools.readers.amibr import read_amibr
        kwargs.pop("box_size", None)  # boxes are sized in um from each crop's own mpp
        return read_amibr(source, **kwargs)
    if fmt == "csv":
        from data_tools.readers.csv_table import read_csv_table
        return read_csv_table(source, **kwargs)
    raise InputError(f"unknown dataset format '{fmt}' (known: {', '.join(FORMATS)})")
