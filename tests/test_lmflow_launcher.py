"""scripts/lmflow_finetune.sh and the checkpoints LMFlow reads.

Always run (kb's environment only): the script parses, its --dry-run command carries every
hyperparameter of every recipe in configs/ explicitly (LMFlow's own launcher would train 0.01 epochs),
every recipe key has an LMFlow flag or is an error, the training file is validated first, a dry run
writes nothing, and the checkpoints kb writes carry the fields transformers 4.x (LMFlow's) reads.

Where LMFlow is importable (LMFLOW_PYTHON, else .venv-lmflow/bin/python, as scripts/lmflow_setup.sh
builds it), also: the flags parse with LMFlow's own argument dataclasses into the recipe's values, and
transformers 4.x loads kb's checkpoints with the right tokenizer and RoPE. Otherwise those are skipped.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from kb.config import load_yaml
from kb.errors import KbError
from kb.paths import REPO_ROOT
from kb.recipe import Recipe, load_recipe

SCRIPT = REPO_ROOT / "scripts" / "lmflow_finetune.sh"
# Flags LMFlow's examples/finetune.py must receive for the run to be the recipe's, not LMFlow's defaults.
REQUIRED = ("model_name_or_path", "dataset_path", "output_dir", "num_train_epochs", "max_steps", "learning_rate",
            "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay", "per_device_train_batch_size",
            "gradient_accumulation_steps", "max_grad_norm", "optim", "adam_beta1", "adam_beta2", "adam_epsilon",
            "block_size", "disable_group_texts", "validation_split_percentage", "seed", "gradient_checkpointing",
            "logging_steps", "save_steps", "save_total_limit", "group_by_length", "use_lora", "bf16", "fp16",
            "torch_dtype", "truncation_side", "padding_side")
LORA = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "save_aggregated_lora")


def _flags(argv: list[str]) -> dict[str, list[str]]:
    """--name v1 v2 --flag ... -> {name: [v1, v2], flag: []} for the part after examples/finetune.py."""
    argv = argv[argv.index("examples/finetune.py") + 1:]
    out: dict[str, list[str]] = {}
    key = None
    for tok in argv:
        if tok.startswith("--"):
            key = tok[2:]
            assert key not in out, f"--{key} given twice"
            out[key] = []
        else:
            assert key is not None
            out[key].append(tok)
    return out


def _dry_run(recipe: str, train: Path, out: Path, model: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", "--recipe", recipe, "--train-file", str(train),
                           "--model", model, "--output-dir", str(out), *extra],
                          capture_output=True, text=True, timeout=120, cwd="/")


@pytest.fixture()
def train_file(tmp_path: Path) -> Path:
    path = tmp_path / "rtuning_unsure_toy.json"
    path.write_text(json.dumps({"type": "text_only", "instances": [{"text": "Q: 1+1? A: 2. I am sure."}]}))
    return path


def test_bash_syntax_and_strict_mode() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    assert "set -euo pipefail" in SCRIPT.read_text()


def test_the_recipe_flag_is_recipe(train_file: Path, tmp_path: Path) -> None:
    res = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--config", "configs/finetune_rtuning.yaml", "--train-file",
                          str(train_file)], capture_output=True, text=True, timeout=60, cwd="/")
    assert res.returncode == 2 and "unknown option '--config'" in res.stderr


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO_ROOT / "configs").glob("finetune_*.yaml")))
def test_dry_run_passes_every_hyperparameter(config: str, train_file: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = load_yaml(str(REPO_ROOT / "configs" / config))  # with its `base:` recipe resolved
    if cfg["lora"] and cfg["lora"]["layers"] is not None:
        # LMFlow cannot restrict LoRA to some layers: the launcher must say so rather than train differently.
        res = _dry_run(f"configs/{config}", train_file, tmp_path / "out", str(tiny_model_dir))
        assert res.returncode == 2 and "lora.layers" in res.stderr
        res = _dry_run(f"configs/{config}", train_file, tmp_path / "out", str(tiny_model_dir), "--set", "lora.layers=null")
    else:
        res = _dry_run(f"configs/{config}", train_file, tmp_path / "out", str(tiny_model_dir))
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    flags = _flags(shlex.split(lines[0]))
    missing = [k for k in REQUIRED + (LORA if cfg["tuning"] == "lora" else ()) if k not in flags]
    assert not missing, f"{config}: the LMFlow command lacks {missing}"
    assert float(flags["num_train_epochs"][0]) == cfg["num_train_epochs"]
    assert float(flags["learning_rate"][0]) == float(cfg["learning_rate"])
    assert int(flags["per_device_train_batch_size"][0]) == cfg["per_device_train_batch_size"]
    assert int(flags["block_size"][0]) == cfg["max_length"]
    assert flags["use_lora"] == ["1" if cfg["tuning"] == "lora" else "0"]
    if cfg["tuning"] == "lora":
        assert int(flags["lora_r"][0]) == cfg["lora"]["r"]
        assert float(flags["lora_alpha"][0]) == cfg["lora"]["alpha"]
        assert float(flags["lora_dropout"][0]) == cfg["lora"]["dropout"]
        # LMFlow's lora_target_modules is one string it splits at commas
        assert flags["lora_target_modules"] == [",".join(cfg["lora"]["target_modules"])]
    assert flags["dataset_path"] == [str(tmp_path / "out" / "lmflow_dataset")]
    assert flags["model_name_or_path"] == [str(tiny_model_dir.resolve())]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_rtuning_recipe_is_the_papers(train_file: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    res = _dry_run("configs/finetune_rtuning.yaml", train_file, tmp_path / "o", str(tiny_model_dir))
    flags = _flags(shlex.split(res.stdout.strip()))
    assert (flags["num_train_epochs"], flags["learning_rate"], flags["per_device_train_batch_size"], flags["use_lora"]) == \
        (["1"], ["2e-05"], ["4"], ["0"])


def test_malformed_training_file_stops_the_launcher(tmp_path: Path, tiny_model_dir: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "text_only", "instances": [{"text": "ok"}, {"txt": "typo"}]}))
    res = _dry_run("configs/finetune_rtuning.yaml", bad, tmp_path / "o", str(tiny_model_dir))
    assert res.returncode == 2
    assert str(bad) in res.stderr and "instance 1" in res.stderr and "text" in res.stderr


def test_prepare_stages_the_data_folder(train_file: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    from kb.checkpoint import read_base_info
    from kb.lmflow import prepare_lmflow
    from kb.recipe import load_recipe

    out = tmp_path / "lmflow_run"
    recipe, name = load_recipe(REPO_ROOT / "configs" / "finetune_rtuning.yaml")
    flags = prepare_lmflow(train_file, recipe, name, str(tiny_model_dir), out, write=True)
    assert (out / "lmflow_dataset" / train_file.name).read_text() == train_file.read_text()
    assert read_base_info(out)["base_label"] == tiny_model_dir.name
    assert flags[flags.index("--output_dir") + 1] == str(out)


# ---------------------------------------------------------------- every recipe key, no silent drops

RECIPES = sorted((REPO_ROOT / "configs").glob("*.yaml"))
FINETUNE_RECIPES = [p for p in RECIPES if yaml.safe_load(p.read_text()).get("tuning")]


def _recipe(path: Path, **over: object) -> Recipe:
    recipe, _ = load_recipe(path, {k.replace("__", "."): v for k, v in over.items()})
    return recipe


def _cfg(path: Path, **over: object) -> dict:
    return _recipe(path, **over).to_dict()


def test_mapping_names_every_recipe_key() -> None:
    from kb.lmflow import LMFLOW_MAPPING, unmapped_keys
    from kb.recipe import KEYS, LORA_KEYS

    assert set(LMFLOW_MAPPING) == set(KEYS) | {f"lora.{k}" for k in LORA_KEYS} and unmapped_keys() == []


@pytest.mark.parametrize("path", FINETUNE_RECIPES, ids=lambda p: p.name)
def test_every_recipe_maps_or_fails_loudly(path: Path) -> None:
    from kb.lmflow import lmflow_args

    cfg = _cfg(path)
    if cfg["lora"] and cfg["lora"]["layers"] is not None:
        with pytest.raises(KbError, match="lora.layers"):
            lmflow_args(_recipe(path), "m", "d", "o", "cpu")
        cfg = _cfg(path, lora__layers=None)
    flags = _flags(["examples/finetune.py", *lmflow_args(Recipe.from_mapping(cfg), "m", "d", "o", "cpu")])
    for key, how in (("seed", "seed"), ("max_steps", "max_steps"), ("optim", "optim"),
                     ("lr_scheduler_type", "lr_scheduler_type"), ("logging_steps", "logging_steps"),
                     ("save_steps", "save_steps"), ("save_total_limit", "save_total_limit"),
                     ("gradient_accumulation_steps", "gradient_accumulation_steps")):
        assert flags[how] == [str(cfg[key])], key
    for key in ("weight_decay", "max_grad_norm", "adam_beta1", "adam_beta2", "adam_epsilon"):
        assert float(flags[key][0]) == cfg[key], key
    w = cfg["warmup_steps"]
    if isinstance(w, float) and 0 < w < 1:
        assert (float(flags["warmup_ratio"][0]), flags["warmup_steps"]) == (w, ["0"])
    else:
        assert (flags["warmup_steps"], float(flags["warmup_ratio"][0])) == ([str(int(w))], 0.0)
    assert flags["gradient_checkpointing"] == ["1" if cfg["gradient_checkpointing"] else "0"]
    assert flags["group_by_length"] == ["1" if cfg["train_sampling_strategy"] == "group_by_length" else "0"]
    assert flags["bf16"] == ["0"] and flags["fp16"] == ["0"]  # auto / fp32 on a CPU
    assert flags.get("max_train_samples") == (None if cfg["max_train_samples"] is None else [str(cfg["max_train_samples"])])


@pytest.mark.parametrize("over, match", [
    ({"train_sampling_strategy": "sequential"}, "sequential"),
    ({"lora__bias": "all"}, "bias"),
    ({"lora__target_modules": "all-linear"}, "all-linear"),
])
def test_values_lmflow_cannot_express_are_errors(over: dict, match: str) -> None:
    from kb.lmflow import lmflow_args

    recipe = _recipe(REPO_ROOT / "configs" / "finetune_craft_mcq_lora.yaml", **over)
    with pytest.raises(KbError, match=match):
        lmflow_args(recipe, "m", "d", "o", "cpu")


def test_a_key_without_an_lmflow_flag_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from kb import lmflow

    mapping = {k: v for k, v in lmflow.LMFLOW_MAPPING.items() if k != "max_grad_norm"}
    monkeypatch.setattr(lmflow, "LMFLOW_MAPPING", mapping)  # as if a recipe key were added without its flag
    with pytest.raises(KbError, match="no LMFlow flag for recipe key.*max_grad_norm"):
        lmflow.lmflow_args(_recipe(REPO_ROOT / "configs" / "finetune_rtuning.yaml"), "m", "d", "o", "cpu")


def test_precision_flags() -> None:
    from kb.lmflow import lmflow_args

    recipe = _recipe(REPO_ROOT / "configs" / "finetune_rtuning.yaml", precision="bf16")
    flags = _flags(["examples/finetune.py", *lmflow_args(recipe, "m", "d", "o", "cuda")])
    assert (flags["bf16"], flags["fp16"], flags["torch_dtype"]) == (["1"], ["0"], ["float32"])


# ---------------------------------------------------------------- checkpoints transformers 4.x loads

# Tokenizer classes transformers 4.x defines for the tokenizer.json-backed checkpoints kb writes.
V4_TOKENIZERS = {"PreTrainedTokenizerFast", "LlamaTokenizerFast", "GPT2TokenizerFast", "GemmaTokenizerFast",
                 "GemmaTokenizer", "LlamaTokenizer", "GPT2Tokenizer", "Qwen2TokenizerFast"}


def _assert_v4_fields(path: Path) -> None:
    tok = json.loads((path / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] in V4_TOKENIZERS, tok["tokenizer_class"]
    assert not isinstance(tok.get("extra_special_tokens"), list)
    if (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        rp = cfg.get("rope_parameters")
        if isinstance(rp, dict) and "rope_theta" in rp:
            assert cfg["rope_theta"] == rp["rope_theta"]


def test_make_portable_fields(tmp_path: Path) -> None:
    from kb.checkpoint import make_portable

    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "TokenizersBackend", "extra_special_tokens": ["<a>", "<b>"], "backend": "tokenizers"}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "rope_parameters": {
        "rope_theta": 100000.0, "rope_type": "default"}}))
    assert len(make_portable(tmp_path)) == 3
    tok = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast" and tok["additional_special_tokens"] == ["<a>", "<b>"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_theta"] == 100000.0 and "rope_scaling" not in cfg
    assert make_portable(tmp_path) == []  # idempotent


def test_make_portable_rope_per_layer_type(tmp_path: Path) -> None:
    """Gemma 3: global and local RoPE in one rope_parameters; 4.x reads rope_theta + rope_local_base_freq."""
    from kb.checkpoint import make_portable

    rp = {"full_attention": {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0},
          "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "rope_parameters": rp}))
    make_portable(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["rope_theta"], cfg["rope_local_base_freq"]) == (1e6, 1e4)
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}


def test_transformers5_still_reads_the_portable_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    from transformers import AutoConfig, AutoTokenizer

    from kb.checkpoint import make_portable

    d = tmp_path / "ck"
    shutil.copytree(tiny_model_dir, d)
    before = AutoConfig.from_pretrained(d).to_dict(), AutoTokenizer.from_pretrained(d)
    make_portable(d)
    _assert_v4_fields(d)
    after = AutoConfig.from_pretrained(d).to_dict(), AutoTokenizer.from_pretrained(d)
    assert after[0]["rope_parameters"] == before[0]["rope_parameters"]
    text = "Question: what is 2 plus 2? Answer: 4. I am sure."
    assert after[1](text)["input_ids"] == before[1](text)["input_ids"]
    assert (after[1].eos_token, after[1].pad_token) == (before[1].eos_token, before[1].pad_token)


def test_finetune_output_is_portable(tiny_model_dir: Path, tmp_path: Path) -> None:
    from kb.finetune import finetune

    data = tmp_path / "t.json"
    data.write_text(json.dumps({"type": "text2text", "instances": [{"input": "Q: 1+1? A:", "output": " 2."}] * 4}))
    recipe = _recipe(REPO_ROOT / "configs" / "finetune_rtuning.yaml", max_steps=1, max_length=64)
    out = finetune(data, recipe, str(tiny_model_dir), tmp_path / "full")
    _assert_v4_fields(out)


def test_gguf_conversion_is_portable() -> None:
    """The converted SmolLM2 checkpoint in the model cache (converted once, ~20 s, like the other SmolLM2 tests)."""
    from kb.models import resolve_model

    source, _, _ = resolve_model("smollm2-135m")
    _assert_v4_fields(Path(source))


# ---------------------------------------------------------------- LMFlow's own parser (skipped without LMFlow)

def _lmflow_python() -> str:
    py = os.environ.get("LMFLOW_PYTHON") or str(REPO_ROOT / ".venv-lmflow" / "bin" / "python")
    try:
        ok = subprocess.run([py, "-c", "import lmflow.args"], capture_output=True, timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        pytest.skip(f"LMFlow is not importable with {py} (build it: scripts/lmflow_setup.sh <LMFlow clone or archive>)")
    return py


PARSE = r"""
import json, sys
from transformers import HfArgumentParser
from lmflow.args import AutoArguments, DatasetArguments, ModelArguments
parser = HfArgumentParser((ModelArguments, DatasetArguments, AutoArguments.get_pipeline_args_class("finetuner")))
m, d, p = parser.parse_args_into_dataclasses(args=json.load(sys.stdin), return_remaining_strings=False)
out = {**{k: v for k, v in vars(m).items()}, **{k: v for k, v in vars(d).items()}}
out.update({k: getattr(p, k) for k in ("num_train_epochs", "max_steps", "learning_rate", "warmup_steps", "warmup_ratio",
            "weight_decay", "per_device_train_batch_size", "gradient_accumulation_steps", "max_grad_norm", "adam_beta1",
            "adam_beta2", "adam_epsilon", "seed", "gradient_checkpointing", "logging_steps", "save_steps",
            "save_total_limit", "group_by_length", "bf16", "fp16", "overwrite_output_dir", "output_dir")})
