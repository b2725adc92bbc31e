"""The launchers in scripts/ must not go stale: each passes `bash -n`, and every `python X.py ...` line
it prints with --dry-run parses with that script's real build_parser() (unknown flags fail here, not
three hours into a GPU run)."""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from kb.config import parse_with_config
from kb.errors import KbError

ROOT = Path(__file__).resolve().parent.parent
LAUNCHERS = sorted((ROOT / "scripts").glob("run_*.sh"))
EXPECTED = {"run_open_llama_3b.sh", "run_chatglm2_6b.sh", "run_qwen_7b.sh", "run_smollm2_135m.sh", "run_gemma3_270m.sh"}


def _dry_run(launcher: Path, *extra: str) -> list[list[str]]:
    out = subprocess.run(["bash", str(launcher), "--dry-run", *extra], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, f"{launcher.name} --dry-run failed:\n{out.stderr}"
    return [shlex.split(line) for line in out.stdout.splitlines() if line.strip()]


def _script_of(argv: list[str]) -> tuple[str, list[str]] | None:
    """('finetune.py', args) for a python command line, else None (other commands are not checked)."""
    for i, tok in enumerate(argv):
        if tok.endswith(".py"):
            if i == 0 or not Path(argv[i - 1]).name.startswith("python"):
                return None
            return tok, argv[i + 1:]
    return None


def _load(script: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"launcher_{Path(script).stem}", ROOT / script)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_study_model_has_a_launcher() -> None:
    assert EXPECTED <= {p.name for p in LAUNCHERS}


@pytest.mark.parametrize("launcher", LAUNCHERS + [ROOT / "scripts" / "pipeline.sh"], ids=lambda p: p.name)
def test_bash_syntax(launcher: Path) -> None:
    out = subprocess.run(["bash", "-n", str(launcher)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "set -euo pipefail" in launcher.read_text()


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda p: p.name)
def test_dry_run_commands_parse(launcher: Path) -> None:
    commands = _dry_run(launcher)
    scripts = [s for s in (_script_of(c) for c in commands) if s]
    assert len(scripts) >= 10, f"{launcher.name} printed too few stage commands: {commands}"
    stages = {s for s, _ in scripts}
    assert {"run_MMLU.py", "run_ParaRel.py", "report.py"} <= stages
    absent = sorted(s for s in stages if not (ROOT / s).is_file())
    assert not absent, f"{launcher.name} calls stage script(s) that do not exist: {', '.join(absent)}"
    for script, args in scripts:
        parser = _load(script).build_parser()
        if not any(a.dest == "config" for a in parser._actions):
            # kb.config.parse_with_config adds --config at parse time; mirror it so the flag is known
            parser.add_argument("--config", default=None)
        try:
            ns = parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{launcher.name}: `{script} {shlex.join(args)}` does not parse with {script}'s build_parser()")
        for value in args:
            if value.startswith("configs/"):
                assert (ROOT / value).is_file(), f"{launcher.name}: {script} uses {value}, which does not exist"
        if getattr(ns, "config", None) and "parse_with_config" in (ROOT / script).read_text():
            # a kb.config YAML fills in the script's own flags: its keys must be options of that script
            try:
                parse_with_config(_load(script).build_parser(), args)
            except KbError as err:
                pytest.fail(f"{launcher.name}: {script} --config {ns.config}: {err}")


def test_dry_run_runs_nothing_and_honours_limit(tmp_path: Path) -> None:
    launcher = ROOT / "scripts" / "run_smollm2_135m.sh"
    before = {p for p in (ROOT / "training_data").rglob("*")} if (ROOT / "training_data").is_dir() else set()
    commands = _dry_run(launcher, "--limit", "7")
    after = {p for p in (ROOT / "training_data").rglob("*")} if (ROOT / "training_data").is_dir() else set()
    assert before == after
    probes = [c for c in commands if any(t in ("run_MMLU.py", "run_ParaRel.py") for t in c)]
    assert probes and all("--limit" in c and c[c.index("--limit") + 1] == "7" for c in probes)


def test_unknown_launcher_flag_is_an_error() -> None:
    out = subprocess.run(["bash", str(ROOT / "scripts" / "run_smollm2_135m.sh"), "--bogus"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "--bogus" in out.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
