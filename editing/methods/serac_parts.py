"""SERAC's learned parts: the scope classifier over frozen backbone features, the counterfactual model's
prompts and training loops, and the safetensors files `prepare` resumes from (`editing.methods.serac`).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from attrib.answers import target_token_ids, teacher_forced_hits
from attrib.artifact import check_state_dict
from attrib.backbones.loader import Backbone
from attrib.data import EditRecord
from attrib.io import atomic_write, atomic_write_json, read_json, read_safetensors, require
from attrib.parallel import batch_shares, gather, processes, sum_, sum_gradients
from editing.inputs import teacher_forced_batch

# Columns of a record's cached features: the first three are in the scope of the record's edit
# (column 0 is the edit input itself), the last two are its locality probes.
COLUMNS = ("src", "rephrase", "image_rephrase", "loc", "m_loc")
IN_SCOPE = (0, 1, 2)


@dataclass(frozen=True)
class Rows:
    """Inputs of one `Backbone.encode` call: images (one per prompt, or None for text-only rows),
    prompts in the dataset's format, optional teacher-forcing targets."""

    images: list[Image.Image] | None
    prompts: list[str]
    targets: list[str] | None = None


def context_prompt(context_format: str, edit_prompt: str, edit_target: str, prompt: str) -> str:
    """The counterfactual model's prompt: the edit as text in front of the query's prompt (the
    backbone template goes around both)."""
    return context_format.format(prompt=edit_prompt, target=edit_target) + prompt


# ---------------------------------------------------------------------------------------------- features

@contextmanager
def captured(module: torch.nn.Module) -> Iterator[dict]:
    """``store["output"]``: the output of ``module`` during the block (the hook is removed after)."""
    store: dict[str, Any] = {}
    handle = module.register_forward_hook(lambda _module, _args, output: store.__setitem__("output", output))
    try:
        yield store
    finally:
        handle.remove()


def pool(hidden: torch.Tensor, mask: torch.Tensor, n_target: Sequence[int]) -> torch.Tensor:
    """[B, T, D] final hidden states → [B, D] float32 means over each row's real positions before its last
    ``n_target[b]`` (teacher-forced target) tokens; the model is causal, so these do not see the target."""
    length = hidden.shape[1]
    ends = length - torch.tensor(list(n_target), device=hidden.device)
    keep = mask.bool() & (torch.arange(length, device=hidden.device)[None, :] < ends[:, None])
    weights = keep.to(torch.float32).unsqueeze(-1)  # [B, T, 1]
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def target_counts(backbone: Backbone, rows: Rows) -> list[int]:
    """Target tokens per row (0 without targets), as the evaluation counts them."""
    if rows.targets is None:
        return [0] * len(rows.prompts)
    return [len(target_token_ids(backbone, p, t, rows.images is not None)) for p, t in zip(rows.prompts, rows.targets)]


def forward_with_features(backbone: Backbone, forward: Callable, inputs, rows: Rows, **kwargs):
    """(``forward(inputs, **kwargs)``, [B, D] pooled final-norm features of the rows' prompt positions);
    ``forward`` runs ``backbone.model``, whose final norm is hooked for the call."""
    with captured(backbone.module(backbone.spec.final_norm)) as store:
        output = forward(inputs, **kwargs)
    return output, pool(store["output"].detach(), inputs["attention_mask"], target_counts(backbone, rows))


@torch.no_grad()
def features(backbone: Backbone, rows: Rows, batch: int) -> torch.Tensor:
    """[N, D] pooled features of prompt-only rows, ``batch`` rows per forward of the unedited model."""
    out = []
    for start in range(0, len(rows.prompts), batch):
        images = None if rows.images is None else rows.images[start:start + batch]
        part = Rows(images, rows.prompts[start:start + batch])
        inputs = backbone.encode(part.images, part.prompts)
        out.append(forward_with_features(backbone, backbone.forward, inputs, part, use_cache=False)[1])
    return torch.cat(out)


def record_rows(record: EditRecord, formats: dict[str, str], edit_format: str) -> dict[str, tuple]:
    """Column name → (image field or None, prompt) of a record's five classifier inputs."""
    return {"src": ("image", edit_format.format(src=record.src)),
            "rephrase": ("image", edit_format.format(src=record.rephrase)),
            "image_rephrase": ("image_rephrase", edit_format.format(src=record.src)),
            "loc": (None, formats["loc"].format(loc=record.loc)),
            "m_loc": ("m_loc", formats["m_loc"].format(m_loc_q=record.m_loc_q))}


