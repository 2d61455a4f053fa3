"""``tp``: Transformer-Patcher (Huang et al., ICLR 2023, "Transformer-Patcher: One Mistake Worth One Neuron").

What it is: an edit adds trainable neurons ("patches") to the last FFN of the LM and trains only them on
the edit sample; the backbone's weights are never touched.

What is implemented:
- Patch neuron: key ``k`` [D], bias ``b``, value ``v = e ⊙ a`` [D] (the reference's amplified value). At
  every position with FFN input ``q`` the FFN output gets ``act(z)·v``, ``z = k·q + b``, ``act`` the LM's
  own FFN activation (SiLU for LLaMA, ReLU for OPT). Installed by hooks: a pre-hook reads ``q`` at the
  FFN's input module, a forward hook adds the patch to the output of ``spec.mlp`` (LLaMA ``mlp``
  [B, T, D]; OPT: ``fc1`` reads, ``fc2`` writes, flat [B*T, D]). Text-only inputs pass the same FFN, so
  the patch acts on them too (``text_edits = True``).
- ``neurons = "token"`` (default): one neuron per target token, each firing at the position that predicts
  it (the reference's generation setting, which adds a neuron per wrong target token); ``"edit"``: one
  neuron per edit, trained to fire at every position that predicts a target token.
- Initialisation (reference code): ``k = q_e / |q_e|²``, ``b = 0`` with ``q_e`` the FFN input at the
  neuron's first position (the last prompt token for ``"edit"``), so ``z_e = 1`` there; ``e ~ N(0, 1)``,
  ``a = value_amplify``.
- Losses (reference code, generation defaults): ``L = NLL(target) + act_weight·L_a + memory_weight·L_m``.
  ``L_a``: mean of the ``act_topk`` largest ``exp(act_margin − z_e)`` over each neuron's positions.
  ``L_m``: mean of the ``memory_topk`` largest ``exp(z_m − memory_margin)`` (silent on memory inputs) plus
  the same of ``exp(z_m − z_e + memory_gap)`` (fires ``memory_gap`` higher on the edit than on any memory
  input). Adam with weight decay and gradient clipping.
- Memory: ``prepare(train, dev)`` samples ``memory_records`` train records and stores the last layer's FFN
  inputs for their prompts (``memory_fields``: ``src`` with its image in the task's format, ``loc``
  text-only, optionally ``m_loc``): per prompt its last ``memory_tail`` real positions plus ``memory_other``
  drawn from the rest. ``dev`` is not used.
- Training runs the model once; since the patch adds to the last FFN's output, which goes straight into
  the residual stream, a step only recomputes ``lm_head(final_norm(h + Σ act(z)·v))`` at the target
  positions (``h``: the last layer's output, earlier patches included).
  `attrib.contribution.check_decomposable` refuses backbones where that does not hold (post-norm OPT,
  OPT with ``project_out``).
- Edits accumulate (``lifelong = True``; the paper's sequential setting): every edit adds its neurons to
  the same last FFN, next to the earlier edits' (kept frozen), and is trained with them installed (the
  traced layer output ``h`` already carries their contribution); its memory loss keeps the new neurons
  silent on the memory inputs as for a single edit. All patches sit in one pair of hooks, their neurons
  concatenated (`PatchNeurons.concatenate`), so inference grows in tensor size, not in hooks.
- ``restore()`` removes the hooks and every patch: the backbone is bit-identical to the unedited model.

Departures from the paper / reference code, and why:
- ``"token"`` gives every target token a neuron, even the already right ones (simpler than first finding
  the wrong ones). ``"edit"`` exists because a single value vector cannot spell a novel multi-token word
  (on the default BLIP-2, 0 of 13 multi-token targets fixed, against 13 of 13 with ``"token"``).
- ``fire_only``: the patch adds nothing where ``z ≤ 0``. For ReLU (OPT) this is the paper's neuron; for
  SiLU (LLaMA) ``act(z)`` goes down to −0.28·v below zero, so without the gate a neuron kept silent by the
  memory loss would still add a scaled ``v`` at every token of every input.
- Stopping: the reference trains for epochs and early-stops on a validation check of the memory loss; we
  stop once the edit is predicted (argmax of every target token), every ``z_e > act_margin`` and every
  ``z_m ≤ 0`` (silent on the whole memory), or after ``steps`` steps.
- Plain target NLL instead of the reference's label-smoothed NLL (ε = 0.1); the memory holds prompt
  positions of sampled train records (the reference keeps every decoder position of its memory set);
  ``exp`` arguments are clamped at ``max_exponent`` so a far-off start cannot overflow.
- Without ``prepare`` the memory is empty and only the edit and activation losses are trained.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch
from torch import nn
from transformers.activations import ACT2FN

from attrib.backbones.loader import Backbone
from attrib.backbones.partial import StopForward, forward_until_stopped
from attrib.contribution import check_decomposable
from attrib.data import EditRecord
from attrib.prompts import load_prompts
from editing.editor import Editor, EditRequest
from editing.inputs import teacher_forced_batch
from editing.methods import MethodContext

# spec.mlp (the module whose output is the FFN's residual term) → the module whose input is the FFN's
# input: LLaMA's `mlp` both reads and writes; OPT's `fc1` reads the normed hidden state, `fc2` writes.
FFN_INPUT = {"mlp": "mlp", "fc2": "fc1"}
# memory field → (prompt format, image field or None); "src" uses the task's format.
MEMORY_SOURCES = {"src": (None, "image"), "loc": ("loc", None), "m_loc": ("m_loc", "m_loc")}
NEURON_MODES = ("edit", "token")


@dataclass(frozen=True)
class PatcherConfig:
    """The ``tp`` hyperparameters; meanings in ``editing/methods/config/tp.yaml``."""

    neurons: str
    steps: int
    lr: float
    weight_decay: float
    grad_clip: float
    act_weight: float
    memory_weight: float
    act_margin: float
    memory_margin: float
    memory_gap: float
    act_topk: int
    memory_topk: int
    max_exponent: float
    value_amplify: float
    fire_only: bool
    memory_records: int
    memory_fields: tuple[str, ...]
    memory_tail: int
    memory_other: int
    memory_batch: int

    @classmethod
    def from_hyper(cls, hyper: dict[str, Any]) -> "PatcherConfig":
        names = {f.name for f in fields(cls)}
        missing, unknown = names - set(hyper), set(hyper) - names
        if missing or unknown:
            raise ValueError(f"tp hyperparameters: missing {sorted(missing)}, unknown {sorted(unknown)}")
        if hyper["neurons"] not in NEURON_MODES:
            raise ValueError(f"tp neurons={hyper['neurons']!r}: expected one of {NEURON_MODES}")
        bad = set(hyper["memory_fields"]) - set(MEMORY_SOURCES)
        if bad:
            raise ValueError(f"tp memory_fields {sorted(bad)}: known fields are {sorted(MEMORY_SOURCES)}")
        numbers = {"int": int, "float": float}  # YAML reads e.g. 1e-2 as a string
        values = {f.name: numbers[f.type](hyper[f.name]) if f.type in numbers else hyper[f.name]
                  for f in fields(cls)}
        return cls(**{**values, "memory_fields": tuple(hyper["memory_fields"])})


class PatchNeurons(nn.Module):
    """K FFN neurons: pre-activations ``z = q·Kᵀ + b`` [..., K], values ``V = E ⊙ A`` [K, D]; float32
    whatever the model's dtype."""

    def __init__(self, keys: torch.Tensor, value_directions: torch.Tensor, amplify: float):
        super().__init__()
        self.keys = nn.Parameter(keys.float())  # [K, D]
        self.bias = nn.Parameter(torch.zeros(keys.shape[0], device=keys.device))  # [K]
        self.value_directions = nn.Parameter(value_directions.float())  # E [K, D]
        self.value_scales = nn.Parameter(torch.full_like(self.value_directions, amplify))  # A [K, D]

    @property
    def values(self) -> torch.Tensor:
        return self.value_directions * self.value_scales  # [K, D]

    @classmethod
    def concatenate(cls, parts: Sequence["PatchNeurons"]) -> "PatchNeurons":
        """One frozen set holding every neuron of ``parts`` (in order): the same sum of patches."""
        keys = torch.cat([p.keys for p in parts]).detach()
        whole = cls(keys, torch.cat([p.value_directions for p in parts]).detach(), 1.0)
        with torch.no_grad():
            whole.bias.copy_(torch.cat([p.bias for p in parts]))
            whole.value_scales.copy_(torch.cat([p.value_scales for p in parts]))
        return whole.requires_grad_(False)

    def pre_activation(self, q: torch.Tensor) -> torch.Tensor:
        """q [..., D] → z [..., K]."""
        return q.float() @ self.keys.T + self.bias

    def output(self, z: torch.Tensor, activation: nn.Module, fire_only: bool) -> torch.Tensor:
        """z [..., K] → what the patch adds to the FFN output, [..., D] float32."""
        fired = activation(z)
        if fire_only:
            fired = torch.where(z > 0, fired, torch.zeros_like(fired))
        return fired @ self.values


