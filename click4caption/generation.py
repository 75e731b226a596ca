"""Generation settings: every default of decoding in one place.

Import-light (no torch), so the apps take their option defaults from here before the
slow imports.
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """How replies are decoded. Every default of generation lives here.

    ``temperature`` 0 decodes greedily (or with beams), so answers repeat; above 0 it
    samples with ``top_p`` (upstream always sampled, at temperature 1.0, top-p 0.9).
    ``max_length`` caps the context (the oldest tokens are dropped, with a warning), as
    upstream's ``max_length=2000``. ``batch_size``: conversations generated together;
    a batch that runs out of GPU memory is split and retried.
    """

    num_beams: int = 1
    temperature: float = 0.0
    top_p: float = 0.9
    max_new_tokens: int = 300
    max_length: int = 2000
    min_length: int = 1
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    batch_size: int = 16

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def generate_kwargs(self) -> dict[str, Any]:
        """The matching keyword arguments of ``generate``."""
        kwargs: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                                      min_length=self.min_length, repetition_penalty=self.repetition_penalty,
                                      length_penalty=self.length_penalty, do_sample=self.do_sample)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def replace(self, **changes: Any) -> "GenerationSettings":
        return dataclasses.replace(self, **changes)
