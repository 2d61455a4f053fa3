"""``serac``: SERAC (Mitchell et al., ICML 2022, "Memory-Based Model Editing at Scale") — edits go to a
memory; a scope classifier sends the inputs they cover to a counterfactual model; the base never changes.

What is implemented
- Edit memory: ``edit(request)`` appends (request, key); ``restore()`` empties it. With an empty memory
  `SeracBackbone.forward` is exactly ``Backbone.forward``, so restored logits are bit-identical. The
  memory grows edit after edit (``lifelong = True``): each row is scored against every stored key at once
  and, if routed, takes the edit of its highest score (the latest stored among equal scores).
- Scope classifier (`serac_parts.ScopeClassifier`): the backbone's own frozen features (final-norm hidden
  states mean-pooled over the input's prompt positions, visual tokens included when there is an image)
  go through a trained linear head; the score of (query, edit) is σ(s · cos + b). This is the paper's
  embedding-similarity variant, not its cross-encoder: an edit's key is embedded once at ``edit`` time
  and a query costs the one forward the base model runs anyway plus a dot product per stored edit, while
  a cross-encoder needs a forward per (query, edit) pair. Trained in `prepare` on train records: in scope
  = the edit vs its src, rephrase (edit image) and src with image_rephrase; out of scope = the edit vs its
  loc, its m_loc and every input of the other records of the batch (class-balanced BCE).
- Counterfactual model: ``copy.deepcopy`` of the backbone's model (on 7B checkpoints this doubles the
  memory; the paper uses a smaller model), its decoder stack (or its last ``cf_train_layers`` layers)
  fine-tuned in `prepare` with the teacher-forced target loss on the in-scope inputs of train records.
  It reads the edit as text inside the template: ``template("Edit: {edit prompt} {edit target}\\n" +
  query prompt)`` (``context_format``), and sees the query's image.
- Routing (`SeracBackbone`, the ``editor.backbone`` view): ``encode`` keeps the rows' images, prompts and
  targets on the returned BatchFeature; ``forward`` runs the base model (hooking its final norm for the
  features), scores each row against the memory, and rows whose best score is above ``threshold`` take
  the counterfactual model's logits on the re-encoded row with the best edit in context. Rows are
  left-padded and end with the answer tokens, so the counterfactual row's LAST positions are copied over
  the original row's last positions: the answer logits (`TeacherForcedBatch.answer_logits`) line up token
  for token. Whole-sequence metrics (`TeacherForcedBatch.sequence_logits`, EasyEdit's T-Loc / M-Loc) of a
  routed row see, at the row's real positions, the counterfactual logits of the same number of last
  positions of the longer row: the query and answer part lines up, the head (template, image tokens)
  faces the end of the edit context instead, so a routed locality row loses there by construction.
  ``target_token_ids`` through the view is the base's (same template and tokenizer).

Departures from the paper
- Features come from the edited VLLM itself (frozen), not from a separate DistilBERT/T5 encoder: the
  query's image must count, and only the backbone sees it. The counterfactual model is a copy of the
  backbone, not a smaller model (the toy defaults are small; on 7B set ``cf_train_layers`` low).
- Training is short (``cls_steps``, ``cf_steps``; report["shortened"]); the dev curves are reported.
- Copying aids (not in the paper): a share of training targets is swapped, in context and answer alike,
  for other train answers (``cf_swap_fraction``) or random letter strings (``cf_random_fraction``), and a
  whole-row next-token loss (``cf_lm_weight``) is added, so the copy learns to read the edit rather than
  recall train targets; test targets can be multi-token words never seen in training. On the toy
  defaults the copy learns it for known (single-token) answers within the budget; multi-token novel
  targets are mostly missed.
- No same-image negatives: the classifier never sees other questions about the edit's own image as out
  of scope (MMEdit records have none), and the image dominates the pooled features, so most such
  questions are routed (``loc_same_image``), the counterpart of the literature's near-zero M-Loc.
- `prepare` is saved per phase (classifier, counterfactual) as safetensors under ``context.work`` and a
  finished phase is loaded instead of retrained; an interrupted phase restarts from its beginning.
- Training runs with dropout off (the backbone is kept in eval mode).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from attrib.backbones.loader import Backbone
from attrib.data import EditRecord
from attrib.prompts import load_prompts
from editing.editor import Editor, EditRequest
from editing.methods import MethodContext
from editing.methods.serac_parts import (
    Rows,
    ScopeClassifier,
    context_prompt,
    features,
    forward_with_features,
    record_features,
    run_phase,
    train_classifier,
    train_counterfactual,
    trainable_layers,
)

ROWS_ATTRIBUTE = "serac_rows"  # where `SeracBackbone.encode` leaves its rows on the BatchFeature


@dataclass
class MemoryEntry:
    """One stored edit and its key: the embedded features of (image, prompt), [dim]."""

    request: EditRequest
    key: torch.Tensor


@dataclass
class SeracBackbone(Backbone):
    """The base backbone (same model, processor, spec, templates) with SERAC's routing in `forward`."""

    editor: "Serac" = None

    def encode(self, images: Sequence[Image.Image] | None, prompts: Sequence[str],
               targets: Sequence[str] | None = None):
        """`Backbone.encode`, with the rows kept on the result (``serac_rows``, not a model input)."""
        inputs = super().encode(images, prompts, targets)
        setattr(inputs, ROWS_ATTRIBUTE, Rows(None if images is None else list(images), list(prompts),
                                              None if targets is None else list(targets)))
        return inputs

    def forward(self, inputs, **kwargs):
        """The base output; rows in an edit's scope get the counterfactual logits (module docstring)."""
        editor = self.editor
        if not editor.memory:
            return super().forward(inputs, **kwargs)
        rows = getattr(inputs, ROWS_ATTRIBUTE, None)
        if rows is None:
            raise ValueError("SERAC routes only inputs made by editor.backbone.encode (it needs the rows' "
                             "prompts to put the edit in context)")
        output, query_features = forward_with_features(self, super().forward, inputs, rows, **kwargs)
        with torch.no_grad():
            keys = torch.stack([entry.key for entry in editor.memory])
            best, last = editor.classifier.scores(query_features, keys).flip(1).max(dim=1)  # [B], [B]
            chosen = len(keys) - 1 - last  # max takes the first of equal maxima: the latest edit
        routed = (best > editor.hyper["threshold"]).nonzero().flatten().tolist()
        editor.last_scores = best.tolist()
        if not routed:
            return output
        replacement = editor.counterfactual_logits(rows, routed, chosen.tolist(), **kwargs)
        logits = output.logits.clone()
        width = min(logits.shape[1], replacement.shape[1])
        logits[routed, -width:] = replacement[:, -width:].to(logits)
        output.logits = logits
        return output


