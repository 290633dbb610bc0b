"""The library's layout rules (issue 19), read from the source with `ast`, nothing imported:

- no import cycle among the library's modules (imports inside functions count: a lazy import that
  closes a cycle is still a cycle);
- no private (`_name`) name of one library module imported or reached as an attribute from another;
- no library file over 500 lines.

The library is tallzip/, formats/ (installed as tallzip.formats) and cli/ (tallzip.cli), as setup.cfg maps them.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"tallzip": "tallzip", "formats": "tallzip.formats", "cli": "tallzip.cli"}
MAX_LINES = 500


def library_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py of the library (a package is its __init__)."""
    modules = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute name a `from ... import` names (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if _is_package(path) else module.split(".")[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _owner(name: str, modules) -> str | None:
    """The library module `name` lies in (a dotted name may go past a module into its attributes)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(modules: dict[str, Path]):
    """module -> list of (imported library module, names taken from it, line) for every import statement."""
    found = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    owner = _owner(alias.name, modules)
                    if owner:
                        edges.append((owner, [], node.lineno))
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(module, path, node)
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    if full in modules:             # `from package import submodule`
                        edges.append((full, [], node.lineno))
                    else:
                        owner = _owner(source, modules)
                        if owner:
                            edges.append((owner, [alias.name], node.lineno))
        found[module] = edges
    return found


def import_cycles(modules) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself)."""
    graph = {m: sorted({target for target, _, _ in edges}) for m, edges in imports(modules).items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(v):  # Tarjan, recursive: the graph is a few dozen modules deep at most
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, []):
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined_names(tree) -> set[str]:
    """Names a file defines: functions, classes, assigned names and `self.x` / `cls.x` attributes."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def private_crossings(modules) -> list[str]:
    """`_name`s of one library module imported into, or reached as attributes from, another."""
    trees = {m: ast.parse(p.read_text(), str(p)) for m, p in modules.items()}
    defined = {m: _defined_names(t) for m, t in trees.items()}
    private_anywhere = {n for names in defined.values() for n in names if _private(n)}
    problems = []
    for module, edges in imports(modules).items():
        for target, names, line in edges:
            for name in names:
                if _private(name) and target != module:
                    problems.append(f"{module}:{line} imports {target}.{name}")
    for module, tree in trees.items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if node.attr in private_anywhere and node.attr not in defined[module]:
                problems.append(f"{module}:{node.lineno} reaches .{node.attr} of another module")
    return problems


def long_files(modules) -> list[str]:
    out = []
    for module, path in modules.items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            out.append(f"{path.relative_to(ROOT)}: {lines} lines")
    return out


def test_no_import_cycle():
    assert import_cycles(library_modules()) == []


def test_no_private_name_crosses_modules():
    assert private_crossings(library_modules()) == []


def test_no_library_file_over_500_lines():
    assert long_files(library_modules()) == []


# The checks themselves must be able to say no: a small library written to a temporary folder.
def _write(root: Path, files: dict[str, str]):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checks_catch_a_lazy_cycle_a_private_name_and_a_long_file(tmp_path):
    _write(tmp_path, {
        "tallzip/__init__.py": "",
        "tallzip/a.py": "from .b import f\n\ndef _helper():\n    pass\n",
        "tallzip/b.py": "def f():\n    from tallzip import a  # lazy\n    return a._helper()\n",
        "formats/__init__.py": "",
        "formats/c.py": "from ..a import _helper\n" + "x = 1\n" * 501,
        "cli/__init__.py": "",
    })
    modules = library_modules(tmp_path)
    assert modules["tallzip.formats.c"] == tmp_path / "formats/c.py"
    assert import_cycles(modules) == [["tallzip.a", "tallzip.b"]]
    crossings = private_crossings(modules)
    assert any("tallzip.formats.c:1 imports tallzip.a._helper" in p for p in crossings)
    assert any(p.startswith("tallzip.b:3 reaches ._helper") for p in crossings)
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        assert long_files(modules) == ["formats/c.py: 502 lines"]
    finally:
        ROOT = old


def test_checks_pass_a_clean_library(tmp_path):
    _write(tmp_path, {
        "tallzip/__init__.py": "from .a import f\n",
        "tallzip/a.py": "from tallzip.formats import c\n\ndef f():\n    return c.g()\n",
        "formats/__init__.py": "",
        "formats/c.py": "class K:\n    def __init__(self):\n        self._x = 1\n\ndef g():\n    return K()._x\n",
        "cli/__init__.py": "",
    })
    modules = library_modules(tmp_path)
    assert import_cycles(modules) == []
    assert private_crossings(modules) == []
    assert long_files(modules) == []


if __name__ == "__main__":  # a readable list of what is left: python tests/test_layout.py
    mods = library_modules()
    for title, found in (("cycles", import_cycles(mods)), ("private", private_crossings(mods)), ("long", long_files(mods))):
        print(f"== {title}: {len(found)}")
        for item in found:
            print("  ", item)


def test_readme_layout_names_every_module():
    """README's "Layout of the code" names every library file (by its file name, in its folder's line)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Layout of the code", 1)[1].split("\n## ", 1)[0]
    missing = [str(p.relative_to(ROOT)) for p in library_modules().values()
               if p.name != "__init__.py" and f"`{p.name}`" not in section]
    folders = {p.parent.relative_to(ROOT).as_posix() for p in library_modules().values()}
    missing += [f for f in sorted(folders) if f"`{f.rsplit('/', 1)[-1]}/`" not in section]
    assert missing == []


def test_each_package_says_what_it_holds():
    empty = [str(p.relative_to(ROOT)) for p in library_modules().values()
             if p.name == "__init__.py" and not ast.get_docstring(ast.parse(p.read_text()))]
    assert empty == []
