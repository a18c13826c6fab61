"""Package order: no import cycles between marginface's files, no import from a lower layer to a
higher one (docs/architecture.md, "Package order").

Every ``import`` / ``from ... import`` in every file under ``marginface/`` counts, including those
inside functions and ``if TYPE_CHECKING:`` blocks: a deferred import still makes the importing
module depend on the imported one, it only hides the cycle until the function runs.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "marginface"

# Low to high. A module may import modules of its own layer or of a lower one, never a higher one.
# A name is a module or a package (a package covers everything under it). Each layer lists the
# pieces it owns, so a new top-level module must be placed here before the test passes.
LAYERS: list[tuple[str, ...]] = [
    # 0: the package itself (its curated API is a table of "module:name" strings resolved on first
    #    use, so it imports nothing of ours) and the error type everything raises
    ("marginface", "marginface.errors"),
    # 1: leaf utilities: hardware probes, file writes/trust checks, JSON output, allocator tuning,
    #    torch.distributed collectives (used by heads.partial_fc and train.distributed), and the
    #    inference contract (ModelInfo / Embedder / EmbedOptions) every model reader shares
    ("marginface.hardware", "marginface.inference", "marginface.io", "marginface.jsonout", "marginface.malloc",
     "marginface.parallel"),
    # 2: the run description; component names are checked one layer up (train.runconfig), so it
    #    imports nothing of ours but errors and io and every package above can take a Config
    ("marginface.config",),
    # 3: the building blocks: data (sources, images, pair sets), backbones (+ graph rewrites), heads
    ("marginface.data", "marginface.models", "marginface.heads"),
    # 4: evaluation (metrics, embedding pair sets, IJB, identification, reports)
    ("marginface.evaluate",),
    # 5: training (setup, loop, checkpoints, distributed) and the 2-D feature visualisation
    ("marginface.train", "marginface.viz"),
    # 6: deployment (export, loading, compiled/ONNX inference, embedder, galleries)
    ("marginface.deploy",),
    # 7: the HTTP service (FastAPI app + web page) over deploy's embedder and gallery
    ("marginface.serve",),
    # 8: the command line
    ("marginface.cli", "marginface.__main__"),
]


def module_files() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_pkg)
    return out


def _owner(name: str, modules) -> str | None:
    """The file a dotted name lives in: the longest prefix that is one of our modules."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_edges() -> list[tuple[str, str, int]]:
    """(importer, imported, line) for every import of one marginface module by another."""
    modules = module_files()
    edges = []
    for mod, (path, is_pkg) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package this file is in, minus level-1 steps
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[:len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                # `from pkg import sub` imports the submodule `pkg.sub` when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target != "marginface" and not target.startswith("marginface."):
                    continue
                owner = _owner(target, modules)
                if owner is not None and owner != mod:
                    edges.append((mod, owner, node.lineno))
    return edges


def layer_of(module: str) -> int | None:
    best, best_len = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            covers = module == name or (name != "marginface" and module.startswith(name + "."))
            if covers and len(name) > best_len:
                best, best_len = i, len(name)
    return best


def find_cycles(edges) -> list[list[str]]:
    """One cycle (as a path a -> b -> ... -> a) per strongly connected component with a cycle."""
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    # Tarjan's strongly connected components (iterative: no recursion limit)
    index, low, on_stack, stack, comps, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        comps.append(set(comp))
    cycles = []
    for comp in comps:
        start = min(comp)
        # shortest path back to start inside the component (breadth first)
        prev, frontier, found = {start: None}, [start], None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & comp):
                    if w == start:
                        found = v
                        break
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path, v = [start], found
        while v is not None and v != start:
            path.append(v)
            v = prev[v]
        cycles.append([start] + path[1:][::-1] + [start])
    return cycles


