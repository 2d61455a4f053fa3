"""`make bench` / ``visedit bench``: the toolkit's speed ratios, measured in one process, in ``bench.json``.

What it is for: checking that the region-sweep engine is much faster than the naive official-style
sweep while giving the same maps, and that tracing costs little over a plain forward. When to use it:
after changing the engine, the tracing or the model code; numbers from one run are comparable with
each other, not across machines.

Canonical pattern::

    visedit bench                            # full settings, --out runs/bench
    visedit bench --quick --out /tmp         # tiny shapes, one repeat (tests)

Editing: ``vead_inference_overhead`` (edited / unedited forward) and ``vead_prefix_speedup`` (a training
step with the whole model under autograd / with the no-grad prefix), on a random LLaVA with the 7B layer
count and on the default (``default_`` keys).

Adding a benchmark: write ``fn(ctx: BenchContext) -> BenchOutput`` and decorate it with
``@register("name", goals={"key": Goal(...)})``; its ``values`` land at the top level of bench.json,
its ``details`` under ``details[name]``, and its goals in the printed table.

Gotchas: every ratio is a median of interleaved repeats, but a busy machine still moves them; the
machine note and thread count in the JSON say what ran beside the benchmark.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from attrib.defaults import default_model as shipped_default
from attrib.io import OutputLock, atomic_write_json
from benchmarks.cases import explain_trace_overhead, region_sweep_case, trace_overhead_case
from benchmarks.editing_cases import scaled_vead_config, vead_case
from benchmarks.setups import FULL_SHAPES, QUICK_SHAPES, BenchModel, BenchShapes, default_llava, random_llava
from editing.adapter.vead import lm_width
from editing.training.recipe import sized_vead_config


@dataclass(frozen=True)
class Goal:
    """A target for one figure: ``value op threshold`` must hold (op: "≥" or "≤")."""

    op: str
    threshold: float

    def met(self, value: float) -> bool:
        return value >= self.threshold if self.op == "≥" else value <= self.threshold

    def __str__(self) -> str:
        return f"{self.op} {self.threshold:g}"


@dataclass
class BenchContext:
    """Settings every benchmark reads; ``notes`` collects their findings for the JSON and the console."""

    quick: bool
    repeats: int
    shapes: BenchShapes
    default_model: Path
    notes: list[str] = field(default_factory=list)


@dataclass
class BenchOutput:
    """What one benchmark reports: top-level figures, supporting detail, and findings."""

    values: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Benchmark:
    name: str
    run: Callable[[BenchContext], BenchOutput]
    goals: dict[str, Goal]


BENCHMARKS: dict[str, Benchmark] = {}  # run in registration order


def register(name: str, goals: dict[str, Goal] | None = None):
    """Decorator adding ``fn(ctx) -> BenchOutput`` to the benchmarks ``run_benchmarks`` runs."""
    def add(fn: Callable[[BenchContext], BenchOutput]) -> Callable[[BenchContext], BenchOutput]:
        if name in BENCHMARKS:
            raise ValueError(f"benchmark {name!r} is registered twice")
        BENCHMARKS[name] = Benchmark(name, fn, dict(goals or {}))
        return fn
    return add


SPEEDUP_GOAL, DIFF_GOAL, TRACE_GOAL = Goal("≥", 10.0), Goal("≤", 1e-4), Goal("≤", 1.15)


def _measure(ctx: BenchContext, bench: BenchModel, radius: int | None, prefix: str) -> BenchOutput:
    """Both comparisons on one model; headline keys get ``prefix``, the rest go to details."""
    s = ctx.shapes
    sweep = region_sweep_case(bench, radius, s.sigma, s.draws, s.region_subset, ctx.repeats)
    trace = trace_overhead_case(bench, s.trace_batch, ctx.repeats, s.inner)
    notes = explain_trace_overhead(trace, TRACE_GOAL.threshold)
    notes[0] = f"{bench.label}: {notes[0]}"
    values = {prefix + "region_sweep_speedup": sweep["region_sweep_speedup"],
              prefix + "region_sweep_max_abs_diff": sweep["region_sweep_max_abs_diff"],
              prefix + "trace_overhead": trace["trace_overhead"],
              prefix + "region_subset": sweep["region_subset"]}
    return BenchOutput(values, {"model": bench.label, "source": bench.note, "region_sweep": sweep,
                                "trace": trace}, notes)


@register("random_llava", goals={"region_sweep_speedup": SPEEDUP_GOAL, "region_sweep_max_abs_diff": DIFF_GOAL,
                                 "trace_overhead": TRACE_GOAL})
def random_llava_bench(ctx: BenchContext) -> BenchOutput:
    """Random-initialised LLaVA with the real 24 × 24 grid and prompt, VisEdit's official noise."""
    bench = random_llava(ctx.shapes, n_prompts=max(ctx.shapes.trace_batch, 1))
    out = _measure(ctx, bench, ctx.shapes.radius, "")
    out.details["shapes"] = ctx.shapes.describe()
    return out


