"""``visedit`` (the paper's VEAD + IM, nothing added) and ``visedit_gated`` (ours: with the scene gate and
VEAD's target role) as comparison methods.

Both are `VisEditEditor` at the placement the comparison read from the attribution artifact of the
training records (``context.extra["placement"]``), sized from the LM width (`sized_vead_config`), and
trained in ``prepare`` on the training records with `editing.training.loop.train` (checkpointed
under ``context.work``, resumed when a run was cut). The adapter adds to visual-token states only, so an
edit can never change a text-only input: T-Loc is 100 by construction (``text_edits = False``).

``visedit_gated`` with an ``output_write`` mapping (its config) also fits one output write per edit at edit
time (`editing.adapter.output_write`: a change of the LM head's input at the target's positions, for the
targets the adapter cannot reach), applied only in input rows the bank routes to the edit. Where the
question gate is on, ``output_write_with_question_gate`` (a mapping of `OutputWriteConfig` fields) replaces
those fields: the gate then decides which question a write answers, and the config drops the write's own
key check, raises its margin and its fit's step size so that the fit reaches that margin, and fires in
every row the router keeps, whatever the scene gate's weight (``tau: null, margin: 40.0, lr: 0.5,
min_weight: 0.0``; docs/experiments/editing-compare.md, "The output write's key under the question gate"
and "The output write's fit stopped short of its margin").

``visedit_gated`` with ``router: true`` (its config) also fits the scene router (`editing.adapter.router`)
that sends each input to one of many live edits: on the training records' images and image rephrases,
its thresholds, one per bank size, chosen on the dev records with the training images as further stored
edits; saved to ``<work>/router.safetensors`` and reused while its key (config, edit layer, training file
and count) holds.

``visedit_gated`` with a ``question_gate`` mapping (its config) on E-VQA also fits the question gate
(`editing.adapter.question_gate`): a routed edit acts only in rows that ask its question or a rephrase of
it. Trained on the training records' questions, its threshold chosen on the dev records; saved to
``<work>/question_gate.safetensors`` and reused while its key holds. Not on E-IC: a caption edit's
instruction is not a question about the image, and its rows append the caption with no closing marker.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file

from attrib.artifact import parse_json
from attrib.data import EditRecord
from attrib.errors import ArtifactError
from attrib.io import atomic_write, read_safetensors
from attrib.prompts import load_prompts
from editing.adapter.output_write import OutputWriteConfig
from editing.adapter.question_gate import (
    QuestionEncoder,
    QuestionGateConfig,
    choose_question_threshold,
    closing_marker,
    fit_question_encoder,
    prompt_ids,
)
from editing.adapter.router import RouterConfig, SceneRouter, choose_threshold, fit_router, image_groups
from editing.adapter.vead import lm_width
from editing.adapter.visedit import VisEditEditor
from editing.editor import EditRequest
from editing.evaluation.evaluate import same_image_questions
from editing.methods import MethodContext
from editing.training.config import TrainConfig
from editing.training.loop import train
from editing.training.recipe import default_lr, default_steps, sized_vead_config


class VisEditMethod(VisEditEditor):
    """`VisEditEditor` whose ``prepare`` trains the adapter (module docstring)."""

    text_edits = False

    def __init__(self, context: MethodContext):
        gated = context.name == "visedit_gated"
        width = lm_width(context.backbone.config)
        config = sized_vead_config(width, scene_gate=gated, target_role=gated)
        hyper = context.hyper
        question = hyper.get("question_gate")
        question_config = QuestionGateConfig(**{**question, "seed": context.seed}) \
            if gated and isinstance(question, dict) and context.task == "vqa" else None
        write = OutputWriteConfig.from_hyper(hyper.get("output_write")) if gated else None
        under_gate = hyper.get("output_write_with_question_gate")
        if write is not None and question_config is not None and under_gate:
            if not isinstance(under_gate, dict):
                raise ValueError(f"output_write_with_question_gate must be a mapping of output-write fields, "
                                 f"got {under_gate!r}")
            write = OutputWriteConfig.from_hyper({**write.to_json(), **under_gate})
        super().__init__(context.backbone, context.extra["placement"], config, output_write=write)
        self.context = context
        steps = int(hyper.get("steps") or default_steps(context.backbone.spec.name, context.task))
        self.train_config = TrainConfig(steps=steps,
                                        batch_size=int(hyper.get("batch_size", 4)),
                                        lr=float(hyper.get("lr") or default_lr(width)), seed=context.seed,
                                        task=context.task, checkpoint_every=int(hyper.get("checkpoint_every", 100)),
                                        same_image_weight=float(hyper.get("same_image_weight", 0.0)))
        self.router_config = RouterConfig(**{**hyper.get("router_config", {}), "seed": context.seed}) \
            if gated and hyper.get("router") else None
        self.question_config = question_config

    def close(self) -> None:
        self.remove()

    def prepare(self, train_records: Sequence[EditRecord], dev: Sequence[EditRecord]) -> dict:
        start = time.perf_counter()
        folder = None if self.context.work is None else self.context.work / "checkpoint"
        result = train(self, train_records, self.train_config, folder, resume=True, progress=self.context.progress)
        report = {"train_s": round(result.train_s, 2), "steps": result.steps, "config": self.train_config.to_json(),
                  "adapter": self.config.to_json(), "placement": self.placement.to_json()}
        if self.router_config is not None:
            report["router"] = self.prepare_router(train_records, dev)
        if self.question_config is not None:
            report["question_gate"] = self.prepare_question_gate(train_records, dev)
        if self.hook.write_config is not None:
            report["output_write"] = self.hook.write_config.to_json()
        return {**report, "wall_s": round(time.perf_counter() - start, 2)}

    def visual_states(self, records: Sequence[EditRecord], field: str, batch_size: int = 32) -> torch.Tensor:
        """[n, P, d] the edit layer's visual-token states of each record's ``field`` image."""
        out = []
        for lo in range(0, len(records), batch_size):
            requests = []
            for record in records[lo:lo + batch_size]:
                edit = EditRequest.from_record(record, self.context.task)
                requests.append(EditRequest(record.load_image(field), edit.prompt, edit.target))
            out.append(self.edit_signal(requests).visual_states().detach())
        return torch.cat(out)

    def prepare_router(self, train_records: Sequence[EditRecord], dev: Sequence[EditRecord]) -> dict:
        """Fit (or load) the scene router and put it in the edit bank (module docstring)."""
        if not dev or len(train_records) < 2:
            raise ValueError(f"{self.context.name}: the scene router trains on two or more training records and "
                             f"chooses its threshold on dev records; got {len(train_records)} and {len(dev)}")
        start = time.perf_counter()
        key = json.dumps({"config": self.router_config.to_json(), "edit_layer": self.placement.edit_layer,
                          "train": str(train_records[0].source) if train_records else "", "n_train": len(train_records),
                          "dev": str(dev[0].source) if dev else "", "n_dev": len(dev)}, sort_keys=True)
        path = None if self.context.work is None else Path(self.context.work) / "router.safetensors"
        loaded = self._load_router(path, key) if path is not None and path.is_file() else None
        if loaded is not None:
            router, report = loaded
        else:
            first, groups = self.visual_states(train_records, "image"), image_groups(train_records)
            router = SceneRouter(first.shape[-1], first.shape[1], self.router_config)
            losses = fit_router(router, first, self.visual_states(train_records, "image_rephrase"), groups,
                                progress=self.context.progress)
            report = choose_threshold(router, self.visual_states(dev, "image"),
                                      self.visual_states(dev, "image_rephrase"), self.visual_states(dev, "m_loc"),
                                      (image_groups(dev), image_groups(dev, "m_loc")),
                                      stored=first, stored_groups=groups)
            report.update(config=self.router_config.to_json(), final_loss=round(losses[-1], 4),
                          fit_s=round(time.perf_counter() - start, 2))
            if path is not None:
                _save_fit(path, router, key, report)
        router.to(self.adapter.im.norm_visual.weight.device)
        self.hook.bank.router = router
        return {**report, "loaded": loaded is not None}

    def prepare_question_gate(self, train_records: Sequence[EditRecord], dev: Sequence[EditRecord]) -> dict:
        """Fit (or load) the question gate on the training records' questions, rephrases and same-image
        questions, its threshold chosen on the dev records', and install it (module docstring)."""
        def triples(records: Sequence[EditRecord]) -> list[tuple[str, str, list[str]]]:
            return [(r.src, r.rephrase, [q["question"] for q in same_image_questions(r)]) for r in records]

        train, held = triples(train_records), triples(dev)
        if len(train) < 2 or not any(same for _, _, same in held):
            raise ValueError(f"{self.context.name}: the question gate trains on two or more training records and "
                             f"chooses its threshold on dev records with same-image questions; got {len(train)} "
                             f"training records and {sum(bool(same) for _, _, same in held)} such dev records")
        start = time.perf_counter()
        backbone, fmt = self.backbone, load_prompts()["vqa"]
        marker = closing_marker(backbone, fmt)
        key = json.dumps({"config": self.question_config.to_json(), "marker": marker,
                          "train": str(train_records[0].source), "n_train": len(train_records),
                          "dev": str(dev[0].source), "n_dev": len(dev)}, sort_keys=True)
        path = None if self.context.work is None else Path(self.context.work) / "question_gate.safetensors"
        embed = self.hook.embed
        gate = QuestionEncoder(embed.weight.shape[1], self.question_config, len(marker))
        gate.set_tokens(marker, backbone.tokenizer.pad_token_id, backbone.image_token_id)
        loaded = None
        if path is not None and path.is_file():
            tensors, metadata = read_safetensors(path, "question gate file")
            if metadata.get("key") == key:
                gate.load_state_dict(tensors)
                loaded = parse_json(metadata.get("report"), f"{path}: metadata 'report'")
        if loaded is not None:
            report = loaded
        else:
            tokens = {s: prompt_ids(backbone, fmt.format(src=s)) for q, r, same in train for s in (q, r, *same)}
            losses = fit_question_encoder(gate, embed, tokens, train, progress=self.context.progress)
            strings = {s for q, r, same in held for s in (q, r, *same)}
            with torch.no_grad():
                keys = {s: gate.keys(prompt_ids(backbone, fmt.format(src=s))[None], embed)[0] for s in strings}
            report = choose_question_threshold(gate, keys, held)
            report.update(config=self.question_config.to_json(), final_loss=round(losses[-1], 4),
                          fit_s=round(time.perf_counter() - start, 2))
            if path is not None:
                _save_fit(path, gate, key, report)
        gate.eval()
        self.hook.question_gate = gate
        return {**report, "loaded": loaded is not None}

    def _load_router(self, path: Path, key: str) -> tuple[SceneRouter, dict] | None:
        tensors, metadata = read_safetensors(path, "scene router file")
        if metadata.get("key") != key:
            return None  # fitted under another config or data: fit again
        report = parse_json(metadata.get("report"), f"{path}: metadata 'report'")
        if "threshold" in tensors and "thresholds" not in tensors:
            return None  # a router of one threshold for every bank size: fit again
        if not isinstance(report, dict) or not {"reference", "thresholds", "bank_sizes"} <= set(tensors):
            raise ArtifactError(f"{path}: not a scene router file (no report, reference, thresholds or bank "
                                "sizes); delete it to fit again")
        width, n_tokens = tensors["reference"].shape[1], tensors["reference"].shape[0]
        router = SceneRouter(n_tokens=n_tokens, width=width, config=self.router_config,
                             n_sizes=len(tensors["bank_sizes"]))
        router.load_state_dict(tensors)
        router.eval()
        return router, report


def _save_fit(path: Path, module: torch.nn.Module, key: str, report: dict) -> None:
    """Write a fitted module (router, question gate) with the key it is reused under and its dev report."""
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    metadata = {"key": key, "report": json.dumps(report)}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def build(context: MethodContext) -> VisEditMethod:
    if "placement" not in context.extra:
        raise ValueError(f"{context.name}: the comparison passes the placement (context.extra['placement'])")
    return VisEditMethod(context)
