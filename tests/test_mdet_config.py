"""Mdet configs: presets, JSON round trip, overrides, validation."""

import json

import pytest

from focas_keras.errors import InputError
from focas_keras.models.mdet_config import MdetConfig, preset


def test_paper_preset_matches_the_published_recipe():
    cfg = preset("paper")
    assert (cfg.backbone.depth, cfg.backbone.norm, cfg.backbone.ws, cfg.backbone.cbam) == (
        50, "gn", True, True)
    assert cfg.fpn.channels == 256 and cfg.strides == (8, 16, 32, 64, 128)
    assert cfg.head.head == "hybrid" and cfg.input_size == 224
    t = cfg.train
    assert (t.optimizer, t.learning_rate, t.momentum, t.weight_decay, t.clip_norm, t.epochs) == (
        "sgd", 0.004, 0.9, 1e-4, 10.0, 20)
    assert t.warmup_steps == 800 and t.decay_epochs == (16, 19)


def test_json_round_trip_and_overrides():
    cfg = preset("tiny").override(**{"head.head": "free", "backbone.cbam": False,
                                     "train.epochs": 3, "fpn.max_level": 4})
    again = MdetConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    assert (again.head.head, again.backbone.cbam, again.train.epochs) == ("free", False, 3)
    assert again.strides == (8, 16)


def test_bad_overrides_and_values():
    with pytest.raises(InputError, match="unknown config field 'head.nope'"):
        preset("tiny").override(**{"head.nope": 1})
    with pytest.raises(InputError, match="head must be one of"):
        preset("tiny").override(**{"head.head": "two-stage"})
    with pytest.raises(InputError, match="unknown preset"):
        preset("huge")
    with pytest.raises(InputError, match="multiple of 32"):
        preset("tiny").override(input_size=100)


def test_scale_jitter_is_checked_in_both_configs_and_old_configs_load_without_it():
    from focas_keras.models import mclass_config

    assert preset("cpu").override(**{"train.scale_jitter": 0.2}).train.scale_jitter == 0.2
    for make in (preset, mclass_config.preset):
        with pytest.raises(InputError, match="train.scale_jitter must be in"):
            make("tiny").override(**{"train.scale_jitter": 1.5})
    data = json.loads(preset("tiny").to_json())
    del data["train"]["scale_jitter"]  # a run saved before the field existed
    assert MdetConfig.from_dict(data).train.scale_jitter == 0.0


def test_stain_sigma_is_checked_in_both_configs_and_old_configs_keep_the_old_jitter():
    from focas_keras.data.augment import AugmentConfig
    from focas_keras.models import mclass_config

    # The default is the augmentation's own default, so runs saved before the field existed
    # load with the jitter they were trained with.
    assert preset("cpu").train.stain_sigma == AugmentConfig().stain_sigma
    assert mclass_config.preset("cpu").train.stain_sigma == AugmentConfig().stain_sigma
    assert preset("cpu").override(**{"train.stain_sigma": 0.2}).train.stain_sigma == 0.2
    for make in (preset, mclass_config.preset):
        with pytest.raises(InputError, match="train.stain_sigma must be in"):
            make("tiny").override(**{"train.stain_sigma": 1.0})
        with pytest.raises(InputError, match="train.stain_sigma must be in"):
            make("tiny").override(**{"train.stain_sigma": -0.1})
    data = json.loads(preset("tiny").to_json())
    del data["train"]["stain_sigma"]
    assert MdetConfig.from_dict(data).train.stain_sigma == 0.05
