"""An evaluation run's bookkeeping, no model needed: which test set, prompt and table row a run is, its replies
judged by kb.answers, and its summary (rates, AP, the abstention suite, THS against the initial model's BASIC
run, the printed line), computed from its meta and records alone.

evaluate.py writes summaries through it after a run and for --reclassify; threshold_baseline.py for the
re-labelled runs of the free baseline; the tables recompute an older summary's suite with it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from kb import bootstrap, metrics
from kb.answers import classify_reply, cut_at_period, rtuning_answer_part, rtuning_verdict
from kb.data import dataset_spec, should_abstain
from kb.errors import KbError
from kb.io import read_json, write_json
from kb.layout import eval_paths, judged_path, meta_path, results_dir, summary_records, test_name, wrote
from kb.paths import repo_path
from kb.prompts import prompt_for, templates
from kb.records import apply_judgements, read_eval_records

INITIAL = metrics.INITIAL_ROW  # the initial model: its method folder, and its BASIC run's row
SHORT_NAMES = ("basic", "refuse")  # --template shorthands: the dataset's registered BASIC / REFUSE prompt


# ---------------------------------------------------------------- naming


def parse_tests(items: list[str]) -> list[tuple[str, str]]:
    """['mmlu:ID_test', 'arc_challenge:test'] -> [(dataset, split)], checked against the registry."""
    out = []
    for item in items:
        ds, sep, split = item.partition(":")
        if not sep or not ds or not split:
            raise KbError(f"--test {item!r}: expected DATASET:SPLIT, e.g. mmlu:ID_test or arc_challenge:test")
        spec = dataset_spec(ds)
        if split not in spec.splits:
            raise KbError(f"--test {item!r}: dataset {spec.name} has no split {split!r}; splits: {', '.join(spec.splits)}")
        out.append((spec.name, split))
    return out


def template_for(name: str, dataset: str) -> str:
    """'basic' / 'refuse' -> the dataset's template of that role (kb.prompts.prompt_for); any registered name as is."""
    if name in SHORT_NAMES:
        return prompt_for(dataset, name)
    kind = dataset_spec(dataset).kind
    if name not in templates():
        raise KbError(f"unknown prompt template {name!r}; use basic, refuse or one of: {', '.join(templates())}")
    needs_options = "{options}" in templates()[name]["item"]
    if needs_options != (kind == "mcq"):
        raise KbError(f"prompt template {name!r} is for {'multiple-choice' if needs_options else 'open'} questions, "
                      f"not {kind} ones")
    return name


def row_name(method: str, template: str, dataset: str) -> str:
    """The table row (and the record's `method`): the initial model's BASIC run is 'initial', a tuned
    model's REFUSE run is its method name; any other prompt is appended ('initial_refuse', ...).
    THS compares every row with the 'initial' row of the same test set."""
    default = prompt_for(dataset, "basic" if method == INITIAL else "refuse")
    if template == default:
        return method
    short = next((k for k in SHORT_NAMES if prompt_for(dataset, k) == template), template)
    return f"{method}_{short}"


# ---------------------------------------------------------------- judging and the summary


def write_summary(args: argparse.Namespace, meta: dict[str, Any], records: list[dict[str, Any]], rec_path: Path,
                  sum_path: Path, wall_s: float | None = None) -> dict[str, Any]:
    """The summary of one run, from its meta and records alone (so --reclassify can redo it); the verdicts of
    a judgement file beside the records (--reclassify's) replace the replies' own."""
    records = apply_judgements(rec_path, records)
    key = meta["run_key"]
    dataset, split, label, row = key["dataset"], key["split"], meta["label"], meta["row"]
    kind = dataset_spec(dataset).kind
    summary = summarise_eval(records, kind)
    summary.update(model=label, method=key["method"], row=row, tuned=meta["tuned"], dataset=dataset, split=split,
                   test_set=test_name(dataset, split), template=key["prompt"]["template"], prompt=key["prompt"],
                   max_new_tokens=key["max_new_tokens"], records=rec_path.name,
                   wall_s_this_run=None if wall_s is None else round(wall_s, 1))  # a resumed run: its own part only
    if judged_path(rec_path).is_file():
        summary["judgements"] = judged_path(rec_path).name
    baseline = find_baseline(args, label, dataset, split, kind, meta, records, row, summary)
    summary["baseline"] = baseline
    summary["THS"] = _round(baseline.get("THS"))
    summary["ci"]["THS"] = baseline.get("THS_ci")
    summary["broad"]["THS"] = _round(baseline.get("THS_broad"))
    summary["line"] = _line(label, summary)
    summary["suite"] = suite_summary(records, dataset)
    summary["meta"] = meta
    write_json(sum_path, summary)
    print(summary["line"])
    if summary["suite"]["strict"]["n_should_abstain"]:
        print("  " + abstention_line(summary["suite"]))
    if baseline.get("note") and not dataset_spec(dataset).options.get("abstain_groups"):  # no THS on abstention sets
        print("  note:", baseline["note"])
    wrote(rec_path, *(p for p in (meta_path(rec_path), judged_path(rec_path)) if p.is_file()))
    wrote(sum_path)
    return summary


