"""A tiny word-level tokenizer for the shapes world that behaves like LLaMA's.

What it shares with the LLaMA sentencepiece tokenizer, for this project's purposes:
special tokens ``<unk>`` (0), ``<s>`` (1, BOS), ``</s>`` (2, EOS) and ``[PAD]`` (last id);
``add_special_tokens=True`` prepends ``<s>`` only; a word carries its leading space as
``"▁"`` (Metaspace, with the dummy prefix on the first piece), punctuation and digits
are pieces of their own (a space before them becomes a lone ``"▁"``), ``"\\n"`` is a
token, and ``"###"`` is one token (``"▁###"`` after a space, ``"###"`` after ``"."`` or
``"\\n"``). Decoding drops the dummy prefix, so every text the shapes language and
the conversation template produce round-trips exactly; unknown words become ``<unk>``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from click4caption.shapes.dialogue import ATTRIBUTE_TEMPLATES, ORDINALS, QUESTION_COUNT
from click4caption.shapes.world import COLORS, COUNT_WORDS, PAIR_QUESTIONS, SHAPES, SINGLE_QUESTIONS, SIZES

logger = logging.getLogger(__name__)

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "[PAD]"
SPACE = "\u2581"  # "▁", sentencepiece's space marker
#: After Metaspace: a run of "#" (with its space) or any single digit or non-word character.
PIECE_PATTERN = rf"{SPACE}?#+|\d|[^\w{SPACE}]"
PUNCTUATION = list(".,:;?!'\"-()/[]*") + ["\n"]
TEMPLATE_WORDS = ["Human", "Assistant", "image", "Image"]
#: Upstream's own example prompts, and common words a user might type in the demo.
COMMON_WORDS = (
    "the of to in on at with this that there here is are was be it its they them these those an "
    "I you we me my your what which where who how many much some any all each both other "
    "not no yes do does can could please thank thanks ok okay describe picture photo object objects "
    "shape shapes color colour colors big little left right top bottom middle center next "
    "Write write story combines about one two three four five"
).split()
MODEL_MAX_LENGTH = 2048


def shapes_words() -> list[str]:
    """Every word of the shapes language, the questions and the conversation template."""
    words: set[str] = set(TEMPLATE_WORDS) | set(COMMON_WORDS)
    attributes = [*SHAPES, *COLORS, *SIZES, *COUNT_WORDS.values(), "yes", "no", "a", "and", "shape", "shapes"]
    for word in attributes:
        words |= {word, word.capitalize()}
    words |= set(ORDINALS)
    for question in [*SINGLE_QUESTIONS.values(), *PAIR_QUESTIONS.values(),
                     *(t.format(ref="it") for t in ATTRIBUTE_TEMPLATES.values()),
                     QUESTION_COUNT]:
        words |= set(re.findall(r"[A-Za-z]+", question))
    return sorted(words)


def shapes_vocab() -> dict[str, int]:
    """Token -> id, LLaMA-like: ``<unk>``, ``<s>``, ``</s>`` first, ``[PAD]`` last."""
    tokens = [UNK, BOS, EOS, SPACE, "###", SPACE + "###", *PUNCTUATION, *"0123456789"]
    tokens += [SPACE + word for word in shapes_words()]
    tokens.append(PAD)
    return {token: i for i, token in enumerate(tokens)}


def build_shapes_tokenizer(save_dir: Path | str | None = None) -> PreTrainedTokenizerFast:
    """Build the shapes tokenizer; with ``save_dir``, ``save_pretrained`` it there.

    ``transformers.AutoTokenizer.from_pretrained(save_dir)`` loads the saved folder.
    """
    vocab = shapes_vocab()
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=True),
            pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated"),
        ]
    )
    backend.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="first", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        padding_side="right",
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
        logger.info("shapes tokenizer (%d tokens) saved to %s", len(tokenizer), save_dir)
    return tokenizer
