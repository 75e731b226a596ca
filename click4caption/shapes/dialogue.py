"""Multi-turn conversations about the regions of one shapes scene.

The spec's questions (design/shapes_world.md) each bring their own regions
(``image[IMG] What color is it?``). In the demo a conversation goes on: after a region
was described, or after two regions were asked about, a user types a text-only
follow-up about a region already in the conversation. This module is the language of
those conversations, shared by the training data (``writers``) and the evaluation
(``scoring``):

- Regions are named as the demo names them when it inserts the placeholders
  (:func:`click4caption_apps.demo.session.prepare_question`): ``image`` when the conversation
  holds a single region, else ``image N`` with N counted over the whole conversation.
- A follow-up names no new region and refers back with ``it`` (the one region of the
  last turn), ``they`` (the two regions of the last turn), ``image N`` (the N-th region
  of the conversation) or ``the first one`` / ``the second one`` (when the
  conversation holds exactly two regions).
- Answers keep the spec's format: ``Red.``, ``Circle.``, ``Large.``, ``Yes.`` / ``No.``.
"""

from __future__ import annotations

from click4caption.shapes.world import COUNT_WORDS, IMG_PLACEHOLDER, PAIR_QUESTIONS, SINGLE_QUESTIONS

#: attribute -> follow-up question about ``ref`` ("it", "image 2", "the first one", ...)
ATTRIBUTE_TEMPLATES: dict[str, str] = {
    "color": "What color is {ref}?",
    "shape": "What shape is {ref}?",
    "size": "Is {ref} large or small?",
}
ORDINALS: tuple[str, ...] = ("first", "second")
#: asked about the whole image (not a spec question: the count word the whole-image
#: description starts with, as a one-word answer, "Three.")
QUESTION_COUNT = "How many shapes are there?"


def region_name(number: int, total: int) -> str:
    """``image`` when the conversation holds one region, else ``image <number>`` (the demo's rule)."""
    return "image" if total == 1 else f"image {number}"


def turn_prompt(question: str, first_number: int, num_new: int) -> str:
    """A question bringing ``num_new`` new regions, numbered from ``first_number`` (1-based)
    in the conversation: ``"image 2[IMG] What color is it?"``; a conversation's only
    region is ``"image[IMG]"``."""
    total = first_number - 1 + num_new
    names = [region_name(first_number + i, total) + IMG_PLACEHOLDER for i in range(num_new)]
    return " ".join([*names, question])


def reference(kind: str, number: int = 0) -> str:
    """How a follow-up names a region: ``it``, ``image N`` or ``the first one``.

    Args:
        kind: ``"it"``, ``"number"`` (uses ``number``) or ``"ordinal"`` (``number`` 1 or 2).
    """
    if kind == "it":
        return "it"
    if kind == "number":
        return f"image {number}"
    if kind == "ordinal":
        return f"the {ORDINALS[number - 1]} one"
    raise ValueError(f"unknown reference kind {kind!r}")


def followup_question(attribute: str, ref: str) -> str:
    """``followup_question("color", "image 1") == "What color is image 1?"``; with
    ``ref == "it"`` this is the spec's own one-region question."""
    if attribute not in ATTRIBUTE_TEMPLATES:
        raise ValueError(f"unknown attribute {attribute!r}")
    question = ATTRIBUTE_TEMPLATES[attribute].format(ref=ref)
    assert ref != "it" or question == SINGLE_QUESTIONS[attribute]
    return question


def count_answer(count: int) -> str:
    """``count_answer(3) == "Three."``."""
    return COUNT_WORDS[count].capitalize() + "."


def pair_followup_question(kind: str) -> str:
    """About the two regions of the last turn: the spec's pair question (``they``)."""
    return PAIR_QUESTIONS[kind]
