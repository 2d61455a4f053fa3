"""No pickle anywhere: the source of every package is scanned for what could unpickle a file or run code
that came with a model.

Read with `ast` (calls, not text: a message that mentions ``torch.save`` is no call), names resolved
through the module's imports (``import torch as t; t.load(...)`` is ``torch.load``). Refused:
``pickle``-family ``load`` / ``loads`` / ``Unpickler``; ``torch.load`` without ``weights_only=True``;
``torch.save`` (checkpoints are safetensors + JSON); ``trust_remote_code``, ``allow_pickle`` given
anything but ``False``; ``use_safetensors=False``.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("attrib", "editing", "benchmarks", "visedit")
PICKLERS = ("pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve")
UNPICKLE = ("load", "loads", "Unpickler", "open")


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name → the dotted name it stands for, from every import of the module."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:  # "import a.b" binds a; "import a.b as c" binds c to a.b
                top = alias.name.split(".")[0]
                names[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``a.b.c`` of a call's function, its first name resolved through the imports; None when not a name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def _is(keyword: ast.keyword | None, value: bool) -> bool:
    return keyword is not None and isinstance(keyword.value, ast.Constant) and keyword.value.value is value


def findings(source: str, name: str = "<source>") -> list[str]:
    """Every refused use in ``source``, as "name:line: what"."""
    tree = ast.parse(source, name)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        call = _dotted(node.func, aliases) or ""
        keywords = {k.arg: k for k in node.keywords if k.arg}
        module, _, function = call.rpartition(".")
        problems = []
        if module.split(".")[0] in PICKLERS and function in UNPICKLE:
            problems.append(f"{call}() unpickles")
        if call == "torch.load" and not _is(keywords.get("weights_only"), True):
            problems.append("torch.load() without weights_only=True")
        if call == "torch.save":
            problems.append("torch.save() writes a pickle; use safetensors and JSON")
        for flag in ("trust_remote_code", "allow_pickle"):
            if flag in keywords and not _is(keywords[flag], False):
                problems.append(f"{flag} is not False")
        if _is(keywords.get("use_safetensors"), False):
            problems.append("use_safetensors=False")
        found += [f"{name}:{node.lineno}: {problem}" for problem in problems]
    return found


def test_the_packages_never_unpickle():
    files = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 50  # the scan sees the packages
    found = [f for path in files for f in findings(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == []


def test_the_scan_catches_each_refused_use():
    refused = {
        "import pickle\npickle.load(f)": "pickle.load() unpickles",
        "import pickle as p\np.loads(b)": "pickle.loads() unpickles",
        "from pickle import Unpickler\nUnpickler(f).load()": "pickle.Unpickler() unpickles",
        "import joblib\njoblib.load(path)": "joblib.load() unpickles",
        "import torch\ntorch.load(path)": "torch.load() without weights_only=True",
        "import torch\ntorch.load(path, weights_only=False)": "torch.load() without weights_only=True",
        "import torch as t\nt.load(path, weights_only=flag)": "torch.load() without weights_only=True",
        "from torch import load\nload(path)": "torch.load() without weights_only=True",
        "import torch\ntorch.save(state, path)": "torch.save() writes a pickle",
        "A.from_pretrained(p, trust_remote_code=True)": "trust_remote_code is not False",
        "A.from_pretrained(p, trust_remote_code=trust)": "trust_remote_code is not False",
        "import numpy as np\nnp.load(p, allow_pickle=True)": "allow_pickle is not False",
        "A.from_pretrained(p, use_safetensors=False)": "use_safetensors=False",
    }
    for source, problem in refused.items():
        assert [f.split(": ", 1)[1][:len(problem)] for f in findings(source)] == [problem], source
    allowed = ["import torch\ntorch.load(path, map_location='cpu', weights_only=True)",
               "import pickle\ntry:\n    x = 1\nexcept pickle.UnpicklingError:\n    pass",
               "raise ValueError('save it with torch.save({\"model\": sd}, path)')",
               "A.from_pretrained(p, trust_remote_code=False, use_safetensors=True)",
               "import json\njson.load(f)", "from safetensors.torch import load_file\nload_file(p)"]
    for source in allowed:
        assert findings(source) == [], source
