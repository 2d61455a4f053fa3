"""The question gate (our extension): an edit fires only in input rows that ask its question, or a rephrase of it.

Why: the scene router and gate pick the edit *image*, and VEAD then rewrites that image's visual tokens for
every question asked about it. On the test split that changes the answer to 17–25 % of the other questions
about the edit image (same-image locality 74.8–83.0), while the paper's metrics, whose locality images
are unrelated to the edit, cannot see it. VEAD writes the visual tokens, which come before the question,
so nothing at the edit layer's visual slice tells questions apart; the input ids do.

What it is: a question encoder over the LM's own (frozen) input embeddings of the row's prompt tokens
(the tokens before the prompt's closing marker, e.g. " The answer is:" and the chat template's tail, with
image placeholders and padding left out), each token through a two-layer MLP, attention-pooled, a
linear map, unit length. Trained contrastively on the training records only: each record's question and
its rephrase a positive pair; the record's same-image questions and every other question of the batch
negatives, except questions of the same meaning (the strings that some training record pairs as question
and rephrase, joined transitively). The threshold is chosen on the dev records: the cosine that best parts
each dev edit's rephrase (kept) from its same-image questions (turned away), by balanced accuracy.

Where it acts (`AdapterHook`): after the bank routes a row to an edit by its image, the row is left
untouched, adapter and output write alike, unless its question key has a cosine ≥ the threshold with
the edit's. Rows the bank routes nowhere are not looked at.

The closing marker is what lets one rule serve both generation and teacher-forced scoring: a prompt ends
with it, and the answer tokens a scorer appends after it are left out of the key, so the key of a row is
the same whether its answer is being generated or read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from editing.adapter.router import ContrastiveConfig, contrastive_loss, reset_seeded


@dataclass(frozen=True)
class QuestionGateConfig(ContrastiveConfig):
    """The question encoder's sizes and training (module docstring); fixed before any run, not swept."""

    hidden: int = 256
    epochs: int = 40


class QuestionEncoder(nn.Module):
    """``keys(ids, embed)`` → [B, dim] unit question keys of token rows; ``threshold`` the cosine a row's
    key needs with an edit's for the edit to act on it. ``marker`` (the prompt's closing tokens),
    ``pad_id`` and ``image_token_id`` say which tokens of a row are its question."""

    def __init__(self, width: int, config: QuestionGateConfig = QuestionGateConfig(), marker_length: int = 1):
        super().__init__()
        self.config = config
        self.token = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, config.hidden), nn.GELU(),
                                   nn.Linear(config.hidden, config.hidden), nn.GELU())
        self.score = nn.Linear(config.hidden, 1)
        self.out = nn.Linear(config.hidden, config.dim)
        self.register_buffer("marker", torch.zeros(marker_length, dtype=torch.long))
        self.register_buffer("special", torch.full((2,), -1, dtype=torch.long))  # pad id, image token id
        self.register_buffer("threshold", torch.ones(()))

    def set_tokens(self, marker: Sequence[int], pad_id: int | None, image_token_id: int | None) -> None:
        device = self.threshold.device
        self.marker = torch.tensor(list(marker), dtype=torch.long, device=device)
        special = [-1 if token is None else token for token in (pad_id, image_token_id)]
        self.special = torch.tensor(special, dtype=torch.long, device=device)

    def question_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, T] bool: the tokens of each row before the last occurrence of ``marker`` (every token when
        it does not occur), padding and image placeholders left out."""
        ids = ids.to(self.marker.device)
        batch, length = ids.shape
        positions = torch.arange(length, device=ids.device)
        end = torch.full((batch,), length, device=ids.device)
        m = len(self.marker)
        if 0 < m <= length:
            found = (ids.unfold(1, m, 1) == self.marker).all(-1)  # [B, T − m + 1]: the marker starts here
            starts = torch.where(found, positions[:length - m + 1], -1).amax(1)
            end = torch.where(starts >= 0, starts, end)
        mask = positions[None] < end[:, None]
        for token in self.special.tolist():
            if token >= 0:
                mask &= ids != token
        return mask

    def forward(self, embedded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """embedded [B, T, d] token embeddings, mask [B, T] the question's tokens → [B, dim] unit keys."""
        hidden = self.token(embedded.to(self.out.weight.dtype))
        scores = self.score(hidden)[..., 0].masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1).nan_to_num(0.0)  # a row without question tokens: all zero
        return nn.functional.normalize(self.out((weights[..., None] * hidden).sum(1)), dim=-1)

    def keys(self, ids: torch.Tensor, embed: nn.Module) -> torch.Tensor:
        """[B, dim] question keys of the token rows ``ids`` [B, T], embedded by the LM's ``embed`` (its
        weight looked up directly: calling the module would run the hooks installed on it). Only the
        columns that hold a question token in some row are encoded (the others weigh zero)."""
        mask = self.question_mask(ids)
        columns = mask.any(0)
        ids, mask = ids[:, columns.to(ids.device)], mask[:, columns]
        with torch.no_grad():
            embedded = nn.functional.embedding(ids.to(embed.weight.device), embed.weight).to(self.marker.device)
        return self(embedded, mask)


