"""The scene router (our extension, for many live edits): which stored edit image, if any, an input image
is a rendering of.

With one edit the scene gate only has to part the edit's re-rendered image from *an* unrelated image; with
N edits in the bank (`editing.adapter.bank`) the input must also be closer to its own edit image than to
the N − 1 others, and unrelated images must stay below the threshold against all N. The gate's fixed
similarity does not do that: on dev (BLIP-2 default, the 201 dev edits whose scenes are distinct, all
live), an image rephrase's median similarity to its own edit image is 0.88 and to the closest other edit
image 0.84, an unrelated image's to its closest edit image 0.84 (`docs/experiments/lifelong.md`).

The router learns a representation in which they part: a set encoder over the edit layer's visual states
(each token minus the training images' mean state at its position, a token-wise two-layer MLP, the mean
over tokens, a linear map, unit length), trained contrastively on the training records only — each edit
image and its image rephrase a positive pair, every other image of the batch a negative (InfoNCE both ways,
temperature τ), pairs of records in one ``group`` (the same scene, or the same image file) never negatives.
An input goes to the stored edit with the highest cosine when that cosine reaches the threshold of the
bank's size, to none otherwise. The thresholds are chosen on dev records (`choose_threshold`), one per bank
size 1, 10, 100, … and the largest bank dev can build (the dev edits plus the training images): a larger
bank holds more images an unrelated input can come close to, so it needs a higher threshold, while a
small bank can let through the image rephrases that the high one turns away. A bank of N edits takes the
threshold of the smallest calibrated size ≥ N (the largest when N exceeds them all).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class ContrastiveConfig:
    """An encoder's sizes (MLP width, embedding size) and its contrastive training (InfoNCE temperature,
    epochs, batch, AdamW lr and weight decay, seed): the scene router's and the question gate's."""

    hidden: int = 512
    dim: int = 128
    temperature: float = 0.1
    epochs: int = 60
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RouterConfig(ContrastiveConfig):
    """The set encoder's sizes and its training (module docstring); the defaults were chosen on dev."""


class SceneRouter(nn.Module):
    """``forward(visual [B, P, d]) → [B, dim]`` unit scene embeddings; ``thresholds[k]`` the cosine an
    input needs to its closest stored edit image to be routed there when the bank holds up to
    ``bank_sizes[k]`` edits (`threshold_for`)."""

    def __init__(self, width: int, n_tokens: int, config: RouterConfig = RouterConfig(), n_sizes: int = 1):
        super().__init__()
        self.config = config
        self.token = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, config.hidden), nn.GELU(),
                                   nn.Linear(config.hidden, config.hidden))
        self.out = nn.Sequential(nn.GELU(), nn.Linear(config.hidden, config.dim))
        self.register_buffer("reference", torch.zeros(n_tokens, width))
        self.register_buffer("bank_sizes", torch.ones(n_sizes, dtype=torch.long))
        self.register_buffer("thresholds", torch.ones(n_sizes))

    def set_thresholds(self, sizes: Sequence[int], thresholds: Sequence[float]) -> None:
        """Replace the thresholds: ``thresholds[k]`` for a bank of up to ``sizes[k]`` edits (ascending)."""
        if len(sizes) != len(thresholds) or not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] < 1:
            raise ValueError(f"scene router: bank sizes {list(sizes)} must be ascending, distinct, ≥ 1 and "
                             f"match the {len(thresholds)} thresholds")
        device = self.reference.device
        self.bank_sizes = torch.tensor(list(sizes), dtype=torch.long, device=device)
        self.thresholds = torch.tensor(list(thresholds), dtype=self.thresholds.dtype, device=device)

    def threshold_for(self, n: int) -> torch.Tensor:
        """The threshold of a bank of ``n`` edits: the smallest calibrated size ≥ n, else the largest."""
        k = min(int(torch.searchsorted(self.bank_sizes, torch.tensor(n, device=self.bank_sizes.device))),
                len(self.bank_sizes) - 1)
        return self.thresholds[k]

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        if visual.shape[1:] != self.reference.shape:
            raise ValueError(f"scene router: visual states {tuple(visual.shape[1:])} do not match the "
                             f"{tuple(self.reference.shape)} it was built for")
        # The token encoder's last layer is linear, so it is applied once to the mean over tokens rather
        # than to every token before the mean: the same embedding (to rounding) for 1/P of that layer's cost.
        hidden = visual.to(self.reference.dtype) - self.reference
        for layer in list(self.token)[:-1]:
            hidden = layer(hidden)
        pooled = self.token[-1](hidden.mean(1))
        return nn.functional.normalize(self.out(pooled), dim=-1)

    @torch.no_grad()
    def scores(self, visual: torch.Tensor, edits: torch.Tensor) -> torch.Tensor:
        """[B, N] cosine of every input row's embedding with every stored edit's (``edits`` [N, dim])."""
        return self(visual) @ edits.to(self.reference.dtype).T


