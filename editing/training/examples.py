"""Per-example training inputs that depend only on the frozen model, computed once under no_grad.

For every training record the trainer needs, besides its four teacher-forced rows (`example_rows`):
- the edit signal of (``image``, ``src``, ``alt``) — one partial forward, adapter closed;
- the unedited model's log-probabilities at the M-Loc answer positions (the locality KL's p_pre);
- the IM alignment targets: for each sample an alignment target may come from (rel: ``image`` +
  ``src``, t_gen: ``image`` + ``rephrase``, m_gen: ``image_rephrase`` + ``src``), the noise-perturbation
  influence of every visual token *of that sample's own image* on the last prompt token (as the paper:
  σ 0.7 absolute, one token at a time, averaged over the influence-target layers; normalised later, over
  the tokens a step samples).

The official code computed the image-rephrase targets from the reliability image because of a slice
bug (``hidden_states[:, a, b]`` — one element — where ``[:, a:b]`` was meant). Here every target is
computed from a forward of its own (image, prompt) pair, so there is no slice to get wrong; the test
suite pins that the m_gen targets equal the influence on ``image_rephrase`` and not on ``image``.

Each part is computed on first use (`ExampleStore`) for a fixed chunk of records at once, with noise
seeded per (seed, record, sample, layer), so a product does not depend on when it was computed or
which other records share a step — which is what lets a resumed run, whose cache starts empty, reach
bit-identical weights.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from PIL import Image

from attrib.backbones.loader import Backbone
from attrib.data import EditRecord
from attrib.regions.attention_noise import AttentionNoise
from attrib.regions.capture import capture_layers, last_query_attention
from attrib.regions.noise import noise_generator
from editing.adapter.split import SplitForward
from editing.adapter.vead import EditSignal
from editing.adapter.visedit import VisEditEditor
from editing.editor import EditRequest
from editing.inputs import teacher_forced_batch

ROLES = ("rel", "t_gen", "m_gen", "m_loc")  # the four training rows of a record, in batch order
ALIGN_ROLES = ROLES[:3]  # the samples an IM alignment / up target can come from
Row = tuple[Image.Image, str, str]  # (image, prompt in the dataset format, target)


_ROW_IMAGE = {"rel": "image", "t_gen": "image", "m_gen": "image_rephrase", "m_loc": "m_loc", "same_image": "image"}


def has_same_image(record: EditRecord) -> bool:
    """Whether the record lists a same-image question (`attrib.world.dataset`; real MMEdit files do not)."""
    return bool((record.truth or {}).get("same_image"))


def example_row(record: EditRecord, role: str, task: str, formats: dict[str, str]) -> Row:
    """One teacher-forced row of a record (one of ROLES, or "same_image": the record's first same-image
    question on its own image, with its true answer); opens only that row's image."""
    image = record.load_image(_ROW_IMAGE[role])
    if role == "m_loc":
        return image, formats["m_loc"].format(m_loc_q=record.m_loc_q), record.m_loc_a
    if role == "same_image":
        question = record.truth["same_image"][0]
        return image, formats["m_loc"].format(m_loc_q=question["question"]), question["answer"]
    return image, formats[task].format(src=record.rephrase if role == "t_gen" else record.src), record.alt


def example_rows(record: EditRecord, task: str, formats: dict[str, str]) -> dict[str, Row]:
    """The teacher-forced rows of one record: rel, t_gen, m_gen (target ``alt``) and m_loc (``m_loc_a``)."""
    return {role: example_row(record, role, task, formats) for role in ROLES}


