"""Build refusal-aware training sets from knowledge state and flow, and measure their CRSS (CRaFT stage 2).

Methods: van (Van-Tuning), cor_rait (Cor-RAIT), corcer_rait (CorCer-RAIT), craft_wo_cer (CRaFT w/o Cer),
craft (CRaFT, Algorithm 1: D_van = {mu >= tau_mu} by certainty highest first; D_idk = {mu < tau_mu and
delta mu < 0} by certainty lowest first; --tie-rule keep also keeps delta mu == 0). Answers: the gold
answer (MCQ: its letter) or "I don't know.", under the REFUSE prompt. CRSS per set: the share of idk
questions whose nearest vanilla question (cosine of M0's representations) is above --tau-sim.

Inputs (written by query_state.py and rehearsal_finetune.py for the same flags, or --state / --flow):
  training_data/<model>/state_<name>.jsonl (+ .meta.json, .reps.npy, .reps.json), flow_<name>.jsonl (+ .meta.json)
Outputs:
  training_data/<model>/rait_<method>_<name>.json            LMFlow text_only
  training_data/<model>/rait_<method>_<name>_text2text.json  LMFlow text2text (kb_meta: ids, labels, params)
  results/<model>/crss_<name>.json                           set sizes, pools, CRSS at tau_sim and a sweep

    python build_rait.py --model smollm2-135m --dataset mmlu --n-van 4000 --n-idk 1000
"""

from __future__ import annotations

import argparse

from kb.config import add_common_args, parse_with_config
from kb.crss import SWEEP, TAU_SIM
from kb.errors import cli_main
from kb.rait import METHODS, TIE_RULES, run_build


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, model=False, queries=False)
    p.add_argument("--model", default="smollm2-135m", help="the model whose state files to read (M0)")
    p.add_argument("--trust-remote-code", action="store_true", help="for loading the tokenizer of remote-code models")
    p.add_argument("--chat-template", default="auto", choices=["auto", "on", "off"],
                   help="wrap the REFUSE training prompt in the chat template (auto: when the tokenizer has one)")
    p.add_argument("--dataset", default="mmlu", help="locates state_<name>.jsonl with --split and --shots")
    p.add_argument("--split", default="ID_train")
    p.add_argument("--shots", type=int, default=None, help="as given to query_state.py (default 5 MCQ, 3 open)")
    p.add_argument("--state", default=None, help="state file (default: training_data/<model>/state_<name>.jsonl)")
    p.add_argument("--flow", default=None, help="flow file (default: training_data/<model>/flow_<name>.jsonl)")
    p.add_argument("--methods", default="all", help=f"all or a comma list of {', '.join(METHODS)}")
    p.add_argument("--n-van", type=int, default=None, help="vanilla samples (default 4000 MCQ, 8000 open)")
    p.add_argument("--n-idk", type=int, default=None, help="'I don't know' samples (default 1000 MCQ, 2000 open)")
    p.add_argument("--tau-mu", type=float, default=0.5, help="correctness threshold: known when Cor >= tau_mu")
    p.add_argument("--tie-rule", default="drop", choices=list(TIE_RULES),
                   help="delta mu == 0: drop (strict <, default) or keep (CRaFT's original MMLU code)")
    p.add_argument("--tau-sim", type=float, default=TAU_SIM, help="CRSS similarity threshold")
    p.add_argument("--sweep", default=",".join(f"{t:.2f}" for t in SWEEP), help="CRSS thresholds to report too")
    return p


@cli_main
def main(argv: list[str] | None = None) -> None:
    run_build(parse_with_config(build_parser(), argv))


if __name__ == "__main__":
    main()
