"""The apps around the :mod:`click4caption` library: plumbing shared by ``demo.py``,
``inference.py``, ``train.py`` and ``evaluate.py`` (:mod:`.cli`), the Gradio demo, and the
recipe that rebuilds the shipped shapes model (:mod:`.shapes_recipe`). The library never
imports this package."""
