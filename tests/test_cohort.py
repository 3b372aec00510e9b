"""``cohort`` on Apache Beam's DirectRunner (multi_processing, 2 workers) equals ``slide``."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from focas_keras.cli import main  # noqa: E402
from focas_keras.datasets.slides import synthetic_slide, write_slide  # noqa: E402
from focas_keras.errors import InputError  # noqa: E402

MPP = 0.2456
ICPR = Path(__file__).resolve().parents[2] / "shared" / "data" / "icpr2012"
# 1088 px tiles: the mosaic (2112 Mdet px a side) in 2 x 2 tiles (half the pixels of 3 x 3
# tiles of 1024), the small slide in one
TILING = ["--tile", "1088", "--overlap", "64"]
FILES = ("detections.csv", "detections.geojson", "summary.json", "tissue_mask.png",
         "thumbnail.png", "tiles.jsonl")


def _synthetic(path, seed=5):
    """A small slide (1 stage-1 tile): dark round blobs on pink tissue, white margin."""
    rng = np.random.default_rng(seed)
    image = np.full((1100, 1400, 3), 255, np.uint8)
    image[60:1040, 80:1100] = (222, 160, 205)
    image[60:1040, 80:1100] += rng.integers(0, 12, (980, 1020, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:1100, :1400]
    for y, x in rng.integers((120, 140), (980, 1040), (14, 2)):
        image[(yy - y) ** 2 + (xx - x) ** 2 < 13 ** 2] = (70, 35, 110)
    write_slide(path, image, MPP)
    return path


def _mosaic(path):
    """The four real ICPR fields of test_slide_run's mosaic."""
    from focas_keras.datasets.annotations import load_image

    names = ["A00_00", "A01_04", "A02_00", "A04_03"]
    step = 2112
    fields = [load_image(ICPR / "images" / f"{n}.jpg") for n in names]
    origins = [(0, 0), (0, step), (step, 0), (step, step)]
    write_slide(path, synthetic_slide(2 * step, 2 * step,
                                      [(y, x, f) for (y, x), f in zip(origins, fields)]), MPP)
    return path


@pytest.fixture(scope="module")
def cohort_run(tmp_path_factory):
    pytest.importorskip("apache_beam")
    root = tmp_path_factory.mktemp("cohort")
    slides = [_synthetic(root / "small.svs")]
    if (ICPR / "images").is_dir():
        slides.insert(0, _mosaic(root / "mosaic.svs"))
    else:
        slides.append(_synthetic(root / "small2.svs", seed=6))
    broken = root / "broken.svs"
    broken.write_bytes(b"II*\x00" + b"\x00" * 200)
    manifest = root / "cohort.txt"
    manifest.write_text("# the cohort\n" + "\n".join(p.name for p in slides) + "\nbroken.svs\n")
    result = CliRunner().invoke(main, ["cohort", str(manifest), "--out", str(root / "beam"),
                                       *TILING, "--workers", "2", "--batch-size", "2"])
    return root, slides, broken, result


def test_cohort_equals_slide_and_lists_the_broken_file(cohort_run):
    root, slides, broken, result = cohort_run
    assert result.exit_code == 1, result.output  # one slide failed, the others finished
    ran = CliRunner().invoke(main, ["slide", *map(str, slides), str(broken), *TILING, "--out",
                                    str(root / "slide")])
    assert ran.exit_code == 1, ran.output
    for path in slides:
        beam_dir, slide_dir = root / "beam" / path.stem, root / "slide" / path.stem
        assert sorted(p.name for p in beam_dir.iterdir()) == sorted(FILES)
        got = pd.read_csv(beam_dir / "detections.csv")
        want = pd.read_csv(slide_dir / "detections.csv")
        assert list(got.columns) == list(want.columns) and len(got) == len(want)
        numeric = got.select_dtypes("number").columns
        np.testing.assert_allclose(got[numeric].to_numpy(), want[numeric].to_numpy(),
                                   atol=1e-5)
        assert got.drop(columns=numeric).equals(want.drop(columns=numeric))
        summaries = [json.loads((d / "summary.json").read_text()) for d in (beam_dir, slide_dir)]
        for summary in summaries:
            summary.pop("seconds")
        assert summaries[0] == summaries[1]
        assert summaries[0]["tiles"]["processed"] >= 1
    table = pd.read_csv(root / "beam" / "slides.csv", dtype=str, keep_default_na=False)
    assert list(table["slide"]) == [p.stem for p in slides] + ["broken"]
    assert list(table["status"]) == ["done"] * len(slides) + ["failed"]
    slide_table = pd.read_csv(root / "slide" / "slides.csv", dtype=str, keep_default_na=False)
    same = [c for c in slide_table.columns if c != "seconds"]  # failed row included
    assert (table[same].sort_values("slide").to_dict("records")
            == slide_table[same].sort_values("slide").to_dict("records"))
    failures = pd.read_csv(root / "beam" / "failures.csv")
    assert list(failures.columns) == ["slide", "path", "reason"]
    assert list(failures["path"]) == [str(broken)] and failures["reason"].iloc[0]


