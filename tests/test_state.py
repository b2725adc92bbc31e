"""Knowledge state (CRaFT stage 1): the Cor/Cer formulas, the record schema, and the query on a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from kb.errors import KbError
from kb.statefile import (
    agreement,
    load_reps,
    load_state,
    mean_pairwise_cosine,
    neg_entropy,
    pairwise_agreement,
    validate_flow_record,
    validate_state_record,
)


def test_mcq_certainty_on_hand_made_distributions():
    assert neg_entropy([0.25] * 4) == pytest.approx(-math.log(4))
    assert agreement([0.25] * 4) == pytest.approx(0.25)
    assert neg_entropy([0.0, 1.0, 0.0, 0.0]) == 0.0
    assert agreement([0.0, 1.0, 0.0, 0.0]) == 1.0
    p = [0.5, 0.25, 0.125, 0.125]
    assert neg_entropy(p) == pytest.approx(-(0.5 * math.log(2) + 0.25 * math.log(4) + 2 * 0.125 * math.log(8)))
    assert -math.log(4) <= neg_entropy(p) <= 0


def test_card_sampling_formula_converges_to_sum_p_squared():
    """1/(N(N-1)) sum_{j!=k} 1[a_j = a_k] over N letters drawn from p -> sum p^2, and is unbiased at N = 10."""
    p = np.array([0.5, 0.3, 0.15, 0.05])
    exact = agreement(p)
    assert exact == pytest.approx(0.365)
    rng = np.random.default_rng(0)
    errors = []
    for n in (10, 100, 1000, 20000):
        draws = ["ABCD"[i] for i in rng.choice(4, size=n, p=p)]
        errors.append(abs(pairwise_agreement(draws) - exact))
    assert errors[-1] < 0.01
    assert errors[-1] < errors[0] or errors[0] < 0.01
    # Unbiased for any N >= 2: the mean over many N = 10 draws sits on sum p^2.
    trials = [pairwise_agreement(["ABCD"[i] for i in rng.choice(4, size=10, p=p)]) for _ in range(4000)]
    assert np.mean(trials) == pytest.approx(exact, abs=0.005)
    with pytest.raises(ValueError):
        pairwise_agreement(["A"])


def test_open_certainty_is_mean_pairwise_cosine_on_fixed_embeddings():
    emb = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])  # cosines: (1,2) 0, (1,3) and (2,3) 1/sqrt(2)
    assert mean_pairwise_cosine(emb) == pytest.approx((0 + 2 / math.sqrt(2)) * 2 / 6)
    assert mean_pairwise_cosine(np.ones((10, 4))) == pytest.approx(1.0)
    assert mean_pairwise_cosine(np.array([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        mean_pairwise_cosine(np.ones((1, 3)))


def _mcq(**kw):
    rec = {"id": "q1", "kind": "mcq", "group": "g", "question": "Q?", "gold": "A", "cor": 0.5, "cer": -1.0,
           "choices": ["a", "b", "c", "d"], "letter_probs": [0.5, 0.2, 0.2, 0.1], "pred": "A", "cer_entropy": -1.0,
           "cer_agree": 0.34}
    rec.update(kw)
    return rec


@pytest.mark.parametrize("change, field, words", [
    ({"cor": None}, "cor", "must be a number"),
    ({"cor": True}, "cor", "must be a number"),
    ({"cor": 1.5}, "cor", "[0, 1]"),
    ({"cer": float("nan")}, "cer", "finite"),
    ({"kind": "essay"}, "kind", "kind must be"),
    ({"letter_probs": [0.5, "x", 0.2, 0.3]}, "letter_probs", "item 1"),
    ({"letter_probs": [0.5, 0.5]}, "letter_probs", "one probability per choice"),
])
def test_state_record_validation_names_row_and_field(change, field, words):
    with pytest.raises(KbError) as err:
        validate_state_record("s.jsonl", 7, _mcq(**change))
    assert f"s.jsonl: row 7: field '{field}'" in str(err.value) and words in str(err.value)


def test_state_record_missing_field_and_flow_consistency():
    rec = _mcq()
    del rec["cer_agree"]
    with pytest.raises(KbError, match="row 3: field 'cer_agree': missing field"):
        validate_state_record("s.jsonl", 3, rec)
    good = {"id": "a", "cor0": 0.5, "cer0": -1.0, "cor1": 0.25, "cer1": -0.5, "d_mu": -0.25, "d_sigma": 0.5}
    assert validate_flow_record("f.jsonl", 1, good) == good
    with pytest.raises(KbError, match="field 'd_mu'"):
        validate_flow_record("f.jsonl", 1, {**good, "d_mu": 0.1})


def test_load_state_rejects_duplicates_nan_and_incomplete_runs(tmp_path):
    path = tmp_path / "state_X.jsonl"
    meta = {"stage": "state", "question_ids": ["q1", "q2"], "model": {"fingerprint": "f"}}
    (tmp_path / "state_X.meta.json").write_text(json.dumps(meta))
    path.write_text(json.dumps(_mcq()) + "\n" + json.dumps(_mcq()) + "\n")
    with pytest.raises(KbError, match=r"row 2: field 'id': duplicate id 'q1'"):
        load_state(path)
    path.write_text(json.dumps(_mcq()) + "\n" + json.dumps(_mcq(id="q2")).replace("-1.0", "NaN", 1) + "\n")
    with pytest.raises(KbError, match="row 2"):
        load_state(path)
    path.write_text(json.dumps(_mcq()) + "\n")
    with pytest.raises(KbError, match="interrupted"):
        load_state(path)


def query_args(tmp_path, model, *extra):
    return [str(a) for a in ["--model", model, "--output-dir", tmp_path / "td", "--results-dir", tmp_path / "res",
                             "--device", "cpu", *extra]]


def test_mcq_state_matches_direct_forward_pass(tmp_path, tiny_model_dir, tiny_lm):
    """Cor, Cer and the representation equal the slow path: one prompt, full forward, hidden_states[-1]."""
    from kb.data import load_split, subset
    from kb.prompts import PromptFormat, render
    from query_state import main

    main(query_args(tmp_path, tiny_model_dir, "--limit", 10, "--shots", 0, "--batch-size", 4))
    state = load_state(tmp_path / "td" / "tiny-llama" / "state_MMLU_ID_train_0shot.jsonl")
    assert state.meta["run_key"]["settings"]["chat"] is False  # MCQ default: no chat template (CRaFT)
    assert state.meta["run_key"]["letter_rule"] == "harness"
    assert "negative entropy" in state.meta["cer_definition"]
    index, reps = load_reps(state)
    assert reps.shape == (10, 64)
    samples = subset(load_split("mmlu", "ID_train"), 10, 0)
    assert [r["id"] for r in state.records] == [s.id for s in samples]
    tok = tiny_lm.tokenizer
    for s in samples:
        ids = tok(render(s, PromptFormat("mcq_harness", 0, False), [], tok))["input_ids"]
        with torch.no_grad():
            out = tiny_lm.model(torch.tensor([ids]), output_hidden_states=True)
        p = torch.softmax(out.logits[0, -1].double(), -1)
        # Raw "Answer:" prompt: the harness rule, the continuation " A" alone (docs/method.md section 3.1).
        letters = [float(p[tok.encode(" " + c, add_special_tokens=False)[0]]) for c in "ABCD"]
        letters = [x / sum(letters) for x in letters]
        rec = state.by_id[s.id]
        assert rec["cor"] == pytest.approx(letters["ABCD".index(s.answer)], abs=1e-5)
        assert rec["cer"] == pytest.approx(sum(x * math.log(x) for x in letters), abs=1e-5)
        assert rec["cer_agree"] == pytest.approx(sum(x * x for x in letters), abs=1e-5)
        ref = out.hidden_states[-1][0, -1].numpy()
        np.testing.assert_allclose(reps[index[s.id]], ref, rtol=2e-3, atol=2e-3)  # stored as float16
    summary = json.loads((tmp_path / "res" / "tiny-llama" / "state_MMLU_ID_train_0shot.json").read_text())
    assert summary["n"] == 10 and "n_rehearsable" in summary
    # The card's agreement as `cer`: same numbers, other field promoted, and the meta says so.
    main(query_args(tmp_path / "agree", tiny_model_dir, "--limit", 4, "--shots", 0, "--mcq-cer", "agreement"))
    agree = load_state(tmp_path / "agree" / "td" / "tiny-llama" / "state_MMLU_ID_train_0shot.jsonl")
    assert "sum_o p(o)^2" in agree.meta["cer_definition"]
    assert all(r["cer"] == r["cer_agree"] == state.by_id[r["id"]]["cer_agree"] for r in agree.records)


def test_open_state_resumes_to_identical_records(tmp_path, tiny_model_dir):
    from query_state import main

    args = query_args(tmp_path, tiny_model_dir, "--dataset", "pararel", "--limit", 6, "--shots", 0, "--n-samples", 3,
                      "--max-new-tokens", 5, "--batch-size", 2)
    main(args)
    path = tmp_path / "td" / "tiny-llama" / "state_ParaRel_ID_train_0shot.jsonl"
    full = load_state(path)
    reps_full = np.load(path.with_name("state_ParaRel_ID_train_0shot.reps.npy"))
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + lines[2][:10])  # killed mid-write
    main(args)
    again = load_state(path)
    assert again.records == full.records
    np.testing.assert_array_equal(np.load(path.with_name("state_ParaRel_ID_train_0shot.reps.npy")), reps_full)
    rec = full.records[0]
    assert len(rec["samples"]) == 3 and rec["cor"] == sum(rec["samples_correct"]) / 3
    assert full.meta["run_key"]["settings"]["chat"] is True  # open default: the chat template when there is one


@pytest.mark.slow  # two torchrun processes
@pytest.mark.parametrize("dataset", ["mmlu", "pararel"])
def test_two_ranks_write_the_single_process_state_files(tmp_path, tiny_model_dir, dataset):
    """torchrun with 2 CPU processes (gloo): records, representations and their index equal a single run's."""
    from kb.testing import torchrun
    from query_state import main

    extra = ["--dataset", dataset, "--limit", 12, "--batch-size", 2]
    if dataset == "pararel":
        extra += ["--shots", 0, "--n-samples", 3, "--max-new-tokens", 5]
    main(query_args(tmp_path / "one", tiny_model_dir, *extra))
    proc = torchrun("query_state.py", query_args(tmp_path / "two", tiny_model_dir, *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = tmp_path / "one" / "td" / "tiny-llama", tmp_path / "two" / "td" / "tiny-llama"
    names = sorted(p.name for p in one.iterdir())
    assert sorted(p.name for p in two.iterdir()) == names  # no shards left behind
    for n in names:
        if not n.endswith(".meta.json"):  # the meta records the output dir
            assert (two / n).read_bytes() == (one / n).read_bytes(), n
    assert len(load_state(two / [n for n in names if n.endswith(".jsonl")][0]).records) == 12


def test_query_state_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_model_dir, capsys):
    from query_state import main

    for extra, words in ((["--dataset", "nope"], "unknown dataset"),
                         (["--dataset", "pararel", "--n-samples", "1"], "--n-samples must be at least 2"),
                         (["--dataset", "mmlu", "--split", "ID_tain"], "no split 'ID_tain'"),
                         (["--dataset", "mmlu", "--template", "nope"], "unknown prompt template")):
        with pytest.raises(SystemExit) as exit_:
            main(query_args(tmp_path, tiny_model_dir, *extra))
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "td").exists()


