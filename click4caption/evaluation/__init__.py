"""Region-captioning benchmarks (Visual Genome, RefCOCOg) with ground-truth boxes.

- :mod:`~click4caption.evaluation.annotations`: the benchmark file layouts -> region records,
  with the reason for every region left out;
- :mod:`~click4caption.evaluation.regions`: the resumable, data-parallel captioning loop;
- :mod:`~click4caption.evaluation.metrics`: pycocoevalcap scores (BLEU-4, METEOR, ROUGE-L, CIDEr);
- :mod:`~click4caption.evaluation.benchmark`: one run, from annotations to ``scores.json``.

Nothing here imports torch at import time; the apps check their arguments first.
"""
