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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
from safetensors.torch import save_file

from attrib.backbones.loader import Backbone
from attrib.ceiling import CeilingResult, visual_patching_ceiling, world_ceiling_cases
from attrib.config import AttributionConfig
from attrib.contribution import ContributionResult, contribution
from attrib.data import DataError, EditRecord
from attrib.io import atomic_write, atomic_write_text, stored_path, writable_dir
from attrib.placement import Placement, place_edit
from attrib.prompts import load_prompts
from attrib.regions.registry import methods_for, sweep_plan
from attrib.regions.result import RegionResult
from attrib.regions.sweep import region_sweep

ARTIFACT_JSON = "attribution.json"
ARTIFACT_TENSORS = "attribution.safetensors"


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
            "model": {"path": stored_path(self.model_path), "fingerprint": self.fingerprint},
            "dataset": stored_path(self.dataset) if self.dataset else self.dataset,
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
        out_dir = writable_dir(out_dir)
        tensors = {f"contribution.{k}": v for k, v in self.contribution.to_tensors().items()}
        tensors.update({f"regions.{name}": r.maps.contiguous() for name, r in self.regions.items()})
        atomic_write(out_dir / ARTIFACT_TENSORS, lambda p: save_file(tensors, p))
        atomic_write_text(out_dir / ARTIFACT_JSON, json.dumps(self.to_json(), indent=2) + "\n")
        return out_dir

    def plot_all(self, out_dir: str | Path, n_overlays: int = 4) -> list[Path]:
        """Contribution bars, layer × region heatmaps per method, and overlays with truth boxes."""
        out_dir = writable_dir(out_dir)
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
    for entry in methods_for(backbone):
        n, method_layers = sweep_plan(backbone, config, len(records), entry.costly)
        regions[entry.name] = region_sweep(backbone, images[:n], prompts[:n], entry.method(config),
                                           entry.regions(backbone, config), method_layers,
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