def test_rerun_skips_complete_slides(cohort_run):
    root, slides, _, _ = cohort_run
    before = {p.stem: (root / "beam" / p.stem / "summary.json").stat().st_mtime_ns
              for p in slides}
    result = CliRunner().invoke(main, ["cohort", *map(str, slides), "--out",
                                       str(root / "beam"), *TILING, "--workers", "1"])
    assert result.exit_code == 0, result.output
    after = {p.stem: (root / "beam" / p.stem / "summary.json").stat().st_mtime_ns
             for p in slides}
    assert after == before
    table = pd.read_csv(root / "beam" / "slides.csv", keep_default_na=False)
    assert list(table["status"]) == ["done"] * len(slides)


def test_manifest_and_names(tmp_path):
    from focas_keras.cohort.sources import expand_sources

    (tmp_path / "list.csv").write_text("id,path\n1,a.svs\n2,/data/b.ndpi\n")
    assert expand_sources([str(tmp_path / "list.csv"), "gs://bucket/c.svs"]) == [
        str(tmp_path / "a.svs"), "/data/b.ndpi", "gs://bucket/c.svs"]
    (tmp_path / "bad.csv").write_text("id,name\n1,a.svs\n")
    with pytest.raises(InputError, match="no slide column"):
        expand_sources([str(tmp_path / "bad.csv")])
    with pytest.raises(InputError, match="two slides named 'a'"):
        expand_sources(["x/a.svs", "y/a.tif"])


def _fake_job(out, cascade, **job):
    """A CohortJob whose cascade is ``cascade`` (put in the per-process cache)."""
    from focas_keras.cohort import work
    from focas_keras.slides.run import SlideSettings

    settings = job.pop("settings", SlideSettings(tile=256, overlap=32))
    job = work.CohortJob(out=str(out), load=(("fake", id(cascade)),), settings=settings, **job)
    work._CASCADES[job.load] = cascade
    return job


def _run_steps(job, source):
    """The pipeline's steps on one slide, in this process (no Beam)."""
    from focas_keras.cohort import sources, work

    planned = work.plan_slide(job, source)
    if planned[0] == "done":
        return planned, 0
    _, slide_work, tasks = planned
    with sources.open_source(source) as reader:
        batch = [(t, *work.read_task(reader, t)) for t in tasks]
    results = [r for _, r in work.run_batch(work.cascade_for(job), batch)] if batch else []
    return ("finished", work.finish_work(job, slide_work, results)), len(tasks)


def test_steps_equal_slide_then_skip_resume_and_refuse(tmp_path):
    """Without Beam or the real model: plan, read, run, finish equal run_slide's outputs; a
    rerun skips the slide; a journal of the same run resumes; another run's is refused."""
    import dataclasses

    from test_slide_run import _fake, _slide, _tissue_image

    from focas_keras.slides.reader import SlideReader
    from focas_keras.slides.run import SlideSettings, run_slide

    cascade = _fake()
    cascade.model_key = {"det": "d", "cls": "c"}
    source = str(_slide(tmp_path, _tissue_image(), name="s"))
    settings = SlideSettings(tile=256, overlap=32)
    with SlideReader.open(source) as reader:
        want = run_slide(cascade, reader, tmp_path / "slide" / "s", settings,
                         model=cascade.model_key, progress=False)
    job = _fake_job(tmp_path / "beam", cascade, settings=settings)
    (kind, row), ran = _run_steps(job, source)
    assert kind == "finished" and ran == want["tiles"]["processed"] == 16
    for name in FILES:
        got, ref = (tmp_path / d / "s" / name for d in ("beam", "slide"))
        if name == "summary.json":
            a, b = json.loads(got.read_text()), json.loads(ref.read_text())
            a.pop("seconds"), b.pop("seconds")
            assert a == b
        elif name == "tiles.jsonl":  # same header and records (in plan order here)
            key = lambda r: (r.get("cell") is not None, r.get("cell"))  # noqa: E731
            rows = [sorted(map(json.loads, p.read_text().splitlines()), key=key)
                    for p in (got, ref)]
            assert rows[0] == rows[1]
        else:
            assert got.read_bytes() == ref.read_bytes(), name
    assert row["mitoses"] == want["mitoses"] and row["status"] == "done"
    # rerun: complete for this run, skipped
    (kind, row), ran = _run_steps(job, source)
    assert kind == "done" and ran == 0 and row["mitoses"] == want["mitoses"]
    # an interrupted run (journal, no summary): only the missing tiles run
    journal = tmp_path / "beam" / "s" / "tiles.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:10])  # a torn last line
    (tmp_path / "beam" / "s" / "summary.json").unlink()
    (kind, row), ran = _run_steps(job, source)
    assert kind == "finished" and 0 < ran <= 3 and row["mitoses"] == want["mitoses"]
    # another run's tiles: refused, unless overwrite
    other = _fake_job(tmp_path / "beam", cascade,
                      settings=dataclasses.replace(settings, overlap=0))
    with pytest.raises(InputError, match="another run"):
        _run_steps(other, source)
    (kind, row), ran = _run_steps(dataclasses.replace(other, overwrite=True), source)
    assert kind == "finished" and row["status"] == "done"


