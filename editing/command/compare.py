"""The comparison behind ``visedit compare`` / ``make compare``: every editing method, one harness, a test
split no method or choice was tuned on.

    results = run_compare(CompareOptions(backbone="blip2", test_seed=2))
    # runs/compare/blip2-vqa/results.json, results.md, metrics.png, methods/<name>.json, attribution/

Data roles (recorded in ``results.json`` under ``roles``):
- world: *train* = the development world's training split (``runs/world``, seed 1), *dev* = its eval
  split, *test* = the eval split of the world of ``test_seed`` (written under ``runs/world-<seed>`` when
  missing), so a new seed is a fresh test set;
- real MMEdit files: *train* = ``train`` minus *dev*, *dev* = ``dev_n`` records of ``train`` drawn with
  ``seed``, *test* = ``eval``.
Placement (attribution and patching ceiling) reads training records only. Learned methods fit on train
(``Editor.prepare``); dev is for choices (lookup's threshold, curves); test is only evaluated.

With ``edits`` (``--edits 1,10,100,1000``) the run is the lifelong comparison (`editing.command.lifelong`):
every method whose edits accumulate is scored with N edits live at once, for each N, on max(N) test
edits with distinct scenes (`editing.command.lifelong.distinct_scenes`), in
``runs/compare/<backbone>-<task>-lifelong``, reusing the single-edit run's fits.

Each method runs in its own process (spawned; ``jobs`` of them at once, `_run_children`), so its peak
memory is its own and a hook it leaves behind cannot reach the next; its result is written to
``methods/<name>.json`` at once, and a run started again skips the methods already there (a killed
comparison resumes at the next method; the kernel kills the method's process with it, so nothing writes
into the folder after its lock is gone). Those files are read back checked (`compare_report.check_method`),
all of them before any method runs: a malformed one stops the run with an `ArtifactError` naming it (delete
it to run that method again) rather than being rerun silently, since files written atomically are never
left half-written by a kill; one that does not read back was changed by something else, and a result
silently replaced could mix two versions in one table.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing
import multiprocessing.connection
import os
import resource
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attrib.data import DataError, EditRecord, load_records
from attrib.io import OutputLock, atomic_write_text, read_json, remove_partial_writes, stored_path
from attrib.parallel import barrier, launched, main_first, processes
from editing.command.lifelong import POOL, distinct_scenes, image_sharing
from editing.command.report import METRICS

DEV_WORLD = Path("runs/world")
DEV_SEED = 1
_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)
METHOD_START = "spawn"  # each method in a fresh interpreter; tests fork an interpreter that has imported all


@dataclass
class CompareOptions:
    """The command's options (``visedit compare --help``)."""

    backbone: str = "blip2"
    model: Path | None = None
    device: str = "auto"  # `attrib.backbones.placement`
    dtype: str = "auto"
    task: str = "vqa"
    methods: tuple[str, ...] = ("all",)
    test_seed: int = 2
    train: Path | None = None
    eval: Path | None = None
    images: Path | None = None
    out: Path | None = None
    n_test: int | None = 300  # the first N test records (None: all)
    n_dev: int = 100
    dev_n: int = 300  # real files: records of ``train`` set aside as dev
    seed: int = 0
    attribution_n: int = 24
    ceiling_n: int = 48
    progress: bool = True
    world_root: Path = field(default=Path("runs"))
    edits: tuple[int, ...] = ()  # lifelong: numbers of edits live at once (`editing.command.lifelong`); () = single
    latency_only: bool = False  # lifelong: measure the latency of the method files already in OUT again
    jobs: int = 1  # methods run side by side, each child with threads // jobs torch threads (`_run_children`)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # method → config key → value (`method_hyper`)

    def output(self) -> Path:
        name = f"{self.backbone}-{self.task}"
        return self.out or Path("runs/compare") / (f"{name}-lifelong" if self.edits else name)

    def fitted(self) -> Path:
        """Where the placement's attribution and the learned methods' fits live (``attribution/``,
        ``work/``): OUT, or for a lifelong run without OUT the single-edit comparison's default folder —
        both have the same train and dev roles, so they share one fit."""
        if self.out is not None or not self.edits:
            return self.output()
        return Path("runs/compare") / f"{self.backbone}-{self.task}"

    def method_names(self) -> list[str]:
        from editing.methods import METHODS

        names = list(METHODS) if "all" in self.methods else list(self.methods)
        unknown = [n for n in names if n not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
        return names


def method_hyper(options: CompareOptions, name: str) -> dict[str, Any]:
    """Method ``name``'s hyperparameters: its config file's (`editing.methods.method_config`) with
    ``options.overrides[name]`` in place of the values they name (``--set METHOD.KEY=VALUE``). A key the
    config does not have, or a value of another type than the config's (an int where it has a float
    excepted), is refused: a misspelt override would otherwise change nothing."""
    from editing.methods import CONFIG_DIR, method_config

    hyper = method_config(name, options.backbone)
    changed = dict(options.overrides.get(name, {}))
    for key, value in changed.items():
        if key not in hyper:
            raise ValueError(f"--set {name}.{key}: {CONFIG_DIR / f'{name}.yaml'} has no {key!r}; its keys: "
                             f"{', '.join(hyper) or 'none'}")
        old = hyper[key]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            changed[key] = value = float(value)
        if old is not None and type(value) is not type(old):
            raise ValueError(f"--set {name}.{key}={value!r}: the config's value is {old!r} ({type(old).__name__}); "
                             "give one of the same type")
    return {**hyper, **changed}


def overridden(options: CompareOptions, name: str) -> dict[str, Any]:
    """The values ``--set`` gives method ``name`` (as `method_hyper` reads them); {} when none."""
    if not options.overrides.get(name):
        return {}
    hyper = method_hyper(options, name)
    return {key: hyper[key] for key in options.overrides[name]}


def _as_set(name: str, overrides: dict | None) -> str:
    return " ".join(f"{name}.{k}={v}" for k, v in (overrides or {}).items()) or "nothing"


@dataclass
class Roles:
    """The records of each role and where they came from."""

    train: list[EditRecord]
    dev: list[EditRecord]
    test: list[EditRecord]
    described: dict


def _world(seed: int, root: Path, n_eval: int | None = None) -> Path:
    """The world folder of ``seed`` (the development world for seed 1), written when missing; with
    ``n_eval`` (lifelong test worlds) one whose eval splits hold that many records, ``world-<seed>-n<n>``."""
    from attrib.world import write_world

    folder = root / "world" if seed == DEV_SEED else root / f"world-{seed}"
    if n_eval is not None:
        folder = root / f"world-{seed}-n{n_eval}"
    if not (folder / "vqa_eval.json").is_file():
        write_world(folder, seed, n_train=3000, n_eval=n_eval or 300, n_caption_train=1000,
                    n_caption_eval=n_eval or 300, overwrite=folder.exists())
    return folder


def data_roles(options: CompareOptions) -> Roles:
    """Train / dev / test records of the module docstring."""
    task = options.task
    if (options.train is None) != (options.eval is None):
        raise ValueError("give both --train and --eval (or neither, for the world)")
    if options.train is None:
        if options.test_seed == DEV_SEED:
            raise ValueError(f"test seed {DEV_SEED} is the development world's: pick another (TEST_SEED=...)")
        n_eval = max(options.edits) if options.edits else None
        dev_world = _world(DEV_SEED, options.world_root)
        test_world = _world(options.test_seed, options.world_root, n_eval and POOL * n_eval)
        train = load_records(dev_world / f"{task}_train.json")
        dev = load_records(dev_world / f"{task}_eval.json")
        test = load_records(test_world / f"{task}_eval.json")
        test = distinct_scenes(test, n_eval) if n_eval else test[:options.n_test]
        described = {"train": {"file": stored_path(dev_world / f"{task}_train.json"), "world_seed": DEV_SEED},
                     "dev": {"file": stored_path(dev_world / f"{task}_eval.json"), "world_seed": DEV_SEED},
                     "test": {"file": stored_path(test_world / f"{task}_eval.json"), "world_seed": options.test_seed}}
        if n_eval:
            described["test"]["chosen"] = (f"the first {n_eval} records with distinct scenes "
                                           f"(editing.command.lifelong.distinct_scenes)")
        return Roles(train, dev, test, described)
    pool = load_records(options.train, options.images)
    if options.dev_n >= len(pool):
        raise DataError(f"{options.train}: {len(pool)} records cannot give {options.dev_n} dev records and a train set")
    order = np.random.default_rng(options.seed).permutation(len(pool))
    dev = [pool[i] for i in sorted(order[:options.dev_n])]
    train = [pool[i] for i in sorted(order[options.dev_n:])]
    test = load_records(options.eval, options.images)[:max(options.edits) if options.edits else options.n_test]
    described = {"train": {"file": stored_path(options.train), "n": len(train)},
                 "dev": {"file": stored_path(options.train), "n": len(dev), "drawn_with_seed": options.seed},
                 "test": {"file": stored_path(options.eval)}}
    return Roles(train, dev, test, described)


def placement_from_train(backbone, roles: Roles, options: CompareOptions, out: Path):
    """The VisEdit placement from an attribution of training records (reused when already saved)."""
    from attrib.attribution import AttributionConfig, run_attribution
    from editing.adapter.visedit import EditPlacement

    folder = out / "attribution"
    if not (folder / "attribution.json").is_file():
        records = roles.train
        if options.task == "caption":  # attribution prompts are questions: the VQA file beside the captions
            vqa = records[0].source.with_name("vqa_train.json") if records else None
            if vqa is not None and vqa.is_file():
                records = load_records(vqa, options.images)
        config = AttributionConfig(draws=2, causal_samples=1, causal_draws=1, ceiling_samples=options.ceiling_n)
        work = out / "attribution-work"  # finished chunks: a killed run resumes the attribution from them
        attribution = run_attribution(backbone, records[:options.attribution_n], config,
                                      dataset=stored_path(records[0].source), ceiling_records=records,
                                      progress=options.progress, work=work)
        if processes().main:  # under `accelerate launch` the chunks were shared out; one process writes
            attribution.save(folder)
            shutil.rmtree(work, ignore_errors=True)
        barrier()
    return EditPlacement.from_artifact(folder / "attribution.json", backbone)


def _peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


LEARNED = ("visedit", "visedit_gated", "mend", "serac")  # the methods whose prepare trains something


def prepared_method(options: CompareOptions, name: str):
    """(editor, context, roles, prepare's report, its seconds) of one method built and prepared on the
    train / dev roles in the calling process; the learned methods keep what they fit in OUT/work/<name>."""
    import torch

    from attrib.defaults import load_model
    from editing.methods import MethodContext, build_method

    torch.manual_seed(options.seed)
    out = options.fitted()
    backbone = load_model(options.backbone, options.model, options.device, options.dtype)
    roles = data_roles(options)
    extra = {}
    if name.startswith("visedit"):
        extra["placement"] = placement_from_train(backbone, roles, options, out)
    context = MethodContext(backbone, task=options.task, seed=options.seed, hyper=method_hyper(options, name),
                            work=out / "work" / name, progress=options.progress, extra=extra)
    editor = build_method(name, context)
    start = time.perf_counter()
    prepared = editor.prepare(roles.train, roles.dev[:options.n_dev])
    return editor, context, roles, prepared, time.perf_counter() - start


def prepare_methods(options: CompareOptions, names: list[str]) -> list[str]:
    """`--prepare-only`: fit the learned methods of ``names`` (VisEdit's adapters, MEND, SERAC) into
    OUT/work, where a later `visedit compare` finds and reuses them; runs under ``accelerate launch``,
    each process training on its share of every batch. Returns the methods prepared."""
    learned = [name for name in names if name in LEARNED]
    with main_first(OutputLock(options.fitted())):
        if processes().main:
            data_roles(options)  # writes the test world when missing: once, before the others read it
        barrier()
        for name in learned:
            editor = prepared_method(options, name)[0]
            editor.close()
    return learned


def run_method(options: CompareOptions, name: str) -> dict:
    """Build, prepare and evaluate one method on the test records (in the calling process)."""
    import torch

    from editing.command.run import inference_overhead
    from editing.evaluation.evaluate import evaluate_edits
    from editing.evaluation.latency import PROTOCOL as LATENCY_PROTOCOL

    editor, context, roles, prepared, prepare_s = prepared_method(options, name)
    scores = evaluate_edits(editor, roles.test, options.task, progress=options.progress).to_json()
    edits = editor.edit_report()  # before the latency measurement's own edits
    overhead = inference_overhead(editor, roles.test, options.task)
    editor.close()
    five = [scores[k] for k in METRICS]
    result = {**scores, "mean": round(float(np.mean(five)), 2), "t_loc_by_construction": not editor.text_edits,
              "prepare_s": round(prepare_s, 2), "inference_overhead": overhead, "latency_protocol": LATENCY_PROTOCOL,
              "peak_mem_mb": _peak_mb(),
              "hyper": context.hyper, "overrides": overridden(options, name), "seed": options.seed, "prepare": prepared,
              "threads": torch.get_num_threads(), **({"edits": edits} if edits else {})}
    return result


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when the comparison that started it dies (Linux), so a killed
    comparison leaves no method running on into its folder after its lock is gone."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the request was in place
        os._exit(1)


def _child(options: CompareOptions, name: str, path: str, parent: int, threads: int | None = None) -> None:
    _die_with_parent(parent)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    start = time.perf_counter()
    if options.latency_only:  # the file keeps the wall time of the run that scored it
        from editing.command.lifelong import remeasure_latency

        result = remeasure_latency(options, prepared_method(options, name), read_method(Path(path), True))
    elif options.edits:
        from editing.command.lifelong import run_sequential

        result = {**run_sequential(options, prepared_method(options, name)), "peak_mem_mb": _peak_mb(),
                  "overrides": overridden(options, name)}
    else:
        result = run_method(options, name)
    if not options.latency_only:  # the whole method: loading, prepare (or a reused fit), evaluation
        result["wall_s"] = round(time.perf_counter() - start, 1)
    result["latency_jobs"] = options.jobs  # methods running at once while its latency was measured
    atomic_write_text(Path(path), json.dumps(result, indent=1, default=str) + "\n")


def _shares_placement(name: str) -> bool:
    return name.startswith("visedit")  # the VisEdit methods write and read one placement (`placement_from_train`)


def _placement_written(options: CompareOptions) -> bool:
    return (options.fitted() / "attribution" / "attribution.json").is_file()  # its JSON is written last


def child_threads(jobs: int, threads: int | None = None) -> int | None:
    """Torch threads of each method's process when ``jobs`` run side by side: this process's threads shared
    out (at least one each); None for one job (the child keeps torch's default, as this process)."""
    import torch

    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    return None if jobs == 1 else max(1, (threads or torch.get_num_threads()) // jobs)


def _run_children(options: CompareOptions, names: list[str], folder: Path):
    """Run each of ``names`` in a child process (`_child`), up to ``options.jobs`` at a time in the order
    given, two VisEdit methods at once only when their placement is written; yields each name as its results
    file is written. A failed method stops the others (their finished files are kept) and raises."""
    context = multiprocessing.get_context(METHOD_START)
    threads = child_threads(options.jobs)
    queue, running = list(names), {}
    try:
        while queue or running:
            while len(running) < options.jobs:
                apart = not _placement_written(options) and any(map(_shares_placement, running))
                ready = [n for n in queue if not (_shares_placement(n) and apart)]
                if not ready:
                    break
                name = ready[0]
                queue.remove(name)
                running[name] = context.Process(target=_child, args=(options, name, str(folder / f"{name}.json"),
                                                                     os.getpid(), threads))
                running[name].start()
            multiprocessing.connection.wait([child.sentinel for child in running.values()])
            for name, child in list(running.items()):
                if child.exitcode is None:
                    continue
                child.join()
                del running[name]
                if child.exitcode != 0:
                    raise RuntimeError(f"method {name} failed (exit code {child.exitcode}); the methods that "
                                       f"finished are kept in {folder}")
                yield name
    finally:
        for child in running.values():
            child.kill()
            child.join()


def _earlier_runs(path: Path) -> dict:
    """The invocation records (``run``, ``latency_run``, ``rescored``) of the results file an earlier
    invocation wrote in this folder; {} when there is none."""
    if not path.is_file():
        return {}
    data = read_json(path, "comparison results file")
    if not isinstance(data, dict):
        return {}
    kinds = {"run": dict, "latency_run": dict, "rescored": list}
    return {key: data[key] for key, kind in kinds.items() if isinstance(data.get(key), kind)}


def read_method(path: Path, lifelong: bool = False) -> dict:
    """A method's results file (``methods/<name>.json``), checked (`compare_report.check_method`, or
    `check_sequential` for a lifelong run's)."""
    from attrib.errors import ArtifactError
    from editing.command.compare_report import check_method, check_sequential

    try:
        check = check_sequential if lifelong else check_method
        return check(read_json(path, "method results file"), str(path))
    except ArtifactError as error:
        raise ArtifactError(f"{error}; delete the file to run the method again") from None


def run_compare(options: CompareOptions) -> dict:
    """Every method in its own process (module docstring); then results.json, results.md, metrics.png. A
    second run on the same output folder is refused while this one runs (`OutputLock`)."""
    if launched():
        raise ValueError("visedit compare runs as one process (each method in a child of its own); under "
                         "`accelerate launch` only --prepare-only runs (training the learned methods)")
    names = options.method_names()
    for name in options.overrides:
        if name not in names:
            raise ValueError(f"--set {name}.*: {name} is not among the methods run ({', '.join(names)})")
        method_hyper(options, name)  # an unknown key or a wrong type is refused before anything runs
    child_threads(options.jobs)  # refuses --jobs below 1
    if options.latency_only and options.jobs > 1:
        raise ValueError("--latency-only measures each method's latency alone: run it with --jobs 1")
    if any(n < 1 for n in options.edits):
        raise ValueError(f"--edits takes positive numbers of live edits, got {list(options.edits)}")
    if options.latency_only:
        if not options.edits:
            raise ValueError("--latency-only measures the latency of a lifelong comparison again: it needs --edits")
        missing = [name for name in names if not (options.output() / "methods" / f"{name}.json").exists()]
        if missing:
            raise ValueError(f"--latency-only: no lifelong results of {', '.join(missing)} in "
                             f"{options.output() / 'methods'} to measure again; run them first")
    with OutputLock(options.output()), \
            (OutputLock(options.fitted()) if options.fitted() != options.output() else contextlib.nullcontext()):
        return _run_compare(options, names)


def _run_compare(options: CompareOptions, names: list[str]) -> dict:
    out = options.output()
    (out / "methods").mkdir(parents=True, exist_ok=True)
    remove_partial_writes(out / "methods")  # a results file a killed run was writing
    roles = data_roles(options)  # writes the test world when missing, once, before any child
    lifelong = bool(options.edits)
    methods = {name: read_method(out / "methods" / f"{name}.json", lifelong) for name in names
               if (out / "methods" / f"{name}.json").exists()}  # a bad one stops the run before hours of work
    wanted = [str(n) for n in sorted(options.edits)]
    for name, method in methods.items():
        asked = overridden(options, name)
        if method.get("overrides", {}) != asked:
            raise ValueError(f"{out / 'methods' / f'{name}.json'}: ran with --set "
                             f"{_as_set(name, method.get('overrides'))}, not {_as_set(name, asked)}; delete the "
                             "file or give another --out")
        held = sorted(method.get("sequential", {}), key=int)
        if options.latency_only and method["lifelong"] and held != wanted:
            raise ValueError(f"--latency-only: {name}'s results hold N = {', '.join(held)}, not --edits "
                             f"{','.join(wanted)} (the test split depends on them)")
    pending = [name for name in names if name not in methods or (options.latency_only and methods[name]["lifelong"])]
    started = time.perf_counter()
    for name in _run_children(options, pending, out / "methods"):
        methods[name] = read_method(out / "methods" / f"{name}.json", lifelong)
    methods = {name: methods[name] for name in names}  # the order asked for
    results = {"backbone": options.backbone, "task": options.task, "n_test": len(roles.test),
               "roles": roles.described, "options": {k: str(v) for k, v in asdict(options).items()},
               "overrides": {name: overridden(options, name) for name in options.overrides}}
    # `run`: the last invocation that scored the methods (jobs, threads, which, its wall time). One that only
    # read results back keeps the earlier records; one that measured latency again adds `latency_run`; one
    # that scored again some of the earlier run's methods keeps its `run` and adds itself to `rescored`.
    invocation = {"jobs": options.jobs, "threads": child_threads(options.jobs), "methods": pending,
                  "wall_s": round(time.perf_counter() - started, 1)}
    earlier = _earlier_runs(out / "results.json")
    earlier_run = earlier.get("run")
    if options.latency_only:
        results.update(earlier, latency_run=invocation)
    elif not pending and earlier_run is not None:
        results.update(earlier)
    elif earlier_run is not None and set(pending) < set(earlier_run.get("methods") or ()):
        results.update(earlier, rescored=[*earlier.get("rescored", []), invocation])
    else:
        results["run"] = invocation
    if lifelong:
        from editing.command.compare_report import lifelong_markdown, plot_lifelong
        from editing.evaluation.metrics import VISEDIT_PROTOCOL

        results.update(protocol=VISEDIT_PROTOCOL, edits=sorted(options.edits), images=image_sharing(roles.test),
                       sequential={n: m["sequential"] for n, m in methods.items() if m["lifelong"]},
                       skipped=[n for n, m in methods.items() if not m["lifelong"]],
                       methods={n: {k: v for k, v in m.items() if k != "sequential"} for n, m in methods.items()})
        atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
        atomic_write_text(out / "results.md", lifelong_markdown(results))
        plot_lifelong(results, out / "lifelong.png")
        return results
    results.update(protocol=methods[names[0]]["protocol"] if names else None, methods=methods)
    from editing.command.compare_report import compare_markdown, plot_metrics

    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    atomic_write_text(out / "results.md", compare_markdown(results))
    plot_metrics(results, out / "metrics.png")
    return results
