"""Caption scores with pycocoevalcap, as the region-captioning papers compute them.

The peers build ``COCO(annotations).loadRes(predictions)`` and run ``COCOEvalCap.evaluate()``
(one COCO "image" per region). ``evaluate()`` also runs SPICE, which downloads Stanford
CoreNLP at run time and fails offline, so this module does what ``evaluate()`` does, step by
step: the same ``PTBTokenizer`` on the same ground-truth / result dictionaries, then the
BLEU, METEOR, ROUGE-L and CIDEr scorers (identical numbers), and SPICE only when its
CoreNLP jars are already in place.

The tokenizer, METEOR and SPICE run Java. Without ``java`` METEOR (and SPICE) are skipped
with a message, and the captions are tokenized by :func:`ptb_like_tokenize`, a Python
approximation of the PTB tokenizer (identical on plain lower-case words; punctuation and
contractions may differ slightly), so BLEU / ROUGE-L / CIDEr are still computed and the
report says which tokenizer was used.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)

# score name in our reports -> pycocoevalcap's name
METRICS = {"BLEU-4": "Bleu_4", "METEOR": "METEOR", "ROUGE-L": "ROUGE_L", "CIDEr": "CIDEr"}
SPICE = "SPICE"
PTB_TOKENIZER = "PTBTokenizer (Stanford CoreNLP 3.4.1, as pycocoevalcap)"
PYTHON_TOKENIZER = "Python approximation of PTBTokenizer (java not found)"
# PTBTokenizer's output tokens that pycocoevalcap removes
_PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
_TOKEN = re.compile(r"-lrb-|-rrb-|-lcb-|-rcb-|-lsb-|-rsb-|[^\W_]+?(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|\.\.\.|--"
                    r"|\d+(?::\d+)+|[^\W_]+(?:[-./&][^\W_]+)*\.?|\S")
# words PTBTokenizer keeps with their final period
_ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "vs.", "etc.", "inc.", "ltd.", "co.", "prof."}


@dataclass
class ScoreReport:
    """Scores of one set of predictions.

    Attributes:
        scores: ``{"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"[, "SPICE"]: value}`` on
            pycocoevalcap's scale (papers print METEOR and CIDEr times 100).
        not_computed: ``{metric: why}`` for metrics that were skipped.
        tokenizer: which tokenizer produced the tokens that were scored.
        count: number of scored regions.
    """

    scores: dict[str, float]
    not_computed: dict[str, str] = field(default_factory=dict)
    tokenizer: str = PTB_TOKENIZER
    count: int = 0


def find_java() -> str | None:
    """Path of the ``java`` executable, or ``None``."""
    return shutil.which("java")


def spice_jars_missing() -> list[Path]:
    """The Stanford CoreNLP 3.6.0 jars SPICE needs that are not in pycocoevalcap's
    ``spice/lib`` (SPICE downloads them on first use, which fails offline)."""
    from pycocoevalcap.spice import spice as spice_module

    lib = Path(spice_module.__file__).parent / "lib"
    return [p for p in (lib / "stanford-corenlp-3.6.0.jar", lib / "stanford-corenlp-3.6.0-models.jar") if not p.is_file()]


def ptb_like_tokenize(captions_for_image: dict[Any, list[dict[str, Any]]]) -> dict[Any, list[str]]:
    """Python stand-in for ``PTBTokenizer().tokenize``: lower-case, PTB-style tokens, the
    same punctuation removed. Same input and output structure."""
    out: dict[Any, list[str]] = {}
    for key, anns in captions_for_image.items():
        for ann in anns:
            text = ann["caption"].replace("\n", " ").lower().replace('"', " ")
            for bracket, name in _BRACKETS.items():
                text = text.replace(bracket, f" {name} ")
            tokens: list[str] = []
            for tok in _TOKEN.findall(text):
                # a final period stays with abbreviations ("u.s.", "dr."), else it is its own token
                if len(tok) > 1 and tok.endswith(".") and tok != "..." and "." not in tok[:-1] \
                        and tok not in _ABBREVIATIONS:
                    tokens += [tok[:-1], "."]
                else:
                    tokens.append(tok)
            out.setdefault(key, []).append(" ".join(t for t in tokens if t not in _PUNCTUATIONS))
    return out


def region_ground_truth(references: Sequence[tuple[Any, Sequence[str]]]) -> dict[str, Any]:
    """A COCO caption dataset with one "image" per region.

    Args:
        references: ``(region_id, reference captions)`` pairs.

    Returns:
        ``{"images": [{"id": region_id}], "annotations": [{"id", "image_id": region_id,
        "caption"}], ...}``, ready for ``pycocotools.coco.COCO``.
    """
    images, annotations = [], []
    for region_id, captions in references:
        images.append({"id": region_id})
        for caption in captions:
            annotations.append({"id": len(annotations) + 1, "image_id": region_id, "caption": caption})
    return {"info": {}, "licenses": [], "type": "captions", "images": images, "annotations": annotations}


def _quiet(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with pycocotools' / pycocoevalcap's prints sent to the debug log."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = fn()
    if buffer.getvalue().strip():
        logger.debug(buffer.getvalue().strip())
    return result


def score_captions(ground_truth: dict[str, Any], predictions: Sequence[dict[str, Any]],
                   spice: bool = True) -> ScoreReport:
    """Score ``predictions`` against ``ground_truth`` as ``COCOEvalCap`` does.

    Args:
        ground_truth: a COCO caption dataset (see :func:`region_ground_truth`).
        predictions: ``[{"image_id": region_id, "caption": str}]``, one per region, every
            id in ``ground_truth``.
        spice: also compute SPICE when its jars are present.

    Returns:
        The scores, with a reason for each metric not computed.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocotools.coco import COCO

    if not predictions:
        return ScoreReport(scores={}, not_computed={m: "no predictions" for m in METRICS}, count=0)
    coco = COCO()
    coco.dataset = ground_truth
    _quiet(coco.createIndex)
    results = _quiet(lambda: coco.loadRes([dict(p) for p in predictions]))
    ids = results.getImgIds()
    gts = {i: coco.imgToAnns[i] for i in ids}
    res = {i: results.imgToAnns[i] for i in ids}

    java = find_java()
    not_computed: dict[str, str] = {}
    if java is not None:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        gts_tok, res_tok = tokenizer.tokenize(gts), tokenizer.tokenize(res)
        tokenizer_name = PTB_TOKENIZER
    else:
        logger.warning("java not found: METEOR and SPICE are skipped and captions are tokenized by a Python "
                       "approximation of PTBTokenizer (install a Java runtime, e.g. Debian's default-jre-headless, "
                       "for the published protocol)")
        gts_tok, res_tok = ptb_like_tokenize(gts), ptb_like_tokenize(res)
        tokenizer_name = PYTHON_TOKENIZER
        not_computed["METEOR"] = "java not found (METEOR runs meteor-1.5.jar); install a Java runtime"

    scores: dict[str, float] = {}
    bleu, _ = _quiet(lambda: Bleu(4).compute_score(gts_tok, res_tok, verbose=0))
    scores["BLEU-4"] = float(bleu[3])
    if java is not None:
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()
        try:
            scores["METEOR"] = float(meteor.compute_score(gts_tok, res_tok)[0])
        finally:
            del meteor  # stops its java process
    scores["ROUGE-L"] = float(Rouge().compute_score(gts_tok, res_tok)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts_tok, res_tok)[0])

    if spice:
        missing = spice_jars_missing() if java is not None else []
        if java is None:
            not_computed[SPICE] = "java not found"
        elif missing:
            not_computed[SPICE] = (f"its Stanford CoreNLP jars are not installed ({', '.join(p.name for p in missing)} "
                                   f"in {missing[0].parent}); SPICE would download them at run time")
        else:
            from pycocoevalcap.spice.spice import Spice

            try:
                scores[SPICE] = float(_quiet(lambda: Spice().compute_score(gts_tok, res_tok))[0])
            except Exception as err:  # a Java or SPICE failure must not lose the other scores
                not_computed[SPICE] = f"SPICE failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        if SPICE in not_computed:
            logger.info("SPICE not computed: %s", not_computed[SPICE])
    return ScoreReport(scores=scores, not_computed=not_computed, tokenizer=tokenizer_name, count=len(ids))
