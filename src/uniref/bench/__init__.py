"""``uniref bench``: the field's benchmarks (OmniContext, MICo-Bench, GEdit-Bench, ImgEdit) and our scene
world, generated with :class:`~uniref.pipeline.EditPipeline`, judged by an OpenAI-compatible VLM (the MSGRPO
reward's client), scored with the published formulas.

* :mod:`~uniref.bench.rows` reads a benchmark as it is on disk; :mod:`~uniref.bench.suite` is what a
  benchmark is to the runner; :mod:`~uniref.bench.published` and :mod:`~uniref.bench.scenes` are the suites;
* :mod:`~uniref.bench.scores` holds the formulas; :mod:`~uniref.bench.cache` the judgement cache;
* :mod:`~uniref.bench.run` runs one; :mod:`~uniref.bench.report` writes report.md / .html / .json.
"""
