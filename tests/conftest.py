"""Shared fixtures: the real ICPR 2012 files in ../shared, and a tiny hand-made ICPR dataset."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import tensorflow as tf  # noqa: E402

# Two logical CPU devices, so MirroredStrategy can be tested in-process (must precede TF's
# device initialisation, hence here).
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

REPO = Path(__file__).resolve().parents[1]
ICPR = REPO.parent / "shared" / "data" / "icpr2012"


@pytest.fixture(scope="session")
def icpr_dir():
    """The 15 real ICPR 2012 HPFs (skipped where ../shared is absent, as for users)."""
    if not (ICPR / "images").is_dir():
        pytest.skip(f"real ICPR 2012 data not found at {ICPR}")
    return ICPR


def write_tiny_icpr(root, slides=("A00", "A01", "A02"), per_slide=2, size=320, seed=0):
    """Writes a tiny ICPR-layout dataset: pink background, dark square 'mitoses'.

    Every image gets two 24x20 px mitoses as full pixel lists, except the last image of each
    slide, which gets none (empty CSV). Returns {image_id: [(x1, y1, x2, y2), ...]}.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    truth = {}
    for slide in slides:
        for k in range(per_slide):
            image_id = f"{slide}_{k:02d}"
            image = np.empty((size, size, 3), np.uint8)
            image[:] = (235, 170, 200)
            image += rng.integers(0, 10, image.shape, dtype=np.uint8)
            lines, boxes = [], []
            if k < per_slide - 1:
                for x1, y1 in ((40 + 7 * k, 60), (200, 210 - 5 * k)):
                    x2, y2 = x1 + 24, y1 + 20
                    image[y1:y2, x1:x2] = (40, 20, 90)
                    ys, xs = np.mgrid[y1:y2, x1:x2]
                    pairs = np.stack([xs.ravel(), ys.ravel()], 1).ravel()
                    lines.append(",".join(str(v) for v in pairs))
                    boxes.append((x1, y1, x2, y2))
            cv2.imwrite(str(root / f"{image_id}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            (root / f"{image_id}.csv").write_text("\n".join(lines) + ("\n" if lines else ""))
            truth[image_id] = boxes
    return truth


@pytest.fixture()
def tiny_icpr(tmp_path):
    """(directory, truth boxes) of a tiny ICPR-layout dataset."""
    root = tmp_path / "tiny"
    return root, write_tiny_icpr(root)
