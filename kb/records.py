"""Probe and evaluation records: their fields declared once, and the validators derived from them.

The TypedDicts below are what run_MMLU.py / run_ParaRel.py (probe_*.jsonl) and evaluate.py
(eval/<method>/*.jsonl) write, one per question; the stages build records through them and every reader
(report, tables, THS baseline, threshold baseline) reads them through `read_probe_records` /
`read_eval_records`, which check each row against the same declarations: a missing field, a wrong type
or an unknown label is one KbError line naming file, row and field. State and flow records live in
kb.statefile.

Replies are never rewritten: `evaluate.py --reclassify` writes its verdicts to a judgement file beside
the replies (`<TEST>_<template>.judged.jsonl`, one JudgementRecord per question), and
`read_eval_records` lays them over the records whose reply they judged.
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, NotRequired, TypedDict, Union, get_args, get_origin, get_type_hints

from kb.errors import data_error
from kb.io import iter_jsonl
from kb.layout import judged_path


@dataclass(frozen=True)
class Range:
    """A closed interval a number must lie in (an Annotated marker read by the validator)."""

    lo: float
    hi: float


Unit = Annotated[float, Range(0.0, 1.0)]  # a probability or a confidence
Outcome = Literal["correct", "incorrect", "refused", "fail_parse"]  # kb.metrics.LABELS
Verdict = Literal["sure", "unsure"]  # R-Tuning's "I am (un)sure" after the answer


# ------------------------------------------------------------------------------------------ fields
# Mixins in the order the fields are written; a record type is the mixins of what its stage writes.


class _Question(TypedDict):
    id: str
    group: str  # MMLU subject, ParaRel relation, SelfAware / FalseQA label
    question: str
    gold: str  # gold letter (MCQ) or gold text (open; empty for questions without an answer)


class _Sampled(TypedDict):
    samples: NotRequired[list[str]]  # R-Tuning-U (`uncertain`): answers sampled per question
    entropy: NotRequired[float]  # entropy of those samples


class ProbeMCQRecord(_Question, _Sampled):
    """One multiple-choice probe question (R-Tuning Task 2.1): the argmax letter decides `correct`."""

    choices: list[str]
    letter_probs: list[Unit]  # renormalised over the question's letters
    pred: str
    correct: bool
    answer_conf: Unit  # the highest letter probability


class ProbeOpenRecord(_Question, _Sampled):
    """One open-answer probe question: the greedy answer, cut at the first period, contains the gold."""

    aliases: list[str]
    generation: str  # raw greedy text
    answer: str  # cut at the first period
    correct: bool
    answer_conf: Unit | None  # geometric mean of the greedy tokens' probabilities


class _Judged(TypedDict):
    reply: str
    continued: bool  # the reply was continued to read R-Tuning's verdict
    rtuning_verdict: Verdict | None
    outcome: Outcome  # strict refusal rule
    outcome_broad: Outcome  # broad refusal phrases
    answer_conf: Unit | None
    ap_correct: bool  # the answer is right whatever the reply's verdict (AP's label)
    sure_prob: NotRequired[Unit]  # p(sure) / (p(sure) + p(unsure)); absent with --no-ap


class EvalReplyMCQ(_Question, _Judged):
    """What evaluate.py reads off one multiple-choice reply, before the run's own fields are added."""

    choices: list[str]
    letter_probs: list[Unit]
    pred: str


class EvalReplyOpen(_Question, _Judged):
    """What evaluate.py reads off one open-answer reply, before the run's own fields are added."""

    aliases: list[str]
    answer: str  # R-Tuning's answer part, cut at the first period


class _Run(TypedDict):
    method: str  # the table row: initial, initial_refuse, a tuned method, threshold
    test_set: str  # e.g. ParaRel_ID_test
    template: str
    should_abstain: NotRequired[bool]  # absent in records written before it was stored (registry decides)
    threshold: NotRequired[float]  # threshold baseline only
    refused_by_threshold: NotRequired[bool]  # threshold baseline only


class EvalMCQRecord(EvalReplyMCQ, _Run):
    """One line of an evaluation records file, multiple choice."""


class EvalOpenRecord(EvalReplyOpen, _Run):
    """One line of an evaluation records file, open answer."""


class JudgementRecord(TypedDict):
    """One re-judged reply (evaluate.py --reclassify): the fields the answer rules derive from `reply`."""

    id: str
    reply: str  # the reply judged; the judgement applies only to a record with this very reply
    rtuning_verdict: Verdict | None
    outcome: Outcome
    outcome_broad: Outcome
    answer: NotRequired[str]  # open answers


ProbeRecord = ProbeMCQRecord | ProbeOpenRecord
EvalRecord = EvalMCQRecord | EvalOpenRecord
JUDGED_FIELDS = ("rtuning_verdict", "outcome", "outcome_broad", "answer")  # what a judgement replaces


# ------------------------------------------------------------------------------------- validation


@cache
def fields_of(record_type: type) -> dict[str, tuple[Any, bool]]:
    """{field: (type, required)} of a TypedDict, from its annotations (NotRequired marks optional ones)."""
    out = {}
    for name, tp in get_type_hints(record_type, include_extras=True).items():
        required = get_origin(tp) is not NotRequired
        out[name] = (tp if required else get_args(tp)[0], required)
    return out


