"""Many VisEdit edits live at once: the edit bank, and how each input is routed to the edit that concerns it.

The paper's VisEdit holds one edit signal. For lifelong editing (LiveEdit's protocol: N edits applied,
then every one of them scored with all N live) `VisEditEditor.edit` adds each edit's signal to an
`EditBank` instead, and the adapter hook routes every input row to one stored edit:

- with a scene router (``visedit_gated``; `editing.adapter.router`), to the edit whose image embedding is
  closest to the input's (one [B, N] matrix product) when that cosine reaches the router's threshold for a
  bank of N edits (chosen on dev per bank size), to none otherwise; the routed edit is then weighted by
  the scene gate σ(α·(s − β)) as in the single-edit adapter;
- with a scene gate and no router, to the edit whose image is most like the input's image by the gate's
  own similarity (the input's visual-token set against each stored edit image's, every pair at once: one
  batched cosine over [B, N, P, P']), weighted by the gate (this similarity parts an edit image from one
  unrelated image, not from the closest of hundreds: the router's reason to exist);
- without one (the paper's ``visedit``), to the edit whose IM claims the most of the input's visual
  tokens (mean over tokens of σ(IM(h_v, q_e)), one matrix product over the bank), weighted by the IM
  gate per token as in the single-edit adapter.

A row whose best weight is below ``floor`` (default 1e-3), or under the router's threshold, is left
untouched, bit for bit: it concerns none of the edits. Otherwise the adapter runs once for the batch, each
row against its own routed edit (the bank's cached keys, values and IM query gathered by index), so the
cost of a forward grows with N only through the routing scores, never through a Python loop over edits.

Two edits on the same image: the input goes to one of them, the one whose edit image is the closest;
when they tie (the same image), the most recent edit wins — a later correction of the same picture
replaces the earlier one for that image. The visual tokens come before the question, so the edit layer's
visual slice cannot tell which of two questions about one image is being asked. With a question gate
(`editing.adapter.question_gate`, ``visedit_gated`` on E-VQA) the routed edit then acts only if the row
asks its question (the edit's stored question key, ``questions``); the other edit on the same image is
not tried in its place.

A bank of one edit is the single-edit adapter, except that a row whose weight is under ``floor`` is
skipped instead of changed by less than a thousandth of the edit.
"""
from __future__ import annotations

import torch

from editing.adapter.output_write import OutputWrites
from editing.adapter.router import SceneRouter
from editing.adapter.vead import EditAdapter, EditCache, EditSignal

ROUTE_FLOOR = 1e-3
# Largest number of (input row, edit, token, token) cosines held at once by the scene routing.
_CHUNK_ELEMENTS = 1 << 24