def tangled_groups(edges) -> list[list[str]]:
    """The modules of each group that imports itself round (a strongly connected component)."""
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges:
        graph.setdefault(a, set()).add(b)

    def reach(v):
        seen, todo = set(), [v]
        while todo:
            for w in graph.get(todo.pop(), ()):
                if w not in seen:
                    seen.add(w)
                    todo.append(w)
        return seen

    out = []
    for cycle in find_cycles(edges):
        start = cycle[0]
        out.append(sorted(w for w in reach(start) if start in reach(w)))
    return out


def _where(edges, a, b) -> str:
    lines = sorted({line for x, y, line in edges if (x, y) == (a, b)})
    return f"{a.replace('.', '/')}.py:{','.join(map(str, lines))}"


def test_every_module_has_a_layer():
    missing = [m for m in module_files() if layer_of(m) is None]
    assert not missing, f"place these modules in LAYERS (tests/test_layering.py): {missing}"


def test_no_import_cycles():
    edges = import_edges()
    cycles = find_cycles(edges)
    assert not cycles, "import cycles between marginface modules:\n" + "\n".join(
        "  " + " -> ".join(c) + "\n    (" + "; ".join(_where(edges, a, b) for a, b in zip(c, c[1:])) + ")"
        + "\n    group: " + ", ".join(g)
        for c, g in zip(cycles, tangled_groups(edges)))


def test_imports_follow_package_order():
    wrong = sorted({(a, b, line) for a, b, line in import_edges()
                    if layer_of(a) is not None and layer_of(b) is not None and layer_of(b) > layer_of(a)})
    assert not wrong, "imports from a lower layer to a higher one (see LAYERS):\n" + "\n".join(
        f"  {a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)}) at line {line}" for a, b, line in wrong)


def test_the_checker_sees_cycles_and_layers():
    """The helpers themselves: a cycle in a made-up graph is found with its path."""
    assert find_cycles([("a", "b", 1), ("b", "c", 2), ("c", "a", 3), ("c", "d", 4)]) == [["a", "b", "c", "a"]]
    assert find_cycles([("a", "b", 1), ("b", "c", 2)]) == []
    assert layer_of("marginface") == 0 and layer_of("marginface.errors") == 0
    assert layer_of("marginface.config") < layer_of("marginface.heads.margins.arcface") == layer_of("marginface.models")
    assert layer_of("marginface.cli") == len(LAYERS) - 1
    # imports inside functions count (the CLI imports its commands' modules on use)
    pairs = {(a, b) for a, b, _ in import_edges()}
    assert ("marginface.cli.export", "marginface.deploy.export") in pairs
    assert ("marginface.heads.margins", "marginface.heads.margins.arcface") in pairs


def deferred_imports() -> list[tuple[str, int, str]]:
    """(file, line, source) of each import of a marginface module inside a function or class body
    that carries no ``# deferred: <why>`` comment (on its line, on the line above it, or once at
    column 0 of the file, which covers the whole file)."""
    modules = module_files()
    out = []
    for mod, (path, _) in modules.items():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        if any(line.startswith("# deferred:") for line in lines):
            continue
        for outer in ast.walk(ast.parse(text)):
            if not isinstance(outer, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            for node in ast.walk(outer):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                elif isinstance(node, ast.ImportFrom):
                    names = ["marginface"]  # relative: always ours
                else:
                    continue
                if not any(n == "marginface" or n.startswith("marginface.") for n in names):
                    continue
                here, above = lines[node.lineno - 1], lines[node.lineno - 2] if node.lineno > 1 else ""
                if "# deferred:" not in here and not above.strip().startswith("# deferred:"):
                    out.append((str(path.relative_to(ROOT)), node.lineno, here.strip()))
    return sorted(set(out))


def test_imports_between_our_modules_are_at_the_top():
    """Optional third-party packages (onnx, onnxruntime, torchao, matplotlib, faiss, tensorboard)
    may be imported where they are used; our own modules are imported at the top of the file
    unless a ``# deferred: <why>`` comment says why not."""
    found = deferred_imports()
    assert not found, "imports of marginface modules inside functions without a '# deferred: <why>' comment:\n" + \
        "\n".join(f"  {f}:{line}: {src}" for f, line, src in found)
