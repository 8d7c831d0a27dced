"""Caption metrics through pycocoevalcap, the COCO caption evaluation the MAGIC paper uses: BLEU-1..4, METEOR,
ROUGE-L, CIDEr and SPICE, on PTB-tokenized captions.

PTB tokenization, METEOR and SPICE run Java (Debian: ``apt-get install -y default-jre-headless``); SPICE also needs
Stanford CoreNLP 3.6.0, which pycocoevalcap downloads into its ``spice/lib`` folder on first use. What cannot run
is left out and said why (``CaptionScores.not_run``); without Java the captions are tokenized by a simple rule
(lower case, punctuation dropped) and the result says so, since the figures then differ slightly from the PTB ones.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
ALL_METRICS = ("B@1", "B@2", "B@3", "B@4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
_PUNCT = re.compile(r"[^\w\s]")


@dataclass
class CaptionScores:
    scores: dict[str, float]  # percent, as the papers print them
    ran: list[str] = field(default_factory=list)
    not_run: dict[str, str] = field(default_factory=dict)  # metric -> why
    tokenizer: str = "ptb"  # "ptb" (Stanford PTBTokenizer) or "simple" (no Java)
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)  # CIDEr and BLEU-4 of each image


def java_available() -> bool:
    return shutil.which("java") is not None


def spice_missing() -> str | None:
    """Why SPICE cannot run here, or None."""
    if not java_available():
        return "needs Java (apt-get install -y default-jre-headless)"
    import pycocoevalcap

    lib = Path(pycocoevalcap.__path__[0]) / "spice" / "lib"
    missing = [j for j in CORENLP_JARS if not (lib / j).is_file()]
    if missing:
        return (
            f"needs Stanford CoreNLP 3.6.0 ({', '.join(missing)}) in {lib}: pycocoevalcap downloads them on first "
            f"use from nlp.stanford.edu, which this machine cannot reach; put the jars there"
        )
    return None


def simple_tokenize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def score_captions(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], *, metrics: Sequence[str] = ALL_METRICS
) -> CaptionScores:
    """``predictions``: image id -> caption; ``references``: image id -> reference captions (same ids)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(predictions) != set(references):
        extra = sorted(set(predictions) ^ set(references))[:5]
        raise ValueError(f"predictions and references must cover the same images (differ at {extra})")
    if not predictions:
        raise ValueError("no captions to score")
    ids = sorted(predictions)
    out = CaptionScores(scores={})
    if java_available():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        gts = tok.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
        res = tok.tokenize({i: [{"caption": predictions[i]}] for i in ids})
    else:
        out.tokenizer = "simple"
        gts = {i: [simple_tokenize(c) for c in references[i]] for i in ids}
        res = {i: [simple_tokenize(predictions[i])] for i in ids}
    wanted = set(metrics)
    if wanted & {"B@1", "B@2", "B@3", "B@4"}:
        bleu, per = Bleu(4).compute_score(gts, res, verbose=0)
        for n in range(4):
            if f"B@{n + 1}" in wanted:
                out.scores[f"B@{n + 1}"] = 100.0 * bleu[n]
                out.ran.append(f"B@{n + 1}")
        for i, v in zip(ids, per[3], strict=True):
            out.per_image.setdefault(i, {})["B@4"] = 100.0 * v
    if "METEOR" in wanted:
        if java_available():
            from pycocoevalcap.meteor.meteor import Meteor

            out.scores["METEOR"] = 100.0 * Meteor().compute_score(gts, res)[0]
            out.ran.append("METEOR")
        else:
            out.not_run["METEOR"] = "needs Java (apt-get install -y default-jre-headless)"
    if "ROUGE-L" in wanted:
        out.scores["ROUGE-L"] = 100.0 * Rouge().compute_score(gts, res)[0]
        out.ran.append("ROUGE-L")
    if "CIDEr" in wanted:
        cider, per = Cider().compute_score(gts, res)
        out.scores["CIDEr"] = 100.0 * cider
        out.ran.append("CIDEr")
        for i, v in zip(ids, per, strict=True):
            out.per_image.setdefault(i, {})["CIDEr"] = 100.0 * float(v)
    if "SPICE" in wanted:
        why = spice_missing()
        if why is None:
            from pycocoevalcap.spice.spice import Spice

            try:
                out.scores["SPICE"] = 100.0 * Spice().compute_score(gts, res)[0]
                out.ran.append("SPICE")
            except Exception as e:  # a Java failure inside the SPICE jar: report it, keep the other metrics
                out.not_run["SPICE"] = f"the SPICE jar failed: {type(e).__name__}: {e}"
        else:
            out.not_run["SPICE"] = why
    if out.tokenizer == "simple":
        logger.warning("no Java: captions tokenized by a simple rule, not Stanford's PTBTokenizer")
    return out
