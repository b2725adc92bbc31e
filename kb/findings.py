"""The study's four questions, answered from the per-question files of runs repeated over seeds.

A method fine-tuned with several seeds is evaluated once per seed (`--method <method>_seed<S>`). Its
numbers here are means over the seeds, and their 95% intervals resample the *questions*: every seed's
outcome on a question and the baseline's move together, so the interval covers question sampling
for the seed-mean. The spread across seeds (training noise) is reported beside it, never mixed in.

  1. Does R-Tuning beat the confidence-threshold baseline?  ΔTHS(rtuning_* − threshold), ID and OOD
  2. Does CRaFT beat Cor-RAIT?                              ΔTHS(craft − cor_rait)
  3. Does the refusal transfer to unanswerable questions?  on SelfAware / FalseQA: the refusal gap
     (refusals on questions that should be refused − on those that should be answered), tuned vs M0
  4. Is the answer the same on both models?                 the verdicts of 1-3 side by side
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kb import bootstrap
from kb.data import abstention_datasets
from kb.errors import KbError
from kb.eval_table import load_summaries
from kb.layout import split_seed, summary_records
from kb.paths import repo_path
from kb.records import read_eval_records

INITIAL, INITIAL_REFUSE, THRESHOLD = "initial", "initial_refuse", "threshold"
REFUSED = bootstrap.OUTCOME_CODE["refused"]

# (question, method a, method b): the head-to-head comparisons the answers are built from.
QUESTIONS = {
    1: ("Does R-Tuning beat the confidence-threshold baseline?",
        (("rtuning_unsure", THRESHOLD), ("rtuning_unknown", THRESHOLD))),
    2: ("Does CRaFT beat Cor-RAIT?", (("craft", "cor_rait"), ("craft", "corcer_rait"))),
}
TRANSFER_QUESTION = "Does the refusal transfer to unanswerable questions?"
SAME_QUESTION = "Is the answer the same on the two models?"


@dataclass
class Run:
    """One evaluated model (one seed) on one test set: outcome codes by question id."""

    model: str
    test_set: str
    method: str
    seed: int | None
    outcomes: dict[str, int]
    should_abstain: dict[str, bool]
    ap: float | None = None


@dataclass
class Group:
    """A method's runs on one test set (one per seed; one for untrained rows)."""

    model: str
    test_set: str
    method: str
    runs: list[Run] = field(default_factory=list)

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]


def split_method(row: str) -> tuple[str, int | None]:
    """'craft_seed2' -> ('craft', 2); rows without a seed suffix -> (row, None)."""
    return split_seed(row)


def _summaries(results_dir: str | Path, models: Sequence[str] | None) -> list[dict[str, Any]]:
    """Evaluation summaries of `models` (none for a model not evaluated: the report still runs)."""
    root = repo_path(results_dir)
    if not root.is_dir():
        return []
    return [s for s in load_summaries(root) if not models or s.get("model") in models]


def load_groups(results_dir: str | Path, models: Sequence[str] | None = None) -> dict[tuple[str, str, str], Group]:
    """Every evaluated run under results/<model>/eval/, grouped by (model, test set, method)."""
    groups: dict[tuple[str, str, str], Group] = {}
    for s in _summaries(results_dir, models):
        path = summary_records(Path(s["_path"]), s)
        if not path.is_file():
            continue
        records = read_eval_records(path)  # validated, with any re-judged verdicts laid over the replies
        method, seed = split_method(s["row"])
        run = Run(s["model"], s["test_set"], method, seed,
                  {r["id"]: bootstrap.OUTCOME_CODE[r["outcome"]] for r in records},
                  {r["id"]: bool(r.get("should_abstain", False)) for r in records}, s.get("AP"))
        key = (s["model"], s["test_set"], method)
        groups.setdefault(key, Group(*key)).runs.append(run)
    for g in groups.values():
        if len({r.seed is None for r in g.runs}) > 1:
            raise KbError(f"{repo_path(results_dir)}/{g.model}/eval: {g.method!r} on {g.test_set} has runs with and "
                          "without a seed suffix; keep a study repeated over seeds in its own results dir")
        g.runs.sort(key=lambda r: -1 if r.seed is None else r.seed)
    return groups


