"""``visedit caption-tokens``: which tokens of the target captions each editor misses on E-IC.

Builds each method exactly as ``visedit compare --task caption`` does (same options, same train / dev /
test roles), reusing the fits a comparison left in OUT/work (a learned method without one is trained
first), and writes OUT/caption-tokens.json: per method the counts of
`editing.evaluation.caption_tokens` on the test edits, with the roles.

    visedit caption-tokens --backbone blip2 --methods visedit_gated,visedit,ft_l
"""
from __future__ import annotations

from dataclasses import replace

from attrib.io import OutputLock, atomic_write_json, read_json
from editing.command.compare import CompareOptions, data_roles, prepared_method

RESULT = "caption-tokens.json"


def run_caption_tokens(options: CompareOptions) -> dict:
    """Count every method of ``options.methods`` (one at a time, each closed before the next) into
    OUT/caption-tokens.json, keeping the methods a previous run on the same roles and test edits wrote there."""
    from editing.evaluation.caption_tokens import caption_token_misses

    options = replace(options, task="caption", edits=())
    out = options.output()
    path = out / RESULT
    with OutputLock(out):
        split = data_roles(options)
        results = {"backbone": options.backbone, "task": "caption", "roles": split.described,
                   "n_test": len(split.test), "methods": {}}
        if path.is_file():
            kept = read_json(path)
            if all(kept.get(key) == results[key] for key in ("backbone", "roles", "n_test")):
                results["methods"] = kept.get("methods", {})
        for name in options.method_names():
            editor = prepared_method(options, name)[0]
            try:
                counts = caption_token_misses(editor, split.test, progress=options.progress)
            finally:
                editor.close()
            results["methods"][name] = counts.to_json()
            atomic_write_json(path, results)
    return results
