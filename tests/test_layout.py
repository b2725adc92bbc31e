"""kb/layout.py names every file a stage writes: the names (unchanged from before it existed), their inverses,
its command line, and the launchers' dry runs, whose every file name must be the one the helper gives."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from kb import layout
from kb.layout import cli as layout_cli
from kb.paths import REPO_ROOT

D = Path("/x/training_data/m")
R = Path("/x/results/m")


@pytest.mark.parametrize("name", ["MMLU_ID_train_5shot", "ParaRel_ID_train", "ParaRel_ID_train_open_refuse",
                                  "MMLU_ID_train_0shot_mcq_refuse", "ParaRel_ID_train_3shot_rehearsed"])
def test_names_round_trip(name):
    for kind, make in (("probe", layout.probe_records), ("state", layout.state_records), ("flow", layout.flow_records)):
        path = make(D, name)
        assert path.parent == D and layout.name_of(path, kind) == name
    for method in ("van", "craft_wo_cer", "craft"):
        assert layout.rait_name_of(layout.rait_set(D, method, name, True), method) == name
    assert layout.is_rehearsed(layout.rehearsed(name)) and layout.rehearsed(name).startswith(name)


def test_a_path_of_another_name_keeps_what_is_left_of_it():
    assert layout.name_of(Path("/tmp/my_state.jsonl"), "state") == "my_state"  # build_rait.py --state FILE


@pytest.mark.parametrize("method, seed", [("craft", 2), ("craft_wo_cer", 12), ("rtuning_unsure", 0), ("initial_refuse", None)])
def test_seeded_names_round_trip(method, seed):
    assert layout.split_seed(layout.seeded(method, seed)) == (method, seed)
    assert layout.seeded(method, "") == method


def test_question_set_names():
    assert layout.test_name("pararel", "ID_test") == "ParaRel_ID_test"
    assert layout.source_name("mmlu", "ID_train", None) == "MMLU_ID_train_5shot"
    assert layout.source_name("pararel", "ID_train", None) == "ParaRel_ID_train_3shot"
    assert layout.source_name("pararel", "ID_train", 0) == "ParaRel_ID_train_0shot"
    assert layout.probe_name("mmlu", "ID_train", 0, "mcq_refuse") == "MMLU_ID_train_0shot_mcq_refuse"
    assert layout.probe_name("pararel", "ID_train", 5) == "ParaRel_ID_train"  # open answers: no shots in the name
    assert layout.probe_name("pararel", "ID_train", None, "open_refuse") == "ParaRel_ID_train_open_refuse"


def test_file_names_are_the_stages_names():
    """The names the stages wrote before kb/layout.py existed, spelled out once more."""
    n = "MMLU_ID_train_5shot"
    assert layout.probe_records(D, n) == D / f"probe_{n}.jsonl"
    assert layout.probe_meta(D, n) == D / f"probe_{n}.meta.json"
    assert layout.probe_summary(R, n) == R / f"probe_{n}.json"
    assert layout.rtuning_set(D, "unsure", n, False) == D / f"rtuning_unsure_{n}.json"
    assert layout.rtuning_set(D, "unsure", n, True) == D / f"rtuning_unsure_{n}_text2text.json"
    state = layout.state_records(D, n)
    assert state == D / f"state_{n}.jsonl" and layout.state_summary(R, n) == R / f"state_{n}.json"
    assert layout.meta_path(state) == D / f"state_{n}.meta.json"
    assert layout.reps_paths(state) == (D / f"state_{n}.reps.npy", D / f"state_{n}.reps.json")
    assert layout.state_records(D, layout.rehearsed(n)) == D / f"state_{n}_rehearsed.jsonl"
    assert layout.rehearsal_set(D, n) == D / f"rehearsal_{n}.json"
    assert layout.flow_records(D, n) == D / f"flow_{n}.jsonl" and layout.flow_summary(R, n) == R / f"flow_{n}.json"
    assert layout.rait_set(D, "craft", n, False) == D / f"rait_craft_{n}.json"
    assert layout.crss_summary(R, n) == R / f"crss_{n}.json"
    rec, summ, meta = layout.eval_paths(R, "craft", "ParaRel_ID_test", "open_refuse")
    assert (rec, summ, meta) == (R / "eval/craft/ParaRel_ID_test_open_refuse.jsonl", R / "eval/craft/ParaRel_ID_test_open_refuse.json",
                                 R / "eval/craft/ParaRel_ID_test_open_refuse.meta.json")
    assert layout.judged_path(rec) == R / "eval/craft/ParaRel_ID_test_open_refuse.judged.jsonl"
    assert layout.is_judged(layout.judged_path(rec)) and not layout.is_judged(rec)
    assert layout.summary_records(summ, {"records": "other.jsonl"}) == R / "eval/craft/other.jsonl"
    assert layout.summary_records(summ, {}) == rec
    assert layout.threshold_summary(R, "ParaRel_ID_train") == R / "threshold_ParaRel_ID_train.json"
    assert layout.lock_path(state) == D / f"state_{n}.lock" and layout.lock_path(Path("/m/run")) == Path("/m/run.lock")
    assert layout.shard_path(state, 1, 2) == D / f"state_{n}.jsonl.shard-1-of-2"
    assert layout.table_path(R) == R / "table_rtuning.md" and layout.table_path(R, True) == R / "table_abstention.md"
    assert layout.report_paths(Path("/x/results")) == (Path("/x/results/report.md"), Path("/x/results/report.html"))
    assert layout.figure_path(Path("/x/results"), "state_map") == Path("/x/results/report_files/state_map.png")
    assert layout.data_dir("training_data", "m") == REPO_ROOT / "training_data/m"
    assert layout.default_tuned_dir("m", "finetune_cpu_demo", "t/rait_craft_X.json") == \
        REPO_ROOT / "models/m/finetune_cpu_demo__rait_craft_X"
    assert layout.tuned_dir("m", "craft", "open", 1) == REPO_ROOT / "models/m/craft_open_seed1"
    assert layout.finetune_log("m", "craft_seed1") == REPO_ROOT / "models/m/log_craft_seed1.txt"


def test_listings_find_what_the_namers_name(tmp_path):
    folder = tmp_path / "m"  # one model's folder under a root
    n = "ParaRel_ID_train_3shot"
    made = [layout.probe_records(folder, n), layout.state_records(folder, n), layout.state_records(folder, layout.rehearsed(n)),
            layout.flow_records(folder, n), layout.rait_set(folder, "craft", n, True), layout.rait_set(folder, "craft", n, False)]
    ev = layout.eval_paths(folder, "initial", "ParaRel_ID_test", "open_basic")
    made += [*ev, layout.judged_path(ev[0])]
    for path in made:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    assert layout.probe_files(folder) == [made[0]]
    assert layout.state_files(folder) == sorted(made[1:3])
    assert layout.flow_files(folder) == [made[3]]
    assert layout.rait_files(folder) == [made[4]]
    assert layout.eval_record_files(folder) == [ev[0]]
    assert layout.eval_summary_files(tmp_path) == [ev[1]]


def _cli(capsys, *argv: str) -> list[str]:
    assert layout_cli.main(list(argv)) == 0
    return capsys.readouterr().out.splitlines()


def test_command_line_prints_the_helpers_names(capsys):
    m = ["--model", "Qwen/Qwen-7B"]
    assert _cli(capsys, "label", *m) == ["Qwen-7B"]
    assert _cli(capsys, "runs-dir", *m) == ["models/Qwen-7B"]
    assert _cli(capsys, "test-name", "--test", "pararel:ID_test", "--test", "mmlu:OOD_test") == ["ParaRel_ID_test", "MMLU_OOD_test"]
    assert _cli(capsys, "source-name", "--dataset", "mmlu", "--split", "ID_train") == ["MMLU_ID_train_5shot"]
    assert _cli(capsys, "rtuning-set", *m, "--dataset", "pararel", "--split", "ID_train", "--tag", "open_refuse",
                "--method", "unsure,unknown", "--text2text") == \
        [f"training_data/Qwen-7B/rtuning_{x}_ParaRel_ID_train_open_refuse_text2text.json" for x in ("unsure", "unknown")]
    assert _cli(capsys, "rait-set", *m, "--dataset", "mmlu", "--split", "ID_train", "--method", "van") == \
        ["training_data/Qwen-7B/rait_van_MMLU_ID_train_5shot.json"]
    assert _cli(capsys, "state", *m, "--dataset", "pararel", "--split", "ID_train") == \
        ["training_data/Qwen-7B/state_ParaRel_ID_train_3shot.jsonl"]
    assert _cli(capsys, "eval", *m, "--method", "craft", "--test", "pararel:ID_test", "--template", "open_refuse") == \
        ["results/Qwen-7B/eval/craft/ParaRel_ID_test_open_refuse.jsonl", "results/Qwen-7B/eval/craft/ParaRel_ID_test_open_refuse.json"]
    assert _cli(capsys, "tuned-dir", *m, "--method", "van,craft", "--source", "open", "--seed", "0", "--seed", "1") == \
        ["models/Qwen-7B/van_open_seed0", "models/Qwen-7B/van_open_seed1", "models/Qwen-7B/craft_open_seed0",
         "models/Qwen-7B/craft_open_seed1"]
    assert _cli(capsys, "seeded", "--method", "craft") == ["craft"]
    assert _cli(capsys, "finetune-log", *m, "--method", "craft", "--seed", "3") == ["models/Qwen-7B/log_craft_seed3.txt"]
    assert _cli(capsys, "table", *m, "--abstention") == ["results/Qwen-7B/table_abstention.md"]
    assert _cli(capsys, "report") == ["results/report.md", "results/report.html"]


def test_command_line_errors_are_one_line(capsys):
    assert layout_cli.main(["probe-name", "--dataset", "mmlu", "--split", "ID_train"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shots" in err


def _dry(script: str, **env: str) -> list[list[str]]:
    out = subprocess.run(["bash", script, "--dry-run"], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, **env}, timeout=120)
    lines = [line for line in out.stdout.splitlines() if line.split(" ", 1)[0].endswith(("python", "python3"))]
    return [shlex.split(line) for line in lines]


def _flag(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def _rel(path: Path) -> str:
    return path.relative_to(REPO_ROOT).as_posix()


@pytest.mark.parametrize("track, seeds", [("open", ""), ("mcq", ""), ("open", "0 2")])
def test_demo_dry_run_names_are_the_helpers(track, seeds):
    """Every training file, output dir, method name and test-set name demo.sh prints is kb.layout's: the R-Tuning
    data is named from the probe command that writes it, the RAIT sets from the state query's source set."""
    cmds = _dry("scripts/demo.sh", TRACK=track, SEEDS=seeds)
    label, dataset = "smollm2-135m", {"open": "pararel", "mcq": "mmlu"}[track]
    data = layout.data_dir(layout.TRAINING_DATA, label)
    probe = [c for c in cmds if c[1] in ("run_ParaRel.py", "run_MMLU.py") and "--template" in c]
    assert len(probe) == 1
    rt_name = layout.probe_name(dataset, "ID_train", int(_flag(probe[0], "--shots")) if "--shots" in probe[0] else None,
                                _flag(probe[0], "--template"))
    expected_train = {f"rtuning_{m}": layout.rtuning_set(data, m, rt_name, True) for m in ("unsure", "unknown")}
    state = [c for c in cmds if c[1] == "query_state.py"][0]
    source = layout.source_name(_flag(state, "--dataset"), _flag(state, "--split"), None)
    expected_train |= {m: layout.rait_set(data, m, source, True) for m in ("van", "cor_rait", "corcer_rait", "craft_wo_cer", "craft")}
    seed_list = seeds.split() or [None]
    tunes = [c for c in cmds if c[1] == "finetune.py"]
    assert len(tunes) == len(expected_train) * len(seed_list)
    evaluated = {_flag(c, "--model"): _flag(c, "--method") for c in cmds if c[1] == "evaluate.py" and "--method" in c}
    for cmd, (method, seed) in zip(tunes, [(m, s) for m in expected_train for s in seed_list]):
        assert _flag(cmd, "--train-file") == _rel(expected_train[method])
        out = _flag(cmd, "--output-dir")
        assert out == _rel(layout.tuned_dir(label, method, track, seed))
        assert evaluated[out] == layout.seeded(method, seed)
    table = [c for c in cmds if c[1] == "results_table.py" and "--test-set" in c][0]
    assert [table[i + 1] for i, t in enumerate(table) if t == "--test-set"] == \
        [layout.test_name(dataset, s) for s in ("ID_test", "OOD_test")]