def meaning_groups(pairs: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Question string → group id, joining the two strings of every pair, transitively (union-find)."""
    parent: dict[str, str] = {}

    def root(s: str) -> str:
        parent.setdefault(s, s)
        while parent[s] != s:
            parent[s] = parent[parent[s]]
            s = parent[s]
        return s

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[ra] = rb
    roots: dict[str, int] = {}
    return {s: roots.setdefault(root(s), len(roots)) for s in list(parent)}


def fit_question_encoder(encoder: QuestionEncoder, embed: nn.Module, tokens: dict[str, torch.Tensor],
                         pairs: Sequence[tuple[str, str, Sequence[str]]], progress: bool = False) -> list[float]:
    """Train ``encoder`` on ``pairs`` (question, rephrase, [same-image questions]) of the training records;
    ``tokens`` maps each string to its prompt's token ids. Returns the loss per epoch."""
    from tqdm.auto import tqdm

    config = encoder.config
    if len(pairs) < 2:
        raise ValueError(f"question gate: {len(pairs)} training pairs; need two or more")
    group_of = meaning_groups([(q, r) for q, r, _ in pairs])
    strings = list(tokens)
    index = {s: i for i, s in enumerate(strings)}
    group = torch.tensor([group_of.get(s, len(group_of) + i) for i, s in enumerate(strings)])
    length = max(len(t) for t in tokens.values())
    device = encoder.marker.device
    ids = torch.full((len(strings), length), -1, dtype=torch.long)
    for s, t in tokens.items():
        ids[index[s], :len(t)] = t
    valid = ids >= 0
    with torch.no_grad():
        embedded = nn.functional.embedding(ids.clamp(min=0).to(embed.weight.device), embed.weight).to(device).float()
    masks = encoder.question_mask(ids.clamp(min=0)) & valid.to(device)
    first = torch.tensor([index[q] for q, _, _ in pairs])
    second = torch.tensor([index[r] for _, r, _ in pairs])
    negatives = [torch.tensor([index[n] for n in same], dtype=torch.long) for _, _, same in pairs]

    generator = torch.Generator().manual_seed(config.seed)
    reset_seeded(encoder, config.seed)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    encoder.train()
    losses = []
    for _ in tqdm(range(config.epochs), desc="question gate", disable=not progress):
        order = torch.randperm(len(pairs), generator=generator)
        total, batches = 0.0, 0
        for lo in range(0, len(order), config.batch_size):
            batch = order[lo:lo + config.batch_size]
            if len(batch) < 2:
                continue
            extra = torch.cat([negatives[i] for i in batch.tolist()])
            rows = torch.cat([first[batch], second[batch], extra])
            keys = encoder(embedded[rows], masks[rows])
            n = len(batch)
            a, b, hard = keys[:n], keys[n:2 * n], keys[2 * n:]
            loss = contrastive_loss(a, b, group[first[batch]], config.temperature)
            if len(hard):  # the same-image questions: negatives of every anchor not of their meaning
                logits = torch.cat([a @ b.T, a @ hard.T], 1) / config.temperature
                same = group[first[batch]][:, None] == torch.cat([group[second[batch]], group[extra]])[None]
                same[torch.arange(n), torch.arange(n)] = False
                logits = logits.masked_fill(same, float("-inf"))
                loss = loss + nn.functional.cross_entropy(logits, torch.arange(n))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        losses.append(total / batches)
    encoder.eval()
    return losses


@torch.no_grad()
def choose_question_threshold(encoder: QuestionEncoder, keys: dict[str, torch.Tensor],
                              dev: Sequence[tuple[str, str, Sequence[str]]]) -> dict:
    """Set ``encoder.threshold`` to the cosine that best parts each dev edit's rephrase (to keep) from its
    same-image questions (to turn away), by balanced accuracy; ``keys`` maps strings to their unit keys.
    Returns the report (threshold and the dev shares kept / turned away)."""
    kept = torch.stack([keys[q] @ keys[r] for q, r, _ in dev])
    away = torch.cat([torch.stack([keys[q] @ keys[s] for s in same]) for q, _, same in dev if same])
    candidates = torch.unique(torch.cat([kept, away]))
    keep_share = (kept[None] >= candidates[:, None]).float().mean(1)
    away_share = (away[None] < candidates[:, None]).float().mean(1)
    best = int(torch.argmax(keep_share + away_share))  # the lowest of the best cut points
    # halfway to the next value below it: the same dev shares, with room on both sides
    threshold = float(candidates[best] + candidates[best - 1]) / 2 if best > 0 else float(candidates[0])
    encoder.threshold.fill_(threshold)
    return {"threshold": round(threshold, 4), "dev_edits": len(dev),
            "dev_rephrase_kept": round(100 * float(keep_share[best]), 1),
            "dev_same_image_turned_away": round(100 * float(away_share[best]), 1),
            "dev_same_image_questions": len(away)}


def prompt_ids(backbone, prompt: str) -> torch.Tensor:
    """The token ids of ``prompt`` in the backbone's image template, as its tokenizer gives them (the
    question's tokens are the same as in the processor's rows; image placeholders are left out anyway)."""
    return torch.tensor(backbone.tokenizer(backbone.format_prompt(prompt))["input_ids"], dtype=torch.long)


PROBES = ("What color is the cube?", "Count the objects in the image.")


def closing_marker(backbone, prompt_format: str, probes: Sequence[str] = PROBES) -> list[int]:
    """The token ids every prompt of ``prompt_format`` (e.g. "{src} The answer is:") ends with in the
    backbone's template: the longest common suffix of two probe prompts' ids."""
    a, b = (prompt_ids(backbone, prompt_format.format(src=p)).tolist() for p in probes)
    m = 0
    while m < min(len(a), len(b)) and a[-1 - m] == b[-1 - m]:
        m += 1
    return a[len(a) - m:]
