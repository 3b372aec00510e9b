"""The domain checks (focas_keras.domain): colour statistics, the bundled card's domain block,
pixel size, stain and density flags, and the qc column of counts.csv."""

import math

import numpy as np
import pandas as pd
import pytest

from focas_keras import domain, pretrained
from focas_keras.errors import InputError
from focas_keras.inference import outputs


def _rgb_of(concentrations):
    """uint8 RGB pixels of given (H, E, D) concentrations (N, 3), by the inverse model."""
    od = np.asarray(concentrations, np.float64) @ domain.RGB_FROM_HED
    return np.clip(np.round(256.0 * 10.0 ** (-od) - 1.0), 0, 255).astype(np.uint8)


def test_deconvolution_recovers_haematoxylin_and_eosin():
    rgb = _rgb_of([[0.8, 0.0, 0.0], [0.0, 0.5, 0.0], [0.4, 0.3, 0.0]])
    hed = domain.optical_density(rgb) @ domain.HED_FROM_RGB
    np.testing.assert_allclose(hed, [[0.8, 0, 0], [0, 0.5, 0], [0.4, 0.3, 0]], atol=0.01)
    assert domain.optical_density(np.array([255, 255, 255], np.uint8)) == pytest.approx(0.0)


def test_macenko_vectors_of_a_two_stain_image():
    rng = np.random.default_rng(0)
    conc = np.zeros((4000, 3))
    conc[:2000, 0] = rng.uniform(0.3, 1.2, 2000)  # pure haematoxylin
    conc[2000:, 1] = rng.uniform(0.3, 1.0, 2000)  # pure eosin
    conc[:, :2] += rng.uniform(0.0, 0.15, (4000, 2))  # some of the other in every pixel
    image = _rgb_of(conc).reshape(40, 100, 3)
    stats = domain.colour_stats(image)
    h_true, e_true = domain.RGB_FROM_HED[0], domain.RGB_FROM_HED[1]
    assert np.dot(stats["stain_h"], h_true) > 0.99
    assert np.dot(stats["stain_e"], e_true) > 0.99
    assert stats["tissue_fraction"] > 0.99  # the palest eosin falls under the OD floor
    assert stats["hed_mean"][0] == pytest.approx(conc[:, 0].mean(), abs=0.02)


def test_background_is_not_tissue():
    white = np.full((50, 50, 3), 245, np.uint8)
    stats = domain.colour_stats(white)
    assert stats["tissue_fraction"] == 0.0 and stats["hed_mean"] is None
    assert domain.feature_vector(stats) is None
    assert domain.check_stain(stats, _card())["distance"] is None


def _card(limit=2.0):
    return domain.DomainCard(stage_mpp={"mdet": 0.4912, "mclass": 0.2456},
                             validated_mpp=(0.2456,), features=domain.STAIN_FEATURES,
                             mean=tuple([0.5] * 9), spread=tuple([0.1] * 8 + [0.001]),
                             limit=limit, fields=15)


def test_stain_distance_is_rms_z_with_a_spread_floor():
    card = _card()
    stats = {"hed_mean": [0.7, 0.5, 0.5], "stain_h": [0.5] * 3, "stain_e": [0.5] * 3}
    # one statistic 2 spreads away, 8 at the mean: sqrt(4 / 9)
    assert domain.stain_distance(stats, card.mean, card.spread) == pytest.approx(2 / 3)
    stats["stain_e"] = [0.5, 0.5, 0.54]  # spread 0.001 floored to 0.02: z = 2
    assert domain.stain_distance(stats, card.mean, card.spread) == pytest.approx(
        math.sqrt(8 / 9))
    far = {"hed_mean": [1.5] * 3, "stain_h": [0.5] * 3, "stain_e": [0.5] * 3}
    check = domain.check_stain(far, card)
    assert check["flag"] and check["distance"] == pytest.approx(math.sqrt(300 / 9), abs=1e-3)
    assert domain.check_stain(far, None)["flag"] is False


def test_pixel_size_is_refused_when_coarser_unless_forced():
    assert domain.check_pixel_size(0.2456, 0.2456, "x", allow=False) is None
    assert domain.check_pixel_size(0.27, 0.2456, "x", allow=False) is None  # within 10 %
    assert domain.check_pixel_size(0.1, 0.2456, "x", allow=False) is None  # finer: shrunk
    with pytest.raises(InputError, match="--allow-coarser") as error:
        domain.check_pixel_size(0.499, 0.2456, "slide.svs", allow=False)
    assert str(error.value).startswith("slide.svs: the input is 0.499 um/px")
    assert "2.03x" in domain.check_pixel_size(0.499, 0.2456, "x", allow=True)
    assert domain.check_pixel_size(0.499, None, "x", allow=False) is None  # unknown model


