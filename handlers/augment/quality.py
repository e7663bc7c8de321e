"""Quality of a generated row in [0, 1]: meaning kept (embedding similarity), sane length, same language as the
source, no placeholder or template debris; and its level (high / medium / low)."""
from __future__ import annotations

import re
import unicodedata
from collections import Counter

HIGH, MEDIUM = 0.75, 0.5
DEBRIS = re.compile(r"\{\{|\}\}|\{[a-z_]+\}|\[(?:name|your name|insert[^\]]*|placeholder)\]|<\|[a-z_]+\|>|\[/?INST\]"
                    r"|<unk>|</?s>|###|(?i:as an ai(?: language model)?)|(?i:lorem ipsum)|(?i:rewritten reply)")
STOPWORDS = {
    "en": {"the", "and", "is", "you", "to", "of", "it", "that", "for", "with", "i", "a", "in", "this", "be"},
    "de": {"der", "die", "und", "ist", "ich", "nicht", "das", "du", "sie", "mit", "ein", "zu", "es", "auf"},
    "fr": {"le", "la", "les", "et", "est", "je", "vous", "pas", "de", "un", "une", "que", "pour", "tu"},
    "es": {"el", "la", "los", "y", "es", "que", "de", "no", "un", "una", "por", "para", "tu", "yo"},
    "it": {"il", "la", "e", "che", "di", "non", "un", "una", "per", "sono", "tu", "io", "mi"},
    "pt": {"o", "a", "os", "e", "que", "de", "não", "um", "uma", "para", "com", "você", "eu"},
    "nl": {"de", "het", "en", "is", "ik", "niet", "een", "je", "van", "dat", "met", "op"},
}


def script_of(text: str) -> str:
    """The dominant Unicode script of the letters (LATIN, CYRILLIC, CJK, ...)."""
    scripts = Counter(unicodedata.name(c, "UNKNOWN").split(" ")[0] for c in text if c.isalpha())
    return scripts.most_common(1)[0][0] if scripts else "NONE"


def language_of(text: str) -> str:
    """A rough language tag: the script, and for Latin text the best stopword match (en, de, fr, ...)."""
    script = script_of(text)
    if script != "LATIN":
        return script.lower()
    words = re.findall(r"[^\W\d_]+", text.lower())
    scores = {lang: sum(w in stop for w in words) for lang, stop in STOPWORDS.items()}
    best = max(scores, key=lambda k: scores[k])
    return best if scores[best] >= 2 else "latin"


def same_language(a: str, b: str) -> bool:
    la, lb = language_of(a), language_of(b)
    return la == lb or "latin" in (la, lb) and script_of(a) == script_of(b)


def length_sanity(text: str, source: str) -> float:
    """1 within a factor of 3 of the source's length, falling to 0 at a factor of 8 (or below 2 characters)."""
    if len(text.strip()) < 2:
        return 0.0
    ratio = max(len(text), 1) / max(len(source), 1)
    ratio = max(ratio, 1 / ratio)
    return 1.0 if ratio <= 3 else max(0.0, 1 - (ratio - 3) / 5)


def score(text: str, source: str, similarity: float) -> float:
    """Quality in [0, 1]: ``similarity`` (cosine, 0.4 -> 0, 0.95 -> 1) scaled by length, language and debris."""
    meaning = min(1.0, max(0.0, (similarity - 0.4) / 0.55))
    language = 1.0 if same_language(text, source) else 0.2
    debris = 0.2 if DEBRIS.search(text) and not DEBRIS.search(source) else 1.0
    return round(meaning * length_sanity(text, source) * language * debris, 4)


def level(quality: float) -> str:
    return "high" if quality >= HIGH else "medium" if quality >= MEDIUM else "low"