def test_open_shots_never_come_from_the_queried_questions():
    from kb.data import Sample
    from kb.state_prompts import query_shots

    s = Sample("pararel/ID_train/0", "What field does Alan Turing work in?", "logic", (), (), "P101(field of work)")
    queried = {f"pararel/ID_train/{i}" for i in range(5)}
    shots = query_shots("pararel", "ID_train", s, 3, queried)
    assert len(shots) == 3
    assert not {x.id for x in shots} & queried
    assert all(x.answer.lower() != "logic" and x.group == s.group for x in shots)


def test_early_stop_at_answer_end_keeps_the_cut_answers(tiny_lm):
    """Rows stop once cut_at_period's answer is fixed; the cut answers equal those of a run without the stop."""
    from kb.answers import answer_ended, cut_at_period
    from kb.engine import sample_answers

    tok = tiny_lm.tokenizer
    seqs = [tok(p)["input_ids"] for p in ("Question: What is the capital of France? Answer:", "I am sure. A", "B")]
    full = sample_answers(tiny_lm.model, tok, seqs, 5, 12, 1.0, 7, stop_at_answer_end=False)
    short = sample_answers(tiny_lm.model, tok, seqs, 5, 12, 1.0, 7)
    assert [[cut_at_period(t) for t in row] for row in short] == [[cut_at_period(t) for t in row] for row in full]
    assert sum(map(len, sum(short, []))) < sum(map(len, sum(full, [])))  # it did stop early
    assert answer_ended(" Paris.") and answer_ended("Paris\nLyon") and not answer_ended("\n Paris")


