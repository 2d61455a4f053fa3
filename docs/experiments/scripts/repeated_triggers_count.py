"""How many E-VQA edit samples repeat a trigger token of the output write (the last prompt token and every
target token but the last; docs/experiments/editing-compare.md, "Repeated triggers told apart by the tokens
before them"). Where none does, `OutputWriteConfig.context` cannot change a result.

    HF_HUB_OFFLINE=1 .venv/bin/python docs/experiments/scripts/repeated_triggers_count.py \
        runs/world/vqa_eval.json runs/world-2/vqa_eval.json runs/world-2-n3000/vqa_eval.json

Counts each record's question and its rephrase, with each shipped default's tokenizer.
"""
import sys

from attrib.data import load_records
from attrib.defaults import load_model
from attrib.prompts import load_prompts
from editing.inputs import teacher_forced_batch


def main(paths: list[str]) -> None:
    vqa = load_prompts()["vqa"]
    for name in ("blip2", "llava", "minigpt4"):
        backbone = load_model(name)
        for path in paths:
            records, repeats = load_records(path), 0
            for record in records:
                for question in {record.src, record.rephrase}:
                    batch = teacher_forced_batch(backbone, None, [vqa.format(src=question)], [record.alt])
                    end, n = int(batch.prompt_ends[0]), batch.target_lengths[0]
                    triggers = batch.inputs["input_ids"][0, end:end + n].tolist()
                    repeats += len(set(triggers)) < len(triggers)
            print(f"{name} {path}: {len(records)} records, {repeats} questions with a repeated trigger token")


if __name__ == "__main__":
    main(sys.argv[1:])