class PatchHook:
    """``neurons`` installed in the FFN of decoder layer ``layer`` by hooks (``neurons`` may be swapped for a
    larger set while installed); ``remove()`` takes them out."""

    def __init__(self, backbone: Backbone, layer: int, neurons: PatchNeurons, fire_only: bool):
        self.neurons, self.fire_only = neurons, fire_only
        self.activation = ffn_activation(backbone)
        self._input: torch.Tensor | None = None
        input_module, output_module = ffn_modules(backbone, layer)
        self._handles = [input_module.register_forward_pre_hook(self._read_input),
                         output_module.register_forward_hook(self._add_patch)]

    def _read_input(self, module, args) -> None:
        self._input = args[0]  # [B, T, D] or OPT's [B*T, D]

    def _add_patch(self, module, args, output: torch.Tensor) -> torch.Tensor:
        q, self._input = self._input, None
        patch = self.neurons.output(self.neurons.pre_activation(q), self.activation, self.fire_only)
        return output + patch.to(output.dtype)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def ffn_modules(backbone: Backbone, layer: int) -> tuple[nn.Module, nn.Module]:
    """(module whose input is the FFN input, module whose output is the FFN output) of ``layer``."""
    spec = backbone.spec
    if spec.mlp not in FFN_INPUT:
        raise ValueError(f"tp: no FFN input module known for spec.mlp={spec.mlp!r}; add it to FFN_INPUT")
    return (backbone.module(f"{spec.layer_path(layer)}.{FFN_INPUT[spec.mlp]}"),
            backbone.module(spec.layer_path(layer, "mlp")))


