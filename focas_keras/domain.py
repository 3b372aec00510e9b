"""Where a model applies: colour statistics of tissue, a model's domain card, and the checks
that flag inputs outside it.

A model trained on one scanner's H&E at one pixel size is not evidence about another's. This
module measures what can be measured without labels and compares it with what the model was
trained on (its card's ``domain`` block):

- **Pixel size.** An input coarser than the model's finest stage (a 20x slide, 0.499 um/px,
  for Mclass crops at 0.2456 um/px) must be enlarged, and the enlarged nuclei are not what the
  model saw: :func:`check_pixel_size` refuses it unless forced, and a forced run is flagged.
- **Stain.** :func:`colour_stats` deconvolves the tissue pixels of an RGB image into
  haematoxylin, eosin and DAB optical densities with the fixed matrix of Ruifrok & Johnston
  (2001) and estimates the image's own H and E absorbance vectors (Macenko et al. 2009).
  :func:`stain_distance` is the root-mean-square z-score of those statistics against the card's
  per-field mean and spread.
- **Density.** A mitotic density above :data:`DENSITY_LIMIT_PER_MM2` (with at least
  :data:`DENSITY_MIN_COUNT` mitoses) is flagged as implausible (see the constant).

:func:`qc_block` gathers the flags with a one-line reason each. Pure numpy (and OpenCV for
resizing); no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from focas_keras.errors import InputError

#: Columns: the optical-density (OD) vectors of haematoxylin, eosin and DAB in (R, G, B)
#: (Ruifrok & Johnston 2001, "Quantification of histochemical staining by color
#: deconvolution"), each normalised to unit length.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29],
                         [0.07, 0.99, 0.11],
                         [0.27, 0.57, 0.78]], np.float64)
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
#: Row vector of OD (R, G, B) @ this = concentrations (H, E, D).
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

#: A pixel is tissue where its mean OD over R, G, B exceeds this (glass and white background
#: are near 0; 0.15 is Macenko's background cut-off, applied to the channel mean).
OD_FLOOR = 0.15
#: Below this share of tissue pixels an image's colour is not measured (too little to say).
MIN_TISSUE_FRACTION = 0.05
#: Pixels used for the statistics at most (an even stride over the tissue pixels).
MAX_PIXELS = 400_000
#: Images of more pixels are sampled on a regular grid before the OD (memory: 24 bytes a pixel).
MAX_IMAGE_PIXELS = 5_000_000
#: Percentiles of the angle in the OD plane that give the two stain vectors (Macenko's 1/99).
MACENKO_PERCENTILE = 1.0

#: The statistics the stain distance uses, in order (names of :func:`colour_stats`' output,
#: each a 3-vector): mean H, E, D concentration and the Macenko H and E unit vectors.
STAIN_FEATURES = ("hed_mean", "stain_h", "stain_e")
#: Spread floor (per statistic) so that a tight training set does not turn JPEG noise into a
#: large z-score; in OD units for concentrations and unit-vector components alike.
MIN_SPREAD = 0.02

#: Allowed excess of an input's pixel size over the model's finest stage (10 %: 40x scanners
#: report 0.23-0.27 um/px for nominally the same magnification).
MPP_TOLERANCE = 0.10

#: Mitoses per mm2 above which a count is flagged as implausible (with >= DENSITY_MIN_COUNT
#: mitoses). What it rests on: the Nottingham score-3 cut-off is 7.3/mm2 (20 per 10 HPF of
#: 0.274 mm2), and the densest of the 15 expert-annotated ICPR 2012 fields (high-power fields
#: chosen in mitotically active breast cancer) holds 19 mitoses in 0.262 mm2 = 72.5/mm2; their
#: mean is 25.7/mm2. 100/mm2 lies above that densest field with room for counting noise (19
#: observed: Poisson sd ~ 23 %), so a count beyond it says more about the detector than about
#: the tumour. It is a plausibility bound from one small data set, not a clinical value.
DENSITY_LIMIT_PER_MM2 = 100.0
#: Fewest mitoses for the density flag: below it one or two detections on a small image would
#: make any density.
DENSITY_MIN_COUNT = 10

#: Flag names (the ``qc`` column of slides.csv / counts.csv joins them with ";").
FLAG_COARSER = "coarser_than_model"
FLAG_STAIN = "stain_outside_domain"
FLAG_DENSITY = "implausible_density"
FLAG_SMALL_TISSUE = "tissue_smaller_than_window"


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Optical density ``-log10((I + 1) / 256)`` of uint8 RGB.

    Args:
        rgb: uint8 (..., 3).

    Returns:
        float64 (..., 3), 0 for white (255), 2.41 for black.
    """
    return -np.log10((np.asarray(rgb, np.float64) + 1.0) / 256.0)


