"""One markdown table of every evaluation summary under results/ (model x method x test set).

Reads results/<model>/eval/<method>/<TEST>_<template>.json (written by evaluate.py) and lays out
Pc, Pw, Pr, P_fail, THS, AP and the broad refusal rate. Rows whose THS could not be computed at
evaluation time (the initial BASIC run came later) get it here from the 'initial' row of the same
model and test set, when both saw the same questions. Other stages add columns through
`extra_columns` (CRaFT adds CRSS per training set).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kb import bootstrap, layout, metrics
from kb.data import abstention_datasets
from kb.errors import KbError
from kb.eval_summary import suite_summary
from kb.io import read_json, write_text
from kb.metrics import INITIAL_ROW
from kb.paths import repo_path
from kb.records import read_eval_records

COLUMNS = ("model", "method", "test set", "prompt", "n", "Pc", "Pw", "Pr", "P_fail", "THS", "AP", "Pr broad")
ExtraColumn = Callable[[dict[str, Any]], Any] | Mapping[str, Any]


def load_summaries(results_dir: str | Path, models: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Every evaluation summary under results/<model>/eval/ (optionally only `models`)."""
    root = repo_path(results_dir)
    out = []
    for path in layout.eval_summary_files(root):
        s = read_json(path)
        if not isinstance(s, dict) or "Pc" not in s or "row" not in s:
            continue  # not an evaluate.py summary
        if models and s.get("model") not in models:
            continue
        s["_path"] = str(path)
        out.append(s)
    if models:
        missing = [m for m in models if not any(s.get("model") == m for s in out)]
        if missing:
            raise KbError(f"{root}: no evaluation summaries for {', '.join(missing)} (run evaluate.py first)")
    return out


def _ths(s: dict[str, Any], initial: dict[str, Any] | None) -> float | None:
    """The summary's THS, else (the initial BASIC run came later) THS against that run as evaluate.py computes
    it: from both runs' records on this run's questions (kb.metrics.paired_baseline). Without records beside
    the summaries, from their rates when both runs saw the same questions."""
    if s.get("THS") is not None:
        return s["THS"]
    if initial is None:
        return None
    mine, theirs = _records(s), _records(initial)
    if mine and theirs:
        base = metrics.paired_baseline(list(mine), {i: r["outcome"] for i, r in theirs.items()})
        return metrics.ths_against([r["outcome"] for r in mine.values()], base)
    same = (s.get("meta") or {}).get("questions") == (initial.get("meta") or {}).get("questions")
    return metrics.ths_of_rates(s, initial) if same else None


def _with_ci(s: dict[str, Any], key: str, value: float | None) -> str:
    return bootstrap.fmt(value, (s.get("ci") or {}).get(key) if value is not None else None)


def _extra(col: ExtraColumn, s: dict[str, Any]) -> Any:
    if callable(col):
        return col(s)
    for key in (s.get("row"), s.get("method")):
        if key in col:
            return col[key]
    return None


def table_rows(summaries: list[dict[str, Any]], extra_columns: Mapping[str, ExtraColumn] | None = None) -> list[dict[str, Any]]:
    """Sorted rows: per model and test set, the initial model first, then methods by name."""
    initial = {(s["model"], s["test_set"]): s for s in summaries if metrics.is_initial_row(s["row"])}
    rows = []
    for s in sorted(summaries, key=lambda s: (s["model"], s["test_set"], s["row"] != "initial",
                                              not s["row"].startswith("initial"), s["row"])):
        ths = _ths(s, initial.get((s["model"], s["test_set"])))
        row = {"model": s["model"], "method": s["row"], "test set": s["test_set"], "prompt": s["template"],
               "n": s["n"], **{k: _with_ci(s, k, s[k]) for k in ("Pc", "Pw", "Pr")}, "P_fail": s["P_fail"],
               "THS": _with_ci(s, "THS", ths), "AP": _with_ci(s, "AP", s.get("AP")), "Pr broad": s["broad"]["Pr"]}
        for name, col in (extra_columns or {}).items():
            row[name] = _extra(col, s)
        rows.append(row)
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def markdown(rows: list[dict[str, Any]], extra: Sequence[str] = ()) -> str:
    cols = list(COLUMNS) + list(extra)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


NOTES = (
    "Pc / Pw / Pr / P_fail: % of questions answered correctly / wrongly / refused (strict: the reply contains "
    "\"I don't know\"; R-Tuning's \"... I am unsure.\" also counts) / unparseable; they sum to 100. "
    "THS = (Pc·W1 − W·Pc1)/W1 with W = Pw + P_fail (an unparseable reply counts as wrong, as in CRaFT), "
    "against the initial model's BASIC row (method `initial`, Pc1 and W1) on the same "
    "questions; 0 for it, 100 for a perfect model. `value [lo, hi]`: the value and its 95% bootstrap interval "
    f"over questions ({bootstrap.N_RESAMPLES} seeded resamples; THS's resamples the method and the initial "
    "model together). AP: R-Tuning's average precision (×100) of "
    "0.5·answer confidence + 0.5·p(sure). Pr broad: refusals by the broader phrase list (kb/answers.py). "
    "CRSS (×100): CRaFT's static conflict rate of the RAIT set the model was tuned on (build_rait.py, "
    "τ_sim from its file); – for models not tuned on a RAIT set. "
    "– = not computable (no initial BASIC row, or no correct answer for AP)."
)