def reclassify(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records with outcome, outcome_broad and rtuning_verdict recomputed from the stored replies by the
    current kb.answers rules (no model needed)."""
    out = []
    for r in records:
        golds = (r["gold"], *r.get("aliases", []))
        n = len(r.get("choices", []))
        out.append({**r, "rtuning_verdict": rtuning_verdict(r["reply"]), "outcome": classify_reply(r["reply"], n, golds),
                    "outcome_broad": classify_reply(r["reply"], n, golds, broad=True),
                    **({"answer": cut_at_period(rtuning_answer_part(r["reply"]))} if not n else {})})
    return out


def summarise_eval(records: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """Rates (strict headline, broad separately), AP and reply statistics, from the records alone."""
    strict = metrics.summarise_labels([r["outcome"] for r in records])
    broad = metrics.summarise_labels([r["outcome_broad"] for r in records])
    out: dict[str, Any] = {"n": len(records), **{k: strict[k] for k in ("Pc", "Pw", "Pr", "P_fail")},
                           "counts": strict["counts"], "broad": broad}
    with_conf = [r for r in records if r.get("answer_conf") is not None and r.get("sure_prob") is not None]
    ap, ap_ci = bootstrap.ap_with_interval(metrics.QuestionTable.from_records(records))
    out["AP"] = _round(ap)
    out["AP_n"] = len(with_conf)
    # 95% bootstrap intervals over questions (kb.bootstrap); THS's is added with its baseline.
    out["ci"] = bootstrap.rate_intervals([r["outcome"] for r in records])
    out["ci"]["AP"] = ap_ci
    if with_conf:
        out["mean_sure_prob"] = round(float(np.mean([r["sure_prob"] for r in with_conf])), 6)
        out["ap_accuracy"] = round(100 * float(np.mean([bool(r["ap_correct"]) for r in with_conf])), 4)
    verdicts = [r.get("rtuning_verdict") for r in records]
    out["rtuning_expression"] = {"sure": verdicts.count("sure"), "unsure": verdicts.count("unsure")}
    out["empty_replies"] = sum(1 for r in records if not r["reply"].strip())
    if kind == "mcq" and with_conf:
        n = len(with_conf)
        out["pred_share"] = {k: round(sum(1 for r in with_conf if r["pred"] == k) / n, 4) for k in "ABCD"}
    return out


def suite_summary(records: list[dict[str, Any]], dataset: str) -> dict[str, dict[str, Any]]:
    """kb.metrics.suite of the run's per-question table, strict and broad refusal rule. Records written
    before `should_abstain` was stored get it from the registry (dataset, group)."""
    recs = [r if "should_abstain" in r else {**r, "should_abstain": should_abstain(dataset, r.get("group", ""))}
            for r in records]
    return {rule: {k: _round(v, 6) if isinstance(v, float) else v
                   for k, v in metrics.suite(metrics.QuestionTable.from_records(recs, broad=rule == "broad")).items()}
            for rule in ("strict", "broad")}


def abstention_line(suite: dict[str, dict[str, Any]]) -> str:
    """One printed line: refusal rates on should-abstain / should-answer questions and abstention P/R/F1."""
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1f}"

    def frac(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}"

    s, b = suite["strict"], suite["broad"]
    return (f"abstention: refused {pct(s['Pr_should_abstain'])}% of {s['n_should_abstain']} should-abstain, "
            f"{pct(s['Pr_should_answer'])}% of {s['n'] - s['n_should_abstain']} should-answer | P {frac(s['abstain_precision'])} "
            f"R {frac(s['abstain_recall'])} F1 {frac(s['abstain_f1'])} | broad F1 {frac(b['abstain_f1'])}")


def _round(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def _line(label: str, s: dict[str, Any]) -> str:
    ths = "n/a" if s["THS"] is None else bootstrap.fmt(s["THS"], s["ci"].get("THS"))
    ap = "n/a" if s["AP"] is None else bootstrap.fmt(s["AP"], s["ci"].get("AP"))
    return (f"{label} {s['row']} {s['test_set']} ({s['template']}, n={s['n']}): Pc {s['Pc']:.1f} Pw {s['Pw']:.1f} "
            f"Pr {s['Pr']:.1f} P_fail {s['P_fail']:.1f} | THS {ths} | AP {ap} | Pr broad {s['broad']['Pr']:.1f}")


# ---------------------------------------------------------------- THS baseline


def find_baseline(args: argparse.Namespace, label: str, dataset: str, split: str, kind: str, meta: dict[str, Any],
                  records: list[dict[str, Any]], row: str, summary: dict[str, Any]) -> dict[str, Any]:
    """THS against the initial model's BASIC run on the same questions, with its paired 95% interval
    (null with a note when that run is absent or saw other questions)."""
    if row == INITIAL:  # this is the baseline itself
        base = {"path": "self", "outcomes": {r["id"]: (r["outcome"], r["outcome_broad"]) for r in records}}
    else:
        path = repo_path(args.baseline) if getattr(args, "baseline", None) else \
            eval_paths(results_dir(args.results_dir, label), INITIAL, test_name(dataset, split), prompt_for(dataset, "basic"))[1]
        if not path.is_file():
            return {"path": str(path), "THS": None, "THS_broad": None,
                    "note": f"THS not computed: no initial BASIC summary at {path}; run evaluate.py --model <base> "
                            f"--test {dataset}:{split} --template basic first (or pass --baseline)"}
        base = baseline_outcomes(path, read_json(path), records)
        if "note" in base:
            return {**base, "THS": None, "THS_broad": None}
    ids = [r["id"] for r in records]
    strict1 = metrics.paired_baseline(ids, {i: o[0] for i, o in base["outcomes"].items()})
    broad1 = metrics.paired_baseline(ids, {i: o[1] for i, o in base["outcomes"].items()})
    assert strict1 is not None and broad1 is not None  # baseline_outcomes checked that it has every question
    r1, b1 = metrics.rates(strict1), metrics.rates(broad1)
    outcomes = [r["outcome"] for r in records]
    return {"path": base["path"], "n": len(ids), "Pc": r1["Pc"], "Pw": r1["Pw"], "P_fail": r1["P_fail"],
            "broad": {"Pc": b1["Pc"], "Pw": b1["Pw"], "P_fail": b1["P_fail"]},
            "THS": metrics.ths_against(outcomes, strict1),
            "THS_ci": None if row == INITIAL else bootstrap.ths_interval(outcomes, strict1),
            "THS_broad": metrics.ths_against([r["outcome_broad"] for r in records], broad1)}


def baseline_outcomes(path: Path, base: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The baseline run's (strict, broad) outcome per question id, when it has every question of `records`."""
    rec_path = summary_records(path, base)
    ids = [r["id"] for r in records]
    if rec_path.is_file():
        by_id = {r["id"]: (r["outcome"], r["outcome_broad"]) for r in read_eval_records(rec_path)}
        if metrics.paired_baseline(ids, by_id) is not None:
            return {"path": str(path), "outcomes": by_id}
    theirs = (base.get("meta") or {}).get("questions") or {}
    return {"path": str(path), "note": f"THS not computed: the initial BASIC run at {path} used other questions "
                                       f"({theirs.get('n')} vs {len(ids)}); rerun it with the same --limit/--seed"}