def fit_router(router: SceneRouter, first: torch.Tensor, second: torch.Tensor, groups: Sequence,
               progress: bool = False) -> list[float]:
    """Train ``router`` on pairs ``first[i]`` ~ ``second[i]`` ([n, P, d] visual states of each training
    record's image and image rephrase); ``groups[i]`` any hashable, records of one group are never each
    other's negatives. Sets the reference to the mean state of ``first``; returns the loss per epoch."""
    from tqdm.auto import tqdm

    config = router.config
    if len(first) != len(second) or len(first) != len(groups) or len(first) < 2:
        raise ValueError(f"scene router: {len(first)} images, {len(second)} rephrases and {len(groups)} groups; "
                         f"need two or more matching pairs")
    ids = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    group = torch.tensor([ids[g] for g in groups])
    with torch.no_grad():
        router.reference.copy_(first.mean(0))
    generator = torch.Generator().manual_seed(config.seed)
    reset_seeded(router, config.seed)
    optimizer = torch.optim.AdamW(router.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    router.train()
    losses = []
    for _ in tqdm(range(config.epochs), desc="scene router", disable=not progress):
        order = torch.randperm(len(first), generator=generator)
        total, batches = 0.0, 0
        for lo in range(0, len(order), config.batch_size):
            index = order[lo:lo + config.batch_size]
            if len(index) < 2:
                continue
            loss = contrastive_loss(router(first[index]), router(second[index]), group[index], config.temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        losses.append(total / batches)
    router.eval()
    return losses


def reset_seeded(model: nn.Module, seed: int) -> None:
    """Draw every submodule's parameters afresh (``reset_parameters``, in module order) from ``seed``,
    leaving the global random state as it was: a fit starts from the same weights whatever ran before."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for module in model.modules():
            if module is not model and hasattr(module, "reset_parameters"):
                module.reset_parameters()


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, group: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE both ways between unit embeddings ``a`` [n, k] and ``b`` [n, k] (row i of each a positive
    pair); pairs (i, j ≠ i) of one ``group`` are left out of the negatives."""
    logits = a @ b.T / temperature
    same = (group[:, None] == group[None]) & ~torch.eye(len(a), dtype=torch.bool, device=a.device)
    logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target))


def calibration_sizes(largest: int) -> list[int]:
    """The bank sizes dev calibrates a threshold for: 1, 10, 100, … below ``largest``, then ``largest``."""
    sizes, k = [], 1
    while k < largest:
        sizes.append(k)
        k *= 10
    return [*sizes, largest]