def training_crss(s: dict[str, Any]) -> float | None:
    """CRSS of the RAIT set a tuned model was trained on, read from that training file's own meta
    (evaluated model dir -> kb_finetune.json -> train_file -> kb_meta.crss); None for other rows."""
    model = (s.get("meta") or {}).get("model") or {}
    run = model.get("adapter") or model.get("source")
    if not run or not (Path(run) / "kb_finetune.json").is_file():
        return None
    train = read_json(Path(run) / "kb_finetune.json").get("train_file")
    if not train or not Path(train).is_file():
        return None
    return _file_crss(str(train))


@functools.lru_cache(maxsize=64)
def _file_crss(train: str) -> float | None:
    """kb_meta.crss of one training file (x100), read once although each test set has a row for it."""
    data = read_json(Path(train))
    crss = (data.get("kb_meta") or {}).get("crss") if isinstance(data, dict) else None
    return None if crss is None else round(100 * float(crss), 1)


DEFAULT_EXTRA: dict[str, ExtraColumn] = {"CRSS": training_crss}

# Method pairs compared head to head where both were evaluated (besides every method vs the initial model):
# CRaFT's claim over R-Tuning-style supervision, and refusal tuning against the free confidence threshold.
COMPARISONS = (("craft", "cor_rait"), ("craft", "corcer_rait"), ("rtuning_unsure", "threshold"),
               ("rtuning_unknown", "threshold"), ("craft", "threshold"), ("cor_rait", "threshold"))
DIFF_COLUMNS = ("test set", "comparison", "n", "ΔPc", "ΔW", "ΔPr", "ΔTHS")


def _records(s: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-question records beside a summary (none when they were not kept: no paired rows then)."""
    path = layout.summary_records(Path(s["_path"]), s)
    return {r["id"]: r for r in read_eval_records(path)} if path.is_file() else {}


def difference_rows(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """paired_differences over the records beside evaluation summaries."""
    return paired_differences({(s["model"], s["test_set"], s["row"]): functools.partial(_records, s) for s in summaries})


def paired_differences(runs: Mapping[tuple[str, str, str], Callable[[], dict[str, dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Paired differences on the questions two runs share: each method minus the initial model (ΔPc, ΔW =
    Δ(Pw + P_fail), ΔPr), and the pairs of COMPARISONS (also ΔTHS, both against the initial model).
    runs: (model, test set, method) -> a function returning that run's records by question id."""
    loaded: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}

    def recs(key: tuple[str, str, str]) -> dict[str, dict[str, Any]]:
        if key not in loaded:
            loaded[key] = runs[key]()
        return loaded[key]

    rows = []
    for model, test in sorted({(m, t) for m, t, _ in runs}):
        if (model, test, INITIAL_ROW) not in runs:
            continue
        pairs = [(r, INITIAL_ROW) for m, t, r in sorted(runs) if (m, t) == (model, test) and not r.startswith(INITIAL_ROW)]
        pairs += [(a, b) for a, b in COMPARISONS if (model, test, a) in runs and (model, test, b) in runs]
        for a, b in pairs:
            ra, rb, r0 = recs((model, test, a)), recs((model, test, b)), recs((model, test, INITIAL_ROW))
            ids = [i for i in ra if i in rb and i in r0]
            if len(ids) < 2:
                continue
            xa, xb, x0 = (bootstrap.codes([r[i]["outcome"] for i in ids]) for r in (ra, rb, r0))
            row: dict[str, Any] = {"model": model, "test set": test, "comparison": f"{a} − {b}", "n": len(ids)}
            for key, stat in (("ΔPc", bootstrap.rate_of("correct")), ("ΔW", bootstrap.rate_of("incorrect", "fail_parse")),
                              ("ΔPr", bootstrap.rate_of("refused"))):
                row[key] = bootstrap.difference(stat, [xa], [xb])
            row["ΔTHS"] = bootstrap.difference(bootstrap.ths_stat, [xa], [xb], [x0]) if b != INITIAL_ROW else None
            rows.append(row)
    return rows


def _diff_cell(d: dict[str, Any] | None) -> str:
    if d is None:
        return "–"
    return bootstrap.fmt(d["value"], d["ci"]) + (" *" if d["significant"] else "")


def differences_markdown(rows: list[dict[str, Any]]) -> str:
    cols = list(DIFF_COLUMNS)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) if c in ("test set", "comparison", "n") else _diff_cell(r[c])
                                       for c in cols) + " |")
    return "\n".join(lines) + "\n"


DIFF_NOTES = (
    "Paired differences on the same questions (first method minus second), with their 95% bootstrap interval "
    "(questions resampled together); * marks an interval that excludes 0. ΔW is the change in wrong answers "
    "(Pw + P_fail); ΔTHS compares the two methods' THS against the same initial model. A difference without * "
    "is not distinguishable from sampling noise at this number of questions; one with * is, for these "
    "questions and this one training run (seed), not across training runs."
)


