"""VEAD (Visual Edit ADapter) and IM (Influence Mapper): the trainable parts of VisEdit.

An edit is a stored *edit signal*: the hidden states of the edit sample (image + prompt + new target) at
the edit layer. VEAD lets every visual token of the current input cross-attend to those states and
proposes a change; the IM scores how much each visual token is about the edited content and gates the
change with a sigmoid:

    h_v ← h_v + σ(IM(h_v, q_e)) ⊙ VEAD(h_v, H_e)                  (the paper)
    h_v ← h_v + σ(S(h_v, V_e)) · σ(IM(h_v, q_e)) ⊙ VEAD(h_v, H_e)  (``scene_gate=True``, our extension)

    h_v  [B, P, d]   the input's visual-token states at the edit layer
    H_e  [B, L, d]   all tokens of the edit sample at the edit layer (padding masked out)
    q_e  [B, d]      the edit sample's state at its last prompt token (read at ``im_read_layer``)
    V_e  [B, P', d]  the edit sample's visual-token states at the edit layer (part of H_e)

The scene gate S is one logit per input (`editing.adapter.scene_gate`): how much the input's image is
the edit's image, by a similarity of their visual-token sets.

The target role (``target_role=True``, our extension) adds one learnt vector r to the edit sample's
*target* tokens (the new answer, after the last prompt token) on VEAD's edit side, after its LayerNorm:
K, V = W_k, W_v(LN_e(H_e) + r·t), t = 1 at target tokens. At the LM input (the edit layer the defaults'
placements pick) the target token is a bare word embedding, and the paper's VEAD can find it only by what
the word is: in some adapter seeds no head learns to attend to a colour word, and colour edits stay
undone. Marked by its role, the target is found whatever the word
(docs/experiments/editing-target-role.md).

Parameter composition (matches the official code's modules: every Linear has a bias, every LayerNorm
has weight and bias), with d the LM width, m = ``mid_dim`` and h = ``im_hidden``:

    VEAD  LN_img, LN_e                 2 · 2d
          W_begin, W_k, W_v (d → m)    3 · (d·m + m)
          W_q (m → m)                  m·m + m
          W_end (m → d)                m·d + d
    IM    two LayerNorms               2 · 2d
          two residual MLPs d→h→d      2 · (d·h + h + h·d + d)

    scene gate (``scene_gate=True``)   2  (+ the ``"salient"`` similarity's reference states, a buffer)
    target role (``target_role=True``) d

At d = 4096, m = h = 1024 (LLaVA-1.5-7B, MiniGPT-4 Vicuna-7B) that is 34,654,208 (the paper's 34.65 M);
at d = 2560 (BLIP-2 OPT-2.7B) 22,054,400 (22.05 M). Dropping the LayerNorm biases or the Linear biases
would each move the totals by only ~0.05 %, inside the ±0.5 % tolerance, so the tests pin the exact
numbers. The IM's hidden width is what the totals do pin down: the official class default (256) would
give 22.07 M at 7B; 1024 gives the paper's 34.65 M.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from editing.adapter.scene_gate import SCENE_SIMILARITIES, SceneGate


@dataclass(frozen=True)
class VeadConfig:
    """Sizes of one adapter. Defaults are the paper's (mid 1024, 8 heads, IM hidden 1024).

    mid_dim: VEAD's inner width m (cross-attention runs at this width); n_heads: its attention heads;
    im_hidden: hidden width of the IM's residual MLPs; im_heads: heads the IM splits d into;
    dtype: parameter dtype (the adapter casts its inputs to it and its output back to the LM's dtype,
    so an fp16 backbone can carry an fp32 adapter);
    scene_gate: multiply the edit by the scene gate (module docstring; off = the paper's adapter);
    scene_similarity: what the scene gate compares, ``"salient"`` or ``"chamfer"`` (module docstring);
    target_role: mark the edit sample's target tokens for VEAD's keys and values (module docstring; off =
    the paper's adapter).
    """

    mid_dim: int = 1024
    n_heads: int = 8
    im_hidden: int = 1024
    im_heads: int = 8
    dtype: str = "float32"
    scene_gate: bool = False
    scene_similarity: str = "salient"
    target_role: bool = False

    def check(self, width: int) -> None:
        """Refuse sizes that cannot be split into heads and unknown similarities, naming the values."""
        if self.scene_similarity not in SCENE_SIMILARITIES:
            raise ValueError(f"scene_similarity {self.scene_similarity!r} is not one of {SCENE_SIMILARITIES}")
        if self.mid_dim % self.n_heads:
            raise ValueError(f"VEAD mid_dim {self.mid_dim} is not divisible by n_heads {self.n_heads}")
        if width % self.im_heads:
            raise ValueError(f"LM width {width} is not divisible by the IM's im_heads {self.im_heads}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "VeadConfig":
        # Files written before the scene gate existed, before the salient similarity did, or before the target role.
        return cls(**{"scene_gate": False, "scene_similarity": "chamfer", "target_role": False, **data})

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class EditCache:
    """The adapter's projections of a stored edit, computed once by `EditAdapter.prepare`.

    keys, values: [E, L, heads, head]  VEAD's K and V of the edit states
    query:        [E, im_heads, d / im_heads]  the IM's mapped edit query
    versions:     the adapter parameters' in-place version counters when this was computed; a cache
                  whose versions no longer match (an optimizer step, a loaded checkpoint) is ignored.
    """

    keys: torch.Tensor
    values: torch.Tensor
    query: torch.Tensor
    versions: tuple[int, ...]

    def expand(self, batch: int) -> "EditCache":
        return EditCache(self.keys.expand(batch, -1, -1, -1), self.values.expand(batch, -1, -1, -1),
                         self.query.expand(batch, -1, -1), self.versions)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "EditCache":
        return EditCache(self.keys.to(device, dtype), self.values.to(device, dtype), self.query.to(device, dtype),
                         self.versions)


@dataclass
class EditSignal:
    """What ``edit(request)`` stores: the edit sample(s) as seen by the frozen model.

    states:     [E, L, d]  every token of the edit sample at the edit layer (left-padded)
    mask:       [E, L]     True at real tokens, False at padding
    query:      [E, d]     state of the last prompt token at the IM read layer
    prompt_end: [E]        index of that last prompt token in ``states``
    cache:      the adapter's projections of this edit (`EditAdapter.prepare`), or None
    visual:     [E, P']    indices of the edit sample's visual tokens in ``states`` (the scene gate's
                           input), or None
    E is 1 for a single edit (broadcast over any input batch) or the input batch size (training).
    """

    states: torch.Tensor
    mask: torch.Tensor
    query: torch.Tensor
    prompt_end: torch.Tensor
    cache: EditCache | None = None
    visual: torch.Tensor | None = None

    def visual_states(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[E, P', d] the edit sample's visual-token states; with ``rows`` [B] (edit indices), only those
        edits' [B, P', d], gathered without touching the others."""
        if self.visual is None:
            raise ValueError("this edit signal does not say where the edit sample's visual tokens are "
                             "(make it with VisEditEditor.edit_signal)")
        device = self.states.device
        rows = torch.arange(len(self), device=device) if rows is None else rows.to(device)
        return self.states[rows[:, None], self.visual.to(device)[rows]]

    def target_mask(self) -> torch.Tensor:
        """[E, L] True at the edit sample's target tokens: the real tokens after ``prompt_end``."""
        positions = torch.arange(self.mask.shape[1], device=self.mask.device)
        return self.mask & (positions[None, :] > self.prompt_end.to(self.mask.device)[:, None])

    def __len__(self) -> int:
        return self.states.shape[0]

    def rows(self, lo: int, hi: int) -> "EditSignal":
        """The edits of rows ``lo``..``hi`` of a signal that holds one edit per input row."""
        return EditSignal(self.states[lo:hi], self.mask[lo:hi], self.query[lo:hi], self.prompt_end[lo:hi],
                          None if self.cache is None else EditCache(self.cache.keys[lo:hi], self.cache.values[lo:hi],
                                                                    self.cache.query[lo:hi], self.cache.versions),
                          None if self.visual is None else self.visual[lo:hi])

    def for_batch(self, batch: int) -> "EditSignal":
        """The signal lined up with an input batch of ``batch`` rows (a single edit is broadcast)."""
        if len(self) == batch:
            return self
        if len(self) != 1:
            raise ValueError(f"edit signal holds {len(self)} edits but the input batch has {batch} rows; "
                             "use one edit (broadcast) or one edit per row")
        return EditSignal(self.states.expand(batch, -1, -1), self.mask.expand(batch, -1),
                          self.query.expand(batch, -1), self.prompt_end.expand(batch),
                          self.cache.expand(batch) if self.cache is not None else None,
                          self.visual.expand(batch, -1) if self.visual is not None else None)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "EditSignal":
        return EditSignal(self.states.to(device, dtype), self.mask.to(device), self.query.to(device, dtype),
                          self.prompt_end.to(device),
                          self.cache.to(device, dtype) if self.cache is not None else None,
                          self.visual.to(device) if self.visual is not None else None)


class ResidualMLP(nn.Module):
    """x + W2·ReLU(W1·x): [..., d] → [..., d]."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class InfluenceMapper(nn.Module):
    """One logit per visual token: how much the edit is about that token.

    Both sides go LayerNorm → residual MLP; the per-head dot products are averaged over heads and
    divided by √(d / heads), like an attention score.
    """

    def __init__(self, width: int, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_visual = nn.LayerNorm(width)
        self.norm_edit = nn.LayerNorm(width)
        self.map_visual = ResidualMLP(width, hidden)
        self.map_edit = ResidualMLP(width, hidden)
        self.scale = math.sqrt(width // heads)

    def map_query(self, query: torch.Tensor) -> torch.Tensor:
        """The edit side: query [B, d] → [B, heads, d / heads]."""
        return self.map_edit(self.norm_edit(query)).view(query.shape[0], self.heads, -1)

    def forward(self, visual: torch.Tensor, query: torch.Tensor, mapped: torch.Tensor | None = None
                ) -> torch.Tensor:
        """visual [B, P, d], query [B, d] → logits [B, P]. ``mapped``: `map_query(query)`, if already known."""
        b, p, d = visual.shape
        v = self.map_visual(self.norm_visual(visual)).view(b, p, self.heads, d // self.heads)
        q = self.map_query(query) if mapped is None else mapped
        return torch.einsum("bphk,bhk->bph", v, q).mean(-1) / self.scale


class VisualEditAdapter(nn.Module):
    """VEAD: visual tokens cross-attend to the edit sample's states; linear throughout (no activation,
    no dropout), as in the paper."""

    def __init__(self, width: int, mid: int, heads: int, target_role: bool = False):
        super().__init__()
        self.heads, self.mid = heads, mid
        self.norm_visual = nn.LayerNorm(width)
        self.norm_edit = nn.LayerNorm(width)
        self.begin = nn.Linear(width, mid)
        self.q = nn.Linear(mid, mid)
        self.k = nn.Linear(width, mid)
        self.v = nn.Linear(width, mid)
        self.end = nn.Linear(mid, width)
        self.target_role = nn.Parameter(torch.empty(width)) if target_role else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw the target-role vector, N(0, 1) like a LayerNorm output (the Linear and LayerNorm
        children reset themselves); without one nothing is drawn, so seeds keep their meaning."""
        if self.target_role is not None:
            with torch.no_grad():
                self.target_role.normal_()

    def keys_values(self, edit: torch.Tensor, target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The edit side: edit [B, L, d] → K, V [B, L, heads, mid / heads]; ``target`` [B, L] marks the
        target tokens (`EditSignal.target_mask`), needed when the adapter has a target role."""
        b, length, _ = edit.shape
        edit = self.norm_edit(edit)
        if self.target_role is not None:
            if target is None:
                raise ValueError("this VEAD marks the edit's target tokens: pass the target mask")
            edit = edit + target[..., None].to(edit.dtype) * self.target_role
        return (self.k(edit).view(b, length, self.heads, -1), self.v(edit).view(b, length, self.heads, -1))

    def forward(self, visual: torch.Tensor, edit: torch.Tensor, mask: torch.Tensor,
                keys_values: tuple[torch.Tensor, torch.Tensor] | None = None,
                target: torch.Tensor | None = None) -> torch.Tensor:
        """visual [B, P, d], edit [B, L, d], mask [B, L] (True = real token) → change [B, P, d].

        ``keys_values``: `keys_values(edit, target)`, if already known (a stored edit at inference);
        ``target``: as for `keys_values`.
        """
        b, p, _ = visual.shape
        head = self.mid // self.heads
        q = self.q(self.begin(self.norm_visual(visual))).view(b, p, self.heads, head)
        k, v = self.keys_values(edit, target) if keys_values is None else keys_values
        scores = torch.einsum("bphk,blhk->bhpl", q, k) / math.sqrt(head)  # [B, H, P, L]
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        mixed = torch.einsum("bhpl,blhk->bphk", scores.softmax(-1), v).reshape(b, p, self.mid)
        return self.end(mixed)


@dataclass
class AdapterOutput:
    """visual: the rewritten visual states [B, P, d] (input dtype); gate_logits: the IM's [B, P];
    scene_logits: the scene gate's [B] (None without one)."""

    visual: torch.Tensor
    gate_logits: torch.Tensor
    scene_logits: torch.Tensor | None = None


class EditAdapter(nn.Module):
    """VEAD + IM for one edit layer: ``adapter(visual, signal)`` → rewritten visual states and IM logits."""

    def __init__(self, width: int, config: VeadConfig = VeadConfig()):
        super().__init__()
        config.check(width)
        self.width, self.config = width, config
        self.vead = VisualEditAdapter(width, config.mid_dim, config.n_heads, config.target_role)
        self.im = InfluenceMapper(width, config.im_hidden, config.im_heads)
        self.scene = SceneGate(config.scene_similarity) if config.scene_gate else None
        self.to(config.torch_dtype)

    def _versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.parameters())

    @torch.no_grad()
    def prepare(self, signal: EditSignal) -> EditSignal:
        """``signal`` with its edit-side projections cached, for inference with a stored edit.

        The edit sample's K/V (all its tokens) and the IM's mapped query depend only on the edit and
        the adapter's weights, so they are computed once here instead of in every forward. Forwards with
        gradients enabled, and forwards after the adapter's weights changed in place, recompute them.
        """
        dtype = self.vead.begin.weight.dtype
        device = self.vead.begin.weight.device
        states, query = signal.states.to(device, dtype), signal.query.to(device, dtype)
        target = self._target(signal)
        keys, values = self.vead.keys_values(states, None if target is None else target.to(device))
        cache = EditCache(keys, values, self.im.map_query(query), self._versions())
        return replace(signal, cache=cache)

    def forward(self, visual: torch.Tensor, signal: EditSignal) -> AdapterOutput:
        """visual [B, P, d] → AdapterOutput; ``signal`` holds 1 or B edits."""
        dtype = self.vead.begin.weight.dtype
        signal = signal.for_batch(visual.shape[0]).to(visual.device, dtype)
        cache = signal.cache
        if cache is not None and (torch.is_grad_enabled() or cache.versions != self._versions()):
            cache = None
        x = visual.to(dtype)
        logits = self.im(x, signal.query, None if cache is None else cache.query)  # [B, P]
        change = (self.vead(x, signal.states, signal.mask, target=self._target(signal)) if cache is None
                  else self.vead(x, signal.states, signal.mask, (cache.keys, cache.values)))
        change = change * torch.sigmoid(logits)[..., None]
        scene = self.scene_logits(x, signal)
        if scene is not None:
            change = change * torch.sigmoid(scene)[:, None, None]
        return AdapterOutput(visual + change.to(visual.dtype), logits, scene)

    def _target(self, signal: EditSignal) -> torch.Tensor | None:
        """``signal``'s target mask where VEAD has a target role to add, else None (nothing to compute)."""
        return None if self.vead.target_role is None else signal.target_mask()

    def scene_logits(self, visual: torch.Tensor, signal: EditSignal) -> torch.Tensor | None:
        """[B] scene-gate logits of inputs ``visual`` [B, P, d] under ``signal`` (1 or B edits), or None
        when this adapter has no scene gate."""
        if self.scene is None:
            return None
        dtype = self.scene.threshold.dtype
        signal = signal.for_batch(visual.shape[0])
        return self.scene(visual.to(dtype), signal.visual_states().to(visual.device, dtype))


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; works on meta tensors."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def lm_width(config) -> int:
    """LM hidden size d of a VLLM config (the width the adapter is sized from)."""
    return config.text_config.hidden_size
