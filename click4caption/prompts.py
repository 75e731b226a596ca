"""The user-facing prompt vocabulary: the ``[IMG]`` placeholder, the Describe question and
the check of a question against its regions.

Import-light on purpose (no torch, no transformers), so that the apps can validate what a
user typed before loading anything heavy. :mod:`click4caption.conversation` and
:mod:`click4caption.captioner` re-export these names.
"""
from __future__ import annotations

from click4caption.errors import InputError

IMG_TOKEN = "[IMG]"
DESCRIBE_QUESTION = "Tell me what it is and write a description for it."
DESCRIBE_PROMPT = "image" + IMG_TOKEN + " " + DESCRIBE_QUESTION


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
