"""The report's sections: what each says, in which order, from the loaded per-question files (kb.report.load).

build_report assembles them into a Report (kb.report.render); every number is recomputed here from the
records with the one definition kb.metrics / kb.bootstrap give it (rates, THS against its baseline, AP).
"""

from __future__ import annotations

import functools
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from kb import bootstrap, layout, metrics
from kb.errors import KbError
from kb.eval_table import DIFF_COLUMNS, DIFF_NOTES, paired_differences
from kb.metrics import DEFAULT_BINS, ece, is_initial_row
from kb.paths import shown_path
from kb.report.answers import section_answers
from kb.report.figures import (
    fig_accuracy,
    fig_flow,
    fig_flow_density,
    fig_plane,
    fig_reliability,
    fig_risk_coverage,
    fig_state,
    fig_transfer,
)
from kb.report.load import IDK, EvalSet, ModelData, answer_correct, crss_for, find_models, load_model_data, pretty
from kb.report.render import Report

MAX_SURE_PANELS = 6  # sure-probability reliability panels drawn; every row still gets its ECE in the table


def build_report(training_dir: Path, results_dir: Path, models: Sequence[str] | None = None,
                 report_dir: Path | None = None) -> Report:
    """Assemble the report for `models` (default: every model folder found), to be written to
    `report_dir` (default: the results dir)."""
    found = find_models(training_dir, results_dir)
    if models:
        unknown = [m for m in models if m not in found]
        if unknown:
            raise KbError(f"no files for model(s) {', '.join(unknown)} under {training_dir} or {results_dir}; "
                          f"found: {', '.join(found) or 'none'}")
        names = list(models)
    else:
        names = found
    if not names:
        raise KbError(f"no model folders under {training_dir} or {results_dir}: run run_MMLU.py / run_ParaRel.py first")
    data = [load_model_data(n, training_dir, results_dir) for n in names]
    rep = Report(report_dir or results_dir)
    rep.h(1, "Knowledge-boundary report")
    rep.p(f"Models: {', '.join(names)}. Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC from `{shown_path(training_dir)}` and "
          f"`{shown_path(results_dir)}`. Every number below is recomputed from the per-question record files.")
    section_answers(rep, results_dir, names)
    _section_summary(rep, data)
    _section_boundary(rep, data)
    _section_state(rep, data)
    _section_calibration(rep, data)
    _section_methods(rep, data)
    _section_transfer(rep, data)
    return rep


def _fig_name(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts)).strip("-")


def method_rows(md: ModelData) -> list[dict[str, Any]]:
    """One row per (test set, method): rates, THS against the initial model on that test set, AP, CRSS."""
    by_test: dict[str, list[EvalSet]] = defaultdict(list)
    for ev in md.evals:
        if ev.abstention:  # SelfAware / FalseQA: the refusal-transfer section, not THS
            continue
        by_test[ev.test_set].append(ev)
    rows = []
    for test, evs in sorted(by_test.items()):
        init = next((e for e in evs if is_initial_row(e.method)), None)
        for ev in sorted(evs, key=lambda e: (not is_initial_row(e.method), e.method)):
            outcomes = ev.outcomes()
            # THS against the initial model on this method's own questions (a smaller --limit is a subset)
            base = metrics.paired_baseline([x["id"] for x in ev.records], init.outcome_by_id()) if init else None
            ci = bootstrap.rate_intervals(outcomes)
            if base is not None and not is_initial_row(ev.method):
                ci["THS"] = bootstrap.ths_interval(outcomes, base)
            ap, ci["AP"] = bootstrap.ap_with_interval(ev.table())
            rows.append({"model": md.name, "test_set": test, "method": ev.method, "n": len(ev.records), **ev.rates(),
                         "THS": metrics.ths_against(outcomes, base), "AP": ap, "ci": ci,
                         "CRSS": crss_for(md, ev.method, ev.kind)})
    return rows


def _ci_cell(row: dict[str, Any], key: str) -> str:
    return bootstrap.fmt(row[key], row["ci"].get(key) if row[key] is not None else None)