def test_density_flag_needs_a_high_density_and_enough_mitoses():
    assert "133 per mm2" in domain.check_density(80, 0.6, "tissue")  # the skin slide
    assert domain.check_density(19, 0.262, "image") is None  # densest ICPR field, 72.5/mm2
    assert domain.check_density(9, 0.01, "image") is None  # too few to say
    assert domain.check_density(0, 0.0, "tissue") is None


def test_qc_block_and_text():
    qc = domain.qc_block(0.499, 0.2456, "too coarse", {"flag": True, "reason": "far"},
                         ["dense"], {domain.FLAG_SMALL_TISSUE: "small"})
    assert qc["flags"] == [domain.FLAG_COARSER, domain.FLAG_STAIN, domain.FLAG_DENSITY,
                           domain.FLAG_SMALL_TISSUE]
    assert len(qc["reasons"]) == 4 and qc["mpp"]["forced"]
    assert domain.qc_text(qc) == ("coarser_than_model;stain_outside_domain;"
                                  "implausible_density;tissue_smaller_than_window")
    clean = domain.qc_block(0.2456, 0.2456, None, {"flag": False}, [])
    assert domain.qc_text(clean) == "ok" and domain.qc_text(None) == "unchecked"


def test_model_finest_mpp_from_card_or_runs(tmp_path):
    assert domain.model_finest_mpp(pretrained.load_card()) == 0.2456
    det, cls = tmp_path / "det", tmp_path / "cls"
    det.mkdir()
    cls.mkdir()
    (det / "run.json").write_text('{"data_mpp": 0.4912}')
    assert domain.model_finest_mpp(None, det, cls) is None  # cls kept unknown pixels
    (cls / "run.json").write_text('{"data_mpp": 0.25}')
    assert domain.model_finest_mpp(None, det, cls) == 0.25


def test_bundled_card_domain_block_and_checksums():
    card = pretrained.load_card()
    pretrained.verify()  # the domain block leaves the model files' checksums valid
    block = domain.domain_of(card)
    assert block.stage_mpp == {"mdet": 0.4912, "mclass": 0.2456} and block.fields == 15
    assert block.features == domain.STAIN_FEATURES and len(block.mean) == 9
    # every held-out ICPR field passes (leave-one-slide-out distances stored with the card)
    assert max(card["domain"]["stain"]["loso_distances"].values()) < block.limit
    assert "Domain" in pretrained.card_markdown(card)
    with pytest.raises(InputError, match="malformed"):
        domain.DomainCard.from_dict({"stain": {}})


def test_sample_field_passes_and_a_recoloured_one_is_flagged():
    """The bundled real field is inside the card; the same field with its red and blue
    channels swapped (a crude 'other stain') is flagged; neither is dense enough to flag."""
    import cv2

    image = cv2.cvtColor(cv2.imread(str(pretrained.sample_field())), cv2.COLOR_BGR2RGB)
    card = domain.domain_of(pretrained.load_card())
    df = pd.DataFrame({"accepted": [True] * 19 + [False] * 30})
    qc = domain.image_qc(image, df, 0.2456, 0.2456, None, card)
    assert qc["flags"] == [] and qc["stain"]["distance"] < card.limit
    other = domain.image_qc(image[..., ::-1].copy(), df, 0.2456, 0.2456, None, card)
    assert other["flags"] == [domain.FLAG_STAIN] and other["stain"]["distance"] > card.limit


def test_counts_table_has_the_qc_column():
    df = pd.DataFrame({"accepted": [True, False]})
    qc = domain.qc_block(0.2456, 0.2456, None, {"flag": True, "reason": "far"}, [])
    rows = [outputs.count_row("a", df, 100, 100, 0.25, qc), outputs.count_row("b", df, 10, 10,
                                                                               0.25)]
    table = outputs.counts_table(rows)
    assert list(table.columns) == outputs.COUNT_COLUMNS
    assert list(table["qc"]) == ["stain_outside_domain", "unchecked"]


def test_detect_refuses_a_coarser_field_before_models_load(tmp_path):
    from click.testing import CliRunner

    from focas_keras.cli import main

    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["detect", str(pretrained.sample_field()), "--out",
                                       str(out), "--mpp", "0.5"])
    assert result.exit_code == 2, result.output
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("focas-keras: error: --mpp 0.5: the input is 0.5 um/px")
    assert "--allow-coarser" in error
    assert not (out.exists() and any(out.iterdir()))
