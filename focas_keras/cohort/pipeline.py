"""The cohort as an Apache Beam pipeline, and :func:`run_cohort`, which runs it.

Graph (one element per slide until ``Plan``, one per tile until ``Group``)::

    slides -> Spread slides -> Plan -+-> tiles -> Spread tiles -> Read -> RunInference -+
                                     |                            '-> unreadable -------+
                                     +-> planned slides --------------------------------+-> Group
                                     '-> rows of complete slides, failures -+             by slide
                                                                            |               |
                                     Tables (slides.csv, failures.csv) <----+------ Finish -'

Imports Apache Beam (the ``beam`` extra) at module level: import it only where Beam is
installed (``focas-keras cohort`` says how to install it when it is not).
"""

from __future__ import annotations

import collections
import os

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler, RunInference

from focas_keras.cohort import sources, store, work
from focas_keras.errors import InputError

#: Open slides a reading worker keeps (least recently used closed first).
OPEN_READERS = 4


def _failure(source: str, error) -> dict:
    from focas_keras.slides.batch import failed_row

    return failed_row(source, str(error).removeprefix(f"{source}: "))


class PlanSlide(beam.DoFn):
    """A slide path -> its tile tasks (main output), its :class:`~focas_keras.cohort.work.
    SlideWork` keyed by name (``slides``), or its row (``rows``: complete already, or failed)."""

    def __init__(self, job: work.CohortJob):
        self.job = job

    def process(self, source):
        from focas_keras.slides.reader import SlideReadError

        try:
            planned = work.plan_slide(self.job, source)
        except (InputError, SlideReadError) as error:
            yield beam.pvalue.TaggedOutput("rows", _failure(source, error))
            return
        if planned[0] == "done":
            yield beam.pvalue.TaggedOutput("rows", planned[1])
            return
        _, slide_work, tasks = planned
        yield beam.pvalue.TaggedOutput("slides", (slide_work.slide, slide_work))
        yield from tasks