def _section_summary(rep: Report, data: list[ModelData]) -> None:
    rep.h(2, "Cross-model summary")
    sets = sorted({ps.name for md in data for ps in md.probes})
    if not sets:
        rep.miss("no probe records for any model: run `python run_MMLU.py --model <model>` and "
                 "`python run_ParaRel.py --model <model>`")
        return
    rows = []
    for md in data:
        got = {ps.name: ps for ps in md.probes}
        row: list[Any] = [md.name]
        for s in sets:
            ps = got.get(s)
            row.append(f"{100 * ps.accuracy:.1f} (n={len(ps.records)})" if ps else "missing")
        mrows = [r for r in method_rows(md) if r["THS"] is not None and not is_initial_row(r["method"])]
        best = max(mrows, key=lambda r: r["THS"], default=None)
        row.append(f"{best['method']} on {best['test_set']}: {best['THS']:.1f}" if best else "missing")
        rows.append(row)
    rep.p("Probe accuracy (%) of the untuned model M0 per probe set, and the tuned method with the highest THS.")
    rep.table(["model", *(pretty(s) for s in sets), "best THS"], rows)
    all_rows = [r for md in data for r in method_rows(md)]
    if len(data) > 1 and all_rows:
        keys = sorted({(r["test_set"], r["method"]) for r in all_rows}, key=lambda k: (k[0], not is_initial_row(k[1]), k[1]))
        got = {(r["model"], r["test_set"], r["method"]): r for r in all_rows}
        rep.p("THS and Pc / Pw / Pr (%) per test set and method, one column per model (\"missing\": not evaluated).")
        rep.table(["test set", "method", *(md.name for md in data)],
                  [[t, m, *(_brief(got.get((md.name, t, m))) for md in data)] for t, m in keys])
    for md in data:
        for ps in md.probes:
            note = ps.near_chance_note()
            if note:
                rep.p(f"Note: {md.name} on {pretty(ps.name)}: {note} (docs/method.md §3.7).")


def _brief(row: dict[str, Any] | None) -> str:
    if row is None:
        return "missing"
    th = "n/a" if row["THS"] is None else f"{row['THS']:.1f}"
    return f"THS {th} ({row['Pc']:.0f}/{row['Pw']:.0f}/{row['Pr']:.0f})"


def _section_boundary(rep: Report, data: list[ModelData]) -> None:
    rep.h(2, "1. Knowledge boundary: accuracy per subject and relation")
    rep.p("A question is known when M0's greedy answer is correct (MMLU: the argmax letter; ParaRel: the gold answer "
          "occurs in the greedy answer). Bars are sorted, best-known group on top; each bar is labelled right answers / "
          "questions of that group in the probe file.")
    for name in sorted({ps.name for md in data for ps in md.probes}):
        sets = [(md.name, ps) for md in data for ps in md.probes if ps.name == name]
        rep.h(3, pretty(name))
        rep.fig(fig_accuracy(sets), _fig_name("accuracy", name),
                f"Accuracy of M0 per {'subject' if sets[0][1].mcq else 'relation'} on {pretty(name)}, one panel per "
                "model. Dashed: overall accuracy" + ("; dotted red: chance (1 / number of options)." if sets[0][1].mcq else "."))
        for model, ps in sets:
            rows = ps.by_group()
            if len(rows) > 1:
                rep.p(f"{model}: best known {rows[0][0]} ({100 * rows[0][2]:.0f}%), least known {rows[-1][0]} "
                      f"({100 * rows[-1][2]:.0f}%), over {len(rows)} groups.")
    for md in data:
        kinds = {"MMLU" if ps.name.startswith("MMLU") else ps.name.split("_")[0] for ps in md.probes}
        if "MMLU" not in kinds:
            rep.miss(f"{md.name}: no MMLU probe: run `python run_MMLU.py --model {md.name}`")
        if "ParaRel" not in kinds:
            rep.miss(f"{md.name}: no ParaRel probe: run `python run_ParaRel.py --model {md.name}`")


def _data(md: ModelData) -> Path:
    """A model's stage-data folder as the report's hints name it (training_data/<model>)."""
    return Path(layout.TRAINING_DATA, md.name)


