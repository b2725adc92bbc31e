"""Answer parsing, matching and refusal detection: shared by probing, state queries and evaluation."""

from __future__ import annotations

import re
import unicodedata

from kb.data import LETTERS

STRICT_REFUSAL = "i don't know"
# The broader detector (reported separately from the strict one): common abstention phrasings.
BROAD_REFUSALS = (
    "i don't know", "i do not know", "i dont know", "i'm not sure", "i am not sure", "i am unsure",
    "i'm unsure", "not sure", "i cannot answer", "i can't answer", "i can not answer", "unable to answer",
    "i have no idea", "no idea", "i don't have enough information", "i do not have enough information",
    "cannot be determined", "i'm not certain", "i am not certain",
)


def _norm_quotes(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'").replace("`", "'")


def is_refusal(text: str, broad: bool = False) -> bool:
    """Strict rule (docs/method.md section 8): contains "i don't know", case-insensitive. Broad: any phrase."""
    t = _norm_quotes(text).lower()
    if not broad:
        return STRICT_REFUSAL in t
    return any(p in t for p in BROAD_REFUSALS)


def cut_at_period(text: str) -> str:
    """Cut a generated answer at its first period (or newline); keeps the whole text when there is none.

    R-Tuning cut with text[:text.find('.')], which drops the last character when there is no period.
    """
    text = text.strip()
    for stop in (".", "\n"):
        pos = text.find(stop)
        if pos != -1:
            text = text[:pos]
    return text.strip()


def answer_ended(text: str) -> bool:
    """True once cut_at_period(text) can no longer change: the stripped text holds a period or a newline.

    Sampling stops a row here (kb.engine.generation), since the rest would be cut anyway."""
    t = text.lstrip()
    return "." in t or "\n" in t


def normalise(text: str) -> str:
    t = unicodedata.normalize("NFKC", _norm_quotes(text)).lower()
    return re.sub(r"\s+", " ", t).strip()


def open_correct(answer: str, golds: tuple[str, ...] | list[str]) -> bool:
    """Correct when a gold answer (or alias) occurs in the lowercased answer; a refusal never is."""
    if is_refusal(answer):
        return False
    a = normalise(answer)
    return any(g and normalise(g) in a for g in golds)


_LETTER_RE = re.compile(r"^\W*(?:[Aa]nswer\s*(?:is)?\s*:?\s*)?\(?([A-H])(?:[\).:,\s]|$)")  # "Answer: B" too


def parse_letter(text: str, n_choices: int = 4) -> str | None:
    """The letter a free-form MCQ reply commits to ('B', 'B.', '(B)', 'Answer: B'), else None."""
    t = text.strip()
    m = _LETTER_RE.match(t) or _LETTER_RE.match(t.upper() if len(t) <= 2 else t)
    if m and m.group(1) in LETTERS[:n_choices]:
        return m.group(1)
    return None


def classify_mcq(text: str, gold: str, n_choices: int = 4, broad: bool = False) -> str:
    """correct | incorrect | refused | fail_parse for one generated MCQ reply."""
    if is_refusal(text, broad=broad):
        return "refused"
    letter = parse_letter(text, n_choices)
    if letter is None:
        return "fail_parse"
    return "correct" if letter == gold else "incorrect"


def classify_open(text: str, golds: tuple[str, ...] | list[str], broad: bool = False) -> str:
    """correct | incorrect | refused for one generated open answer (empty counts as incorrect)."""
    if is_refusal(text, broad=broad):
        return "refused"
    return "correct" if open_correct(text, golds) else "incorrect"


# R-Tuning's `unsure` models answer "<answer>. Are you sure you accurately answered the question based
# on your internal knowledge? I am unsure." -- that suffix is their abstention. Evaluation counts it as
# a refusal (strict and broad) and judges the answer part before it otherwise. Briefly tuned models
# also emit the verdict without the question ("D. I am unsure.", seen from SmolLM2 after 16 LoRA
# steps): a verdict right after the answer's first sentence counts the same way.
_RTUNING_Q = re.compile(r"\bare\s+you\s+sure\b", re.IGNORECASE)
_RTUNING_VERDICT = re.compile(r"\bi\s+am\s+(un)?sure\b", re.IGNORECASE)
_VERDICT_AFTER_ANSWER = re.compile(r"^[^\n]*?\.\s*(i\s+am\s+(un)?sure)\b", re.IGNORECASE)


def _rtuning_tail(text: str) -> tuple[int, str | None] | None:
    """(where R-Tuning's expression starts, its verdict or None when cut off) or None without one."""
    m = _RTUNING_Q.search(text)
    if m is not None:
        v = _RTUNING_VERDICT.search(text, m.end())
        return m.start(), None if v is None else ("unsure" if v.group(1) else "sure")
    m = _VERDICT_AFTER_ANSWER.match(text)
    if m is not None:
        return m.start(1), "unsure" if m.group(2) else "sure"
    return None


def rtuning_verdict(text: str) -> str | None:
    """'sure' / 'unsure' when a reply carries R-Tuning's "(Are you sure ...?) I am (un)sure" after its
    answer, else None (also when the expression is cut off before the verdict)."""
    tail = _rtuning_tail(text)
    return None if tail is None else tail[1]


def rtuning_answer_part(text: str) -> str:
    """The reply before R-Tuning's expression (the whole reply when it has none)."""
    tail = _rtuning_tail(text)
    return text if tail is None else text[: tail[0]].rstrip()


# "A cell nucleus contains DNA": prose that opens with the article "A", not the letter A. A letter
# answer is "A", "A.", "A)", "A: ..." or "A. <option>"; "A" + space + a lowercase word is prose.
_ARTICLE_PROSE = re.compile(r"^\W*A\s+[a-z]")


def classify_reply(text: str, sample_choices: int, golds: tuple[str, ...] | list[str], broad: bool = False) -> str:
    """Evaluation's classifier for one generated reply, MCQ (sample_choices > 0) or open answer.

    R-Tuning's "... I am unsure." counts as refused; otherwise the answer part before R-Tuning's
    question is judged. MCQ: classify_mcq on that part, except that prose opening with the article
    "A" is fail_parse, not the letter A. Open: its first sentence (cut_at_period, as in probing), so a
    refusal or gold answer in later rambling does not count.
    """
    if rtuning_verdict(text) == "unsure":
        return "refused"
    answer = rtuning_answer_part(text)
    if sample_choices:
        if _ARTICLE_PROSE.match(answer) and not is_refusal(answer, broad=broad):
            return "fail_parse"
        return classify_mcq(answer, golds[0], sample_choices, broad=broad)
    return classify_open(cut_at_period(answer), golds, broad=broad)