def test_open_shots_are_chat_turns_with_a_chat_template(tiny_lm):
    from kb.data import Sample
    from kb.prompts import PromptFormat
    from kb.state_prompts import render_query, shot_layout

    q = Sample("x/0", "Who made the Beetle?", "Volkswagen", (), (), "P176")
    shots = [Sample("x/1", "Who made the Corolla?", "Toyota", (), (), "P176"),
             Sample("x/2", "Who made the Mustang?", "Ford", (), (), "P176")]
    chat = render_query(q, PromptFormat("open_short", 2, True), shots, tiny_lm.tokenizer)
    assert chat.count("<|im_start|>user\n") == 3 and "<|im_start|>assistant\nToyota<|im_end|>" in chat
    assert chat.endswith("Question: Who made the Beetle?<|im_end|>\n<|im_start|>assistant\n")
    inline = render_query(q, PromptFormat("open_rtuning", 2, False), shots, tiny_lm.tokenizer)
    assert inline == "Question: Who made the Corolla? Answer: Toyota.\nQuestion: Who made the Mustang? Answer: Ford.\n" \
                     "Question: Who made the Beetle? Answer:"
    assert shot_layout(PromptFormat("open_short", 2, True)) == "chat turns"
    assert shot_layout(PromptFormat("open_short", 0, True)) == "inline"
