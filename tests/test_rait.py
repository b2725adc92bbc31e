"""CRaFT stage 2 on synthetic files whose answers are known by hand: Algorithm 1, baselines, CRSS, rehearsal
selection, and the refusal to join files that do not belong together."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kb.crss import crss, crss_report, max_cosine
from kb.errors import KbError
from kb.rait import METHODS, RaitParams, select
from kb.rehearsal import most_frequent_correct, rehearsal_rule, select_rehearsal
from kb.statefile import check_flow_matches, flow_record, load_flow, load_state, state_identity

# id: (cor, cer, d_mu). tau_mu = 0.5 -> known: k1..k4 (k4 sits on the threshold); unknown: u1..u5.
TABLE = {
    "k1": (0.90, -0.10, 0.00),
    "k2": (0.80, -0.50, -0.20),
    "k3": (0.60, -0.90, 0.10),
    "k4": (0.50, -0.30, 0.00),
    "u1": (0.49, -1.20, -0.10),
    "u2": (0.20, -0.20, -0.30),
    "u3": (0.30, -1.30, 0.00),  # flow tie: dropped by default, kept with tie_rule="keep"
    "u4": (0.10, -1.00, 0.20),  # rising during rehearsal: never idk under the flow filter
    "u5": (0.40, -0.70, -0.05),
}


def state_rec(rid, cor, cer):
    return {"id": rid, "kind": "mcq", "group": "astronomy", "question": f"Question {rid}?", "gold": "B", "cor": cor,
            "cer": cer, "choices": ["w", "x", "y", "z"], "letter_probs": [(1 - cor) / 3, cor, (1 - cor) / 3, (1 - cor) / 3],
            "pred": "B", "cer_entropy": cer, "cer_agree": 0.5}


STATES = [state_rec(k, c, e) for k, (c, e, _) in TABLE.items()]
FLOWS = {k: {"id": k, "d_mu": d} for k, (_, _, d) in TABLE.items()}


def test_craft_algorithm_1_by_hand():
    sel = select("craft", STATES, FLOWS, RaitParams(n_van=2, n_idk=2))
    assert sel.van == ["k1", "k4"]  # known, certainty highest first: -0.1, -0.3 (k4: mu == tau_mu counts as known)
    assert sel.idk == ["u1", "u5"]  # unknown and falling {u1, u2, u5}, certainty lowest first: -1.2, -0.7
    assert sel.pools == {"van1": 4, "idk1": 3, "unknown": 5, "dropped_by_flow": 2}
    keep = select("craft", STATES, FLOWS, RaitParams(n_van=2, n_idk=2, tie_rule="keep"))
    assert keep.idk == ["u3", "u1"]  # the tie u3 (delta mu == 0) is kept and is the least certain
    big = select("craft", STATES, FLOWS, RaitParams(n_van=10, n_idk=10))
    assert big.van == ["k1", "k4", "k2", "k3"] and big.idk == ["u1", "u5", "u2"]  # caps above the pools: all, in order
    assert select("craft", STATES, FLOWS, RaitParams(n_van=0, n_idk=1)).van == []
    high = select("craft", STATES, FLOWS, RaitParams(n_van=10, n_idk=10, tau_mu=0.85))
    assert high.van == ["k1"] and set(high.idk) == {"k2", "u1", "u2", "u5"}


def test_baselines_by_hand():
    p = RaitParams(n_van=2, n_idk=3, seed=1)
    corcer = select("corcer_rait", STATES, None, p)  # no flow filter: u3 and u4 are candidates
    assert corcer.van == ["k1", "k4"] and corcer.idk == ["u3", "u1", "u4"]
    cor = select("cor_rait", STATES, None, p)
    assert len(cor.van) == 2 and set(cor.van) <= {"k1", "k2", "k3", "k4"}
    assert len(cor.idk) == 3 and set(cor.idk) <= {"u1", "u2", "u3", "u4", "u5"}
    assert select("cor_rait", STATES, None, p).van == cor.van  # seeded
    wo = select("craft_wo_cer", STATES, FLOWS, p)
    assert sorted(wo.idk) == ["u1", "u2", "u5"] and len(wo.van) == 2
    van = select("van", STATES, None, p)
    assert len(van.van) == 5 and van.idk == [] and len(set(van.van)) == 5
    with pytest.raises(KbError, match="needs a flow file"):
        select("craft", STATES, None, p)
    with pytest.raises(KbError, match="tie-rule"):
        select("craft", STATES, FLOWS, RaitParams(n_van=1, n_idk=1, tie_rule="maybe"))
    seeds = {tuple(select("cor_rait", STATES, None, RaitParams(n_van=2, n_idk=2, seed=s)).idk) for s in range(8)}
    assert len(seeds) > 1  # the seed matters


def test_certainty_ties_are_broken_by_seed_not_by_id():
    flat = [state_rec(f"q{i:02d}", 0.9, -0.5) for i in range(20)]
    picks = {tuple(select("corcer_rait", flat, None, RaitParams(n_van=3, n_idk=0, seed=s)).van) for s in range(6)}
    assert len(picks) > 1  # a sort by id would always pick q00, q01, q02


def test_crss_on_a_constructed_set():
    van = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    idk = np.array([[1.0, 0.1, 0.0], [0.0, 0.0, 1.0], [0.7, 0.7, 0.0]])  # max cos: 0.995, 0, 0.707
    m = max_cosine(idk, van)
    np.testing.assert_allclose(m, [1 / math.sqrt(1.01), 0.0, math.sqrt(0.5)], atol=1e-6)
    assert crss(idk, van, 0.97) == pytest.approx(1 / 3)
    assert crss(idk, van, 0.996) == 0.0
    assert crss(idk, van, 0.5) == pytest.approx(2 / 3)
    assert crss(idk[:0], van) is None  # no idk question: undefined
    assert crss(idk, van[:0]) == 0.0  # no vanilla question: nothing to conflict with
    index = {"v1": 0, "v2": 1, "i1": 2, "i2": 3, "i3": 4}
    rep = crss_report(index, np.vstack([van, idk]).astype(np.float32), ["v1", "v2"], ["i1", "i2", "i3"], 0.97, [0.9, 0.99])
    assert rep["crss"] == pytest.approx(1 / 3) and rep["sweep"] == {"0.90": pytest.approx(1 / 3), "0.97": pytest.approx(1 / 3),
                                                                    "0.99": pytest.approx(1 / 3)}
    assert crss_report(index, np.vstack([van, idk]), ["v1"], [], 0.97)["crss"] is None


def test_rehearsal_selection():
    recs = [state_rec(f"q{i}", c, -0.01) for i, c in enumerate([0.99, 0.995, 0.9999, 0.5, 0.991])]
    rule = rehearsal_rule("mcq")
    chosen = select_rehearsal(recs, rule, 1000, 0)
    assert sorted(r["id"] for r, _ in chosen) == ["q1", "q2", "q4"] and all(a == "B" for _, a in chosen)  # strict > 0.99
    two = select_rehearsal(recs, rule, 2, 0)
    assert len(two) == 2 and two == select_rehearsal(recs, rule, 2, 0)  # seeded draw
    assert not rule.relaxed and rehearsal_rule("mcq", min_cor=0.4).relaxed
    with pytest.raises(KbError, match="no question qualifies.*--min-cor"):
        select_rehearsal([state_rec("a", 0.3, -1.0)], rule, 10, 0)
    assert len(select_rehearsal([state_rec("a", 0.3, -1.0)], rehearsal_rule("mcq", min_cor=0.25), 10, 0)) == 1
    with pytest.raises(KbError, match="--min-cer applies to open answers"):
        rehearsal_rule("mcq", min_cer=0.5)


def open_rec(rid, samples, ok, cor=None, cer=1.0):
    return {"id": rid, "kind": "open", "group": "P1", "question": f"{rid}?", "gold": "Paris", "aliases": [],
            "cor": sum(ok) / len(ok) if cor is None else cor, "cer": cer, "samples": samples, "samples_correct": ok}


def test_open_rehearsal_uses_the_models_own_most_frequent_correct_answer():
    rec = open_rec("a", ["Lyon", "paris, France", "Paris", "paris", "Paris"], [False, True, True, True, True])
    assert most_frequent_correct(rec) == "Paris"  # 'Paris' x2 + 'paris' x1 (normalised) beat 'paris, France'
    tie = open_rec("b", ["It is Paris", "Paris"], [True, True])
    assert most_frequent_correct(tie) == "It is Paris"  # equal counts: the first sampled
    perfect = open_rec("c", ["Paris"] * 10, [True] * 10, cer=0.999)
    unsure = open_rec("d", ["Paris"] * 10, [True] * 10, cer=0.99)
    weak = open_rec("e", ["Paris"] * 9 + ["Rome"], [True] * 9 + [False], cer=1.0)
    chosen = select_rehearsal([perfect, unsure, weak], rehearsal_rule("open"), 10, 0)
    assert [(r["id"], a) for r, a in chosen] == [("c", "Paris")]
    relaxed = select_rehearsal([perfect, unsure, weak], rehearsal_rule("open", min_cor=0.9, min_cer=0.9), 10, 0)
    assert sorted(r["id"] for r, _ in relaxed) == ["c", "d", "e"]


# ----------------------------------------------------------------------------------------------------
# Files: a state file and a flow file written by hand, then joined (or refused)


def write_state(tmp_path, records, fingerprint="fp0", name="state_T.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ids = [r["id"] for r in records]
    meta = {"stage": "state", "run_key": {"settings": {"dataset": "mmlu"}}, "model": {"fingerprint": fingerprint, "name": "m",
                                                                                        "label": "m"},
            "questions": {"n": len(ids), "digest": "d" + str(len(ids))}, "question_ids": ids}
    path.with_name(name.replace(".jsonl", ".meta.json")).write_text(json.dumps(meta))
    reps = np.eye(len(ids), 4, dtype=np.float16)
    np.save(path.with_name(name.replace(".jsonl", ".reps.npy")), reps)
    path.with_name(name.replace(".jsonl", ".reps.json")).write_text(json.dumps({"ids": ids, "model_fingerprint": fingerprint}))
    return load_state(path)


def write_flow(tmp_path, state, after=None, name="flow_T.jsonl", identity=None):
    after = after or {r["id"]: {**r, "cor": r["cor"] - 0.1 if r["cor"] >= 0.1 else r["cor"]} for r in state.records}
    path = tmp_path / name
    path.write_text("".join(json.dumps(flow_record(r["id"], r, after[r["id"]])) + "\n" for r in state.records))
    path.with_name(name.replace(".jsonl", ".meta.json")).write_text(
        json.dumps({"stage": "flow", "state": identity or state_identity(state)}))
    return load_flow(path)


def test_flow_joins_only_its_own_state_file(tmp_path):
    state = write_state(tmp_path, STATES)
    flow = write_flow(tmp_path, state)
    check_flow_matches(state, flow)
    assert flow.by_id["u1"]["d_mu"] == pytest.approx(-0.1)
    other_model = write_state(tmp_path, STATES, fingerprint="fp1", name="state_O.jsonl")
    with pytest.raises(KbError, match="made from another state file.*model_fingerprint"):
        check_flow_matches(other_model, flow)
    fewer = write_state(tmp_path, STATES[:-1], name="state_F.jsonl")
    with pytest.raises(KbError, match="another state file"):
        check_flow_matches(fewer, flow)
    # Same identity block but other ids in the flow rows.
    ident = state_identity(state)
    bad = write_flow(tmp_path, fewer, name="flow_B.jsonl", identity=ident)
    with pytest.raises(KbError, match="question ids differ"):
        check_flow_matches(state, bad)
    # A stale state file (same model and questions, other numbers) is caught row by row.
    changed = write_state(tmp_path, [{**r, "cor": 0.01} if r["id"] == "k1" else r for r in STATES], name="state_C.jsonl")
    with pytest.raises(KbError, match="cor0/cer0 differ"):
        check_flow_matches(changed, flow)


def test_representations_must_belong_to_the_state_file(tmp_path):
    from kb.statefile import load_reps

    state = write_state(tmp_path, STATES)
    index, reps = load_reps(state)
    assert reps.shape == (9, 4) and index["k1"] == 0
    side = tmp_path / "state_T.reps.json"
    info = json.loads(side.read_text())
    side.write_text(json.dumps({**info, "model_fingerprint": "other"}))
    with pytest.raises(KbError, match="made by another model"):
        load_reps(state)
    side.write_text(json.dumps({**info, "ids": info["ids"][:-1]}))
    with pytest.raises(KbError, match="does not match"):
        load_reps(state)
    side.write_text(json.dumps({**info, "ids": [*info["ids"][:-1], "zz"]}))
    with pytest.raises(KbError, match=r"no representation for \['u5'\]"):
        load_reps(state)


def test_flow_file_validation(tmp_path):
    state = write_state(tmp_path, STATES)
    path = tmp_path / "flow_T.jsonl"
    write_flow(tmp_path, state)
    rows = path.read_text().splitlines()
    rec = json.loads(rows[3])
    del rec["d_sigma"]
    path.write_text("\n".join(rows[:3] + [json.dumps(rec)] + rows[4:]) + "\n")
    with pytest.raises(KbError, match=r"flow_T.jsonl: row 4: field 'd_sigma': missing field"):
        load_flow(path)
    path.write_text("\n".join(rows + [rows[0]]) + "\n")
    with pytest.raises(KbError, match="duplicate id"):
        load_flow(path)


def test_methods_are_the_five_of_the_paper():
    assert METHODS == ("van", "cor_rait", "corcer_rait", "craft_wo_cer", "craft")