def _section_state(rep: Report, data: list[ModelData]) -> None:
    rep.h(2, "2. Knowledge state and knowledge flow (CRaFT)")
    for md in data:
        for problem in md.problems:
            rep.miss(f"{md.name}: unreadable stage file: {problem}")
    rep.p("Each point is a source-set question placed by M0's correctness Cor and certainty Cer (docs/method.md §4). Colours: "
          "what the CRaFT RAIT set did with it: kept with its answer (vanilla), relabelled \"I don't know\", or dropped.")
    panels = []
    for md in data:
        if not md.state:
            rep.miss(f"{md.name}: no knowledge-state file ({layout.state_records(_data(md), '*')}): "
                     f"run `python query_state.py --model {md.name}`")
            continue
        for name, st in md.state.items():
            craft = md.rait.get(name, {}).get("craft")
            sel = None if craft is None else {**{i: "vanilla" for i in craft["van"]}, **{i: IDK for i in craft["idk"]}}
            panels.append((f"{md.name}: {pretty(name)} (n={len(st)})", st, sel, None if craft is None else craft.get("tau_mu")))
            if sel is None:
                rep.miss(f"{md.name}: no CRaFT set for {pretty(name)} ({layout.rait_set(_data(md), 'craft', name, True)}): "
                         f"run `python build_rait.py --model {md.name}`")
            else:
                got = Counter(sel.get(q, "dropped") for q in st)
                rep.p(f"{md.name} {pretty(name)}: CRaFT kept {got['vanilla']} as vanilla, relabelled {got[IDK]} "
                      f"\"{IDK}\", dropped {got['dropped']} of {len(st)} questions.")
    if panels:
        rep.fig(fig_state(panels), "state_map", "Knowledge-state map: Cor vs Cer of M0 on the source set, one panel per "
                "model and state file, coloured by the CRaFT selection (counts in the legend).")
    flows = []
    for md in data:
        if not md.flow:
            rep.miss(f"{md.name}: no knowledge-flow file ({layout.flow_records(_data(md), '*')}): "
                     f"run `python rehearsal_finetune.py --model {md.name}`")
            continue
        for name, fl in md.flow.items():
            flows.append((f"{md.name}: {pretty(name)}", fl))
            dmu = np.asarray([f["cor1"] - f["cor0"] for f in fl.values()])
            dsig = np.asarray([f["cer1"] - f["cer0"] for f in fl.values()])
            rep.p(f"{md.name} {pretty(name)}: mean Δμ = {dmu.mean():+.3f}, mean Δσ = {dsig.mean():+.3f}; Cor falls for "
                  f"{int((dmu < 0).sum())}, stays for {int((dmu == 0).sum())}, rises for {int((dmu > 0).sum())} of "
                  f"{len(dmu)} questions.")
    if flows:
        rep.fig(fig_flow(flows), "flow", "Knowledge flow M0 → M̃ (rehearsal fine-tune): each arrow goes from a "
                "question's (Cor, Cer) under M0 to its (Cor, Cer) under M̃. Red: Cor falls (CRaFT may relabel it "
                "\"I don't know\" when Cor < τ_μ); green: Cor rises or stays.")
        rep.fig(fig_flow_density(flows), "flow_density", "Distribution of Cor and Cer over the source set under M0 (solid) "
                "and under the rehearsed model M̃ (dashed), per model: the same flow as the arrows, summarised.")


def _section_calibration(rep: Report, data: list[ModelData]) -> None:
    rep.h(2, "3. Calibration")
    rep.p(f"Reliability diagrams: questions are put in {DEFAULT_BINS} equal-width confidence bins; a bar is the "
          "fraction correct in the bin (its count printed at the bottom). ECE = Σ (bin size / n) · |accuracy − mean "
          "confidence|. MMLU confidence: the highest of the four renormalised letter probabilities; ParaRel: the "
          "geometric mean of the greedy tokens' probabilities.")
    for name in sorted({ps.name for md in data for ps in md.probes}):
        panels = []
        for md in data:
            for ps in md.probes:
                if ps.name != name:
                    continue
                recs = [r for r in ps.records if r.get("answer_conf") is not None]
                if recs:
                    panels.append((f"{md.name}: {pretty(name)}", np.asarray([r["answer_conf"] for r in recs], float),
                                   np.asarray([bool(r["correct"]) for r in recs])))
        if panels:
            rep.fig(fig_reliability(panels, "answer confidence"), _fig_name("reliability", name),
                    f"Reliability of M0's answer confidence on {pretty(name)} (probe records), one panel per model.")
            rep.table(["model", "set", "n", "mean confidence", "accuracy", "ECE"],
                      [[t.split(":")[0], pretty(name), len(c), float(c.mean()), float(y.mean()), ece(c, y)]
                       for t, c, y in panels])
    sure = []
    for md in data:
        for ev in md.evals:
            recs = [r for r in ev.records if r.get("sure_prob") is not None]
            if recs:
                sure.append((f"{md.name}: {ev.method} on {ev.test_set}", np.asarray([r["sure_prob"] for r in recs], float),
                             np.asarray([answer_correct(r) for r in recs])))
    if sure:
        # R-Tuning's rows are what the sure-probability is for; other rows are listed in the table only.
        shown = [p for p in sure if "rtuning" in p[0].split(": ", 1)[1]] or sure
        shown = shown[:MAX_SURE_PANELS]
        rep.fig(fig_reliability(shown, "sure-probability"), "reliability_sure",
                "Reliability of R-Tuning's sure-probability p(sure)/(p(sure)+p(unsure)), read after the answer and "
                "\"Are you sure …? I am\", against whether the answer was right"
                + (f"; {len(shown)} of {len(sure)} evaluated rows shown (R-Tuning's first)." if len(shown) < len(sure) else "."))
        rep.table(["model: method on test set", "n", "mean sure_prob", "answer accuracy", "ECE"],
                  [[t, len(c), float(c.mean()), float(y.mean()), ece(c, y)] for t, c, y in sure])
    else:
        rep.miss("no evaluation records with `sure_prob` (R-Tuning's confidence): run `python evaluate.py` "
                 "(without --no-ap)")


