"""Fine-tuning step time: kb's trainer (LM head on labelled positions only) against TRL's SFTTrainer.

Off Triton devices TRL's fused LM head projects every position of the batch through the 49k-token
head, though a text2text file trains only a few completion tokens per prompt. Both trainers run the
same recipe on the same file, with the same seed, one after the other in this process; the table
gives seconds per optimizer step, non-padding tokens per second, the model FLOP utilisation (MFU) and
the largest difference between their logged losses (the same loss, so it should be float noise).

MFU counts the decoder body's matrix products only (the LM head and attention scores left out, so it is
a lower bound): 6 x body parameters per token for full fine-tuning; for LoRA 2 x body parameters forward
plus 2 x the parameters of the layers the backward pass goes through (from the lowest adapted layer up;
the adapters' own products are negligible). The peak is the matmul rate measured in the same run in the
recipe's precision.

    python bench/bench_finetune.py --train-file training_data/smollm2-135m/rtuning_unsure_MMLU_ID_train_0shot_mcq_refuse_text2text.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import common  # bench/common.py: puts the repo on sys.path, so it comes before kb

from kb import finetune as ft
from kb.errors import KbError, cli_main
from kb.io import write_json
from kb.models import text_config
from kb.recipe import load_recipe, lora_layers
from kb.tuned import META_FILE


def run(trainer: str, args: argparse.Namespace, out: Path) -> dict:
    """One fine-tune with `trainer` ('kb' or 'trl'); its wall time per step and loss curve."""
    if trainer == "trl":
        from trl import SFTTrainer

        saved, ft.completion_loss_trainer = ft.completion_loss_trainer, lambda: SFTTrainer
    recipe, name = load_recipe(args.recipe, {"max_steps": args.steps, "logging_steps": 1})
    try:  # a timing run resumes nothing, so it writes no checkpoint
        run_dir = ft.finetune(args.train_file, recipe, args.model, out / trainer, recipe_name=name, resume=False,
                              checkpoints=False)
    finally:
        if trainer == "trl":
            ft.completion_loss_trainer = saved
    meta = json.loads((run_dir / META_FILE).read_text())
    loss = json.loads((run_dir / "loss.json").read_text())["loss"]
    return {"trainer": trainer, "steps": meta["steps"], "train_wall_s": meta["train_wall_s"],
            "s_per_step": round(meta["train_wall_s"] / meta["steps"], 3), "loss": loss,
            "tokens_seen": meta["tokens_seen"], "tokens_per_s": meta["train_tokens_per_s"],
            "precision": meta["precision"], "device": meta["device"]}


def flops_per_token(model: str, recipe: Any) -> tuple[float, int]:
    """Body matmul FLOPs per trained token under this recipe (see the module doc) and the body's parameters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kb.models import resolve_model

    with torch.device("meta"):  # the shapes only: no weights are read or allocated
        meta_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model(model)[0]))
    body = common.body_params(meta_model)
    layers = int(text_config(meta_model).num_hidden_layers)
    if recipe.lora is None:
        return 6.0 * body, body
    lowest = min(lora_layers(recipe.lora.layers, layers) or range(layers))
    return 2.0 * body + 2.0 * body / layers * (layers - lowest), body


def timing_file(dataset_split: str, n: int, path: Path) -> str:
    """An R-Tuning `unsure`-style text2text file from the first n questions (REFUSE prompt, gold answer,
    "... I am sure/unsure." alternating): a timing workload with the demo's shapes, not a training set."""
    from kb.data import load_split
    from kb.lmflow import write_dataset
    from kb.prompts import PromptFormat, prompt_for, render, rtuning_suffix, training_instance

    dataset, sep, split = dataset_split.partition(":")
    if not (dataset and sep and split):
        raise KbError(f"--make-from: expected dataset:split (e.g. mmlu:ID_train), got {dataset_split!r}")
    fmt = PromptFormat(prompt_for(dataset, "refuse"), 0, False)
    rows = [training_instance(render(q, fmt, []), f"{q.answer.rstrip('.')}." + rtuning_suffix(i % 2 == 0))
            for i, q in enumerate(load_split(dataset, split)[:n])]
    write_dataset(path, {"type": "text2text", "instances": rows})
    return str(path)


