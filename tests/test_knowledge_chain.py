"""CPU smoke run of the chained CRaFT stages on a tiny random model: query_state -> rehearsal_finetune -> build_rait."""

from __future__ import annotations

import json

import pytest

from kb.lmflow import read_dataset
from kb.statefile import load_flow, load_state


def common(tmp_path, model):
    return [str(a) for a in ["--model", model, "--output-dir", tmp_path / "td", "--results-dir", tmp_path / "res",
                             "--device", "cpu"]]


@pytest.mark.slow
def test_chain_mcq(tmp_path, tiny_model_dir, capsys):
    import build_rait
    import query_state
    import rehearsal_finetune

    base = common(tmp_path, tiny_model_dir)
    query_state.main([*base, "--limit", "12", "--shots", "0", "--batch-size", "6"])
    td = tmp_path / "td" / "tiny-llama"
    state = load_state(td / "state_MMLU_ID_train_0shot.jsonl")

    # The paper's rule finds nothing in a random model: a one-line error, no training file.
    with pytest.raises(SystemExit) as exit_:
        rehearsal_finetune.main([*base, "--shots", "0"])
    assert exit_.value.code == 2 and "--min-cor" in capsys.readouterr().err
    assert not (td / "rehearsal_MMLU_ID_train_0shot.json").exists()

    rehearsal_finetune.main([*base, "--shots", "0", "--min-cor", "0.25", "--n-rehearsal", "4",
                             "--recipe", "configs/rehearsal_demo_cpu.yaml", "--recipe-set", "max_steps=2",
                             "--recipe-set", "warmup_steps=0", "--recipe-set", "max_length=2048", "--recipe-set", "lora.layers=[1]",
                             "--tuned-dir", str(tmp_path / "tuned")])
    reh = read_dataset(td / "rehearsal_MMLU_ID_train_0shot.json", expect="text2text")
    sel = reh["kb_meta"]["selection"]
    assert sel["relaxed"] is True and sel["rule"] == "p(gold) > 0.25" and 1 <= sel["n"] <= 4
    assert all(state.by_id[i]["cor"] > 0.25 for i in sel["ids"])
    assert [x["output"] for x in reh["instances"]] == [state.by_id[i]["gold"] for i in sel["ids"]]
    flow = load_flow(td / "flow_MMLU_ID_train_0shot.jsonl")
    after = load_state(td / "state_MMLU_ID_train_0shot_rehearsed.jsonl")
    assert after.meta["run_key"]["settings"] == state.meta["run_key"]["settings"]  # same query, other model
    assert after.fingerprint() != state.fingerprint()
    for f in flow.records:
        assert f["d_mu"] == pytest.approx(after.by_id[f["id"]]["cor"] - state.by_id[f["id"]]["cor"])
    assert any(f["d_mu"] != 0 for f in flow.records)
    assert flow.meta["rehearsal"]["relaxed"] is True

    build_rait.main([*base[:6], "--shots", "0", "--tau-mu", "0.25", "--n-van", "3", "--n-idk", "3"])
    report = json.loads((tmp_path / "res" / "tiny-llama" / "crss_MMLU_ID_train_0shot.json").read_text())
    assert set(report["methods"]) == {"van", "cor_rait", "corcer_rait", "craft_wo_cer", "craft"}
    craft = read_dataset(td / "rait_craft_MMLU_ID_train_0shot_text2text.json", expect="text2text")
    labels = craft["kb_meta"]["instance_labels"]
    flows = flow.by_id
    for rid, label, inst in zip(craft["kb_meta"]["instance_ids"], labels, craft["instances"]):
        rec = state.by_id[rid]
        if label == "idk":
            assert inst["output"] == "I don't know." and rec["cor"] < 0.25 and flows[rid]["d_mu"] < 0
        else:
            assert inst["output"] == rec["gold"] and rec["cor"] >= 0.25
        assert "If you do not know the answer" in inst["input"]  # the REFUSE prompt
    text_only = read_dataset(td / "rait_craft_MMLU_ID_train_0shot.json", expect="text_only")
    assert len(text_only["instances"]) == len(craft["instances"])
    assert report["methods"]["craft"]["n_idk"] == labels.count("idk")
    assert report["methods"]["van"]["crss"] is None

    # A flow file from another state file (here: its rows no longer match) is refused before writing.
    path = td / "flow_MMLU_ID_train_0shot.jsonl"
    rows = path.read_text().splitlines()
    path.write_text("\n".join(rows[:-1]) + "\n")
    before = {p.name: p.stat().st_mtime_ns for p in td.glob("rait_*")}
    with pytest.raises(SystemExit):
        build_rait.main([*base[:6], "--shots", "0", "--tau-mu", "0.25"])
    assert "question ids differ" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in td.glob("rait_*")} == before


@pytest.mark.slow
def test_chain_open_without_flow(tmp_path, tiny_model_dir, capsys):
    """Open answers: a random model never answers right, so rehearsal refuses; flow-free sets still build."""
    import build_rait
    import query_state
    import rehearsal_finetune

    base = common(tmp_path, tiny_model_dir)
    query_state.main([*base, "--dataset", "pararel", "--limit", "6", "--shots", "0", "--n-samples", "2",
                      "--max-new-tokens", "4"])
    with pytest.raises(SystemExit):
        rehearsal_finetune.main([*base, "--dataset", "pararel", "--shots", "0", "--min-cor", "0", "--min-cer", "-1"])
    assert "no question qualifies" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_rait.main([*base[:6], "--dataset", "pararel", "--shots", "0"])
    assert "flow file not found" in capsys.readouterr().err
    build_rait.main([*base[:6], "--dataset", "pararel", "--shots", "0", "--methods", "van,cor_rait,corcer_rait"])
    data = read_dataset(tmp_path / "td" / "tiny-llama" / "rait_corcer_rait_ParaRel_ID_train_0shot_text2text.json")
    assert all(i["output"] == "I don't know." for i in data["instances"])  # nothing known: every question is idk
    assert "if you don't know the answer, only reply with 'I don't know'" in data["instances"][0]["input"]