def _section_methods(rep: Report, data: list[ModelData]) -> None:
    rep.h(2, "4. Methods: refusal-aware tuning compared")
    rep.p("Pc / Pw / Pr / P_fail: percent of test questions answered correctly / wrongly / refused / unparsable "
          "(they sum to 100). THS = (Pc·W1 − W·Pc1)/W1 with W = Pw + P_fail (an unparseable reply counts as wrong) "
          "against the initial model (Pc1, W1) on the same questions (0 for the initial model, 100 for perfect). "
          "AP (%): average precision of correctness ranked by "
          "0.5·answer_conf + 0.5·sure_prob (answer_conf alone when there is no sure_prob). CRSS: the share of the "
          "method's \"I don't know\" training questions with a near-identical vanilla one (docs/method.md §5).")
    rows = [r for md in data for r in method_rows(md)]
    for md in data:
        if not md.evals:
            rep.miss(f"{md.name}: no evaluation records ({layout.eval_root(Path(layout.RESULTS, md.name))}/): "
                     f"run `python evaluate.py --model {md.name}`")
        elif not any(is_initial_row(e.method) for e in md.evals):
            rep.miss(f"{md.name}: no evaluation of the initial model, so THS is n/a: run `python evaluate.py` on M0")
        if not md.rait:
            rep.miss(f"{md.name}: no RAIT sets, so no CRSS (training_data/{md.name}/rait_*.json): "
                     f"run `python build_rait.py --model {md.name}`")
    crss_rows = [[md.name, pretty(name), m, len(md.rait[name][m]["van"]), len(md.rait[name][m]["idk"]), val]
                 for md in data for name, methods in md.crss.items() for m, val in methods.items()]
    if crss_rows:
        rep.p("RAIT sets built from each source set, with CRSS recomputed here from M0's question representations "
              "(state_*.reps.npy) and each set's own vanilla / \"I don't know\" ids, at the τ_sim the set was built with.")
        multi_m = len(data) > 1
        rep.table((["model"] if multi_m else []) + ["source set", "method", "vanilla", "I don't know", "CRSS"],
                  [r if multi_m else r[1:] for r in crss_rows])
    if not rows:
        return
    multi = len({r["model"] for r in rows}) > 1
    headers = (["model"] if multi else []) + ["test set", "method", "n", "Pc", "Pw", "Pr", "P_fail", "THS", "AP", "CRSS"]
    rep.table(headers, [([r["model"]] if multi else []) + [r["test_set"], r["method"], r["n"], _ci_cell(r, "Pc"),
                        _ci_cell(r, "Pw"), _ci_cell(r, "Pr"), r["P_fail"], _ci_cell(r, "THS"), _ci_cell(r, "AP"), r["CRSS"]]
                       for r in rows])
    rep.p(f"`value [lo, hi]`: 95% bootstrap interval over questions ({bootstrap.N_RESAMPLES} seeded resamples; THS "
          "resamples the method and the initial model together).")
    _differences(rep, data)
    panels = []
    for md in data:
        for test in sorted({r["test_set"] for r in rows if r["model"] == md.name}):
            sub = [r for r in rows if r["model"] == md.name and r["test_set"] == test]
            if any(not is_initial_row(r["method"]) for r in sub):  # a panel compares methods with M0
                panels.append((f"{md.name}: {test}", sub))
    if not panels:
        return
    rep.fig(fig_plane(panels), "ths_plane", "Left of each pair: the (W, Pc) plane, W = Pw + P_fail, one point "
            "per method with 95% interval whiskers on Pc (star: the initial model); the dashed line through the initial "
            "model is THS = 0. Right: THS per method against the initial model on that method's own questions, with "
            "its paired 95% interval; an interval clear of 0 is a change beyond sampling noise.")


