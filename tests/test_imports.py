"""The package's structure, checked on its source (AST, nothing imported but the CLI):

- one direction of imports: no module under ``focas_keras/`` imports ``data_tools`` (an
  ``import``/``from`` statement, or ``importlib.import_module``/``__import__`` of a literal
  name);
- no cli <-> commands cycle: no module under ``focas_keras/commands/`` imports
  ``focas_keras.cli`` (absolute or relative), and outside ``focas_keras/__main__.py`` no
  package module does; a command module imports nothing from another command module (only
  from ``commands.base`` and ``commands.common``), and every command it lists in
  ``COMMANDS`` is registered on ``focas_keras.cli.main``;
- run-directory reading in one module: the file names of a run directory (``run.json``,
  ``config.json``, ``best.json``, ``metrics.json``) appear as a string literal (the name
  itself, or a path ending in ``/name``; f-string parts included; docstrings and prose
  messages not) only in ``focas_keras/runs.py``. Other modules refer to them through
  ``runs.RUN_FILE``/``CONFIG_FILE``/``BEST_FILE``/``METRICS_FILE``, and only the trainer that
  writes a run does (``training/loop.py``, ``training/run_dir.py``), reading back through
  ``runs`` functions.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "focas_keras"
RUN_FILES = ("run.json", "config.json", "best.json", "metrics.json")
RUN_FILE_CONSTANTS = {"RUN_FILE", "CONFIG_FILE", "BEST_FILE", "METRICS_FILE"}
RUN_WRITERS = {"training/loop.py", "training/run_dir.py"}
SHARED_COMMAND_MODULES = {"base", "common"}


def _modules():
    """{path relative to focas_keras/ (posix): parsed tree} of every module of the package."""
    return {p.relative_to(PACKAGE).as_posix(): ast.parse(p.read_text(encoding="utf-8"), str(p))
            for p in sorted(PACKAGE.rglob("*.py"))}


def _module_name(relative: str) -> str:
    parts = ["focas_keras", *Path(relative).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(relative: str, tree) -> list[str]:
    """Every module name ``relative``'s code imports, relative imports resolved: ``from a
    import b`` gives ``a`` and ``a.b``; literal ``import_module``/``__import__`` names too."""
    package = _module_name(relative)
    if not relative.endswith("__init__.py"):
        package = package.rpartition(".")[0]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if called in ("import_module", "__import__") and isinstance(first, ast.Constant) \
                    and isinstance(first.value, str):
                names.append(first.value)
    return names


def _is_within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_package_never_imports_data_tools():
    offending = {path: name for path, tree in _modules().items()
                 for name in _imported(path, tree) if _is_within(name, "data_tools")}
    assert offending == {}


def test_no_cycle_between_the_cli_and_the_commands():
    modules = _modules()
    for path, tree in modules.items():
        imports = _imported(path, tree)
        if path not in ("cli.py", "__main__.py"):
            assert not any(_is_within(n, "focas_keras.cli") for n in imports), path
        if not path.startswith("commands/") or path == "commands/__init__.py":
            continue
        own = Path(path).stem
        others = {n.split(".")[2] for n in imports
                  if _is_within(n, "focas_keras.commands") and n.count(".") >= 2}
        assert others - SHARED_COMMAND_MODULES - {own} == set(), path


def test_every_listed_command_is_registered():
    import importlib

    from focas_keras.cli import main

    listed = []
    for path in sorted((PACKAGE / "commands").glob("*.py")):
        if path.stem in SHARED_COMMAND_MODULES | {"__init__"}:
            continue
        module = importlib.import_module(f"focas_keras.commands.{path.stem}")
        assert module.COMMANDS, path.name
        listed += module.COMMANDS
    assert sorted(c.name for c in listed) == sorted(main.commands)
    assert all(main.commands[c.name] is c for c in listed)


def _docstrings(tree) -> set:
    """ids of the string constants that are statements of their own (docstrings)."""
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}


def _names_a_run_file(text: str) -> bool:
    return any(text == name or text.endswith("/" + name) for name in RUN_FILES)


def test_run_directory_files_are_named_only_in_runs_py():
    named, referenced = {}, {}
    for path, tree in _modules().items():
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and id(node) not in docstrings and _names_a_run_file(node.value):
                named.setdefault(path, []).append(node.value)
            used = (node.attr if isinstance(node, ast.Attribute) else
                    node.id if isinstance(node, ast.Name) else None)
            if isinstance(node, ast.ImportFrom) and node.module == "focas_keras.runs":
                used = next((a.name for a in node.names if a.name in RUN_FILE_CONSTANTS), None)
            if used in RUN_FILE_CONSTANTS:
                referenced.setdefault(path, set()).add(used)
    assert set(named) == {"runs.py"}, named
    assert set(referenced) - {"runs.py"} <= RUN_WRITERS, referenced


def test_the_checks_see_what_they_look_for(tmp_path):
    """The scanners catch each kind of offence (so a passing test means something)."""
    tree = ast.parse("import data_tools.mine\nfrom .. import cli\n"
                     "x = importlib.import_module('data_tools')\n"
                     "p = run_dir / 'best.json'\nq = f'{run}/config.json'\n"
                     "'''A docstring naming run.json.'''\n")
    imports = _imported("commands/x.py", tree)
    assert "data_tools.mine" in imports and "focas_keras.cli" in imports
    assert imports.count("data_tools") == 1
    docstrings = _docstrings(tree)
    found = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
             and isinstance(n.value, str) and id(n) not in docstrings
             and _names_a_run_file(n.value)]
    assert sorted(found) == ["/config.json", "best.json"]
