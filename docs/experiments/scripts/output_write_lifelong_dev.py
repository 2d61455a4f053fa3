"""Dev, many edits live: the dev split's edits with distinct scenes all live at once, under each output-write
config of a JSON list (docs/experiments/editing-compare.md, "The output write's fit stopped short of its
margin").

    HF_HUB_OFFLINE=1 .venv/bin/python docs/experiments/scripts/output_write_lifelong_dev.py blip2 \
        '[{"tau": null, "margin": 40.0, "lr": 0.5}, {"tau": null, "margin": 40.0, "lr": 0.5, "min_weight": 0.0}]'

Loads (or fits) `visedit_gated` as `make compare BACKBONE=<backbone>` does (question gate on), takes the most
dev edits (world seed 1's eval split) with distinct scenes (`distinct_scenes`, as the lifelong comparison
picks its test edits) and scores them with all of them live (`evaluate_sequential`). One JSON line per config.
"""
import json
import sys
import time
from pathlib import Path

from attrib.errors import DataError
from editing.adapter.output_write import OutputWriteConfig
from editing.command.compare import CompareOptions, prepared_method
from editing.command.lifelong import distinct_scenes
from editing.evaluation.sequential import evaluate_sequential

FIVE = ["rel", "t_gen", "m_gen", "t_loc", "m_loc"]


def most_distinct(records) -> int:
    """The largest n for which `distinct_scenes` finds n edits (bisection: it raises when too few qualify)."""
    lo, hi = 1, len(records)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            distinct_scenes(records, mid)
            lo = mid
        except DataError:
            hi = mid - 1
    return lo


def main(backbone: str, configs: list) -> None:
    options = CompareOptions(backbone=backbone, task="vqa", out=Path(f"runs/compare/{backbone}-vqa"), progress=False)
    editor, _, roles, _, _ = prepared_method(options, "visedit_gated")
    n = most_distinct(roles.dev)
    records = distinct_scenes(roles.dev, n)
    for config in configs:
        editor.hook.write_config = OutputWriteConfig(**config)
        start = time.perf_counter()
        scores = evaluate_sequential(editor, records, n, "vqa")
        row = {"backbone": backbone, "n_live": n, "config": config, "s": round(time.perf_counter() - start, 1),
               **{k: scores.get(k) for k in [*FIVE, "loc_same_image"]},
               "mean": round(sum(scores[k] for k in FIVE) / 5, 2)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
