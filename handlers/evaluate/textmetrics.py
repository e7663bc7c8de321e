"""Per-example task metrics of a generated answer against its reference: exact match, token F1, ROUGE-L
(rouge-score) and chrF (sacrebleu), all in [0, 1].

Words are what a reader would count: runs of letters and digits, casefolded after NFKC normalisation, with every
Chinese / Japanese character a word of its own (those scripts do not separate words with spaces, and a
character-level match is the usual stand-in for a segmenter). chrF compares character n-grams and needs no
word splitting in any language.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Any, Sequence

import numpy as np
from rouge_score import rouge_scorer
from sacrebleu.metrics import CHRF

CJK = "\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"
WORD_RE = re.compile(f"[{CJK}]|(?:(?![{CJK}])[^\\W_])+")
METRICS = ("exact_match", "token_f1", "rouge_l", "chrf")


def words(text: str) -> list[str]:
    return WORD_RE.findall(unicodedata.normalize("NFKC", text).casefold())


class _WordTokenizer:
    """rouge-score's tokenizer interface; its default one drops every non-ASCII character."""

    def tokenize(self, text: str) -> list[str]:
        return words(text)


def token_f1(prediction: list[str], reference: list[str]) -> float:
    """SQuAD-style F1 of the bag of words (1.0 when both are empty)."""
    if not prediction or not reference:
        return float(prediction == reference)
    common = sum((Counter(prediction) & Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def score_answers(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """Per-example scores for every metric in METRICS (same order as the inputs)."""
    rouge = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())
    chrf = CHRF()
    out: dict[str, list[float]] = {name: [] for name in METRICS}
    for prediction, reference in zip(predictions, references):
        if not prediction.strip() and not reference.strip():  # nothing asked, nothing said: a perfect match
            for name in METRICS:
                out[name].append(1.0)
            continue
        pred_words, ref_words = words(prediction), words(reference)
        out["exact_match"].append(float(pred_words == ref_words))
        out["token_f1"].append(token_f1(pred_words, ref_words))
        out["rouge_l"].append(float(rouge.score(reference, prediction)["rougeL"].fmeasure))
        out["chrf"].append(chrf.sentence_score(prediction.strip(), [reference.strip()]).score / 100.0)
    return out


def means(scores: dict[str, list[float]]) -> dict[str, Any]:
    return {name: float(np.mean(values)) if values else None for name, values in scores.items()}
