"""Caption dev: the output write's closest-key rule against the rule it replaced (the writes of every
matching key added up). docs/experiments/editing-compare.md, "Repeated caption tokens".

    git show e49bb81:editing/adapter/output_write.py > runs/qgate/output_write_old.py
    HF_HUB_OFFLINE=1 .venv/bin/python docs/experiments/scripts/output_write_caption_rule.py blip2 300

Loads (or fits) `visedit_gated` as `make compare BACKBONE=<backbone> TASK=caption` does and scores the first
N caption dev edits (world seed 1's caption eval split) under each rule. One JSON line per rule, also
appended to runs/qgate/capdev.jsonl.
"""
import importlib.util
import json
import sys
import time
from pathlib import Path

from editing.adapter import output_write
from editing.command.compare import CompareOptions, prepared_method
from editing.evaluation.evaluate import evaluate_edits

FIVE = ["rel", "t_gen", "m_gen", "t_loc", "m_loc"]


def main(backbone: str, n: int) -> None:
    spec = importlib.util.spec_from_file_location("output_write_old", "runs/qgate/output_write_old.py")
    old = importlib.util.module_from_spec(spec)
    sys.modules["output_write_old"] = old
    spec.loader.exec_module(old)
    options = CompareOptions(backbone=backbone, task="caption", out=Path(f"runs/compare/{backbone}-caption"),
                             progress=False)
    editor, _, roles, _, _ = prepared_method(options, "visedit_gated")
    dev, closest = roles.dev[:n], output_write.OutputWrites.apply
    log = Path("runs/qgate/capdev.jsonl")
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        for label, apply in [("closest key", closest), ("sum of matching keys", old.OutputWrites.apply)]:
            output_write.OutputWrites.apply = apply
            start = time.perf_counter()
            scores = evaluate_edits(editor, dev, "caption").to_json()
            row = {"backbone": backbone, "rule": label, "n": len(dev), "s": round(time.perf_counter() - start, 1),
                   **{k: scores.get(k) for k in [*FIVE, "loc_same_image", "exact_match", "edit_ms"]},
                   "mean": round(sum(scores[k] for k in FIVE) / 5, 2)}
            print(json.dumps(row), flush=True)
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
    finally:
        output_write.OutputWrites.apply = closest


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
