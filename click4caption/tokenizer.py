"""The LLM folder's tokenizer, with the original's token ids.

Upstream tokenised with transformers 4.28's slow ``LlamaTokenizer``: special and added
tokens (``<s>``, ``</s>``, ``<unk>``, ``[PAD]``) are split out of the text first, and every
other span is encoded by SentencePiece itself, ``sp.encode(span)``. SentencePiece adds its
dummy prefix to every span, so ``" What is it?"`` starts with the lone piece ``"▁"`` (id
29871 in the Vicuna vocabulary) and then ``"▁What"``. transformers 5's LLaMA tokenizer
adds the prefix only when a text does not already start with a space, which gives other
ids for every prompt segment after ``[IMG]``. For a folder with a SentencePiece
``tokenizer.model`` this module therefore calls SentencePiece directly
(:class:`SentencePieceTokenizer`); decoding is SentencePiece's too, which replaces only
the bytes of a byte-fallback run that are invalid UTF-8. A folder with only a
``tokenizer.json`` (the shipped shapes model) is read by transformers
(:class:`HFTokenizer`).

Both expose the small interface the project uses (:class:`TextTokenizer`).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Iterable, Protocol

from click4caption.errors import CheckpointError

logger = logging.getLogger(__name__)

PAD_TOKEN = "[PAD]"  # Vicuna's pad token; upstream adds it when a folder lacks it
SP_MODEL_FILE = "tokenizer.model"


class TextTokenizer(Protocol):
    """What the model, the chat engine and training need from a tokenizer."""

    bos_token_id: int
    eos_token_id: int
    pad_token_id: int

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_bos`` prepends BOS (what ``add_special_tokens=True`` did)."""
        ...

    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = True, **kwargs: Any) -> str:
        """Text of ``ids`` (one id or several; ``kwargs`` are accepted for transformers'
        streamers and ignored)."""
        ...

    def __len__(self) -> int:
        ...


def _id_list(ids: int | Iterable[int]) -> list[int]:
    """One id or several (a list, a tensor row) -> a list of ints."""
    if isinstance(ids, int) or getattr(ids, "ndim", 1) == 0:
        return [int(ids)]  # type: ignore[arg-type]
    return [int(i) for i in ids]  # type: ignore[union-attr]


