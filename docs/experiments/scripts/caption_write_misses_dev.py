"""Caption dev: where ``visedit_gated``'s rephrase (T-Gen) misses fall once the output write has no key check
(docs/experiments/editing-compare.md, "The output write's fit stopped short of its margin", E-IC).

    HF_HUB_OFFLINE=1 .venv/bin/python docs/experiments/scripts/caption_write_misses_dev.py blip2 300

Loads (or fits) `visedit_gated` as `make compare BACKBONE=<backbone> TASK=caption` does; for each of the first N
caption dev edits (world seed 1's caption eval split) makes the edit alone and scores its rephrase. Counts the
missed target tokens by whether the write fired in the row, whether the position had a write (a nonzero δ),
and whether its trigger token occurs more than once among the edit's triggers (where `OutputWrites.apply`
takes the closest key's write); prints a few misses.
"""
import sys
from collections import Counter
from pathlib import Path

from attrib.prompts import load_prompts
from editing.command.compare import CompareOptions, prepared_method
from editing.editor import EditRequest
from editing.evaluation.metrics import predict_rows


def main(backbone: str, n: int) -> None:
    options = CompareOptions(backbone=backbone, task="caption", out=Path(f"runs/compare/{backbone}-caption"),
                             progress=False)
    editor, _, roles, _, _ = prepared_method(options, "visedit_gated")
    print(editor.hook.write_config)
    caption_format, hook, tokenizer = load_prompts()["caption"], editor.hook, editor.backbone.tokenizer
    counts, shown = Counter(), []
    for record in roles.dev[:n]:
        editor.edit(EditRequest.from_record(record, "caption"))
        write = hook.bank.writes.items[0]
        row = predict_rows(editor.backbone, [record.load_image("image")], [caption_format.format(src=record.rephrase)],
                           [record.alt])[0]
        fired = hook.routed is not None and bool(hook.routed[1][0])
        hits = (row.answer_argmax == row.labels).tolist()
        counts["tokens"] += len(hits)
        for k, hit in enumerate(hits):
            if hit:
                continue
            counts["missed"] += 1
            counts["missed, write fired" if fired else "missed, write off"] += 1
            counts["missed, δ zero" if bool(write.deltas[k].abs().sum() == 0) else "missed, δ written"] += 1
            repeats = int((write.triggers == write.triggers[k]).sum()) > 1
            counts["missed, trigger repeats" if repeats else "missed, trigger unique"] += 1
            if len(shown) < 6:
                shown.append((record.src, record.rephrase, k, tokenizer.decode([int(row.labels[k])]),
                              tokenizer.decode([int(row.answer_argmax[k])])))
        editor.restore()
    print(dict(counts))
    for line in shown:
        print(line)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
