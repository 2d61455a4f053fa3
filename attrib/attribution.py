"""The attribution pipeline: records → contribution + region maps → artifact → figures → placement.

    backbone = load_backbone("llava", path)
    records = load_records("vqa_eval.json", image_root, n=24)
    attribution = run_attribution(backbone, records, AttributionConfig())
    attribution.save("figures/llava")          # attribution.safetensors + attribution.json
    attribution.plot_all("figures/llava")      # bars, heatmaps, overlays (PNG)
    # killed? run_attribution(..., work="runs/heatmaps/llava/work") keeps finished chunks: a rerun resumes

Methods by where the backbone keeps space (spec.grid_site): LLaVA ("lm") gets VisEdit's attention-input
noise, attention knockout and the causal effect on its visual-token grid; Q-Former backbones ("vit") get
the ViT-patch noise read at every LM layer, the causal effect from the ViT patches, and the per-query
attention-input noise view. On world data the visual patching ceiling (`attrib.ceiling`) is measured
too; the placement uses both curves (`attrib.placement.place_edit`) and the artifact stores the ceiling
as ``placement.ceiling`` ([L + 1] values, index 0 = the LM input).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import matplotlib.pyplot as plt
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from attrib.backbones.loader import Backbone
from attrib.ceiling import CeilingResult, visual_patching_ceiling, world_ceiling_cases
from attrib.config import AttributionConfig
from attrib.contribution import ContributionResult, contribution
from attrib.data import DataError, EditRecord, check_prompt_length
from attrib.errors import ArtifactError
from attrib.io import (
    OutputLock,
    atomic_savefig,
    atomic_write,
    atomic_write_text,
    read_safetensors,
    remove_partial_writes,
    stored_path,
    writable_dir,
)
from attrib.parallel import barrier, gather, processes
from attrib.placement import Placement, place_edit
from attrib.prompts import load_prompts
from attrib.regions.registry import methods_for, sweep_plan
from attrib.regions.result import RegionResult
from attrib.regions.sweep import region_sweep

ARTIFACT_JSON = "attribution.json"
ARTIFACT_TENSORS = "attribution.safetensors"
WORK_FORMAT = "attribution-work/1"  # a new format never reads another's chunks


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
            atomic_savefig(fig, path)
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
        check_prompt_length(backbone, record, "src", prompt)
        try:
            backbone.encode([image], [prompt])
        except ValueError as error:
            raise DataError(f"{record.source}: record {record.index}, field 'src': {error}") from None


def run_attribution(backbone: Backbone, records: list[EditRecord], config: AttributionConfig = AttributionConfig(),
                    dataset: str = "", ceiling_records: list[EditRecord] | None = None,
                    progress: bool = True, work: str | Path | None = None) -> Attribution:
    """Contribution and every region method of this backbone on ``records`` (VQA prompt format).

    The visual patching ceiling runs on the world records among ``ceiling_records`` (default:
    ``records``), at most ``config.ceiling_samples`` usable ones; without any it is skipped and the
    placement follows the contribution rule alone. ``progress``: the progress bars.

    Each stage runs in chunks of ``config.batch_size`` samples (ceiling cases), the very batches of one
    pass over them, so chunking changes no number. With ``work`` (a folder), every finished chunk is kept
    there (`AttributionWork`) and a rerun of the same run, killed or not, reuses them: it resumes at the
    first missing chunk and ends with the same artifact. The caller removes ``work`` when done.
    """
    prompts = [load_prompts()["vqa"].format(src=r.src) for r in records]
    images = [r.load_image("image") for r in records]
    check_inputs(backbone, records, images, prompts)
    cases = []
    if config.ceiling_samples > 0:
        cases = world_ceiling_cases(records if ceiling_records is None else ceiling_records,
                                    limit=config.ceiling_samples)
    with AttributionWork(work, backbone, config, prompts, images, cases) as kept:
        contrib = _contribution(kept, backbone, images, prompts, config.batch_size, progress)
        regions = {}
        for entry in methods_for(backbone):
            n, method_layers = sweep_plan(backbone, config, len(records), entry.costly)
            regions[entry.name] = _regions(kept, entry.name, backbone, images[:n], prompts[:n], entry.method(config),
                                           entry.regions(backbone, config), method_layers, config.batch_size,
                                           progress)
        ceiling = _ceiling(kept, backbone, cases, config.batch_size, progress) if cases else None
    ceiling = ceiling if ceiling is not None and ceiling.indices else None
    mean = contrib.mean()
    placement = place_edit(mean["attn"], mean["mlp"], config.threshold,
                           None if ceiling is None else ceiling.curve(), config.ceiling_threshold)
    primary = next(iter(regions))
    return Attribution(backbone.spec.name, str(backbone.path), backbone.fingerprint(), dataset, records, contrib,
                       regions, primary, placement, config, images, ceiling)


class AttributionWork:
    """The finished chunks of one attribution run, each a safetensors file written atomically (tensors and
    JSON metadata) into ``folder/<key>``. The key hashes everything the results depend on: the model
    (fingerprint, dtype), the config, the prompts, the images' pixels and the ceiling cases; a rerun of
    the same run finds its chunks, any other run starts afresh (and the other keys' folders are removed).
    The folder is locked while in use (`OutputLock`). ``folder`` None (or a model never saved, whose
    fingerprint proves nothing) keeps nothing."""

    def __init__(self, folder: str | Path | None, backbone: Backbone, config: AttributionConfig,
                 prompts: list[str], images: list, cases: list):
        fingerprint = backbone.fingerprint()
        self.root = None if folder is None or fingerprint == "unsaved" else Path(folder)
        digest = hashlib.sha256(json.dumps({"format": WORK_FORMAT, "backbone": backbone.spec.name,
                                            "fingerprint": fingerprint, "dtype": str(backbone.model.dtype),
                                            "config": asdict(config), "prompts": prompts}).encode())
        for image in images:
            digest.update(f"{image.size}".encode() + image.tobytes())
        for case in cases:
            digest.update(json.dumps([case.index, case.prompt, case.answer, case.alt]).encode())
            digest.update(case.image.tobytes() + case.counterfactual.tobytes())
        self.key = digest.hexdigest()[:16]
        self.folder = None if self.root is None else self.root / self.key
        self._lock = None if self.root is None else OutputLock(self.root)
        self.procs = processes()

    def __enter__(self) -> "AttributionWork":
        if self._lock is not None and self.procs.main:  # several processes: the main one locks and tidies
            self._lock.__enter__()
            for other in self.root.iterdir():
                if other.is_dir() and other.name != self.key:  # another run's chunks: never reused
                    shutil.rmtree(other, ignore_errors=True)
            self.folder.mkdir(exist_ok=True)
            remove_partial_writes(self.folder)  # a chunk the last run was killed writing
        barrier()
        if self.folder is not None and not self.procs.main:
            self.folder.mkdir(parents=True, exist_ok=True)  # the others' own disk when not shared
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            barrier()
        if self._lock is not None and self.procs.main:
            self._lock.__exit__(*exc)

    def chunks(self, prefix: str, compute: Callable[[int, int], tuple[dict[str, torch.Tensor], dict]],
               spans: list[tuple[int, int]], desc: str, progress: bool) -> list[tuple[dict[str, torch.Tensor], dict]]:
        """`chunk` over ``spans`` (named ``<prefix>-<lo>``), in order. Under several processes each does its
        round-robin share and every process gets all of them back (`attrib.parallel`): the chunks are the
        same computations as alone, so the merged result equals a one-process run's."""
        mine = self.procs.round_robin(range(len(spans)))
        if self.procs.several:
            desc = f"{desc} (process {self.procs.rank} of {self.procs.world})"
        done = {k: self.chunk(f"{prefix}-{spans[k][0]:06d}", compute, *spans[k])
                for k in tqdm(mine, desc=desc, disable=not progress)}
        if self.procs.several:
            moved = {k: ({name: t.detach().cpu() for name, t in tensors.items()}, meta)
                     for k, (tensors, meta) in done.items()}
            done = {k: part for shares in gather(moved) for k, part in shares.items()}
        return [done[k] for k in range(len(spans))]

    def chunk(self, name: str, compute: Callable[[int, int], tuple[dict[str, torch.Tensor], dict]], lo: int,
              hi: int) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, metadata) of chunk ``name`` (items ``lo:hi``): read back when kept, else
        ``compute(lo, hi)`` and kept."""
        path = None if self.folder is None else self.folder / f"{name}.safetensors"
        if path is not None and path.is_file():
            try:
                tensors, stored = read_safetensors(path, "attribution chunk")
                return tensors, json.loads(stored["meta"])
            except (ArtifactError, KeyError, ValueError):
                pass  # unreadable (the disk, not a kill: writes are atomic): compute it again
        tensors, meta = compute(lo, hi)
        if path is not None:
            tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
            atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"meta": json.dumps(meta)}))
        return tensors, meta


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(n, lo + size)) for lo in range(0, n, size)]


def _contribution(kept: AttributionWork, backbone: Backbone, images: list, prompts: list[str], batch_size: int,
                  progress: bool) -> ContributionResult:
    def compute(lo: int, hi: int) -> tuple[dict[str, torch.Tensor], dict]:
        part = contribution(backbone, images[lo:hi], prompts[lo:hi], batch_size=batch_size, progress=False)
        return part.to_tensors(), {}

    if not prompts:
        return contribution(backbone, images, prompts)  # refuses, as with no records at all
    parts = [tensors for tensors, _ in kept.chunks("contribution", compute, _chunks(len(prompts), batch_size),
                                                    "contribution", progress and len(prompts) > batch_size)]
    return ContributionResult(backbone=backbone.spec.name, model_fingerprint=backbone.fingerprint(),
                              **{name: torch.cat([part[name] for part in parts]) for name in parts[0]})


def _regions(kept: AttributionWork, name: str, backbone: Backbone, images: list, prompts: list[str], method,
             regions, layers: list[int], batch_size: int, progress: bool) -> RegionResult:
    def compute(lo: int, hi: int) -> tuple[dict[str, torch.Tensor], dict]:
        result = region_sweep(backbone, images[lo:hi], prompts[lo:hi], method, regions, layers,
                              batch_size=batch_size, progress=False, sample_offset=lo)
        return {"maps": result.maps}, {"layers": result.layers, "method": result.method, "meta": result.meta}

    if not prompts:
        return region_sweep(backbone, images, prompts, method, regions, layers, progress=False)
    parts = kept.chunks(f"regions-{name}", compute, _chunks(len(prompts), batch_size), method.name, progress)
    meta = parts[-1][1]
    return RegionResult(torch.cat([tensors["maps"] for tensors, _ in parts]), meta["layers"], regions, meta["method"],
                        meta["meta"])


def _ceiling(kept: AttributionWork, backbone: Backbone, cases: list, size: int, progress: bool) -> CeilingResult:
    def compute(lo: int, hi: int) -> tuple[dict[str, torch.Tensor], dict]:
        part = visual_patching_ceiling(backbone, cases[lo:hi])
        return {"flips": part.flips, "clean": part.clean, "counterfactual": part.counterfactual}, \
            {"indices": part.indices}

    flips, clean, counterfactual, indices = [], [], [], []
    for tensors, meta in kept.chunks("ceiling", compute, _chunks(len(cases), size), "visual patching ceiling",
                                     progress):
        flips.append(tensors["flips"])
        clean.append(tensors["clean"])
        counterfactual.append(tensors["counterfactual"])
        indices += meta["indices"]
    return CeilingResult(torch.cat(flips), torch.cat(clean), torch.cat(counterfactual), indices)
