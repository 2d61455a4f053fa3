"""Visual patching ceiling: up to which layer can rewriting the visual-token states still change the answer?

What it is for: placing the editor. An adapter that rewrites visual states after layer ℓ can only
change answers that are still read from the image *after* ℓ. The ceiling measures that directly: per
site ℓ ∈ {LM input, after layer 0, …, after layer L−1} (L + 1 values, index 0 = the LM's input, index
i = the output of decoder layer i − 1), the fraction of answers that flip to the counterfactual answer
when the visual-token states at that site are replaced by those of a counterfactual image, the rest of
the forward left as is. It falls from ~1 at the LM input (for a model that reads the counterfactual
image right) to ~0 once the question tokens have read the image; the edit layer belongs before the fall.

Canonical pattern (world data, where the counterfactual image can be rendered)::

    cases = world_ceiling_cases(records)             # same scene, asked object's attribute := record.alt
    result = visual_patching_ceiling(backbone, cases)
    result.curve()                                   # [L + 1] fractions
    result.plot()

Variations: any data whose counterfactual image you can make: build `CeilingCase`s yourself.
Gotchas:
- "Flip" = the argmax at the key position equals the first token of ``alt`` there. The key position
  is the first answer token where ``alt`` and the original answer differ (teacher-forcing the words they
  share, e.g. "a small red …" vs "a small blue …"); for one-word VQA answers it is the first answer token.
- Both images give the same token ids (same text), so visual positions line up; for Q-Former backbones
  the "visual states" are the query-token states.
- World counterfactuals: colour / shape questions (and "position", answered by a shape) change that
  attribute of the asked object; "exists" changes one attribute of one object until the answer becomes
  ``alt``; "count" questions are skipped (no single attribute to change). Each counterfactual scene is
  re-asked with `attrib.world.evaluate` and kept only if it really answers ``alt``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
from PIL import Image
from tqdm import tqdm
from transformers import BatchFeature

from attrib.backbones.loader import Backbone
from attrib.data import EditRecord
from attrib.prompts import load_prompts
from attrib.world import COLORS, SHAPES, Scene, WorldRecord, evaluate, render
from attrib.world.rebuild import WorldRebuild

# Families whose answer is one attribute of the asked-about object.
_ANSWER_ATTRIBUTE = {"color_of_shape": "color", "shape_of_color": "shape", "position": "shape"}


@dataclass(frozen=True)
class CeilingCase:
    """One counterfactual pair. prompt: dataset format (e.g. "{src} The answer is:"), before the
    backbone template; answer: the original answer (``pred``); alt: the counterfactual answer."""

    index: int
    image: Image.Image
    counterfactual: Image.Image
    prompt: str
    answer: str
    alt: str


@dataclass
class CeilingResult:
    """flips [N, L+1] bool (site 0 = LM input, site i = after layer i−1); clean [N]: the unpatched
    model's key token is the original answer's; counterfactual [N]: the counterfactual image alone
    gives ``alt``'s key token; indices: record index of each row."""

    flips: torch.Tensor
    clean: torch.Tensor
    counterfactual: torch.Tensor
    indices: list[int]

    def curve(self) -> list[float]:
        """[L + 1] fraction of flipped answers per site."""
        return self.flips.float().mean(0).tolist()

    def to_json(self) -> dict:
        return {"values": [round(v, 4) for v in self.curve()], "n": len(self.indices),
                "sites": "index 0 = the LM's input, index i = after decoder layer i-1",
                "clean_accuracy": round(self.clean.float().mean().item(), 4),
                "counterfactual_accuracy": round(self.counterfactual.float().mean().item(), 4),
                "flip": "argmax at the key position == first token of alt there"}

    def plot(self, ax=None, threshold: float | None = None, edit_layer: int | None = None):
        """The curve over sites (x = −1 for the LM input, then layer ℓ); optional threshold and edit layer."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.2))
        sites = list(range(-1, self.flips.shape[1] - 1))
        ax.plot(sites, self.curve(), marker="o", color="#55a868", label="visual patching ceiling")
        if threshold is not None:
            ax.axhline(threshold, ls="--", lw=1, color="grey", label=f"threshold {threshold:.2f}")
        if edit_layer is not None:
            ax.axvline(edit_layer, ls=":", lw=1.5, color="#c44e52", label=f"edit layer {edit_layer}")
        ax.set_xticks(sites)
        ax.set_xticklabels(["in"] + [str(s) for s in sites[1:]])
        ax.set(xlabel="visual states replaced after layer", ylabel="answers flipped", ylim=(-0.02, 1.02),
               title=f"visual patching ceiling ({len(self.indices)} samples)")
        ax.legend(frameon=False, fontsize=8)
        return ax.figure


# ---- world counterfactuals ---------------------------------------------------------------------------

def _changed(scene: Scene, k: int, attribute: str, value: str) -> Scene:
    obj = scene.objects[k]
    new = replace(obj, color=value, rgb=COLORS[value]) if attribute == "color" else replace(obj, shape=value)
    return replace(scene, objects=scene.objects[:k] + (new,) + scene.objects[k + 1:])


def counterfactual_scene(record: WorldRecord) -> Scene | None:
    """The record's scene with the asked object's attribute changed so the question answers ``alt``
    (see the module docstring), or None where no single-attribute change does that."""
    question, alt = record.question, record.fields["alt"]
    if question is None:
        return None
    scene = record.scenes["image"]
    if question.family in _ANSWER_ATTRIBUTE and question.target is not None:
        candidates = [(question.target, _ANSWER_ATTRIBUTE[question.family], alt)]
    elif question.family == "exists":
        first = [question.target] if question.target is not None else []
        order = first + [k for k in range(len(scene.objects)) if k not in first]
        candidates = [(k, "color", c) for k in order for c in COLORS] + [(k, "shape", s) for k in order for s in SHAPES]
    else:
        return None
    for k, attribute, value in candidates:
        if value not in (COLORS if attribute == "color" else SHAPES):
            continue
        changed = _changed(scene, k, attribute, value)
        answered = evaluate(changed, question.family, question.slots)
        if answered is not None and answered[0] == alt:
            return changed
    return None


def world_ceiling_cases(records: Sequence[EditRecord], prompt_format: str | None = None,
                        limit: int | None = None) -> list[CeilingCase]:
    """Counterfactual pairs for the world records among ``records`` (others are skipped), at most ``limit``.

    The world records are rebuilt from the folder's meta.json (`attrib.world.rebuild`).
    """
    prompt_format = prompt_format or load_prompts()["vqa"]
    rebuild = WorldRebuild()
    cases = []
    for record in records:
        if limit is not None and len(cases) >= limit:
            break
        world = rebuild.world_record(record)
        scene = None if world is None else counterfactual_scene(world)
        if scene is not None:
            cases.append(CeilingCase(record.index, record.load_image("image"), render(scene),
                                     prompt_format.format(src=record.src), record.pred, record.alt))
    return cases


# ---- measuring ---------------------------------------------------------------------------------------

def answer_key(backbone: Backbone, prompt: str, answer: str, alt: str) -> tuple[str, int, int] | None:
    """(shared answer words to teacher-force, answer's key token id, alt's key token id), or None when
    the two answers do not differ in their first differing token."""
    shared = []
    for a, b in zip(answer.split(), alt.split()):
        if a != b:
            break
        shared.append(a)
    prefix = " ".join(shared)
    head = backbone.format_prompt(prompt) + (f" {prefix}" if prefix else "")
    tokenizer = backbone.tokenizer
    base = tokenizer(head).input_ids

    def key(words: list[str]) -> int | None:
        rest = " ".join(words[len(shared):])
        ids = tokenizer(f"{head} {rest}").input_ids if rest else []
        return ids[len(base)] if len(ids) > len(base) and ids[:len(base)] == base else None

    ids = key(answer.split()), key(alt.split())
    if None in ids or ids[0] == ids[1]:
        return None
    return prefix, ids[0], ids[1]


def _repeat(inputs: BatchFeature, n: int) -> BatchFeature:
    return BatchFeature({k: v.repeat(n, *[1] * (v.dim() - 1)) if isinstance(v, torch.Tensor) else v
                         for k, v in inputs.items()})


def _hook_sites(backbone: Backbone, handler) -> list:
    """Install ``handler(site, hidden) -> hidden | None`` at every site: a pre-hook on layer 0 (site 0)
    and a forward hook on each layer ℓ (site ℓ + 1)."""
    layers = backbone.module(backbone.spec.layers)

    def pre(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        new = handler(0, hidden)
        if new is None:
            return None
        return ((new, *args[1:]), kwargs) if args else (args, dict(kwargs, hidden_states=new))

    def post(site, output):
        hidden = output[0] if isinstance(output, tuple) else output
        new = handler(site, hidden)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handles = [layers[0].register_forward_pre_hook(pre, with_kwargs=True)]
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(lambda m, a, out, site=i + 1: post(site, out)))
    return handles


@torch.no_grad()
def _site_states(backbone: Backbone, inputs, positions: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Visual states [P, d] at every site of a one-row input, and its last-position logits [V]."""
    states: dict[int, torch.Tensor] = {}

    def keep(site, hidden):
        states[site] = hidden[0, positions].clone()

    handles = _hook_sites(backbone, keep)
    try:
        logits = backbone.forward(inputs, use_cache=False).logits[0, -1]
    finally:
        for handle in handles:
            handle.remove()
    return [states[s] for s in sorted(states)], logits


