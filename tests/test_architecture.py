"""The import graph of the package: which way imports may point, no cycle, no hidden (function-local)
import of a project module, and cogvx.quantize / cogvx.kernels importable without cogvx.engine."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"engine": "cogvx.engine", "kernels": "cogvx.kernels", "quantize": "cogvx.quantize"}

# module prefix -> the project module prefixes it may import (besides itself)
ALLOWED = {
    "cogvx.kernels": (),
    "cogvx.quantize": (),
    "cogvx.engine.io": (),
    "cogvx.engine.models": ("cogvx.kernels",),
    "cogvx.engine.runtime": ("cogvx.engine.models", "cogvx.engine.io"),
    "cogvx.engine.quantizing": ("cogvx.engine.models", "cogvx.engine.io", "cogvx.quantize"),
    "cogvx.engine.loading": ("cogvx.engine.models", "cogvx.engine.io", "cogvx.engine.quantizing", "cogvx.quantize"),
    "cogvx.engine.dev": ("cogvx.engine.models", "cogvx.engine.io", "cogvx.engine.loading"),
    "cogvx.engine.parallel": ("cogvx.engine.models",),
    "cogvx.engine.pipelines": ("cogvx.engine.models", "cogvx.engine.io", "cogvx.engine.runtime",
                               "cogvx.engine.loading", "cogvx.engine.quantizing", "cogvx.engine.dev",
                               "cogvx.engine.parallel", "cogvx.kernels", "cogvx.quantize"),
    "cogvx.engine.cli": ("cogvx.engine", "cogvx.quantize", "cogvx.kernels"),
    "cogvx.engine": ("cogvx.engine.pipelines", "cogvx.quantize"),  # the package __init__: the public face
}


def _modules():
    """(module name, path) of every module of the three packages."""
    for folder, pkg in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([pkg, *parts]), path, path.name == "__init__.py"


def _imports(name: str, path: Path, is_pkg: bool):
    """(imported project module, lineno, at module level?) of every import in a file."""
    tree = ast.parse(path.read_text())
    package = name if is_pkg else name.rpartition(".")[0]
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t.startswith("cogvx"):
                yield t, node.lineno, id(node) in top or _in_type_checking(tree, node)


def _in_type_checking(tree, node) -> bool:
    for n in tree.body:
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test) and node in list(ast.walk(n)):
            return True
    return False


def _rule_for(name: str) -> str:
    return max((p for p in ALLOWED if name == p or name.startswith(p + ".")), key=len)


def test_no_function_local_import_of_a_project_module():
    hidden = [f"{path.relative_to(REPO)}:{line} imports {mod}" for name, path, pkg in _modules()
              for mod, line, top in _imports(name, path, pkg) if not top]
    assert not hidden, "project imports belong at the top of the file:\n" + "\n".join(hidden)


def test_imports_point_the_allowed_way():
    bad = []
    for name, path, pkg in _modules():
        rule = _rule_for(name)
        for mod, line, _ in _imports(name, path, pkg):
            if mod == rule or mod.startswith(rule + "."):
                continue
            if not any(mod == a or mod.startswith(a + ".") for a in ALLOWED[rule]):
                bad.append(f"{path.relative_to(REPO)}:{line}: {name} imports {mod}")
    assert not bad, "imports against the layering of ARCHITECTURE.md:\n" + "\n".join(bad)


def test_module_import_graph_has_no_cycle():
    mods = {name: (path, pkg) for name, path, pkg in _modules()}
    graph = {}
    for name, (path, pkg) in mods.items():
        deps = set()
        for mod, _, _ in _imports(name, path, pkg):
            while mod and mod not in mods:  # "from .x import y" names a module or a name in one
                mod = mod.rpartition(".")[0]
            if mod and mod != name and not name.startswith(mod + "."):  # a package's parts may import it
                deps.add(mod)
        graph[name] = deps
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in graph[n]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n)


@pytest.mark.parametrize("blocked, packages", [
    (("cogvx.engine",), ("cogvx.quantize", "cogvx.kernels")),
    (("cogvx.engine", "cogvx.quantize"), ("cogvx.kernels",)),
])
def test_packages_import_with_the_engine_blocked(blocked, packages):
    """Every module of cogvx.quantize and cogvx.kernels imports in a process where importing
    cogvx.engine (and, for the kernels, cogvx.quantize) raises."""
    code = textwrap.dedent(f"""
        import importlib, importlib.abc, pkgutil, sys
        BLOCKED = {blocked!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                    raise ImportError(f"blocked: {{name}}")
        sys.meta_path.insert(0, Block())
        done = []
        for pkg in {packages!r}:
            m = importlib.import_module(pkg)
            done.append(pkg)
            for info in pkgutil.walk_packages(m.__path__, pkg + "."):
                importlib.import_module(info.name)
                done.append(info.name)
        print(len(done))
    """)
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.strip().splitlines()[-1]) >= 3


def test_files_stay_short():
    """A few hundred lines a file (STYLE.md); the longest files and why are in the README's Layout."""
    long = [f"{p.relative_to(REPO)}: {n} lines" for _, p, _ in _modules() if (n := len(p.read_text().splitlines())) > 420]
    assert not long, "\n".join(long)


# Attributes of torch / Triton objects that the quantization formats and the AOT table read on purpose.
_LIBRARY_PRIVATE = {"_parameters", "_buffers", "_non_persistent_buffers_set", "_version", "_pack_args"}


def _private_names(tree) -> tuple[set, set, dict]:
    """(private names a file defines, the names it imports from outside the project, class -> base names)."""
    defined, external, bases = set(), set(), {}
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(n.name)
            if isinstance(n, ast.ClassDef):
                bases[n.name] = [ast.unparse(b).rpartition(".")[2] for b in n.bases]
        elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
            defined.add(n.attr)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            defined.add(n.id)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith("_"):
            defined.add(n.value)  # setattr(obj, "_x", ...)
        elif isinstance(n, ast.Import):
            external.update((a.asname or a.name).split(".")[0] for a in n.names if not a.name.startswith("cogvx"))
        elif isinstance(n, ast.ImportFrom) and not n.level and not (n.module or "").startswith("cogvx"):
            external.update(a.asname or a.name for a in n.names)
    return defined, external, bases


def test_no_module_reads_another_modules_private_attributes():
    """``x._name`` is read only where ``_name`` is defined: in the same file, or (through ``self``) in the
    file of a project base class. Engine state that other modules need has a public name (ARCHITECTURE.md:
    the transformer call has one owner, ``Forward``, and nothing reads its privates)."""
    files = {path: ast.parse(path.read_text()) for _, path, _ in _modules()}
    info = {path: _private_names(tree) for path, tree in files.items()}
    class_privates: dict[str, set] = {}
    for path, (defined, _, bases) in info.items():
        for cls in bases:
            class_privates.setdefault(cls, set()).update(defined)
    bad = []
    for path, tree in files.items():
        defined, external, bases = info[path]
        inherited = set().union(*(class_privates.get(b, set()) for bs in bases.values() for b in bs))
        for n in ast.walk(tree):
            if not (isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")):
                continue
            if n.attr in defined or n.attr in _LIBRARY_PRIVATE:
                continue
            root = n.value
            while isinstance(root, (ast.Attribute, ast.Call, ast.Subscript)):
                root = root.func if isinstance(root, ast.Call) else root.value
            if isinstance(root, ast.Name) and (root.id in external or root.id == "self" and n.attr in inherited):
                continue
            bad.append(f"{path.relative_to(REPO)}:{n.lineno}: {ast.unparse(n)}")
    assert not bad, "reads of another module's private attributes (give them a public name):\n" + "\n".join(bad)


def test_readme_layout_and_drawing_match_the_house():
    """The README's Layout table names every part of the house, and its drawing is what
    ``python -P tests/structure.py`` prints from the code today."""
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    parts = sorted({name.split(".")[2] for name, _, _ in _modules() if name.count(".") >= 2
                    and name.startswith("cogvx.engine.")})
    for part in parts:
        folder = f"`engine/{part}/`" if (REPO / "engine" / part).is_dir() else f"`engine/{part}.py`"
        assert folder in layout, f"the README's Layout table does not name {folder}"
    drawn = subprocess.run([sys.executable, "-P", str(REPO / "tests" / "structure.py")], capture_output=True,
                           text=True, timeout=120, check=True).stdout.strip()
    assert drawn and drawn in layout, "the README's drawing is out of date: paste `python -P tests/structure.py`"
