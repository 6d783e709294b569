"""The code's shape: functions stay short enough to read in one screen."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "echoatt"


def test_no_function_is_longer_than_sixty_lines():
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The echoatt modules a file imports (at the top, inside functions or for type checking alone: a type-only import
    is still a dependency a reader follows): `from echoatt.planning import planners` imports the module
    `echoatt.planning.planners`, `from echoatt.planning.plan import X` `echoatt.planning.plan`."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("echoatt"):
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("echoatt")}
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_imports_itself_back_through_others():
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph = {m: {d for d in imports_of(p, set(modules)) if d in modules and d != m} for m, p in modules.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(d == goal or (d not in seen and not seen.add(d) and reaches(d, goal, seen)) for d in graph[start])

    circles = sorted(m for m in graph if reaches(m, m, set()))
    assert not circles, f"modules in an import circle: {circles}"


def test_no_module_over_500_lines_and_no_class_over_250():
    big = [f"{p.relative_to(SRC)} ({n} lines)" for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500]
    big += [f"{p.relative_to(SRC)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)" for p in SRC.rglob("*.py")
            for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno >= 250]
    assert not big, big


def test_each_engine_imports_without_the_others():
    """An engine's modules are usable where the others are not installed: importing one imports no other engine's."""
    import subprocess
    import sys

    engines = {"decilm_export": "decilm", "gguf_export": "llamacpp", "llamacpp_bench": "llamacpp",
               "vllm_serve": "vllm"}
    for module, engine in engines.items():
        others = [m for m, e in engines.items() if e != engine] + ["vllm_model"]
        code = (f"import sys, echoatt.engines.{module}; "
                f"print([m for m in {others!r} if 'echoatt.engines.' + m in sys.modules])")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**__import__("os").environ, "PYTHONPATH": str(SRC.parent)})
        assert done.stdout.strip() == "[]", (module, done.stdout, done.stderr[-2000:])


def test_each_room_holds_its_modules_and_the_old_flat_paths_import_the_same_module():
    """The rooms `moved.py` names are the package's subpackages, every module of them where it says, none left at the
    flat path; `import echoatt.planners` (a user's old script) gives the room's module itself, and so does a module
    below an old path."""
    import importlib

    from echoatt import moved

    rooms = {p.parent.name for p in SRC.glob("*/__init__.py")} - {"commands", "engines"}
    assert rooms == set(moved.ROOMS)
    for old, new in moved.MOVED.items():
        name = old.removeprefix("echoatt.")
        assert not (SRC / f"{name}.py").exists() and not (SRC / name).exists(), old
        assert (SRC.parent / f"{new.replace('.', '/')}.py").exists() or (SRC.parent / new.replace(".", "/")).is_dir()
        assert importlib.import_module(old) is importlib.import_module(new), old
    from echoatt.lm_eval_tasks import olmo_data
    from echoatt.student import build_student

    assert olmo_data is importlib.import_module("echoatt.evaluation.lm_eval_tasks.olmo_data")
    assert build_student is importlib.import_module("echoatt.building.student").build_student