@register("default_llava", goals={"default_region_sweep_speedup": SPEEDUP_GOAL,
                                  "default_region_sweep_max_abs_diff": DIFF_GOAL,
                                  "default_trace_overhead": TRACE_GOAL})
def default_llava_bench(ctx: BenchContext) -> BenchOutput:
    """The shipped default LLaVA (8 × 8 grid, window radius scaled from VisEdit's r = 3 on 24 × 24)."""
    if not (ctx.default_model / "config.json").is_file():
        return BenchOutput(notes=[f"default model skipped: no trained model at {ctx.default_model} "
                                  f"(train it with `make toy-models BACKBONES={ctx.default_model.name}`, then rerun)"])
    bench = default_llava(ctx.default_model, n_prompts=ctx.shapes.trace_batch)
    return _measure(ctx, bench, None, "default_")


VEAD_OVERHEAD_GOAL = Goal("≤", 1.10)


@register("vead_random_llava", goals={"vead_inference_overhead": VEAD_OVERHEAD_GOAL})
def vead_random_llava_bench(ctx: BenchContext) -> BenchOutput:
    """VEAD + IM on a random LLaVA with the 7B layer count and 576 visual tokens, adapter scaled with width."""
    shapes = replace(ctx.shapes, text_layers=ctx.shapes.vead_layers)
    bench = random_llava(shapes, n_prompts=1)
    config = scaled_vead_config(shapes.text_hidden)
    figures = vead_case(bench, shapes.vead_edit_layer, config, ctx.repeats)
    return BenchOutput({"vead_inference_overhead": figures["vead_inference_overhead"],
                        "vead_prefix_speedup": figures["vead_prefix_speedup"]},
                       {"model": f"random LLaVA, {shapes.vead_layers} layers", "vead": figures})


@register("vead_default_llava", goals={"default_vead_inference_overhead": VEAD_OVERHEAD_GOAL})
def vead_default_llava_bench(ctx: BenchContext) -> BenchOutput:
    """VEAD + IM on the shipped default LLaVA, sized and placed as `make edit` does by default."""
    if not (ctx.default_model / "config.json").is_file():
        return BenchOutput(notes=[f"default VEAD benchmark skipped: no trained model at {ctx.default_model}"])
    bench = default_llava(ctx.default_model, n_prompts=1)
    edit_layer = _shipped_edit_layer(bench.backbone.n_layers)
    config = sized_vead_config(lm_width(bench.backbone.config), scene_gate=True)
    figures = vead_case(bench, edit_layer, config, ctx.repeats)
    return BenchOutput({"default_vead_inference_overhead": figures["vead_inference_overhead"],
                        "default_vead_prefix_speedup": figures["vead_prefix_speedup"]},
                       {"model": "default LLaVA", "source": bench.note, "vead": figures})


def _shipped_edit_layer(n_layers: int) -> int:
    """The edit layer of the committed LLaVA figures' attribution artifact, else the middle layer."""
    artifact = Path(__file__).resolve().parents[1] / "figures" / "llava" / "attribution.json"
    if artifact.is_file():
        layer = json.loads(artifact.read_text())["placement"]["edit_layer"]
        if -1 <= layer < n_layers:
            return layer
    return n_layers // 2


