"""The package's dependencies run one way (docs/ARCHITECTURE.md): no module imports from a package above its own,
nor from a sibling on its floor. Lazy imports inside functions count too."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "megatron_ls")
# Bottom up; packages on one floor may not import each other. The root modules (errors.py, temp_files.py,
# tool_signals.py, output_check.py) are the ground floor under them all.
FLOORS = [("parallel",), ("kernels",), ("model",), ("data",), ("checkpoint",), ("training", "inference"),
          ("plotting",), ("cli",)]
FLOOR_OF = {pkg: i + 1 for i, names in enumerate(FLOORS) for pkg in names}


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every megatron_ls import in a file, relative ones resolved."""
    tree = ast.parse(open(path).read(), path)
    here = _module_name(path).split(".")
    package = here if path.endswith("__init__.py") else here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("megatron_ls")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("megatron_ls"):
                # `from megatron_ls.x import y` may name a module y: either way its package is x's.
                out.append((node.lineno, name))
    return out


def _floor(module: str) -> tuple[int, str]:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in FLOOR_OF:
        return 0, parts[1] if len(parts) > 1 else ""  # the root modules
    return FLOOR_OF[parts[1]], parts[1]


def test_no_import_runs_up_or_across():
    wrong = []
    for dirpath, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            mine, my_pkg = _floor(_module_name(path))
            for line, target in _imports(path):
                theirs, their_pkg = _floor(target)
                if their_pkg == my_pkg:
                    continue
                if theirs > mine or (theirs == mine and mine > 0):
                    wrong.append(f"{os.path.relpath(path, ROOT)}:{line} imports {target} "
                                 f"({my_pkg or 'root'} on floor {mine} -> {their_pkg} on floor {theirs})")
    assert not wrong, "imports against the package order:\n" + "\n".join(wrong)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The check itself: a lazy import of training/ inside model/ is reported."""
    path = os.path.join(PACKAGE, "model", "_probe_for_test.py")
    with open(path, "w") as f:
        f.write("def f():\n    from megatron_ls.training import loop\n    from ..cli import runner\n")
    try:
        found = [target for _, target in _imports(path)]
        assert found == ["megatron_ls.training", "megatron_ls.cli"]
        assert _floor(found[0])[0] > _floor(_module_name(path))[0]
    finally:
        os.remove(path)


# The tests mirror the package: tests/<package>/ for megatron_ls/<package>/, the root modules' tests at tests/,
# bench/ and the command-line tools (cli/, examples) beside them.
TEST_FOLDERS = {name for names in FLOORS for name in names} | {"bench", "fixtures"}


def test_the_tests_mirror_the_package():
    tests = os.path.join(ROOT, "tests")
    packages = {n for n in os.listdir(PACKAGE) if os.path.isfile(os.path.join(PACKAGE, n, "__init__.py"))}
    root_modules = {n[: -len(".py")] for n in os.listdir(PACKAGE) if n.endswith(".py") and n != "__init__.py"}
    folders = {n for n in os.listdir(tests) if os.path.isdir(os.path.join(tests, n)) and not n.startswith(("_", "."))}
    assert folders <= TEST_FOLDERS | packages, f"tests/ folders without a package of that name: {folders - packages}"
    for name in os.listdir(tests):
        if name.startswith("test_") and name.endswith(".py") and name != "test_architecture.py":
            assert name[len("test_"): -len(".py")] in root_modules, (
                f"tests/{name} sits at the root of tests/ but megatron_ls has no root module of that name: move it "
                "into the folder of the package it tests")
