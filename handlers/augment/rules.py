"""The ``rules`` backend: deterministic rewrites without a model (register, politeness and hedging markers,
sentence compression / expansion, situation and addressee frames).

Every transform is a pure function of the text, so a rerun or a resumed run gives the same rows.
"""
from __future__ import annotations

import re
from typing import Callable

CONTRACTIONS = {
    "do not": "don't", "does not": "doesn't", "did not": "didn't", "is not": "isn't", "are not": "aren't",
    "was not": "wasn't", "were not": "weren't", "cannot": "can't", "will not": "won't", "would not": "wouldn't",
    "should not": "shouldn't", "could not": "couldn't", "have not": "haven't", "has not": "hasn't",
    "I am": "I'm", "you are": "you're", "we are": "we're", "they are": "they're", "it is": "it's",
    "that is": "that's", "there is": "there's", "I will": "I'll", "you will": "you'll", "I have": "I've",
    "I would": "I'd", "let us": "let's", "what is": "what's",
}
CASUAL_WORDS = {"hello": "hey", "yes": "yeah", "thank you": "thanks", "going to": "gonna", "want to": "wanna",
                "kind of": "kinda", "very": "really", "perhaps": "maybe", "certainly": "sure",
                "however": "but", "excellent": "awesome", "a little": "a bit"}
FORMAL_WORDS = {v: k for k, v in CASUAL_WORDS.items()} | {"hi": "hello", "ok": "very well", "okay": "very well",
                                                         "stuff": "things", "guys": "everyone", "cool": "fine",
                                                         "lots of": "many", "get": "obtain"}
HEDGES = ("I think ", "I guess ", "I believe ", "maybe ", "perhaps ", "probably ", "kind of ", "sort of ",
          "basically ", "actually ", "really ", "just ", "honestly ", "to be honest, ", "if you ask me, ")
SOFTENERS = {"you should": "you might consider", "you must": "it would help to", "you need to": "it may help to",
             "don't": "try not to", "no,": "I see it a little differently:", "wrong": "not quite right",
             "never": "rarely"}
SENTENCE = re.compile(r"[^.!?]+[.!?]*\s*")
Transform = Callable[[str], str]


def _swap(text: str, table: dict[str, str]) -> str:
    """Replace whole words/phrases (longest first), keeping a capital first letter."""
    for old in sorted(table, key=len, reverse=True):
        new = table[old]

        def repl(match: re.Match[str], new: str = new) -> str:
            word = match.group(0)
            return new[0].upper() + new[1:] if word[0].isupper() and not new.startswith("I") else new
        text = re.sub(rf"(?<![\w']){re.escape(old)}(?![\w'])", repl, text, flags=re.IGNORECASE)
    return text


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE.findall(text) if s.strip()]


def _capitalise(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text[:1].upper() + text[1:] if text else text


def _drop_hedges(text: str) -> str:
    for hedge in HEDGES:
        text = re.sub(rf"(?<![\w']){re.escape(hedge)}", "", text, flags=re.IGNORECASE)
    return " ".join(_capitalise(s) for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip())


def formal(text: str) -> str:
    expanded = _swap(_swap(text, {v: k for k, v in CONTRACTIONS.items()}), FORMAL_WORDS)
    return _capitalise(re.sub(r"!+", ".", expanded).replace(" :)", "").replace(" ;)", ""))


def informal(text: str) -> str:
    return _capitalise(_swap(_swap(text, CASUAL_WORDS), CONTRACTIONS))


def concise(text: str) -> str:
    """Sentence compression: no hedges, and the first half of the sentences (at least one)."""
    parts = sentences(_drop_hedges(text))
    keep = max(1, (len(parts) + 1) // 2)
    return " ".join(parts[:keep])


def detailed(text: str) -> str:
    """Sentence expansion: the point restated as a summary and an offer to go deeper."""
    parts = sentences(text)
    first = parts[0].rstrip(".!?") if parts else text
    lead = first[:1].lower() + first[1:] if first[:2] != "I " else first
    return (f"{text.strip()} To sum it up: {lead}. If it helps, I can go through any part of this step by step "
            "and add examples.")


def direct(text: str) -> str:
    """No hedges and no apologetic openers."""
    stripped = re.sub(r"^(sorry|I'm sorry|I am sorry|apologies)[,!.]?\s*(but\s+)?", "", text.strip(),
                      flags=re.IGNORECASE)
    return _drop_hedges(stripped)


def tactful(text: str) -> str:
    """Politeness and hedging markers: a considerate opener and softened directives."""
    return f"I understand, and I hope this helps. {_capitalise(_swap(text, SOFTENERS))}"


STYLE_TRANSFORMS: dict[str, Transform] = {"formal": formal, "informal": informal, "concise": concise,
                                          "detailed": detailed, "direct": direct, "tactful": tactful}

# situation frames: how the user turn is introduced, and the register the reply takes there
SCENARIO_FRAMES: dict[str, tuple[str, Transform]] = {
    "work": ("Quick question while I'm at work: ", formal),
    "leisure": ("No rush, I'm just relaxing this weekend: ", informal),
    "office": ("I'm at the office right now. ", concise),
    "home": ("I'm at home and have some time. ", detailed),
    "calm": ("Calmly, when you get a moment: ", lambda t: _capitalise(re.sub(r"!+", ".", t))),
    "excited": ("I'm so excited about this! ", lambda t: _opener("Oh, that's exciting!", _capitalise(t))),
}
# addressee frames: stranger formal and reserved, close friend casual, authority careful and polite
RELATIONSHIP_FRAMES: dict[str, Transform] = {
    "stranger": lambda t: formal(direct(t)),
    "close_friend": lambda t: _opener("Hey!", informal(t)),
    "authority": lambda t: _opener("Certainly.", _capitalise(_swap(formal(t), SOFTENERS))),
}


def _opener(opener: str, text: str) -> str:
    """``opener`` before ``text`` unless the text already starts with its word."""
    word = opener.rstrip(".,!").lower()
    return text if text.lower().startswith(word) else f"{opener} {text}"


def rewrite(target: str, text: str) -> str:
    """``text`` rewritten for ``target`` (``style:formal``, ``scenario:work``, ``relationship:stranger``)."""
    family, _, name = target.partition(":")
    if family == "style":
        return STYLE_TRANSFORMS[name](text)
    if family == "scenario":
        return SCENARIO_FRAMES[name][1](text)
    if family == "relationship":
        return RELATIONSHIP_FRAMES[name](text)
    raise ValueError(f"unknown rewrite target {target!r}")