def machine_note() -> dict[str, Any]:
    """What the numbers ran on and beside: CPU, threads, load (a busy machine slows every contender)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cuda": torch.cuda.is_available(), "load_average_1_5_15": [round(x, 2) for x in load]}


def run_benchmarks(out_dir: str | Path = "runs/bench", repeats: int = 5, quick: bool = False,
                   default_model: str | Path | None = None, only: list[str] | None = None,
                   note: str = "", threads: int | None = None) -> dict[str, Any]:
    """Run the registered benchmarks (``only``: a subset by name), write ``out_dir/bench.json``, return it.

    ``threads`` sets torch's intra-op threads for the run (and stays set); on a machine shared with
    another CPU job, 1 thread avoids cores waiting on each other (measured: 2 threads were 2-10× slower).
    """
    out = Path(out_dir)
    with OutputLock(out):  # one run at a time: a second would also skew the first's timings
        if threads is not None:
            torch.set_num_threads(threads)
        ctx = BenchContext(quick, repeats, QUICK_SHAPES if quick else FULL_SHAPES,
                           Path(default_model) if default_model is not None else shipped_default("llava"))
        report: dict[str, Any] = {"mode": "quick" if quick else "full", "repeats": repeats,
                                  "machine": {**machine_note(), "note": note}, "goals": {}, "details": {}}
        start = time.perf_counter()
        for bench in BENCHMARKS.values():
            if only and bench.name not in only:
                continue
            output = bench.run(ctx)
            report.update(output.values)
            report["details"][bench.name] = output.details
            ctx.notes.extend(output.notes)
            for key, goal in bench.goals.items():
                if key in output.values:
                    report["goals"][key] = {"goal": str(goal), "met": goal.met(output.values[key])}
        report["machine"]["load_average_after"] = machine_note()["load_average_1_5_15"]
        report["notes"] = ctx.notes
        report["wall_s"] = time.perf_counter() - start
        atomic_write_json(out / "bench.json", report)
    return report


def format_table(report: dict[str, Any]) -> str:
    """The goal-bearing figures, one line each, then the machine and the notes."""
    lines = [f"{'figure':<36} {'value':>12}  {'goal':>10}  ok", "-" * 66]
    for key, goal in report["goals"].items():
        value = report[key]
        shown = f"{value:.2e}" if "diff" in key else f"{value:.3f}"
        lines.append(f"{key:<36} {shown:>12}  {goal['goal']:>10}  {'yes' if goal['met'] else 'NO'}")
    for detail in report["details"].values():
        vead = detail.get("vead")
        if vead:
            lines.append(f"  {detail['model']}: VEAD at layer {vead['edit_layer']} of {vead['n_layers']} "
                         f"({vead['adapter_parameters']:,} parameters), forward "
                         f"{vead['unedited_forward_s'] * 1e3:.1f} → "
                         f"{vead['edited_forward_s'] * 1e3:.1f} ms; training step {vead['step_full_s'] * 1e3:.1f} ms "
                         f"whole-model autograd vs {vead['step_split_s'] * 1e3:.1f} ms split")
        sweep = detail.get("region_sweep")
        if sweep:
            subset = sweep["region_subset"]
            lines.append(f"  {detail['model']}: seq {sweep['seq_len']} tokens, layer {sweep['layer']}, naive on "
                         f"{subset['count']}/{subset['of']} regions: {sweep['naive_s_per_region'] * 1e3:.1f} vs "
                         f"{sweep['engine_s_per_region'] * 1e3:.2f} ms/region; map max {sweep['map_max']:.2e}, "
                         f"max relative diff {sweep['region_sweep_max_rel_diff']:.1e}")
    machine = report["machine"]
    lines.append(f"threads {machine['torch_threads']} / cpus {machine['cpu_count']}, load "
                 f"{machine['load_average_1_5_15']} → {machine['load_average_after']}, {report['mode']} mode, "
                 f"{report['repeats']} repeats, {report['wall_s']:.0f} s"
                 + (f"; {machine['note']}" if machine['note'] else ""))
    lines += report["notes"]
    return "\n".join(lines)


def bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for bench.json")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default: 5; quick: 1)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat (for tests)")
    parser.add_argument("--default-model", default=None,
                        help="default LLaVA folder (default: the shipped one, attrib/defaults/models/llava)")
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    parser.add_argument("--note", default="", help="free-text machine note stored in bench.json")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")


def bench(args: argparse.Namespace) -> int:
    """Speed ratios measured in one run, each against its goal; writes OUT/bench.json."""
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    report = run_benchmarks(args.out, repeats, args.quick, args.default_model, args.only, args.note,
                            args.threads)
    print(format_table(report))
    print(f"wrote {Path(args.out) / 'bench.json'}")
    return 0