def _drawn_max(cos: torch.Tensor, excluded: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """[r] per row of ``cos`` [r, B], the largest cosine among ``k`` entries drawn at random from those not
    ``excluded`` (all of them when fewer are left); -inf when none is drawn."""
    keys = torch.rand(cos.shape, generator=generator)
    keys[excluded] = 2.0  # drawn last, and masked below
    rank = keys.argsort(1).argsort(1)
    drawn = (rank < k) & ~excluded
    return cos.masked_fill(~drawn, float("-inf")).amax(1)


@torch.no_grad()
def choose_threshold(router: SceneRouter, edit: torch.Tensor, rephrase: torch.Tensor, unrelated: torch.Tensor,
                     groups: tuple[Sequence, Sequence], stored: torch.Tensor | None = None,
                     stored_groups: Sequence = ()) -> dict:
    """Set the router's thresholds from dev records, one per bank size of `calibration_sizes` up to every
    dev edit live plus, as further stored edits, ``stored`` (e.g. the training images: a bank as large as
    the ones the router will face). For each size N, each image rephrase faces its own edit and N − 1
    stored edits drawn at random (seeded), each unrelated (M-Loc) image the edit of its dev record (row i
    of ``unrelated`` belongs to edit i mod n) and N − 1 drawn ones; the threshold is the cosine that
    maximises the share of rephrases routed to their own edit plus the share of unrelated images routed to
    none. ``edit`` / ``rephrase`` / ``unrelated`` [n, P, d] visual states; ``groups``: (each dev edit's,
    each unrelated image's) group — a stored image of a row's own group is not a competitor (it shows the
    same image); ``stored`` [m, P, d] with ``stored_groups``. Returns the dev measurements: those of the
    largest bank at the top level, every size's under ``by_bank_size``."""
    edit_groups, unrelated_groups = list(groups[0]), list(groups[1])
    ids = {g: i for i, g in enumerate(dict.fromkeys([*edit_groups, *unrelated_groups, *stored_groups]))}
    edit_ids = torch.tensor([ids[g] for g in edit_groups])
    unrelated_ids = torch.tensor([ids[g] for g in unrelated_groups])
    edits = router(edit)
    bank, bank_ids = edits, edit_ids
    if stored is not None and len(stored):
        extra = torch.cat([router(stored[lo:lo + 256]) for lo in range(0, len(stored), 256)])
        bank, bank_ids = torch.cat([edits, extra]), torch.cat([edit_ids, torch.tensor([ids[g] for g in stored_groups])])
    own = torch.arange(len(edit))
    to_rephrase = router(rephrase) @ bank.T  # [n, n + m]
    own_cos = to_rephrase[own, own].clone()
    rephrase_excluded = edit_ids[:, None] == bank_ids[None]  # own group, own edit included
    to_unrelated = router(unrelated) @ bank.T
    paired = torch.arange(len(unrelated)) % len(edit)  # the dev edit each unrelated image comes with
    paired_cos = to_unrelated[torch.arange(len(unrelated)), paired]
    paired_cos = paired_cos.masked_fill(unrelated_ids == edit_ids[paired], float("-inf"))
    unrelated_excluded = unrelated_ids[:, None] == bank_ids[None]
    unrelated_excluded[torch.arange(len(unrelated)), paired] = True  # it is in the bank already
    generator = torch.Generator().manual_seed(router.config.seed)
    by_size, exact = [], []
    for size in calibration_sizes(len(bank)):
        own_best = own_cos > _drawn_max(to_rephrase, rephrase_excluded, size - 1, generator)
        closest = torch.maximum(paired_cos, _drawn_max(to_unrelated, unrelated_excluded, size - 1, generator))
        candidates = torch.cat([own_cos, closest[torch.isfinite(closest)]]).unique()
        routed = (own_best[None] & (own_cos[None] >= candidates[:, None])).float().mean(1)
        clean = (closest[None] < candidates[:, None]).float().mean(1)
        best = int((routed + clean).argmax())
        exact.append(float(candidates[best]))
        by_size.append({"bank_size": size, "threshold": round(float(candidates[best]), 4),
                        "dev_rephrase_routed_to_own": round(100 * float(routed[best]), 1),
                        "dev_unrelated_routed_to_none": round(100 * float(clean[best]), 1),
                        "dev_rephrase_closest_is_own": round(100 * float(own_best.float().mean()), 1)})
    router.set_thresholds([row["bank_size"] for row in by_size], exact)
    largest = by_size[-1]
    return {"threshold": largest["threshold"], "dev_edits": len(edit), "stored_besides": len(bank) - len(edit),
            **{k: v for k, v in largest.items() if k.startswith("dev_")}, "by_bank_size": by_size}


def image_groups(records: Sequence, field: str = "image") -> list:
    """Each record's ``field`` image as a group: its scene (`attrib.world.scene.Scene.object_key`) when the
    records are an unchanged world split, else the image file itself."""
    from attrib.world.rebuild import WorldRebuild

    rebuild = WorldRebuild()
    worlds = [rebuild.world_record(record) for record in records]
    if all(world is not None for world in worlds):
        return [world.scenes[field].object_key() for world in worlds]
    return [str(record.image_path(field).resolve()) for record in records]
