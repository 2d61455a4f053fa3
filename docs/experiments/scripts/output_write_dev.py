"""Dev sweep of the output write (docs/experiments/editing-compare.md, "An output write").

    HF_HUB_OFFLINE=1 .venv/bin/python docs/experiments/scripts/output_write_dev.py blip2 vqa 300 \
        '[null, {"margin": 10.0, "tau": 0.7}]' [--gate] [--out runs/compare/blip2-vqa]

Loads (or fits) `visedit_gated` as `make compare BACKBONE=<backbone> TASK=<task> OUT=<out>` does, then scores
the first N dev edits (world seed 1's eval split) under each output-write config of the JSON list (null: no
write; "tau": null: no key check). Without `--gate` the question gate is taken off, as in the first sweep,
which predates it; with `--gate` it stays on (E-VQA). One JSON line per config (with how many writes ran
out of steps short of their margin), also appended to runs/outwrite/sweep.jsonl.
"""
import json
import time
from pathlib import Path

from editing.adapter.output_write import OutputWriteConfig
from editing.command.compare import CompareOptions, prepared_method
from editing.evaluation.evaluate import evaluate_edits

FIVE = ["rel", "t_gen", "m_gen", "t_loc", "m_loc"]


def main(backbone: str, task: str, n: int, configs: list, gate: bool, out: Path) -> None:
    options = CompareOptions(backbone=backbone, task=task, out=out, progress=False)
    editor, _, roles, _, _ = prepared_method(options, "visedit_gated")
    if not gate:
        editor.hook.question_gate = None  # the first sweep predates the question gate and was run without it
    dev = roles.dev[:n]
    log = Path("runs/outwrite/sweep.jsonl")
    log.parent.mkdir(parents=True, exist_ok=True)
    for config in configs:
        editor.hook.write_config = None if config is None else OutputWriteConfig(**config)
        editor.write_fits.update(fitted=0, short_of_margin=0)
        start = time.perf_counter()
        scores = evaluate_edits(editor, dev, task).to_json()
        row = {"backbone": backbone, "task": task, "n": len(dev), "config": config,
               "question_gate": editor.hook.question_gate is not None,
               "s": round(time.perf_counter() - start, 1),
               **{k: scores.get(k) for k in [*FIVE, "loc_same_image", "exact_match", "edit_ms", "targets"]},
               "mean": round(sum(scores[k] for k in FIVE) / 5, 2), "write_fits": dict(editor.write_fits)}
        print(json.dumps(row), flush=True)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbone")
    parser.add_argument("task")
    parser.add_argument("n", type=int)
    parser.add_argument("configs", type=json.loads)
    parser.add_argument("--gate", action="store_true", help="keep the question gate on")
    parser.add_argument("--out", type=Path, help="the comparison's folder (default runs/compare/<backbone>-<task>)")
    args = parser.parse_args()
    main(args.backbone, args.task, args.n, args.configs, args.gate,
         args.out or Path(f"runs/compare/{args.backbone}-{args.task}"))