def test_remote_slide_and_output_through_beam_filesystems(tmp_path):
    """A slide and an --out behind a URI (a test filesystem registered with Beam's
    FileSystems): fetched to local disk, its outputs uploaded, the rerun read back remotely."""
    pytest.importorskip("apache_beam")
    from apache_beam.io.localfilesystem import LocalFileSystem

    from test_slide_run import _fake, _slide, _tissue_image

    from focas_keras.cohort import sources

    class PrefixFileSystem(LocalFileSystem):  # cohorttest:///abs/path -> /abs/path
        @classmethod
        def scheme(cls):
            return "cohorttest"

        @staticmethod
        def _local(path):
            return path[len("cohorttest://"):]

        def open(self, path, *args, **kwargs):
            return super().open(self._local(path), *args, **kwargs)

        def create(self, path, *args, **kwargs):
            return super().create(self._local(path), *args, **kwargs)

        def exists(self, path):
            return super().exists(self._local(path))

        def delete(self, paths):
            return super().delete([self._local(p) for p in paths])

        def rename(self, sources_, destinations):
            return super().rename([self._local(p) for p in sources_],
                                  [self._local(p) for p in destinations])

    cascade = _fake()
    cascade.model_key = {"det": "d", "cls": "c"}
    local = _slide(tmp_path, _tissue_image(), name="r")
    uri = f"cohorttest://{local}"
    (tmp_path / "out").mkdir()
    job = _fake_job(f"cohorttest://{tmp_path / 'out'}", cascade)
    with sources.open_source(uri) as reader:
        assert reader.path == uri and reader.name == "r"
        assert sources.fetch(uri) != str(local)  # a local copy
    (kind, row), ran = _run_steps(job, uri)
    assert kind == "finished" and ran > 0 and row["path"] == uri
    written = sorted(p.name for p in (tmp_path / "out" / "r").iterdir())
    assert written == sorted(FILES)
    assert json.loads((tmp_path / "out" / "r" / "summary.json").read_text())["path"] == uri
    (kind, row), ran = _run_steps(job, uri)
    assert kind == "done" and ran == 0


def test_read_tile_reads_ahead_and_hands_on_every_task(tmp_path):
    """ReadTile keeps ``prefetch`` reads queued and hands every task on, in order: read tiles
    equal read_task's pixels, and a task of an unreadable slide goes to ``unreadable``, both
    from process() and from finish_bundle() (windowed there, as Beam requires)."""
    pytest.importorskip("apache_beam")
    import dataclasses

    from apache_beam.pvalue import TaggedOutput
    from apache_beam.utils.windowed_value import WindowedValue
    from test_slide_run import _fake, _slide, _tissue_image

    from focas_keras.cohort import sources, work
    from focas_keras.cohort.pipeline import ReadTile

    cascade = _fake()
    cascade.model_key = {"det": "d", "cls": "c"}
    source = str(_slide(tmp_path, _tissue_image(), name="s"))
    job = _fake_job(tmp_path / "beam", cascade)
    _, _, tasks = work.plan_slide(job, source)
    missing = dataclasses.replace(tasks[0], source=str(tmp_path / "gone.svs"))
    order = tasks[:5] + [missing] + tasks[5:7] + [missing]
    fn = ReadTile(job, prefetch=2)
    fn.setup()
    fn.start_bundle()
    handed, during = [], []
    for task in order:
        out = list(fn.process(task))
        during.append(len(out))
        handed += out
    assert during[:2] == [0, 0] and during[2:] == [1] * (len(order) - 2)
    last = list(fn.finish_bundle())
    fn.teardown()
    assert len(last) == 2
    assert isinstance(last[-1], TaggedOutput) and isinstance(last[-1].value, WindowedValue)
    handed += [TaggedOutput(o.tag, o.value.value) if isinstance(o, TaggedOutput) else o.value
               for o in last]
    assert len(handed) == len(order)
    with sources.open_source(source) as reader:
        for task, out in zip(order, handed):
            if task is missing:
                assert out.tag == "unreadable"
                slide, (record, _) = out.value
                assert slide == task.slide and record["status"] == "unreadable"
                assert record["cell"] == list(task.cell)
                continue
            assert out[0] == task
            pixels, region, origin, _ = work.read_task(reader, task)
            np.testing.assert_array_equal(out[1], pixels)
            np.testing.assert_array_equal(out[2], region)
            assert out[3] == origin