def ffn_activation(backbone: Backbone) -> nn.Module:
    """The LM's FFN activation (``hidden_act`` for LLaMA, ``activation_function`` for OPT)."""
    text = backbone.config.text_config
    name = getattr(text, "hidden_act", None) or getattr(text, "activation_function", None)
    if name not in ACT2FN:
        raise ValueError(f"tp: unknown FFN activation {name!r} of the {backbone.spec.name} LM")
    return ACT2FN[name]


def _top_exp_mean(exponents: torch.Tensor, k: int, cap: float) -> torch.Tensor:
    """Mean of the ``k`` largest ``exp(x)`` (the reference's ``top{k}_exp``), ``x`` clamped at ``cap``."""
    flat = exponents.flatten().clamp(max=cap)
    return flat.topk(min(k, flat.numel())).values.exp().mean()


class TransformerPatcher(Editor):
    """Patch neurons in the last FFN, one set per edit, accumulating until ``restore`` (module docstring)."""

    text_edits = True
    lifelong = True

    def __init__(self, context: MethodContext):
        self.backbone = context.backbone
        self.config = PatcherConfig.from_hyper(context.hyper)
        self.task, self.seed = context.task, context.seed
        check_decomposable(self.backbone)  # the last layer's FFN output reaches the head only through norm
        self.layer = self.backbone.n_layers - 1
        self.activation = ffn_activation(self.backbone)
        self.norm = self.backbone.module(self.backbone.spec.final_norm)
        self.lm_head = self.backbone.module(self.backbone.spec.lm_head)
        self.memory: torch.Tensor | None = None  # [M, D] float32 FFN inputs the patch must stay silent on
        self.patches: list[PatchNeurons] = []  # one per live edit, in edit order
        self.hook: PatchHook | None = None  # every patch's neurons, concatenated
        self._values = torch.Generator().manual_seed(context.seed)

    @torch.no_grad()
    def trace(self, inputs, with_output: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward of ``inputs`` → (FFN input of the last layer [B, T, D], the last layer's output
        [B, T, D] or None when not ``with_output``; the forward stops at the FFN input then)."""
        seen: dict[str, torch.Tensor] = {}

        def read_input(module, args):
            seen["q"] = args[0]
            if not with_output:
                raise StopForward

        def read_output(module, args, output):
            seen["h"] = output[0] if isinstance(output, tuple) else output
            raise StopForward

        layer = self.backbone.module(self.backbone.spec.layer_path(self.layer))
        handles = [ffn_modules(self.backbone, self.layer)[0].register_forward_pre_hook(read_input)]
        if with_output:
            handles.append(layer.register_forward_hook(read_output))
        forward_until_stopped(self.backbone, inputs, handles, use_cache=False)
        batch, length = inputs["input_ids"].shape
        q = seen["q"].reshape(batch, length, -1)  # OPT's FFN sees [B*T, D]
        return q, seen["h"].reshape(batch, length, -1) if with_output else None

    # ----------------------------------------------------------------------------------------- memory
    def prepare(self, train: Sequence[EditRecord], dev: Sequence[EditRecord]) -> dict:
        """Collect the memory from ``memory_records`` train records (``dev`` is unused)."""
        start, config = time.perf_counter(), self.config
        rng = random.Random(self.seed)
        records = rng.sample(list(train), min(config.memory_records, len(train)))
        formats = load_prompts()
        states = []
        for field in config.memory_fields:
            prompt_format, image_field = MEMORY_SOURCES[field]
            template = formats[prompt_format or self.task]
            for first in range(0, len(records), config.memory_batch):
                chunk = records[first:first + config.memory_batch]
                images = None if image_field is None else [r.load_image(image_field) for r in chunk]
                inputs = self.backbone.encode(images, [template.format(**r.fields) for r in chunk])
                q, _ = self.trace(inputs, with_output=False)
                states.extend(self._memory_rows(q, inputs["attention_mask"], rng))
        self.memory = torch.cat(states).float() if states else None
        return {"seconds": time.perf_counter() - start, "steps": 0, "memory_records": len(records),
                "memory_size": 0 if self.memory is None else len(self.memory)}

    def _memory_rows(self, q: torch.Tensor, mask: torch.Tensor, rng: random.Random) -> list[torch.Tensor]:
        """Per row of q [B, T, D]: [K, D] at its last ``memory_tail`` real positions and ``memory_other``
        more drawn from its other real positions (mask [B, T])."""
        rows = []
        for row in range(q.shape[0]):
            real = mask[row].nonzero().squeeze(1).tolist()
            cut = max(len(real) - self.config.memory_tail, 0)
            tail, rest = real[cut:], real[:cut]
            picked = tail + rng.sample(rest, min(self.config.memory_other, len(rest)))
            rows.append(q[row, torch.tensor(picked, device=q.device)])
        return rows

    # ------------------------------------------------------------------------------------------ edit
    @torch.enable_grad()  # an edit trains, even when the caller runs under no_grad
    def edit(self, request: EditRequest) -> dict:
        """Train fresh patch neurons on ``request`` with the earlier patches installed, and add them to those;
        returns steps and losses."""
        config = self.config
        batch = teacher_forced_batch(self.backbone, [request.image], [request.prompt], [request.target])
        length, n = batch.inputs["input_ids"].shape[1], batch.target_lengths[0]
        q, h = self.trace(batch.inputs, with_output=True)
        answer = torch.arange(length - n - 1, length - 1, device=q.device)  # positions predicting the target
        q, h = q[0, answer].float(), h[0, answer]  # [n, D] each
        # (position, neuron) pairs where a neuron must fire: one neuron at every position, or one per token.
        positions = torch.arange(n, device=q.device)
        owners = torch.zeros_like(positions) if config.neurons == "edit" else positions
        firsts = q[:1] if config.neurons == "edit" else q  # [K, D] FFN input at each neuron's first position
        directions = torch.randn(firsts.shape, generator=self._values).to(q.device)
        neurons = PatchNeurons(firsts / firsts.pow(2).sum(-1, keepdim=True), directions, config.value_amplify)
        labels = batch.labels(0).to(q.device)
        memory = None if self.memory is None else self.memory.to(q.device)
        parameters = list(neurons.parameters())
        optimizer = torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
        for step in range(config.steps + 1):
            z, logits = self.patched_logits(neurons, q, h)  # [n, K], [n, V]
            z_edit = z[positions, owners]  # [P]
            z_memory = None if memory is None else neurons.pre_activation(memory)  # [M, K]
            losses = self._losses(logits, labels, z_edit, owners, z_memory)
            fixed = bool((logits.argmax(-1) == labels).all()) and bool((z_edit > config.act_margin).all())
            silent = z_memory is None or bool((z_memory <= 0).all())
            if (fixed and silent) or step == config.steps:
                break
            optimizer.zero_grad()
            sum(losses.values()).backward(inputs=parameters)  # no gradient reaches the backbone's weights
            torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
            optimizer.step()
        neurons.requires_grad_(False)
        self.patches.append(neurons)
        installed = PatchNeurons.concatenate(self.patches)
        if self.hook is None:
            self.hook = PatchHook(self.backbone, self.layer, installed, config.fire_only)
        else:
            self.hook.neurons = installed
        return {"steps": step, "neurons": len(firsts), "fixed": fixed, "silent": silent,
                **{name: value.item() for name, value in losses.items()}}

    def patched_logits(self, neurons: PatchNeurons, q: torch.Tensor, h: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``neurons`` give once installed, from states of the model without them (earlier patches in
        place): q [..., D] FFN inputs of the last layer, h [..., D] its outputs → (z [..., K], float32
        logits [..., V])."""
        z = neurons.pre_activation(q)
        hidden = h + neurons.output(z, self.activation, self.config.fire_only).to(h.dtype)
        return z, self.lm_head(self.norm(hidden)).float()

    def _losses(self, logits: torch.Tensor, labels: torch.Tensor, z_edit: torch.Tensor, owners: torch.Tensor,
                z_memory: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """logits [n, V], labels [n], z_edit [P] (neuron ``owners[p]`` at its p-th position), z_memory
        [M, K] or None → the weighted edit, activation and memory losses."""
        config = self.config
        losses = {"edit": nn.functional.cross_entropy(logits, labels),
                  "act": config.act_weight * _top_exp_mean(config.act_margin - z_edit, config.act_topk,
                                                           config.max_exponent)}
        if z_memory is not None:
            below = _top_exp_mean(z_memory - config.memory_margin, config.memory_topk, config.max_exponent)
            gap = _top_exp_mean(z_memory[:, owners] - z_edit + config.memory_gap, config.memory_topk,
                                config.max_exponent)  # [M, P]
            losses["memory"] = config.memory_weight * (below + gap)
        return losses

    def restore(self) -> None:
        """Take the hooks and every patch out; no weight of the backbone was changed."""
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        self.patches = []


def build(context: MethodContext) -> TransformerPatcher:
    return TransformerPatcher(context)