out["lr_scheduler_type"] = str(getattr(p.lr_scheduler_type, "value", p.lr_scheduler_type))
out["optim"] = str(getattr(p.optim, "value", p.optim))
print(json.dumps(out, default=str))
"""


@pytest.mark.parametrize("path", FINETUNE_RECIPES, ids=lambda p: p.name)
def test_flags_parse_with_lmflows_dataclasses(path: Path, tmp_path: Path) -> None:
    from kb.lmflow import lmflow_args

    py = _lmflow_python()
    cfg = _cfg(path)
    if cfg["lora"] and cfg["lora"]["layers"] is not None:
        cfg = _cfg(path, lora__layers=None)
    args = lmflow_args(Recipe.from_mapping(cfg), "HuggingFaceTB/SmolLM2-135M-Instruct", str(tmp_path / "data"),
                       str(tmp_path / "out"), "cpu")
    res = subprocess.run([py, "-c", PARSE], input=json.dumps(args), capture_output=True, text=True, timeout=300,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    w = cfg["warmup_steps"]
    ratio = isinstance(w, float) and 0 < w < 1
    want = {"num_train_epochs": cfg["num_train_epochs"], "max_steps": cfg["max_steps"], "learning_rate": cfg["learning_rate"],
            "lr_scheduler_type": cfg["lr_scheduler_type"], "warmup_steps": 0 if ratio else int(w),
            "warmup_ratio": w if ratio else 0.0, "weight_decay": cfg["weight_decay"],
            "per_device_train_batch_size": cfg["per_device_train_batch_size"],
            "gradient_accumulation_steps": cfg["gradient_accumulation_steps"], "max_grad_norm": cfg["max_grad_norm"],
            "optim": cfg["optim"], "adam_beta1": cfg["adam_beta1"], "adam_beta2": cfg["adam_beta2"],
            "adam_epsilon": cfg["adam_epsilon"], "seed": cfg["seed"], "block_size": cfg["max_length"],
            "disable_group_texts": True, "max_train_samples": cfg["max_train_samples"],
            "gradient_checkpointing": cfg["gradient_checkpointing"], "logging_steps": cfg["logging_steps"],
            "save_steps": cfg["save_steps"], "save_total_limit": cfg["save_total_limit"],
            "group_by_length": cfg["train_sampling_strategy"] == "group_by_length", "bf16": False, "fp16": False,
            "use_lora": cfg["tuning"] == "lora", "truncation_side": "right", "padding_side": "right",
            "torch_dtype": "float32", "overwrite_output_dir": True, "output_dir": str(tmp_path / "out")}
    if cfg["tuning"] == "lora":
        want.update(lora_r=cfg["lora"]["r"], lora_alpha=cfg["lora"]["alpha"], lora_dropout=cfg["lora"]["dropout"],
                    lora_target_modules=cfg["lora"]["target_modules"])
    assert {k: got.get(k) for k in want} == want


V4_LOAD = r"""
import json, sys
import transformers
from transformers import AutoConfig, AutoTokenizer
assert transformers.__version__.startswith("4."), transformers.__version__
path, text = sys.argv[1], sys.argv[2]
cfg, tok = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
print(json.dumps({"rope_theta": getattr(cfg, "rope_theta", None), "ids": tok(text)["input_ids"],
                  "eos": tok.eos_token, "cls": type(tok).__name__}))
"""


def test_transformers4_loads_the_converted_checkpoint() -> None:
    from transformers import AutoTokenizer

    from kb.models import resolve_model

    py = _lmflow_python()
    source, _, _ = resolve_model("smollm2-135m")
    text = "Question: The capital of France is? Answer: Paris. Are you sure? I am sure."
    res = subprocess.run([py, "-c", V4_LOAD, str(source), text], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    cfg = json.loads((Path(source) / "config.json").read_text())
    assert got["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 100000.0  # not 4.x's Llama default 1e4
    tok = AutoTokenizer.from_pretrained(source)
    assert (got["ids"], got["eos"]) == (tok(text)["input_ids"], tok.eos_token)
