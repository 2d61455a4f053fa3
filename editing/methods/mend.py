"""``mend``: MEND (Mitchell et al., ICLR 2022, "Fast Model Editing at Scale") — a hypernetwork that turns
the edit's fine-tuning gradient into a weight update, trained to make edits that generalise and stay local.

What is implemented. The edited weights are the MLP output projections of the LM's last ``n_edit_layers``
layers (``weight``: ``mlp.down_proj`` [D, F] for LLaVA / MiniGPT-4, ``fc2`` for BLIP-2 OPT). An edit
(image, prompt, target) runs one teacher-forced forward, and the gradient of the target NLL w.r.t. each
weight is taken apart into its rank-1 terms δ_t u_tᵀ, one per token (u the layer input, δ the gradient
at its output; `mend_net.edit_factors`). One editor network shared by the layers (`mend_net.MendNet`:
the concatenation [u; δ] standardised by running statistics, then 2 residual layers of rank
min(``rank``, F + D) with a per-layer scale and shift, ``n_hidden = 1``) maps every (u, δ) to (ũ, δ̃), and
the update is ΔW = −α_ℓ Σ_t δ̃_t ũ_tᵀ with a learned per-layer step α_ℓ. `edit` adds ΔW to the weights in
place; `restore` copies the saved originals back. Edits accumulate (``lifelong = True``; MEND's sequential
setting): each edit's factors are taken at the weights the earlier edits left and its ΔW is added to
them, and one `restore` undoes all of them.

Training (`prepare`) follows MEND and EasyEdit's multimodal trainer: per step ``batch_size`` train
records; for each, the factors of its edit (``image`` + ``src`` → ``alt``), the edit applied functionally
(`mend_net.low_rank_update`, the weights untouched, gradients reaching the network and α), and the loss
c_edit · NLL(``alt`` | ``image`` + ``rephrase``) + c_image_edit · NLL(``alt`` | ``image_rephrase`` + ``src``)
+ c_loc · [KL(pre ‖ post) on the text-only ``loc`` row + KL on the ``m_loc`` row], the KLs over every real
position. The backbone is frozen; Adam on the network (``lr``) and on α (``lr_lr``), gradient clipping.
A dev curve (Rel, generality, T-Loc and M-Loc agreement on ``n_dev`` dev records) is drawn every
``eval_every`` steps. The network is saved to ``<work>/mend.safetensors`` with a key of the config, the
backbone and the training records; a later `prepare` with the same key loads it instead of training.

Departures from the paper and why:
- Training is ``steps`` steps capped at ``max_seconds`` (toy defaults: minutes on 2 CPU cores), not
  EasyEdit's up to 50,000 iterations with early stopping on a validation loss; the report says so
  (``shortened``). The network's learning rate is raised to suit the short run (``lr`` 1e-4, EasyEdit
  1e-6); α's (``lr_lr``) and its start (``edit_lr``) are EasyEdit's.
- Only the MLP output projections are edited; MEND and EasyEdit's multimodal configs also edit the input
  projections (fc1 / up_proj). One weight shape means one shared network, half the size at 7B.
- V is initialised N(0, 1/dim) rather than N(0, 1), so that V z is O(1) at any width and one ``lr`` suits
  toy and 7B networks alike.
- The running statistics start empty and the network is then the identity on raw factors, so an untrained
  MEND edits by one gradient step of size α; the official code refuses to run before it has statistics.
- The network is fitted with one torch thread (`FIT_THREADS`), whatever the process uses otherwise: with
  two threads, two fits with one seed in one process end in different networks (some threaded sum runs
  in a varying order, and 1,000 Adam steps amplify it; `docs/experiments/scripts/mend_repro.py`), and
  MEND's row moved by 3.5 points between two from-scratch comparisons. One thread costs ~1.3× fit time.
- Tokens whose u or δ is zero (the last position, padding) carry no rank-1 term and are left out, as the
  official code does; here also positions masked out by the attention mask.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from attrib.artifact import check_state_dict, parse_json
from attrib.data import EditRecord
from attrib.errors import ArtifactError
from attrib.io import atomic_write, read_safetensors
from attrib.parallel import batch_shares, processes, sum_, sum_gradients
from attrib.prompts import load_prompts
from editing.editor import Editor, EditRequest
from editing.evaluation.metrics import agreement, exact_match, predict_rows
from editing.inputs import TeacherForcedBatch, teacher_forced_batch
from editing.methods import MethodContext
from editing.methods.common import ParameterSnapshot
from editing.methods.mend_net import MendNet, edit_factors, frozen, low_rank_update
from editing.training.examples import example_row
from editing.training.losses import locality_kl

CHECKPOINT = "mend.safetensors"
FIT_THREADS = 1  # torch threads of the fit: two threads do not reproduce it (module docstring)
Rows = tuple[list | None, list[str], list[str]]  # (images or None, prompts, targets)


def record_rows(records: Sequence[EditRecord], role: str, task: str, formats: dict[str, str]) -> Rows:
    """Teacher-forced rows of ``role`` for each record: "rel", "t_gen", "m_gen", "m_loc" (with images)
    or "t_loc" (text only: ``loc`` → ``loc_ans``)."""
    if role == "t_loc":
        return None, [formats["loc"].format(loc=r.loc) for r in records], [r.loc_ans for r in records]
    images, prompts, targets = zip(*(example_row(r, role, task, formats) for r in records))
    return list(images), list(prompts), list(targets)


def _mean_nll(batch: TeacherForcedBatch, logits: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """Mean NLL over every target token of ``rows`` of a teacher-forced batch (logits [B, T, V])."""
    total = sum(torch.nn.functional.cross_entropy(batch.answer_logits(logits, row), batch.labels(row), reduction="sum")
                for row in rows)
    return total / sum(batch.target_lengths[row] for row in rows)


def _loss_curve(losses: list[dict[str, float]], every: int) -> list[dict[str, float]]:
    """Mean of each loss part over consecutive windows of ``every`` steps, labelled by the window's last step."""
    curve = []
    for start in range(0, len(losses), every):
        window = losses[start:start + every]
        means = {name: round(sum(step[name] for step in window) / len(window), 5) for name in window[0]}
        curve.append({"step": start + len(window), **means})
    return curve