_OD_TABLE = optical_density(np.arange(256, dtype=np.uint8))


def tissue_od(rgb: np.ndarray) -> tuple[np.ndarray, int, int]:
    """The OD of the tissue pixels of an image (mean OD over R, G, B > :data:`OD_FLOOR`).

    Args:
        rgb: uint8 (H, W, 3), or (N, 3) pixels.

    Returns:
        (float64 (M, 3) OD of at most :data:`MAX_PIXELS` tissue pixels, the number of tissue
        pixels among the pixels looked at, the pixels looked at). At most 2 *
        :data:`MAX_PIXELS` pixels are looked at (an even stride in raster order); an image of
        more than :data:`MAX_IMAGE_PIXELS` pixels is first sampled on a regular grid (memory
        stays bounded on a 10000 px image).
    """
    rgb = np.asarray(rgb)
    if rgb.ndim < 2 or rgb.shape[-1] != 3:
        raise ValueError(f"expected RGB (..., 3), got shape {rgb.shape}")
    if rgb.ndim == 3 and rgb.shape[0] * rgb.shape[1] > MAX_IMAGE_PIXELS:
        step = math.ceil(math.sqrt(rgb.shape[0] * rgb.shape[1] / MAX_IMAGE_PIXELS))
        rgb = rgb[::step, ::step]
    pixels = rgb.reshape(-1, 3)
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB, got {pixels.dtype}")
    if len(pixels) > 2 * MAX_PIXELS:  # an even stride: the statistics need no more
        pixels = pixels[:: math.ceil(len(pixels) / (2 * MAX_PIXELS))]
    looked = len(pixels)
    # tissue where the mean OD exceeds the floor (a table per value: ~10x faster than log10)
    od = _OD_TABLE[pixels]
    od = od[od.sum(axis=1) > 3.0 * OD_FLOOR]
    n = len(od)
    if n > MAX_PIXELS:
        od = od[:: math.ceil(n / MAX_PIXELS)]
    return od, n, looked


