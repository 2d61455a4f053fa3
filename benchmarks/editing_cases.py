"""What the editing plugin costs: an edited forward against the unedited one, and a training step with the
no-grad prefix (`editing.adapter.split.SplitForward`) against the same step with the whole model under autograd.

Both run one `VisEditEditor` on a `BenchModel`, with the edit signal of the model's first sample, and
time interleaved medians (`benchmarks.timing.interleaved`).
"""
from __future__ import annotations

from typing import Any

import torch

from benchmarks.setups import BenchModel
from benchmarks.timing import interleaved
from editing.adapter.split import SplitForward
from editing.adapter.vead import VeadConfig, count_parameters, lm_width
from editing.adapter.visedit import VisEditEditor
from editing.editor import EditRequest
from editing.inputs import teacher_forced_batch
from editing.training.examples import answer_positions
from editing.training.losses import target_nll
from editing.training.recipe import sized_vead_config


def scaled_vead_config(width: int) -> VeadConfig:
    """The paper's adapter (mid 1024 on a 4096-wide LM) scaled with the width: mid = width / 4, with the
    scene gate on, as `make edit` trains it."""
    return sized_vead_config(width, mid_dim=max(8, width // 4), scene_gate=True)


def _stored_signal(editor: VisEditEditor, bench: BenchModel, batch_size: int, target: str):
    """The edit signal of the bench's first sample, lined up with a batch of ``batch_size`` inputs."""
    signal = editor.edit(EditRequest(bench.images[0], bench.prompts[0], target))
    scene = editor.adapter.scene
    if scene is not None and scene.similarity == "salient":
        # Timing only: the reference's values do not change the cost (training sets the images' mean;
        # the bench has too few images for one — a reference equal to an image leaves nothing salient).
        scene.set_reference(torch.zeros_like(signal.visual_states()[0], dtype=torch.float32))
    signal = signal.for_batch(batch_size)
    editor.restore()
    return signal


def _forward(editor: VisEditEditor, inputs, signal, edited: bool):
    """A timed callable: the last-position logits of ``inputs``, with or without ``signal`` set."""
    def run() -> torch.Tensor:
        editor.hook.signal = signal if edited else None
        try:
            with torch.no_grad():
                return editor.backbone.forward(inputs).logits[:, -1]
        finally:
            editor.restore()
    return run


def _training_steps(editor: VisEditEditor, batch, signal, edit_layer: int) -> dict:
    """Two timed callables computing the same training step: the whole model under autograd
    (``step_full``) and the no-grad prefix plus the differentiable top (``step_split``)."""
    select, mask = answer_positions(batch.target_lengths, batch.inputs["input_ids"].shape[1])
    labels = batch.inputs["input_ids"].gather(1, select + 1)
    split = SplitForward(editor.backbone, edit_layer, editor.hook)
    params = list(editor.adapter.parameters())

    def backprop(answer_logits: torch.Tensor) -> float:
        loss = target_nll(torch.log_softmax(answer_logits.float(), -1), labels, mask)
        loss.backward()
        for p in params:
            p.grad = None
        return loss.item()

    @torch.enable_grad()  # `interleaved` times under no_grad
    def step_full() -> float:
        editor.hook.signal = signal
        try:
            logits = editor.backbone.forward(batch.inputs).logits
        finally:
            editor.restore()
        return backprop(logits.gather(1, select[..., None].expand(-1, -1, logits.shape[-1])))

    @torch.enable_grad()
    def step_split() -> float:
        site = split.prefix(batch.inputs)
        editor.hook.signal = signal
        try:
            logits = split.top(site, editor.hook.apply, select)
        finally:
            editor.restore()
        return backprop(logits)

    return {"step_full": step_full, "step_split": step_split}


def vead_case(bench: BenchModel, edit_layer: int, config: VeadConfig, repeats: int,
              batch_size: int = 1, target: str = "red") -> dict[str, Any]:
    """Edited / unedited forward latency and full-autograd / split training-step time on ``bench``.

    The forward pair runs the same ``batch_size`` inputs with and without the edit signal set. The
    training pair computes the edit-target NLL on the same batch and back-propagates into the adapter:
    once as one forward of the whole model (the hook rewrites the edit layer, autograd records
    everything from there), once as the no-grad prefix plus the differentiable top that the trainer
    uses (which also reads logits only at the answer positions).
    """
    backbone = bench.backbone
    editor = VisEditEditor(backbone, {"edit_layer": edit_layer}, config)
    try:
        images, prompts = bench.images[:batch_size], bench.prompts[:batch_size]
        signal = _stored_signal(editor, bench, batch_size, target)
        inputs = backbone.encode(images, prompts)
        batch = teacher_forced_batch(backbone, images, prompts, [target] * batch_size)
        # The adapter adds a few % to a forward, less than the run-to-run noise of a CPU machine: the forward
        # pair gets three times the repeats of the (slower, far apart) training steps.
        forwards = interleaved({"unedited": _forward(editor, inputs, signal, False),
                                "edited": _forward(editor, inputs, signal, True)}, 3 * repeats)
        steps = interleaved(_training_steps(editor, batch, signal, edit_layer), repeats)
        same_loss = abs(steps.results["step_full"] - steps.results["step_split"])
        changed = (forwards.results["edited"] - forwards.results["unedited"]).abs().max().item()
        return {
            "vead_inference_overhead": forwards.ratio("edited", "unedited"),
            "vead_prefix_speedup": steps.ratio("step_full", "step_split"),
            "edited_forward_s": forwards.median("edited"), "unedited_forward_s": forwards.median("unedited"),
            "step_full_s": steps.median("step_full"), "step_split_s": steps.median("step_split"),
            # The two training steps must compute the same loss; the edited forward must differ from the
            # unedited one (else the adapter was bypassed and the overhead means nothing).
            "step_loss_abs_diff": same_loss, "edited_logit_max_change": changed,
            "edit_layer": edit_layer, "n_layers": backbone.n_layers, "width": lm_width(backbone.config),
            "adapter": config.to_json(), "adapter_parameters": count_parameters(editor.adapter),
            "batch": batch_size, "seq_len": inputs["input_ids"].shape[1],
            "timings": forwards.summary() | steps.summary(),
        }
    finally:
        editor.remove()