class MendEditor(Editor):
    """MEND on the last ``n_edit_layers`` MLP output projections (module docstring)."""

    text_edits = True
    lifelong = True

    def __init__(self, context: MethodContext):
        self.backbone, self.hyper, self.task = context.backbone, context.hyper, context.task
        self.seed, self.work, self.progress = context.seed, context.work, context.progress
        self.formats = load_prompts()
        spec, count = self.backbone.spec, int(self.hyper["n_edit_layers"])
        if not 0 < count <= self.backbone.n_layers:
            raise ValueError(f"n_edit_layers={count}: the LM has {self.backbone.n_layers} layers")
        layers = range(self.backbone.n_layers - count, self.backbone.n_layers)
        self.modules = [self.backbone.module(f"{spec.layers}.{i}.{self.hyper['weight']}") for i in layers]
        for module in self.modules:
            if not isinstance(module, torch.nn.Linear):
                raise TypeError(f"mend edits linear layers; {spec.layers}.*.{self.hyper['weight']} is a "
                                f"{type(module).__name__}")
        out_dim, in_dim = self.modules[0].weight.shape
        self.net = MendNet(in_dim, out_dim, count, int(self.hyper["rank"]), int(self.hyper["n_hidden"]),
                           float(self.hyper["edit_lr"]), bool(self.hyper["norm"]), self.seed)
        self.net.to(self.modules[0].weight.device)
        self.snapshot = ParameterSnapshot(m.weight for m in self.modules)

    # editing -------------------------------------------------------------------------------------------
    def edit(self, request: EditRequest) -> None:
        with frozen(self.backbone.model):
            factors = edit_factors(self.backbone, self.modules, [request.image], [request.prompt], [request.target])
        with torch.no_grad():
            updates = self.net.weight_updates(self.net.transform(factors))
            for module, update in zip(self.modules, updates, strict=True):
                module.weight.add_(update.to(module.weight.dtype))

    def restore(self) -> None:
        self.snapshot.restore()

    # training ------------------------------------------------------------------------------------------
    def objective(self, records: Sequence[EditRecord], observe: bool = False) -> dict[str, torch.Tensor]:
        """The MEND training loss of editing each of ``records`` (its parts too); differentiable w.r.t. the
        network. ``observe``: fold the edits' factors into the running statistics first.

        Four forwards besides the edit's: the image rows (t_gen, m_gen, m_loc of every record, one batch)
        and the text-only loc rows, each before (no grad) and after the edit, on the same encoded batch."""
        h, count = self.hyper, len(records)
        roles = [record_rows(records, role, self.task, self.formats) for role in ("t_gen", "m_gen", "m_loc")]
        image = teacher_forced_batch(self.backbone, *(sum((list(r[i]) for r in roles), []) for i in range(3)))
        text = teacher_forced_batch(self.backbone, *record_rows(records, "t_loc", self.task, self.formats))
        with frozen(self.backbone.model):
            factors = edit_factors(self.backbone, self.modules, *record_rows(records, "rel", self.task, self.formats))
            transformed = self.net.transform(factors, observe=observe)
            with torch.no_grad():
                pre = [self.backbone.forward(b.inputs, use_cache=False).logits.float().log_softmax(-1)
                       for b in (image, text)]
            with low_rank_update(self.modules, transformed, self.net.edit_lrs, torch.arange(count).repeat(3)):
                post_image = self.backbone.forward(image.inputs, use_cache=False).logits.float()
            with low_rank_update(self.modules, transformed, self.net.edit_lrs, torch.arange(count)):
                post_text = self.backbone.forward(text.inputs, use_cache=False).logits.float().log_softmax(-1)
        image_mask, text_mask = image.inputs["attention_mask"].bool(), text.inputs["attention_mask"].bool()
        loc = slice(2 * count, 3 * count)
        parts = {"t_gen": _mean_nll(image, post_image, range(count)),
                 "m_gen": _mean_nll(image, post_image, range(count, 2 * count)),
                 "t_loc": locality_kl(pre[1], post_text, text_mask),
                 "m_loc": locality_kl(pre[0][loc], post_image[loc].log_softmax(-1), image_mask[loc])}
        # Under several processes each part is this process's share of the global batch's mean.
        counts = [sum(image.target_lengths[:count]), sum(image.target_lengths[count:2 * count]),
                  int(text_mask.sum()), int(image_mask[loc].sum())]
        parts = {name: value * share for (name, value), share in zip(parts.items(), batch_shares(counts))}
        parts["total"] = (h["c_edit"] * parts["t_gen"] + h["c_image_edit"] * parts["m_gen"]
                          + h["c_loc"] * (parts["t_loc"] + parts["m_loc"]))
        return parts

    def dev_point(self, records: Sequence[EditRecord]) -> dict[str, float]:
        """Edit success and locality of ``records``' edits (each edit alone, run side by side)."""
        with frozen(self.backbone.model):
            rel_rows = record_rows(records, "rel", self.task, self.formats)
            factors = edit_factors(self.backbone, self.modules, *rel_rows)
            with torch.no_grad():
                transformed = self.net.transform(factors)
        locality = {role: record_rows(records, role, self.task, self.formats) for role in ("t_loc", "m_loc")}
        before = {role: predict_rows(self.backbone, *rows) for role, rows in locality.items()}
        with low_rank_update(self.modules, transformed, self.net.edit_lrs.detach(), torch.arange(len(records))):
            hits = {role: predict_rows(self.backbone, *record_rows(records, role, self.task, self.formats))
                    for role in ("t_gen", "m_gen")}
            hits["rel"] = predict_rows(self.backbone, *rel_rows)
            after = {role: predict_rows(self.backbone, *rows) for role, rows in locality.items()}
        point = {role: 100.0 * sum(exact_match(p.answer_argmax, p.labels) for p in rows) / len(records)
                 for role, rows in hits.items()}
        for role in locality:
            point[role] = 100.0 * sum(agreement(b.answer_argmax, a.answer_argmax)
                                      for b, a in zip(before[role], after[role])) / len(records)
        return point

    def prepare(self, train: Sequence[EditRecord], dev: Sequence[EditRecord]) -> dict:
        began = time.perf_counter()
        key = self._run_key(train)
        path = None if self.work is None else Path(self.work) / CHECKPOINT
        if path is not None and path.is_file():
            report = self._load(path, key)
            if report is not None:
                return {**report, "loaded": str(path), "seconds": time.perf_counter() - began}
        threads = torch.get_num_threads()
        torch.set_num_threads(FIT_THREADS)  # reproducible fits (module docstring)
        try:
            report = {**self._train(train, dev), "fit_threads": FIT_THREADS}
        finally:
            torch.set_num_threads(threads)
        if path is not None and processes().main:
            self._save(path, key, report)
        return report

    def _train(self, train: Sequence[EditRecord], dev: Sequence[EditRecord]) -> dict:
        if not train:
            raise ValueError("mend: prepare needs training records")
        h = self.hyper
        steps, batch_size, budget = int(h["steps"]), int(h["batch_size"]), float(h["max_seconds"])
        dev = list(dev)[:int(h["n_dev"])]
        parameters = [p for layer in self.net.layers for p in layer.parameters()]
        optimizer = torch.optim.Adam([{"params": parameters, "lr": float(h["lr"])},
                                      {"params": [self.net.edit_lrs], "lr": float(h["lr_lr"])}])
        generator = torch.Generator().manual_seed(self.seed)
        order: list[int] = []
        curve, losses = [], []
        began = time.perf_counter()
        done = 0
        procs = processes()  # under `accelerate launch`: each process takes its share of every global batch
        own = procs.slice_of(batch_size)
        for step in tqdm(range(steps), desc="mend training", disable=not self.progress):
            if dev and procs.main and step % int(h["eval_every"]) == 0:
                curve.append({"step": step, **self.dev_point(dev)})
            while len(order) < batch_size:
                order += torch.randperm(len(train), generator=generator).tolist()
            batch, order = [train[i] for i in order[:batch_size][own]], order[batch_size:]
            parts = self.objective(batch, observe=True)
            grads = torch.autograd.grad(parts["total"], [*parameters, self.net.edit_lrs], allow_unused=True)
            for parameter, grad in zip([*parameters, self.net.edit_lrs], grads):
                parameter.grad = None if grad is None else grad.detach()
            sum_gradients([*parameters, self.net.edit_lrs])  # the global batch's gradient (nothing alone)
            torch.nn.utils.clip_grad_norm_([*parameters, self.net.edit_lrs], float(h["grad_clip"]))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            summed = sum_(torch.stack([value.detach().double() for value in parts.values()]))
            losses.append({name: round(value, 5) for name, value in zip(parts, summed.tolist())})
            done = step + 1
            over = torch.tensor([float(time.perf_counter() - began > budget)])
            if sum_(over).item() > 0:  # every process stops at the same step
                break
        if dev and procs.main:
            curve.append({"step": done, **self.dev_point(dev)})
        seconds = time.perf_counter() - began
        report = {"seconds": seconds, "steps": done, "batch_size": batch_size, "edit_lrs": self.net.edit_lrs.tolist(),
                  "dev_curve": curve, "loss_curve": _loss_curve(losses, int(h["eval_every"]))}
        if done * batch_size < int(h["paper_edits"]):
            report["shortened"] = (f"{done} steps x {batch_size} edits ({seconds:.0f} s) instead of EasyEdit's up "
                                   f"to {int(h['paper_edits'])} training edits with early stopping")
        return report

    # checkpoint ----------------------------------------------------------------------------------------
    def _run_key(self, train: Sequence[EditRecord]) -> str:
        """What a saved network must have been trained with to be reused: config, backbone, task, seed, data,
        fit threads."""
        records = [(str(r.source), r.index) for r in train]
        text = json.dumps([self.hyper, self.backbone.fingerprint(), self.task, self.seed, records, FIT_THREADS],
                          sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def _save(self, path: Path, key: str, report: dict) -> None:
        tensors = {name: value.detach().cpu().contiguous() for name, value in self.net.state_dict().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"key": key, "report": json.dumps(report)}))

    def _load(self, path: Path, key: str) -> dict | None:
        """The saved report after loading the network, or None (nothing loaded) if trained otherwise. A
        file that cannot be read, or holds another network or a malformed report, raises `ArtifactError`."""
        hint = "; delete it to train again"
        tensors, metadata = read_safetensors(path, "MEND network cache")
        if metadata.get("key") != key:
            return None
        check_state_dict(tensors, self.net.state_dict(), path, "this MEND network", hint=hint)
        report = parse_json(metadata.get("report"), f"{path}: metadata 'report'")
        if not isinstance(report, dict):
            raise ArtifactError(f"{path}: metadata 'report' is not a JSON object{hint}")
        device = self.modules[0].weight.device
        self.net.load_state_dict({k: v.to(device) for k, v in tensors.items()})
        return report


def build(context: MethodContext) -> MendEditor:
    return MendEditor(context)
