"""The house rules (docs/architecture.md): layers import only downwards, the engine has no import circle,
no library file is long, the public face is small and its namespaces only gather names."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import filtersurgery

PKG = Path(filtersurgery.__file__).parent
# lower layers first; a module may import its own layer and any layer before it
LAYERS = ["models", "data", "tracing", "distill", "ops", "report", "engine", "methods", "cli"]
RANK = {name: i for i, name in enumerate(LAYERS)}
# the top-level modules: the package, ``python -m``, and the public namespaces (imports only)
NAMESPACES = ["train", "reactivation", "sharing", "growth", "warmstart"]
TOP = sorted(["__init__.py", "__main__.py"] + [f"{n}.py" for n in NAMESPACES])


def _targets(node, path: Path):
    """The ``filtersurgery`` modules (dotted, below ``filtersurgery.``) an import node or a module-name string
    names; ``from filtersurgery import X`` names ``X``."""
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative: resolve against the module's own package
            pkg = list(path.relative_to(PKG).parent.parts)
            base = ["filtersurgery"] + pkg[: len(pkg) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        return [mod + "." + a.name for a in node.names] if mod == "filtersurgery" else [mod]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("filtersurgery."):
        return [node.value]
    return []


def _imports(path: Path, depth: int = 1):
    """``(line, first `depth` parts below filtersurgery)`` for every import in ``path``, also inside functions,
    and every ``"filtersurgery.X..."`` string (modules imported by name)."""
    for node in ast.walk(ast.parse(path.read_text())):
        for n in _targets(node, path):
            parts = n.split(".")
            if parts[0] == "filtersurgery" and len(parts) > 1:
                yield node.lineno, ".".join(parts[1: 1 + depth])


def test_every_module_lives_in_a_layer_folder_or_is_a_namespace():
    assert sorted(p.name for p in PKG.glob("*.py")) == TOP
    assert sorted(p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(LAYERS)


def test_tests_mirror_the_layers_and_e2e_is_slow():
    tests = Path(__file__).resolve().parent
    folders = sorted(p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))
    assert set(folders) <= set(LAYERS) | {"e2e"}, folders
    assert sorted(p.name for p in tests.glob("*.py")) == ["conftest.py", "test_architecture.py", "test_examples.py"]
    names = [p.name for p in tests.rglob("test_*.py")]
    assert len(names) == len(set(names))  # no __init__.py: a test module's name is its import name
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-m", "not slow", str(tests / "e2e")],
                       capture_output=True, text=True, cwd=tests.parent)
    assert "no tests collected" in r.stdout and "deselected" in r.stdout, r.stdout[-500:]


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_import_only_downwards(layer):
    bad = []
    for path in sorted((PKG / layer).rglob("*.py")):
        for line, target in _imports(path):
            if target in NAMESPACES or target == "__init__":
                bad.append(f"{path.relative_to(PKG)}:{line} imports the namespace {target} (import its module)")
            elif target in RANK and RANK[target] > RANK[layer]:
                bad.append(f"{path.relative_to(PKG)}:{line} imports {target}")
    assert not bad, "upward imports (" + " < ".join(LAYERS) + "):\n" + "\n".join(bad)


# sideways rules beyond the order (docs/architecture.md): layer -> layers it must never import
NEVER = {"models": set(LAYERS) - {"models"}, "data": set(LAYERS) - {"data"},
         "tracing": {"data", "distill", "ops", "report", "engine", "methods", "cli"},
         "engine": {"distill"}}


@pytest.mark.parametrize("layer", sorted(NEVER))
def test_layers_keep_their_sideways_rules(layer):
    bad = [f"{path.relative_to(PKG)}:{line} imports {target}"
           for path in sorted((PKG / layer).rglob("*.py")) for line, target in _imports(path) if target in NEVER[layer]]
    assert not bad, f"{layer}/ must not import {sorted(NEVER[layer])}:\n" + "\n".join(bad)


# the engine's files, in the order they may import each other (a file imports only those before it)
ENGINE_ORDER = ["registry", "checkpoint", "distributed", "epochs", "loop", "config", "metrics", "phase", "run",
                "trainer", "callbacks", "sparse"]


def test_the_engine_has_no_import_circle():
    files = sorted(p.stem for p in (PKG / "engine").glob("*.py") if p.stem != "__init__")
    assert files == sorted(ENGINE_ORDER), "place a new engine file in ENGINE_ORDER"
    bad = []
    for name in ENGINE_ORDER:
        for line, target in _imports(PKG / "engine" / f"{name}.py", depth=2):
            other = target.split(".")[1] if target.startswith("engine.") and "." in target else None
            if other in ENGINE_ORDER and ENGINE_ORDER.index(other) >= ENGINE_ORDER.index(name):
                bad.append(f"engine/{name}.py:{line} imports engine/{other}.py")
    assert not bad, "\n".join(bad)


def test_namespaces_only_gather_names():
    for name in NAMESPACES:
        tree = ast.parse((PKG / f"{name}.py").read_text())
        kinds = {type(n).__name__ for n in tree.body} - {"Import", "ImportFrom", "Expr", "Assign"}
        assert not kinds, f"{name}.py defines {kinds}: code lives in the layers"
        mod = getattr(filtersurgery, name)
        assert all(hasattr(mod, n) for n in mod.__all__)


def test_the_top_level_is_small():
    names = [n for n in filtersurgery.__all__ if n != "__version__"]
    assert len([n for n in names if n not in NAMESPACES + ["distill", "data"]]) <= 14, names
    assert {"trace", "ScalingMap", "verify", "build_model", "list_cnns", "sparsify", "rescale", "rank_filters",
            "freeze_norms", "unfreeze_norms", "TrainConfig", "multi_step"} <= set(names)


MAX_FILE_LINES = 500


def test_no_library_file_over_500_lines():
    long = {str(p.relative_to(PKG)): n for p in sorted(PKG.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines (split them along their seams): {long}"


def test_public_names_import_without_warnings():
    code = ("import warnings; warnings.simplefilter('error'); import filtersurgery as fs; "
            "import filtersurgery.train, filtersurgery.reactivation, filtersurgery.sharing, filtersurgery.growth, "
            "filtersurgery.warmstart, filtersurgery.distill, filtersurgery.data; "
            "[getattr(fs, n) for n in fs.__all__]; "
            "[getattr(getattr(fs, m), n) for m in ('train', 'reactivation', 'sharing', 'growth', 'warmstart', "
            "'distill') for n in getattr(fs, m).__all__]")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_python_m_runs_the_command_line():
    for mod in ("filtersurgery", "filtersurgery.cli"):
        r = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "COMMAND" in r.stdout, r.stderr[-2000:]


MAX_LINES = 60


def _long_functions():
    """``{(path, name): lines}`` of library functions longer than MAX_LINES, not counting the docstring."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            first = node.body[0]
            doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
            start = first.end_lineno + 1 if doc else node.lineno
            lines = node.end_lineno - start + 1
            if lines > MAX_LINES:
                out[(str(path.relative_to(PKG)), node.name)] = lines
    return out


def test_no_library_function_over_60_lines():
    long = _long_functions()
    assert not long, f"functions over {MAX_LINES} lines (split them): {long}"
