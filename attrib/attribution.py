"""The attribution pipeline: records → contribution + region maps → artifact → figures → placement.

    backbone = load_backbone("llava", path)
    records = load_records("vqa_eval.json", image_root, n=24)
    attribution = run_attribution(backbone, records, AttributionConfig())
    attribution.save("figures/llava")          # attribution.safetensors + attribution.json
    attribution.plot_all("figures/llava")      # bars, heatmaps, overlays (PNG)

Methods by where the backbone keeps space (spec.grid_site): LLaVA ("lm") gets VisEdit's attention-input
noise, attention knockout and the causal effect on its visual-token grid; Q-Former backbones ("vit") get
the ViT-patch noise read at every LM layer, the causal effect from the ViT patches, and the per-query
attention-input noise view. On world data the visual patching ceiling (`attrib.ceiling`) is measured
too; the placement uses both curves (`attrib.placement.place_edit`) and the artifact stores the ceiling
as ``placement.ceiling`` ([L + 1] values, index 0 = the LM input).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from safetensors.torch import save_file

from attrib.backbones.loader import Backbone
from attrib.ceiling import CeilingResult, visual_patching_ceiling, world_ceiling_cases
from attrib.contribution import ContributionResult, contribution
from attrib.data import DataError, EditRecord
from attrib.placement import Placement, place_edit
from attrib.prompts import load_prompts
from attrib.regions.methods import AttentionKnockout, AttentionNoise
from attrib.regions.propagated import CausalNoise, VitNoise
from attrib.regions.result import RegionResult
from attrib.regions.sweep import lm_regions, region_sweep, vit_regions

ARTIFACT_JSON = "attribution.json"
ARTIFACT_TENSORS = "attribution.safetensors"


@dataclass(frozen=True)
class AttributionConfig:
    sigma: float = 0.7  # VisEdit's absolute σ
    rule: str = "abs"
    draws: int = 10
    seed: int = 0
    window: int | None = None  # radius in cells; None = VisEdit's r = 3 scaled to the grid
    vit_read: str = "local"  # Q-Former backbones' ViT noise: "local" (VisEdit's) or "propagated"; see VitNoise
    causal_samples: int = 8  # the causal effect runs full forwards: fewer samples
    causal_draws: int = 3
    causal_layer_stride: int = 3  # the causal effect at every k-th layer: each layer is a batch of full forwards
    batch_size: int = 8
    threshold: float = 0.5  # placement rule's τ
    ceiling_samples: int = 32  # world records for the visual patching ceiling; 0 = skip it
    ceiling_threshold: float = 0.9  # placement rule's κ


@dataclass
class Attribution:
    backbone: str
    model_path: str
    fingerprint: str
    dataset: str
    records: list[EditRecord]
    contribution: ContributionResult
    regions: dict[str, RegionResult]
    primary: str
    placement: Placement
    config: AttributionConfig
    images: list = field(default_factory=list, repr=False)
    ceiling: CeilingResult | None = None

    def to_json(self) -> dict:
        primary = self.regions[self.primary]
        method = primary.meta["method"]
        return {
            "backbone": self.backbone,
            "model": {"path": self.model_path, "fingerprint": self.fingerprint},
            "dataset": self.dataset,
            "n_samples": len(self.records),
            "key_token": "the model's own top-1 next token at the last prompt position",
            "contribution": self.contribution.mean(),
            "regions": {"grid": list(primary.regions.shape), "method": primary.method,
                        "sigma": method.get("sigma"), "draws": method.get("draws"), "window": primary.regions.window,
                        "seed": method.get("seed"), "layers": primary.layers},
            "placement": self.placement.to_json(),
            "details": {"methods": {name: r.meta for name, r in self.regions.items()},
                        "placement_rule": self.placement.describe(), "config": asdict(self.config),
                        "ceiling": None if self.ceiling is None else self.ceiling.to_json()},
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write the tensors, then the JSON last (its presence marks a complete artifact)."""
        out_dir = _writable(out_dir)
        tensors = {f"contribution.{k}": v for k, v in self.contribution.to_tensors().items()}
        tensors.update({f"regions.{name}": r.maps.contiguous() for name, r in self.regions.items()})
        _atomic(out_dir / ARTIFACT_TENSORS, lambda p: save_file(tensors, p))
        _atomic(out_dir / ARTIFACT_JSON, lambda p: Path(p).write_text(json.dumps(self.to_json(), indent=2) + "\n"))
        return out_dir

    def plot_all(self, out_dir: str | Path, n_overlays: int = 4) -> list[Path]:
        """Contribution bars, layer × region heatmaps per method, and overlays with truth boxes."""
        out_dir = _writable(out_dir)
        written = []

        def keep(fig, name):
            path = out_dir / name
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)

        keep(self.contribution.plot_bars(kind="visedit"), "contribution_bars.png")
        keep(self.contribution.plot_bars(kind="dla"), "contribution_dla.png")
        if self.ceiling is not None:
            keep(self.plot_placement(), "placement.png")
        for name, result in self.regions.items():
            keep(result.plot_heatmaps(), f"heatmaps_{name}.png")
            keep(result.plot_layer_by_region(), f"layer_by_region_{name}.png")
        primary = self.regions[self.primary]
        show = self.placement.it_layers[:1] + [max(0, self.placement.edit_layer)]
        show = sorted(set(show + [primary.layers[len(primary.layers) // 2], primary.layers[-1]]))
        if primary.regions.shape[0] > 1:
            for n in range(min(n_overlays, len(self.records))):
                keep(primary.plot_overlay(n, self.images[n], show, box=self.records[n].box("image")),
                     f"overlay_{n}.png")
        return written


    def plot_placement(self):
        """Contribution bars and the visual patching ceiling side by side, the edit layer marked on both."""
        fig, (left, right) = plt.subplots(1, 2, figsize=(max(10.0, 0.7 * self.contribution.n_layers), 3.6))
        self.contribution.plot_bars(ax=left)
        edit = self.placement.edit_layer
        left.axvline(edit, ls=":", lw=1.5, color="#c44e52")
        kappa = self.placement.ceiling_threshold
        threshold = None if kappa is None else kappa * self.ceiling.curve()[0]  # the rule's bar κ · c[0]
        self.ceiling.plot(right, threshold=threshold, edit_layer=edit)
        fig.tight_layout()
        return fig


def _writable(out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise OSError(f"{out_dir}: output folder cannot be written ({error.strerror})") from None
    return out_dir


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(str(tmp))
    os.replace(tmp, path)


def region_methods(backbone: Backbone, config: AttributionConfig) -> list[tuple[str, object, object, bool]]:
    """(name, method, region set, causal?) to run for this backbone, the primary method first."""
    noise = AttentionNoise(config.sigma, config.rule, config.draws, config.seed)
    causal = CausalNoise(draws=config.causal_draws, seed=config.seed)
    if backbone.spec.grid_site == "lm":
        grid = lm_regions(backbone, config.window)
        return [("attention_noise", noise, grid, False), ("attention_knockout", AttentionKnockout(), grid, False),
                ("causal_noise", causal, grid, True)]
    patches = vit_regions(backbone, config.window)
    vit = VitNoise(config.sigma, config.rule, max(2, config.draws // 2), config.seed, config.vit_read)
    return [("vit_noise", vit, patches, False),
            ("query_noise", noise, lm_regions(backbone), False), ("causal_noise", causal, patches, True)]


def sweep_plan(backbone: Backbone, config: AttributionConfig, n_records: int, causal: bool) -> tuple[int, list[int]]:
    """(samples, layers) a method runs on: all of them, or fewer of both for the costly causal effect."""
    layers = list(range(backbone.n_layers))
    if not causal:
        return n_records, layers
    return min(n_records, config.causal_samples), layers[::config.causal_layer_stride]


def check_inputs(backbone: Backbone, records: list[EditRecord], images: list, prompts: list[str]) -> None:
    """Encode each record alone first, so a prompt whose visual tokens cannot be found is reported with
    its file, record index and field instead of failing somewhere inside a batch."""
    for record, image, prompt in zip(records, images, prompts):
        try:
            backbone.encode([image], [prompt])
        except ValueError as error:
            raise DataError(f"{record.source}: record {record.index}, field 'src': {error}") from None


def run_attribution(backbone: Backbone, records: list[EditRecord], config: AttributionConfig = AttributionConfig(),
                    dataset: str = "", ceiling_records: list[EditRecord] | None = None,
                    progress: bool = True) -> Attribution:
    """Contribution and every region method of this backbone on ``records`` (VQA prompt format).

    The visual patching ceiling runs on the world records among ``ceiling_records`` (default:
    ``records``), at most ``config.ceiling_samples`` usable ones; without any it is skipped and the
    placement follows the contribution rule alone. ``progress``: the progress bars.
    """
    prompts = [load_prompts()["vqa"].format(src=r.src) for r in records]
    images = [r.load_image("image") for r in records]
    check_inputs(backbone, records, images, prompts)
    contrib = contribution(backbone, images, prompts, batch_size=config.batch_size, progress=progress)
    regions = {}
    for name, method, region_set, causal in region_methods(backbone, config):
        n, method_layers = sweep_plan(backbone, config, len(records), causal)
        regions[name] = region_sweep(backbone, images[:n], prompts[:n], method, region_set, method_layers,
                                     batch_size=config.batch_size, progress=progress)
    ceiling = None
    if config.ceiling_samples > 0:
        cases = world_ceiling_cases(records if ceiling_records is None else ceiling_records,
                                    limit=config.ceiling_samples)
        ceiling = visual_patching_ceiling(backbone, cases, progress=progress) if cases else None
        ceiling = ceiling if ceiling is not None and ceiling.indices else None
    mean = contrib.mean()
    placement = place_edit(mean["attn"], mean["mlp"], config.threshold,
                           None if ceiling is None else ceiling.curve(), config.ceiling_threshold)
    primary = next(iter(regions))
    return Attribution(backbone.spec.name, str(backbone.path), backbone.fingerprint(), dataset, records, contrib,
                       regions, primary, placement, config, images, ceiling)
