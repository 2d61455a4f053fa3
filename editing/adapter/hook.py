"""Putting an `EditAdapter` into a VLLM with PyTorch hooks, touching only the visual-token slice.

Where it writes (``edit_layer``):
- ``ℓ ≥ 0``: a forward hook on decoder layer ℓ rewrites that layer's output (the input of ℓ + 1).
- ``-1``: a forward *pre*-hook on decoder layer 0 rewrites the LM's input, i.e. the embeddings after the
  image merge (LLaVA: projector output scattered into the image-token slots; BLIP-2 / MiniGPT-4: the
  Q-Former queries after ``language_projection``; OPT adds its learned positions before layer 0).

How the hook learns where the visual tokens are: the decoder layer only sees hidden states, so a
forward pre-hook on the *root* model reads ``input_ids`` of every call and pushes the image-token
positions ([B, P], `locate_visual_tokens`) on a stack; a forward hook on the root (``always_call``, so
exceptions too) pops them. Calls that do not go through the root see an empty stack and are left alone
— that is how text-only inputs of BLIP-2 / MiniGPT-4 (run by ``language_model``) bypass the adapter.
Gotcha: BLIP-2's ``generate`` calls ``language_model.generate`` directly; wrap such calls in
``with hook.visual_positions(backbone.visual_positions(input_ids)):`` (the editor's ``generate`` does).

Two ways to hold edits: ``signal`` (one edit broadcast over the batch, or one per input row — what the
trainer sets) or ``bank`` (`editing.adapter.bank.EditBank`: any number of stored edits, each input row
routed to the one that concerns it — what `VisEditEditor.edit` fills). ``signal`` wins when both are set.

Bypass rules (the layer's tensor is returned as is, bit-identical): no edit signal set and the bank
empty, adapter closed, no visual positions known for this call (text-only input), a single-token step
(cached decoding), or, with the bank, no row routed to any edit.

Question gate (`editing.adapter.question_gate`, with ``question_gate`` set and edits in the bank that carry
a question key): a row the bank routes to an edit is left untouched unless its question key (from the
forward's input ids, read by the token-embedding pre-hook below) reaches the gate's threshold with the
edit's; a forward run from ``inputs_embeds`` has no ids and is refused.

Output writes (`editing.adapter.output_write`, with ``write_config`` set and edits in the bank that carry
one): a forward pre-hook on the LM head adds them to the rows the bank routed in this forward; the input
ids come from a forward pre-hook on the LM's token embedding, which every forward calls once (also
BLIP-2's ``generate``). The routing of a multi-token forward is kept through the single-token steps of
cached decoding that follow it, and dropped by the next multi-token forward that routes nothing; so are its
input ids, each step's token appended, for the tokens before a repeated trigger.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from attrib.backbones.processing import locate_visual_tokens
from attrib.backbones.spec import BackboneSpec
from editing.adapter.bank import EditBank
from editing.adapter.output_write import OutputWriteConfig
from editing.adapter.question_gate import QuestionEncoder
from editing.adapter.vead import EditAdapter, EditSignal

LM_INPUT = -1  # edit_layer value meaning "the LM's input embeddings"


class AdapterHook:
    """An `EditAdapter` installed at ``edit_layer`` of ``model``; ``remove()`` takes it out again.

    ``signal`` is the current edit (None = unedited) and ``bank`` the stored edits (module docstring);
    ``last_gate_logits`` keeps the IM logits [B, P] of the most recent rewrite (detached), for IM maps,
    and ``last_scene_logits`` the scene gate's [B] (None without one); with the bank, each row's under the
    edit it was routed to, whether or not the row was then left untouched.
    """

    def __init__(self, model: nn.Module, spec: BackboneSpec, adapter: EditAdapter, edit_layer: int):
        config = model.config
        n_layers = config.text_config.num_hidden_layers
        if not LM_INPUT <= edit_layer < n_layers:
            raise ValueError(f"edit_layer {edit_layer} is outside -1..{n_layers - 1} for this {spec.name} "
                             f"backbone (-1 = the LM's input)")
        self.model, self.spec, self.adapter, self.edit_layer = model, spec, adapter, edit_layer
        self.image_token_id = config.image_token_id
        self.n_visual = spec.n_visual_tokens(config)
        self.signal: EditSignal | None = None
        self.bank = EditBank(adapter)
        self.is_open = True
        self.last_gate_logits: torch.Tensor | None = None
        self.last_scene_logits: torch.Tensor | None = None
        self.write_config: OutputWriteConfig | None = None
        self.writes_enabled = True
        self.routed: tuple[torch.Tensor, torch.Tensor] | None = None  # (edit [B], fire [B]) of the last routing
        self.question_gate: QuestionEncoder | None = None
        self.last_question_cos: torch.Tensor | None = None  # [B] each row's question cosine to its routed edit
        self.embed = model.get_submodule(spec.embed_tokens)
        self._positions: list[torch.Tensor | None] = []
        self._input_ids: torch.Tensor | None = None
        self._sequence: torch.Tensor | None = None  # [B, S] the ids of the last multi-token forward and steps since
        layer = model.get_submodule(spec.layer_path(max(edit_layer, 0)))
        self._handles = [
            model.register_forward_pre_hook(self._push_positions, with_kwargs=True),
            model.register_forward_hook(self._pop_positions, always_call=True),
            layer.register_forward_pre_hook(self._rewrite_input, with_kwargs=True) if edit_layer == LM_INPUT
            else layer.register_forward_hook(self._rewrite_output),
            self.embed.register_forward_pre_hook(self._keep_input_ids),
            model.get_submodule(spec.lm_head).register_forward_pre_hook(self._write_output),
        ]

    @property
    def site(self) -> str:
        """Human-readable place of the hook, e.g. "model.language_model.layers.18 (output)"."""
        if self.edit_layer == LM_INPUT:
            return f"{self.spec.layer_path(0)} (input)"
        return f"{self.spec.layer_path(self.edit_layer)} (output)"

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextmanager
    def visual_positions(self, positions: torch.Tensor | None) -> Iterator[None]:
        """Tell the hook where the visual tokens are for calls that bypass the root model."""
        self._positions.append(positions)
        try:
            yield
        finally:
            self._positions.pop()

    @contextmanager
    def closed(self) -> Iterator[None]:
        """Run with the adapter shut (e.g. the edit sample's own forward)."""
        was_open, self.is_open = self.is_open, False
        try:
            yield
        finally:
            self.is_open = was_open

    @contextmanager
    def writes_suspended(self) -> Iterator[None]:
        """Run without output writes (the edit sample's own forward, when its write is fitted)."""
        was, self.writes_enabled = self.writes_enabled, False
        try:
            yield
        finally:
            self.writes_enabled = was

    @property
    def writing(self) -> bool:
        """Whether output writes can fire: a write config, and a stored edit that carries a write."""
        return self.write_config is not None and self.writes_enabled and len(self.bank.writes) > 0

    @property
    def active(self) -> bool:
        """Whether any edit is held (a signal, or stored edits in the bank)."""
        return self.signal is not None or len(self.bank) > 0

    def current_positions(self) -> torch.Tensor | None:
        return self._positions[-1] if self._positions else None

    def apply(self, hidden: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """``hidden`` [B, T, d] with the visual slice rewritten, or ``hidden`` itself when bypassed.

        ``positions`` [B, P]: visual-token indices per row. Trainers that run the layers above the edit
        layer by hand call this directly.
        """
        if hidden.shape[1] == 1:
            return hidden  # cached decoding: the visual tokens are in the cache; `routed` stays the prompt's
        if not self.active or not self.is_open or positions is None:
            self.routed = None
            return hidden
        if positions.shape[0] != hidden.shape[0]:
            raise ValueError(f"visual positions cover {positions.shape[0]} rows, hidden states {hidden.shape[0]}")
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]  # [B, 1]
        positions = positions.to(hidden.device)
        visual = hidden[rows, positions]  # gather: [B, P, d]
        self.routed = None
        if self.signal is not None:
            signal, keep = self.signal, None
        else:
            best, weight, keep = self.bank.route(visual)
            if self.question_gate is not None and self.bank.question_keys() is not None and bool(keep.any()):
                keep = keep & self._asks_question(best, hidden.shape[:2])  # only rows routed to an edit
            signal = self.bank.take(best)
            if self.write_config is not None:
                self.routed = (best, keep & (weight >= self.write_config.min_weight))
        out = self.adapter(visual, signal)
        self.last_gate_logits = out.gate_logits.detach()
        self.last_scene_logits = None if out.scene_logits is None else out.scene_logits.detach()
        if keep is not None and not keep.all():
            if not keep.any():
                return hidden
            rows, positions, out.visual = rows[keep], positions[keep], out.visual[keep]
        rewritten = hidden.clone()  # out of place: text positions keep their exact values
        rewritten[rows, positions] = out.visual
        return rewritten

    # -- hooks -------------------------------------------------------------------------------------

    def _push_positions(self, module, args, kwargs) -> None:
        self._positions.append(None)  # first, so the always-called pop stays balanced if the check raises
        if not self.active or not self.is_open:
            return  # nothing to rewrite: the unedited model pays no lookup
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(input_ids, torch.Tensor) and (input_ids == self.image_token_id).any():
            self._positions[-1] = locate_visual_tokens(input_ids, self.image_token_id, self.n_visual,
                                                       self.spec.name)

    def _pop_positions(self, module, args, output) -> None:
        if self._positions:
            self._positions.pop()

    def _asks_question(self, best: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """[B] whether each row's question key reaches the question gate's threshold with its routed edit's
        (edits without a key pass)."""
        ids = self._input_ids
        if ids is None or tuple(ids.shape) != tuple(shape):
            raise ValueError("the question gate reads the input ids of the forward, and this one ran without "
                             f"them (input_ids {None if ids is None else tuple(ids.shape)}, hidden states "
                             f"{tuple(shape)}): pass input_ids, not inputs_embeds")
        gate = self.question_gate
        keys, has = self.bank.question_keys()
        with torch.no_grad():
            rows = gate.keys(ids, self.embed)
        cos = (rows * keys.to(rows.device)[best.to(rows.device)]).sum(-1)
        self.last_question_cos = cos
        return (~has.to(rows.device)[best.to(rows.device)] | (cos >= gate.threshold)).to(best.device)

    def _keep_input_ids(self, module, args) -> None:
        wanted = self.writing or (self.question_gate is not None and len(self.bank) > 0)
        self._input_ids = args[0] if wanted and args and isinstance(args[0], torch.Tensor) else None
        ids, held = self._input_ids, self._sequence
        if ids is None or not self.writing:
            self._sequence = None
        elif ids.dim() == 2 and ids.shape[1] == 1 and held is not None and held.shape[0] == ids.shape[0]:
            self._sequence = torch.cat([held, ids.to(held.device)], dim=1)  # a cached decoding step
        else:
            self._sequence = ids

    def _write_output(self, module, args):
        if not self.writing or self.routed is None or self._sequence is None or not args:
            return None  # no ids kept for this forward (`_keep_input_ids` keeps them only while writing)
        hidden, ids = args[0], self._sequence
        edit, fire = self.routed
        if hidden.dim() != 3 or ids.shape[0] != hidden.shape[0] or edit.shape[0] != hidden.shape[0] \
                or ids.shape[1] < hidden.shape[1]:
            return None
        return (self.bank.writes.apply(hidden, ids, edit, fire, self.write_config.tau), *args[1:])

    def _rewrite_output(self, module, args, output):
        if isinstance(output, tuple):  # older layer APIs return (hidden, ...)
            return (self.apply(output[0], self.current_positions()), *output[1:])
        return self.apply(output, self.current_positions())

    def _rewrite_input(self, module, args, kwargs):
        positions = self.current_positions()
        if args:
            return (self.apply(args[0], positions), *args[1:]), kwargs
        kwargs = dict(kwargs, hidden_states=self.apply(kwargs["hidden_states"], positions))
        return args, kwargs
