"""``ike``: in-context knowledge editing (Zheng et al. 2023, "Can We Edit Factual Knowledge by In-Context
Learning?"): no weight changes; the new fact and retrieved demonstrations are written in front of the
prompt, as EasyEdit's multimodal IKE does for MMEdit.

What is implemented.
- ``prepare(train, dev)`` builds the demonstration pool from ``train`` alone, three demonstrations per
  record, in EasyEdit's multimodal format ``"New Fact: {prompt} {target}\\nPrompt: {probe} {answer}\\n\\n"``
  with the record's edit (``src`` in the task's prompt format, ``alt``) as the new fact: copy (the probe is
  the edit itself), update (the rephrased prompt with the new target) and retain (the text-only locality
  question with its own answer). Each demonstration is embedded once.
- ``edit(request)`` embeds the edit's copy demonstration ``"New Fact: {p} {t}\\nPrompt: {p} {t}\\n\\n"``
  (EasyEdit's query), keeps the ``k`` pool demonstrations of highest cosine similarity to it (most similar
  first, as EasyEdit) and adds the edit to the live edits; ``editor.backbone`` becomes an
  `InContextBackbone`: the same model, processor and spec, whose ``format_prompt`` writes a context in
  front of EVERY prompt, image or text-only, inside the backbone's template (the image placeholder stays
  where the template puts it). `Backbone.encode` and `attrib.answers.target_token_ids` both read
  ``format_prompt``, so scoring sees the same rows. ``restore()`` drops every edit and hands back the
  plain backbone itself, so the unedited logits are bit-identical by construction. ``text_edits = True``:
  the context reaches text-only prompts too, which is why IKE's locality is poor in the literature.
- Lifelong (``lifelong = True``; the sequential protocol): the retrieval pool holds every live edit's
  copy demonstration besides the train demonstrations, and each prompt gets its own context
  (`IkeEditor.context_of`, cached per prompt until the next edit): the live edits ranked by the cosine
  similarity of their copy demonstration to the prompt's embedding (`embed_texts` of the prompt); the
  most similar edit ``e`` gives the end of the context, its copy demonstration and ``"New Fact: {p}
  {t}\\nPrompt: "``; before it go the other edits' copy demonstrations (most similar first), then the
  ``k`` train demonstrations retrieved for ``e``; when the budget runs out, train demonstrations drop
  first, then the least similar edits. With one edit live the context is the same for every prompt and
  is exactly the single-edit context (no prompt is embedded then); with several, the train
  demonstrations are those retrieved for the prompt's nearest edit, not re-ranked against the prompt.

Departures from EasyEdit, and why:
- The sentence encoder: EasyEdit embeds with all-MiniLM-L6-v2 (sentence-transformers); here the
  backbone's own language model embeds (mean of its final hidden states over the text's tokens,
  L2-normalised), which is frozen, always available offline and needs no second model.
- ``k`` = 32 as EasyEdit's BLIP-2 / MiniGPT-4 configs, but demonstrations that do not fit the LM's
  positions are dropped, least similar first: the context may use ``max_position_embeddings`` minus the
  image tokens minus ``reserve_tokens`` (room for the probe prompt and its target). Real 7B backbones
  (2048+ positions) keep all 32; the toy models (256 positions) keep a few (`IkeEditor.demos_used`).
- The original IKE paper orders demonstrations by ascending similarity (most similar last); EasyEdit,
  followed here, puts the most similar first.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from attrib.backbones.loader import Backbone
from attrib.data import EditRecord
from attrib.prompts import load_prompts
from editing.editor import Editor, EditRequest
from editing.methods import MethodContext

DEMONSTRATION = "New Fact: {fact} {target}\nPrompt: {probe} {answer}\n\n"
NEW_FACT = "New Fact: {fact} {target}\nPrompt: "


@dataclass(frozen=True)
class IkeConfig:
    """k: demonstrations retrieved per edit; reserve_tokens: positions kept free for the probe prompt and
    its target; batch_size: texts per forward when embedding the pool."""

    k: int = 32
    reserve_tokens: int = 64
    batch_size: int = 32


def _no_context(prompt: str) -> str:
    return ""


@dataclass
class InContextBackbone(Backbone):
    """A backbone whose every prompt is preceded by ``context(prompt)`` (inside the template)."""

    context: Callable[[str], str] = _no_context

    def format_prompt(self, prompt: str, with_image: bool = True) -> str:
        return super().format_prompt(self.context(prompt) + prompt, with_image)


@dataclass
class LiveEdit:
    """An edit in context: its copy demonstration, that text's embedding [D] and the pool indices of the
    ``k`` train demonstrations most similar to it (most similar first)."""

    request: EditRequest
    own: str
    embedding: torch.Tensor
    retrieved: list[int]


@torch.no_grad()
def embed_texts(backbone: Backbone, texts: Sequence[str], batch_size: int) -> torch.Tensor:
    """FloatTensor [N, D] (CPU): each text's final LM hidden states averaged over its tokens, L2-normalised
    (no template; text-only forward)."""
    tokenizer = backbone.tokenizer
    tokenizer.padding_side = "left"
    pooled = []
    for start in range(0, len(texts), batch_size):
        inputs = tokenizer(list(texts[start:start + batch_size]), padding=True, return_tensors="pt")
        mask = inputs["attention_mask"]
        # positions counted from each row's first real token, so padding does not shift them
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = backbone.forward(inputs, position_ids=positions, output_hidden_states=True,
                                  use_cache=False).hidden_states[-1]  # [B, T, D]
        weights = mask.unsqueeze(-1).to(hidden.device, hidden.dtype)
        mean = (hidden * weights).sum(1) / weights.sum(1)
        pooled.append(torch.nn.functional.normalize(mean.float(), dim=-1).cpu())
    return torch.cat(pooled)


def demonstrations(record: EditRecord, formats: dict[str, str], task: str) -> list[str]:
    """The copy, update and retain demonstrations of one train record (module docstring)."""
    fact = formats[task].format(src=record.src)
    rephrase = formats[task].format(src=record.rephrase)
    loc = formats["loc"].format(loc=record.loc)
    return [DEMONSTRATION.format(fact=fact, target=record.alt, probe=fact, answer=record.alt),
            DEMONSTRATION.format(fact=fact, target=record.alt, probe=rephrase, answer=record.alt),
            DEMONSTRATION.format(fact=fact, target=record.alt, probe=loc, answer=record.loc_ans)]


class IkeEditor(Editor):
    """In-context editing (module docstring)."""

    text_edits = True
    lifelong = True

    def __init__(self, backbone: Backbone, config: IkeConfig, task: str = "vqa",
                 prompts: dict[str, str] | None = None):
        self.base = backbone
        self.backbone = backbone
        self.config = config
        self.task = task
        self.formats = prompts or load_prompts()
        self.pool: list[str] = []
        self.pool_lengths: list[int] = []
        self.embeddings = torch.empty(0)
        self.edits: list[LiveEdit] = []  # live edits, in edit order
        self.contexts: dict[str, str] = {}  # prompt → its context, while the edits stay the same
        self.demos_used: list[int] = []  # demonstrations that fitted (train and other edits'), per context built

    @property
    def context_budget(self) -> int:
        """Tokens the context may take: the LM's positions less the image tokens and ``reserve_tokens``."""
        positions = self.base.config.text_config.max_position_embeddings
        return positions - self.base.n_visual_tokens - self.config.reserve_tokens

    def _length(self, text: str) -> int:
        return len(self.base.tokenizer(text, add_special_tokens=False).input_ids)

    def prepare(self, train: Sequence[EditRecord], dev: Sequence[EditRecord]) -> dict:
        """Embed the demonstrations of ``train`` (``dev`` is not used)."""
        start = time.perf_counter()
        self.pool = [demo for record in train for demo in demonstrations(record, self.formats, self.task)]
        self.pool_lengths = [self._length(demo) for demo in self.pool]
        self.embeddings = embed_texts(self.base, self.pool, self.config.batch_size)
        mean_length = sum(self.pool_lengths) / max(len(self.pool), 1)
        # the edit's own demonstration and its new-fact line take about 1.5 demonstrations
        fits = int((self.context_budget - 1.5 * mean_length) // max(mean_length, 1.0))
        report = {"seconds": round(time.perf_counter() - start, 2), "steps": 0, "pool": len(self.pool),
                  "k": self.config.k, "context_budget_tokens": self.context_budget,
                  "mean_demonstration_tokens": round(mean_length, 1)}
        if fits < self.config.k:
            report["shortened"] = (f"the LM's {self.base.config.text_config.max_position_embeddings} positions "
                                   f"hold about {max(fits, 0)} of k={self.config.k} demonstrations; "
                                   "the least similar are dropped")
        return report

    def retrieve(self, query: str) -> list[int]:
        """Pool indices of the ``k`` demonstrations most similar to ``query``, most similar first."""
        return self._nearest(embed_texts(self.base, [query], 1)[0])

    def _nearest(self, embedding: torch.Tensor) -> list[int]:
        if not self.pool:
            return []
        scores = self.embeddings @ embedding
        return scores.topk(min(self.config.k, len(self.pool))).indices.tolist()

    def _ranked(self, prompt: str) -> list[LiveEdit]:
        """The live edits, the one whose copy demonstration is most similar to ``prompt`` first."""
        if len(self.edits) == 1:
            return list(self.edits)
        scores = torch.stack([edit.embedding for edit in self.edits]) @ embed_texts(self.base, [prompt], 1)[0]
        return [self.edits[i] for i in scores.argsort(descending=True, stable=True).tolist()]

    def context_of(self, prompt: str) -> str:
        """The text put in front of ``prompt`` while the current edits are live (module docstring)."""
        if prompt not in self.contexts:
            self.contexts[prompt] = self._build_context(self._ranked(prompt))
        return self.contexts[prompt]

    def _build_context(self, ranked: list[LiveEdit]) -> str:
        nearest, others = ranked[0], ranked[1:]
        request = nearest.request
        head = nearest.own + NEW_FACT.format(fact=request.prompt, target=request.target)
        budget = self.context_budget - self._length(head)
        edits, train = [], []
        for demo in [edit.own for edit in others]:
            length = self._length(demo)
            if length > budget:
                break
            edits.append(demo)
            budget -= length
        for index in nearest.retrieved if len(edits) == len(others) else []:
            if self.pool_lengths[index] > budget:
                break
            train.append(self.pool[index])
            budget -= self.pool_lengths[index]
        while (edits or train) and self._length("".join(edits + train) + head) > self.context_budget:
            (train or edits).pop()  # tokenizing the joined text can merge across demonstrations
        self.demos_used.append(len(edits) + len(train))
        return "".join(edits + train) + head

    def edit(self, request: EditRequest) -> str:
        """Add ``request`` (and its retrieved demonstrations) to the live edits; returns the context of the
        edit's own prompt."""
        own = DEMONSTRATION.format(fact=request.prompt, target=request.target, probe=request.prompt,
                                   answer=request.target)
        embedding = embed_texts(self.base, [own], 1)[0]
        self.edits.append(LiveEdit(request, own, embedding, self._nearest(embedding)))
        self.contexts = {}
        self.backbone = InContextBackbone.view(self.base, context=self.context_of)
        return self.context_of(request.prompt)

    def restore(self) -> None:
        self.edits, self.contexts = [], {}
        self.backbone = self.base


def build(context: MethodContext) -> IkeEditor:
    return IkeEditor(context.backbone, IkeConfig(**context.hyper), context.task)