def answer_positions(target_lengths: Sequence[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(select [B, K], mask [B, K]): positions whose logits predict each row's target tokens (the last
    n_b + 1 .. 2nd-last positions of a left-padded row of ``length``), K = max n_b; padding repeats the
    row's last answer position and is masked out."""
    k = max(target_lengths)
    select = torch.zeros(len(target_lengths), k, dtype=torch.long)
    mask = torch.zeros(len(target_lengths), k, dtype=torch.bool)
    for row, n in enumerate(target_lengths):
        start = length - n - 1
        select[row, :n] = torch.arange(start, start + n)
        select[row, n:] = start + n - 1
        mask[row, :n] = True
    return select, mask


@torch.no_grad()
def token_influence(backbone: Backbone, images: Sequence[Image.Image], prompts: Sequence[str],
                    layers: Sequence[int], method: AttentionNoise, keys: Sequence[tuple[int, ...]]) -> torch.Tensor:
    """[B, P] noise influence of each visual token alone on the last prompt token's attention output at
    each of ``layers`` (mean of 1 − cos over ``method.draws``), averaged over the layers, for a batch of
    (image, prompt) pairs run in one forward. Noise for row b at layer ℓ comes from the stream
    (method.seed, *keys[b], ℓ)."""
    inputs = backbone.encode(list(images), list(prompts))
    sites = backbone.visual_positions(inputs["input_ids"])  # [B, P]
    captures = capture_layers(backbone, inputs, list(layers))
    total = torch.zeros(sites.shape)
    valid = torch.ones(sites.shape[1], 1, dtype=torch.bool)  # one region per token (window 0)
    for row, site in enumerate(sites):
        index = site[:, None]
        for layer in layers:
            attn = last_query_attention(backbone, layer, captures[layer], row)
            generator = noise_generator(method.seed, *keys[row], layer)
            total[row] += method.local(attn, index, valid, attn.hidden[site], generator).float().cpu()
    return total / len(layers)


@dataclass
class ExampleProducts:
    """signal: the record's edit (E = 1); pre_loc: [n, V] unedited log-probs at the M-Loc answer
    positions; influence: [3, P] per-token influence for rel, t_gen, m_gen (unnormalised)."""

    signal: EditSignal
    pre_loc: torch.Tensor
    influence: torch.Tensor


class ExampleStore:
    """Per-record products, each part computed on first use and kept in memory up to ``max_bytes``
    (later ones are recomputed each time they are needed; results are identical either way).

    Parts are separate because steps need different ones: a record's own rows need its edit signal and
    the influence of the one sample the step draws for the IM terms; a locality partner needs only its
    pre-edit M-Loc output. A part is computed for a whole fixed chunk of ``chunk`` items in one batched
    forward. Signals and pre-edit outputs are chunked by consecutive records. Influence is chunked by
    ``pair_order``, when given: an iterable of the (record, sample) pairs in the order training will ask
    for them; pair number k (counting first appearances) belongs to chunk k // ``chunk``; a pair the order
    never yields (it is exhausted first) is numbered when asked for. Chunking influence by consecutive
    records instead computes all three samples of every record, ~40 % of which no step draws
    (e^(−8,000/9,000) for 2,000 steps × 4 draws over 9,000 record-sample pairs). Default LLaVA, 3,000
    records: ~900 s of products one record at a time, 497 s in chunks of consecutive records (2,000
    steps), 281 s in first-use chunks (1,750 steps). Either way the chunks never change, so a part's value
    does not depend on which record asked for it first.
    """

    def __init__(self, editor: VisEditEditor, split: SplitForward, records: Sequence[EditRecord], task: str,
                 formats: dict[str, str], it_layers: Sequence[int], noise: AttentionNoise, max_bytes: int,
                 chunk: int = 8, pair_order: Iterable[tuple[int, int]] | None = None):
        if chunk < 1:
            raise ValueError(f"the product chunk must be at least 1 record, got {chunk}")
        self.editor, self.split, self.records = editor, split, records
        self.task, self.formats, self.it_layers, self.noise = task, formats, list(it_layers), noise
        self.max_bytes, self.used, self.chunk = max_bytes, 0, chunk
        self.compute_s = 0.0  # wall time spent computing parts (the rest of a step is the step itself)
        self._kept: dict[tuple, object] = {}
        self._pairs = None if pair_order is None else iter(pair_order)
        self._pair_number: dict[tuple[int, int], int] = {}
        self._numbered: list[tuple[int, int]] = []

    def members(self, index: int) -> list[int]:
        """The records computed together with ``index`` (signals, pre-edit outputs)."""
        start = index - index % self.chunk
        return list(range(start, min(start + self.chunk, len(self.records))))

    def pair_members(self, index: int, role: int) -> list[tuple[int, int]]:
        """The (record, sample) pairs whose influence is computed together with (``index``, ``role``)."""
        if self._pairs is None:
            return [(i, role) for i in self.members(index)]
        pair = (index, role)
        while pair not in self._pair_number and self._number_next():
            pass
        if pair not in self._pair_number:  # the order is exhausted without it: number it now
            self._number(pair)
        start = self._pair_number[pair] - self._pair_number[pair] % self.chunk
        while len(self._numbered) < start + self.chunk and self._number_next():
            pass  # fill the chunk from the order; a chunk is complete before any of it is computed
        return self._numbered[start:start + self.chunk]

    def _number_next(self) -> bool:
        """Number the next new pair of the order; False when the order is exhausted."""
        for pair in self._pairs:
            if pair not in self._pair_number:
                self._number(pair)
                return True
        return False

    def _number(self, pair: tuple[int, int]) -> None:
        self._pair_number[pair] = len(self._numbered)
        self._numbered.append(pair)

    def _cached(self, key: tuple, members: Callable[[], list[tuple]], make: Callable[[list[tuple]], list]):
        """The part ``key``; on a miss, ``make`` computes the keys ``members()`` (key among them) at once."""
        if key in self._kept:
            return self._kept[key]
        keys = members()
        began = time.perf_counter()
        values = make(keys)
        self.compute_s += time.perf_counter() - began
        for member, value in zip(keys, values):
            tensors = (value.states, value.mask, value.query) if isinstance(value, EditSignal) else (value,)
            size = sum(t.numel() * t.element_size() for t in tensors)
            if member not in self._kept and self.used + size <= self.max_bytes:
                self._kept[member] = value
                self.used += size
        return values[keys.index(key)]

    def _record_part(self, index: int, part: str, make: Callable[[list[int]], list]):
        return self._cached((index, part), lambda: [(i, part) for i in self.members(index)],
                            lambda keys: make([i for i, _ in keys]))

    def signal(self, index: int) -> EditSignal:
        """The record's edit (E = 1) of (``image``, ``src``, ``alt``), on the CPU."""
        return self._record_part(index, "signal", self._signals)

    def pre_loc(self, index: int) -> torch.Tensor:
        """[n, V] unedited log-probs at the record's M-Loc answer positions."""
        return self._record_part(index, "pre_loc", self._pre_locs)

    def pre_same(self, index: int) -> torch.Tensor:
        """[n, V] unedited log-probs at the answer positions of the record's same-image row."""
        with_rows = [i for i in self.members(index) if has_same_image(self.records[i])]
        return self._cached((index, "pre_same"), lambda: [(i, "pre_same") for i in with_rows],
                            lambda keys: self._pre_locs([i for i, _ in keys], "same_image"))

    def influence(self, index: int, role: int) -> torch.Tensor:
        """[P] token influence for ``ALIGN_ROLES[role]`` (unnormalised)."""
        return self._cached((index, "influence", role),
                            lambda: [(i, "influence", r) for i, r in self.pair_members(index, role)],
                            lambda keys: self._influences([(i, r) for i, _, r in keys]))

    def get(self, index: int) -> ExampleProducts:
        """Every part of the record (through the cache)."""
        return ExampleProducts(self.signal(index), self.pre_loc(index),
                               torch.stack([self.influence(index, r) for r in range(len(ALIGN_ROLES))]))

    def compute(self, index: int) -> ExampleProducts:
        """Every part of the record, computed afresh (with its chunk)."""
        members = self.members(index)
        at = members.index(index)
        influence = []
        for role in range(len(ALIGN_ROLES)):
            pairs = self.pair_members(index, role)
            influence.append(self._influences(pairs)[pairs.index((index, role))])
        return ExampleProducts(self._signals(members)[at], self._pre_locs(members)[at], torch.stack(influence))

    def _rows(self, members: list[int], role: str | Sequence[str]) -> tuple[list, list, list]:
        """Images, prompts, targets of ``members``' ``role`` rows (one role, or one per member)."""
        roles = [role] * len(members) if isinstance(role, str) else role
        rows = [example_row(self.records[i], r, self.task, self.formats) for i, r in zip(members, roles)]
        return tuple(list(column) for column in zip(*rows))

    @torch.no_grad()
    def _signals(self, members: list[int]) -> list[EditSignal]:
        """One E = 1 signal per record, without the batch's padding: the real tokens are kept wherever the
        processor put the padding (left for LLaVA / MiniGPT-4, between the query tokens and the text for
        BLIP-2), so each signal equals the record's own unpadded ``edit_signal``."""
        images, prompts, targets = self._rows(members, "rel")
        batch = self.editor.edit_signal([EditRequest(*r) for r in zip(images, prompts, targets)]).to("cpu")
        out = []
        for row in range(len(members)):
            real = batch.mask[row]
            before_end = int((~real[:int(batch.prompt_end[row])]).sum())  # padding before the last prompt token
            visual = None if batch.visual is None else batch.visual[row:row + 1] - (~real).cumsum(0)[batch.visual[row]]
            out.append(EditSignal(batch.states[row:row + 1, real].clone(), real[None, real].clone(),
                                  batch.query[row:row + 1].clone(), batch.prompt_end[row:row + 1] - before_end,
                                  visual=visual))
        return out

    @torch.no_grad()
    def _pre_locs(self, members: list[int], role: str = "m_loc") -> list[torch.Tensor]:
        batch = teacher_forced_batch(self.editor.backbone, *self._rows(members, role))
        select, _ = answer_positions(batch.target_lengths, batch.inputs["input_ids"].shape[1])
        site = self.split.prefix(batch.inputs)
        logp = torch.log_softmax(self.split.top(site, None, select).float(), -1).cpu()
        return [logp[row, :n].clone() for row, n in enumerate(batch.target_lengths)]

    def _influences(self, pairs: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Influence of (record, sample) ``pairs``, one padded batch."""
        images, prompts, _ = self._rows([i for i, _ in pairs], [ALIGN_ROLES[r] for _, r in pairs])
        return list(token_influence(self.editor.backbone, images, prompts, self.it_layers, self.noise, pairs))


def stack_signals(signals: Sequence[EditSignal], rows: Sequence[int]) -> EditSignal:
    """One signal per input row: ``rows[r]`` picks which of ``signals`` (each E = 1) row r gets.
    States are right-padded with zeros and masked; cross-attention has no positions, so where the
    padding goes does not matter."""
    length = max(s.states.shape[1] for s in signals)
    states = torch.zeros(len(signals), length, signals[0].states.shape[-1], dtype=signals[0].states.dtype)
    mask = torch.zeros(len(signals), length, dtype=torch.bool)
    for i, s in enumerate(signals):
        states[i, :s.states.shape[1]] = s.states[0]
        mask[i, :s.mask.shape[1]] = s.mask[0]
    query = torch.cat([s.query for s in signals])
    prompt_end = torch.cat([s.prompt_end for s in signals])
    pick = torch.as_tensor(list(rows))
    visual = None if any(s.visual is None for s in signals) else torch.cat([s.visual for s in signals])[pick]
    return EditSignal(states[pick], mask[pick], query[pick], prompt_end[pick], visual=visual)
