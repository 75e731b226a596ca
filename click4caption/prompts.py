"""The prompt format: the ``[IMG]`` placeholder, the Vicuna v0 conversation template, the
Describe question, reply extraction, and the text pieces training builds from it.

Import-light on purpose (no torch, no transformers), so that the apps can validate what a
user typed before loading anything heavy, and so that the model and the chat engine share
one template without importing each other.

Prompt format (exactly upstream's): system ``""`` then the separator (``###``, the model's
``end_sym``); each finished turn is ``" " + role + ": " + message + "\\n" + sep``; the open
assistant turn is ``" Assistant:"``. One question gives
``"### Human: image[IMG] What is it?\\n### Assistant:"``.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

from click4caption.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

IMG_TOKEN = "[IMG]"
DESCRIBE_QUESTION = "Tell me what it is and write a description for it."
DESCRIBE_PROMPT = "image" + IMG_TOKEN + " " + DESCRIBE_QUESTION
#: the conversation separator and the stop of generation (``model.end_sym``'s default)
DEFAULT_SEP = "###"
ROLES = ("Human", "Assistant")
#: where a training prompt (``model.prompt_path``) puts the image's soft tokens
PROMPT_IMAGE_PLACEHOLDER = "<ImageHere>"
#: role names accepted in region-instruction records (LLaVA style and ours)
HUMAN_ROLES = ("human", "user", ROLES[0])
GPT_ROLES = ("gpt", "assistant", ROLES[1])


def check_question(question: str, num_regions: int) -> str:
    """Non-empty, with exactly one ``[IMG]`` per region.

    Raises:
        InputError: otherwise.
    """
    if not isinstance(question, str) or not question.strip():
        raise InputError("the question is empty")
    count = question.count(IMG_TOKEN)
    if count != num_regions:
        raise InputError(f"the question has {count} {IMG_TOKEN} placeholder(s) but {num_regions} box(es) "
                         f"were given; use one {IMG_TOKEN} per box, e.g. 'image{IMG_TOKEN} What is it?'")
    return question


@dataclasses.dataclass
class Conversation:
    """Conversation history in the Vicuna v0 single-separator style."""

    system: str = ""
    roles: tuple[str, str] = ROLES
    messages: list[list[Any]] = dataclasses.field(default_factory=list)
    sep: str = DEFAULT_SEP

    def get_prompt(self) -> str:
        ret = self.system + self.sep
        for role, message in self.messages:
            if message:
                ret += " " + role + ": " + message + "\n" + self.sep
            else:
                ret += " " + role + ":"
        return ret

    def append_message(self, role: str, message: str | None) -> None:
        self.messages.append([role, message])

    def copy(self) -> "Conversation":
        return Conversation(self.system, self.roles, [list(m) for m in self.messages], self.sep)

    def num_placeholders(self) -> int:
        return sum((m or "").count(IMG_TOKEN) for _, m in self.messages)


def vicuna_v0(sep: str = DEFAULT_SEP) -> Conversation:
    """A fresh, empty conversation with upstream's ``CONV_VISION`` settings; ``sep`` is the
    model's ``end_sym``."""
    return Conversation(sep=sep)


def extract_reply(text: str, stop: str = DEFAULT_SEP, role: str = ROLES[1]) -> str:
    """Generated text -> reply: the text before the stop sequence, after the last
    ``Assistant:``, stripped."""
    return text.split(stop)[0].split(role + ":")[-1].strip()


def conversation_pieces(turns: Sequence[dict[str, str]], sep: str = DEFAULT_SEP) -> list[tuple[str, bool]]:
    """A LLaVA-style conversation -> the template's text as ``(text, is_target)`` pieces.

    The text is exactly what :class:`Conversation` makes at inference, cut so that each
    assistant reply (``reply + "\\n" + sep``) is a target piece and everything before it
    (up to and including ``" Assistant:"``) is a context piece.

    Raises:
        InputError: an unknown role.
    """
    conv = vicuna_v0(sep)
    pieces: list[tuple[str, bool]] = []
    done = ""  # the template text already given out as pieces
    for turn in turns:
        role = turn["from"]
        if role in HUMAN_ROLES:
            conv.append_message(conv.roles[0], turn["value"])
        elif role in GPT_ROLES:
            conv.append_message(conv.roles[1], None)
            context = conv.get_prompt()
            conv.messages[-1][1] = turn["value"]
            full = conv.get_prompt()
            pieces.append((context[len(done):], False))
            pieces.append((full[len(context):].lstrip(" "), True))
            done = full
        else:
            raise InputError(f"unknown conversation role '{role}'")
    return pieces


def load_training_prompts(prompt_path: str, prompt_template: str) -> list[str]:
    """Upstream's ``prompt_path`` / ``prompt_template``: the lines of the file that contain
    ``<ImageHere>``, each formatted into the template (``template.format(line)``).

    Raises:
        ConfigError: the file is missing, has no such line, or the template has no ``{}``.
    """
    path = Path(prompt_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.prompt_path not found: {path}")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if PROMPT_IMAGE_PLACEHOLDER in line]
    if not lines:
        raise ConfigError(f"model.prompt_path {path} has no line containing {PROMPT_IMAGE_PLACEHOLDER}")
    template = prompt_template or "{}"
    try:
        prompts = [template.format(line) for line in lines]
    except (IndexError, KeyError, ValueError) as err:
        raise ConfigError(f"model.prompt_template {template!r} cannot be formatted with a prompt: {err}") from None
    bad = [p for p in prompts if p.count(PROMPT_IMAGE_PLACEHOLDER) != 1]
    if bad:
        raise ConfigError(f"model.prompt_template: a formatted prompt must hold {PROMPT_IMAGE_PLACEHOLDER} once, "
                          f"got {bad[0]!r}")
    logger.info("%d training prompts from %s, e.g. %r", len(prompts), path, prompts[0])
    return prompts
