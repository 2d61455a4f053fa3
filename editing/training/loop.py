"""A VEAD + IM training run: the steps of `editing.training.trainer.Trainer`, checkpointed and resumable.

    editor = VisEditEditor(backbone, placement, VeadConfig(mid_dim=128, n_heads=4, im_hidden=128))
    result = train(editor, load_records("vqa_train.json"), TrainConfig(steps=2000, seed=0), "runs/llava/checkpoint")
    editor.save_weights("runs/llava/adapter.safetensors")
    # killed? the same call with resume=True continues from the last checkpoint, to the same weights

A fresh run re-draws the adapter from the seed (`reset_adapter`) and, for a salient scene gate, sets its
reference states from the training images; a resumed run loads the committed checkpoint
(`editing.training.checkpoint`) and refuses settings other than the checkpoint's, but for ``steps`` and
``checkpoint_every``. Under ``accelerate launch`` only the main process writes checkpoints.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm

from attrib.data import EditRecord
from attrib.errors import TrainingDiverged
from attrib.io import OutputLock, remove_partial_writes
from attrib.parallel import main_first, processes
from editing.adapter.scenes import reference_states
from editing.adapter.visedit import VisEditEditor
from editing.training.checkpoint import load_checkpoint, read_state, save_checkpoint
from editing.training.config import TrainConfig, TrainResult, check_resumable
from editing.training.trainer import Trainer, reset_adapter


def train(editor: VisEditEditor, records: Sequence[EditRecord], config: TrainConfig = TrainConfig(),
          checkpoint_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
          on_step: Callable[[int, dict], None] | None = None, prompts: dict[str, str] | None = None) -> TrainResult:
    """Train ``editor``'s adapter (module docstring); checkpoints every ``config.checkpoint_every`` steps
    and at the end when ``checkpoint_dir`` is given. ``resume`` continues from its committed state (and
    starts fresh when there is none); without it an existing state is refused rather than overwritten.
    The checkpoint folder is locked while training runs (`OutputLock`: a second run on it is refused).
    ``on_step(step, losses)`` is called after each step (tests use it to kill a run).

    A non-finite loss term, gradient or updated weight raises `TrainingDiverged` naming the step, the
    batch's records and the term (losses and gradients before the optimizer step), before any checkpoint
    takes it in: the last good checkpoint stays in ``checkpoint_dir``, and the message names it."""
    folder = None if checkpoint_dir is None else Path(checkpoint_dir)
    with main_first(OutputLock(folder)) if folder is not None else contextlib.nullcontext():
        if folder is not None and processes().main:
            remove_partial_writes(folder)  # a run killed inside a checkpoint write left its temporary files
        return _train(editor, records, config, folder, resume, progress, on_step, prompts)


def _train(editor: VisEditEditor, records: Sequence[EditRecord], config: TrainConfig, folder: Path | None,
           resume: bool, progress: bool, on_step: Callable[[int, dict], None] | None,
           prompts: dict[str, str] | None) -> TrainResult:
    trainer = Trainer(editor, records, config, prompts)
    backbone = editor.backbone
    backbone.model.eval()
    backbone.model.requires_grad_(False)  # frozen: gradients reach only the adapter
    editor.adapter.train()
    start, before_s, resumed = 0, 0.0, None
    state = read_state(folder) if folder is not None else None
    if state is not None and not resume:
        raise ValueError(f"{folder}: a training checkpoint is already there (step {state['step']}); "
                         "resume it (--resume / RESUME=1) or remove the folder")
    if state is not None:
        check_resumable(state, config, folder)
        state = load_checkpoint(folder, editor, trainer.optimizer)
        start, before_s, resumed = state["step"], state.get("train_s", 0.0), state["step"]
    else:
        reset_adapter(editor, config.seed)
        scene = editor.adapter.scene
        if scene is not None and scene.similarity == "salient":
            scene.set_reference(reference_states(trainer.split, trainer.records, config.scene_reference))
    began = time.perf_counter()
    result = TrainResult(start, before_s, resumed_from=resumed)
    saved = start  # the step of the checkpoint on disk (when there is one)
    running: dict[str, float] = {}

    def info() -> dict:
        return {"config": config.to_json(), "seed": config.seed, "n_records": len(trainer.records),
                "placement": editor.placement.to_json(), "train_s": round(before_s + time.perf_counter() - began, 3),
                "running_losses": {k: round(v, 5) for k, v in running.items()}}

    bar = tqdm(range(start + 1, config.steps + 1), initial=start, total=config.steps, desc="train VEAD + IM",
               disable=not progress, mininterval=1)
    for step in bar:
        try:
            step_losses = trainer.step(step)
        except TrainingDiverged as error:
            bar.close()
            kept = ("no checkpoint folder" if folder is None else "no checkpoint written yet" if saved == 0
                    else f"the last good checkpoint (step {saved}) is kept in {folder}")
            raise TrainingDiverged(f"{error}; {kept}") from None
        result.history.append(step_losses)
        for name, value in step_losses.items():  # exponential running means for the progress bar
            running[name] = value if name not in running else 0.9 * running[name] + 0.1 * value
        bar.set_postfix({k: f"{running[k]:.3f}" for k in ("loss", "rel", "t_gen", "m_gen", "loc", "align")})
        result.steps = step
        if on_step is not None:
            on_step(step, step_losses)
        if folder is not None and trainer.procs.main and (step % config.checkpoint_every == 0
                                                          or step == config.steps):
            result.checkpoint = save_checkpoint(folder, editor, trainer.optimizer, step, info())
            saved = step
    bar.close()
    editor.adapter.eval()
    result.train_s = before_s + time.perf_counter() - began
    result.products_s = trainer.store.compute_s
    return result
