"""``visedit`` (the paper's VEAD + IM, nothing added) and ``visedit_gated`` (ours: with the scene gate and
VEAD's target role) as comparison methods.

Both are `VisEditEditor` at the placement the comparison read from the attribution artifact of the
training records (``context.extra["placement"]``), sized from the LM width (`sized_vead_config`), and
trained in ``prepare`` on the training records with `editing.training.trainer.train` (checkpointed
under ``context.work``, resumed when a run was cut). The adapter adds to visual-token states only, so an
edit can never change a text-only input: T-Loc is 100 by construction (``text_edits = False``).
"""
from __future__ import annotations

import time
from typing import Sequence

from attrib.data import EditRecord
from editing.adapter.vead import lm_width
from editing.adapter.visedit import VisEditEditor
from editing.methods import MethodContext
from editing.training.recipe import default_lr, default_steps, sized_vead_config
from editing.training.trainer import TrainConfig, train


class VisEditMethod(VisEditEditor):
    """`VisEditEditor` whose ``prepare`` trains the adapter (module docstring)."""

    text_edits = False

    def __init__(self, context: MethodContext):
        gated = context.name == "visedit_gated"
        width = lm_width(context.backbone.config)
        config = sized_vead_config(width, scene_gate=gated, target_role=gated)
        super().__init__(context.backbone, context.extra["placement"], config)
        self.context = context
        hyper = context.hyper
        self.train_config = TrainConfig(steps=int(hyper.get("steps") or default_steps(context.backbone.spec.name)),
                                        batch_size=int(hyper.get("batch_size", 4)),
                                        lr=float(hyper.get("lr") or default_lr(width)), seed=context.seed,
                                        task=context.task, checkpoint_every=int(hyper.get("checkpoint_every", 100)),
                                        same_image_weight=float(hyper.get("same_image_weight", 0.0)))

    def close(self) -> None:
        self.remove()

    def prepare(self, train_records: Sequence[EditRecord], dev: Sequence[EditRecord]) -> dict:
        start = time.perf_counter()
        folder = None if self.context.work is None else self.context.work / "checkpoint"
        result = train(self, train_records, self.train_config, folder, resume=True, progress=self.context.progress)
        return {"train_s": round(result.train_s, 2), "wall_s": round(time.perf_counter() - start, 2),
                "steps": result.steps, "config": self.train_config.to_json(),
                "adapter": self.config.to_json(), "placement": self.placement.to_json()}


def build(context: MethodContext) -> VisEditMethod:
    if "placement" not in context.extra:
        raise ValueError(f"{context.name}: the comparison passes the placement (context.extra['placement'])")
    return VisEditMethod(context)
