"""kb/layout.py names every file a stage writes: the names (unchanged from before it existed) and their inverses."""

from __future__ import annotations

from pathlib import Path

import pytest

from kb import layout
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