class EditBank:
    """The edits an adapter holds (module docstring). ``add`` a prepared single-edit signal, ``route``
    input rows, ``take`` the routed signals, ``clear`` to forget them all."""

    def __init__(self, adapter: EditAdapter, floor: float = ROUTE_FLOOR, router: SceneRouter | None = None):
        self.adapter, self.floor, self.router = adapter, floor, router
        self.signals: list[EditSignal] = []
        self.writes = OutputWrites()  # each edit's output write, or None (`editing.adapter.output_write`)
        self.questions: list[torch.Tensor | None] = []  # each edit's question key (`editing.adapter.question_gate`)
        self._question_keys: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_scores: torch.Tensor | None = None  # [B, N] what the latest `route` ranked the edits by
        self._stacked: EditSignal | None = None
        self._edit_side: tuple[torch.Tensor, torch.Tensor] | None = None
        self._embedded: tuple[SceneRouter, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.signals)

    def add(self, signal: EditSignal) -> int:
        """Store one edit (a signal of one row, with the adapter's cache); returns its index."""
        if len(signal) != 1:
            raise ValueError(f"the bank stores one edit at a time, this signal holds {len(signal)}")
        self.signals.append(signal)
        self.writes.append(None)
        self.questions.append(None)
        self._stacked = self._edit_side = self._embedded = self._question_keys = None
        return len(self.signals) - 1

    def clear(self) -> None:
        self.signals.clear()
        self.writes.clear()
        self.questions.clear()
        self._stacked = self._edit_side = self._embedded = self.last_scores = self._question_keys = None

    def set_question(self, index: int, key: torch.Tensor | None) -> None:
        """Give stored edit ``index`` its question key ([dim], unit; None: the edit has no question gate)."""
        self.questions[index] = None if key is None else key.detach().reshape(-1)
        self._question_keys = None

    def question_keys(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(keys [N, dim], has [N] whether edit n has a key; zeros where not), or None when no edit has one."""
        if self._question_keys is None:
            real = [k for k in self.questions if k is not None]
            if not real:
                return None
            keys = real[0].new_zeros((len(self.questions), real[0].shape[0]))
            has = torch.zeros(len(self.questions), dtype=torch.bool, device=real[0].device)
            for i, key in enumerate(self.questions):
                if key is not None:
                    keys[i], has[i] = key, True
            self._question_keys = (keys, has)
        return self._question_keys

    def stacked(self) -> EditSignal:
        """Every stored edit as one signal of N rows: states right-padded with zeros and masked (VEAD's
        cross-attention has no positions, so where the padding goes does not matter), the cached keys and
        values padded alike. Edits prepared under older adapter weights are prepared again."""
        versions = self.adapter._versions()
        if self._stacked is not None and self._stacked.cache.versions == versions:
            return self._stacked
        signals = [s if s.cache is not None and s.cache.versions == versions else self.adapter.prepare(s)
                   for s in self.signals]
        self.signals = signals
        length = max(s.states.shape[1] for s in signals)

        def padded(tensors: list[torch.Tensor]) -> torch.Tensor:
            out = tensors[0].new_zeros((len(tensors), length, *tensors[0].shape[2:]))
            for i, t in enumerate(tensors):
                out[i, :t.shape[1]] = t[0]
            return out

        cache = EditCache(padded([s.cache.keys for s in signals]), padded([s.cache.values for s in signals]),
                          torch.cat([s.cache.query for s in signals]), versions)
        visual = None if any(s.visual is None for s in signals) else torch.cat([s.visual for s in signals])
        self._stacked = EditSignal(padded([s.states for s in signals]), padded([s.mask for s in signals]),
                                   torch.cat([s.query for s in signals]), torch.cat([s.prompt_end for s in signals]),
                                   cache, visual)
        self._edit_side = None
        return self._stacked

    def take(self, index: torch.Tensor) -> EditSignal:
        """The signal whose row r is stored edit ``index[r]``."""
        bank = self.stacked()
        index = index.to(bank.states.device)
        cache = bank.cache
        return EditSignal(bank.states[index], bank.mask[index], bank.query[index], bank.prompt_end[index],
                          EditCache(cache.keys[index], cache.values[index], cache.query[index], cache.versions),
                          None if bank.visual is None else bank.visual[index])

    @torch.no_grad()
    def route(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """visual [B, P, d] (the input rows' visual-token states at the edit layer) → (best [B] index of
        the stored edit each row goes to, weight [B] its routing weight in [0, 1], keep [B] whether the
        weight reaches ``floor`` and, with a router, its cosine the router's threshold). Ties go to the most
        recent edit. The [B, N] scores it ranked by (router cosines, scene logits or IM scores) are kept in
        ``last_scores``."""
        if self.router is not None:
            return self._route_by_router(visual)
        scores = self.scene_logits(visual) if self.adapter.scene is not None else self.im_scores(visual)
        self.last_scores = scores
        n = scores.shape[1]
        best = n - 1 - scores.flip(1).argmax(1)  # the last of equal maxima: the latest edit
        top = scores.gather(1, best[:, None])[:, 0]
        weight = torch.sigmoid(top) if self.adapter.scene is not None else top
        return best, weight, weight >= self.floor

    def _route_by_router(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cosines = self.router.scores(visual, self.embeddings())
        self.last_scores = cosines
        n = cosines.shape[1]
        best = n - 1 - cosines.flip(1).argmax(1)  # the last of equal maxima: the latest edit
        keep = cosines.gather(1, best[:, None])[:, 0] >= self.router.threshold_for(n)
        weight = torch.ones(len(best), device=visual.device)
        if self.adapter.scene is not None:  # the routed edit's gate, as the adapter will compute it
            edit_visual = self.stacked().visual_states(best)  # the routed edits' states only, not all N
            weight = torch.sigmoid(self.adapter.scene(visual.to(edit_visual.dtype), edit_visual.to(visual.device)))
        return best, weight, keep & (weight >= self.floor)

    def embeddings(self) -> torch.Tensor:
        """[N, dim] the router's embedding of every stored edit image (computed once per bank and router)."""
        if self._embedded is None or self._embedded[0] is not self.router:
            with torch.no_grad():
                self._embedded = (self.router, self.router(self.stacked().visual_states()))
        return self._embedded[1]

    def scene_logits(self, visual: torch.Tensor) -> torch.Tensor:
        """[B, N] the scene gate's logits α·(s − β) of every input row against every stored edit image
        (the same numbers as `EditAdapter.scene_logits` with each edit alone)."""
        gate = self.adapter.scene
        dtype = gate.threshold.dtype
        a = visual.to(dtype)
        edit_unit, edit_weight = self._edit_scene_side(a.device, dtype)
        if gate.similarity == "salient":
            a = a - gate.reference
        a_unit, a_weight = _unit_and_weight(a, gate.similarity)
        b, p = a.shape[:2]
        n, q = edit_unit.shape[:2]
        step = max(1, _CHUNK_ELEMENTS // max(1, b * p * q))
        tiny = torch.finfo(dtype).tiny  # as `salient_chamfer`: an image with nothing salient scores 0
        sims = []
        for lo in range(0, n, step):
            cos = torch.einsum("bpd,nqd->bnpq", a_unit, edit_unit[lo:lo + step])
            wb = edit_weight[lo:lo + step]
            from_input = (cos.amax(3) * a_weight[:, None]).sum(2) / a_weight.sum(1).clamp_min(tiny)[:, None]
            from_edit = (cos.amax(2) * wb[None]).sum(2) / wb.sum(1).clamp_min(tiny)[None]
            sims.append(0.5 * (from_input + from_edit))
        return gate.log_scale.exp() * (torch.cat(sims, 1) - gate.threshold)

    def _edit_scene_side(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored edit images' visual states as the similarity needs them: unit vectors [N, P', d]
        and token weights [N, P'] (computed once per bank and adapter weights)."""
        if self._edit_side is None or self._edit_side[0].device != torch.device(device):
            gate = self.adapter.scene
            edits = self.stacked().visual_states().to(device, dtype)
            if gate.similarity == "salient":
                if not gate.reference.numel():
                    raise RuntimeError("the salient scene gate has no reference states: call set_reference() "
                                       "or load trained weights")
                edits = edits - gate.reference
            self._edit_side = _unit_and_weight(edits, gate.similarity)
        return self._edit_side

    def im_scores(self, visual: torch.Tensor) -> torch.Tensor:
        """[B, N] how much of each input row's visual tokens each stored edit's IM claims: the mean over
        tokens of σ(IM logit), every edit at once (one matrix product, `InfluenceMapper` per edit)."""
        im = self.adapter.im
        dtype = im.norm_visual.weight.dtype
        b, p, d = visual.shape
        mapped = im.map_visual(im.norm_visual(visual.to(dtype)))  # [B, P, d]
        queries = self.stacked().cache.query.to(visual.device, dtype).reshape(len(self), d)  # [N, d]
        logits = (mapped @ queries.T) / (im.heads * im.scale)  # [B, P, N]: the IM's per-head mean
        return torch.sigmoid(logits).mean(1)


def _unit_and_weight(states: torch.Tensor, similarity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit token vectors and each token's weight in the similarity: its squared norm for "salient"
    (after the reference is taken off), 1 for "chamfer"."""
    unit = torch.nn.functional.normalize(states, dim=-1)
    if similarity == "salient":
        return unit, states.pow(2).sum(-1)
    return unit, torch.ones(states.shape[:-1], dtype=states.dtype, device=states.device)
