"""``ft_l`` / ``ft_v``: fine-tuning on the edit sample alone, the simplest editing baseline (FT-L and
FT-V of MMEdit, Cheng et al. 2023, "Can We Edit Multimodal Large Language Models?").

What is implemented. ``edit(request)`` takes ``steps`` AdamW steps (learning rate ``lr``, decoupled weight
decay ``weight_decay``) on the teacher-forced NLL of the edit's target tokens
(`editing.methods.common.target_loss`, one row: the edit image, the edit prompt, the new target) with
respect to one group of weights; the changed weights stay until ``restore()``, which copies the saved
originals back bit for bit (`ParameterSnapshot`). Edits accumulate (``lifelong = True``, sequential
fine-tuning as in the literature's sequential FT baselines): the snapshot is taken at the first edit
after a ``restore()``, every later edit fine-tunes the weights the earlier ones left, and a positive
``norm_constraint`` bounds the change from those original weights (not from the previous edit's).

- ``ft_l`` tunes the weight of ONE MLP output projection of the language model (LLaVA / MiniGPT-4
  ``mlp.down_proj``, BLIP-2 OPT ``fc2``) of decoder layer ``layer`` (negative counts from the end).
  Default ``layer = -1``, the LAST layer: the multimodal FT-L of the EasyEdit trainer (as published with
  the MMEdit / VLKEB benchmarks; current EasyEdit ships no multimodal FT) lists the last LM layer's MLP
  weights as its ``inner_params`` for BLIP-2 OPT-2.7B, MiniGPT-4 and LLaVA-1.5 alike (the earlier layers
  are there but commented out). ``text_edits = True``.
- ``ft_v`` tunes the vision-to-language bridge (`BackboneSpec.bridge`): every parameter of its last
  module (LLaVA's ``multi_modal_projector``, BLIP-2 / MiniGPT-4's ``language_projection``) plus the last
  ``qformer_layers`` layers of the modules before it (the Q-Former). A text-only input never runs the
  bridge, so ``text_edits = False``: T-Loc is 100 by construction.

The part of the model below the tuned weights cannot change during an edit, so it runs once per edit
(``reuse_prefix``, default on): ``ft_l`` runs the decoder layers below its layer once without gradients
and each step only the layers from it up (`editing.adapter.split.SplitForward`); ``ft_v`` computes the
vision tower's output once (`common.output_reused`). The losses and weights equal those of whole-model
steps to float tolerance (tested with ``reuse_prefix: false``; bit for bit on the three defaults). On the
default BLIP-2, 10 edits alone on two threads: FT-L 110 → 25 ms an edit, FT-V 181 → 148 ms (its LM still
runs forward and backward every step).

Optimiser and schedule follow the reference multimodal FT: AdamW at the edit learning rate for a fixed
number of steps (LLaVA 10 steps at 1e-4, MiniGPT-4 15 at 1e-4, BLIP-2 15 at 2e-4; ``config/ft_*.yaml``),
the weight decay torch's AdamW default of 0.01 that the reference passes implicitly, no norm
constraint (``norm_constraint = 0``; a positive value clamps every weight to within that distance of its
original after each step, as EasyEdit's text-only FT does), no early stop.

Departures from the reference, and why:
- ``ft_l`` tunes the output projection only; the reference also tunes the input projection (``fc1`` /
  ``up_proj``) of the same layer. One matrix keeps FT-L comparable with the other single-site editors.
- ``ft_v`` tunes the projection and the last Q-Former layer(s); the reference tunes the whole Q-Former
  and leaves the projection (LAVIS ``opt_proj`` / ``llama_proj``) alone. The projection is the bridge's
  only part on LLaVA, so tuning it on every family makes the three comparable; ``qformer_layers`` sets
  how much of the Q-Former joins.
- The model stays in eval mode (the reference switches to train mode, i.e. dropout on), so an edit is
  deterministic and does not depend on the seed.
- The learning rate is given at the reference LM width (``reference_width``: 4096 for Vicuna-7B, 2560 for
  OPT-2.7B) and scaled by reference_width / hidden_size (`FinetuneConfig.learning_rate`): the 7B
  checkpoints get the reference rate exactly; the toy models (width 128) get x32 / x20, without which the
  reference rate barely moves them (toy BLIP-2 FT-L Rel 0/10 at 2e-4, 7/10 at 4e-3).
- Weights are updated through float32 master copies (the reference casts the whole model to float32), so
  half-precision checkpoints edit with float32 Adam state; on a float32 model this is the same update.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable

import torch

from attrib.backbones.loader import Backbone
from editing.adapter.split import SplitForward
from editing.editor import Editor, EditRequest
from editing.inputs import teacher_forced_batch
from editing.methods import MethodContext
from editing.methods.common import ParameterSnapshot, batch_loss, output_reused


@dataclass(frozen=True)
class FinetuneConfig:
    """steps: optimiser steps per edit; lr, weight_decay: AdamW's (lr at ``reference_width``, see
    `learning_rate`); norm_constraint: largest change of any weight entry (0 = none); layer: the LM layer
    of ``ft_l``; qformer_layers: Q-Former layers ``ft_v`` tunes besides the projection; reuse_prefix: run
    the frozen part below the tuned weights once per edit, not every step (the module docstring)."""

    steps: int
    lr: float
    weight_decay: float = 0.0
    norm_constraint: float = 0.0
    layer: int = -1
    qformer_layers: int = 1
    reference_width: int = 0
    reuse_prefix: bool = True

    def learning_rate(self, backbone: Backbone) -> float:
        """``lr`` moved from the LM width it was set for (``reference_width``; 0 = as given) to the
        backbone's: Adam moves every weight by about ``lr`` per step, so a layer's output moves in
        proportion to its fan-in, and the same step on a narrower model needs a proportionally larger
        rate (the muP rule for Adam)."""
        if not self.reference_width:
            return self.lr
        return self.lr * self.reference_width / backbone.config.text_config.hidden_size

    @classmethod
    def from_hyper(cls, hyper: dict) -> "FinetuneConfig":
        unknown = set(hyper) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"fine-tuning config: unknown key(s) {sorted(unknown)}")
        return cls(**hyper)


def mlp_output_projection(backbone: Backbone, layer: int) -> torch.nn.Linear:
    """The Linear that writes the MLP's output into the residual stream of LM decoder ``layer``
    (negative counts from the end): the spec's MLP module itself when it is a Linear (OPT's ``fc2``),
    else its last Linear child (Llama's ``down_proj``)."""
    index = layer % backbone.n_layers
    module = backbone.module(backbone.spec.layer_path(index, "mlp"))
    if not isinstance(module, torch.nn.Linear):
        linears = [child for child in module.children() if isinstance(child, torch.nn.Linear)]
        if not linears:
            raise ValueError(f"layer {index}: MLP module {type(module).__name__} has no Linear child")
        module = linears[-1]
    if module.out_features != backbone.config.text_config.hidden_size:
        raise ValueError(f"layer {index}: the MLP's last Linear writes {module.out_features} features, "
                         f"not the LM width {backbone.config.text_config.hidden_size}")
    return module


def bridge_parameters(backbone: Backbone, qformer_layers: int) -> list[torch.nn.Parameter]:
    """Every parameter of the bridge's last module (the projection into the LM) and of the last
    ``qformer_layers`` layers of each module before it (its first ModuleList: the Q-Former's layers)."""
    *before, projection = backbone.spec.bridge
    parameters = list(backbone.module(projection).parameters())
    for path in before:
        stacks = [m for m in backbone.module(path).modules() if isinstance(m, torch.nn.ModuleList)]
        if not stacks:
            raise ValueError(f"bridge module {path!r} has no layer list to take the last layers of")
        layers = list(stacks[0])
        for layer in layers[max(len(layers) - qformer_layers, 0):] if qformer_layers > 0 else []:
            parameters.extend(layer.parameters())
    return parameters


class FinetuneEditor(Editor):
    """Fine-tunes ``parameters`` on each edit, edits accumulating until ``restore`` (module docstring)."""

    lifelong = True

    def __init__(self, backbone: Backbone, parameters: list[torch.nn.Parameter], config: FinetuneConfig,
                 text_edits: bool, tuned_layer: int | None = None):
        """tuned_layer: the decoder layer holding every tuned weight (``ft_l``), whose layers below run
        once per edit; None: the weights sit before the LM (``ft_v``), whose vision tower runs once."""
        self.backbone = backbone
        self.parameters = parameters
        self.config = config
        self.tuned_layer = tuned_layer
        self.lr = config.learning_rate(backbone)
        self.text_edits = text_edits
        self.snapshot: ParameterSnapshot | None = None
        self.last_losses: list[float] = []  # the target loss before each step of the latest edit

    @torch.enable_grad()  # an edit trains, even when the caller runs under no_grad
    def edit(self, request: EditRequest) -> list[float]:
        """Fine-tune on ``request``; returns the target loss before each step."""
        if self.snapshot is None:
            self.snapshot = ParameterSnapshot(self.parameters)
        original = self.snapshot.saved
        masters = [p.detach().float().clone() for p in self.parameters]
        optimiser = torch.optim.AdamW(masters, lr=self.lr, weight_decay=self.config.weight_decay)
        flags = {p: p.requires_grad for p in self.backbone.model.parameters()}
        self.last_losses = []
        tuned = set(self.parameters)
        try:
            for parameter in flags:  # grads for the tuned weights only (memory on 7B models)
                parameter.requires_grad_(parameter in tuned)
            with ExitStack() as stack:
                loss_of = self._loss_of(request, stack)
                for _ in range(self.config.steps):
                    loss = loss_of()
                    self.last_losses.append(loss.item())
                    grads = torch.autograd.grad(loss, self.parameters)
                    for master, grad in zip(masters, grads, strict=True):
                        master.grad = grad.float()
                    optimiser.step()
                    self._write_back(masters, original)
        finally:
            for parameter, flag in flags.items():
                parameter.requires_grad_(flag)
        return self.last_losses

    def _loss_of(self, request: EditRequest, stack: ExitStack) -> Callable[[], torch.Tensor]:
        """A callable giving `common.target_loss` of ``request`` under the current weights; the frozen
        part below the tuned weights runs once here when ``reuse_prefix`` (module docstring)."""
        images = None if request.image is None else [request.image]
        batch = teacher_forced_batch(self.backbone, images, [request.prompt], [request.target])
        if self.config.reuse_prefix and self.tuned_layer is not None:
            split = SplitForward(self.backbone, self.tuned_layer - 1)
            site = split.prefix(batch.inputs)
            return lambda: batch_loss(batch, split.top(site))
        if self.config.reuse_prefix and images is not None:
            stack.enter_context(output_reused(self.backbone.module(self.backbone.spec.vision_tower)))
        return lambda: batch_loss(batch, self.backbone.forward(batch.inputs, use_cache=False).logits)

    @torch.no_grad()
    def _write_back(self, masters: list[torch.Tensor], original: list[torch.Tensor]) -> None:
        eps = self.config.norm_constraint
        for parameter, master, saved in zip(self.parameters, masters, original, strict=True):
            if eps > 0:
                master.copy_(torch.clamp(master, saved.float() - eps, saved.float() + eps))
            parameter.copy_(master)

    def restore(self) -> None:
        if self.snapshot is not None:
            self.snapshot.restore()
            self.snapshot = None


def build(context: MethodContext) -> FinetuneEditor:
    """``ft_l`` (one LM MLP output projection) or ``ft_v`` (the bridge), by ``context.name``."""
    config = FinetuneConfig.from_hyper(context.hyper)
    backbone = context.backbone
    if context.name == "ft_l":
        return FinetuneEditor(backbone, [mlp_output_projection(backbone, config.layer).weight], config, True,
                              tuned_layer=config.layer % backbone.n_layers)
    if context.name == "ft_v":
        return FinetuneEditor(backbone, bridge_parameters(backbone, config.qformer_layers), config, False)
    raise ValueError(f"finetune serves ft_l and ft_v, not {context.name!r}")
