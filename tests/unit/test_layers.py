"""The layout's rules (ARCHITECTURE.md): core packages form layers and import only those below
them, core never imports workers, ext/ imports nothing from core, and no module imports itself
back through a cycle."""
import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
# core packages, lowest first; a package may import its own modules and any lower layer
LAYERS = [{"base"}, {"http"}, {"messaging"}, {"runtime"}, {"state", "llm", "overload"}, {"cache", "events", "features"}, {"predict"},
          {"loadgen"}]  # the load generator uses base alone; nothing in core uses it
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def modules():
    """{dotted module name: set of tidegate modules it imports (anywhere in its body)}."""
    out = {}
    for top in ("core", "workers"):
        for path in (ROOT / top).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = "tidegate." + ".".join(parts)
            deps = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tidegate."):
                    deps.add(node.module)
                    deps.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
                elif isinstance(node, ast.Import):
                    deps.update(a.name for a in node.names if a.name.startswith("tidegate."))
            out[name] = deps
    return out


def test_core_packages_import_only_lower_layers_and_never_workers():
    bad = []
    for mod, deps in modules().items():
        parts = mod.split(".")
        if parts[1] != "core" or len(parts) < 3:
            continue
        own = parts[2]
        for dep in deps:
            d = dep.split(".")
            if d[1] == "workers":
                bad.append(f"{mod} -> {dep}")
            elif d[1] == "core" and len(d) > 2 and d[2] in RANK and own in RANK:
                if d[2] != own and RANK[d[2]] >= RANK[own]:
                    bad.append(f"{mod} -> {dep}")
    assert not bad, bad


def test_every_core_package_has_a_layer():
    pkgs = {p.name for p in (ROOT / "core").iterdir() if (p / "__init__.py").exists()}
    assert pkgs == set(RANK), pkgs ^ set(RANK)


def test_ext_is_a_leaf():
    for path in (ROOT / "ext").glob("*.pyx"):
        assert not re.search(r"^\s*(from|import|cimport)\s+tidegate\.", path.read_text(), re.M), path.name


def test_no_import_cycles():
    graph = modules()
    known = set(graph)
    edges = {m: {d for d in deps if d in known and d != m} for m, deps in graph.items()}
    state: dict = {}
    cycle: list = []

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for d in edges[m]:
            if state.get(d) == 1 and not _package_init(d, m):
                cycle.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    assert not cycle, cycle


def _package_init(dep: str, mod: str) -> bool:
    """A module imports its own package's __init__ on the way in: not a cycle of ours."""
    return mod.startswith(dep + ".")


def _error_lists(tree) -> list[int]:
    """Lines of list literals shaped like an ERR payload: [status, message, code, param]."""
    def status(n):
        return isinstance(n, ast.Constant) and type(n.value) is int and 100 <= n.value < 600

    def text(n):
        return isinstance(n, (ast.JoinedStr, ast.Name, ast.Call)) or isinstance(n, ast.Constant) and isinstance(n.value, str)
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.List) and len(node.elts) in (3, 4) and status(node.elts[0]) and text(node.elts[1])]


def test_error_payloads_are_built_only_in_protocol():
    """core/messaging/protocol.py is the one place that knows the error record's wire shape
    (Failure, failure(), error_event()); a list built by hand elsewhere drifts from it."""
    bad = []
    for top in ("core", "workers"):
        for path in (ROOT / top).rglob("*.py"):
            if path.relative_to(ROOT).as_posix() == "core/messaging/protocol.py":
                continue
            bad += [f"{path.relative_to(ROOT)}:{line}" for line in _error_lists(ast.parse(path.read_text()))]
    assert not bad, bad


def test_the_error_list_check_finds_one():
    tree = ast.parse('handler(ERR, [503, f"gone {x}", "worker_unavailable", None])\nok = [1, 2, 3]')
    assert _error_lists(tree) == [1]
