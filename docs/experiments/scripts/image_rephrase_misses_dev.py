"""Dev: why an image rephrase (M-Gen) misses under ``visedit_gated`` (docs/experiments/editing-compare.md, "The
output write's fit stopped short of its margin").

    HF_HUB_OFFLINE=1 .venv/bin/python docs/experiments/scripts/image_rephrase_misses_dev.py blip2 300

Loads (or fits) `visedit_gated` as `make compare BACKBONE=<backbone>` does; for each of the first N dev edits
(world seed 1's eval split) makes the edit alone, scores its image rephrase, and reads the routing of that
forward: the router's cosine to the edit, whether the row was kept, and the scene gate's weight. Prints the
router's threshold for one live edit and every miss.
"""
import sys
from pathlib import Path

import numpy as np

from attrib.prompts import load_prompts
from editing.command.compare import CompareOptions, prepared_method
from editing.editor import EditRequest
from editing.evaluation.metrics import predict_rows


def main(backbone: str, n: int) -> None:
    options = CompareOptions(backbone=backbone, task="vqa", out=Path(f"runs/compare/{backbone}-vqa"), progress=False)
    editor, _, roles, _, _ = prepared_method(options, "visedit_gated")
    edit_format = load_prompts()["vqa"]
    bank = editor.hook.bank
    seen: dict = {}
    route = bank._route_by_router

    def spy(visual):  # the routing of the scored row (one row, one live edit)
        best, weight, keep = route(visual)
        seen.update(cos=round(float(bank.last_scores[0, best[0]]), 4), weight=round(float(weight[0]), 3),
                    kept=bool(keep[0]))
        return best, weight, keep

    bank._route_by_router = spy
    rows = []
    for record in roles.dev[:n]:
        editor.edit(EditRequest.from_record(record, "vqa"))
        row = predict_rows(editor.backbone, [record.load_image("image_rephrase")], [edit_format.format(src=record.src)],
                           [record.alt])[0]
        rows.append({"index": record.index, "novel": (record.truth or {}).get("novel_target"),
                     "answered": bool((row.answer_argmax == row.labels).all()), **seen})
        editor.restore()
    misses = [r for r in rows if not r["answered"]]
    print(f"router threshold (one live edit) {float(bank.router.threshold_for(1)):.7f}; "
          f"{len(misses)} of {len(rows)} image rephrases missed")
    for r in misses:
        print(r)
    weights = np.array([r["weight"] for r in rows])
    print("scene-gate weight quantiles 0 / 1 / 5 / 50 %:", np.quantile(weights, [0, .01, .05, .5]).round(3))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