def record_features(backbone: Backbone, records: Sequence[EditRecord], formats: dict[str, str], edit_format: str,
                    batch: int, progress: bool = False) -> torch.Tensor:
    """[N, 5, D] features of every record's `COLUMNS` (images opened per chunk, never all held). Under
    several processes the chunks are dealt round-robin and gathered: the same batches as alone."""
    procs = processes()
    starts = list(range(0, len(records), batch))
    done = {}
    for start in tqdm(procs.round_robin(starts), desc="serac features", disable=not progress):
        chunk = [record_rows(r, formats, edit_format) for r in records[start:start + batch]]
        columns = []
        for name in COLUMNS:
            fields = [rows[name] for rows in chunk]
            images = None if fields[0][0] is None else [r.load_image(f) for r, (f, _) in
                                                        zip(records[start:start + batch], fields)]
            columns.append(features(backbone, Rows(images, [p for _, p in fields]), batch))
        done[start] = torch.stack(columns, dim=1)
    if procs.several:
        shared = gather({start: part.cpu() for start, part in done.items()})
        done = {start: part.to(backbone.device) for shares in shared for start, part in shares.items()}
    return torch.cat([done[start] for start in starts])


# -------------------------------------------------------------------------------------- scope classifier

class ScopeClassifier(torch.nn.Module):
    """Embedding head + scaled cosine: p(in scope | query, edit) = σ(s · cos(W(q − μ), W(e − μ)) + b).

    μ: the mean train feature (frozen backbone features share a large common direction that would
    make every cosine high); W: [dim, width] trained; s, b: trained scale and offset, initialised so that
    cos = 0.5 scores 0.5.
    """

    def __init__(self, width: int, dim: int, init_scale: float, generator: torch.Generator):
        super().__init__()
        self.project = torch.nn.Linear(width, dim, bias=False)
        with torch.no_grad():
            self.project.weight.copy_(torch.randn(dim, width, generator=generator) / math.sqrt(width))
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(init_scale)))
        self.offset = torch.nn.Parameter(torch.tensor(-init_scale / 2))
        self.register_buffer("center", torch.zeros(width))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """[..., width] → [..., dim] unit vectors."""
        return torch.nn.functional.normalize(self.project(features.float() - self.center), dim=-1)

    def logits(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """queries [Q, dim], keys [K, dim] (embedded) → [Q, K] logits of the in-scope probability."""
        return self.log_scale.exp() * queries @ keys.T + self.offset

    def scores(self, query_features: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """[Q, width] features, [K, dim] embedded keys → [Q, K] probabilities."""
        return torch.sigmoid(self.logits(self.embed(query_features), keys))


def pair_labels(n: int) -> torch.Tensor:
    """[5n, n] float: query (record q // 5, column q % 5) is in the scope of edit k."""
    query_record = torch.arange(5 * n) // 5
    in_scope_column = torch.isin(torch.arange(5 * n) % 5, torch.tensor(IN_SCOPE))
    return ((query_record[:, None] == torch.arange(n)[None, :]) & in_scope_column[:, None]).float()


def scope_rates(head: ScopeClassifier, feats: torch.Tensor, threshold: float) -> dict[str, float]:
    """Dev curve point: per column, the fraction routed to the row's own edit (want 1 for the first
    three, 0 for loc / m_loc), and ``other``: the fraction of (edit, other record's in-scope input) pairs
    routed (want 0)."""
    with torch.no_grad():
        n = feats.shape[0]
        routed = head.scores(feats.reshape(5 * n, -1), head.embed(feats[:, 0])) > threshold  # [5n, n]
        own = routed[torch.arange(5 * n), torch.arange(5 * n) // 5].reshape(n, 5).float().mean(0)
        in_scope_column = torch.isin(torch.arange(5 * n) % 5, torch.tensor(IN_SCOPE))[:, None]
        other = pair_labels(n).bool().logical_not() & in_scope_column
        rates = {name: round(own[i].item(), 4) for i, name in enumerate(COLUMNS)}
        rates["other"] = round(routed[other].float().mean().item(), 4) if n > 1 else 0.0
    return rates


def train_classifier(head: ScopeClassifier, feats: torch.Tensor, dev: torch.Tensor | None, hyper: dict,
                     generator: torch.Generator, progress: bool = False) -> dict:
    """Fit ``head`` on train features [N, 5, D] with a class-balanced BCE over every (edit, query) pair of
    a batch of records: in scope = the edit's own src / rephrase / image_rephrase; out of scope = its own
    loc and m_loc and every input of the other records. Returns steps, final loss and the dev curve."""
    head.center.copy_(feats.reshape(-1, feats.shape[-1]).mean(0))
    optimizer = torch.optim.Adam(head.parameters(), lr=hyper["cls_lr"])
    batch = min(hyper["cls_batch"], feats.shape[0])
    curve, loss = [], torch.tensor(float("nan"))
    for step in tqdm(range(hyper["cls_steps"] + 1), desc="serac classifier", disable=not progress):
        if dev is not None and step % hyper["dev_every"] == 0:
            curve.append({"step": step, **scope_rates(head, dev, hyper["threshold"])})
        if step == hyper["cls_steps"]:
            break
        chosen = torch.randperm(feats.shape[0], generator=generator)[:batch]
        part = feats[chosen]
        labels = pair_labels(batch)
        logits = head.logits(head.embed(part.reshape(5 * batch, -1)), head.embed(part[:, 0]))
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        loss = bce[labels.bool()].mean() + bce[~labels.bool()].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"steps": hyper["cls_steps"], "final_loss": round(loss.item(), 4), "dev_curve": curve}


# --------------------------------------------------------------------------------- counterfactual model

def in_scope_rows(records: Sequence[EditRecord], targets: Sequence[str], edit_format: str, context_format: str,
                  roles: Sequence[int] | None = None) -> Rows:
    """In-scope inputs of each record, each with the edit (src prompt, ``target``) in context, to be
    answered ``target``: role 0 = src, 1 = rephrase (both with the edit image), 2 = src with
    image_rephrase; ``roles`` picks one per record (default: all three)."""
    images, prompts, answers = [], [], []
    for position, (record, target) in enumerate(zip(records, targets, strict=True)):
        edit_prompt = edit_format.format(src=record.src)
        choices = ((record.src, "image"), (record.rephrase, "image"), (record.src, "image_rephrase"))
        for query, field in (choices if roles is None else [choices[roles[position]]]):
            images.append(record.load_image(field))
            prompts.append(context_prompt(context_format, edit_prompt, target, edit_format.format(src=query)))
            answers.append(target)
    return Rows(images, prompts, answers)


def trainable_layers(backbone: Backbone, count: int) -> list[torch.nn.Parameter]:
    """Parameters of the last ``count`` decoder layers; when ``count`` < 1, of the whole decoder stack
    (the module holding the layers: token and position embeddings, every layer, the final norm)."""
    if count < 1:
        return list(backbone.module(backbone.spec.layers.rsplit(".", 1)[0]).parameters())
    return [p for layer in list(backbone.module(backbone.spec.layers))[-count:] for p in layer.parameters()]


def random_words(count: int, generator: torch.Generator, shortest: int = 4, longest: int = 9) -> list[str]:
    """``count`` strings of random lowercase letters (words no text holds: several tokens each)."""
    lengths = torch.randint(shortest, longest + 1, (count,), generator=generator).tolist()
    return ["".join(chr(97 + c) for c in torch.randint(26, (n,), generator=generator).tolist()) for n in lengths]


def counterfactual_loss(copy: Backbone, rows: Rows, lm_weight: float) -> torch.Tensor:
    """Mean target NLL (as `common.target_loss`) + ``lm_weight`` × mean next-token NLL over every text
    position of the rows (the query repeats much of the edit in its context: a dense copying signal).
    Under several processes each term is this process's share of the global batch's mean."""
    batch = teacher_forced_batch(copy, rows.images, rows.prompts, rows.targets)
    logits = copy.forward(batch.inputs, use_cache=False).logits.float()  # [B, T, V]
    target = sum(torch.nn.functional.cross_entropy(batch.answer_logits(logits, row), batch.labels(row),
                                                   reduction="sum") for row in range(len(rows.prompts)))
    ids = batch.inputs["input_ids"]
    text = batch.inputs["attention_mask"].bool() & (ids != copy.image_token_id)
    scored = text[:, 1:] & text[:, :-1]  # [B, T-1]: the token and the one before it are text
    target_share, lm_share = batch_shares([sum(batch.target_lengths), int(scored.sum())])
    loss = target / sum(batch.target_lengths) * target_share
    if lm_weight:
        lm = torch.nn.functional.cross_entropy(logits[:, :-1][scored], ids[:, 1:][scored])
        loss = loss + lm_weight * (lm * lm_share)
    return loss


def train_counterfactual(copy: Backbone, records: Sequence[EditRecord], dev: Sequence[EditRecord], edit_format: str,
                         hyper: dict, generator: torch.Generator, progress: bool = False) -> dict:
    """Fine-tune ``copy`` (`trainable_layers` of ``cf_train_layers``) on `in_scope_rows`, one in-scope
    input drawn per record and step, with `counterfactual_loss`. A record's target is replaced, in the
    context and the answer alike, with probability ``cf_swap_fraction`` by an answer string of the train
    records (alt, loc_ans, m_loc_a) and with probability ``cf_random_fraction`` by a `random_words` word,
    so the model learns to copy the edit, multi-token words included, rather than to recall train
    targets. Dev curve: token accuracy of the dev records' in-scope rows with their own edit in context."""
    parameters = trainable_layers(copy, hyper["cf_train_layers"])
    for parameter in copy.model.parameters():
        parameter.requires_grad_(False)
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=hyper["cf_lr"])
    pool_answers = sorted({a for r in records for a in (r.alt, r.loc_ans, r.m_loc_a) if a.strip()})
    batch = min(hyper["cf_batch"], len(records))
    context_format = hyper["context_format"]
    curve, loss = [], torch.tensor(float("nan"))
    procs = processes()  # under `accelerate launch`: each process takes its share of every step's records
    own = procs.slice_of(batch)
    for step in tqdm(range(hyper["cf_steps"] + 1), desc="serac counterfactual", disable=not progress):
        if dev and procs.main and step % hyper["dev_every"] == 0:
            curve.append({"step": step, "in_scope_token_acc": counterfactual_accuracy(copy, dev, edit_format,
                                                                                      context_format)})
        if step == hyper["cf_steps"]:
            break
        chosen = [records[i] for i in torch.randperm(len(records), generator=generator)[:batch].tolist()]
        draw = torch.rand(batch, generator=generator).tolist()
        pooled = torch.randint(len(pool_answers), (batch,), generator=generator).tolist()
        invented = random_words(batch, generator)
        swap, invent = hyper["cf_swap_fraction"], hyper["cf_swap_fraction"] + hyper["cf_random_fraction"]
        targets = [pool_answers[p] if u < swap else word if u < invent else r.alt
                   for r, u, p, word in zip(chosen, draw, pooled, invented)]
        roles = torch.randint(len(IN_SCOPE), (batch,), generator=generator).tolist()
        rows = in_scope_rows(chosen[own], targets[own], edit_format, context_format, roles[own])
        loss = counterfactual_loss(copy, rows, hyper["cf_lm_weight"])
        optimizer.zero_grad()
        loss.backward()
        sum_gradients(parameters)  # the global batch's gradient (nothing alone)
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        loss = sum_(loss.detach())
    for parameter in copy.model.parameters():
        parameter.requires_grad_(False)
    return {"steps": hyper["cf_steps"], "final_loss": round(loss.item(), 4), "dev_curve": curve}


@torch.no_grad()
def counterfactual_accuracy(copy: Backbone, records: Sequence[EditRecord], edit_format: str,
                            context_format: str) -> float:
    """Mean token accuracy of the in-scope rows of ``records`` answered by ``copy``."""
    rows = in_scope_rows(records, [r.alt for r in records], edit_format, context_format)
    hits = teacher_forced_hits(copy, rows.images, rows.prompts, rows.targets)
    return round(sum(sum(h) / len(h) for h in hits) / len(hits), 4)


# ------------------------------------------------------------------------------------------------ files

def run_phase(work: Path | None, name: str, signature: dict, module: torch.nn.Module,
              parameter_names: Sequence[str], train: Callable[[], dict]) -> dict:
    """Train (``train()`` → report) and save ``module``'s named tensors as ``<work>/<name>.safetensors``
    with the report in ``<name>.json`` (both atomic, the JSON last: it marks a complete pair); when both
    exist with the same ``signature``, load them instead (report marked ``resumed``). A pair that cannot
    be read or does not hold exactly ``parameter_names`` with their shapes raises `ArtifactError`, before
    anything is loaded. Without ``work`` nothing is saved."""
    weights = None if work is None else Path(work) / f"{name}.safetensors"
    meta = None if work is None else Path(work) / f"{name}.json"
    if weights is not None and weights.is_file() and meta.is_file():
        stored = read_json(meta, f"SERAC {name} report")
        if require(stored, "signature", dict, str(meta), default=None) == signature:
            report = require(stored, "report", dict, str(meta))
            state, _ = read_safetensors(weights, f"SERAC {name} cache")
            own = module.state_dict()
            check_state_dict(state, {key: own[key] for key in parameter_names}, weights, f"the tensors {name} saves",
                             hint="; delete it to train again")
            module.load_state_dict(state, strict=False)
            return {**report, "resumed": True}
    start = time.perf_counter()
    report = {**train(), "seconds": round(time.perf_counter() - start, 1)}
    if weights is not None and processes().main:
        weights.parent.mkdir(parents=True, exist_ok=True)
        state = module.state_dict()
        tensors = {key: state[key].detach().contiguous().cpu() for key in parameter_names}
        atomic_write(weights, lambda tmp: save_file(tensors, tmp))
        atomic_write_json(meta, {"signature": signature, "report": report}, indent=1)
    return report
