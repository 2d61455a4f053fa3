"""The comparison's report: ``results.md`` (methods as rows, the best of each column in bold) and
``metrics.png`` (the five metrics per method, grouped bars) — for a lifelong run ``results.md`` with the
mean per method and N and ``lifelong.png`` (mean, latency and memory against N) — and the reading of
what the comparison wrote: `read_results` (``results.json``), `check_method` and `check_sequential` (one
method's results, ``methods/<name>.json``), which check every field the report reads and raise
`ArtifactError` naming the file and field."""
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
# The wall-time budgets of a whole comparison on 2 CPU cores, in minutes (benchmark issue: single edit;
# lifelong issue: EDITS=1,10,100,1000 on BLIP-2), and of one learned baseline's prepare, in seconds.
BUDGET_MIN = {False: {"blip2": 45, "llava": 60, "minigpt4": 60}, True: {"blip2": 60}}
PREPARE_BUDGET_S = 600
EXTENSION = {"visedit_gated": "ours: VisEdit + scene gate + target role + scene router + output write"
                              " + question gate on E-VQA",
             "lookup": "control, not an editor", "none": "unedited model"}


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
    require(data, "overrides", dict, where, default={})
    require(data, "latency_protocol", str, where, default=None)
    require(data, "latency_jobs", int, where, default=None)
    for key in ("loc_same_image", "prepare_s", "edit_ms", "inference_overhead", "peak_mem_mb", "wall_s"):
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
        earlier = ("" if method.get("latency_protocol") else "†") + _beside(method)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {method.get('prepare_s')} | {method.get('edit_ms')} | "
                     f"{method.get('inference_overhead')}{earlier} | {method.get('peak_mem_mb')} |")
    protocols = {m.get("latency_protocol") for m in methods.values()}
    lines += ["", "\\* T-Loc is 100 by construction: the method cannot change a text-only input.",
              f"Metrics: {results.get('protocol')}; mean = the five metrics' mean; same-image loc and novel Rel "
              "are beside the five, not in the mean; overhead = the forward of 4 test inputs with one edit "
              "applied over unedited" + _protocols(protocols) + "."]
    if None in protocols:
        lines.append("† overhead by the first protocol: the median of 5 forwards against the unedited one "
                     "before the edit.")
    lines += _beside_note(methods.values(), False) + _wall_time(results, lifelong=False) + _overrides(methods)
    lines.append("")
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


def check_sequential(data: Any, where: str) -> dict:
    """One method's results of a lifelong comparison checked for what the report reads: ``lifelong``,
    and for a lifelong method ``sequential`` → N → the five metrics and ``mean`` (required), the optional
    columns (numbers or null). Returns ``data``."""
    if require(data, "lifelong", bool, where):
        for n, scores in require(data, "sequential", dict, where).items():
            entry = f"{where}, in 'sequential.{n}'"
            if not n.isdigit():
                raise ArtifactError(f"{where}, in 'sequential': key {n!r} is not a number of live edits")
            if not isinstance(scores, dict):
                raise ArtifactError(f"{entry}: expected an object, found {type(scores).__name__}")
            for key in (*METRICS, "mean"):
                _score(scores, key, entry, default=...)
            for key in ("loc_same_image", "edit_ms", "latency_ratio", "rss_growth_mb"):
                _score(scores, key, entry)
    require(data, "t_loc_by_construction", bool, where, default=False)
    require(data, "overrides", dict, where, default={})
    require(data, "latency_protocol", str, where, default=None)
    require(data, "latency_jobs", int, where, default=None)
    _score(data, "prepare_s", where)
    _score(data, "wall_s", where)
    return data


def _lifelong_rows(results: dict):
    for name, per_n in results["sequential"].items():
        for n, scores in sorted(per_n.items(), key=lambda item: int(item[0])):
            yield name, int(n), scores


def _scene_sharing(images: dict) -> str:
    """The test split's scene statistics (`editing.command.lifelong.image_sharing`), when it has them."""
    if "distinct_scenes" not in images:
        return ""
    objects = ", ".join(f"{k}: {v}" for k, v in images["objects_per_edit"].items())
    return (f"; by scene (the (shape, colour) objects an image rephrase keeps): {images['distinct_scenes']} distinct, "
            f"{images['edits_sharing_a_scene']} edits share theirs with another, {images['m_loc_on_an_edit_scene']} "
            f"M-Loc images show an edit's scene; edits by object count {objects}")


