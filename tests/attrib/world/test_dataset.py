"""MMEdit-format world datasets: fields, images, ground truth, determinism, atomic writing."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import attrib.world.dataset as dataset
from attrib.world.dataset import FIELDS, IMAGE_ROLES, NOVEL_WORDS, SPLITS, build_split, make_record, write_world
from attrib.world.facts import FACTS
from attrib.world.questions import CAPTION_PROMPT, VQA_FAMILIES, answer_pool, caption, evaluate
from attrib.world.scene import COLORS, WorldConfig
from attrib.world.templates import HELDOUT, HELDOUT_EVAL, TRAIN, match_template

N = 40
COUNTS = dict(n_train=N, n_eval=N, n_caption_train=N, n_caption_eval=N)
SEED = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return write_world(tmp_path_factory.mktemp("world") / "w", SEED, **COUNTS)


def _load(world: Path, name: str):
    return json.loads((world / name).read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _nearest_colour(rgb) -> str:
    palette = np.array(list(COLORS.values()))
    return list(COLORS)[int(np.argmin(((palette - np.asarray(rgb, int)) ** 2).sum(1)))]


def test_layout_of_the_output_folder(world):
    names = {p.name for p in world.iterdir()}
    assert names == {f"{s}.json" for s in SPLITS} | {"truth.json", "meta.json", "images"}
    assert not [p for p in world.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


@pytest.mark.parametrize("split", SPLITS)
def test_records_have_the_11_string_fields_and_existing_images(world, split):
    records = _load(world, f"{split}.json")
    assert len(records) == N
    for r in records:
        assert tuple(r) == FIELDS and all(isinstance(v, str) and v for v in r.values())
        for role in IMAGE_ROLES:
            path = world / r[role]
            assert path.is_file() and not Path(r[role]).is_absolute()
            with Image.open(path) as img:
                assert img.size == (64, 64) and img.mode == "RGB"


def test_truth_json_shape(world):
    truth = _load(world, "truth.json")
    assert list(truth) == list(SPLITS)
    for split in SPLITS:
        records = _load(world, f"{split}.json")
        assert len(truth[split]) == len(records)
        for entry, record in zip(truth[split], records):
            assert set(entry) == {"family", "answer", "image", "image_rephrase", "m_loc", "novel_target", "same_image"}
            assert entry["answer"] == record["pred"]
            assert entry["family"] == ("caption" if split.startswith("caption") else entry["family"])
            assert entry["family"] in VQA_FAMILIES + ("caption",)
            for role in IMAGE_ROLES:
                box = entry[role]
                if box is not None:
                    assert len(box) == 4 and all(isinstance(v, int) and v % 8 == 0 for v in box)
                    assert 0 <= box[0] < box[2] <= 64 and 0 <= box[1] < box[3] <= 64
            assert entry["m_loc"] is not None or match_template(record["m_loc_q"]).family in ("count", "exists")


def test_boxes_sit_on_the_asked_about_object(world):
    truth = _load(world, "truth.json")
    for split in SPLITS:
        records = _load(world, f"{split}.json")
        for entry, record in zip(truth[split], records):
            for role in IMAGE_ROLES:
                if entry[role] is None:
                    continue
                x0, y0, x1, y1 = entry[role]
                pixel = np.asarray(Image.open(world / record[role]))[(y0 + y1) // 2, (x0 + x1) // 2]
                assert int(pixel.max()) - int(pixel.min()) > 60  # a saturated object colour, not background
                if role != "m_loc" and entry["family"] == "color_of_shape":
                    assert _nearest_colour(pixel) == entry["answer"]  # on both image and image_rephrase
                if role != "m_loc" and entry["family"] == "shape_of_color":
                    slot_colour = [w for w in record["src"].split() if w in COLORS]
                    assert [_nearest_colour(pixel)] == slot_colour


def test_box_null_exactly_where_no_single_object_is_asked(world):
    truth = _load(world, "truth.json")
    for entry in truth["vqa_train"] + truth["vqa_eval"]:
        no_object = entry["family"] == "count" or (entry["family"] == "exists" and entry["answer"] == "no")
        assert (entry["image"] is None) == no_object and (entry["image_rephrase"] is None) == no_object
    for entry in truth["caption_train"] + truth["caption_eval"]:
        assert entry["family"] == "caption" and entry["image"] is None and entry["image_rephrase"] is None


def test_templates_train_in_src_heldout_in_rephrase_another_heldout_for_eval(world):
    for split in ("vqa_train", "vqa_eval"):
        for r, entry in zip(_load(world, f"{split}.json"), _load(world, "truth.json")[split]):
            src, reph = match_template(r["src"], entry["family"]), match_template(r["rephrase"], entry["family"])
            assert src is not None and src.split == TRAIN
            assert reph is not None and reph.split == (HELDOUT if split.endswith("train") else HELDOUT_EVAL)
            m = match_template(r["m_loc_q"])
            assert m.split == TRAIN and m.family != entry["family"]
    for split in ("caption_train", "caption_eval"):
        for r in _load(world, f"{split}.json"):
            assert r["src"] == CAPTION_PROMPT
            assert match_template(r["rephrase"], "caption").split == (HELDOUT if split.endswith("train")
                                                                        else HELDOUT_EVAL)
            assert match_template(r["m_loc_q"]).split == TRAIN


def test_alt_is_a_different_answer_of_the_same_type(world):
    truth = _load(world, "truth.json")
    for split in SPLITS:
        for r, entry in zip(_load(world, f"{split}.json"), truth[split]):
            assert r["alt"] != r["pred"]
            if entry["family"] == "caption":
                diff = [a != b for a, b in zip(r["alt"].split(), r["pred"].split())]
                assert len(r["alt"].split()) == len(r["pred"].split()) and sum(diff) == 1
            elif entry["novel_target"]:
                assert split.endswith("eval") and r["alt"] in NOVEL_WORDS[entry["family"]]
                assert r["alt"] not in answer_pool(entry["family"])
            else:
                assert {r["alt"], r["pred"]} <= set(answer_pool(entry["family"]))


def test_novel_targets_only_in_eval_vqa_and_at_the_asked_share():
    records = build_split(SEED, "vqa_eval", 600)
    share = sum(r.novel_target for r in records) / len(records)
    assert abs(share - 1 / 3) < 0.06
    assert not any(r.novel_target for r in build_split(SEED, "vqa_train", 100))
    assert not any(r.novel_target for r in build_split(SEED, "vqa_eval", 100, novel_share=0.0))
    assert not any(r.novel_target and r.family == "exists" for r in records)
    with pytest.raises(ValueError, match="novel_share"):
        write_world(Path("unused"), SEED, novel_share=0.9)


def test_extras_leave_every_other_draw_alone():
    # The novel target and the eval rephrase replace two fields; everything else is what the record's
    # own stream drew, whatever the share.
    for index in range(30):
        plain, novel = make_record(SEED, "vqa_eval", index, novel_share=0.0), make_record(SEED, "vqa_eval", index)
        same = {k: v for k, v in plain.fields.items() if k != "alt"}
        assert same == {k: v for k, v in novel.fields.items() if k != "alt"}
        assert plain.scenes == novel.scenes and plain.same_image == novel.same_image


def test_same_image_questions_leave_the_edited_object_and_the_edit_alone(world):
    truth = _load(world, "truth.json")
    for split in SPLITS:
        records = build_split(SEED, split, N)
        for record, entry in zip(records, truth[split]):
            assert 1 <= len(entry["same_image"]) <= 3
            assert [q["question"] for q in entry["same_image"]] == [q.text for q in record.same_image]
            asked = [(q.family, sorted(q.slots.items())) for q in record.same_image]
            assert len(set(map(str, asked))) == len(asked)
            for question in record.same_image:
                assert evaluate(record.scenes["image"], question.family, question.slots)[0] == question.answer
                if record.question is not None:
                    assert record.question.target is None or question.target != record.question.target
                    assert not set(question.slots.values()) & ({record.fields["alt"], record.fields["pred"]}
                                                               | set(record.question.slots.values()))
                    assert not (record.family == question.family == "count")


def test_loc_pairs_are_facts(world):
    facts = {f.question: f.answer for f in FACTS}
    for split in SPLITS:
        for r in _load(world, f"{split}.json"):
            assert facts[r["loc"]] == r["loc_ans"]


def test_in_memory_records_match_and_variants_keep_the_answer(world):
    truth = _load(world, "truth.json")
    train = build_split(SEED, "vqa_train", N)
    assert [r.fields for r in train] == _load(world, "vqa_train.json")
    assert [r.truth() for r in train] == truth["vqa_train"]
    for r in train:
        q = r.question
        assert evaluate(r.scenes["image_rephrase"], q.family, q.slots) == (q.answer, q.target)
        m = r.m_loc_question
        assert evaluate(r.scenes["m_loc"], m.family, m.slots) == (r.fields["m_loc_a"], m.target)
    for r in build_split(SEED, "caption_train", N):
        assert caption(r.scenes["image_rephrase"]) == r.fields["pred"]


def test_families_are_balanced(world):
    families = [e["family"] for e in _load(world, "truth.json")["vqa_train"]]
    assert all(families.count(f) == N // len(VQA_FAMILIES) for f in VQA_FAMILIES)


def test_eval_scenes_differ_from_train_scenes():
    train = build_split(SEED, "vqa_train", N) + build_split(SEED, "caption_train", N)
    layouts = frozenset(r.scenes["image"].layout_key() for r in train)
    evals = build_split(SEED, "vqa_eval", N, WorldConfig(), layouts)
    assert not {r.scenes["image"].layout_key() for r in evals} & layouts
    assert [r.fields["src"] for r in evals] != [r.fields["src"] for r in train[:N]]


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    again = write_world(tmp_path / "again", SEED, **COUNTS)
    assert _files(again) == _files(world)
    other = write_world(tmp_path / "other", SEED + 1, **COUNTS)
    assert (other / "vqa_train.json").read_bytes() != (world / "vqa_train.json").read_bytes()
    assert (other / "images/vqa_train/000000.png").read_bytes() != (world / "images/vqa_train/000000.png").read_bytes()


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "w"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        write_world(out, 0, n_train=2, n_eval=2, n_caption_train=2, n_caption_eval=2)
    write_world(out, 0, n_train=2, n_eval=2, n_caption_train=2, n_caption_eval=2, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "truth.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(dataset, "atomic_write_json", boom)
    with pytest.raises(RuntimeError):
        write_world(tmp_path / "w", 0, n_train=2, n_eval=2, n_caption_train=2, n_caption_eval=2)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments():
    with pytest.raises(ValueError):
        write_world("/tmp/never-written", -1)
    with pytest.raises(ValueError):
        build_split(0, "vqa_test", 1)
