"""The code style CI enforces: ruff's lint rules and its formatter (pyproject.toml's [tool.ruff], line length 120)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff") or shutil.which("ruff", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("ruff is not installed (it comes with the dev extra: pip install -e '.[dev]')")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff_lint_is_clean():
    out = ruff("check", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format_leaves_every_file_as_it_is():
    out = ruff("format", "--check", ".")
    assert out.returncode == 0, "run `ruff format .`:\n" + out.stdout + out.stderr


# The seams a reader follows through one turn (issue 25), counted the way ../shared/hooks/before-stop counts them.
PACKAGE = ROOT / "fromage_gill"
MAX_ANY = 30
MAX_FUNCTION_LINES = 80
MAX_APP_LINES = 320
SEAM_PARAMETERS = ("pipeline", "model", "settings")


def package_trees(package: Path) -> list[tuple[str, ast.Module]]:
    files = sorted(package.rglob("*.py"))
    return [(str(f.relative_to(package.parent)), ast.parse(f.read_text(), filename=str(f))) for f in files]


def any_annotations(package: Path = PACKAGE) -> list[str]:
    return [
        f"{f}:{n.lineno}"
        for f, tree in package_trees(package)
        for n in ast.walk(tree)
        if isinstance(n, ast.Name) and n.id == "Any" and isinstance(n.ctx, ast.Load)
    ]


def untyped_seam_parameters(package: Path = PACKAGE) -> list[str]:
    found = []
    for f, tree in package_trees(package):
        for n in ast.walk(tree):
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef):
                args = n.args.posonlyargs + n.args.args + n.args.kwonlyargs
                found += [
                    f"{f}:{n.lineno} {n.name}({a.arg})"
                    for a in args
                    if a.arg in SEAM_PARAMETERS and a.annotation is None
                ]
    return found


def long_functions(package: Path = PACKAGE) -> list[str]:
    found = []
    for f, tree in package_trees(package):
        if "toy" in Path(f).parts:  # the toy world is a worked example, read as a script
            continue
        for n in ast.walk(tree):
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef):
                size = (n.end_lineno or n.lineno) - n.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    found.append(f"{f}:{n.lineno} {n.name} ({size} lines)")
    return found


def test_the_seam_counters_see_what_they_count(tmp_path):
    # The counters must find an Any, an untyped `model` and a long function in a package made to hold them.
    pkg = tmp_path / "fromage_gill"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (pkg / "m.py").write_text(f"from typing import Any\ndef f(model, pipeline: Any):\n{body}\n")
    (pkg / "toy").mkdir()
    (pkg / "toy" / "t.py").write_text(f"def g(settings: int):\n{body}\n")
    assert any_annotations(pkg) == ["fromage_gill/m.py:2"]  # the import is not an annotation
    assert untyped_seam_parameters(pkg) == ["fromage_gill/m.py:2 f(model)"]
    assert long_functions(pkg) == [f"fromage_gill/m.py:2 f ({MAX_FUNCTION_LINES + 1} lines)"]


def test_any_is_kept_for_values_that_really_are_arbitrary():
    found = any_annotations()
    assert len(found) <= MAX_ANY, f"{len(found)} uses of Any (at most {MAX_ANY}): {', '.join(found)}"


def test_every_pipeline_model_and_settings_parameter_is_typed():
    assert untyped_seam_parameters() == []


def test_no_library_function_outside_toy_is_longer_than_80_lines():
    assert long_functions() == []


def test_app_py_is_layout_and_wiring():
    lines = len((ROOT / "app.py").read_text().splitlines())
    assert lines <= MAX_APP_LINES, f"app.py has {lines} lines (at most {MAX_APP_LINES}: layout and wiring only)"
