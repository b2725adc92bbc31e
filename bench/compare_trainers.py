"""The same R-Tuning recipe through two trainers: finetune.py (TRL) and LMFlow (scripts/lmflow_finetune.sh).

Reads the two fine-tuned output dirs (loss.json, kb_finetune.json) and the per-question evaluation
records of the initial model's BASIC run and of both tuned models on the same questions, and writes
Pc / Pw / Pr / P_fail / THS / AP with 95% bootstrap intervals over questions (the same resampled
questions for every model, so THS and the TRL - LMFlow differences are paired), plus the agreement of
the two tuned models and what their replies look like (length, whether they stop after the answer).

    python bench/compare_trainers.py --base results/smollm2-135m/eval/initial/ParaRel_ID_test_basic.jsonl \
        --run trl=models/smollm2-135m/cmp_trl:results/smollm2-135m/eval/cmp_trl/ParaRel_ID_test_refuse.jsonl \
        --run lmflow=models/smollm2-135m/cmp_lmflow:results/smollm2-135m/eval/cmp_lmflow/ParaRel_ID_test_refuse.jsonl \
        --out bench/results/lmflow_vs_trl.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import common  # noqa: F401  bench/common.py: puts the repo on sys.path, so it comes before kb
import numpy as np

from kb import metrics
from kb.errors import KbError, cli_main
from kb.io import read_json, write_json

CODES = {"correct": 0, "incorrect": 1, "refused": 2, "fail_parse": 3}


def read_records(path: str) -> dict[str, dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return {str(r["id"]): r for r in rows}


def point(outcome: np.ndarray, base: np.ndarray, ap_ok: np.ndarray, score: np.ndarray) -> dict[str, float | None]:
    """Every metric on one (re)sample of questions; THS against the base BASIC rows of the same questions."""
    n = len(outcome)
    pc, pw, pr, pf = (100.0 * np.sum(outcome == c) / n for c in range(4))
    pc1, pw1 = 100.0 * np.sum(base == 0) / n, 100.0 * np.sum(base == 1) / n
    ths = metrics.ths(pc, pw, pc1, pw1)
    ap = metrics.average_precision(ap_ok.tolist(), score.tolist()) if ap_ok.any() and not ap_ok.all() else None
    return {"Pc": pc, "Pw": pw, "Pr": pr, "P_fail": pf, "THS": ths, "AP": None if ap is None else 100 * ap}


def interval(values: list[float | None]) -> list[float] | None:
    v = np.array([x for x in values if x is not None], dtype=float)
    return None if len(v) == 0 else [round(float(np.percentile(v, 2.5)), 2), round(float(np.percentile(v, 97.5)), 2)]


def reply_stats(recs: list[dict]) -> dict[str, float]:
    replies = [r["reply"] for r in recs]
    return {"mean_reply_chars": round(float(np.mean([len(x) for x in replies])), 1),
            "with_sure_question": round(100 * float(np.mean(["Are you sure" in x for x in replies])), 1),
            "verdict_sure": sum(r.get("rtuning_verdict") == "sure" for r in recs),
            "verdict_unsure": sum(r.get("rtuning_verdict") == "unsure" for r in recs)}


@cli_main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the initial model's BASIC records (JSONL) on the test questions")
    p.add_argument("--run", action="append", required=True, metavar="NAME=MODEL_DIR:RECORDS",
                   help="a tuned model: its output dir and its evaluation records (repeatable; two for the differences)")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extra", default=None, help="a JSON file of extra facts to keep (commands, wall times)")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    base = read_records(args.base)
    runs = {}
    for spec in args.run:
        name, _, rest = spec.partition("=")
        model_dir, _, rec_path = rest.partition(":")
        runs[name] = (Path(model_dir), read_records(rec_path))
    ids = sorted(base)
    for name, (_, recs) in runs.items():
        if sorted(recs) != ids:
            raise KbError(f"{name}: its records are not the base run's questions ({len(recs)} vs {len(ids)})")
    base_o = np.array([CODES[base[i]["outcome"]] for i in ids])
    arrays = {}
    for name, (_, recs) in runs.items():
        rows = [recs[i] for i in ids]
        ok = np.array([bool(r.get("ap_correct")) for r in rows])
        score = np.array([metrics.confidence_score(r["answer_conf"], r["sure_prob"]) for r in rows])
        arrays[name] = (np.array([CODES[r["outcome"]] for r in rows]), ok, score)
    bo = np.array([bool(base[i].get("ap_correct")) for i in ids])
    bs = np.array([metrics.confidence_score(base[i]["answer_conf"], base[i]["sure_prob"])
                   if base[i].get("answer_conf") is not None and base[i].get("sure_prob") is not None else 0.0 for i in ids])
    arrays_all = {"initial_basic": (base_o, bo, bs), **arrays}

    rng = np.random.default_rng(args.seed)
    n = len(ids)
    samples = [rng.integers(0, n, n) for _ in range(args.resamples)]
    keys = ("Pc", "Pw", "Pr", "P_fail", "THS", "AP")
    out_models = {}
    boots: dict[str, list[dict]] = {}
    for name, (o, ok, sc) in arrays_all.items():
        est = point(o, base_o, ok, sc)
        boots[name] = [point(o[s], base_o[s], ok[s], sc[s]) for s in samples]
        out_models[name] = {k: (None if est[k] is None else round(est[k], 2)) for k in keys}
        out_models[name]["ci95"] = {k: interval([b[k] for b in boots[name]]) for k in keys}
    names = list(runs)
    result: dict = {"n_questions": n, "bootstrap": {"resamples": args.resamples, "seed": args.seed,
                                                     "kind": "percentile, paired over questions"},
                    "models": out_models}
    if len(names) == 2:
        a, b = names
        diff = {}
        for k in keys:
            d = [None if x[k] is None or y[k] is None else x[k] - y[k] for x, y in zip(boots[a], boots[b])]
            ea, eb = out_models[a][k], out_models[b][k]
            diff[k] = {"point": None if ea is None or eb is None else round(ea - eb, 2), "ci95": interval(d)}
        same = float(np.mean(arrays[a][0] == arrays[b][0]))
        result[f"{a}_minus_{b}"] = diff
        result["same_outcome_share"] = round(100 * same, 1)
    for name, (model_dir, recs) in runs.items():
        rows = [recs[i] for i in ids]
        meta = read_json(model_dir / "kb_finetune.json")
        loss = read_json(model_dir / "loss.json")
        result["models"][name].update(
            replies=reply_stats(rows), steps=meta.get("steps"), train_wall_s=meta.get("train_wall_s"),
            train_loss=meta.get("train_loss"), loss_curve={"step": loss["step"], "loss": [round(x, 4) for x in loss["loss"]]})
    result["models"]["initial_basic"]["replies"] = reply_stats([base[i] for i in ids])
    if args.extra:
        result["run"] = read_json(args.extra)
    write_json(Path(args.out), result)
    for name, m in result["models"].items():
        cells = "  ".join(f"{k} {m[k]} {m['ci95'][k]}" for k in keys)
        print(f"{name:14s} {cells}")
    for k, v in result.items():
        if k.endswith("_minus_lmflow") or k == "same_outcome_share":
            print(k, v)


if __name__ == "__main__":
    main()
