"""Fine-tuning (kb/recipe.py, kb/finetune.py, finetune.py): recipes, the trainer on a tiny model, adapters
that load, resume from a checkpoint, and bad input rejected before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kb import finetune as ft
from kb.checkpoint import read_base_info
from kb.errors import KbError
from kb.paths import REPO_ROOT
from kb.recipe import Recipe, load_recipe, lora_layers, parse_overrides


def tiny_config(**over: object) -> dict:
    """A fast recipe for the 2-layer random model: a few steps at a high rate so the loss visibly falls."""
    cfg = yaml.safe_load((REPO_ROOT / "configs" / "finetune_cpu_demo.yaml").read_text())
    cfg.update(learning_rate=5e-3, max_steps=12, per_device_train_batch_size=4, gradient_accumulation_steps=1,
               logging_steps=1, save_steps=4, max_length=256)
    cfg["lora"].update(layers=None, r=8, alpha=16, dropout=0.0)
    cfg.update(over)
    return cfg


def tiny_recipe(**over: object) -> Recipe:
    return Recipe.from_mapping(tiny_config(**over))


def write_lmflow(path: Path, kind: str = "text2text", n: int = 16) -> Path:
    pairs = [(f"Question: what is {i} plus {i}? Answer:", f" {2 * i}." if i % 2 else " I don't know.") for i in range(n)]
    inst = [{"input": q, "output": a} for q, a in pairs] if kind == "text2text" else [{"text": q + a} for q, a in pairs]
    path.write_text(json.dumps({"type": kind, "instances": inst}))
    return path


def test_paper_settings_are_pinned() -> None:
    rt, _ = load_recipe(REPO_ROOT / "configs" / "finetune_rtuning.yaml")
    assert (rt.tuning, rt.num_train_epochs, rt.learning_rate, rt.per_device_train_batch_size,
            rt.gradient_accumulation_steps) == ("full", 1, 2e-5, 4, 1)
    mcq, _ = load_recipe(REPO_ROOT / "configs" / "finetune_craft_mcq_lora.yaml")
    assert (mcq.tuning, mcq.learning_rate, mcq.num_train_epochs) == ("lora", 2e-4, 3)
    assert mcq.lora is not None and (mcq.lora.r, mcq.lora.alpha, mcq.lora.dropout) == (64, 16, 0.1)
    op, _ = load_recipe(REPO_ROOT / "configs" / "finetune_craft_open_full.yaml")
    assert (op.tuning, op.learning_rate, op.num_train_epochs) == ("full", 2e-6, 3)


def test_config_errors_name_the_key() -> None:
    cfg = tiny_config()
    del cfg["warmup_steps"]
    with pytest.raises(KbError, match="missing key.*warmup_steps"):
        Recipe.from_mapping(cfg)
    with pytest.raises(KbError, match="unknown key.*epochs"):
        Recipe.from_mapping({**tiny_config(), "epochs": 3})
    with pytest.raises(KbError, match="per_device_train_batch_size"):
        Recipe.from_mapping(tiny_config(per_device_train_batch_size="four"))
    with pytest.raises(KbError, match="lora"):
        Recipe.from_mapping(tiny_config(tuning="full"))  # a lora section with full tuning is a contradiction
    with pytest.raises(KbError, match="'precision': 'fp8' not one of auto, fp32, bf16, fp16"):
        Recipe.from_mapping(tiny_config(precision="fp8"))  # choices come from the declaration (Literal)
    with pytest.raises(KbError, match="'max_steps': -1 or a positive number, got 0"):
        Recipe.from_mapping(tiny_config(max_steps=0))


def test_a_recipe_is_valid_by_construction_and_round_trips() -> None:
    """The dataclass checks itself (dataclasses.replace too); to_dict() loads back to the same recipe,
    and a recipe without the later key train_sampling_strategy gets its declared default."""
    import dataclasses

    recipe = tiny_recipe()
    assert Recipe.from_mapping(recipe.to_dict()) == recipe
    assert list(recipe.to_dict()) == [f.name for f in dataclasses.fields(Recipe)]
    with pytest.raises(KbError, match="learning_rate"):
        dataclasses.replace(recipe, learning_rate=-1.0)
    old = {k: v for k, v in tiny_config().items() if k != "train_sampling_strategy"}
    assert Recipe.from_mapping(old).train_sampling_strategy == "random"
    assert Recipe.from_mapping(tiny_config(learning_rate="2e-5", num_train_epochs=2)).learning_rate == 2e-5


def test_overrides_and_seed() -> None:
    over = parse_overrides(["learning_rate=2e-5", "lora.r=4", "max_train_samples=null"])
    assert over == {"learning_rate": "2e-5", "lora.r": 4, "max_train_samples": None}  # YAML reads 2e-5 as text
    recipe, name = load_recipe(tiny_config(), over, seed=7)
    assert recipe.lora is not None and (recipe.learning_rate, recipe.lora.r, recipe.seed, name) == (2e-5, 4, 7, "custom")
    with pytest.raises(KbError, match="unknown key"):
        load_recipe(tiny_config(), {"lr": 1.0})
    with pytest.raises(KbError, match="unknown lora key"):
        load_recipe(tiny_config(), {"lora.rank": 8})
    with pytest.raises(KbError, match="--set 'learning_rate': expected key=value"):
        parse_overrides(["learning_rate"])
    with pytest.raises(KbError, match="--recipe-set 'x': expected key=value"):
        parse_overrides(["x"], "--recipe-set")


@pytest.mark.slow  # trains
def test_lora_finetune_reduces_loss_and_writes_a_loadable_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    from kb.models import load_model

    data = write_lmflow(tmp_path / "train.json")
    out = ft.finetune(data, tiny_recipe(), str(tiny_model_dir), tmp_path / "run")
    for name in ("adapter_config.json", "kb_base_model.json", "config.yaml", "kb_finetune.json", "loss.json", "loss.png"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists()  # keep_checkpoints: false
    curve = json.loads((out / "loss.json").read_text())
    assert len(curve["loss"]) >= 10
    assert sum(curve["loss"][-3:]) / 3 < curve["loss"][0]
    meta = json.loads((out / "kb_finetune.json").read_text())
    assert meta["status"] == "complete" and meta["steps"] == 12 and meta["run_key"]["train_type"] == "text2text"
    tuned = load_model(str(out), device="cpu", dtype="float32")
    base = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    assert tuned.adapter and tuned.fingerprint != base.fingerprint
    ids = torch.tensor([base.tokenizer("Question: what is 3 plus 3? Answer:")["input_ids"]])
    with torch.inference_mode():
        assert not torch.allclose(tuned.model(input_ids=ids).logits, base.model(input_ids=ids).logits)


@pytest.mark.slow  # trains
def test_full_finetune_on_text_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    from kb.models import load_model

    data = write_lmflow(tmp_path / "train.json", kind="text_only")
    recipe = tiny_recipe(tuning="full", lora=None, max_steps=6, learning_rate=1e-3)
    out = ft.finetune(data, recipe, str(tiny_model_dir), tmp_path / "full")
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    curve = json.loads((out / "loss.json").read_text())
    assert curve["loss"][-1] < curve["loss"][0]
    lm = load_model(str(out), device="cpu", dtype="float32")
    assert lm.adapter is None and read_base_info(out)["base_label"] == Path(tiny_model_dir).name


class _Interrupt(Exception):
    pass


@pytest.mark.slow  # trains
def test_resume_from_checkpoint(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            if state.global_step == 6:
                raise _Interrupt  # a kill after the step-4 checkpoint

    data = write_lmflow(tmp_path / "train.json")
    out_dir = tmp_path / "run"
    monkeypatch.setattr(ft, "EXTRA_CALLBACKS", [StopAt()])
    with pytest.raises(_Interrupt):
        ft.finetune(data, tiny_recipe(), str(tiny_model_dir), out_dir)
    assert (out_dir / "checkpoints" / "checkpoint-4").is_dir()
    assert json.loads((out_dir / "kb_finetune.json").read_text())["status"] == "running"

    monkeypatch.setattr(ft, "EXTRA_CALLBACKS", [])
    with pytest.raises(KbError, match="learning_rate"):  # other settings never resume into this run
        ft.finetune(data, tiny_recipe(learning_rate=1e-3), str(tiny_model_dir), out_dir)
    ft.finetune(data, tiny_recipe(), str(tiny_model_dir), out_dir)
    meta = json.loads((out_dir / "kb_finetune.json").read_text())
    assert meta["status"] == "complete" and meta["resumed_from"] == "checkpoint-4" and meta["steps"] == 12
    steps = json.loads((out_dir / "loss.json").read_text())["step"]
    assert steps[0] == 1 and steps[-1] == 12  # the curve spans the whole run, before and after the resume
    stamp = (out_dir / "adapter_model.safetensors").stat().st_mtime_ns
    ft.finetune(data, tiny_recipe(), str(tiny_model_dir), out_dir)  # finished: returned as is
    assert (out_dir / "adapter_model.safetensors").stat().st_mtime_ns == stamp


def test_malformed_file_is_one_line_and_creates_nothing(tiny_model_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import finetune as cli

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "text2text", "instances": [{"input": "q", "output": "a"}, {"input": "q2"}]}))
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        cli.main(["--recipe", "configs/finetune_cpu_demo.yaml", "--train-file", str(bad), "--model", str(tiny_model_dir),
                  "--output-dir", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "instance 1" in err and "output" in err
    assert not out.exists()


def test_unknown_override_is_rejected_by_the_cli(tiny_model_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import finetune as cli

    data = write_lmflow(tmp_path / "train.json")
    with pytest.raises(SystemExit) as exc:
        cli.main(["--recipe", "configs/finetune_cpu_demo.yaml", "--train-file", str(data), "--model", str(tiny_model_dir),
                  "--output-dir", str(tmp_path / "o"), "--set", "learning_rat=1e-4"])
    assert exc.value.code == 2 and "learning_rat" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_config_is_a_flags_file_and_the_recipe_is_recipe(tiny_model_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """--config means what it means in every stage (a YAML of this script's flags, which may name the
    recipe); a recipe given as --config is an error that says where it goes, never a silent alias."""
    import finetune as cli

    data = write_lmflow(tmp_path / "train.json")
    flags = tmp_path / "flags.yaml"
    flags.write_text(yaml.safe_dump({"recipe": "configs/finetune_cpu_demo.yaml", "train-file": str(data),
                                     "set": ["max_steps=1", "lora.layers=null"], "lmflow": "args"}))
    cli.main(["--config", str(flags), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert "--max_steps\n1\n" in out and "--block_size\n1024\n" in out and not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as exc:
        cli.main(["--config", "configs/finetune_cpu_demo.yaml", "--train-file", str(data), "--model", str(tiny_model_dir)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "unknown key(s)" in err and "a training recipe goes to --recipe" in err
    with pytest.raises(SystemExit) as exc:  # argparse's own error: the recipe is required
        cli.main(["--train-file", str(data), "--model", str(tiny_model_dir)])
    assert exc.value.code == 2 and "--recipe" in capsys.readouterr().err


@pytest.mark.slow  # trains in two processes
def test_two_process_data_parallel_finetune(tiny_model_dir: Path, tmp_path: Path) -> None:
    """torchrun with 2 CPU processes (gloo, DDP through the Trainer): one output dir, written once, that loads."""
    from kb.models import load_model
    from kb.testing import torchrun

    data = write_lmflow(tmp_path / "train.json")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config()))
    proc = torchrun("finetune.py", ["--model", tiny_model_dir, "--recipe", cfg, "--train-file", data,
                                    "--output-dir", tmp_path / "run"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run"
    meta = json.loads((out / "kb_finetune.json").read_text())
    assert meta["status"] == "complete" and meta["processes"] == 2 and meta["steps"] == 12
    assert not (out / "checkpoints").exists()
    curve = json.loads((out / "loss.json").read_text())
    assert sum(curve["loss"][-3:]) / 3 < curve["loss"][0]
    assert load_model(str(out), device="cpu", dtype="float32").adapter


def test_loading_a_model_for_scoring_flips_no_global_switch(tiny_model_dir: Path) -> None:
    """A scoring model has frozen weights of its own; autograd stays on for whatever runs next (a fine-tune)."""
    import torch

    from kb.models import load_model

    lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    assert torch.is_grad_enabled() and not any(p.requires_grad for p in lm.model.parameters())
    assert load_model(str(tiny_model_dir), device="cpu", dtype="float32", for_training=True).model.lm_head.weight.requires_grad


def test_lora_layers_count_from_the_top() -> None:
    assert lora_layers(None, 30) is None
    assert lora_layers([-2, -1], 30) == [28, 29] and lora_layers([-2, -1], 18) == [16, 17]
    assert lora_layers([0, 29, -1], 30) == [0, 29]
    with pytest.raises(KbError, match="lora.layers: 30 is not a layer of this model"):
        lora_layers([30], 30)
    with pytest.raises(KbError, match="-19"):
        lora_layers([-19], 18)


@pytest.mark.parametrize("kind", ["text2text", "text_only"])
def test_completion_loss_equals_trl_loss(tiny_model_dir: Path, tmp_path: Path, kind: str) -> None:
    """The trainer's loss (LM head on labelled positions only) is TRL's own loss on the same batch."""
    import torch
    from datasets import Dataset
    from trl import SFTTrainer

    from kb.models import load_model

    _, rows, _ = ft.load_training_file(write_lmflow(tmp_path / "train.json", kind), None)
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32", for_training=True)
    trainer = ft.completion_loss_trainer()(
        model=lm.model, args=ft._sft_config(tiny_recipe(), kind, tmp_path / "ckpt", "cpu"), train_dataset=Dataset.from_list(rows),
        processing_class=lm.tokenizer)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert kind == "text_only" or (batch["labels"] == -100).float().mean() > 0.5  # prompts are masked
    n = (batch["labels"][:, 1:] != -100).sum()
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=n)
        theirs = SFTTrainer.compute_loss(trainer, trainer.model, dict(batch), num_items_in_batch=n)
        alone = trainer.compute_loss(trainer.model, dict(batch))
    assert torch.allclose(ours, theirs, rtol=1e-5) and torch.allclose(alone, theirs, rtol=1e-5)
