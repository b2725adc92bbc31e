"""Fine-tuning step time: kb's trainer (LM head on labelled positions only) against TRL's SFTTrainer.

Off Triton devices TRL's fused LM head projects every position of the batch through the 49k-token
head, though a text2text file trains only a few completion tokens per prompt. Both trainers run the
same recipe on the same file, with the same seed, one after the other in this process; the table
gives seconds per optimizer step and the largest difference between their logged losses (the same
loss, so it should be float noise).

    python bench/bench_finetune.py --train-file training_data/smollm2-135m/rtuning_unsure_MMLU_ID_train_0shot_mcq_refuse_text2text.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import common  # bench/common.py: puts the repo on sys.path, so it comes before kb

from kb import finetune as ft
from kb.errors import cli_main
from kb.io import write_json
from kb.recipe import load_recipe
from kb.tuned import META_FILE


def run(trainer: str, args: argparse.Namespace, out: Path) -> dict:
    """One fine-tune with `trainer` ('kb' or 'trl'); its wall time per step and loss curve."""
    if trainer == "trl":
        from trl import SFTTrainer

        saved, ft.completion_loss_trainer = ft.completion_loss_trainer, lambda: SFTTrainer
    recipe, name = load_recipe(args.recipe, {"max_steps": args.steps, "logging_steps": 1})
    try:
        run_dir = ft.finetune(args.train_file, recipe, args.model, out / trainer, recipe_name=name, resume=False)
    finally:
        if trainer == "trl":
            ft.completion_loss_trainer = saved
    meta = json.loads((run_dir / META_FILE).read_text())
    loss = json.loads((run_dir / "loss.json").read_text())["loss"]
    return {"trainer": trainer, "steps": meta["steps"], "train_wall_s": meta["train_wall_s"],
            "s_per_step": round(meta["train_wall_s"] / meta["steps"], 3), "loss": loss}


@cli_main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-file", required=True, help="an LMFlow file (the demo writes R-Tuning's to training_data/)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default="configs/finetune_cpu_demo.yaml", help="fine-tuning recipe (configs/)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", default="bench/results/cpu/finetune_step.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(t, args, Path(tmp)) for t in ("trl", "kb")]
    base, ours = rows
    diff = max(abs(a - b) for a, b in zip(base["loss"], ours["loss"]))
    print(f"\n{'trainer':<28}{'steps':>6}{'s/step':>9}")
    for r, name in zip(rows, ("TRL SFTTrainer (baseline)", "kb (labelled positions)")):
        print(f"{name:<28}{r['steps']:>6}{r['s_per_step']:>9.2f}")
    print(f"speed-up {base['s_per_step'] / ours['s_per_step']:.2f}x; largest logged-loss difference {diff:.2e}")
    write_json(common.ROOT / args.out, {"model": args.model, "recipe": args.recipe, "train_file": args.train_file,
                                         "runs": rows, "speedup": round(base["s_per_step"] / ours["s_per_step"], 3),
                                         "max_loss_diff": diff})


if __name__ == "__main__":
    main()
