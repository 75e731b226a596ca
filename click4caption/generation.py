"""Generation settings: every default of decoding in one place.

Import-light (no torch), so the apps take their option defaults from here before the
slow imports.
"""
from __future__ import annotations

import dataclasses
from typing import Any


def _setting(default: Any, help: str) -> Any:
    """A setting's default and its one-line help (the apps show it in ``--help``)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """How replies are decoded. Every default of generation lives here.

    ``temperature`` 0 decodes greedily (or with beams), so answers repeat; above 0 it
    samples with ``top_p`` (upstream always sampled, at temperature 1.0, top-p 0.9).
    ``max_length`` caps the context (the oldest tokens are dropped, with a warning), as
    upstream's ``max_length=2000``. ``batch_size``: conversations generated together;
    a batch that runs out of GPU memory is split and retried.
    """

    num_beams: int = _setting(1, "beams of beam search (1: greedy, or sampling with a temperature)")
    temperature: float = _setting(0.0, "0: greedy decoding (answers repeat); above 0: sampling at this temperature")
    top_p: float = _setting(0.9, "nucleus of sampling (upstream's 0.9)")
    max_new_tokens: int = _setting(300, "most tokens of one reply")
    max_length: int = _setting(2000, "context cap: the oldest tokens are dropped beyond it, with a warning")
    min_length: int = _setting(1, "fewest tokens of one reply")
    repetition_penalty: float = _setting(1.0, "1: none")
    length_penalty: float = _setting(1.0, "beam search's length penalty")
    batch_size: int = _setting(16, "questions generated together (a batch out of GPU memory is halved and retried)")

    @classmethod
    def help(cls, name: str) -> str:
        """The help line of a setting, with its default."""
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        return f"{f.metadata['help']} (default {f.default})"

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