def build_table(results_dir: str | Path = "results", models: Sequence[str] | None = None,
                extra_columns: Mapping[str, ExtraColumn] | None = None, write: bool = True,
                test_sets: Sequence[str] | None = None) -> dict[str, str]:
    """Markdown per model ({model: text}); with write, saved as results/<model>/table_rtuning.md.
    The abstention sets have their own table (abstention_table); `test_sets` (e.g. ParaRel_ID_test)
    keeps only those.

    extra_columns: {column name: function(summary) -> value, or {method or row name: value}}.
    """
    extra_columns = DEFAULT_EXTRA if extra_columns is None else extra_columns
    abstention = set(abstention_datasets())
    summaries = [s for s in load_summaries(results_dir, models)
                 if not any(s["test_set"].startswith(f"{a}_") for a in abstention)
                 and (not test_sets or s["test_set"] in test_sets)]
    if not summaries:
        raise KbError(f"{repo_path(results_dir)}: no evaluation summaries found"
                      + (f" for {', '.join(test_sets)}" if test_sets else "") + " (run evaluate.py first)")
    out = {}
    for model in sorted({s["model"] for s in summaries}):
        mine = [s for s in summaries if s["model"] == model]
        rows = table_rows(mine, extra_columns)
        text = f"# Evaluation: {model}\n\n" + markdown(rows, list(extra_columns or {})) + "\n" + NOTES + "\n"
        diffs = difference_rows(mine)
        if diffs:
            text += "\n## Paired differences\n\n" + differences_markdown(diffs) + "\n" + DIFF_NOTES + "\n"
        if write:
            write_text(layout.table_path(layout.results_dir(results_dir, model)), text)
        out[model] = text
    return out


# ---------------------------------------------------------------- abstention (refusal transfer)

ABSTENTION_COLUMNS = ("model", "method", "test set", "prompt", "n", "should abstain", "Pr should-abstain", "Pr should-answer",
                      "abst. P", "abst. R", "abst. F1", "F1 broad", "AUROC", "AURC", "ECE")
ABSTENTION_NOTES = (
    "should abstain: questions that should be refused (SelfAware's unanswerable, FalseQA's false-premise "
    "questions; none in the other sets). Pr should-abstain, Pr should-answer: % of the questions that should be refused / "
    "answered that the model refused (strict rule; Pr should-answer is the false-refusal rate). abst. P / R / F1 (×100): "
    "AbstentionBench's abstention precision, recall and F1, \"should abstain\" the positive class; F1 broad: by the "
    "broad refusal phrases. AUROC (×100) of the answer confidence for correctness, AURC (×100, lower is better) and "
    "ECE (×100, 10 equal-width bins) over the graded answers (not refused, a gold answer, a confidence). "
    "– = not defined (e.g. precision with no refusal, recall with nothing to refuse, AUROC with one class)."
)


def _suite(s: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The summary's metric suite, recomputed from its records when the summary predates it."""
    if "suite" in s:
        return s["suite"]
    return suite_summary(read_eval_records(layout.summary_records(Path(s["_path"]), s)), s["dataset"])


def abstention_rows(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per summary (sorted like table_rows): the abstention numbers of kb.metrics.suite."""
    def x100(v: Any) -> Any:
        return None if v is None else 100 * v

    rows = []
    for s in sorted(summaries, key=lambda s: (s["model"], s["test_set"], s["row"] != "initial",
                                              not s["row"].startswith("initial"), s["row"])):
        st, br = _suite(s)["strict"], _suite(s)["broad"]
        rows.append({"model": s["model"], "method": s["row"], "test set": s["test_set"], "prompt": s["template"],
                     "n": st["n"], "should abstain": st["n_should_abstain"], "Pr should-abstain": st["Pr_should_abstain"],
                     "Pr should-answer": st["Pr_should_answer"], "abst. P": x100(st["abstain_precision"]),
                     "abst. R": x100(st["abstain_recall"]), "abst. F1": x100(st["abstain_f1"]),
                     "F1 broad": x100(br["abstain_f1"]), "AUROC": x100(st["AUROC"]), "AURC": x100(st["AURC"]),
                     "ECE": x100(st["ECE"])})
    return rows


def build_abstention_table(results_dir: str | Path = "results", models: Sequence[str] | None = None,
                           write: bool = True) -> dict[str, str]:
    """The abstention table per model ({model: markdown}); with write, results/<model>/table_abstention.md."""
    summaries = load_summaries(results_dir, models)
    if not summaries:
        raise KbError(f"{repo_path(results_dir)}: no evaluation summaries found (run evaluate.py first)")
    out = {}
    for model in sorted({s["model"] for s in summaries}):
        rows = abstention_rows([s for s in summaries if s["model"] == model])
        cols = list(ABSTENTION_COLUMNS)
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
        text = f"# Abstention: {model}\n\n" + "\n".join(lines) + "\n\n" + ABSTENTION_NOTES + "\n"
        if write:
            write_text(layout.table_path(layout.results_dir(results_dir, model), abstention=True), text)
        out[model] = text
    return out
