"""Supervised fine-tuning on LMFlow-format files (Task 2.2.1): TRL's SFTTrainer, LoRA or full.

Why TRL: it already does what LMFlow does with these files (text_only: loss on every token;
text2text: prompt/completion with loss on the completion only), appends the EOS token so the tuned
model learns to stop, and its Trainer resumes from checkpoints. kb adds what a research run needs
around it: every hyperparameter from a versioned recipe (kb.recipe) with no silent trainer default, a
refusal to resume into a run made with different settings, and the files of kb.tuned (resolved recipe,
loss curve, `kb_base_model.json` so `kb.models.load_model(<output dir>)` finds the base model).
Off GPU its loss sends only the labelled positions through the LM head (`completion_loss_trainer`): 1.77x
faster per CPU step than TRL's own, same loss (bench/bench_finetune.py).

The same recipe drives scripts/lmflow_finetune.sh through kb.lmflow, so both trainers get the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from kb.checkpoint import BASE_FILE, make_portable
from kb.errors import KbError
from kb.io import read_json, write_json
from kb.lmflow import read_dataset
from kb.locks import lock_output
from kb.models import default_device, load_model, text_config
from kb.paths import repo_path
from kb.provenance import git_commit, package_versions
from kb.recipe import Recipe, lora_layers
from kb.tuned import META_FILE, base_model_ref, loss_curve, plot_loss, write_recipe_yaml

# Extra TrainerCallbacks (tests use this to interrupt a run and check the resume).
EXTRA_CALLBACKS: list[Any] = []


# ---------------------------------------------------------------- data


def load_training_file(path: str | Path, max_samples: int | None) -> tuple[str, list[dict[str, str]], str]:
    """Validate an LMFlow file (errors name the file and instance) -> (type, rows for TRL, sha256)."""
    p = repo_path(path)
    data = read_dataset(p)
    kind = data["type"]
    inst = data["instances"][:max_samples] if max_samples else data["instances"]
    if kind == "text_only":
        rows = [{"text": r["text"]} for r in inst]
    else:
        rows = [{"prompt": r["input"], "completion": r["output"]} for r in inst]
    return kind, rows, _sha256(p)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def count_truncated(tokenizer: Any, kind: str, rows: list[dict[str, str]], max_length: int) -> tuple[int, int]:
    """(sequences longer than max_length, text2text ones whose whole output would be cut off)."""
    eos = tokenizer.eos_token or ""
    long = lost = 0
    for r in rows:
        if kind == "text_only":
            n = len(tokenizer(r["text"] + eos, add_special_tokens=False)["input_ids"])
        else:
            n_prompt = len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"])
            n = len(tokenizer(r["prompt"] + r["completion"] + eos, add_special_tokens=False)["input_ids"])
            lost += n_prompt >= max_length
        long += n > max_length
    return long, lost


# ---------------------------------------------------------------- resume


def _run_key(recipe: Recipe, kind: str, train_sha: str, n: int, fingerprint: str) -> dict[str, Any]:
    """Everything that changes the weights; a rerun resumes only into a run with the same key."""
    return {"config": recipe.to_dict(), "train_type": kind, "train_sha256": train_sha, "n_instances": n,
            "base_fingerprint": fingerprint}


def _prepare_output(out: Path, run_key: dict[str, Any], resume: bool) -> bool:
    """Decide what to do with an existing output dir. Returns True when the run is already complete."""
    meta_path = out / META_FILE
    if not out.exists() or not any(out.iterdir()):
        return False
    if not meta_path.is_file():
        raise KbError(f"{out}: exists and is not a kb fine-tuning dir (no {META_FILE}); choose another --output-dir")
    old = read_json(meta_path)
    if not isinstance(old, dict):
        raise KbError(f"{meta_path}: must be a JSON object; rerun with --restart to start over")
    if not resume:
        shutil.rmtree(out)
        return False
    if old.get("run_key") != run_key:
        a, b = run_key, old.get("run_key") or {}
        diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if "config" in diff:
            ca, cb = a["config"], b.get("config") or {}
            diff = [f"config.{k}: {cb.get(k)!r} -> {ca.get(k)!r}" for k in ca if ca.get(k) != cb.get(k)] + \
                   [d for d in diff if d != "config"]
        raise KbError(f"{out}: an existing run was made differently ({'; '.join(diff)}); "
                      "rerun with --restart (resume=False) to start over, or choose another --output-dir")
    return old.get("status") == "complete"


def last_complete_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest checkpoint that was written to the end. The Trainer writes trainer_state.json last and
    deletes older checkpoints only after a new one is complete, so a run killed mid-save leaves a newest
    dir without a readable state: it is removed and the one before it is resumed."""
    if not ckpt_dir.is_dir():
        return None
    found = sorted((int(p.name.rsplit("-", 1)[1]), p) for p in ckpt_dir.glob("checkpoint-*")
                   if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit())
    for _, path in reversed(found):
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
            return str(path)
        except (OSError, ValueError):
            print(f"note: {path.name} was cut off mid-save (no readable trainer_state.json); removing it")
            shutil.rmtree(path, ignore_errors=True)
    return None


