"""Precision-recall plots drawn with OpenCV (matplotlib is not a dependency)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from focas_keras.errors import InputError

#: Curve colours (BGR): blue, orange, green, red, purple, brown, pink, grey.
COLOURS = [(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148),
           (75, 86, 140), (194, 119, 227), (127, 127, 127)]
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _text(canvas, text, org, scale=0.45, colour=(0, 0, 0), centre=False):
    """Draws ``text`` with its baseline at ``org`` (horizontally centred where ``centre``)."""
    (width, _), _ = cv2.getTextSize(text, _FONT, scale, 1)
    x = org[0] - width // 2 if centre else org[0]
    cv2.putText(canvas, text, (int(x), int(org[1])), _FONT, scale, colour, 1, cv2.LINE_AA)


def pr_curve_png(curves: dict, path, best_points: dict | None = None,
                 size: tuple[int, int] = (640, 520), title: str = "Precision-recall") -> None:
    """Writes a precision-recall plot as a PNG (atomically: temporary file, then rename).

    Args:
        curves: {name: (recall list, precision list)}; each curve is drawn as a polyline in
            the given point order (e.g. by descending threshold, as :func:`sweep` returns).
        path: output PNG path (parent directories are created).
        best_points: optional {name: (recall, precision)} marked with a circle and their F1 in
            the legend (e.g. the best-F1 operating point).
        size: image (width, height) in pixels.
        title: text above the plot.

    Raises:
        InputError: the PNG cannot be written.
    """
    best_points = best_points or {}
    width, height = size
    left, right, top, bottom = 70, 30, 40, 60
    plot_w, plot_h = width - left - right, height - top - bottom
    canvas = np.full((height, width, 3), 255, np.uint8)

    def to_px(recall, precision):
        r = np.clip(np.asarray(recall, np.float64), 0.0, 1.0)
        p = np.clip(np.asarray(precision, np.float64), 0.0, 1.0)
        return np.stack([left + r * plot_w, top + (1.0 - p) * plot_h], -1).round().astype(
            np.int32)

    for k in range(6):  # grid, ticks and tick labels every 0.2
        value = k / 5
        x, y = to_px(value, value)
        cv2.line(canvas, (int(x), top), (int(x), top + plot_h), (225, 225, 225), 1)
        cv2.line(canvas, (left, int(y)), (left + plot_w, int(y)), (225, 225, 225), 1)
        cv2.line(canvas, (int(x), top + plot_h), (int(x), top + plot_h + 5), (0, 0, 0), 1)
        cv2.line(canvas, (left - 5, int(y)), (left, int(y)), (0, 0, 0), 1)
        _text(canvas, f"{value:.1f}", (x, top + plot_h + 20), centre=True)
        _text(canvas, f"{value:.1f}", (left - 35, y + 5))
    cv2.rectangle(canvas, (left, top), (left + plot_w, top + plot_h), (0, 0, 0), 1)
    _text(canvas, "Recall", (left + plot_w // 2, height - 15), 0.55, centre=True)
    _text(canvas, "Precision", (8, top - 12), 0.55)
    _text(canvas, title, (left + plot_w // 2, top - 12), 0.55, centre=True)

    legend = []
    for k, (name, (recall, precision)) in enumerate(curves.items()):
        colour = COLOURS[k % len(COLOURS)]
        points = to_px(recall, precision).reshape(-1, 2)
        if len(points) == 1:
            cv2.circle(canvas, tuple(int(v) for v in points[0]), 3, colour, -1, cv2.LINE_AA)
        elif len(points):
            cv2.polylines(canvas, [points], False, colour, 2, cv2.LINE_AA)
        label = str(name)
        if name in best_points:
            r, p = (float(v) for v in best_points[name])
            f1 = 2 * p * r / (p + r) if p + r else 0.0
            centre = tuple(int(v) for v in to_px(r, p))
            cv2.circle(canvas, centre, 6, colour, 2, cv2.LINE_AA)
            label += f" (best F1 {f1:.3f})"
        legend.append((label, colour))

    if legend:  # lower-left corner of the plot, on a white box
        line_h = 20
        box_w = 40 + max(cv2.getTextSize(t, _FONT, 0.45, 1)[0][0] for t, _ in legend)
        x0, y1 = left + 10, top + plot_h - 10
        y0 = y1 - line_h * len(legend) - 8
        cv2.rectangle(canvas, (x0, y0), (x0 + box_w, y1), (255, 255, 255), -1)
        cv2.rectangle(canvas, (x0, y0), (x0 + box_w, y1), (160, 160, 160), 1)
        for k, (label, colour) in enumerate(legend):
            y = y0 + 4 + line_h * k + line_h // 2
            cv2.line(canvas, (x0 + 6, y), (x0 + 28, y), colour, 2, cv2.LINE_AA)
            _text(canvas, label, (x0 + 34, y + 5))

    path = Path(path)
    ok, data = cv2.imencode(".png", canvas)
    if not ok:
        raise InputError("cannot encode PNG", path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data.tobytes())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write plot ({err.strerror or err})", path) from None