@torch.no_grad()
def _patched_argmax(backbone: Backbone, inputs, positions: torch.Tensor, states: list[torch.Tensor],
                    sites: list[int | None]) -> torch.Tensor:
    """Argmax at the last position [len(sites)] of ``inputs`` repeated once per entry of ``sites``; row
    r gets ``states[site]`` at its visual positions at that site (None = unpatched)."""
    rows_at: dict[int, list[int]] = {}
    for row, site in enumerate(sites):
        if site is not None:
            rows_at.setdefault(site, []).append(row)

    def patch(site, hidden):
        rows = rows_at.get(site)
        if not rows:
            return None
        hidden = hidden.clone()  # out of place: the layer's own output stays untouched
        for row in rows:
            hidden[row, positions] = states[site].to(hidden.dtype)
        return hidden

    handles = _hook_sites(backbone, patch)
    try:
        logits = backbone.forward(_repeat(inputs, len(sites)), use_cache=False).logits[:, -1]
    finally:
        for handle in handles:
            handle.remove()
    return logits.argmax(-1)


def visual_patching_ceiling(backbone: Backbone, cases: Sequence[CeilingCase], max_rows: int = 16,
                            progress: bool = False) -> CeilingResult:
    """The ceiling of the module docstring over ``cases``; ``max_rows`` caps the rows of one patched
    batch (L + 2 rows per case: the unpatched input and one row per site). Cases whose answers share
    their key token are left out."""
    n_sites = backbone.n_layers + 1
    flips, clean, counterfactual, indices = [], [], [], []
    for case in tqdm(cases, desc="visual patching ceiling", disable=not progress):
        key = answer_key(backbone, case.prompt, case.answer, case.alt)
        if key is None:
            continue
        prefix, answer_id, alt_id = key
        targets = [prefix] if prefix else None
        original = backbone.encode([case.image], [case.prompt], targets)
        changed = backbone.encode([case.counterfactual], [case.prompt], targets)
        if not torch.equal(original["input_ids"], changed["input_ids"]):
            raise ValueError(f"record {case.index}: the counterfactual input has other token ids than the original")
        positions = backbone.visual_positions(original["input_ids"])[0]
        states, cf_logits = _site_states(backbone, changed, positions)
        sites: list[int | None] = [None, *range(n_sites)]
        argmax = torch.cat([_patched_argmax(backbone, original, positions, states, sites[i:i + max_rows])
                            for i in range(0, len(sites), max_rows)])
        flips.append(argmax[1:] == alt_id)
        clean.append(bool(argmax[0] == answer_id))
        counterfactual.append(bool(cf_logits.argmax() == alt_id))
        indices.append(case.index)
    if not indices:
        empty = torch.zeros(0, n_sites, dtype=torch.bool)
        return CeilingResult(empty, torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool), [])
    return CeilingResult(torch.stack(flips).cpu(), torch.tensor(clean), torch.tensor(counterfactual), indices)
