"""The free baseline: the initial model M0 plus a confidence threshold.

M0 answers every question; the baseline keeps an answer when M0's own confidence in it is at least t and
refuses otherwise. t is chosen on a training split only, to maximise THS there (against M0 on those
questions), then applied unchanged to the test sets. Confidence is `answer_conf` of M0's evaluation
records: the max letter probability (MCQ) or the geometric mean of the greedy reply's token
probabilities (open answers). No model runs: the baseline re-labels M0's stored replies, so it sits on
exactly the initial model's questions and every table compares it like a tuned model.
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Sequence
from typing import Any

from kb import metrics
from kb.data import dataset_spec
from kb.errors import KbError
from kb.eval_summary import INITIAL, parse_tests, write_summary
from kb.io import read_json, write_json, write_jsonl
from kb.layout import eval_paths, judged_path, results_dir, test_name, threshold_summary, wrote
from kb.prompts import prompt_for
from kb.records import read_eval_records

METHOD = "threshold"


def confidence(rec: dict[str, Any]) -> float:
    """M0's confidence in its reply; a reply with none (empty) has confidence 0."""
    c = rec.get("answer_conf")
    return 0.0 if c is None else float(c)


def apply(outcome: str, conf: float, t: float) -> str:
    return "refused" if conf < t else outcome


def ths_at(records: Sequence[dict[str, Any]], t: float) -> float | None:
    """THS on `records` of M0 refusing below t, against M0 answering everything (same questions)."""
    return metrics.ths_against([apply(r["outcome"], confidence(r), t) for r in records], [r["outcome"] for r in records])


def choose_threshold(train: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The t that maximises THS on the training records (ties: the lowest t, i.e. the fewest refusals).
    Candidates: 0 (answer all), every distinct confidence, and +inf (refuse all)."""
    if not train:
        raise KbError("threshold baseline: no training records to choose t from")
    cands = [0.0, *sorted({confidence(r) for r in train}), math.inf]
    curve = [(t, ths_at(train, t)) for t in cands]
    scored = [(t, v) for t, v in curve if v is not None]
    if not scored:
        raise KbError("threshold baseline: THS is undefined on the training records (the initial model makes no "
                      "wrong answer there), so no threshold can be chosen")
    best_t, best = max(scored, key=lambda tv: (tv[1], -tv[0]))
    refused = sum(1 for r in train if confidence(r) < best_t)
    return {"t": None if math.isinf(best_t) else best_t, "refuse_all": math.isinf(best_t), "train_THS": round(best, 4),
            "train_n": len(train), "train_refused": refused,
            "curve": [[None if math.isinf(t) else round(t, 8), None if v is None else round(v, 4)] for t, v in curve]}


def relabel(records: Sequence[dict[str, Any]], t: float, test: str) -> list[dict[str, Any]]:
    out = []
    for r in records:
        c = confidence(r)
        out.append({**r, "method": METHOD, "test_set": test, "threshold": t, "refused_by_threshold": c < t,
                    "outcome": apply(r["outcome"], c, t), "outcome_broad": apply(r["outcome_broad"], c, t)})
    return out


def _initial_run(args: argparse.Namespace, label: str, dataset: str, split: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rec_path, sum_path, meta_path = eval_paths(results_dir(args.results_dir, label), INITIAL, test_name(dataset, split),
                                               prompt_for(dataset, "basic"))
    if not rec_path.is_file() or not meta_path.is_file():
        raise KbError(f"{rec_path}: no BASIC evaluation of the initial model; run evaluate.py --model <M0> "
                      f"--template basic --test {dataset}:{split} first")
    meta = read_json(meta_path)
    records = read_eval_records(rec_path)  # every record checked up front, re-judged verdicts applied
    n = (meta.get("questions") or {}).get("n") if isinstance(meta, dict) else None
    if len(records) != n:
        raise KbError(f"{rec_path}: {len(records)} records for {n} questions; finish that evaluation first")
    return records, meta


def run_threshold(args: argparse.Namespace) -> dict[str, Any]:
    """Choose t on --train, write the baseline's evaluation of every --test beside the tuned models'."""
    label = args.model
    (train_ds, train_split), = parse_tests([args.train])
    tests = parse_tests(args.test)
    kinds = {dataset_spec(ds).kind for ds, _ in [(train_ds, train_split), *tests]}
    if len(kinds) != 1:
        raise KbError("threshold baseline: the training split and the test sets must be of one kind (mcq or open)")
    train, _ = _initial_run(args, label, train_ds, train_split)
    train_ids = {r["id"] for r in train}
    chosen = choose_threshold(train)
    t = math.inf if chosen["refuse_all"] else chosen["t"]
    print(f"{label} threshold baseline: t = {chosen['t'] if not chosen['refuse_all'] else 'refuse all'} "
          f"(THS {chosen['train_THS']:.1f} on {chosen['train_n']} {test_name(train_ds, train_split)} questions, "
          f"{chosen['train_refused']} refused there)")
    summaries = []
    for ds, split in tests:
        records, meta0 = _initial_run(args, label, ds, split)
        overlap = train_ids & {r["id"] for r in records}
        if overlap:
            raise KbError(f"threshold baseline: {len(overlap)} questions of {ds}:{split} are also in the training "
                          f"split {args.train} (e.g. {sorted(overlap)[0]}); t must come from other questions")
        template = prompt_for(ds, "basic")
        res = results_dir(args.results_dir, label)
        rec_path, sum_path, meta_path = eval_paths(res, METHOD, test_name(ds, split), template)
        meta = copy.deepcopy(meta0)
        meta["run_key"]["method"] = METHOD
        meta.update(row=METHOD, tuned=False, threshold={**chosen, "train": args.train, "confidence": "answer_conf",
                                                         "initial_records": str(eval_paths(res, INITIAL, test_name(ds, split),
                                                                                           template)[0])})
        recs = relabel(records, t, test_name(ds, split))
        write_jsonl(rec_path, recs)
        judged_path(rec_path).unlink(missing_ok=True)  # verdicts of earlier records would override the threshold's
        write_json(meta_path, meta)
        summaries.append(write_summary(args, meta, recs, rec_path, sum_path))
    out = {"model": label, "method": METHOD, **chosen, "train": args.train, "tests": [f"{d}:{s}" for d, s in tests]}
    wrote(write_json(threshold_summary(results_dir(args.results_dir, label), test_name(train_ds, train_split)), out))
    return out
