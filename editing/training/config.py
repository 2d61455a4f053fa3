"""What a VEAD + IM training run is asked to do (`TrainConfig`) and what it reports (`TrainResult`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

RESUMABLE = {"steps", "checkpoint_every"}  # config fields a resumed run may change


@dataclass(frozen=True)
class TrainConfig:
    """Training settings. The loss weights, ``im_tokens`` (24) and the influence noise (σ 0.7 absolute) are
    the paper's and its official code's; ``influence_draws`` is the noise draws per token for the alignment
    targets (official: 1; computed once per record and sample, `editing.training.examples`);
    ``cache_mb`` bounds the in-memory per-record products (a 7B edit signal is ~10 MB);
    ``im_up``: "mean" (the paper's: −mean log σ(IM) over the drawn tokens) or "influence" (the drawn tokens
    weighted by the alignment target, so the gate is pushed open where the edit sample's answer depends
    on the token rather than on the background, which unrelated images share);
    ``loc_partners``: extra locality rows per record, each the M-Loc input of another training record drawn
    at random per step (0 = the record's own M-Loc row only, as the official code);
    ``product_chunk``: records whose per-record products are computed in one batched forward;
    ``scene_weight``: weight of the scene gate's own term (adapters with ``scene_gate`` only):
    −mean log σ(S) on the m_gen rows (the edit's re-rendered image) and −mean log(1 − σ(S)) on the
    locality rows (unrelated images), averaged;
    ``scene_reference``: training images whose mean visual states the salient scene gate subtracts
    (the first N records' ``image``; `editing.adapter.scene_gate`);
    ``rows_per_backward``: run the layers above the edit site on this many rows at a time, back-propagating
    each part before the next (bounds the autograd graph's memory on large backbones; 0 = every row of the
    step at once);
    ``same_image_weight``: weight of a same-image locality term (0 = none, the paper's loss): per record
    that lists same-image questions (`attrib.world.dataset`), its first one on the record's own image,
    held by KL(p_pre ‖ p_post) to the unedited answer under the record's edit — the edit must not
    rewrite what else is asked about its image."""

    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-4
    seed: int = 0
    rel_weight: float = 1.0
    gen_weight: float = 1.0
    loc_weight: float = 1.0
    align_weight: float = 0.1
    up_weight: float = 0.1
    down_weight: float = 0.1
    im_tokens: int = 24
    im_up: str = "mean"
    loc_partners: int = 1
    influence_sigma: float = 0.7
    influence_draws: int = 4
    product_chunk: int = 8
    checkpoint_every: int = 100
    cache_mb: int = 2048
    task: str = "vqa"
    scene_weight: float = 1.0
    scene_reference: int = 256
    rows_per_backward: int = 0
    same_image_weight: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    """steps: last step done; train_s: wall time over this run and the runs it resumes; products_s: the
    part of this run's time spent computing per-record products (`ExampleStore`); history: per-step
    losses of this run; resumed_from: the step a resumed run started after (None = fresh)."""

    steps: int
    train_s: float
    products_s: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None
    checkpoint: Path | None = None


def check_resumable(state: dict, config: TrainConfig, folder: Path) -> None:
    """Refuse to resume the checkpoint ``state`` of ``folder`` with settings other than its own (but for
    `RESUMABLE`) or fewer steps than it has done."""
    theirs = state.get("config", {})  # a field the checkpoint lacks was added since: it ran at its default
    wrong = [f"{f.name}: checkpoint {theirs.get(f.name, f.default)!r}, now {getattr(config, f.name)!r}"
             for f in fields(config)
             if f.name not in RESUMABLE and theirs.get(f.name, f.default) != getattr(config, f.name)]
    if wrong:
        raise ValueError(f"{folder}: cannot resume with other settings ({'; '.join(wrong)})")
    if state["step"] > config.steps:
        raise ValueError(f"{folder}: checkpoint is at step {state['step']}, beyond the {config.steps} steps asked for")