def _beside(method: dict) -> str:
    return "‡" if (method.get("latency_jobs") or 1) > 1 else ""


def _beside_note(methods, lifelong: bool) -> list[str]:
    jobs = max([m.get("latency_jobs") or 1 for m in methods], default=1)
    if jobs == 1:
        return []
    again = ("`visedit compare --edits … --latency-only` measures the latency alone" if lifelong
             else "a run with `--jobs 1` times the methods alone")
    return [f"‡ timed while up to {jobs} methods ran side by side (`--jobs`): latency and edit time read "
            f"higher than alone; {again}."]


def _wall_time(results: dict, lifelong: bool) -> list[str]:
    """The comparison's wall time against its budget (`BUDGET_MIN`): the methods' own processes summed,
    from their ``wall_s``, or, when every method ran in one invocation several at a time (``--jobs``), that
    invocation's time; a method that reused a fit in OUT/work counts its loading, not its training.
    Learned baselines whose prepare ran past `PREPARE_BUDGET_S` are named."""
    methods = results["methods"]
    timed = {n: m["wall_s"] for n, m in methods.items() if m.get("wall_s") is not None}
    budget = BUDGET_MIN[lifelong].get(results["backbone"])
    lines = []
    run = results.get("run") or {}
    side_by_side = run.get("jobs", 1) > 1 and set(run.get("methods") or ()) == set(methods)
    if side_by_side:  # every method ran in this invocation, ``jobs`` at a time: its own wall time is the total
        text = (f"Wall time: {run['wall_s'] / 60:.1f} min for {len(methods)} methods run {run['jobs']} side by side "
                f"(`--jobs {run['jobs']}`, {run['threads']} torch thread{'s' if run['threads'] > 1 else ''} each; "
                f"their processes sum to {sum(timed.values()) / 60:.1f} min; each method's edit time was "
                "measured beside another's)")
    elif timed:
        text = (f"Wall time: {sum(timed.values()) / 60:.1f} min for {len(timed)} method"
                f"{'s' if len(timed) > 1 else ''} (each method's process: loading, prepare or a reused fit, "
                "evaluation)")
    if side_by_side or timed:
        if budget is not None:
            fresh = " (from fresh fits)" if lifelong else ""
            text += f"; budget {budget} min on 2 CPU cores for every method{fresh}"
        untimed = sorted(set(methods) - set(timed))
        if untimed and not side_by_side:
            text += f"; not recorded for {', '.join(untimed)} (run before the wall time was kept)"
        lines.append(text + ".")
    for again in results.get("rescored") or ():
        jobs = f"{again['jobs']} job{'s' if again['jobs'] > 1 else ''}"
        lines.append(f"Scored again later by another invocation ({jobs}, {again['wall_s'] / 60:.1f} min): "
                     f"{', '.join(again['methods'])}; "
                     f"{'those rows are' if len(again['methods']) > 1 else 'that row is'} its, not the run's above.")
    over = [f"{n} {m['prepare_s'] / 60:.1f} min" for n, m in methods.items()
            if n not in ("visedit", "visedit_gated") and (m.get("prepare_s") or 0) > PREPARE_BUDGET_S]
    if over:
        lines.append(f"Prepare over the {PREPARE_BUDGET_S // 60}-minute budget of a learned baseline: "
                     + ", ".join(over) + ".")
    return lines


def _overrides(methods: dict) -> list[str]:
    """The hyperparameters a run changed from the config files (``--set``), as one line; none when none."""
    changed = [f"{name}.{key}={value}" for name, method in methods.items()
               for key, value in (method.get("overrides") or {}).items()]
    return ["Changed from the config files (`--set`): " + ", ".join(changed) + "."] if changed else []


def _protocols(protocols: set) -> str:
    """The latency protocols recorded, as ' (first; second)'; empty when none is (older results only)."""
    named = sorted(p for p in protocols if p)
    return f" ({'; '.join(named)})" if named else ""


