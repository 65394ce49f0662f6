"""The house rules: layers import only downwards, old module paths keep importing with a warning."""
import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

import filtersurgery
from filtersurgery import _compat

PKG = Path(filtersurgery.__file__).parent
# lower layers first; a module may import its own layer and any layer before it
LAYERS = ["models", "data", "tracing", "distill", "ops", "report", "engine", "methods", "cli"]
RANK = {name: i for i, name in enumerate(LAYERS)}


def _imports(path: Path):
    """``(line, imported filtersurgery sub-package)`` for every import in ``path``, also inside functions,
    and every ``"filtersurgery.X..."`` string (modules imported by name)."""
    tree = ast.parse(path.read_text())
    layer = path.relative_to(PKG).parts[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's own package
                base = ["filtersurgery", layer][: max(0, 3 - node.level)] if node.level <= 2 else ["filtersurgery"]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod + "." + a.name for a in node.names] if mod == "filtersurgery" else [mod]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("filtersurgery."):
            names = [node.value]
        else:
            continue
        for n in names:
            parts = n.split(".")
            if parts[0] == "filtersurgery" and len(parts) > 1:
                yield node.lineno, parts[1]


def test_every_module_lives_in_a_layer_folder():
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "_compat.py"]
    assert sorted(p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(LAYERS)


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_import_only_downwards(layer):
    bad = []
    for path in sorted((PKG / layer).rglob("*.py")):
        for line, target in _imports(path):
            if target in RANK and RANK[target] > RANK[layer]:
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


@pytest.mark.parametrize("old", sorted(_compat.OLD_PATHS))
def test_old_module_paths_import_with_a_future_warning(old):
    name = f"filtersurgery.{old}"
    new = importlib.import_module(f"filtersurgery.{_compat.OLD_PATHS[old]}")
    sys.modules.pop(name, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = importlib.import_module(name)
    assert mod is new  # one object under two names: private names and monkeypatching behave the same
    assert mod.__spec__.name == new.__name__
    future = [w for w in caught if issubclass(w.category, FutureWarning)]
    if old in _compat.PUBLIC:
        assert not future
    else:
        assert len(future) == 1 and _compat.OLD_PATHS[old] in str(future[0].message)


def test_public_names_import_without_warnings():
    code = ("import warnings; warnings.simplefilter('error'); import filtersurgery as fs; "
            "import filtersurgery.train, filtersurgery.losses, filtersurgery.data, filtersurgery.models, "
            "filtersurgery.cli, filtersurgery.report; [getattr(fs, n) for n in fs.__all__]")
    import subprocess

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


MAX_LINES = 60
# functions still over MAX_LINES: (module path, name) -> why it is not split yet (none left)
KNOWN_LONG: dict = {}


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
    new = {k: v for k, v in long.items() if k not in KNOWN_LONG}
    assert not new, f"functions over {MAX_LINES} lines (split them): {new}"
    fixed = [k for k in KNOWN_LONG if k not in long]
    assert not fixed, f"no longer over {MAX_LINES} lines: remove {fixed} from KNOWN_LONG"


def test_old_paths_as_attributes_and_under_python_m():
    import subprocess

    code = ("import warnings, filtersurgery as fs\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    m = fs.reinit\n"
            "assert m.__name__ == 'filtersurgery.ops.reinit', m.__name__\n"
            "assert [x.filename for x in w if issubclass(x.category, FutureWarning)] == ['<string>'], w  # the caller\n"
            "try:\n    fs.no_such_name\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit('no AttributeError')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "filtersurgery.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "COMMAND" in r.stdout, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "filtersurgery.zoo"], capture_output=True, text=True)
    assert r.returncode == 0 and "FutureWarning" in r.stderr, r.stderr[-2000:]
