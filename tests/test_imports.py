"""The package's import structure: every kb module imports on its own, the module-level imports between kb
modules form no cycle, and no function body imports a kb module to get around one.

A function may still import a kb module lazily when that module pulls in a heavy package the importer does
not (torch, transformers, matplotlib, ...): stages that never run a model (results_table.py, report.py,
build_rait.py's checks) then start without loading torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from kb.paths import REPO_ROOT

KB = REPO_ROOT / "kb"
HEAVY = {"torch", "transformers", "peft", "trl", "accelerate", "datasets", "matplotlib", "sentence_transformers",
         "sklearn", "scipy", "tokenizers"}


def _name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(KB.rglob("*.py"))}


def _targets(node: ast.Import | ast.ImportFrom) -> list[str]:
    """Top-level names an import statement binds to: kb modules by their full name, others by their package."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    assert node.level == 0, "kb uses absolute imports only"
    base = node.module or ""
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _imports() -> dict[str, tuple[set[str], set[str], set[tuple[int, str]]]]:
    """Per kb module: kb modules imported at module level, heavy packages imported at module level, and
    (line, module) of every kb module imported inside a function."""
    out = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        in_functions = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                        for n in ast.walk(f) if isinstance(n, ast.Import | ast.ImportFrom)}
        kb_top: set[str] = set()
        heavy: set[str] = set()
        lazy: set[tuple[int, str]] = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in _targets(node):
                if target.split(".")[0] == "kb":
                    if id(node) in in_functions:
                        lazy.add((node.lineno, target))
                    else:
                        kb_top.add(target)
                elif id(node) not in in_functions and target.split(".")[0] in HEAVY:
                    heavy.add(target.split(".")[0])
        out[name] = (kb_top, heavy, lazy)
    return out


IMPORTS = _imports()


def _closure(module: str) -> set[str]:
    """The kb modules importing `module` loads: its module-level kb imports, theirs, and their packages."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        if m in seen or m not in MODULES:
            continue
        seen.add(m)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # a package's __init__ runs first
        todo += IMPORTS[m][0]
    return seen


def _heavy(module: str) -> set[str]:
    return set().union(*(IMPORTS[m][1] for m in _closure(module)))


def test_module_level_imports_between_kb_modules_form_no_cycle() -> None:
    graph = {m: {t for t in IMPORTS[m][0] if t != m} for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            assert state.get(t) != 1, f"import cycle: {' -> '.join(path[path.index(t):] + [t])}"
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])


def test_no_function_imports_a_kb_module_except_to_keep_a_heavy_package_out() -> None:
    bad = []
    for name, (_, _, lazy) in IMPORTS.items():
        for line, target in sorted(lazy):
            if not _heavy(target) - _heavy(name):
                bad.append(f"{MODULES[name].relative_to(REPO_ROOT)}:{line}: {target} (import it at module level)")
    assert not bad, "function-level imports of kb modules that load no heavy package:\n" + "\n".join(bad)


def test_every_kb_module_imports_on_its_own() -> None:
    """Each module first in a process with no kb module loaded (third-party packages stay loaded: the check is
    about kb's own import order)."""
    code = (
        "import importlib, sys\n"
        f"for name in {sorted(MODULES)!r}:\n"
        "    for m in [m for m in sys.modules if m == 'kb' or m.startswith('kb.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as err:\n"
        "        print(f'{name}: {type(err).__name__}: {err}')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout == "", out.stdout
