"""Mdet configuration: frozen dataclasses, named presets, JSON round trip, flag overrides."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from focas_keras.config_io import SectionedConfig, is_number
from focas_keras.errors import InputError

HEADS = ("anchor", "free", "hybrid")


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """ResNet backbone: depth 18/34/50/101, ``bn``/``gn`` norm, WS, CBAM, width multiplier."""

    depth: int = 50
    norm: str = "gn"
    ws: bool = True
    cbam: bool = True
    width: float = 1.0
    resnext: bool = False


@dataclasses.dataclass(frozen=True)
class FPNConfig:
    """Feature pyramid: channels and the range of output levels."""

    channels: int = 256
    min_level: int = 3
    max_level: int = 7


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """Hybrid head and its losses.

    ``base_sizes`` gives one anchor base size per FPN level (P3 first); with scales 2^0, 2^(1/3),
    2^(2/3) the defaults span 24-38 px at P3 and 48-76 px at P4, which covers ICPR 2012 mitoses
    (26-68 px at 0.2456 um/px) and 40 px centroid boxes with IoU >= 0.5.
    """

    head: str = "hybrid"
    tower_depth: int = 4
    prior_prob: float = 0.01
    base_sizes: tuple = (24, 48, 96, 192, 384)
    scales: tuple = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
    ratios: tuple = (0.5, 1.0, 2.0)
    pos_iou: float = 0.5
    neg_iou: float = 0.4
    box_loss: str = "smooth_l1"
    alpha: float = 0.25
    gamma: float = 2.0
    free_weight: float = 0.5
    effective: float = 0.2
    ignore: float = 0.5


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation: optimizer, schedule (linear warm-up, step decay), clipping, precision."""

    optimizer: str = "sgd"
    learning_rate: float = 0.004
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 800
    decay_epochs: tuple = (16, 19)
    decay_factor: float = 0.1
    clip_norm: float = 10.0
    epochs: int = 20
    batch_size: int = 8
    steps_per_epoch: int = 0
    precision: str = "float32"
    augment: bool = True
    scale_jitter: float = 0.0
    stain_sigma: float = 0.05
    seed: int = 0
    max_boxes: int = 32
    #: share of the training tiles drawn from ``train-det --extra-data`` shards (0 without)
    extra_share: float = 0.0


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """Decoding: score threshold, top-k per level, class-agnostic NMS."""

    score_threshold: float = 0.05
    topk_per_level: int = 1000
    nms_iou: float = 0.5
    max_detections: int = 300
    match_radius_px: float = 20.0


@dataclasses.dataclass(frozen=True)
class MdetConfig(SectionedConfig):
    """Everything that defines an Mdet run; saved as ``config.json`` next to its checkpoints.

    ``to_dict``/``to_json``/``from_dict``/``override`` come from :class:`SectionedConfig`.
    """

    SECTIONS: ClassVar[dict] = {"backbone": BackboneConfig, "fpn": FPNConfig, "head": HeadConfig,
                                "train": TrainConfig, "inference": InferenceConfig}

    backbone: BackboneConfig = BackboneConfig()
    fpn: FPNConfig = FPNConfig()
    head: HeadConfig = HeadConfig()
    train: TrainConfig = TrainConfig()
    inference: InferenceConfig = InferenceConfig()
    input_size: int = 224

    @property
    def strides(self) -> tuple:
        return tuple(2 ** level for level in range(self.fpn.min_level, self.fpn.max_level + 1))

    def validate(self) -> "MdetConfig":
        """Raises InputError on inconsistent settings; returns self."""
        checks = [
            (self.backbone.depth in (18, 34, 50, 101), "backbone depth must be 18/34/50/101"),
            (self.backbone.norm in ("bn", "gn"), "norm must be bn or gn"),
            (self.head.head in HEADS, f"head must be one of {', '.join(HEADS)}"),
            (3 <= self.fpn.min_level <= 5 and self.fpn.max_level >= self.fpn.min_level,
             "FPN levels must start at 3..5 and not decrease"),
            (len(self.head.base_sizes) >= len(self.strides),
             "head.base_sizes needs one size per FPN level"),
            (self.head.box_loss in ("smooth_l1", "l1"), "box loss must be smooth_l1 or l1"),
            (self.train.optimizer in ("sgd", "adam", "adamw"), "optimizer must be sgd/adam/adamw"),
            (self.train.precision in ("float32", "mixed_bfloat16", "mixed_float16"),
             "precision must be float32, mixed_bfloat16 or mixed_float16"),
            (self.input_size % 32 == 0, "input size must be a multiple of 32"),
            (is_number(self.train.scale_jitter) and 0 <= self.train.scale_jitter < 1,
             f"train.scale_jitter must be in [0, 1), got {self.train.scale_jitter!r}"),
            (is_number(self.train.stain_sigma) and 0 <= self.train.stain_sigma < 1,
             f"train.stain_sigma must be in [0, 1), got {self.train.stain_sigma!r}"),
            (is_number(self.train.extra_share) and 0 <= self.train.extra_share < 1,
             f"train.extra_share must be in [0, 1), got {self.train.extra_share!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        return self


def preset(name: str) -> MdetConfig:
    """Named configurations.

    ``paper``: ResNet-50 + CBAM + GN/WS, FPN P3-P7 256, hybrid head, 224 px tiles, SGD lr 0.004
    momentum 0.9 wd 1e-4, 800 warm-up steps, decay x0.1 at epochs 16 and 19, clip 10, 20 epochs.
    ``tiny``: the same architecture family shrunk for a few CPU minutes (tests, demo).
    ``cpu``: sized for the whole-field recipe on a 2-core CPU: ResNet-18 at half width (CBAM,
    GN+WS), FPN P3-P5 with 64 channels, towers of 2, Adam lr 1e-3, 12 epochs (about 4x
    ``tiny``'s cost per step; see experiments/RESULTS.md for measured steps/s).
    ``cpu_full``: ``cpu`` at full ResNet-18 width with a 128-channel FPN (about 3x ``cpu``'s
    cost per step), the candidate for the largest model whose recipe fits 45 CPU minutes.
    """
    if name == "paper":
        return MdetConfig().validate()
    if name == "tiny":
        return MdetConfig(
            backbone=BackboneConfig(depth=18, norm="gn", ws=True, cbam=True, width=0.25),
            fpn=FPNConfig(channels=32, min_level=3, max_level=5),
            head=HeadConfig(tower_depth=2, base_sizes=(24, 48, 96)),
            train=TrainConfig(optimizer="adam", learning_rate=2e-3, weight_decay=0.0,
                              warmup_steps=20, decay_epochs=(), clip_norm=10.0, epochs=6,
                              batch_size=8),
        ).validate()
    if name == "cpu":
        return MdetConfig(
            backbone=BackboneConfig(depth=18, norm="gn", ws=True, cbam=True, width=0.5),
            fpn=FPNConfig(channels=64, min_level=3, max_level=5),
            head=HeadConfig(tower_depth=2, base_sizes=(24, 48, 96)),
            train=TrainConfig(optimizer="adam", learning_rate=1e-3, weight_decay=0.0,
                              warmup_steps=50, decay_epochs=(9,), clip_norm=10.0, epochs=12,
                              batch_size=8),
        ).validate()
    if name == "cpu_full":
        return preset("cpu").override(**{"backbone.width": 1.0, "fpn.channels": 128}).validate()
    raise InputError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})")


#: Names :func:`preset` knows.
PRESETS = ("paper", "tiny", "cpu", "cpu_full")
