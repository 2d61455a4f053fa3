"""The measured comparisons, each on one `BenchModel`: region sweep engine vs the naive official-style
sweep, and the traced contribution pass vs a plain forward. Each returns JSON-ready figures."""
from __future__ import annotations

from typing import Any

import torch

from attrib.contribution import contribution, trace_last_position
from attrib.regions.attention_noise import AttentionNoise
from attrib.regions.naive import naive_noise_map
from attrib.regions.regions import RegionSet
from attrib.regions.sweep import lm_regions, region_sweep
from attrib.trace import envoy, traced
from benchmarks.setups import BenchModel
from benchmarks.timing import interleaved


def spread_subset(regions: RegionSet, count: int) -> tuple[RegionSet, list[int]]:
    """``count`` regions evenly spread over the raster order of the grid (all of them if fewer)."""
    if count >= regions.n_regions:
        return regions, list(range(regions.n_regions))
    picks = torch.linspace(0, regions.n_regions - 1, count).round().long().unique()
    subset = RegionSet(f"{regions.name}_subset{len(picks)}", regions.members[picks], (1, len(picks)),
                       regions.site, regions.window)
    return subset, picks.tolist()


def region_sweep_case(bench: BenchModel, radius: int | None, sigma: float, draws: int, subset_size: int,
                      repeats: int, layer: int | None = None) -> dict[str, Any]:
    """Engine vs naive attention-noise sweep for one sample at one layer (the middle one by default).

    Timed, interleaved: the naive sweep on ``subset_size`` spread regions, the engine on the same
    subset, the engine on every region. Both include encoding the input; the engine also its capture
    pass. Speedup = naive seconds per region / full-engine seconds per region. The maps compared are
    naive vs engine on the same subset: the same noise streams, so they must agree to float error.
    """
    backbone = bench.backbone
    layer = backbone.n_layers // 2 if layer is None else layer
    regions = lm_regions(backbone, radius)
    subset, picks = spread_subset(regions, subset_size)
    method = AttentionNoise(sigma=sigma, rule="abs", draws=draws, seed=0)
    images, prompts = bench.images[:1], bench.prompts[:1]

    def naive() -> torch.Tensor:
        return naive_noise_map(backbone, backbone.encode(images, prompts), 0, layer, subset, method, sample_key=0)

    def engine(region_set: RegionSet):
        return lambda: region_sweep(backbone, images, prompts, method, region_set, [layer], batch_size=1,
                                    progress=False).maps[0, 0]

    contenders = {"naive_subset": naive, "engine_subset": engine(subset)}
    if subset.n_regions < regions.n_regions:
        contenders["engine_full"] = engine(regions)
    # Warm up on one region instead of a full untimed round: each contender takes seconds per call.
    one, _ = spread_subset(regions, 1)
    naive_noise_map(backbone, backbone.encode(images, prompts), 0, layer, one, method, sample_key=0)
    engine(one)()
    timings = interleaved(contenders, repeats, warmup=False)
    full = "engine_full" if "engine_full" in contenders else "engine_subset"
    naive_per_region = timings.median("naive_subset") / subset.n_regions
    engine_per_region = timings.median(full) / regions.n_regions
    reference, fast = timings.results["naive_subset"], timings.results["engine_subset"]
    seq_len = backbone.encode(images, prompts)["input_ids"].shape[1]
    return {
        "region_sweep_speedup": naive_per_region / engine_per_region,
        "region_sweep_max_abs_diff": (fast - reference).abs().max().item(),
        "region_sweep_speedup_same_subset": timings.ratio("naive_subset", "engine_subset"),
        "naive_s_per_region": naive_per_region,
        "engine_s_per_region": engine_per_region,
        "naive_full_sweep_estimate_s": naive_per_region * regions.n_regions,
        "engine_full_sweep_s": timings.median(full),
        # The scale of the maps: on random weights they can be ~1e-5, where an absolute 1e-4 says little.
        "region_sweep_max_rel_diff": ((fast - reference).abs().max() / reference.abs().max()).item(),
        "map_mean": reference.mean().item(),
        "map_max": reference.abs().max().item(),
        "region_subset": {"count": subset.n_regions, "of": regions.n_regions, "indices": picks,
                          "rule": "evenly spread over the raster order of the grid"},
        "layer": layer, "window_radius": regions.window, "sigma": sigma, "noise_rule": "abs", "draws": draws,
        "seq_len": seq_len, "visual_tokens": backbone.n_visual_tokens,
        "timings": timings.summary(),
    }