class Serac(Editor):
    """Edit memory + scope classifier + counterfactual copy of the backbone (module docstring)."""

    text_edits = True
    lifelong = True

    def __init__(self, context: MethodContext):
        self.base = context.backbone
        self.hyper = context.hyper
        self.task = context.task
        self.seed = context.seed
        self.work = context.work
        self.progress = context.progress
        width = self.base.config.text_config.hidden_size
        self.classifier = ScopeClassifier(width, self.hyper["cls_dim"], self.hyper["cls_init_scale"],
                                          torch.Generator().manual_seed(self.seed))
        self.counterfactual = Backbone(copy.deepcopy(self.base.model), self.base.processor, self.base.spec,
                                       self.base.path, self.base.prompt_template, self.base.text_template,
                                       self.base.manifest)
        self.counterfactual.model.requires_grad_(False)
        self.memory: list[MemoryEntry] = []
        self.last_scores: list[float] = []  # best score per row of the last routed forward (diagnostics)
        self.backbone = SeracBackbone.view(self.base, editor=self)

    def prepare(self, train: Sequence[EditRecord], dev: Sequence[EditRecord]) -> dict:
        """Fit the scope classifier (on ``cls_records`` train records) and the counterfactual model (on
        every train record); ``dev`` (its first ``dev_records``) only draws the curves."""
        start = time.perf_counter()
        hyper, formats = self.hyper, load_prompts()
        edit_format = formats[self.task]
        dev_part = list(dev[:hyper["dev_records"]])
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).tolist()
        cls_train = [train[i] for i in order[:hyper["cls_records"]]]
        data = {"backbone": self.base.fingerprint(), "task": self.task, "seed": self.seed, "n_train": len(train),
                "train": str(train[0].source) if train else "", "dev_records": hyper["dev_records"]}

        def fit_classifier() -> dict:
            feats = record_features(self.base, cls_train, formats, edit_format, hyper["feature_batch"],
                                    self.progress)
            dev_feats = record_features(self.base, dev_part, formats, edit_format, hyper["feature_batch"]) \
                if dev_part else None
            generator = torch.Generator().manual_seed(self.seed)
            return {"records": len(cls_train), **train_classifier(self.classifier, feats, dev_feats, hyper,
                                                                  generator, self.progress)}

        def fit_counterfactual() -> dict:
            generator = torch.Generator().manual_seed(self.seed)
            return train_counterfactual(self.counterfactual, train, dev_part, edit_format, hyper, generator,
                                        self.progress)

        names = {id(p): n for n, p in self.counterfactual.model.named_parameters()}
        trained = [names[id(p)] for p in trainable_layers(self.counterfactual, hyper["cf_train_layers"])]
        classifier = run_phase(self.work, "serac_classifier", {**data, **_keys(hyper, "cls_", "threshold")},
                               self.classifier, list(self.classifier.state_dict()), fit_classifier)
        counterfactual = run_phase(self.work, "serac_counterfactual",
                                   {**data, **_keys(hyper, "cf_", "context_format")}, self.counterfactual.model,
                                   trained, fit_counterfactual)
        self.counterfactual.model.requires_grad_(False)
        return {"seconds": round(time.perf_counter() - start, 1),
                "steps": {"classifier": classifier["steps"], "counterfactual": counterfactual["steps"]},
                "classifier": classifier, "counterfactual": counterfactual,
                "shortened": (f"classifier {hyper['cls_steps']} steps on {len(cls_train)} train records, "
                              f"counterfactual model {hyper['cf_steps']} steps of {hyper['cf_batch']} records "
                              "(the paper trains both to convergence on its full train split)")}

    @torch.no_grad()
    def edit(self, request: EditRequest) -> MemoryEntry:
        """Store ``request`` with its key (one forward of the base model on the edit's image and prompt)."""
        feats = features(self.base, Rows([request.image], [request.prompt]), batch=1)
        entry = MemoryEntry(request, self.classifier.embed(feats)[0])
        self.memory.append(entry)
        return entry

    def restore(self) -> None:
        self.memory.clear()

    def counterfactual_logits(self, rows: Rows, routed: list[int], chosen: list[int], **kwargs) -> torch.Tensor:
        """[R, T', V] logits of the counterfactual model on the ``routed`` rows, each with its chosen edit
        in context (left-padded, so the rows end where the original rows end)."""
        fmt = self.hyper["context_format"]
        edits = [self.memory[chosen[r]].request for r in routed]
        prompts = [context_prompt(fmt, e.prompt, e.target, rows.prompts[r]) for e, r in zip(edits, routed)]
        images = None if rows.images is None else [rows.images[r] for r in routed]
        targets = None if rows.targets is None else [rows.targets[r] for r in routed]
        inputs = self.counterfactual.encode(images, prompts, targets)
        return self.counterfactual.forward(inputs, **kwargs).logits


def _keys(hyper: dict, prefix: str, *names: str) -> dict:
    """The hyperparameters a phase depends on (its prefix plus ``names``)."""
    return {k: v for k, v in sorted(hyper.items()) if k.startswith(prefix) or k in names}


def build(context: MethodContext) -> Serac:
    return Serac(context)
