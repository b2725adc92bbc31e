"""Fine-tune a model on a refusal-aware training file in LMFlow's format (Task 2.2.1).

Inputs: a training file from training_data/ (text_only: loss on every token; text2text: loss on the
output only) and a recipe from configs/ (--recipe) that pins every hyperparameter (override one with
--set key=value, e.g. --set learning_rate=1e-4 --set lora.r=8). Trains with TRL's SFTTrainer
(LoRA or full) and resumes from the last checkpoint when rerun with the same settings. --config is,
as in every stage, a YAML of this script's own flags (recipe: ..., train-file: ...).
Outputs, in --output-dir (default models/<model>/<recipe>__<training file>): the LoRA adapter or the
full model, kb_base_model.json (so `--model <dir>` loads it everywhere), config.yaml (resolved recipe),
kb_finetune.json (provenance, losses, wall time), loss.json and loss.png; a copy of the loss curve
goes to results/<model>/finetune/<run>/.

    python finetune.py --recipe configs/finetune_cpu_demo.yaml \
        --train-file training_data/smollm2-135m/rtuning_unknown_MMLU_ID_train_0shot_text2text.json
"""

from __future__ import annotations

import argparse
import shutil

from kb.config import add_common_args, parse_with_config
from kb.errors import KbError, cli_main
from kb.finetune import finetune
from kb.io import read_json
from kb.layout import default_tuned_dir, finetune_results, results_dir, wrote
from kb.lmflow import finish_lmflow, prepare_lmflow
from kb.models import resolve_model
from kb.paths import repo_path
from kb.recipe import describe_recipe, load_recipe, parse_overrides
from kb.tuned import META_FILE, summary_line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="recipe keys:\n" + describe_recipe())
    add_common_args(p)
    p.add_argument("--recipe", required=True, help="fine-tuning recipe (YAML under configs/, e.g. configs/finetune_rtuning.yaml)")
    p.add_argument("--train-file", required=True, help="LMFlow-format JSON (text_only or text2text)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (repeatable; lora.<key> for the LoRA section)")
    p.add_argument("--lmflow", choices=["args", "prepare", "finish"], default=None,
                   help="do not train: print the same run's flags for LMFlow's examples/finetune.py, one per line "
                        "(prepare: also stage the data folder and kb_base_model.json; finish: after LMFlow's run, "
                        "apply keep_checkpoints and write loss.json and kb_finetune.json; used by scripts/lmflow_finetune.sh)")
    # Common flags given a fine-tuning meaning: --limit = max_train_samples, --batch-size = per-device batch.
    p.set_defaults(output_dir=None, batch_size=None, seed=None)
    return p


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parse_with_config(build_parser(), argv, hint="a training recipe goes to --recipe")
    if args.adapter:
        raise KbError("--adapter: fine-tuning starts from a full model; merge the adapter first")
    overrides = parse_overrides(args.set)
    if args.limit is not None:
        overrides["max_train_samples"] = args.limit
    if args.batch_size is not None:
        overrides["per_device_train_batch_size"] = args.batch_size
    recipe, name = load_recipe(args.recipe, overrides, args.seed)  # a bad recipe fails before anything loads
    out = repo_path(args.output_dir) if args.output_dir else default_tuned_dir(
        resolve_model(args.model)[1], name, args.train_file)
    if args.lmflow == "finish":
        meta = read_json(finish_lmflow(out, recipe, name) / META_FILE)
        print(f"LMFlow run: {meta['steps']} steps, loss {meta['first_loss']} -> {meta['last_loss']}, "
              f"{meta['train_wall_s']} s -> {out}")
        return
    if args.lmflow:
        print("\n".join(prepare_lmflow(args.train_file, recipe, name, args.model, out, write=args.lmflow == "prepare")))
        return
    out = finetune(args.train_file, recipe, args.model, out, recipe_name=name, resume=not args.restart,
                   trust_remote_code=args.trust_remote_code, revision=args.revision)
    label = resolve_model(args.model)[1]
    res = finetune_results(results_dir(args.results_dir or "results", label), out)
    res.mkdir(parents=True, exist_ok=True)
    for file in ("loss.json", "loss.png", META_FILE):
        shutil.copyfile(out / file, res / file)
    print(summary_line(out))
    wrote(res)


if __name__ == "__main__":
    main()
