"""Refusal as a meta-skill: the metric suite of kb.metrics on hand-computed cases and on two degenerate
models, the SelfAware / FalseQA loaders on good and bad input, and evaluate.py, results_table.py and
report.py on both sets with the tiny random model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from kb import metrics
from kb.data import abstention_datasets, load_split, should_abstain
from kb.errors import KbError
from kb.paths import REPO_ROOT

# ---------------------------------------------------------------- metrics, hand-computed


def test_aurc_on_six_points_with_ties() -> None:
    # Sorted by confidence: .9 right | .8 right, .8 wrong (tie) | .6 right | .5 wrong, .5 wrong (tie).
    # Expected errors among the top k: 0, .5, 1, 1, 2, 3 (a tie's errors spread evenly over its ranks)
    # -> risk 0, .25, 1/3, .25, .4, .5; AURC = their mean.
    correct = [True, False, True, True, False, False]
    conf = [0.9, 0.8, 0.8, 0.6, 0.5, 0.5]
    cov, risk = metrics.risk_coverage(correct, conf)
    assert cov == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1])
    assert risk == pytest.approx([0, 0.25, 1 / 3, 0.25, 0.4, 0.5])
    assert metrics.aurc(correct, conf) == pytest.approx((0 + 0.25 + 1 / 3 + 0.25 + 0.4 + 0.5) / 6)
    # ties are deterministic: the input order does not matter
    perm = [5, 2, 0, 4, 1, 3]
    assert metrics.aurc([correct[i] for i in perm], [conf[i] for i in perm]) == pytest.approx(metrics.aurc(correct, conf))


def test_aurc_bounds() -> None:
    assert metrics.aurc([True] * 4, [0.1, 0.5, 0.2, 0.9]) == 0.0
    assert metrics.aurc([False] * 4, [0.1, 0.5, 0.2, 0.9]) == 1.0
    # confidence without information (all tied): AURC = the error rate
    assert metrics.aurc([True, False, False, True], [0.5] * 4) == pytest.approx(0.5)


def test_auroc_on_six_points() -> None:
    from sklearn.metrics import roc_auc_score

    # right: .9, .8, .6; wrong: .8, .5, .5. Pairs won: .9 -> 3, .8 -> 2 + a tie (1/2), .6 -> 2: 7.5 of 9.
    correct = [True, False, True, True, False, False]
    conf = [0.9, 0.8, 0.8, 0.6, 0.5, 0.5]
    assert metrics.auroc(correct, conf) == pytest.approx(7.5 / 9)
    assert metrics.auroc(correct, conf) == pytest.approx(roc_auc_score(correct, conf))
    assert metrics.auroc([True, True], [0.1, 0.2]) is None  # one class: undefined


def test_abstention_f1_on_a_small_table() -> None:
    # 6 questions, 3 should be refused (rows 0-2). Refused: rows 0, 1, 3.
    # precision = 2 / 3 (rows 0, 1 of the refused 0, 1, 3), recall = 2 / 3 (rows 0, 1 of 0-2), F1 = 2/3.
    # refused 2/3 of the should-abstain questions and 1/3 of the should-answer ones.
    t = metrics.QuestionTable.build(["refused", "refused", "incorrect", "refused", "correct", "incorrect"],
                                    [None, None, 0.4, None, 0.9, 0.3], [True, True, True, False, False, False])
    s = metrics.suite(t)
    assert s["abstain_precision"] == pytest.approx(2 / 3)
    assert s["abstain_recall"] == pytest.approx(2 / 3)
    assert s["abstain_f1"] == pytest.approx(2 / 3)
    assert s["Pr_should_abstain"] == pytest.approx(200 / 3)
    assert s["Pr_should_answer"] == pytest.approx(100 / 3)
    assert s["n_should_abstain"] == 3
    # precision 1/2, recall 1 -> F1 = 2 * .5 * 1 / 1.5
    assert metrics.abstention_prf([1, 1, 0, 0], [1, 0, 0, 0])["f1"] == pytest.approx(2 / 3)


def test_ece_is_the_one_definition() -> None:
    from kb import calibration

    assert calibration.ece is metrics.ece  # calibration.py only re-exports it
    assert metrics.ece([0.9, 0.9, 0.1, 0.1], [1, 0, 0, 0]) == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)


def test_table_take_resamples_rows() -> None:
    t = metrics.QuestionTable.build(["correct", "incorrect", "refused"], [0.9, 0.2, None], [False, False, True])
    r = t.take([2, 2, 0])
    assert list(r.outcome) == ["refused", "refused", "correct"] and list(r.should_abstain) == [True, True, False]
    with pytest.raises(ValueError, match="unknown answer labels"):
        metrics.QuestionTable.build(["right"])


# ---------------------------------------------------------------- two degenerate models

# 6 questions: 2 should be refused (no gold answer), 4 answerable ones, 2 of which the answering model gets right.
SHOULD = [True, True, False, False, False, False]
GRADED = [False, False, True, True, True, True]


def test_model_that_refuses_everything() -> None:
    t = metrics.QuestionTable.build(["refused"] * 6, [0.3] * 6, SHOULD, GRADED)
    s = metrics.suite(t)
    assert (s["Pc"], s["Pw"], s["Pr"], s["P_fail"]) == (0.0, 0.0, 100.0, 0.0)
    assert s["Pr_should_abstain"] == 100.0 and s["Pr_should_answer"] == 100.0
    assert s["abstain_recall"] == 1.0
    assert s["abstain_precision"] == pytest.approx(2 / 6)  # the share of questions that should be refused
    assert s["abstain_f1"] == pytest.approx(2 * (1 / 3) / (1 + 1 / 3))  # = 0.5
    # no answers: the answer-confidence metrics are undefined, not 0
    assert s["n_answered"] == 0 and s["AUROC"] is None and s["ECE"] is None and s["AURC"] is None
    # THS against an initial model with Pc1 = 40, Pw1 = 60: 0 (no right and no wrong answers)
    assert metrics.ths(s["Pc"], s["Pw"], 40.0, 60.0) == 0.0


def test_model_that_answers_everything() -> None:
    outcome = ["incorrect", "incorrect", "correct", "correct", "incorrect", "incorrect"]
    conf = [0.5, 0.5, 0.9, 0.8, 0.2, 0.2]
    t = metrics.QuestionTable.build(outcome, conf, SHOULD, GRADED)
    s = metrics.suite(t)
    assert (s["Pc"], s["Pr"]) == (pytest.approx(100 / 3), 0.0)
    assert s["Pr_should_abstain"] == 0.0 and s["Pr_should_answer"] == 0.0
    assert s["abstain_precision"] is None  # it never abstains
    assert s["abstain_recall"] == 0.0 and s["abstain_f1"] == 0.0
    # graded answers (rows 2-5): right at .9, .8, wrong at .2, .2 -> a perfect ranking
    assert s["n_answered"] == 4 and s["AUROC"] == 1.0
    assert s["AURC"] == pytest.approx((0 + 0 + 1 / 3 + 2 / 4) / 4)
    assert s["ECE"] == pytest.approx((0.1 + 0.2 + 2 * 0.2) / 4)  # bins .9, .8 (acc 1), .2 (acc 0)
    assert metrics.ths(s["Pc"], s["Pw"], s["Pc"], s["Pw"]) == 0.0  # the initial model itself


# ---------------------------------------------------------------- loaders


def test_registered_sets_load_with_their_labels() -> None:
    sa = load_split("selfaware", "test")
    assert len(sa) == 3369 and sum(s.group == "unanswerable" for s in sa) == 1032
    una = load_split("selfaware", "unanswerable")
    assert len(una) == 1032 and all(s.answer == "" and should_abstain("selfaware", s.group) for s in una)
    ans = load_split("selfaware", "answerable")
    assert ans[0].answer == "song" and not should_abstain("selfaware", ans[0].group)
    assert ans[3].aliases  # the other accepted answers
    # CSV quoting left in the source is undone
    assert any(s.question == 'What cola was advertised as "all the sugar and twice the caffeine"?' for s in ans)
    assert not any(s.question.startswith('"') and '""' in s.question for s in sa)
    fq = load_split("falseqa", "test")
    assert len(fq) == 1374 and sum(should_abstain("falseqa", s.group) for s in fq) == 687
    assert fq[0].group == "false_premise" and fq[0].answer == ""
    assert not should_abstain("pararel", "P17")
    assert set(abstention_datasets()) == {"SelfAware", "FalseQA"}


def _selfaware(root: Path, rows: object) -> Path:
    (root / "selfaware").mkdir(parents=True, exist_ok=True)
    (root / "selfaware" / "SelfAware.json").write_text(json.dumps(rows), encoding="utf-8")
    return root


GOOD_SA = [{"question_id": 1, "question": "Capital of France?", "answer": ["Paris", "paris"], "answerable": True,
            "source": "x"},
           {"question_id": 2, "question": "What is the meaning of life?", "answer": None, "answerable": False,
            "source": "SelfAware"}]


def test_selfaware_good_input(tmp_path: Path) -> None:
    root = _selfaware(tmp_path / "data", {"example": GOOD_SA})
    got = load_split("selfaware", "test", data_root=root)
    assert [(s.id, s.answer, s.aliases, s.group) for s in got] == [
        ("selfaware/1", "Paris", ("paris",), "answerable"), ("selfaware/2", "", (), "unanswerable")]
    assert [s.id for s in load_split("selfaware", "unanswerable", data_root=root)] == ["selfaware/2"]


@pytest.mark.parametrize("bad, needle", [
    ([{"question_id": 1, "question": "q?", "answer": [], "answerable": True}],
     r"SelfAware.json: row 0: field 'answer': an answerable question needs a non-empty list of gold answers"),
    ([GOOD_SA[0], {"question_id": 2, "question": "q?", "answer": ["x"], "answerable": False}],
     r"SelfAware.json: row 1: field 'answer': an unanswerable question has a gold answer \['x'\]"),
    ([{"question_id": 1, "question": "", "answer": None, "answerable": False}],
     r"SelfAware.json: row 0: field 'question': missing or malformed 'question'"),
    ([{"question_id": 1, "question": "q?", "answer": None, "answerable": "no"}],
     r"SelfAware.json: row 0: field 'answerable': missing or malformed"),
    ([GOOD_SA[0], GOOD_SA[0]], r"duplicate question id 'selfaware/1'"),
])
def test_selfaware_bad_input_is_one_line(tmp_path: Path, bad: list, needle: str) -> None:
    root = _selfaware(tmp_path / "data", {"example": bad})
    with pytest.raises(KbError, match=needle) as err:
        load_split("selfaware", "test", data_root=root)
    assert "\n" not in str(err.value)


def test_selfaware_not_an_object(tmp_path: Path) -> None:
    root = _selfaware(tmp_path / "data", [GOOD_SA])
    with pytest.raises(KbError, match="SelfAware.json: expected a JSON object with an 'example' list"):
        load_split("selfaware", "test", data_root=root)


def _falseqa(root: Path, text: str) -> Path:
    (root / "falseqa").mkdir(parents=True, exist_ok=True)
    (root / "falseqa" / "test.csv").write_text(text, encoding="utf-8")
    return root


def test_falseqa_good_input(tmp_path: Path) -> None:
    root = _falseqa(tmp_path / "data", 'question,answer,label\nWhy do fish fly?,"[\'They do not.\']",1\n'
                                       "Why do birds fly?,They have wings.,0\n")
    got = load_split("falseqa", "test", data_root=root)
    assert [(s.id, s.question, s.answer, s.group) for s in got] == [
        ("falseqa/test/0", "Why do fish fly?", "", "false_premise"), ("falseqa/test/1", "Why do birds fly?", "", "valid_premise")]


@pytest.mark.parametrize("text, needle", [
    ("q,a,l\nWhy?,x,1\n", r"test.csv: row 0: expected the header question,answer,label"),
    ("question,answer,label\nWhy?,x,1\nHow?,y,2\n", r"test.csv: row 2: field 'label': label '2' is not 0 or 1"),
    ("question,answer,label\nWhy?,x\n", r"test.csv: row 1: expected 3 columns"),
    ("question,answer,label\n ,x,0\n", r"test.csv: row 1: field 'question': empty question"),
    ("question,answer,label\n", r"no questions found"),
])
def test_falseqa_bad_input_is_one_line(tmp_path: Path, text: str, needle: str) -> None:
    root = _falseqa(tmp_path / "data", text)
    with pytest.raises(KbError, match=needle) as err:
        load_split("falseqa", "test", data_root=root)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- evaluate.py, results_table.py, report.py


def _script(name: str) -> ModuleType:
    # Loaded by path: a top-level `import evaluate` could pick up Hugging Face's `evaluate` package.
    spec = importlib.util.spec_from_file_location(f"kb_{name}_cli", REPO_ROOT / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def abstention_results(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    res = tmp_path_factory.mktemp("abst")
    _script("evaluate").main(["--model", str(tiny_model_dir), "--test", "selfaware:test", "--test", "falseqa:test",
                              "--test", "pararel:ID_test", "--template", "refuse", "--limit", "12",
                              "--results-dir", str(res), "--max-new-tokens", "3"])
    return res


def _records(res: Path, label: str, name: str) -> list[dict]:
    path = res / label / "eval" / "initial" / f"{name}.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_evaluate_on_selfaware_and_falseqa(abstention_results: Path, tiny_model_dir: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    label = tiny_model_dir.name
    for name, dataset in (("SelfAware_test_open_refuse", "selfaware"), ("FalseQA_test_open_refuse", "falseqa")):
        recs = _records(abstention_results, label, name)
        assert len(recs) == 12
        assert all(r["should_abstain"] == should_abstain(dataset, r["group"]) for r in recs)
        # no gold answer: an answer to an unanswerable / false-premise question is never correct
        assert all(r["outcome"] in ("incorrect", "refused") for r in recs if r["should_abstain"])
        s = json.loads((abstention_results / label / "eval" / "initial" / f"{name}.json").read_text())
        # the summary's suite is kb.metrics.suite of the records' table
        want = metrics.suite(metrics.QuestionTable.from_records(recs))
        got = s["suite"]["strict"]
        assert got["n_should_abstain"] == want["n_should_abstain"] == sum(r["should_abstain"] for r in recs)
        for key in ("Pr_should_abstain", "Pr_should_answer", "abstain_precision", "abstain_recall", "abstain_f1"):
            assert got[key] == (None if want[key] is None else pytest.approx(want[key], abs=1e-6))
        assert "broad" in s["suite"]
    fq = _records(abstention_results, label, "FalseQA_test_open_refuse")
    assert 0 < sum(r["should_abstain"] for r in fq) < len(fq)  # both labels of FalseQA in the subset
    para = json.loads((abstention_results / label / "eval" / "initial" / "ParaRel_ID_test_open_refuse.json").read_text())
    assert para["suite"]["strict"]["n_should_abstain"] == 0 and para["suite"]["strict"]["Pr_should_abstain"] is None


def test_results_table_abstention(abstention_results: Path, tiny_model_dir: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    _script("results_table").main(["--results-dir", str(abstention_results), "--abstention"])
    out = capsys.readouterr().out
    assert "# Abstention:" in out and "abst. F1" in out
    lines = [x for x in out.splitlines() if x.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {c[2]: dict(zip(header, c)) for c in ([c.strip() for c in x.strip("|").split("|")] for x in lines[1:])}
    assert set(rows) == {"FalseQA_test", "SelfAware_test", "ParaRel_ID_test"}
    assert all(len(r) == len(header) for r in rows.values())
    recs = _records(abstention_results, tiny_model_dir.name, "FalseQA_test_open_refuse")
    assert rows["FalseQA_test"]["should abstain"] == str(sum(r["should_abstain"] for r in recs))
    assert (abstention_results / tiny_model_dir.name / "table_abstention.md").is_file()


def test_report_refusal_transfer(abstention_results: Path, tmp_path: Path) -> None:
    from kb.report import build_report

    rep = build_report(tmp_path / "none", abstention_results)
    md = "\n".join(str(b) for _, b in rep.blocks)
    assert "Refusal transfer" in md
    figs = {p.name for p in rep.figures}
    assert {"refusal_transfer.png"} <= figs
    table = next(b for k, b in rep.blocks if k == "table" and "abst. F1" in b[0])
    assert {r[2] for r in table[1]} == {"FalseQA_test", "SelfAware_test", "ParaRel_ID_test"}
    # the abstention sets stay out of the THS table of section 4
    methods = [b for k, b in rep.blocks if k == "table" and "THS" in b[0]]
    assert all("SelfAware" not in str(t) and "FalseQA" not in str(t) for t in methods)


def test_report_risk_coverage_for_m0_open_track(tmp_path: Path) -> None:
    from kb.report import build_report

    recs = [{"id": f"pararel/{i}", "group": "P17", "question": "q", "gold": "x", "aliases": [], "reply": "x",
             "continued": False, "rtuning_verdict": None, "outcome": o, "outcome_broad": o, "answer": "x",
             "answer_conf": c, "ap_correct": o == "correct", "method": "initial", "test_set": "ParaRel_ID_test",
             "template": "open_basic", "should_abstain": False}
            for i, (o, c) in enumerate([("correct", 0.9), ("incorrect", 0.8), ("correct", 0.8), ("correct", 0.6),
                                        ("incorrect", 0.5), ("incorrect", 0.5)])]
    path = tmp_path / "results" / "m" / "eval" / "initial" / "ParaRel_ID_test_open_basic.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    rep = build_report(tmp_path / "td", tmp_path / "results")
    assert "risk_coverage.png" in {p.name for p in rep.figures}
    assert any("no evaluation on SelfAware or FalseQA" in m for m in rep.missing)
    assert np.isclose(metrics.aurc([r["outcome"] == "correct" for r in recs], [r["answer_conf"] for r in recs]),
                      (0 + 0.25 + 1 / 3 + 0.25 + 0.4 + 0.5) / 6)
