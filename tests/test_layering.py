"""The package's import direction, read from the source with ``ast``: imports point down only.

tools/ and eval/ stand above kobllla/; inside kobllla/, the lower modules (files, rows, the CLI
helper, chat format, versions, the token-file format) import nothing above them, the text tools
load without torch, and no two subpackages import each other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "kobllla"

# Below everything else: they may import only each other (and the standard library / third parties).
LOWER = {
    "kobllla", "kobllla.atomic", "kobllla.jsonl", "kobllla.rows", "kobllla.conversations", "kobllla.cli",
    "kobllla.chat_format", "kobllla.versions", "kobllla.token_file", "kobllla.pool",
}
# What the lower modules must never reach, directly or through another module.
HIGHER = ("kobllla.datasets", "kobllla.evaluation", "kobllla.demo", "kobllla.gguf", "kobllla.generation")
# Text and file tools that must load without torch/torchtune (tools.pretokenize, tools.translate_dataset,
# tools.build_kowikitext start in well under a second; torchtune is imported inside the function that needs it).
TORCH_FREE = LOWER | {
    "kobllla.assets", "kobllla.chat_api", "kobllla.corpora", "kobllla.korean", "kobllla.pretokenized",
    "kobllla.translate", "kobllla.translation_prompt", "kobllla.wiki", "kobllla.wiki.build",
    "kobllla.wiki.download", "kobllla.wiki.dump", "kobllla.wiki.text",
}
TORCH = ("torch", "torchtune")
# Subpackage pairs allowed to import each other, with the reason. None today.
ALLOWED_CYCLES: dict[frozenset[str], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _module_level(tree: ast.Module) -> list[ast.stmt]:
    """Statements run on import: the body, and the bodies of top-level if/try/with (not TYPE_CHECKING)."""
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or _is_type_checking(node):
            continue
        out.append(node)
        for field in ("body", "orelse", "finalbody", "handlers"):
            todo.extend(getattr(node, field, []))
    return out


def imported_names(path: Path, *, module_level: bool) -> set[str]:
    """Dotted names a file imports (``from a import b`` gives ``a`` and ``a.b``), relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in _module_level(tree) if module_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def kobllla_modules(names: set[str]) -> set[str]:
    """The kobllla modules those names load: each name's longest module prefix and its parent packages."""
    loaded = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            if ".".join(parts[:i]) in MODULES:
                loaded.add(".".join(parts[:i]))
    return loaded


def graph(*, module_level: bool) -> dict[str, set[str]]:
    return {m: kobllla_modules(imported_names(p, module_level=module_level)) - {m} for m, p in MODULES.items()}


def reachable(start: str, edges: dict[str, set[str]]) -> dict[str, list[str]]:
    """Every module reachable from ``start``, with the import chain that reaches it."""
    chains, todo = {start: [start]}, [start]
    while todo:
        m = todo.pop()
        for n in sorted(edges.get(m, ())):
            if n not in chains:
                chains[n] = [*chains[m], n]
                todo.append(n)
    return chains


def unit(module: str) -> str:
    """A subpackage or top-level module: ``kobllla.datasets._chat`` -> ``kobllla.datasets``."""
    return ".".join(module.split(".")[:2])


def test_no_kobllla_module_imports_tools_or_eval():
    bad = [f"{m} imports {n}" for m, p in MODULES.items()
           for n in imported_names(p, module_level=False)
           if n.split(".")[0] in ("tools", "eval")]
    assert bad == []


def test_lower_modules_import_only_lower_modules():
    edges = graph(module_level=False)  # function-level imports count too: they run when called
    bad = [" -> ".join(chain) for m in sorted(LOWER) for n, chain in reachable(m, edges).items() if n not in LOWER]
    assert bad == [], "a lower module reaches above it"
    assert not any(n.startswith(HIGHER) for n in LOWER)


def test_torch_free_modules_import_no_torch_at_module_level():
    edges = graph(module_level=True)
    bad = []
    for m in sorted(TORCH_FREE):
        for n, chain in reachable(m, edges).items():
            direct = imported_names(MODULES[n], module_level=True)
            bad += [f"{' -> '.join(chain)} imports {t}" for t in sorted(direct) if t.split(".")[0] in TORCH]
    assert bad == []


def test_torch_free_modules_load_without_torch():
    """The same claim as Python sees it: third-party imports that pull torch in would fail it too."""
    code = f"import sys\nfor m in {sorted(TORCH_FREE)!r}: __import__(m)\n" \
           f"print(sorted(m for m in {TORCH!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_no_import_cycle_between_subpackages():
    edges: dict[str, set[str]] = {}
    for m, targets in graph(module_level=False).items():
        edges.setdefault(unit(m), set()).update(unit(t) for t in targets if unit(t) != unit(m) and t != "kobllla")
    cycles = {frozenset((a, b)) for a in edges for b in edges[a] if a in reachable(b, edges) and a != b}
    unexplained = sorted(" <-> ".join(sorted(pair)) for pair in cycles - ALLOWED_CYCLES.keys())
    assert unexplained == []
