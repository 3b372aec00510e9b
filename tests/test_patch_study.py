"""Patch-size study: stage 2 rerun per crop size on the same candidates."""

import cv2
import numpy as np

from focas_keras.evaluation.patch_study import patch_size_study
from focas_keras.inference.cascade import Cascade, CascadeSettings
from focas_keras.models.mclass_config import preset as cls_preset
from focas_keras.models.mdet_config import preset as det_preset


class _Fake(Cascade):
    """Stage 1: two fixed candidates. Stage 2: accepts crops whose centre pixel is dark and
    whose mean is dark enough, so acceptance depends on the crop size."""

    def __init__(self):
        super().__init__(None, det_preset("tiny"), None, cls_preset("tiny"),
                         CascadeSettings(cls_threshold=0.5))

    def detect_resized(self, image):
        return (np.array([[40, 40, 60, 60], [140, 140, 160, 160]], np.float32),
                np.array([0.9, 0.8], np.float32))

    def classify_patches(self, patches):
        return (patches.reshape(len(patches), -1).mean(axis=1) < 128).astype(np.float32)


def test_patch_size_changes_stage2_on_the_same_candidates(tmp_path):
    image = np.full((200, 200, 3), 255, np.uint8)
    image[25:75, 25:75] = 0      # a 50 px dark object at (50, 50)
    image[143:157, 143:157] = 0  # a 14 px dark object at (150, 150)
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), image)
    rows = patch_size_study(_Fake(), [path], {"img": np.array([[50.0, 50.0]])},
                            sizes=(16, 64))
    by_size = {row["patch"]: row for row in rows}
    # 16 px crops: both candidates dark -> 1 TP, 1 FP. 64 px crops: only the big object.
    assert (by_size[16]["tp"], by_size[16]["fp"], by_size[16]["fn"]) == (1, 1, 0)
    assert (by_size[64]["tp"], by_size[64]["fp"], by_size[64]["fn"]) == (1, 0, 0)
