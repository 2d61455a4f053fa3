"""Every file the toolkit writes goes through `attrib.io`'s atomic writers (write, flush, rename), so a
run killed at any moment leaves the old file or the new one, never half of one.

The source is read with `ast`: a call that writes a file directly (``.write_text(``, ``.write_bytes(``,
``.savefig(``, ``save_file(``, ``json.dump(``, ``torch.save(``) is accepted only inside the writer passed to
``atomic_write`` (a lambda, or a function handed over by name) or inside a ``with atomic_folder(...)``
block (a folder built under a temporary name and renamed into place). `attrib/io.py` itself implements
the writers and is not scanned.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("attrib", "editing", "benchmarks", "visedit")
WRITERS = {"write_text", "write_bytes", "savefig", "save_file"}
ATOMIC = {"atomic_write", "atomic_folder"}
ALLOWED: dict[str, str] = {}  # "path:line" → why; empty: every write is atomic


def _name(node: ast.AST) -> str:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""


def _writes(call: ast.Call) -> bool:
    name, func = _name(call.func), call.func
    if name in WRITERS:
        return True
    module = _name(func.value) if isinstance(func, ast.Attribute) else ""
    return (module, name) in {("json", "dump"), ("torch", "save")}


def _covered(tree: ast.Module) -> set[int]:
    """ids of the nodes inside an atomic writer: the arguments of ``atomic_write(...)``, the body of a
    function passed to it by name, and the body of ``with atomic_folder(...)``."""
    inside: list[ast.AST] = []
    passed: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _name(node.func) in ATOMIC:
            inside += node.args + [keyword.value for keyword in node.keywords]
            passed |= {arg.id for arg in node.args if isinstance(arg, ast.Name)}
        if isinstance(node, ast.With) and any(isinstance(item.context_expr, ast.Call)
                                              and _name(item.context_expr.func) in ATOMIC for item in node.items):
            inside += node.body
    inside += [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name in passed]
    return {id(child) for node in inside for child in ast.walk(node)}


def non_atomic_writes() -> list[str]:
    """"path:line: code" of every direct file write outside an atomic writer."""
    found = []
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative == "attrib/io.py":
                continue
            source = path.read_text()
            tree = ast.parse(source, relative)
            covered = _covered(tree)
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and _writes(node) and id(node) not in covered:
                    found.append(f"{relative}:{node.lineno}: {ast.get_source_segment(source, node)}")
    return found


def test_the_scan_finds_a_direct_write_and_accepts_the_atomic_ones():
    tree = ast.parse("import json\n"
                     "path.write_text('x')\n"
                     "atomic_write(path, lambda tmp: fig.savefig(tmp))\n"
                     "def write(tmp):\n    json.dump(data, open(tmp, 'w'))\n"
                     "atomic_write(path, write)\n"
                     "with atomic_folder(out) as tmp:\n    save_file(tensors, tmp / 'a')\n"
                     "torch.save(obj, path)\n")
    covered = _covered(tree)
    lines = sorted(node.lineno for node in ast.walk(tree)
                   if isinstance(node, ast.Call) and _writes(node) and id(node) not in covered)
    assert lines == [2, 9]


def test_every_file_write_is_atomic():
    found = [line for line in non_atomic_writes() if line.split(": ", 1)[0] not in ALLOWED]
    assert not found, "write these through attrib.io (atomic_write & co.):\n" + "\n".join(found)
