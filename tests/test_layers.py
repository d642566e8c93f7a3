"""The helpers package's layers: imports point down, and no module imports itself round a circle.

Every import of a helpers module counts, relative or absolute, at module level or inside a
function (a lazy import is for a heavy package such as torch, never a way round the layers).
The layers, lowest first, are :data:`LAYERS` (``helpers/__init__.py`` says what each holds): a
module may import modules of its own layer and of the layers below it, never one above.
"""

import ast
from pathlib import Path

HELPERS = Path(__file__).resolve().parent.parent / "helpers"

#: The layers, lowest first: the subpackages of helpers, then the runner (``helpers/run.py``).
LAYERS = ("core", "demo", "wsi", "patching", "learning", "paper", "notebook", "run")


def module_name(path, root=HELPERS):
    """``helpers.paper.jobs`` for ``helpers/paper/jobs.py``; a package for its ``__init__.py``."""
    parts = ["helpers", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module):
    """The layer of a helpers module (``None`` for the package ``helpers`` itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def helpers_imports(source, module, is_package, known):
    """``[(line, imported module)]``: every import of a helpers module in ``source`` (the code of
    ``module``), wherever it stands. ``from X import name`` counts ``X.name`` when that is a
    module of ``known``, else ``X``."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "helpers"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "helpers":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if sub in known else base))
    return out


def import_graph(root=HELPERS):
    """``{module: [(line, imported module)]}`` over every ``.py`` file under ``root``."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    return {mod: helpers_imports(p.read_text(), mod, p.name == "__init__.py", files) for mod, p in files.items()}


def upward_imports(graph):
    """One line per import of a module in a higher layer than the importing module's."""
    bad = []
    for mod, edges in graph.items():
        for line, target in edges:
            mine, theirs = layer_of(mod), layer_of(target)
            if theirs is None or mine is None:
                continue  # the package helpers itself, which imports nothing
            if LAYERS.index(theirs) > LAYERS.index(mine):
                bad.append(f"{mod} (line {line}, layer {mine}) imports {target} (layer {theirs}, above it)")
    return bad


def import_circles(graph):
    """The circles of the import graph (strongly connected groups of modules), each as its
    modules and the imports that join them."""
    index, low, stack, on, groups = {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm; the package is small, so recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for _, w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            self_loop = any(w == v for _, w in graph.get(v, ()))
            if len(group) > 1 or self_loop:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [
        "circle: " + ", ".join(f"{m} line {line} -> {t}" for m in group for line, t in graph[m] if t in group)
        for group in groups
    ]


def test_every_subpackage_has_a_layer():
    packages = sorted(p.parent.name for p in HELPERS.glob("*/__init__.py"))
    modules = sorted(p.stem for p in HELPERS.glob("*.py") if p.stem != "__init__")
    assert sorted(packages + modules) == sorted(LAYERS), "a helpers subpackage or module outside LAYERS"
    for name in packages:
        assert (HELPERS / name / "__init__.py").read_text().startswith('"""'), f"{name}: say what it holds"


def test_imports_point_down_a_layer():
    bad = upward_imports(import_graph())
    assert not bad, "imports up a layer:\n" + "\n".join(bad)


def test_no_import_circles():
    circles = import_circles(import_graph())
    assert not circles, "\n".join(circles)


def test_the_checks_see_lazy_relative_and_absolute_imports(tmp_path):
    """A layering fault of each kind in a small package is found and named."""
    root = tmp_path / "helpers"
    for pkg in ("core", "paper"):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text('"""x"""\n')
    (root / "__init__.py").write_text("")
    (root / "core" / "a.py").write_text("def f():\n    from ..paper import b\n")
    (root / "core" / "c.py").write_text("import helpers.core.d\n")
    (root / "core" / "d.py").write_text("from helpers.core.c import x\n")
    (root / "paper" / "b.py").write_text("from ..core.a import f\nfrom helpers.core import c\n")
    graph = import_graph(root)
    assert graph["helpers.paper.b"] == [(1, "helpers.core.a"), (2, "helpers.core.c")]
    assert upward_imports(graph) == [
        "helpers.core.a (line 2, layer core) imports helpers.paper.b (layer paper, above it)"
    ]
    circles = import_circles(graph)
    assert len(circles) == 2
    assert any("helpers.core.c line 1 -> helpers.core.d" in c and "helpers.core.d line 1" in c for c in circles)
    assert any("helpers.core.a line 2 -> helpers.paper.b" in c for c in circles)


def _notebook_imports():
    """``{(subpackage, module): {names}}`` that the notebooks' code cells import from helpers."""
    import nbformat

    used = {}
    for nb in sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb")):
        for cell in nbformat.read(nb, as_version=4).cells:
            if cell.cell_type != "code":
                continue
            for node in ast.walk(ast.parse(cell.source)):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("helpers."):
                    parts = node.module.split(".")
                    assert len(parts) == 3, f"{nb.name} imports {node.module}: import from a module of a layer"
                    used.setdefault((parts[1], parts[2]), set()).update(a.name for a in node.names)
    return used


def test_the_notebooks_use_the_public_face_each_layer_lists():
    """Every name a notebook imports is listed in its subpackage's ``NOTEBOOK_API``, and every
    listed name is used by a notebook, exists, and is not private."""
    import importlib

    used = _notebook_imports()
    listed = {}
    for sub in LAYERS:
        if (HELPERS / sub).is_dir():
            for mod, names in importlib.import_module(f"helpers.{sub}").NOTEBOOK_API.items():
                listed[(sub, mod)] = set(names)
    assert used == listed, {
        k: (used.get(k), listed.get(k)) for k in set(used) | set(listed) if used.get(k) != listed.get(k)
    }
    for (sub, mod), names in listed.items():
        module = importlib.import_module(f"helpers.{sub}.{mod}")
        for name in names:
            assert not name.startswith("_") and hasattr(module, name), f"helpers.{sub}.{mod}.{name}"


def _private_reaches(path):
    """``[(line, what)]``: private names of helpers modules imported or reached through a module
    object in ``path`` (a leading underscore marks a module's own)."""
    tree = ast.parse(path.read_text())
    modules, out = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update((a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("helpers"))
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("helpers")):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    out.append((node.lineno, f"from {node.module} import {a.name}"))
                elif (HELPERS / (node.module or "").replace(".", "/") / f"{a.name}.py").exists() or a.name[0].islower():
                    modules.add(a.asname or a.name)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            out.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return out


def test_no_private_name_is_reached_from_another_module_or_bench():
    root = HELPERS.parent
    files = [*HELPERS.rglob("*.py"), *(root / "bench").glob("*.py"), *(root / "tools").glob("*.py")]
    bad = [f"{p.relative_to(root)}:{line}: {what}" for p in files for line, what in _private_reaches(p)]
    assert not bad, "private names reached from outside their module:\n" + "\n".join(bad)
