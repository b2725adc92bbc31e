"""The report's opening section: the study's four answers (kb.findings), when its fine-tunes were
repeated over seeds."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kb import findings
from kb.report.render import Report


def section_answers(rep: Report, results_dir: Path, names: Sequence[str]) -> None:
    tests = findings.seeded_test_sets(results_dir, names)
    if not tests:
        return
    result = findings.study(results_dir, names, tests)
    rep.h(2, "The answers")
    for question, text in findings.answers(result, names):
        rep.p(f"**{question}**")
        for line in text.splitlines():
            rep.p(line.removeprefix("- "))
    rep.fig(findings.forest_figure(result), "answers_forest",
            "Head-to-head ΔTHS per model and test set: the seed mean (dot), its 95% bootstrap interval over "
            "questions (bar) and each seed's difference (grey). Right of 0: the first method is better.")
    for title, table in (("Methods (means over seeds)", findings.methods_table(result["methods"])),
                         ("Head-to-head comparisons", findings.comparisons_table(result["comparisons"])),
                         ("Refusal transfer (SelfAware, FalseQA)", findings.transfer_table(result["transfer"]))):
        rep.h(3, title)
        rep.table(*table)
    rep.p(findings.NOTES)