def macenko_vectors(od: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin OD unit vectors of tissue pixels (Macenko et al. 2009).

    The pixels' OD is projected on the plane of its two main directions (of the uncentred
    second moment, as Macenko's SVD); the 1st and 99th percentile of the angle in that plane
    give the two extreme stains. Haematoxylin is the one absorbing more red.

    Args:
        od: float (M, 3) tissue OD, M >= 2.

    Returns:
        (h, e): float64 (3,) unit vectors with non-negative components (in R, G, B).
    """
    od = np.asarray(od, np.float64)
    if len(od) < 2:
        raise ValueError("need at least 2 tissue pixels for stain vectors")
    _, vecs = np.linalg.eigh(od.T @ od / len(od))
    plane = vecs[:, [2, 1]]  # largest two, largest first
    plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)
    proj = od @ plane
    angle = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(angle, [MACENKO_PERCENTILE, 100.0 - MACENKO_PERCENTILE])
    v_lo = plane @ np.array([math.cos(lo), math.sin(lo)])
    v_hi = plane @ np.array([math.cos(hi), math.sin(hi)])
    h, e = (v_lo, v_hi) if v_lo[0] > v_hi[0] else (v_hi, v_lo)

    def unit(v):
        v = np.clip(v, 0.0, None)
        norm = np.linalg.norm(v)
        return v / norm if norm > 0 else v

    return unit(h), unit(e)


def colour_stats(images) -> dict:
    """Colour statistics of the tissue in one image or several pooled (a slide's tiles).

    Args:
        images: uint8 (H, W, 3) RGB, or a list of them (their tissue pixels are pooled).

    Returns:
        JSON-ready dict: ``tissue_fraction`` (share of pixels on tissue), ``tissue_pixels``,
        and, where the tissue share is at least :data:`MIN_TISSUE_FRACTION`, ``od_mean``
        (mean OD of R, G, B), ``hed_mean`` and ``hed_std`` (H, E, D concentrations by
        :data:`HED_FROM_RGB`), ``stain_h`` and ``stain_e`` (:func:`macenko_vectors`); each a
        list of 3 floats rounded to 5 decimals. Without enough tissue those keys are None.
    """
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    parts, total, tissue = [], 0, 0
    for image in images:
        od, n, looked = tissue_od(image)
        parts.append(od)
        total += looked
        tissue += n
    out = {"tissue_fraction": round(tissue / total, 5) if total else 0.0,
           "tissue_pixels": int(tissue)}
    keys = ("od_mean", "hed_mean", "hed_std", "stain_h", "stain_e")
    if not total or tissue / total < MIN_TISSUE_FRACTION or tissue < 2:
        return {**out, **{k: None for k in keys}}
    od = np.concatenate(parts)
    hed = od @ HED_FROM_RGB
    h, e = macenko_vectors(od)
    values = (od.mean(axis=0), hed.mean(axis=0), hed.std(axis=0), h, e)
    return {**out, **{k: [round(float(x), 5) for x in v] for k, v in zip(keys, values)}}


def feature_vector(stats: dict) -> np.ndarray | None:
    """The :data:`STAIN_FEATURES` of :func:`colour_stats`' output as one float64 (9,) vector;
    None where the image had too little tissue."""
    if any(stats.get(k) is None for k in STAIN_FEATURES):
        return None
    return np.concatenate([np.asarray(stats[k], np.float64) for k in STAIN_FEATURES])


@dataclasses.dataclass(frozen=True)
class DomainCard:
    """What a model was trained on, for the checks (the card's ``domain`` block).

    Attributes:
        stage_mpp: pixel size (um/px) each stage was trained at, e.g. {"mdet": 0.4912,
            "mclass": 0.2456}.
        validated_mpp: pixel sizes the model was validated (cross-validated) at.
        features: names of the statistics (:data:`STAIN_FEATURES`).
        mean: per-statistic mean over the training fields (flattened, 9 values).
        spread: per-statistic standard deviation over the training fields (9 values).
        limit: the stain distance above which an input is flagged.
        fields: how many fields the mean and spread come from.
        limit_rule: how ``limit`` was chosen (one line).
    """

    stage_mpp: dict
    validated_mpp: tuple
    features: tuple
    mean: tuple
    spread: tuple
    limit: float
    fields: int
    limit_rule: str = ""

    @property
    def finest_mpp(self) -> float:
        """The finest (smallest) pixel size any stage was trained at, um/px."""
        return float(min(self.stage_mpp.values()))

    def to_dict(self) -> dict:
        return {"stage_mpp": dict(self.stage_mpp), "validated_mpp": list(self.validated_mpp),
                "stain": {"features": list(self.features), "mean": list(self.mean),
                          "spread": list(self.spread), "limit": self.limit,
                          "fields": self.fields, "limit_rule": self.limit_rule,
                          "distance": "root-mean-square over the statistics of (value - mean) "
                                      f"/ max(spread, {MIN_SPREAD})"}}

    @classmethod
    def from_dict(cls, data: dict) -> DomainCard:
        """The card's ``domain`` block (as :meth:`to_dict` writes it); InputError if broken."""
        try:
            stain = data["stain"]
            card = cls(stage_mpp={str(k): float(v) for k, v in data["stage_mpp"].items()},
                       validated_mpp=tuple(float(v) for v in data.get("validated_mpp", [])),
                       features=tuple(stain["features"]),
                       mean=tuple(float(v) for v in stain["mean"]),
                       spread=tuple(float(v) for v in stain["spread"]),
                       limit=float(stain["limit"]), fields=int(stain["fields"]),
                       limit_rule=str(stain.get("limit_rule", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise InputError(f"the model card's domain block is malformed ({error!r})") from None
        if len(card.mean) != len(card.spread) or not card.stage_mpp:
            raise InputError("the model card's domain block is malformed (mean/spread "
                             "lengths differ or no stage pixel size)")
        return card


def card_stats(per_field: list[dict]) -> tuple[list[float], list[float]]:
    """Mean and standard deviation (ddof 1) of :func:`feature_vector` over fields with enough
    tissue, each rounded to 5 decimals."""
    rows = [v for v in (feature_vector(s) for s in per_field) if v is not None]
    if len(rows) < 2:
        raise ValueError("need at least 2 fields with tissue for a domain card")
    rows = np.stack(rows)
    return ([round(float(v), 5) for v in rows.mean(axis=0)],
            [round(float(v), 5) for v in rows.std(axis=0, ddof=1)])


def stain_distance(stats: dict, mean, spread) -> float | None:
    """Root-mean-square z-score of an input's :func:`feature_vector` against a card's ``mean``
    and ``spread`` (each spread at least :data:`MIN_SPREAD`); None without enough tissue."""
    vector = feature_vector(stats)
    if vector is None:
        return None
    mean, spread = np.asarray(mean, np.float64), np.asarray(spread, np.float64)
    z = (vector - mean) / np.maximum(spread, MIN_SPREAD)
    return float(np.sqrt(np.mean(z * z)))


def check_stain(stats: dict, card: DomainCard | None) -> dict:
    """The ``stain`` entry of a qc block: ``distance``, ``limit``, ``flag`` and ``reason``."""
    if card is None:
        return {"distance": None, "limit": None, "flag": False,
                "reason": "not checked: the model has no domain card"}
    distance = stain_distance(stats, card.mean, card.spread)
    if distance is None:
        return {"distance": None, "limit": card.limit, "flag": False,
                "tissue_fraction": stats.get("tissue_fraction"),
                "reason": f"not checked: tissue covers under {MIN_TISSUE_FRACTION:.0%} of the "
                          "pixels sampled"}
    flag = distance > card.limit
    return {"distance": round(distance, 3), "limit": card.limit, "flag": bool(flag),
            "reason": (f"the tissue's colour statistics lie {distance:.2f} spreads (RMS "
                       f"z-score) from the training fields' mean, above the limit "
                       f"{card.limit:g}: another scanner, stain or tissue; counts may be wrong"
                       if flag else "within the training fields' range")}


def pixel_size_reason(input_mpp: float, model_mpp: float,
                      tolerance: float = MPP_TOLERANCE) -> str | None:
    """Why ``input_mpp`` (um/px) is too coarse for a model whose finest stage runs at
    ``model_mpp``; None when it is not (finer inputs are shrunk, which is safe)."""
    if input_mpp <= model_mpp * (1.0 + tolerance):
        return None
    return (f"the input is {input_mpp:g} um/px, coarser than the model's {model_mpp:g} um/px "
            f"(more than {tolerance:.0%}): it would be enlarged {input_mpp / model_mpp:.2f}x, "
            "and the model has not seen such images")


def check_pixel_size(input_mpp: float, model_mpp: float | None, what, allow: bool,
                     option: str = "--allow-coarser") -> str | None:
    """Refuses an input coarser than the model (InputError naming ``what`` and ``option``);
    with ``allow``, returns the reason to flag instead. None when the pixel size is fine or the
    model's is unknown."""
    if model_mpp is None:
        return None
    reason = pixel_size_reason(float(input_mpp), float(model_mpp))
    if reason is not None and not allow:
        raise InputError(f"{reason}; use a model trained at this pixel size, or pass {option} "
                         "to run anyway (every output is then flagged)", what)
    return reason


def check_density(count: int, area_mm2: float, where: str) -> str | None:
    """The reason to flag ``count`` mitoses in ``area_mm2`` (None when plausible)."""
    if area_mm2 is None or area_mm2 <= 0 or count < DENSITY_MIN_COUNT:
        return None
    density = count / area_mm2
    if density <= DENSITY_LIMIT_PER_MM2:
        return None
    return (f"{count} mitoses in {area_mm2:.2f} mm2 of {where} = {density:.0f} per mm2, above "
            f"the plausible {DENSITY_LIMIT_PER_MM2:g} per mm2: likely false detections (other "
            "tissue, stain or scanner)")


def qc_block(mpp: float, model_mpp: float | None, coarser_reason: str | None,
             stain: dict | None, density_reasons: list[str], extra: dict | None = None) -> dict:
    """The ``qc`` record of one slide or image.

    Returns:
        ``{"flags": [names], "reasons": [one line each], "mpp": {...}, "stain": {...},
        "density": {...}}``; ``flags`` empty means nothing was found outside the domain.
    """
    flags, reasons = [], []
    if coarser_reason is not None:
        flags.append(FLAG_COARSER)
        reasons.append(f"{FLAG_COARSER}: {coarser_reason} (forced)")
    if stain is not None and stain.get("flag"):
        flags.append(FLAG_STAIN)
        reasons.append(f"{FLAG_STAIN}: {stain['reason']}")
    for reason in density_reasons:
        if FLAG_DENSITY not in flags:
            flags.append(FLAG_DENSITY)
        reasons.append(f"{FLAG_DENSITY}: {reason}")
    for name, reason in (extra or {}).items():
        flags.append(name)
        reasons.append(f"{name}: {reason}")
    return {"flags": flags, "reasons": reasons,
            "mpp": {"input": mpp, "model_finest": model_mpp,
                    "tolerance": MPP_TOLERANCE, "forced": coarser_reason is not None},
            "stain": stain,
            "density": {"limit_per_mm2": DENSITY_LIMIT_PER_MM2,
                        "min_count": DENSITY_MIN_COUNT, "flag": bool(density_reasons)}}


def qc_text(qc: dict | None) -> str:
    """The ``qc`` column: ``ok``, or the flag names joined by ``;`` (``unchecked`` without a
    qc record)."""
    if not qc:
        return "unchecked"
    return ";".join(qc["flags"]) or "ok"


def _run_data_mpp(run_dir) -> float | None:
    """A training run's ``data_mpp`` (:func:`focas_keras.runs.run_data_mpp`), None where it
    cannot tell (the loader reports what is wrong with the run)."""
    from focas_keras.runs import run_data_mpp

    try:
        return run_data_mpp(run_dir)
    except InputError:
        return None


def model_finest_mpp(card: dict | None, det_run=None, cls_run=None) -> float | None:
    """The finest pixel size (um/px) a cascade's stages were trained at, known before it
    loads: from a bundled card's ``pixel_sizes_um``, else the runs' ``run.json``
    (``data_mpp``); None where a run kept its images' own, unrecorded pixel size."""
    if card is not None:
        sizes = card.get("pixel_sizes_um") or {}
        values = [sizes.get("mdet"), sizes.get("mclass_crops")]
    else:
        values = [_run_data_mpp(det_run) if det_run else None,
                  _run_data_mpp(cls_run) if cls_run else None]
    if any(v is None for v in values):
        known = [float(v) for v in values if v is not None]
        return min(known) if known and card is not None else None
    return float(min(values))


def domain_of(card: dict | None) -> DomainCard | None:
    """The :class:`DomainCard` of a bundled model's card (None: no card, or no domain block)."""
    if not card or "domain" not in card:
        return None
    return DomainCard.from_dict(card["domain"])


def sample_slide_tiles(reader, tissue, target_mpp: float, tiles: int = 12,
                       side_um: float = 256.0) -> list[np.ndarray]:
    """Up to ``tiles`` square tiles of ``side_um`` on tissue, spread over the slide, at about
    ``target_mpp`` (read from the nearest level not coarser, area-resized): what
    :func:`colour_stats` measures for a slide.

    Tiles are centred on tissue-mask pixels taken at an even stride through the mask's
    tissue pixels in raster order (deterministic), so the sample follows the tissue.

    Args:
        reader: an open :class:`~focas_keras.slides.reader.SlideReader`.
        tissue: its :class:`~focas_keras.slides.tissue.TissueMap`.
        target_mpp: pixel size to measure at (the card's training pixel size).

    Returns:
        uint8 (side, side, 3) RGB tiles (fewer near the slide's edge or with little tissue).
    """
    import cv2

    rows, cols = np.nonzero(tissue.mask)
    if not len(rows):
        return []
    picks = np.unique(np.linspace(0, len(rows) - 1, min(tiles, len(rows))).round().astype(int))
    level = reader.level_for_mpp(target_mpp)
    down = reader.level_downsamples[level]
    level_mpp = reader.level_mpp(level)
    side_level = max(8, int(round(side_um / level_mpp)))
    level_w, level_h = reader.level_dimensions[level]
    out = []
    for k in picks:
        cx = (cols[k] + 0.5) / tissue.scale_x / down
        cy = (rows[k] + 0.5) / tissue.scale_y / down
        x0 = int(min(max(0, cx - side_level / 2), max(0, level_w - side_level)))
        y0 = int(min(max(0, cy - side_level / 2), max(0, level_h - side_level)))
        w, h = min(side_level, level_w - x0), min(side_level, level_h - y0)
        region = reader.read(int(round(x0 * down)), int(round(y0 * down)), w, h, level)
        size = (max(1, round(w * level_mpp / target_mpp)), max(1, round(h * level_mpp /
                                                                         target_mpp)))
        interp = cv2.INTER_AREA if size[0] < w else cv2.INTER_LINEAR
        out.append(cv2.resize(region, size, interpolation=interp) if size != (w, h)
                   else region)
    return out


def image_qc(image: np.ndarray, df, mpp: float, model_mpp: float | None,
             coarser_reason: str | None, card: DomainCard | None) -> dict:
    """The qc record of one image for ``detect``: its stain against the card, its density.

    Args:
        image: uint8 (H, W, 3) RGB, the input image.
        df: its candidates (:meth:`Cascade.run`'s table; ``accepted`` counted).
        mpp: the image's pixel size, um/px.
        model_mpp: the model's finest stage pixel size (None: unknown).
        coarser_reason: why the run was forced on a coarser image (None: it was not).
        card: the model's :class:`DomainCard` (None: stain not checked).
    """
    stain = check_stain(colour_stats(image), card)
    count = int(df["accepted"].astype(bool).sum())
    area = image.shape[0] * image.shape[1] * (mpp / 1000.0) ** 2
    density = check_density(count, area, "image")
    return qc_block(mpp, model_mpp, coarser_reason, stain, [density] if density else [])


def slide_qc(reader, tissue, card: DomainCard | None, model_mpp: float, counted: int,
             tissue_mm2: float, hotspot: dict) -> dict:
    """The qc record of one slide run by ``slide``.

    Args:
        reader: the open :class:`~focas_keras.slides.reader.SlideReader`.
        tissue: its :class:`~focas_keras.slides.tissue.TissueMap`.
        card: the model's :class:`DomainCard` (None: stain not checked).
        model_mpp: the cascade's finest stage pixel size, um/px (a coarser slide ran forced).
        counted: mitoses counted in the tissue; tissue_mm2: the tissue's area.
        hotspot: the summary's hotspot entry (``fits``, ``count``, ``area_mm2``, ``note``).
    """
    from focas_keras.slides.reader import SlideReadError

    coarser = pixel_size_reason(reader.mpp, model_mpp)
    stain = check_stain({}, None)
    if card is not None:
        try:
            tiles = sample_slide_tiles(reader, tissue, card.finest_mpp)
        except SlideReadError as error:
            stain = {"distance": None, "limit": card.limit, "flag": False,
                     "reason": f"not checked: a sampled tile could not be read ({error})"}
        else:
            stain = check_stain(colour_stats(tiles) if tiles else {}, card)
            stain["tiles"] = len(tiles)
    density = [check_density(counted, tissue_mm2, "tissue")]
    if hotspot.get("fits") and hotspot.get("x_px") is not None:
        density.append(check_density(hotspot["count"], hotspot["area_mm2"], "hotspot window"))
    extra = {} if hotspot.get("fits", True) else {FLAG_SMALL_TISSUE: hotspot["note"]}
    return qc_block(reader.mpp, model_mpp, coarser, stain, [d for d in density if d], extra)