def _kind(tp: Any) -> str:
    """A type's name in an error message: 'a string', 'a number or null', ..."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _kind(get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return " or ".join(_kind(a) for a in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(get_args(tp))
    if origin is list:
        return "a list"
    return {str: "a string", bool: "true or false", float: "a number", int: "an integer", type(None): "null"}[tp]


def check_value(value: Any, tp: Any) -> str | None:
    """None when `value` (parsed JSON) has type `tp`, else why not. Numbers must be finite; bools are not numbers."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, *marks = get_args(tp)
        bad = check_value(value, base)
        for m in marks:
            if bad is None and isinstance(m, Range) and not m.lo <= value <= m.hi:
                bad = f"must lie in [{m.lo:g}, {m.hi:g}], got {value}"
        return bad
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if any(check_value(value, a) is None for a in options):
            return None
        for a in options:  # a number of the right type but out of range says so, not "or null"
            if get_origin(a) is Annotated and check_value(value, get_args(a)[0]) is None:
                return check_value(value, a)
        return f"must be {_kind(tp)}, got {_shown(value)}"
    if origin is Literal:
        return None if isinstance(value, str) and value in get_args(tp) else f"must be {_kind(tp)}, got {_shown(value)}"
    if origin is list:
        if not isinstance(value, list):
            return f"must be a list, got {type(value).__name__}"
        for i, x in enumerate(value):
            bad = check_value(x, get_args(tp)[0])
            if bad:
                return f"item {i} {bad}"
        return None
    if tp is type(None):
        return None if value is None else f"must be null, got {_shown(value)}"
    if tp is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {_shown(value)}"
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, int if tp is int else int | float):
            return f"must be {_kind(tp)}, got {_shown(value)}"
        return None if math.isfinite(value) else f"must be finite, got {value}"
    if tp is str:
        return None if isinstance(value, str) else f"must be a string, got {_shown(value)}"
    raise AssertionError(f"no check for {tp!r}")


def _shown(value: Any) -> str:
    return "null" if value is None else repr(value)[:40] if isinstance(value, str) else type(value).__name__


def validate(record_type: type, path: Path, row: int, rec: Mapping[str, Any]) -> None:
    """Check one parsed record against a record type: every required field present, every field's type."""
    for name, (tp, required) in fields_of(record_type).items():
        if name not in rec:
            if required:
                raise data_error(path, "missing field", row=row, field=name)
            continue
        bad = check_value(rec[name], tp)
        if bad:
            raise data_error(path, bad, row=row, field=name)


def record_kind(rec: Mapping[str, Any]) -> str:
    """mcq or open: multiple-choice records carry their `choices`."""
    return "mcq" if "choices" in rec else "open"


PROBE_TYPES: dict[str, type] = {"mcq": ProbeMCQRecord, "open": ProbeOpenRecord}
EVAL_TYPES: dict[str, type] = {"mcq": EvalMCQRecord, "open": EvalOpenRecord}


def _read(path: Path, by_kind: Mapping[str, type], same: Sequence[str] = ()) -> list[Any]:
    """Every record of a file, checked against the type of its kind; one kind per file, ids unique, and the
    `same` fields equal on every row (they describe the run, not the question)."""
    out: list[Any] = []
    seen: set[str] = set()
    for row, rec in iter_jsonl(path):
        kind = record_kind(rec)
        if out and kind != record_kind(out[0]):
            raise data_error(path, f"a {kind} record in a file of {record_kind(out[0])} records", row=row, field="choices")
        validate(by_kind[kind], path, row, rec)
        if rec["id"] in seen:
            raise data_error(path, f"duplicate id {rec['id']!r}", row=row, field="id")
        for name in same:
            if out and rec[name] != out[0][name]:
                raise data_error(path, f"{rec[name]!r} differs from row 1's {out[0][name]!r}", row=row, field=name)
        seen.add(rec["id"])
        out.append(rec)
    return out


def read_probe_records(path: str | Path) -> list[ProbeRecord]:
    """A probe file's records, each checked against ProbeMCQRecord / ProbeOpenRecord."""
    return _read(Path(path), PROBE_TYPES)


def read_eval_records(path: str | Path) -> list[EvalRecord]:
    """An evaluation records file, each row checked, with the verdicts of its judgement file (if any) laid
    over the replies they judged: what every reader of evaluation records should see."""
    path = Path(path)
    return apply_judgements(path, _read(path, EVAL_TYPES, same=("method", "test_set", "template")))


# ------------------------------------------------------------------------------------- judgements


def judgement(rec: Mapping[str, Any]) -> JudgementRecord:
    """The re-judged fields of one (re-classified) record, written to the judgement file."""
    out = JudgementRecord(id=rec["id"], reply=rec["reply"], rtuning_verdict=rec["rtuning_verdict"], outcome=rec["outcome"],
                          outcome_broad=rec["outcome_broad"])
    if "answer" in rec:
        out["answer"] = rec["answer"]
    return out


def apply_judgements(records_path: Path, records: list[Any]) -> list[Any]:
    """`records` with the judged fields replaced where the judgement file beside them judged that very reply
    (a judgement of another reply, e.g. from before a --restart, does not apply). Key order is kept."""
    jpath = judged_path(records_path)
    if not jpath.is_file():
        return records
    judged = {j["id"]: j for j in _read(jpath, {"mcq": JudgementRecord, "open": JudgementRecord})}
    out = []
    for r in records:
        j = judged.get(r["id"])
        out.append({**r, **{k: j[k] for k in JUDGED_FIELDS if k in j}} if j is not None and j["reply"] == r["reply"] else r)
    return out