class ReadTile(beam.DoFn):
    """A tile task -> ``(task, pixels, region, origin, seconds)``; a tile that cannot be read
    (twice) -> ``(slide, (unreadable record, seconds))`` on ``unreadable``.

    Reads ahead as ``slide`` does: each task's read starts on a reading thread as soon as the
    task arrives, and a read tile is handed on only once ``prefetch`` later reads are queued,
    so the cascade runs on one tile while the next ones are read (the slide libraries and the
    cascade release the GIL). The rest are handed on at the end of the bundle.
    """

    def __init__(self, job: work.CohortJob, prefetch: int = 2):
        self.job, self.prefetch = job, int(prefetch)

    def setup(self):
        from concurrent.futures import ThreadPoolExecutor

        self._readers = collections.OrderedDict()
        # One thread: the readers (OpenSlide handles) are only ever touched by it.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-tile")

    def start_bundle(self):
        self._pending = collections.deque()

    def _reader(self, source: str):
        if source in self._readers:
            self._readers.move_to_end(source)
            return self._readers[source]
        while len(self._readers) >= OPEN_READERS:
            self._readers.popitem(last=False)[1].close()
        self._readers[source] = sources.open_source(source, self.job.mpp)
        return self._readers[source]

    def _read(self, task):
        from focas_keras.slides.reader import SlideReadError

        try:
            return (task, *work.read_task(self._reader(task.source), task))
        except (SlideReadError, InputError) as error:
            self._readers.pop(task.source, None)
            return beam.pvalue.TaggedOutput(
                "unreadable", (task.slide, (work.unreadable_record(task, error), 0.0)))

    def process(self, task):
        self._pending.append(self._pool.submit(self._read, task))
        while len(self._pending) > self.prefetch:
            yield self._pending.popleft().result()

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindows

        while self._pending:  # outside process(), Beam needs each output's window
            out = self._pending.popleft().result()
            if isinstance(out, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(out.tag, GlobalWindows.windowed_value(out.value))
            else:
                yield GlobalWindows.windowed_value(out)

    def teardown(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
        for reader in getattr(self, "_readers", {}).values():
            reader.close()


class CascadeHandler(ModelHandler):
    """``RunInference``'s model: the cascade of :func:`~focas_keras.inference.load_cascade`
    with the job's arguments, loaded once per worker process; a batch is read tiles
    (:func:`~focas_keras.cohort.work.run_batch`)."""

    def __init__(self, job: work.CohortJob):
        super().__init__(min_batch_size=1, max_batch_size=job.batch_size)
        self.job = job

    def load_model(self):
        return work.cascade_for(self.job)

    def run_inference(self, batch, model, inference_args=None):
        return work.run_batch(model, batch)

    def get_num_bytes(self, batch) -> int:
        return sum(int(item[1].nbytes + item[2].nbytes) for item in batch)

    def get_metrics_namespace(self) -> str:
        return "focas_keras_cohort"


class FinishSlide(beam.DoFn):
    """``(slide, {"slide": [SlideWork], "tiles": [(record, seconds), ...]})`` -> its row."""

    def __init__(self, job: work.CohortJob):
        self.job = job

    def process(self, grouped):
        from focas_keras.slides.reader import SlideReadError

        _, parts = grouped
        (slide_work,) = list(parts["slide"])
        try:
            yield work.finish_work(self.job, slide_work, list(parts["tiles"]))
        except (InputError, SlideReadError) as error:
            yield _failure(slide_work.source, error)


def _write_tables(rows, out: str, order: dict) -> int:
    rows = sorted(rows, key=lambda r: order.get(r["path"], len(order)))
    store.write_tables(out, rows)
    return len(rows)


def build(pipeline, job: work.CohortJob, slide_sources: list[str]):
    """Adds the cohort's transforms to ``pipeline``; returns the PCollection of its rows."""
    planned = (pipeline
               | "Slides" >> beam.Create(slide_sources)
               | "Spread slides" >> beam.Reshuffle()
               | "Plan" >> beam.ParDo(PlanSlide(job)).with_outputs("slides", "rows",
                                                                   main="tiles"))
    read = (planned.tiles
            | "Spread tiles" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(ReadTile(job)).with_outputs("unreadable", main="read"))
    ran = read.read | "Cascade" >> RunInference(CascadeHandler(job))
    records = (ran, read.unreadable) | "Records" >> beam.Flatten()
    finished = ({"slide": planned.slides, "tiles": records}
                | "Group by slide" >> beam.CoGroupByKey()
                | "Finish" >> beam.ParDo(FinishSlide(job)))
    rows = (planned.rows, finished) | "Rows" >> beam.Flatten()
    order = {source: i for i, source in enumerate(slide_sources)}
    (rows
     | "All rows" >> beam.combiners.ToList()
     | "Tables" >> beam.Map(_write_tables, job.out, order))
    return rows


def pipeline_options(runner: str, args=(), workers: int | None = None):
    """Beam's options from ``--runner`` and the passed-through ``--name=value`` arguments; the
    DirectRunner runs ``multi_processing`` on ``workers`` processes (default: the CPU count),
    its workers logging warnings only, unless the arguments choose otherwise."""
    from apache_beam.options.pipeline_options import PipelineOptions

    args = list(args)
    if runner in ("DirectRunner", "direct"):
        if not any(a.startswith("--direct_running_mode") for a in args):
            args.append("--direct_running_mode=multi_processing")
        if not any(a.startswith("--direct_num_workers") for a in args):
            args.append(f"--direct_num_workers={workers or os.cpu_count() or 1}")
        if not any(a.startswith("--default_sdk_harness_log_level") for a in args):
            args.append("--default_sdk_harness_log_level=WARNING")  # not each bundle's INFO
    return PipelineOptions([f"--runner={runner}", *args])


def run_cohort(slide_sources, job: work.CohortJob, runner: str = "DirectRunner",
               args=(), workers: int | None = None) -> list[dict]:
    """Runs the cohort to the end; returns its ``slides.csv`` rows (input order).

    Args:
        slide_sources: slide paths/URIs (manifests already expanded:
            :func:`~focas_keras.cohort.sources.expand_sources`).
        job: the :class:`~focas_keras.cohort.work.CohortJob`.
        runner: a Beam runner name.
        args: further Beam pipeline options (``--name=value``).
        workers: DirectRunner worker processes.
    """
    import io

    import pandas as pd

    slide_sources = list(slide_sources)
    with beam.Pipeline(options=pipeline_options(runner, args, workers)) as pipeline:
        build(pipeline, job, slide_sources)
    text = store.read_text(sources.join(job.out, store.SLIDES_TABLE))
    if text is None:
        raise InputError(f"the pipeline ended without writing {store.SLIDES_TABLE}", job.out)
    table = pd.read_csv(io.StringIO(text), keep_default_na=False)
    return table.to_dict("records")