def lifelong_markdown(results: dict) -> str:
    """The lifelong comparison: the five-metric mean per method and N (the best of each N in bold), then
    every metric, same-image locality, novel Rel, edit time, latency and memory per method and N."""
    edits = results["edits"]
    means = {name: {int(n): s["mean"] for n, s in per_n.items()} for name, per_n in results["sequential"].items()}
    best = {n: max((m[n] for name, m in means.items() if name != "none" and n in m), default=None) for n in edits}
    images = results["images"]
    roles = results["roles"]
    lines = [f"# Lifelong editing on {results['backbone']}, E-{'VQA' if results['task'] == 'vqa' else 'IC'} "
             f"({results['n_test']} test edits, N live at once)", "",
             "Test: " + ", ".join(f"{k}={v}" for k, v in roles["test"].items()) + f"; {images['distinct_images']} "
             f"distinct images, {images['edits_sharing_an_image']} edits share their image with another "
             f"(at most {images['most_edits_on_one_image']} on one)" + _scene_sharing(images)
             + ". Train / dev as the single-edit comparison.", "",
             "## Five-metric mean against N", "",
             "| method | " + " | ".join(f"N={n}" for n in edits) + " |", "|---|" + "---:|" * len(edits)]
    for name, row in means.items():
        cells = []
        for n in edits:
            value = row.get(n)
            text = "–" if value is None else f"{value:.1f}"
            cells.append(f"**{text}**" if value is not None and value == best[n] and name != "none" else text)
        label = name + (f" ({EXTENSION[name]})" if name in EXTENSION else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if results.get("skipped"):
        lines += ["", "Not run (hold one edit at a time): " + ", ".join(results["skipped"]) + "."]
    columns = [*METRICS, "mean", "loc_same_image", "novel_rel"]
    lines += ["", "## Every metric", "",
              "| method | N | " + " | ".join(LABELS[c] for c in columns) + " | edit ms | latency × | RSS growth MiB |",
              "|---|---:|" + "---:|" * (len(columns) + 3)]
    for name, n, scores in _lifelong_rows(results):
        values = _row_values(scores)
        cells = ["–" if values[c] is None else f"{values[c]:.1f}" for c in columns]
        if results["methods"].get(name, {}).get("t_loc_by_construction"):
            cells[METRICS.index("t_loc")] += "\\*"
        method = results["methods"].get(name, {})
        earlier = ("" if method.get("latency_protocol") else "†") + _beside(method)
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + f" | {scores.get('edit_ms')} | "
                     f"{scores.get('latency_ratio')}{earlier} | {scores.get('rss_growth_mb')} |")
    protocols = {m.get("latency_protocol") for m in results["methods"].values() if m.get("lifelong")}
    lines += ["", "\\* T-Loc is 100 by construction: the method cannot change a text-only input.",
              f"Metrics: {results.get('protocol')}, every edit of a chunk scored with all N live (LiveEdit's "
              "protocol); latency × = the forward of the first min(4, N) edit prompts with N live over unedited"
              + _protocols(protocols) + "; RSS growth = resident memory after N edits minus before (noisy below "
              "a few MiB)."]
    if None in protocols:
        lines.append("† latency by the first protocol: the median of 11 forwards of one edit prompt, encoding "
                     "included — noisy (the unedited model read 0.75–1.56× itself); `visedit compare --edits … "
                     "--latency-only` measures it again.")
    lifelong = [m for m in results["methods"].values() if m.get("lifelong")]
    lines += _beside_note(lifelong, True) + _wall_time(results, lifelong=True) + _overrides(results["methods"])
    again = results.get("latency_run")
    if again:
        lines.append(f"Latency measured again alone for {', '.join(again['methods'])} (`--latency-only`, "
                     f"{again['wall_s'] / 60:.1f} min), their scores kept.")
    lines.append("")
    return "\n".join(lines)


def plot_lifelong(results: dict, path: Path) -> Path:
    """Three panels against N (log axis), one line per method: the five-metric mean, the latency ratio, the
    resident-memory growth."""
    panels = (("mean", "five-metric mean (%)"), ("latency_ratio", "forward with N live / unedited"),
              ("rss_growth_mb", "RSS growth with N live (MiB)"))
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (key, label) in zip(axes, panels):
        for name, per_n in results["sequential"].items():
            points = sorted((int(n), s.get(key)) for n, s in per_n.items() if s.get(key) is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("edits live at once (N)")
        ax.set_ylabel(label)
    axes[0].set_ylim(0, 105)
    if results["sequential"]:
        axes[0].legend(fontsize=7, frameon=False)
    figure.suptitle(f"{results['backbone']} E-{'VQA' if results['task'] == 'vqa' else 'IC'}: lifelong editing, "
                    f"{results['n_test']} test edits")
    figure.tight_layout()
    atomic_savefig(figure, path)
    plt.close(figure)
    return path
