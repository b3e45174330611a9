"""The package's layout holds: small modules and functions, imports that point one way, types checked, the README's
Layout section true to the tree."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "finetune"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def function_lengths(path: Path):
    """``(name, line, length)`` of every function in ``path``, its docstring aside."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            first = body[0]
            docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            start = body[1].lineno if docstring and len(body) > 1 else first.lineno
            yield node.name, node.lineno, node.end_lineno - start + 1


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in modules() if (n := p.read_text().count("\n")) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_is_over_60_lines_docstring_aside():
    long = [
        f"{p.relative_to(ROOT)}:{line} {name} ({n} lines)"
        for p in modules()
        for name, line, n in function_lengths(p)
        if n > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def _tool(name: str, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which(name) or str(Path(sys.executable).parent / name)
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_imports_point_one_way_down_the_layers_with_no_cycle():
    """import-linter's contracts in pyproject.toml: the layers, and the architecture folders independent."""
    result = _tool("lint-imports", "--no-cache")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_the_type_checker_passes_over_the_package():
    result = _tool("mypy", "finetune")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def layout_section() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Layout\n(.*?)^## ", text, re.S | re.M)
    assert match, "the README has no Layout section"
    return match.group(1)


def test_the_readmes_layout_names_every_module_and_no_other():
    """Each line of the tree is ``  name.py  what it is`` under its folder line ``folder/``."""
    tree = re.search(r"```\n(finetune/\n.*?)```", layout_section(), re.S)
    assert tree, "the Layout section has no tree"
    listed, folders = set(), []
    for line in tree.group(1).splitlines():
        depth = (len(line) - len(line.lstrip())) // 2
        name = line.split()[0]
        folders = folders[:depth]
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
        elif name.endswith(".py"):
            listed.add("/".join([*folders, name]))
    present = {str(p.relative_to(ROOT)) for p in modules()}
    assert not present - listed, f"modules the Layout section does not list: {sorted(present - listed)}"
    assert not listed - present, f"the Layout section lists modules that do not exist: {sorted(listed - present)}"


@pytest.mark.parametrize("folder", ["data", "hf", "params", "sharding", "training", "models"])
def test_each_package_says_what_it_holds(folder):
    assert ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text()))
