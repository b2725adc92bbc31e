"""Bad input, stage by stage: one line naming the file/row/field, exit 2, and no output written."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from kb.paths import REPO_ROOT

MMLU_ROW = '"What is 2+2?",1,2,3,4,D\n'


def _mmlu_root(tmp: Path, test_rows: str = MMLU_ROW * 4, dev_rows: str = MMLU_ROW * 5) -> Path:
    root = tmp / "data"
    for split, rows in (("test", test_rows), ("dev", dev_rows), ("val", MMLU_ROW)):
        (root / "mmlu" / split).mkdir(parents=True, exist_ok=True)
        (root / "mmlu" / split / f"algebra_{split}.csv").write_text(rows)
    return root


def _pararel_root(tmp: Path, text: str) -> Path:
    root = tmp / "data"
    (root / "rtuning" / "pararel").mkdir(parents=True, exist_ok=True)
    (root / "rtuning" / "pararel" / "training_data.json").write_text(text)
    return root


def _run(main: Callable[[list[str]], None], argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    err_text = capsys.readouterr().err
    lines = [ln for ln in err_text.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err_text, err_text[-2000:]
    return lines[0]


def _probe(tmp: Path, model: str, *extra: str) -> list[str]:
    return ["--model", model, "--output-dir", str(tmp / "td"), "--results-dir", str(tmp / "res"), "--device", "cpu", *extra]


# (id, script, how to make the bad input -> extra argv, expected message fragment)
CASES: list[tuple[str, str, Callable[[Path], list[str]], str]] = [
    ("mmlu-short-row", "run_MMLU", lambda t: ["--data-root", str(_mmlu_root(t, MMLU_ROW + "a,b,c\n" + MMLU_ROW * 2))],
     "algebra_test.csv: row 2: expected 6 columns"),
    ("mmlu-letter-E", "run_MMLU", lambda t: ["--data-root", str(_mmlu_root(t, MMLU_ROW * 3 + '"q",1,2,3,4,E\n'))],
     "row 4: field 'answer': answer 'E' is not one of A, B, C, D"),
    ("mmlu-empty-question", "run_MMLU", lambda t: ["--data-root", str(_mmlu_root(t, MMLU_ROW * 3 + '" ",1,2,3,4,A\n'))],
     "row 4: field 'question': empty question"),
    ("mmlu-utf16", "run_MMLU", lambda t: ["--data-root", str(_rewrite(_mmlu_root(t), "mmlu/test/algebra_test.csv",
                                                                      b"\xff\xfe" + MMLU_ROW.encode("utf-16-le")))],
     "algebra_test.csv: not UTF-8 text (byte 0xff at offset 0); it looks like UTF-16: save it as UTF-8"),
    ("mmlu-no-data", "run_MMLU", lambda t: ["--data-root", str(t / "nothing")], "nothing/mmlu: data file not found"),
    ("mmlu-missing-dev", "run_MMLU", lambda t: ["--data-root", str(_rm(_mmlu_root(t), "mmlu/dev/algebra_dev.csv"))],
     "algebra_dev.csv: data file not found"),
    ("mmlu-empty-dataset", "run_MMLU", lambda t: ["--data-root", str(_mmlu_root(t, "")), "--split", "test"],
     "no questions found (empty dataset)"),
    ("mmlu-too-few-shots", "run_MMLU", lambda t: ["--data-root", str(_mmlu_root(t, dev_rows=MMLU_ROW * 2))],
     "only 2 shots available"),
    ("mmlu-ood-train", "run_MMLU", lambda t: ["--domain", "OOD", "--split", "train"], "OOD has no train split"),
    ("pararel-malformed-json", "run_ParaRel", lambda t: ["--data-root", str(_pararel_root(t, '[["q", "a", "r"],'))],
     "training_data.json: malformed JSON"),
    ("pararel-wrong-type", "run_ParaRel", lambda t: ["--data-root", str(_pararel_root(t, '[["q", "a", "r"], ["q", 7, "r"]]'))],
     "training_data.json: row 1: expected [question, answer, relation] strings"),
    ("pararel-empty", "run_ParaRel", lambda t: ["--data-root", str(_pararel_root(t, "[]"))], "empty dataset"),
    ("pararel-not-list", "run_ParaRel", lambda t: ["--data-root", str(_pararel_root(t, '{"q": 1}'))], "expected a JSON list"),
    ("pararel-missing-file", "run_ParaRel", lambda t: ["--data-root", str(t / "nothing")], "training_data.json: data file not found"),
    ("limit-zero", "run_ParaRel", lambda t: ["--limit", "0"], "--limit must be positive"),
    ("bad-dtype", "run_ParaRel", lambda t: ["--dtype", "float8", "--limit", "2"], "unknown --dtype 'float8'"),
    ("config-unknown-key", "run_MMLU", lambda t: ["--config", str(_write(t / "c.yaml", "shots: 0\nepochs: 3\n"))],
     "c.yaml: unknown key(s) epochs"),
    ("config-malformed", "run_MMLU", lambda t: ["--config", str(_write(t / "c.yaml", "shots: [0\n"))], "c.yaml: malformed YAML"),
    ("config-bad-value", "run_MMLU", lambda t: ["--config", str(_write(t / "c.yaml", "domain: XX\n"))], "field 'domain'"),
    ("config-missing", "run_MMLU", lambda t: ["--config", str(t / "none.yaml")], "none.yaml: config file not found"),
    ("unknown-template", "run_MMLU", lambda t: ["--template", "mcq_nope", "--limit", "2"], "unknown prompt template 'mcq_nope'"),
]


def _rewrite(root: Path, rel: str, raw: bytes) -> Path:
    (root / rel).write_bytes(raw)
    return root


def _rm(root: Path, rel: str) -> Path:
    (root / rel).unlink()
    return root


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_probe_bad_input(case, tmp_path, tiny_model_dir, capsys):
    _, script, make, expected = case
    main = __import__(script).main
    msg = _run(main, _probe(tmp_path, str(tiny_model_dir), *make(tmp_path)), capsys)
    assert expected in msg
    assert not (tmp_path / "td").exists() and not (tmp_path / "res").exists()


@pytest.mark.parametrize("model,expected", [
    ("smollm9-1m", "not an offline alias"),
    ("/no/such/model/dir", "not found"),
    ("./missing.gguf", "not found"),
])
def test_bad_model(model, expected, tmp_path, capsys):
    from run_MMLU import main

    msg = _run(main, _probe(tmp_path, model, "--limit", "2"), capsys)
    assert expected in msg and not (tmp_path / "td").exists()


def test_chat_template_on_without_template(tmp_path, capsys):
    from kb.testing import save_tiny
    from run_ParaRel import main

    model = save_tiny(tmp_path / "plain", chat_template=False)
    msg = _run(main, _probe(tmp_path, str(model), "--chat-template", "on", "--limit", "2"), capsys)
    assert "has no chat template" in msg and not (tmp_path / "td").exists()


def _records_case(tmp_path, tiny_model_dir, capsys, mutate: Callable[[Path], None], expected: str) -> None:
    from run_ParaRel import main

    argv = _probe(tmp_path, str(tiny_model_dir), "--limit", "6", "--batch-size", "2", "--method", "unsure")
    main(argv)
    rec = tmp_path / "td" / "tiny-llama" / "probe_ParaRel_ID_train.jsonl"
    mutate(rec)
    capsys.readouterr()
    before = {p: p.read_bytes() for p in (tmp_path / "td").rglob("*") if p.is_file()}
    msg = _run(main, argv, capsys)
    assert expected in msg
    after = {p: p.read_bytes() for p in (tmp_path / "td").rglob("*") if p.is_file()}
    assert before == after  # nothing rewritten


def test_records_with_malformed_middle_line(tmp_path, tiny_model_dir, capsys):
    def mutate(p: Path) -> None:
        lines = p.read_text().splitlines(keepends=True)
        p.write_text(lines[0] + "{not json\n" + "".join(lines[1:]))

    _records_case(tmp_path, tiny_model_dir, capsys, mutate, "probe_ParaRel_ID_train.jsonl: row 2: malformed JSON line")


def test_records_with_duplicate_id(tmp_path, tiny_model_dir, capsys):
    def mutate(p: Path) -> None:
        lines = p.read_text().splitlines(keepends=True)
        p.write_text("".join(lines) + lines[0])

    _records_case(tmp_path, tiny_model_dir, capsys, mutate, "duplicate id")


def test_records_from_another_run(tmp_path, tiny_model_dir, capsys):
    def mutate(p: Path) -> None:
        meta = p.with_name("probe_ParaRel_ID_train.meta.json")
        data = json.loads(meta.read_text())
        data["model"]["fingerprint"] = "0" * 16
        meta.write_text(json.dumps(data))

    _records_case(tmp_path, tiny_model_dir, capsys, mutate, "existing records were made differently (model)")


def test_every_script_has_one_line_errors():
    """Every stage script wraps main() so a KbError never becomes a traceback."""
    for script in sorted(REPO_ROOT.glob("*.py")):
        text = script.read_text()
        if "def main(" in text:
            assert "@cli_main" in text, f"{script.name}: main() is not wrapped with cli_main"