# ---------------------------------------------------------------- the trainer


def _sft_config(recipe: Recipe, kind: str, ckpt_dir: Path, device: str, checkpoints: bool = True) -> Any:
    """TRL's SFTConfig with every value from the recipe (none left to TRL's defaults)."""
    from trl import SFTConfig  # heavy deps load only when a run trains

    precision = recipe.precision_on(device)
    return SFTConfig(
        output_dir=str(ckpt_dir),
        num_train_epochs=recipe.num_train_epochs, max_steps=recipe.max_steps,
        learning_rate=recipe.learning_rate, lr_scheduler_type=recipe.lr_scheduler_type,
        warmup_steps=recipe.warmup_steps, weight_decay=recipe.weight_decay,
        per_device_train_batch_size=recipe.per_device_train_batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps, max_grad_norm=recipe.max_grad_norm,
        train_sampling_strategy=recipe.train_sampling_strategy,
        optim=recipe.optim, adam_beta1=recipe.adam_beta1, adam_beta2=recipe.adam_beta2,
        adam_epsilon=recipe.adam_epsilon, seed=recipe.seed, data_seed=recipe.seed,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=device == "cpu",
        gradient_checkpointing=recipe.gradient_checkpointing,
        logging_strategy="steps", logging_steps=recipe.logging_steps, logging_first_step=True,
        save_strategy="steps" if checkpoints else "no", save_steps=recipe.save_steps, save_total_limit=recipe.save_total_limit,
        save_only_model=False,  # optimizer + scheduler + RNG state too, so a rerun resumes exactly
        eval_strategy="no", report_to="none", dataloader_num_workers=0, dataloader_pin_memory=device != "cpu",
        include_num_input_tokens_seen="non_padding",  # the tokens trained on: tokens/s in kb_finetune.json
        # Data handling: LMFlow semantics (text_only: loss on all tokens, text2text: on the output only).
        max_length=recipe.max_length, truncation_mode="keep_start", packing=False, padding_free=False,
        completion_only_loss=kind == "text2text", dataset_text_field="text", shuffle_dataset=False,
        dataset_num_proc=None, loss_type="nll",
    )


def _lora_config(recipe: Recipe, layers: list[int] | None) -> Any:
    """PEFT's config from the recipe's lora block; `layers` = lora_layers() against the loaded model."""
    from peft import LoraConfig

    lora = recipe.lora
    assert lora is not None
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, layers_to_transform=layers,
                      bias=lora.bias, task_type="CAUSAL_LM")


def _n_layers(model: Any) -> int:
    return int(text_config(model).num_hidden_layers)