def _differences(rep: Report, data: list[ModelData]) -> None:
    """Paired differences (kb.eval_table.paired_differences), marked where the interval excludes 0."""
    runs = {(md.name, ev.test_set, ev.method): functools.partial(lambda e: {x["id"]: x for x in e.records}, ev)
            for md in data for ev in md.evals}
    diffs = paired_differences(runs)
    if not diffs:
        return
    rep.p("Paired differences on the same questions. " + DIFF_NOTES)
    multi = len(data) > 1

    def cell(d: dict[str, Any] | None) -> str:
        return "–" if d is None else bootstrap.fmt(d["value"], d["ci"]) + (" *" if d["significant"] else "")

    rep.table((["model"] if multi else []) + list(DIFF_COLUMNS),
              [([d["model"]] if multi else []) + [d["test set"], d["comparison"], d["n"],
                                                  *(cell(d[c]) for c in DIFF_COLUMNS[3:])] for d in diffs])


def _section_transfer(rep: Report, data: list[ModelData]) -> None:
    rep.h(2, "5. Refusal transfer: unanswerable and false-premise questions")
    rep.p("R-Tuning's claim that refusal is a meta-skill, tested on questions nobody can answer (SelfAware's "
          "unanswerable questions) and questions with a false premise (FalseQA), next to questions that should be "
          "answered (SelfAware's answerable ones, FalseQA's valid-premise edits, and the model's own test sets). "
          "Refusals by the strict rule (the reply contains \"I don't know\"; R-Tuning's \"… I am unsure.\" too). "
          "Abstention P / R / F1 (%): AbstentionBench's precision, recall and F1 with \"should abstain\" as the "
          "positive class (kb/metrics.py).")
    rows, panels = [], []
    for md in data:
        by_method: dict[str, list[EvalSet]] = defaultdict(list)
        for ev in md.evals:
            by_method[ev.method].append(ev)
        points = []
        for method in sorted(by_method, key=lambda m: (not m.startswith("initial"), m)):
            evs = sorted(by_method[method], key=lambda e: (not e.abstention, e.test_set))
            if not any(e.abstention for e in evs):
                continue
            for ev in evs:
                st = metrics.suite(ev.table())
                f1b = metrics.suite(ev.table(broad=True))["abstain_f1"]
                rows.append([md.name, method, ev.test_set, st["n"], st["n_should_abstain"], st["Pr_should_abstain"],
                             st["Pr_should_answer"], *(None if v is None else 100 * v for v in
                                                       (st["abstain_precision"], st["abstain_recall"], st["abstain_f1"], f1b))])
            pooled = [ev.table() for ev in evs]
            abst = np.concatenate([t.abstained for t in pooled])
            should = np.concatenate([t.should_abstain for t in pooled])
            x, y = metrics.refusal_rate(abst, ~should), metrics.refusal_rate(abst, should)
            if x is not None and y is not None:
                points.append((method, x, y))
        if points:
            panels.append((md.name, points))
    if not rows:
        rep.miss("no evaluation on SelfAware or FalseQA: run `python evaluate.py --model <model> --test selfaware:test "
                 "--test falseqa:test --template refuse --limit 40` (and with --method for each tuned model)")
    else:
        rep.table(["model", "method", "test set", "n", "should abstain", "refused, should abstain (%)",
                   "refused, should answer (%)", "abst. P", "abst. R", "abst. F1", "abst. F1 broad"], rows)
        rep.fig(fig_transfer(panels), "refusal_transfer",
                "Refusal transfer, one point per method (star: the untuned model): x = share of the questions that should "
                "be answered that it refused (SelfAware answerable, FalseQA valid premise and its own test sets, pooled), "
                "y = share of the unanswerable and false-premise questions it refused. Up and to the left is better; on "
                "the dotted diagonal refusals ignore the question.")
    curves = []
    for md in data:
        for ev in md.evals:
            if ev.method == "initial" and ev.kind == "open" and not ev.abstention:
                t = ev.table()
                ans = t.answered
                if ans.any():
                    y_ok, conf = t.outcome[ans] == "correct", t.confidence[ans]
                    cov, risk = metrics.risk_coverage(y_ok, conf)
                    curves.append((f"{md.name}: {ev.test_set} (n={int(ans.sum())})", cov, risk, metrics.aurc(y_ok, conf)))
    if curves:
        rep.fig(fig_risk_coverage(curves), "risk_coverage",
                "Risk-coverage of the untuned model M0 on the open-answer track: its answers sorted by confidence (geometric "
                "mean of the greedy tokens' probabilities), most confident first; risk = error rate among the answers kept "
                "(tied confidences count at their expected error). AURC = the mean risk over all coverages; lower is better.")
    else:
        rep.miss("no open-answer evaluation of the initial model with answer confidences, so no risk-coverage plot: run "
                 "`python evaluate.py --model <model> --test pararel:ID_test`")


def parse_models(arg: str | None) -> list[str] | None:
    return [m.strip() for m in arg.split(",") if m.strip()] if arg else None