def random_checkpoint(shape: str, path: Path, device: str) -> str:
    """A random-init model of a real shape (bench/common.py RANDOM_INIT) saved with the bench tokenizer."""
    import torch

    torch.manual_seed(0)
    model, tok = common.random_model(shape, device, "bfloat16" if device == "cuda" else "float32")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    return str(path)


@cli_main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-file", default=None, help="an LMFlow file (default: a timing file, --make-from)")
    p.add_argument("--make-from", default="mmlu:ID_train", help="dataset:split of the timing file")
    p.add_argument("--instances", type=int, default=256, help="questions in the timing file")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--random-init", default=None, choices=sorted(common.RANDOM_INIT),
                   help="train a random-init model of this shape instead (e.g. llama2-7b on a GPU)")
    p.add_argument("--recipe", default="configs/finetune_cpu_demo.yaml", help="fine-tuning recipe (configs/)")
    p.add_argument("--trainers", default="trl,kb", help="trl,kb (on CUDA both use TRL's own loss)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", default="bench/results/cpu/finetune_step.json")
    args = p.parse_args()
    trainers = args.trainers.split(",")
    if not trainers or set(trainers) - {"trl", "kb"}:
        raise KbError(f"--trainers: expected trl, kb or trl,kb, got {args.trainers!r}")
    source = args.train_file or f"timing file: {args.make_from}, first {args.instances} questions"
    with tempfile.TemporaryDirectory() as tmp:
        if args.train_file is None:
            args.train_file = timing_file(args.make_from, args.instances, Path(tmp) / "timing_text2text.json")
        if args.random_init:
            import torch

            dev = "cuda" if torch.cuda.is_available() else "cpu"
            args.model = random_checkpoint(args.random_init, Path(tmp) / args.random_init, dev)
        rows = [run(t, args, Path(tmp)) for t in trainers]
        recipe, _ = load_recipe(args.recipe, {})
        fpt, body = flops_per_token(args.model, recipe)
    base, ours = rows[0], rows[-1]
    diff = max(abs(a - b) for a, b in zip(base["loss"], ours["loss"]))
    device = "cuda" if ours["device"].startswith("cuda") else "cpu"
    peak = common.peak_flops(device, {"bf16": "bfloat16", "fp16": "float16"}.get(ours["precision"], "float32"))
    print(f"\n{'trainer':<28}{'steps':>6}{'s/step':>9}{'tokens/s':>10}{'MFU %':>7}")
    names = {"trl": "TRL SFTTrainer (baseline)", "kb": "kb (labelled positions)"}
    for r, name in zip(rows, (names[t] for t in trainers)):
        r["mfu"] = r["tokens_per_s"] * fpt / peak
        print(f"{name:<28}{r['steps']:>6}{r['s_per_step']:>9.2f}{r['tokens_per_s']:>10.0f}{100 * r['mfu']:>7.1f}")
    print(f"speed-up {base['s_per_step'] / ours['s_per_step']:.2f}x; largest logged-loss difference {diff:.2e}")
    print(f"MFU: {fpt:.3g} FLOP per token ({'LoRA' if recipe.lora else 'full'}, body {body / 1e6:.0f} M "
          f"parameters) at a measured {ours['precision']} matmul peak of {peak / 1e12:.2f} TFLOP/s on {device}")
    write_json(common.ROOT / args.out, {"model": args.random_init or args.model, "recipe": args.recipe,
                                         "train_file": source,
                                         "runs": rows, "speedup": round(base["s_per_step"] / ours["s_per_step"], 3),
                                         "max_loss_diff": diff, "flops_per_token": fpt, "body_params": body,
                                         "peak_flops": peak})


if __name__ == "__main__":
    main()
