"""How well question keys part rephrases from same-image questions on dev, by threshold
(docs/experiments/editing-compare.md, "A question gate").

    HF_HUB_OFFLINE=1 .venv/bin/python docs/experiments/scripts/question_gate_probe.py blip2

Fits a question encoder on the training records as `visedit_gated` does (nothing is saved), then prints,
for each threshold, the share of the dev edits' rephrases kept and of their same-image questions turned away.
"""
import sys
import time
from pathlib import Path

import torch

from attrib.defaults import load_model
from attrib.prompts import load_prompts
from editing.adapter.question_gate import (
    QuestionEncoder,
    QuestionGateConfig,
    choose_question_threshold,
    closing_marker,
    fit_question_encoder,
    prompt_ids,
)
from editing.command.compare import CompareOptions, data_roles
from editing.evaluation.evaluate import same_image_questions


def main(backbone_name: str) -> None:
    options = CompareOptions(backbone=backbone_name, task="vqa", out=Path(f"runs/compare/{backbone_name}-vqa"),
                             progress=False)
    roles = data_roles(options)
    backbone = load_model(options.backbone, options.model, options.device, options.dtype)
    fmt = load_prompts()["vqa"]
    marker = closing_marker(backbone, fmt)
    print("marker", marker, repr(backbone.tokenizer.decode(marker)))

    def triples(records):
        return [(r.src, r.rephrase, [q["question"] for q in same_image_questions(r)]) for r in records]

    train, dev = triples(roles.train), triples(roles.dev)
    tokens = {s: prompt_ids(backbone, fmt.format(src=s)) for q, r, same in train + dev for s in (q, r, *same)}
    embed = backbone.module(backbone.spec.embed_tokens)
    gate = QuestionEncoder(embed.weight.shape[1], QuestionGateConfig(), len(marker))
    gate.set_tokens(marker, backbone.tokenizer.pad_token_id, backbone.image_token_id)
    start = time.perf_counter()
    training = {s for q, r, same in train for s in (q, r, *same)}
    losses = fit_question_encoder(gate, embed, {s: tokens[s] for s in training}, train)
    print(f"fit {time.perf_counter() - start:.1f} s, final loss {losses[-1]:.4f}")
    with torch.no_grad():
        keys = {s: gate.keys(t[None], embed)[0] for s, t in tokens.items()}
    print(choose_question_threshold(gate, keys, dev))
    for tau in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        kept = sum(float(keys[q] @ keys[r]) >= tau for q, r, _ in dev) / len(dev)
        away = [float(keys[q] @ keys[s]) < tau for q, _, same in dev for s in same]
        print(f"threshold {tau}: rephrases kept {100 * kept:.1f} %, same-image questions turned away "
              f"{100 * sum(away) / len(away):.1f} %")


if __name__ == "__main__":
    main(sys.argv[1])