def _columns(groups: Sequence[Group]) -> tuple[list[str], list[list[np.ndarray]]]:
    """The question ids every run of every group shares, and each group's outcome columns on them."""
    ids = set.intersection(*(set(r.outcomes) for g in groups for r in g.runs))
    order = sorted(ids)
    return order, [[np.array([r.outcomes[i] for i in order], dtype=np.int8) for r in g.runs] for g in groups]


# ------------------------------------------------------------------ seed-mean statistics


def mean_ths(*cols: np.ndarray, axis: int = -1) -> np.ndarray:
    """THS averaged over seeds: cols = the method's seed columns, then the baseline's column."""
    return np.mean([bootstrap.ths_stat(c, cols[-1], axis=axis) for c in cols[:-1]], axis=0)


def mean_rate(*labels: str) -> bootstrap.Statistic:
    rate = bootstrap.rate_of(*labels)

    def stat(*cols: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean([rate(c, axis=axis) for c in cols], axis=0)

    return stat


def _refusal_rate(codes: np.ndarray, mask: np.ndarray, axis: int) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return 100.0 * ((codes == REFUSED) & mask).sum(axis=axis) / mask.sum(axis=axis)


def mean_gap(*cols: np.ndarray, axis: int = -1) -> np.ndarray:
    """Refusal gap averaged over seeds: % refused of should-abstain questions − % refused of should-answer
    ones; cols = the seed columns, then the should-abstain mask (resampled with them)."""
    mask = cols[-1].astype(bool)
    return np.mean([_refusal_rate(c, mask, axis) - _refusal_rate(c, ~mask, axis) for c in cols[:-1]], axis=0)


def _value(stat: bootstrap.Statistic, cols: Sequence[np.ndarray]) -> float | None:
    v = float(stat(*[np.asarray(c)[None, :] for c in cols])[0])
    return round(v, 4) if np.isfinite(v) else None


def estimate(stat: bootstrap.Statistic, cols: Sequence[np.ndarray]) -> dict[str, Any]:
    """Value and 95% question-bootstrap interval of a seed-mean statistic."""
    return {"value": _value(stat, cols), "ci": bootstrap.interval(stat, *cols)}


def _verdict(d: dict[str, Any], better: str, worse: str) -> str:
    ci = d.get("ci")
    if d.get("value") is None or not ci:
        return "not computable"
    if ci[0] > 0:
        return better
    if ci[1] < 0:
        return worse
    return "not distinguishable"


# ------------------------------------------------------------------ the rows


def method_row(g: Group, initial: Group) -> dict[str, Any]:
    """A method on one test set: seed-mean rates and THS with their intervals, and the seed spread."""
    ids, (cols, base) = _columns([g, initial])
    per_seed = [_value(bootstrap.ths_stat, [c, base[0]]) for c in cols]
    return {"model": g.model, "test set": g.test_set, "method": g.method, "seeds": len(cols), "n": len(ids),
            **{k: estimate(mean_rate(*labels), cols)["value"] for k, labels in
               (("Pc", ("correct",)), ("W", ("incorrect", "fail_parse")), ("Pr", ("refused",)))},
            "THS": estimate(mean_ths, [*cols, base[0]]), "THS per seed": per_seed,
            "AP": _mean([r.ap for r in g.runs])}


def _mean(xs: Sequence[float | None]) -> float | None:
    ok = [x for x in xs if x is not None]
    return round(float(np.mean(ok)), 4) if ok else None


def comparison_row(a: Group, b: Group, initial: Group) -> dict[str, Any]:
    """ΔTHS = seed-mean THS(a) − seed-mean THS(b), both against the initial model, on shared questions;
    per seed: a's seed s against b's seed s (or b's single run)."""
    ids, (ca, cb, base) = _columns([a, b, initial])
    d = bootstrap.difference(mean_ths, ca, cb, [base[0]])
    per_seed = []
    for i, col in enumerate(ca):
        other = cb[i] if len(cb) == len(ca) else cb[0]
        ta, tb = _value(bootstrap.ths_stat, [col, base[0]]), _value(bootstrap.ths_stat, [other, base[0]])
        per_seed.append(None if ta is None or tb is None else round(ta - tb, 4))
    return {"model": a.model, "test set": a.test_set, "a": a.method, "b": b.method, "n": len(ids),
            "seeds": f"{len(ca)} vs {len(cb)}", "ΔTHS": d, "per seed": per_seed,
            "verdict": _verdict(d, f"{a.method} better", f"{b.method} better")}


def transfer_row(g: Group, reference: Group) -> dict[str, Any]:
    """Refusal gap of `g` on an abstention set, and its difference from the reference (M0 under REFUSE)."""
    ids, (cols, ref) = _columns([g, reference])
    mask = np.array([g.runs[0].should_abstain[i] for i in ids], dtype=np.int8)
    rate_ab = _mean([float(_refusal_rate(c, mask.astype(bool), -1)) for c in cols])
    rate_an = _mean([float(_refusal_rate(c, ~mask.astype(bool), -1)) for c in cols])
    gap = estimate(mean_gap, [*cols, mask])
    diff = bootstrap.difference(mean_gap, cols, ref, [mask]) if g.method != reference.method else None
    return {"model": g.model, "test set": g.test_set, "method": g.method, "seeds": len(cols), "n": len(ids),
            "should abstain": int(mask.sum()), "Pr should-abstain": rate_ab, "Pr should-answer": rate_an,
            "gap": gap, "Δgap vs M0": diff,
            "verdict": "reference" if diff is None else _verdict(diff, "more selective than M0", "less selective than M0")}


def _is_abstention(test_set: str) -> bool:
    return any(test_set.startswith(f"{a}_") for a in abstention_datasets())


def study(results_dir: str | Path, models: Sequence[str], test_sets: Sequence[str]) -> dict[str, Any]:
    """Every row the answers need, per model: method rows and comparisons on `test_sets`, refusal
    transfer on the abstention sets."""
    groups = load_groups(results_dir, models)
    out: dict[str, Any] = {"methods": [], "comparisons": [], "transfer": []}
    for model in models:
        for test in test_sets:
            initial = groups.get((model, test, INITIAL))
            if initial is None:
                continue
            mine = {k[2]: g for k, g in groups.items() if k[:2] == (model, test)}
            for name, g in sorted(mine.items()):
                if name != INITIAL and not name.startswith(f"{INITIAL}_"):
                    out["methods"].append(method_row(g, initial))
            for _, pairs in QUESTIONS.values():
                for a, b in pairs:
                    if a in mine and b in mine:
                        out["comparisons"].append(comparison_row(mine[a], mine[b], initial))
        for test in sorted({k[1] for k in groups if k[0] == model and _is_abstention(k[1])}):
            reference = groups.get((model, test, INITIAL_REFUSE))
            if reference is None:
                continue
            mine = {k[2]: g for k, g in groups.items() if k[:2] == (model, test)}
            for _, g in sorted(mine.items(), key=lambda kv: (kv[0] != INITIAL_REFUSE, kv[0])):
                out["transfer"].append(transfer_row(g, reference))
    return out


# ------------------------------------------------------------------ markdown


def _ci(d: dict[str, Any] | None) -> str:
    return "–" if d is None else bootstrap.fmt(d["value"], d["ci"])


def _seeds(xs: Sequence[float | None]) -> str:
    return ", ".join("–" if x is None else f"{x:.1f}" for x in xs)


Table = tuple[list[str], list[list[Any]]]


def _cell(v: Any) -> str:
    return "–" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))


