"""Tiny offline models for tests and smoke runs: a byte-level BPE tokenizer and random-init models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kb.paths import REPO_ROOT

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The following are multiple choice questions (with answers) about science.",
    "Question: What is the capital of France? Answer: Paris. Are you sure you accurately answered the question "
    "based on your internal knowledge? I am sure. I am unsure. I don't know. A. B. C. D. Answer: A",
    "There is a single choice question about history. If you know the answer, please directly respond with the "
    "correct answer A, B, C, or D. If you do not know the answer, please respond with \"I don't know.\".",
]


def tiny_tokenizer(chat_template: bool = True) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = CHATML
    return fast


def tiny_model(arch: str = "llama", vocab_size: int = 400, seed: int = 0, layers: int = 2) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  pad_token_id=0, bos_token_id=0, eos_token_id=2)
    cfg = {"llama": LlamaConfig, "gemma": GemmaConfig}[arch](**common)
    return AutoModelForCausalLM.from_config(cfg).eval()


def save_tiny(path: str | Path, arch: str = "llama", chat_template: bool = True, seed: int = 0) -> Path:
    """Write a loadable random-init checkpoint + tokenizer: usable as `--model <path>` in every script."""
    path = Path(path)
    tok = tiny_tokenizer(chat_template)
    model = tiny_model(arch, vocab_size=len(tok), seed=seed)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def torchrun(script: str, args: list[Any], nproc: int = 2) -> Any:
    """Run a stage script under torchrun with `nproc` CPU processes (gloo), as the data-parallel tests do."""
    # No GPU for the children: on a one-GPU machine both ranks would pick cuda:0 and NCCL refuses that.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                           str(REPO_ROOT / script), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600)


TRITON_INTERPRETER_DIR = REPO_ROOT / ".venv" / "triton-interpreter"  # scripts/setup.sh installs Triton here


def triton_interpreter_env(interpret: bool = True) -> dict[str, str] | None:
    """The environment in which Triton kernels run on CPU through Triton's interpreter (TRITON_INTERPRET=1;
    `interpret` False: Triton's compiler, which builds for a GPU it does not need): Triton from
    scripts/setup.sh's side directory (kept off the venv's path, where libraries would start using it), else
    an installed one; None where there is neither."""
    import importlib.util

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update({"TRITON_INTERPRET": "1"} if interpret else {"KB_TRITON_BUILD": "1"})
    if TRITON_INTERPRETER_DIR.is_dir():
        paths = [str(TRITON_INTERPRETER_DIR), str(REPO_ROOT), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    elif importlib.util.find_spec("triton") is None:
        return None
    return env


def in_triton_interpreter(nodeid: str, interpret: bool = True) -> bool:
    """For a test of Triton kernels: True inside the interpreter run (the test then does its checks);
    otherwise run test `nodeid` ("tests/file.py::name") in a subprocess under the interpreter, fail if it
    fails, and return False. Skips where no Triton is to be had (Triton reads TRITON_INTERPRET once, at import,
    so the interpreter needs its own process). `interpret` False: the same with Triton's compiler instead
    (`in_triton_compiler`)."""
    import pytest

    if os.environ.get("TRITON_INTERPRET" if interpret else "KB_TRITON_BUILD") == "1":
        return True
    env = triton_interpreter_env(interpret)
    if env is None:
        pytest.skip("Triton is not installed (scripts/setup.sh puts it in .venv/triton-interpreter)")
    run = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", str(REPO_ROOT / nodeid)],
                         env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
    return False


def in_triton_compiler(nodeid: str) -> bool:
    """in_triton_interpreter's counterpart for tests that build kernels ahead of time (no GPU needed)."""
    return in_triton_interpreter(nodeid, interpret=False)