def completion_loss_trainer() -> type:
    """TRL's SFTTrainer with a loss that sends only the positions that have a label through the LM head.

    Why: off Triton devices TRL's fused LM head projects every position (fixed tile shapes for
    compilers); with a 49k-token vocabulary and a few completion tokens per MMLU prompt that was ~40% of
    a LoRA step on a 2-core CPU (torch profiler, SmolLM2-135M). The loss is the same: the label tokens'
    summed negative log-likelihood over the tokens the Trainer counts for the optimizer step. The model's
    own forward applies the head (`logits_to_keep`), so softcapping and logit scales stay the model's.
    On CUDA / XPU, TRL's fused head already scores only those positions, in tiles (no full logits in
    memory), so it is used there.
    """
    import torch
    from trl import SFTTrainer

    class CompletionLossSFTTrainer(SFTTrainer):
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            labels = inputs["labels"]
            if labels.device.type in ("cuda", "xpu"):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # each position's next token
            keep = (targets != -100).any(0).nonzero()[:, 0]  # positions with a label in any row of the batch
            out = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False, logits_to_keep=keep)
            logits = out.logits.float()
            picked = targets[:, keep]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), picked.reshape(-1),
                                                    ignore_index=-100, reduction="sum")
            count = (picked != -100).sum() if num_items_in_batch is None else num_items_in_batch
            loss = nll / torch.as_tensor(count, device=nll.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count is global
            return (loss, out) if return_outputs else loss

    return CompletionLossSFTTrainer


def finetune(train_file: str | Path, recipe: Recipe, model: str, output_dir: str | Path, *, recipe_name: str = "custom",
             resume: bool = True, trust_remote_code: bool = False, revision: str | None = None,
             checkpoints: bool = True) -> Path:
    """Fine-tune `model` on an LMFlow-format file; returns the dir `kb.models.load_model(str(dir))` loads.

    recipe: kb.recipe.load_recipe's; recipe_name: recorded with the run (its file's stem). resume:
    continue from the last checkpoint of an unfinished run with identical settings (a finished one is
    returned as is); False deletes the old run first. trust_remote_code / revision: as for
    kb.models.load_model (recorded in kb_base_model.json). checkpoints: False writes no resumable checkpoint
    (a timing run: a 7B full fine-tune's is 13.8 GB of weights and 27 GB of AdamW state). Nothing is created
    when the file or model is bad. The main process holds `<output_dir>.lock` until the calling script ends, so a second run into
    the same dir stops at once.
    """
    from accelerate import DistributedType, PartialState
    from accelerate.utils import broadcast_object_list

    kind, rows, train_sha = load_training_file(train_file, recipe.max_train_samples)
    out = repo_path(output_dir)
    # torchrun / accelerate launch: one process per GPU, data-parallel through the Trainer (DDP); rank 0
    # alone prepares and writes the output dir. A single process is the usual path.
    on_cpu = default_device() == "cpu"
    proc = PartialState(cpu=on_cpu)  # on CPU, several processes train through gloo (how the tests run it)
    device = str(proc.device) if proc.num_processes > 1 and not on_cpu else None
    if proc.distributed_type == DistributedType.FSDP:
        device = "cpu"  # FSDP shards the weights onto the GPUs itself
    if proc.is_main_process:
        lock_output(out)  # one writer per output dir; the other ranks of this launch write nothing there
    lm = load_model(model, device=device, dtype="float32", for_training=True, trust_remote_code=trust_remote_code,
                    revision=revision)
    if lm.adapter:
        raise KbError(f"{model}: is a LoRA adapter; fine-tune its base model, or merge the adapter into a full model first")
    layers = lora_layers(recipe.lora.layers, _n_layers(lm.model)) if recipe.lora else None  # before anything is written
    run_key = _run_key(recipe, kind, train_sha, len(rows), lm.fingerprint)
    done = [_prepare_output(out, run_key, resume) if proc.is_main_process else None]
    if proc.num_processes > 1:
        broadcast_object_list(done)
    if done[0]:
        print(f"already trained: {out} (same recipe, data and base model); use --restart to train again")
        return out

    long, lost = count_truncated(lm.tokenizer, kind, rows, recipe.max_length)
    if lost:
        raise KbError(f"{repo_path(train_file)}: {lost} instance(s) have a prompt of max_length={recipe.max_length} "
                      "tokens or more, so nothing of their output would be trained; raise max_length")
    base_info = {"base_model": base_model_ref(model), "base_label": lm.label, "base_source": lm.source,
                 "tuning": recipe.tuning, "config_name": recipe_name, "train_file": str(repo_path(train_file)),
                 "base_revision": lm.revision, "trust_remote_code": lm.trust_remote_code}
    meta: dict[str, Any] = {"stage": "finetune", "status": "running", "run_key": run_key, "config_name": recipe_name,
                            "train_file": str(repo_path(train_file)), "base_model": base_info["base_model"],
                            "base_label": lm.label, "base_revision": lm.revision,
                            "trust_remote_code": lm.trust_remote_code, "device": lm.device,
                            "precision": recipe.precision_on(lm.device), "truncated_instances": long,
                            "trainer": "trl.SFTTrainer", "processes": proc.num_processes,
                            "packages": package_versions(), "git_commit": git_commit()}
    if proc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / META_FILE, meta)
        write_recipe_yaml(out / "config.yaml", recipe, f"resolved fine-tuning config ({recipe_name}) for {base_info['base_model']}")
    proc.wait_for_everyone()

    from datasets import Dataset
    from transformers import set_seed

    set_seed(recipe.seed)  # before the trainer builds LoRA weights
    ckpt_dir = out / "checkpoints"
    last = last_complete_checkpoint(ckpt_dir)
    trainer = completion_loss_trainer()(
        model=lm.model, args=_sft_config(recipe, kind, ckpt_dir, lm.device, checkpoints), train_dataset=Dataset.from_list(rows),
        processing_class=lm.tokenizer, peft_config=_lora_config(recipe, layers) if recipe.lora else None,
        callbacks=list(EXTRA_CALLBACKS) or None,
    )
    if last:
        print(f"resuming from {last}")
    start = time.time()
    result = trainer.train(resume_from_checkpoint=last)
    wall = time.time() - start

    trainer.save_model(str(out))  # rank 0 writes (the Trainer's should_save)
    if proc.is_main_process:
        lm.tokenizer.save_pretrained(str(out))
        make_portable(out)  # the same dir loads under transformers 4.x (LMFlow's environment)
        write_json(out / BASE_FILE, base_info)
        curve = loss_curve(trainer.state.log_history)
        write_json(out / "loss.json", {**curve, "config_name": recipe_name, "train_file": base_info["train_file"]})
        plot_loss(curve, out / "loss.png", f"{lm.label} | {recipe_name}\n{Path(train_file).name}")
        if ckpt_dir.exists() and not recipe.keep_checkpoints:
            shutil.rmtree(ckpt_dir)
        tokens = int(trainer.state.num_input_tokens_seen)  # non-padding input tokens, resumed steps included
        meta.update(status="complete", steps=int(trainer.state.global_step), train_wall_s=round(wall, 1),
                    tokens_seen=tokens, train_tokens_per_s=None if last else round(tokens / max(wall, 1e-9), 1),
                    train_loss=round(float(result.training_loss), 6),
                    first_loss=curve["loss"][0] if curve["loss"] else None,
                    last_loss=curve["loss"][-1] if curve["loss"] else None, resumed_from=Path(last).name if last else None)
        write_json(out / META_FILE, meta)
    proc.wait_for_everyone()  # every rank returns once the output dir is complete
    return out
