"""The comparison's report: ``results.md`` (methods as rows, the best of each column in bold) and
``metrics.png`` (the five metrics per method, grouped bars), and the reading of what the comparison wrote:
`read_results` (``results.json``) and `check_method` (one method's results, ``methods/<name>.json``), which
check every field the report reads and raise `ArtifactError` naming the file and field."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from attrib.errors import ArtifactError
from attrib.io import atomic_savefig, read_json, require
from editing.command.report import METRICS

LABELS = {"rel": "Rel", "t_gen": "T-Gen", "m_gen": "M-Gen", "t_loc": "T-Loc", "m_loc": "M-Loc", "mean": "mean",
          "loc_same_image": "same-image loc", "novel_rel": "novel Rel"}
EXTENSION = {"visedit_gated": "ours: VisEdit + scene gate + target role", "lookup": "control, not an editor",
             "none": "unedited model"}


def _score(data: dict, key: str, where: str, default: Any = None) -> float | None:
    """A score field: a finite number or null (``default`` when absent; ``...``: required)."""
    value = require(data, key, (float, type(None)), where, default=default)
    if value is not None and not math.isfinite(value):
        raise ArtifactError(f"{where}, field {key!r}: {value}; expected a finite number")
    return value


def check_method(data: Any, where: str) -> dict:
    """One method's results checked for what the report reads: the five metrics, ``mean`` and
    ``protocol`` (required), the optional columns (numbers or null), ``targets.novel.rel``; ``where``
    names the file (and entry). Returns ``data``."""
    for key in (*METRICS, "mean"):
        _score(data, key, where, default=...)
    require(data, "protocol", str, where)
    require(data, "t_loc_by_construction", bool, where, default=False)
    for key in ("loc_same_image", "prepare_s", "edit_ms", "inference_overhead", "peak_mem_mb"):
        _score(data, key, where)
    targets = require(data, "targets", (dict, type(None)), where, default=None) or {}
    novel = require(targets, "novel", (dict, type(None)), f"{where}, in 'targets'", default=None) or {}
    _score(novel, "rel", f"{where}, in 'targets.novel'")
    return data


def read_results(path: str | Path) -> dict:
    """A comparison's ``results.json`` (what `compare_markdown` and `plot_metrics` take), checked:
    backbone, task, n_test, the three roles and every method's results (`check_method`)."""
    data = read_json(path, "comparison results file (results.json)")
    where = str(path)
    require(data, "backbone", str, where)
    require(data, "task", str, where)
    require(data, "n_test", int, where)
    require(data, "protocol", (str, type(None)), where, default=None)
    roles = require(data, "roles", dict, where)
    for role in ("train", "dev", "test"):
        require(roles, role, dict, f"{where}, in 'roles'")
    for name, method in require(data, "methods", dict, where).items():
        check_method(method, f"{where}, in 'methods.{name}'")
    return data


def _row_values(method: dict) -> dict:
    targets = method.get("targets") or {}
    return {**{k: method.get(k) for k in (*METRICS, "mean", "loc_same_image")},
            "novel_rel": (targets.get("novel") or {}).get("rel")}


def compare_markdown(results: dict) -> str:
    """Methods as rows (see the module docstring); ``*``: T-Loc is 100 by construction."""
    methods = results["methods"]
    columns = [*METRICS, "mean", "loc_same_image", "novel_rel"]
    values = {name: _row_values(m) for name, m in methods.items()}
    # "none" is the floor, not a contender: it is left out when the best of a column is picked.
    best = {c: max((v[c] for n, v in values.items() if n != "none" and v[c] is not None), default=None)
            for c in columns}
    roles = results["roles"]
    lines = [f"# Editing methods on {results['backbone']}, E-{'VQA' if results['task'] == 'vqa' else 'IC'} "
             f"({results['n_test']} test edits)", "",
             "Test: " + ", ".join(f"{k}={v}" for k, v in roles["test"].items()) + "; train: "
             + ", ".join(f"{k}={v}" for k, v in roles["train"].items()) + "; dev: "
             + ", ".join(f"{k}={v}" for k, v in roles["dev"].items()) + ".", "",
             "| method | " + " | ".join(LABELS[c] for c in columns) + " | prepare s | edit ms | overhead | peak MB |",
             "|---|" + "---:|" * (len(columns) + 4)]
    for name, method in methods.items():
        cells = []
        for column in columns:
            value = values[name][column]
            text = "–" if value is None else f"{value:.1f}"
            if value is not None and value == best[column] and name != "none":
                text = f"**{text}**"
            if column == "t_loc" and method.get("t_loc_by_construction"):
                text += "\\*"
            cells.append(text)
        label = name + (f" ({EXTENSION[name]})" if name in EXTENSION else "")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {method.get('prepare_s')} | {method.get('edit_ms')} | "
                     f"{method.get('inference_overhead')} | {method.get('peak_mem_mb')} |")
    lines += ["", "\\* T-Loc is 100 by construction: the method cannot change a text-only input.",
              f"Metrics: {results.get('protocol')}; mean = the five metrics' mean; same-image loc and novel Rel "
              "are beside the five, not in the mean.", ""]
    shortened = [f"{n}: {m['prepare']['shortened']}" for n, m in methods.items()
                 if isinstance(m.get("prepare"), dict) and m["prepare"].get("shortened")]
    if shortened:
        lines += ["Shortened training: " + "; ".join(shortened) + ".", ""]
    return "\n".join(lines)


def plot_metrics(results: dict, path: Path) -> Path:
    """Grouped bars: per method, the five metrics."""
    methods = results["methods"]
    names = list(methods)
    figure, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names)), 3.6))
    width = 0.8 / len(METRICS)
    x = np.arange(len(names))
    for k, metric in enumerate(METRICS):
        heights = [methods[n].get(metric) or 0.0 for n in names]
        ax.bar(x + (k - (len(METRICS) - 1) / 2) * width, heights, width, label=LABELS[metric])
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    ax.set_title(f"{results['backbone']} E-{'VQA' if results['task'] == 'vqa' else 'IC'}: "
                 f"{results['n_test']} test edits")
    ax.legend(ncol=5, fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    figure.tight_layout()
    atomic_savefig(figure, path)
    plt.close(figure)
    return path