def markdown_table(table: Table) -> str:
    cols, rows = table
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    return "\n".join(lines + ["| " + " | ".join(_cell(v) for v in r) + " |" for r in rows]) + "\n"


def methods_table(rows: Sequence[dict[str, Any]]) -> Table:
    return (["model", "test set", "method", "seeds", "n", "Pc", "W", "Pr", "THS [95% CI]", "THS per seed", "AP"],
            [[r["model"], r["test set"], r["method"], r["seeds"], r["n"], r["Pc"], r["W"], r["Pr"], _ci(r["THS"]),
              _seeds(r["THS per seed"]), r["AP"]] for r in rows])


def comparisons_table(rows: Sequence[dict[str, Any]]) -> Table:
    return (["model", "test set", "comparison", "seeds", "n", "ΔTHS [95% CI]", "ΔTHS per seed", "verdict"],
            [[r["model"], r["test set"], f"{r['a']} − {r['b']}", r["seeds"], r["n"], _ci(r["ΔTHS"]),
              _seeds(r["per seed"]), r["verdict"]] for r in rows])


def transfer_table(rows: Sequence[dict[str, Any]]) -> Table:
    return (["model", "test set", "method", "seeds", "n", "should abstain", "Pr should-abstain", "Pr should-answer",
             "gap [95% CI]", "Δgap vs M0 REFUSE [95% CI]", "verdict"],
            [[r["model"], r["test set"], r["method"], r["seeds"], r["n"], r["should abstain"], r["Pr should-abstain"],
              r["Pr should-answer"], _ci(r["gap"]), _ci(r["Δgap vs M0"]), r["verdict"]] for r in rows])


