"""How deep and how tangled loracast's imports are: modules, import cycles, and import layers.

    python scripts/import_layers.py                      # the package under src/
    python scripts/import_layers.py --src /tmp/old/src   # another checkout, e.g. an old commit:
    git archive 4d1bd75 src | tar -x -C /tmp/old

The import graph is grimp's (the library import-linter uses), TYPE_CHECKING imports included,
since they bind modules together for a reader as much as any other. A cycle is a group of two or
more modules that import each other, directly or through others (a strongly connected
component). The layer count is the number of modules on the longest chain of imports, a cycle
counted as one module: the depth a reader has to descend to reach the bottom.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def strongly_connected(nodes: set[str], edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative: the strongly connected components of the graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    counter = 0
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def longest_chain(components: list[set[str]], edges: dict[str, set[str]]) -> list[str]:
    """The longest import chain through the graph of components (each cycle one step)."""
    owner = {module: i for i, component in enumerate(components) for module in component}
    # Tarjan emits components in reverse topological order: each one's imports come before it
    depth: dict[int, tuple[int, int | None]] = {}
    for i, component in enumerate(components):
        below = {owner[t] for m in component for t in edges[m]} - {i}
        best = max(below, key=lambda j: depth[j][0], default=None)
        depth[i] = (1 + (depth[best][0] if best is not None else 0), best)
    step: int | None = max(depth, key=lambda i: depth[i][0])
    chain = []
    while step is not None:
        chain.append(" <-> ".join(sorted(components[step])))
        step = depth[step][1]
    return chain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="folder holding the loracast package")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.src.resolve()))  # ahead of any installed loracast
    import grimp

    graph = grimp.build_graph("loracast")
    nodes = set(graph.modules)
    edges = {m: graph.find_modules_directly_imported_by(m) & nodes for m in nodes}
    components = strongly_connected(nodes, edges)
    cycles = [sorted(c) for c in components if len(c) > 1]
    chain = longest_chain(components, edges)
    imports = sum(len(targets) for targets in edges.values())
    print(f"loracast in {args.src}: {len(nodes)} modules, {imports} imports between them")
    print(f"import cycles: {len(cycles)}")
    for cycle in cycles:
        print("  " + " <-> ".join(cycle))
    print(f"import layers (modules on the longest import chain, a cycle counted once): {len(chain)}")
    for module in chain:
        print("  " + module)
    return 0


if __name__ == "__main__":
    sys.exit(main())