def _trace_callables(bench: BenchModel, batch_size: int) -> tuple[dict, Any]:
    """The timed callables of `trace_overhead_case` (and the encoded batch they share)."""
    backbone = bench.backbone
    images, prompts = bench.images[:batch_size], bench.prompts[:batch_size]
    inputs = backbone.encode(images, prompts)
    nm = traced(backbone.model)
    spec, n_layers = backbone.spec, backbone.n_layers

    def empty_trace():
        with nm.trace(**inputs):
            last = nm.output.logits[:, -1].save()
        return last

    def full_saves():  # the same sites saved whole [B, T, D]: what slicing to the last position saves
        saved = []
        with nm.trace(**inputs):
            for layer in range(n_layers):
                saved.append(envoy(nm, spec.layer_path(layer, "attn")).output[0].save())
                saved.append(envoy(nm, spec.layer_path(layer, "mlp")).output.save())
            saved.append(nm.output.logits.save())
        return saved[-1][:, -1]

    return {
        "plain_from_raw": lambda: backbone.forward(backbone.encode(images, prompts)).logits[:, -1],
        "contribution": lambda: contribution(backbone, images, prompts, batch_size=batch_size),
        "plain": lambda: backbone.forward(inputs).logits[:, -1],
        "empty_trace": empty_trace,
        "trace_pass": lambda: trace_last_position(nm, spec, "", n_layers, inputs),
        "full_saves": full_saves,
        "encode": lambda: backbone.encode(images, prompts),
        "wrap": lambda: traced(backbone.model),
    }, inputs


def trace_overhead_case(bench: BenchModel, batch_size: int, repeats: int, inner: int) -> dict[str, Any]:
    """`contribution()` on one batch vs a plain no-grad forward of the same batch, both from raw inputs.

    Also times the pieces between them, to say where any overhead comes from: an nnsight trace that
    saves only the logits' last row, the contribution's traced pass alone (the same last-position saves
    `contribution` makes), and wrapping the model in `NNsight` (which `contribution` does every call).
    """
    callables, inputs = _trace_callables(bench, batch_size)
    timings = interleaved(callables, repeats, inner)
    saves = 2 * bench.backbone.n_layers + 3  # attention and MLP per layer, h^0, h^L, logits
    plain_s = timings.median("plain")
    return {
        "trace_overhead": timings.ratio("contribution", "plain_from_raw"),
        "trace_pass_overhead": timings.ratio("trace_pass", "plain"),
        "empty_trace_overhead": timings.ratio("empty_trace", "plain"),
        "full_saves_overhead": timings.ratio("full_saves", "plain"),
        "plain_forward_s": plain_s,
        "encode_s": timings.median("encode"),
        "nnsight_wrap_s": timings.median("wrap"),
        "nnsight_base_s": timings.median("empty_trace") - plain_s,
        "per_save_s": (timings.median("trace_pass") - timings.median("empty_trace")) / saves,
        "post_processing_s": (timings.median("contribution") - timings.median("trace_pass")
                              - timings.median("encode") - timings.median("wrap")),
        "saves_per_pass": saves, "batch": batch_size, "seq_len": inputs["input_ids"].shape[1],
        "contribution_first_call_s": timings.first.get("contribution"),
        "timings": timings.summary(),
    }


def explain_trace_overhead(figures: dict[str, Any], goal: float) -> list[str]:
    """Where the time between a plain forward and `contribution()` goes, biggest share first."""
    total = figures["trace_overhead"]
    if total <= goal:
        return [f"trace overhead {total:.3f} is within the goal ≤ {goal}"]
    plain = figures["plain_forward_s"]
    shares = {
        "nnsight base cost of a trace (empty_trace − plain)": figures["nnsight_base_s"],
        f"the {figures['saves_per_pass']} last-position saves of the pass":
            figures["per_save_s"] * figures["saves_per_pass"],
        "re-wrapping the model in NNsight on every contribution() call": figures["nnsight_wrap_s"],
        "outside the trace (decomposability probe, residual check, key tokens, VisEdit C and DLA)":
            figures["post_processing_s"],
    }
    lines = [f"trace overhead {total:.3f} > {goal}: plain forward {plain * 1e3:.1f} ms; extra time by part:"]
    for label, seconds in sorted(shares.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {seconds * 1e3:+8.2f} ms ({seconds / plain:+.1%} of a forward)  {label}")
    return lines
