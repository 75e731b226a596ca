"""The click-to-caption Gradio demo behind ``demo.py``: Describe and QA modes.

- :mod:`.canvas`: drawing and click geometry (pure; no gradio, no torch);
- :mod:`.session`: one browser session's state and the two-click state machine;
- :mod:`.model`: :class:`LockedCaptioner`, the one captioner every session shares;
- :mod:`.handlers`: :class:`DemoHandlers`, one method per event and the API endpoints;
- :mod:`.layout`: :func:`build_app`, the components and their wiring.

The example scenes live with the shapes world (:mod:`click4caption.shapes.examples`).
What ``demo.py`` needs is re-exported here, imported on first use so that importing
:mod:`.canvas` or :mod:`.session` loads neither gradio nor torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LockedCaptioner": "click4caption_apps.demo.model",
    "DemoHandlers": "click4caption_apps.demo.handlers",
    "build_app": "click4caption_apps.demo.layout",
    "CSS": "click4caption_apps.demo.layout",
    "load_example_scenes": "click4caption.shapes.examples",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