NOTES = (
    "Values are means over the seeds of each fine-tune (`seeds`; untrained rows have one run). [95% CI]: "
    f"percentile bootstrap over questions ({bootstrap.N_RESAMPLES} resamples, seed {bootstrap.SEED}); every "
    "seed's outcome on a question, and the baseline's, are resampled together, so the interval is the "
    "question-sampling uncertainty of the seed-mean. It does not include training noise: the per-seed "
    "values show that. W = Pw + P_fail. THS is against the initial model's BASIC run on the same questions. "
    "A verdict names a winner only when the interval excludes 0. Refusal gap: % of should-abstain questions "
    "refused − % of should-answer questions refused (strict rule); M0 REFUSE is the initial model asked with "
    "the refusal prompt, the reference for every tuned model."
)


def _pick(rows: Sequence[dict[str, Any]], **want: Any) -> list[dict[str, Any]]:
    return [r for r in rows if all(r.get(k) == v for k, v in want.items())]


def answers(result: dict[str, Any], models: Sequence[str]) -> list[tuple[str, str]]:
    """The four answers as (question, markdown text), with the numbers they rest on."""
    out: list[tuple[str, str]] = []
    verdicts: dict[tuple[int, str], dict[str, list[str]]] = {}
    for q, (title, pairs) in QUESTIONS.items():
        lines = []
        for model in models:
            parts = []
            for a, b in pairs:
                for r in _pick(result["comparisons"], model=model, a=a, b=b):
                    parts.append(f"{r['test set']} ΔTHS({a} − {b}) = {_ci(r['ΔTHS'])}, per seed {_seeds(r['per seed'])}: "
                                 f"**{r['verdict']}**")
                    verdicts.setdefault((q, f"{a} − {b}, {r['test set']}"), {})[model] = [r["verdict"]]
            if parts:
                lines.append(f"- **{model}**: " + "; ".join(parts) + ".")
        out.append((f"{q}. {title}", "\n".join(lines) if lines else "- no runs to compare"))
    lines = []
    for model in models:
        tuned = [r for r in _pick(result["transfer"], model=model) if r["method"] not in (INITIAL_REFUSE, INITIAL, THRESHOLD)]
        for r in tuned:
            verdicts.setdefault((3, f"{r['method']}, {r['test set']}"), {})[model] = [r["verdict"]]
        if not tuned:
            continue
        ref = [f"{r['test set']} {_ci(r['gap'])}" for r in _pick(result["transfer"], model=model, method=INITIAL_REFUSE)]
        listed = {v: [f"{r['method']} on {r['test set']} (gap {_ci(r['gap'])}, Δ {_ci(r['Δgap vs M0'])})"
                      for r in tuned if r["verdict"] == v] for v in ("more selective than M0", "less selective than M0")}
        answer_rates = [r["Pr should-answer"] for r in tuned if r["Pr should-answer"] is not None]
        text = (f"- **{model}**: M0 under the refusal prompt has a gap of {', '.join(ref)}. Of {len(tuned)} tuned "
                f"model × set rows, {len(listed['more selective than M0'])} refuse should-abstain questions more "
                f"selectively than M0 and {len(listed['less selective than M0'])} less")
        for v, items in listed.items():
            if items:
                text += f"; {v}: " + "; ".join(items)
        if answer_rates:
            text += (f". The tuned models refuse {min(answer_rates):.0f}–{max(answer_rates):.0f}% of the questions "
                     "that should be answered")
        lines.append(text + ".")
    out.append((f"3. {TRANSFER_QUESTION}", "\n".join(lines) if lines else "- no abstention runs"))
    same, differ = [], []
    for (q, what), by_model in sorted(verdicts.items()):
        if len(by_model) < 2:
            continue
        vs = {m: v[0] for m, v in by_model.items()}
        (same if len(set(vs.values())) == 1 else differ).append(
            f"Q{q} {what}: " + ", ".join(f"{m} {v}" for m, v in vs.items()))
    text = (f"Same verdict on both models in {len(same)} of {len(same) + len(differ)} comparisons."
            if same or differ else "Only one model has runs to compare.")
    if differ:
        text += " Different: " + "; ".join(differ) + "."
    out.append((f"4. {SAME_QUESTION}", text))
    return out


