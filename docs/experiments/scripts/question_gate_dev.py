"""Dev check of the question gate (docs/experiments/editing-compare.md, "A question gate").

    HF_HUB_OFFLINE=1 .venv/bin/python docs/experiments/scripts/question_gate_dev.py blip2 300

Loads (or fits) `visedit_gated` as `make compare BACKBONE=<backbone>` does — adapter, scene router, output
write and question gate, under runs/compare/<backbone>-vqa/work — then scores the first N dev edits (world
seed 1's eval split) with the question gate on and off. One JSON line per run, also appended to
runs/qgate/dev.jsonl.
"""
import json
import sys
import time
from pathlib import Path

from editing.command.compare import CompareOptions, prepared_method
from editing.evaluation.evaluate import evaluate_edits

FIVE = ["rel", "t_gen", "m_gen", "t_loc", "m_loc"]


def main(backbone: str, n: int) -> None:
    options = CompareOptions(backbone=backbone, task="vqa", out=Path(f"runs/compare/{backbone}-vqa"), progress=False)
    editor, _, roles, prepared, _ = prepared_method(options, "visedit_gated")
    print(json.dumps(prepared["question_gate"]), flush=True)
    gate, dev = editor.hook.question_gate, roles.dev[:n]
    log = Path("runs/qgate/dev.jsonl")
    log.parent.mkdir(parents=True, exist_ok=True)
    for label, installed in [("gate", gate), ("no gate", None)]:
        editor.hook.question_gate = installed
        start = time.perf_counter()
        scores = evaluate_edits(editor, dev, "vqa").to_json()
        row = {"backbone": backbone, "label": label, "n": len(dev), "s": round(time.perf_counter() - start, 1),
               **{k: scores.get(k) for k in [*FIVE, "loc_same_image", "edit_ms", "targets"]},
               "mean": round(sum(scores[k] for k in FIVE) / 5, 2)}
        print(json.dumps(row), flush=True)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