def test_pipeline_dry_run_names_are_the_helpers():
    cmds = _dry("scripts/run_smollm2_135m.sh")
    label = "smollm2-135m"
    data = layout.data_dir(layout.TRAINING_DATA, label)
    shots = int(_flag([c for c in cmds if c[1] == "run_MMLU.py"][0], "--shots"))
    expected = [(layout.rtuning_set(data, "unsure", layout.probe_name(ds, "ID_train", shots), False),
                 layout.tuned_dir(label, "rtuning_unsure", layout.probe_name(ds, "ID_train", shots))) for ds in ("mmlu", "pararel")]
    for ds in ("mmlu", "pararel"):
        source = layout.source_name(ds, "ID_train", None)
        expected += [(layout.rait_set(data, m, source, True), layout.tuned_dir(label, m, source))
                     for m in ("van", "cor_rait", "corcer_rait", "craft_wo_cer", "craft")]
    tunes = [(_flag(c, "--train-file"), _flag(c, "--output-dir")) for c in cmds if c[1] == "finetune.py"]
    assert tunes == [(_rel(a), _rel(b)) for a, b in expected]
    assert {_flag(c, "--model") for c in cmds if c[1] == "evaluate.py"} - {"smollm2-135m"} == {_rel(b) for _, b in expected}
