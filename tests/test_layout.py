"""The package's layers import only downwards, its modules form no import cycle, and importing it (or
asking its command line for help) loads no torch and changes nothing process-wide."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "vitexplain"
# each layer may import its own and lower layers only
RANK = {"_lazy": 0, "kernels": 0, "io": 1, "capture": 1, "methods": 2, "metrics": 2, "models": 2, "render": 2, "run": 3,
        "cli": 4, "__init__": 5, "__main__": 5}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> tuple[set[str], set[str]]:
    """The package modules ``path`` imports at module level (outside ``TYPE_CHECKING``) and anywhere."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    top_level_nodes = set()
    for node in tree.body:
        if isinstance(node, functions) or (isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)):
            continue
        # a class body runs at import, its methods do not
        items = [i for i in node.body if not isinstance(i, functions)] if isinstance(node, ast.ClassDef) else [node]
        top_level_nodes.update(id(n) for item in items for n in ast.walk(item))
    everywhere, top_level = set(), set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        found = {t for t in targets if t.startswith("vitexplain") and (
            (ROOT / (t.replace(".", "/") + ".py")).is_file() or (ROOT / t.replace(".", "/") / "__init__.py").is_file())}
        everywhere |= found
        if id(node) in top_level_nodes:
            top_level |= found
    return top_level - {module_name(path)}, everywhere - {module_name(path)}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_layers_import_only_downwards_and_without_cycles():
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        top_level, everywhere = imports(path)
        graph[name] = top_level
        for target in everywhere:
            if target == "vitexplain" or layer(target) == "__init__":
                continue
            assert RANK[layer(target)] <= RANK[layer(name)], f"{name} imports {target}, a layer above it"
    visiting, done = set(), set()

    def visit(node, trail):
        if node in done:
            return
        assert node not in visiting, f"import cycle: {' → '.join(trail + [node])}"
        visiting.add(node)
        for target in graph.get(node, ()):
            visit(target, trail + [node])
        visiting.discard(node)
        done.add(node)

    for node in graph:
        visit(node, [])
    assert "vitexplain.methods.rollout" in graph and "vitexplain.run.pipeline" in graph  # the walk saw the package


def test_help_and_version_answer_without_torch():
    probe = ("import sys, runpy; sys.argv = ['vitexplain'] + sys.argv[1:]\n"
             "try:\n    runpy.run_module('vitexplain', run_name='__main__')\n"
             "except SystemExit as done:\n    assert done.code in (0, None), done.code\n"
             "loaded = [m for m in ('torch', 'timm', 'numba', 'numpy') if m in sys.modules]\n"
             "assert not loaded, loaded\n")
    for args in (["--help"], ["rollout", "--help"], ["sweep", "--help"], ["--version"]):
        result = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=ROOT,
                                timeout=60)
        assert result.returncode == 0, (args, result.stderr)
    version = subprocess.run([sys.executable, "-m", "vitexplain", "--version"], capture_output=True, text=True,
                             cwd=ROOT, timeout=60)
    assert version.stdout.strip() == f"vitexplain {__import__('vitexplain').__version__}"


def test_the_command_line_default_model_is_the_library_default():
    import vitexplain.cli as cli
    import vitexplain.models as models

    assert cli.DEFAULT_MODEL == models.DEFAULT_MODEL  # written twice so that --help needs no timm