def study_markdown(results_dir: str | Path, models: Sequence[str], test_sets: Sequence[str]) -> str:
    """The answers, then the tables they are computed from."""
    result = study(results_dir, models, test_sets)
    text = "## The answers\n\n" + "\n\n".join(f"**{q}**\n\n{a}" for q, a in answers(result, models))
    return (text + "\n\n### Methods (seed means)\n\n" + markdown_table(methods_table(result["methods"]))
            + "\n### Head-to-head comparisons\n\n" + markdown_table(comparisons_table(result["comparisons"]))
            + "\n### Refusal transfer (SelfAware, FalseQA)\n\n" + markdown_table(transfer_table(result["transfer"]))
            + "\n" + NOTES + "\n")


def seeded_test_sets(results_dir: str | Path, models: Sequence[str]) -> list[str]:
    """The non-abstention test sets on which some run carries a seed suffix (the study's test sets)."""
    return sorted({s["test_set"] for s in _summaries(results_dir, models)
                   if split_seed(s["row"])[1] is not None and not _is_abstention(s["test_set"])})


def has_seeds(results_dir: str | Path, models: Sequence[str]) -> bool:
    """Whether any run of these models was repeated over seeds (then the report opens with the answers)."""
    return any(split_seed(s["row"])[1] is not None for s in _summaries(results_dir, models))


def forest_figure(result: dict[str, Any]) -> Any:
    """ΔTHS of each head-to-head comparison (seed mean, 95% question interval, seeds as dots), one row per
    model x test set x comparison; the zero line is 'no difference'."""
    import matplotlib.pyplot as plt

    rows = [r for r in result["comparisons"] if r["ΔTHS"]["value"] is not None]
    fig, ax = plt.subplots(figsize=(8, 0.4 * max(len(rows), 2) + 1.2))
    for y, r in enumerate(rows):
        d = r["ΔTHS"]
        if d["ci"]:
            ax.plot(d["ci"], [y, y], color="tab:blue", lw=2)
        ax.plot([d["value"]], [y], "o", color="tab:blue")
        seeds = [v for v in r["per seed"] if v is not None]
        ax.plot(seeds, [y + 0.2] * len(seeds), ".", color="tab:gray", ms=5)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), [f"{r['model']} · {r['test set']} · {r['a']} − {r['b']}" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ΔTHS (points): seed mean and 95% bootstrap interval over questions; grey: single seeds")
    return fig
