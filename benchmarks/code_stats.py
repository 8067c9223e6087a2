"""The shape of the code: lines, files, the longest functions, imports of protege's own modules placed inside
functions, and import cycles between modules (counting every import, top-level or inside a function).

    python benchmarks/code_stats.py              # this tree
    python benchmarks/code_stats.py --src OTHER/src/protege

Prints one JSON object (the figures quoted in issue notes come from here).
"""
from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(node: ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The protege modules an import statement names (a `from .x import y` may name the module x.y)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{a.name}" for a in node.names]


def analyse(src: Path) -> dict:
    files = sorted(src.rglob("*.py"))
    modules = {module_name(f, src): f for f in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    inside, functions, lines = [], [], 0
    for m, f in modules.items():
        text = f.read_text()
        lines += sum(1 for line in text.splitlines() if line.strip())
        tree = ast.parse(text)
        parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{f.relative_to(src.parent)}:{node.name}"))
            targets = []
            if isinstance(node, ast.ImportFrom):
                targets = [t for t in resolve(node, m, f.name == "__init__.py") if t in modules]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name in modules]
            if not targets:
                continue
            graph[m].update(t for t in targets if t != m)
            p = parents.get(node)
            while p is not None and not isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)):
                p = parents.get(p)
            if p is not None:
                inside.append(f"{f.relative_to(src.parent)}:{node.lineno}")
    functions.sort(reverse=True)
    return {"files": len(files), "lines": lines, "longest_functions": [f"{n} lines: {w}" for n, w in functions[:5]],
            "functions_over_50_lines": sum(n > 50 for n, _ in functions),
            "own_imports_inside_functions": len(inside), "import_cycles": cycles(graph)}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), a package's __init__ re-exports excluded."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    # a package imports its own submodules to re-export them; that edge is not a design cycle
    edges = {m: {t for t in ts if not (t.startswith(m + ".") or m.startswith(t + ".") and "." not in m[len(t) + 1:])}
             for m, ts in graph.items()}

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=ROOT / "src" / "protege")
    print(json.dumps(analyse(ap.parse_args().src.resolve()), indent=2))


if __name__ == "__main__":
    main()