def _token_content(value: Any) -> str | None:
    """``"[PAD]"`` or ``{"content": "[PAD]", ...}`` (both spellings of tokenizer files) -> text."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"] or None
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    return data if isinstance(data, dict) else {}


class SentencePieceTokenizer:
    """A SentencePiece model plus the folder's added tokens, encoding as upstream did.

    Args:
        model_file: the ``tokenizer.model`` file.
        added: added tokens beyond the SentencePiece vocabulary, ``{text: id}`` (Vicuna v0:
            ``{"[PAD]": 32000}``).
        special: texts of the added tokens that are special (skipped when decoding).
        add_bos / add_eos: what ``add_bos=True`` adds, as the folder's
            ``tokenizer_config.json`` says (LLaMA: BOS only).
    """

    def __init__(self, model_file: str | Path, added: dict[str, int] | None = None,
                 special: Iterable[str] = (), add_bos: bool = True, add_eos: bool = False) -> None:
        import sentencepiece

        self.model_file = str(model_file)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=self.model_file)
        self.bos_token_id = int(self.sp.bos_id())
        self.eos_token_id = int(self.sp.eos_id())
        self.unk_token_id = int(self.sp.unk_id())
        self.added = dict(added or {})
        pad = self.added.get(PAD_TOKEN)
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_id
        self.add_bos, self.add_eos = add_bos, add_eos
        # special texts split out of the input first: control pieces as upstream's
        # special tokens, then the added tokens; longest first so no token hides another
        self.split_tokens: dict[str, int] = {}
        for token_id in (self.unk_token_id, self.bos_token_id, self.eos_token_id):
            if token_id >= 0:
                self.split_tokens[self.sp.id_to_piece(token_id)] = token_id
        self.split_tokens.update(self.added)
        pattern = "|".join(re.escape(t) for t in sorted(self.split_tokens, key=len, reverse=True))
        self._split = re.compile(f"({pattern})") if pattern else None
        self.special_ids = {i for i in (self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id)
                            if i >= 0}
        self.special_ids |= {self.added[t] for t in special if t in self.added}
        self._id_to_added = {i: t for t, i in self.added.items()}

    @classmethod
    def from_folder(cls, folder: str | Path) -> "SentencePieceTokenizer":
        """Read ``tokenizer.model`` and the added tokens the folder's JSON files name
        (``added_tokens.json``, ``tokenizer_config.json``'s ``added_tokens_decoder``,
        ``special_tokens_map.json``)."""
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        added: dict[str, int] = {}
        special: set[str] = set()
        for text, token_id in _read_json(folder / "added_tokens.json").items():
            if isinstance(token_id, int):
                added[text] = token_id
        for token_id, entry in (config.get("added_tokens_decoder") or {}).items():
            text = _token_content(entry)
            if text is not None and str(token_id).isdigit():
                added.setdefault(text, int(token_id))
                if isinstance(entry, dict) and entry.get("special", True):
                    special.add(text)
        for key, value in _read_json(folder / "special_tokens_map.json").items():
            text = _token_content(value)
            if text is not None and key != "additional_special_tokens":
                special.add(text)
        tok = cls(folder / SP_MODEL_FILE, added, special, add_bos=bool(config.get("add_bos_token", True)),
                  add_eos=bool(config.get("add_eos_token", False)))
        size = tok.sp.get_piece_size()
        clash = {t: i for t, i in added.items() if i < size and tok.sp.id_to_piece(i) != t}
        if clash:
            raise CheckpointError(f"{folder}: added tokens {clash} reuse ids of other SentencePiece pieces")
        return tok

    def __len__(self) -> int:
        return max([self.sp.get_piece_size() - 1, *self.added.values()]) + 1

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Special/added tokens split out, every other span ``sp.encode(span)``."""
        ids: list[int] = []
        if add_bos and self.add_bos:
            ids.append(self.bos_token_id)
        parts = self._split.split(text) if self._split is not None else [text]
        for i, part in enumerate(parts):
            if i % 2:  # a split-out token
                ids.append(self.split_tokens[part])
            elif part:
                ids.extend(self.sp.encode(part))
        if add_bos and self.add_eos:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = True, **kwargs: Any) -> str:
        """SentencePiece's decoding of the ids (special ones dropped when asked)."""
        out: list[str] = []
        run: list[int] = []
        size = self.sp.get_piece_size()
        for token_id in _id_list(ids):
            if token_id in self.special_ids and skip_special_tokens:
                continue
            if not 0 <= token_id < size and token_id not in self._id_to_added:
                continue  # an id the LLM's (padded) vocabulary has and the tokenizer does not: no text
            if token_id in self._id_to_added:
                out.append(self.sp.decode(run))
                run = []
                out.append(self._id_to_added[token_id])
            else:
                run.append(token_id)
        out.append(self.sp.decode(run))
        return "".join(out)


class HFTokenizer:
    """A transformers tokenizer (a folder with ``tokenizer.json`` only) behind :class:`TextTokenizer`."""

    def __init__(self, tokenizer: Any) -> None:
        self.hf = tokenizer
        if tokenizer.pad_token is None:
            if PAD_TOKEN in tokenizer.get_vocab():
                tokenizer.pad_token = PAD_TOKEN
            else:
                tokenizer.pad_token = tokenizer.eos_token
        self.bos_token_id = int(tokenizer.bos_token_id)
        self.eos_token_id = int(tokenizer.eos_token_id)
        self.pad_token_id = int(tokenizer.pad_token_id)

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return list(self.hf(text, add_special_tokens=add_bos).input_ids)

    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = True, **kwargs: Any) -> str:
        return self.hf.decode(_id_list(ids), skip_special_tokens=skip_special_tokens)


def load_tokenizer(folder: str | Path) -> TextTokenizer:
    """The tokenizer of an LLM folder: SentencePiece when it has ``tokenizer.model``
    (Vicuna, LLaMA: the original's ids), else transformers' ``AutoTokenizer``.

    Raises:
        CheckpointError: no tokenizer files, or unreadable ones.
    """
    folder = Path(folder)
    if (folder / SP_MODEL_FILE).is_file():
        try:
            return SentencePieceTokenizer.from_folder(folder)
        except CheckpointError:
            raise
        except Exception as err:  # sentencepiece raises RuntimeError/OSError on a bad file
            raise CheckpointError(f"cannot read {folder / SP_MODEL_FILE}: {str(err).splitlines()[0]}") from None
    try:
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(str(folder)))
    except Exception as err:
        raise CheckpointError(f"cannot load the tokenizer from {folder}: {str(err).splitlines()[0]}") from None
