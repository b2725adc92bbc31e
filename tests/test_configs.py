"""Every YAML in configs/ loads through the loader its user calls, with no unknown or missing key,
recipes that start from another one (`base:`) resolve to the keys they say, and no two recipes are
the same run under two names."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kb.config import load_yaml, parse_with_config
from kb.errors import KbError
from kb.paths import REPO_ROOT
from kb.recipe import KEYS, load_recipe
from kb.rehearsal import RECIPES

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))
STAGE_CONFIGS = {"query_state_demo_cpu.yaml": "query_state.py"}  # --config of a stage script; the rest are recipes


def _parser(script: str):
    spec = importlib.util.spec_from_file_location(f"cfgtest_{Path(script).stem}", REPO_ROOT / script)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build_parser()


def test_configs_are_found() -> None:
    names = {p.name for p in CONFIGS}
    assert {"finetune_rtuning.yaml", "finetune_craft_mcq_lora.yaml", "finetune_craft_open_full.yaml",
            "finetune_cpu_demo.yaml", "rehearsal_demo_cpu.yaml"} <= names
    assert set(STAGE_CONFIGS) <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_with_no_unknown_key(path: Path) -> None:
    if path.name in STAGE_CONFIGS:
        args = parse_with_config(_parser(STAGE_CONFIGS[path.name]), ["--config", str(path)])
        for key, value in load_yaml(str(path)).items():
            assert getattr(args, key.replace("-", "_")) == value
    else:
        recipe, name = load_recipe(path)
        assert name == path.stem
        assert set(recipe.to_dict()) == set(KEYS)


def test_no_two_recipes_are_the_same_run() -> None:
    recipes = {p.name: load_recipe(p)[0] for p in CONFIGS if p.name not in STAGE_CONFIGS}
    seen: dict[str, str] = {}
    for name, recipe in recipes.items():
        key = repr(recipe.to_dict())
        assert key not in seen, f"{name} is {seen.get(key)} under another name: drop it or use `base:` with a change"
        seen[key] = name


def test_rehearsal_trains_with_the_paper_finetune_recipes() -> None:
    """CRaFT trains the rehearsal like the final RAIT SFT: its default recipes are those files; the CPU
    demo recipe inherits the MCQ one (`base:`) and caps its cost."""
    assert RECIPES == {"mcq": "configs/finetune_craft_mcq_lora.yaml", "open": "configs/finetune_craft_open_full.yaml"}
    demo, _ = load_recipe(REPO_ROOT / "configs" / "rehearsal_demo_cpu.yaml")
    assert demo.lora is not None
    assert (demo.learning_rate, demo.lora.r, demo.lora.alpha, demo.lora.dropout) == (2e-4, 64, 16, 0.1)
    assert demo.lora.layers == [-4, -3, -2, -1] and demo.max_train_samples == 24


def test_base_merges_nested_keys_and_rejects_cycles_and_unknown_keys(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("x: 1\nlora:\n  r: 8\n  alpha: 16\nkeep: [1, 2]\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nx: 2\nlora:\n  r: 4\n")
    assert load_yaml(str(tmp_path / "b.yaml")) == {"x": 2, "lora": {"r": 4, "alpha": 16}, "keep": [1, 2]}
    (tmp_path / "c.yaml").write_text("base: b.yaml\nlora: null\n")
    assert load_yaml(str(tmp_path / "c.yaml"))["lora"] is None
    (tmp_path / "d.yaml").write_text("base: e.yaml\n")
    (tmp_path / "e.yaml").write_text("base: d.yaml\n")
    with pytest.raises(KbError, match="include each other"):
        load_yaml(str(tmp_path / "d.yaml"))
    (tmp_path / "f.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(KbError, match="missing.yaml: config file not found"):
        load_yaml(str(tmp_path / "f.yaml"))
    (tmp_path / "g.yaml").write_text(f"base: {REPO_ROOT / 'configs' / 'finetune_rtuning.yaml'}\nepochs: 3\n")
    with pytest.raises(KbError, match="unknown key.*epochs"):
        load_recipe(tmp_path / "g.yaml")


@pytest.mark.parametrize("script, argv", [
    ("rehearsal_finetune.py", ["--train-config", "configs/rehearsal_demo_cpu.yaml"]),
    ("rehearsal_finetune.py", ["--train-set", "max_steps=1"]),
    ("finetune.py", ["--recipe", "configs/finetune_cpu_demo.yaml", "--train-file", "x.json", "--train-set", "max_steps=1"]),
])
def test_old_recipe_flags_are_argparse_errors(script: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """The recipe is --recipe (overrides --set / --recipe-set) everywhere; the old names are not aliases."""
    with pytest.raises(SystemExit) as exc:
        parse_with_config(_parser(script), argv)
    assert exc.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
