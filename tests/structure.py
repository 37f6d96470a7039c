"""Draw the house: which part of cogvx imports which, from the code's own imports (the same reading as
tests/test_architecture.py). Run ``python -P tests/structure.py`` (``--mermaid`` for a Mermaid graph that
GitHub renders); the README's Layout section is checked against the parts it lists."""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script with -P: find test_architecture
from test_architecture import _imports, _modules  # noqa: E402

# The parts of the house, most specific first: a module belongs to the first prefix it starts with.
PARTS = ["cogvx.engine.cli", "cogvx.engine.pipelines", "cogvx.engine.dev", "cogvx.engine.loading",
         "cogvx.engine.quantizing", "cogvx.engine.parallel", "cogvx.engine.runtime", "cogvx.engine.models",
         "cogvx.engine.io", "cogvx.engine", "cogvx.kernels", "cogvx.quantize"]


def part_of(module: str) -> str:
    return next(p for p in PARTS if module == p or module.startswith(p + "."))


def arrows() -> dict[str, set[str]]:
    """part -> the parts it imports (itself left out)."""
    out: dict[str, set[str]] = defaultdict(set)
    for name, path, pkg in _modules():
        src = part_of(name)
        out.setdefault(src, set())
        for mod, _, _ in _imports(name, path, pkg):
            dst = part_of(mod)
            if dst != src:
                out[src].add(dst)
    return out


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each part's floor: one above the highest part it imports (nothing imported: floor 0)."""
    memo: dict[str, int] = {}

    def floor(p: str) -> int:
        if p not in memo:
            memo[p] = 0
            memo[p] = 1 + max((floor(d) for d in graph.get(p, ())), default=-1)
        return memo[p]

    return {p: floor(p) for p in graph}


def main(argv: list[str]) -> int:
    graph = arrows()
    level = floors(graph)
    short = {p: p.removeprefix("cogvx.") for p in graph}
    if "--mermaid" in argv:
        print("graph TD")
        for src in sorted(graph, key=lambda p: -level[p]):
            for dst in sorted(graph[src]):
                print(f"    {short[src].replace('.', '_')}[{short[src]}] --> {short[dst].replace('.', '_')}[{short[dst]}]")
        return 0
    for f in sorted(set(level.values()), reverse=True):
        for p in sorted(q for q in graph if level[q] == f):
            uses = ", ".join(sorted(short[d] for d in graph[p])) or "-"
            print(f"floor {f}  {short[p]:<22} -> {uses}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
