#!/usr/bin/env python3
"""Checks the crates' structure, as the code's own imports show it. CI runs it (scripts/test.sh).

1. No import cycle between sibling modules: within every folder, its files and subfolders form an
   acyclic graph (a child naming its parent's items, or a parent its children's, is not a cycle).
2. `formats/` names nothing from `query/` or `service/`; `catalog/` and `storage/` nothing above them.
3. No source file over 500 lines, not counting its unit tests (`#[cfg(test)]` at the end), unless
   its module comment says why ("long because").

Paths are resolved from `use` trees and inline `crate::`/`super::` paths, following one level of
`pub use` re-exports, so `query::Layout` counts as the module that defines `Layout`.

    python3 scripts/check_structure.py          # exits 1 and lists what is wrong
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CRATES = {"server": ROOT / "server/src", "client": ROOT / "client/src", "artiflight": ROOT / "src"}
MAX_LINES = 500
# Layers that must not look up: folder -> folders it may not name.
FORBIDDEN = {
    ("formats",): {("query",), ("service",), ("registry",)},
    ("catalog",): {("query",), ("service",), ("registry",), ("formats",), ("storage",)},
    ("storage",): {("query",), ("service",), ("registry",), ("formats",), ("catalog",)},
    ("query",): {("service",)},
}

Module = tuple[str, ...]


def modules(src: Path) -> dict[Module, Path]:
    found = {}
    for path in sorted(src.rglob("*.rs")):
        parts = path.relative_to(src).with_suffix("").parts
        if parts[-1] in ("mod", "lib", "main"):
            parts = parts[:-1]
        found[tuple(parts)] = path
    return found


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'"(\\.|[^"\\])*"', '""', text)
    return re.sub(r"//[^\n]*", "", text)


def expand_use(tree: str) -> list[list[str]]:
    """`a::{b, c::{d as e, *}}` -> [[a, b], [a, c, d], [a, c, *]]."""
    tokens = re.findall(r"[A-Za-z_][A-Za-z0-9_]*|::|\{|\}|,|\*", tree)
    pos = 0

    def parse(prefix: list[str]) -> list[list[str]]:
        nonlocal pos
        paths, current = [], list(prefix)
        while pos < len(tokens):
            token = tokens[pos]
            pos += 1
            if token == "{":
                paths += parse(current)
                current = None
            elif token == ",":
                if current is not None and current != prefix:
                    paths.append(current)
                current = list(prefix)
            elif token == "}":
                break
            elif token == "as":
                pos += 1
            elif token != "::" and current is not None:
                current = current + [token]
        if current is not None and current != prefix:
            paths.append(current)
        return paths

    return parse([])


def references(module: Module, text: str, known: dict[Module, Path]) -> list[list[str]]:
    """Absolute paths (crate-relative, as lists) that a file names."""
    code = strip_comments(text)
    raw = []
    for match in re.finditer(r"\b(?:pub(?:\([a-z]+\))?\s+)?use\s+([^;]+);", code):
        raw += expand_use(match.group(1))
    for match in re.finditer(r"\b(?:crate|super)(?:::[A-Za-z_][A-Za-z0-9_]*)+", code):
        raw.append(match.group(0).split("::"))
    resolved = []
    for path in raw:
        base = list(module)
        if path[0] == "crate":
            resolved.append(path[1:])
        elif path[0] == "super":
            while path and path[0] == "super":
                base, path = base[:-1], path[1:]
            resolved.append(base + path)
        elif path[0] == "self":
            resolved.append(base + path[1:])
        elif tuple(base + path[:1]) in known:
            resolved.append(base + path)  # `use child::Item`
    return resolved


def owner(path: list[str], known: dict[Module, Path]) -> Module:
    for end in range(len(path), -1, -1):
        if tuple(path[:end]) in known:
            return tuple(path[:end])
    return ()


def check_crate(name: str, src: Path) -> list[str]:
    known = modules(src)
    texts = {m: p.read_text() for m, p in known.items()}
    # One level of re-exports: `use child::Item` in module m (public or not: its children see it)
    # makes m::Item live in m::child.
    reexport = {}
    for module, text in texts.items():
        for match in re.finditer(r"\b(?:pub(?:\([a-z]+\))?\s+)?use\s+([^;]+);", strip_comments(text)):
            for path in expand_use(match.group(1)):
                target = references(module, "use " + "::".join(path) + ";", known)
                if target and path[-1] != "*":
                    reexport[module + (path[-1],)] = owner(target[0], known)
    edges: dict[Module, set[Module]] = {m: set() for m in known}
    for module, text in texts.items():
        for path in references(module, text, known):
            target = owner(path, known)
            if target == module and len(path) > len(module):
                target = reexport.get(tuple(path[: len(module) + 1]), target)
            elif len(path) > len(target):
                target = reexport.get(tuple(path[: len(target) + 1]), target)
            if target != module:
                edges[module].add(target)

    problems = []
    # 1. Cycles among the children of each folder.
    for folder in sorted({m[:-1] for m in known if m}):
        children = sorted({m[len(folder)] for m in known if len(m) > len(folder) and m[: len(folder)] == folder})
        graph = {c: set() for c in children}
        for source, targets in edges.items():
            for target in targets:
                if len(source) > len(folder) and len(target) > len(folder) and source[: len(folder)] == folder == target[: len(folder)]:
                    a, b = source[len(folder)], target[len(folder)]
                    if a != b:
                        graph[a].add(b)
        for cycle in cycles(graph):
            where = "::".join(folder) or "crate root"
            problems.append(f"{name}: import cycle in {where} among {', '.join(cycle[:-1])}")
    # 2. Layers that look up.
    for source, targets in edges.items():
        for prefix, banned in FORBIDDEN.items():
            if source[: len(prefix)] != prefix:
                continue
            for target in targets:
                if any(target[: len(b)] == b for b in banned):
                    problems.append(f"{name}: {'::'.join(source)} names {'::'.join(target)}")
    # 3. Long files.
    for module, path in known.items():
        text = texts[module]
        lines = text[: text.find("\n#[cfg(test)]") % (len(text) + 1)].count("\n")
        header = "\n".join(line for line in texts[module].splitlines()[:40] if line.startswith("//!"))
        if lines > MAX_LINES and "long because" not in header.lower():
            problems.append(f"{path.relative_to(ROOT)}: {lines} lines and no reason at its top")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component) + [sorted(component)[0]])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def main() -> int:
    problems = [p for name, src in CRATES.items() for p in check_crate(name, src)]
    for problem in problems:
        print(problem)
    if problems:
        print(f"check_structure: {len(problems)} problem(s)")
        return 1
    print("check_structure: no import cycles, no layer looks up, no unexplained long file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
