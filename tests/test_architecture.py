"""Architecture rules of issue 18, read from the source with `ast` (nothing is imported):

- the import graph of `loratool/` has no cycles, counting imports inside functions too (a cycle held
  apart by a function-level import is still a cycle);
- outside `loratool/lora/`, no code asks which adapter-module class a module is: the module classes own
  their behaviour, so a new algorithm needs no edits in formats/, api/ or elsewhere.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "loratool"
ROOT = PACKAGE.parent
#: The adapter-module classes by name (old and new names alike); the test adds every class defined in
#: lora/algorithms/ or lora/module.py that derives from one of them.
MODULE_CLASS_ROOTS = {"LoraModule", "AlgorithmModule", "AdapterModule", "LoCon", "LoHa", "LoKr", "FullDiff",
                      "NormDiff"}
#: Builtins that ask for an object's class (`type(x) is C` compares are checked as well).
CLASS_QUESTIONS = {"isinstance", "issubclass"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@dataclass(frozen=True)
class Edge:
    target: str
    where: str  # file:line
    in_function: bool

    def __str__(self) -> str:
        return f"{self.target}  ({self.where}{', inside a function' if self.in_function else ''})"


def _nodes_with_scope(tree: ast.AST):
    """(node, inside a function) for every node."""
    stack = [(tree, False)]
    while stack:
        node, in_function = stack.pop()
        yield node, in_function
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        stack.extend((child, inner) for child in ast.iter_child_nodes(node))


def import_edges(name: str, path: Path, known: set[str], root: Path = ROOT) -> list[Edge]:
    """Every import of another loratool module, at any depth (inside functions and `if` blocks too):
    `import a.b`, and `from a import b` (an edge to the submodule `a.b` when there is one, else to `a`),
    relative imports resolved against the importing module's package. The parent packages that Python
    imports first are not edges: they never need a submodule's own importer to have finished."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = []
    for node, in_function in _nodes_with_scope(ast.parse(path.read_text(), str(path))):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from a import b`: an edge to the submodule a.b when there is one, else to a (whose body defines b)
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                       for alias in node.names]
        for target in targets:
            if target in known and target != name:
                edges.append(Edge(target, where, in_function))
    return edges


def import_graph() -> dict[str, list[Edge]]:
    found = modules()
    return {name: import_edges(name, path, set(found)) for name, path in found.items()}


def strongly_connected(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """Tarjan's components with more than one module (self-imports are not edges here)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for edge in graph[node]:
            if edge.target not in index:
                visit(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in on_stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def one_cycle(graph: dict[str, list[Edge]], component: list[str]) -> list[tuple[str, Edge]]:
    """A shortest cycle through the component's first module, as (module, its import of the next)."""
    members = set(component)
    start = component[0]
    paths: dict[str, list[tuple[str, Edge]]] = {start: []}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for edge in graph[node]:
                if edge.target == start:
                    return paths[node] + [(node, edge)]
                if edge.target in members and edge.target not in paths:
                    paths[edge.target] = paths[node] + [(node, edge)]
                    following.append(edge.target)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100, "the graph looks too small to be real"
    cycles = []
    for component in strongly_connected(graph):
        steps = "\n".join(f"    {module} imports {edge}" for module, edge in one_cycle(graph, component))
        cycles.append(f"  {' <-> '.join(component)}:\n{steps}")
    assert not cycles, "import cycles in loratool/ (function-level imports count):\n" + "\n".join(cycles)


def test_graph_resolves_relative_and_function_level_imports(tmp_path):
    """The graph builder itself: `from . import x` of a submodule, `from ..y import z`, and imports
    inside functions are all edges."""
    package = tmp_path / "loratool" / "sub"
    package.mkdir(parents=True)
    path = package / "a.py"
    path.write_text("from . import b, CONSTANT\nfrom ..c import thing\n\ndef f():\n    from .d import e\n"
                    "    import loratool.g\n")
    known = {"loratool", "loratool.sub", "loratool.sub.a", "loratool.sub.b", "loratool.c", "loratool.sub.d",
             "loratool.g"}
    edges = import_edges("loratool.sub.a", path, known, root=tmp_path)
    assert {(e.target, e.in_function) for e in edges} == {
        ("loratool.sub", False), ("loratool.sub.b", False), ("loratool.c", False), ("loratool.sub.d", True),
        ("loratool.g", True)}


def module_classes() -> set[str]:
    """The adapter-module classes: the known roots, and every class in lora/algorithms/ or
    lora/module.py whose bases lead to one (so `Adapter`, enums and helpers are not counted)."""
    files = [*sorted((PACKAGE / "lora" / "algorithms").rglob("*.py")), PACKAGE / "lora" / "module.py"]
    bases: dict[str, set[str]] = {}
    for path in files:
        if not path.is_file():
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = {_last_name(b) for b in node.bases} - {None}
    found = set(MODULE_CLASS_ROOTS)
    while True:
        more = {name for name, parents in bases.items() if parents & found} - found
        if not more:
            return found
        found |= more


def _last_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript):
        return _last_name(node.value)
    return None


def _class_names(node: ast.AST) -> set[str]:
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*map(_class_names, node.elts)) if node.elts else set()
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):  # isinstance(x, A | B)
        return _class_names(node.left) | _class_names(node.right)
    name = _last_name(node)
    return {name} if name else set()


def class_questions(path: Path, classes: set[str], root: Path = ROOT) -> list[str]:
    """`isinstance(x, C)`, `issubclass(t, C)` and `type(x) is C` (or ==, is not, !=) naming a class of `classes`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        named: set[str] = set()
        if isinstance(node, ast.Call) and _last_name(node.func) in CLASS_QUESTIONS and len(node.args) == 2:
            named = _class_names(node.args[1])
        elif isinstance(node, ast.Compare) and all(isinstance(op, (ast.Is, ast.IsNot, ast.Eq, ast.NotEq))
                                                  for op in node.ops):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Call) and _last_name(s.func) == "type" for s in sides):
                named = set().union(*(_class_names(s) for s in sides if not isinstance(s, ast.Call)))
        if named & classes:
            found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_code_outside_lora_asks_which_module_class():
    classes = module_classes()
    assert {"LoraModule", "LoCon", "LoHa", "LoKr"} <= classes
    lora = PACKAGE / "lora"
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if lora not in path.parents:
            found += class_questions(path, classes)
    assert not found, ("outside loratool/lora/, code asks which adapter-module class a module is (give the "
                       "module classes a method or property instead):\n  " + "\n  ".join(found))


def test_class_question_finder(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("isinstance(m, LoraModule)\nisinstance(m, (int, algorithms.LoHa))\nisinstance(m, Adapter)\n"
                    "type(m) is LoKr\ntype(m).__name__ == 'LoKr'\nissubclass(t, str)\n")
    found = class_questions(path, {"LoraModule", "LoHa", "LoKr"}, root=tmp_path)
    assert [line.split(":")[1] for line in found] == ["1", "2", "4"]
