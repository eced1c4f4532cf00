"""The layered core: every slimkit package imports only from packages below it.

An AST walk over every import in ``slimkit/`` (function-level ones included) checks each edge
against :data:`LAYERS`; slimkit's own code is never imported inside a function (that is how a
cycle hides), only heavy third-party libraries are. A failure names the offending edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "slimkit"

# Lower number = lower layer. A module may import its own package, and packages strictly below.
LAYERS: dict[str, float] = {
    "__init__": 0.0, "errors": 0.0,      # layer 0: no slimkit imports, or only the ones listed before them
    "_console": 0.1, "config": 0.2, "_io": 0.3,
    "_provenance": 0.4, "_plugins": 0.4, "layers": 0.4,
    "data": 1,
    "models": 2,
    "export": 3,
    "measure": 4, "training": 4,
    "pipeline": 5,
    "methods": 6,
    "report": 7,
    "search": 8,
    "nas": 9,
    "api": 10,
    "commands": 11,
    "cli": 12,
    "testing": 13,
}


def _package_of(module: str) -> str:
    """``slimkit.search._run`` -> ``search``; ``slimkit`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    is_pkg = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_pkg else parts), is_pkg


def _imported(node: ast.ImportFrom | ast.Import, module: str, is_pkg: bool, top: str) -> list[str]:
    """The slimkit modules an import statement names (``from . import x`` names ``pkg.x``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == top]
    if node.level:
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != top:
        return []
    if target == top:  # from slimkit import x: x may be a package
        return [f"{top}.{a.name}" if a.name in LAYERS else top for a in node.names]
    return [target]


def layer_violations(root: Path, layers: dict[str, float] = LAYERS) -> list[str]:
    """Every import in the package at ``root`` that breaks the layering, as readable lines."""
    top = root.name
    problems = []
    for path in sorted(root.rglob("*.py")):
        module, is_pkg = _module_name(path, root)
        own = _package_of(module)
        where = path.relative_to(root.parent)
        if own not in layers:
            problems.append(f"{where}: package '{own}' has no layer; add it to LAYERS")
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _imported(node, module, is_pkg, top):
                if id(node) not in top_level:
                    problems.append(f"{where}:{node.lineno}: imports {target} inside a function; import it at the "
                                    "top (function-level imports are for heavy third-party libraries only)")
                    continue
                theirs = _package_of(target)
                if theirs == own:
                    continue
                if theirs not in layers:
                    problems.append(f"{where}:{node.lineno}: imports {target}, whose package '{theirs}' has no layer")
                elif layers[theirs] >= layers[own]:
                    problems.append(f"{where}:{node.lineno}: {own} (layer {layers[own]:g}) imports {target} "
                                    f"(layer {layers[theirs]:g}): a package may only import from packages below it")
    return problems


def test_every_import_goes_down_the_layers():
    problems = layer_violations(ROOT)
    assert not problems, "layering broken:\n" + "\n".join(problems)


def test_every_package_has_a_layer():
    packages = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
                if (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert packages <= set(LAYERS), f"add {sorted(packages - set(LAYERS))} to LAYERS"


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "slimkit"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize("files,message", [
    # a back-edge: data (layer 1) importing search (layer 8)
    ({"__init__.py": "", "data/__init__.py": "from ..search import compress\n", "search/__init__.py": ""},
     r"slimkit/data/__init__.py:1: data \(layer 1\) imports slimkit.search \(layer 8\)"),
    # the same edge hidden inside a function
    ({"__init__.py": "", "models/__init__.py": "def f():\n    from ..api import apply\n", "api.py": ""},
     r"slimkit/models/__init__.py:2: imports slimkit.api inside a function"),
    # siblings on one layer may not import each other either
    ({"__init__.py": "", "training.py": "from .measure import profile\n", "measure/__init__.py": ""},
     r"training \(layer 4\) imports slimkit.measure \(layer 4\)"),
    ({"__init__.py": "", "newpkg/__init__.py": ""}, r"package 'newpkg' has no layer"),
])
def test_a_deliberate_back_edge_fails_naming_it(tmp_path, files, message):
    problems = layer_violations(_tree(tmp_path, files))
    assert any(__import__("re").search(message, p) for p in problems), problems


def test_a_clean_tree_passes(tmp_path):
    root = _tree(tmp_path, {"__init__.py": "", "data/__init__.py": "from ..errors import SlimkitError\n",
                            "errors.py": "", "search/__init__.py": "from ..data import load_data\nimport json\n"
                            "def f():\n    import optuna\n"})
    assert layer_violations(root) == []
