"""Rehearsal fine-tuning and knowledge flow (CRaFT stage 1): how a brief SFT moves each question's state.

Selects the rehearsal set from M0's state file (MCQ: p(gold) > 0.99; open: Cor >= 0.995 and Cer >= 0.995
with the model's own most frequent correct answer), up to --n-rehearsal drawn with --seed; writes it in
LMFlow text2text under the REFUSE prompt; fine-tunes M0 with kb.finetune on the track's final recipe, as
CRaFT does (--recipe, default configs/finetune_craft_mcq_lora.yaml: 3 epochs LoRA r 64 alpha 16 lr 2e-4;
configs/finetune_craft_open_full.yaml: full FT lr 2e-6; --recipe-set key=value overrides one key);
queries the rehearsed model M~ on the same questions with the same settings (read from the state meta);
writes the flow delta mu = Cor(M~) - Cor(M0), delta sigma = Cer(M~) - Cer(M0) per question.
Small models may have no question that qualifies: that is an error unless --min-cor (and, open answers,
--min-cer) relax the thresholds, which the outputs record as `relaxed`.

Inputs: training_data/<model>/state_<name>.jsonl (query_state.py, same --dataset/--split/--shots) or --state.
Outputs:
  training_data/<model>/rehearsal_<name>.json                 the rehearsal set (LMFlow text2text)
  models/<model>/<recipe>__rehearsal_<name>/                  M~ (or --tuned-dir)
  training_data/<model>/state_<name>_rehearsed.jsonl (+ meta, reps)   M~'s state
  training_data/<model>/flow_<name>.jsonl (+ .meta.json)      FlowRecord per question (kb/statefile.py)
  results/<model>/flow_<name>.json                            summary (mean flow, signs, wall times)

    python rehearsal_finetune.py --model smollm2-135m --dataset mmlu --recipe configs/finetune_craft_mcq_lora.yaml
"""

from __future__ import annotations

import argparse

from kb.config import add_common_args, parse_with_config
from kb.errors import cli_main
from kb.rehearsal import MAX_REHEARSAL, run_rehearsal


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--dataset", default="mmlu", help="locates state_<name>.jsonl with --split and --shots")
    p.add_argument("--split", default="ID_train")
    p.add_argument("--shots", type=int, default=None, help="as given to query_state.py (default 5 MCQ, 3 open)")
    p.add_argument("--state", default=None, help="M0's state file (default: training_data/<model>/state_<name>.jsonl)")
    p.add_argument("--recipe", default=None,
                   help="fine-tuning recipe of the rehearsal SFT (default: the track's CRaFT recipe, "
                        "configs/finetune_craft_mcq_lora.yaml or configs/finetune_craft_open_full.yaml)")
    p.add_argument("--recipe-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (repeatable; lora.<key> for the LoRA section)")
    p.add_argument("--tuned-dir", default=None,
                   help="where M~ goes (default models/<model>/<recipe>__rehearsal_<name>)")
    p.add_argument("--n-rehearsal", type=int, default=MAX_REHEARSAL, help="at most this many rehearsal questions")
    p.add_argument("--min-cor", type=float, default=None,
                   help="relax the Cor threshold (MCQ: p(gold) > X, paper 0.99; open: Cor >= X, paper 0.995)")
    p.add_argument("--min-cer", type=float, default=None, help="relax the open-answer Cer threshold (paper 0.995)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> None:
    run_rehearsal(parse_with_config(build_parser(), argv))


if __name__ == "__main__":
    main()
