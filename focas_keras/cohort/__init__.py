"""Batch inference over a cohort of slides on Apache Beam (``focas-keras cohort``).

A slide is planned on one worker (tissue map, domain checks, its tiles:
:func:`~focas_keras.inference.engine.plan_tiles`), its tiles fan out as separate elements, so
one large slide spreads over every worker; each tile is read where it lands
(:func:`~focas_keras.inference.engine.read_tile`) and run in Beam's ``RunInference`` by a
``ModelHandler`` that loads the cascade once per worker process
(:func:`~focas_keras.inference.load_cascade`), in batches of Beam's ``BatchElements``; the
records are grouped by slide, assembled (:func:`~focas_keras.inference.engine.assemble`) and
written by :func:`~focas_keras.slides.run.finish_slide`, as ``focas-keras slide`` writes them.

Modules: :mod:`.sources` (slide lists, manifests, remote files), :mod:`.work` (what one step
does to one slide or tile, no Beam), :mod:`.store` (output directories and tables, atomic),
:mod:`.pipeline` (the Beam graph and :func:`~focas_keras.cohort.pipeline.run_cohort`). Only
:mod:`.pipeline` imports Apache Beam (the ``beam`` extra); importing this package or the other
modules does not (remote paths import Beam's ``FileSystems`` when they are used).
"""
