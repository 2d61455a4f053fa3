"""MMEdit records, truth.json and record images: every bad input ends in a one-line DataError naming the
file (and record, field); fuzzed files either load or fail that way, never with another exception."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from PIL import Image

from attrib.data import FIELDS, IMAGE_FIELDS, DataError, check_prompt_length, load_records, prompt_length
from attrib.world import write_world

# Any JSON value, NaN and infinities included (Python's json reads and writes them).
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
# Path pieces that try to leave the image root or break the file system, mixed with ordinary text.
PATH_PIECES = st.sampled_from(["..", ".", "/", "//", "\x00", "\n", "\x7f", "\x85", "\u2028", "images", "x.png",
                               "link", "linkdir", "é", "画像", "\ud800", "\udc80", "~", " ", "\\", "%2e%2e", "a" * 300])
PATHS = st.sampled_from(["images/x.png", "./images/x.png", "images/../images/x.png"]) | st.lists(
    PATH_PIECES | st.text(max_size=6), max_size=8).map("".join)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return write_world(tmp_path_factory.mktemp("data") / "world", seed=5, n_train=1, n_eval=3, n_caption_train=1,
                       n_caption_eval=1)


@pytest.fixture(scope="module")
def raw(world) -> list[dict]:
    return json.loads((world / "vqa_eval.json").read_text())


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, world) -> Path:
    """A folder for mutated copies: images/ and truth.json beside them copied from the world, a symlink
    inside it that leads out, and an image file outside it."""
    folder = tmp_path_factory.mktemp("scratch")
    shutil.copytree(world / "images", folder / "images")
    outside = tmp_path_factory.mktemp("outside")
    Image.new("RGB", (4, 4)).save(outside / "secret.png")
    (folder / "link").symlink_to(outside / "secret.png")
    (folder / "linkdir").symlink_to(outside, target_is_directory=True)
    (folder / "images" / "x.png").write_bytes((folder / "images" / "vqa_eval" / "000000.png").read_bytes())
    return folder


def one_line_naming(error: BaseException, *names: object) -> str:
    message = str(error)
    assert isinstance(error, DataError), f"{type(error).__name__}: {message}"
    assert len(message.splitlines()) == 1, message  # no line break of any kind
    for name in names:
        assert str(name) in message, (name, message)
    return message


def write_records(folder: Path, records, name: str = "vqa_eval.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(records))
    return path


def png_header(width: int, height: int) -> bytes:
    """The first bytes of a PNG of ``width`` × ``height`` RGB pixels: a valid header, no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))


# --- records file -----------------------------------------------------------------------------------------

def test_world_records_load_with_their_truth(world):
    records = load_records(world / "vqa_eval.json")
    truth = json.loads((world / "truth.json").read_text())["vqa_eval"]
    assert [r.truth for r in records] == truth and records[0].box("image") == truth[0]["image"]
    assert records[0].load_image().size == (64, 64) and records[0].image_size("m_loc") == (64, 64)
    assert len(load_records(world / "vqa_eval.json", n=2)) == 2 and load_records(world / "vqa_eval.json", n=0) == []
    assert load_records(world / "caption_eval.json", truth_split="caption_eval")[0].box() is None


@pytest.mark.parametrize("content,message", [
    (b"\xff\xfe[]", "not UTF-8 text at byte 0"),
    (b'[{"src": "a"', "not valid JSON"),
    (b'{"records": []}', "expected a JSON list of records, found an object"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b"[" + b"9" * 5000 + b"]", "number too long"),
])
def test_unreadable_records_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as error:
        load_records(path)
    one_line_naming(error.value, path)


def test_missing_and_oversized_files_are_named(tmp_path, world, monkeypatch):
    with pytest.raises(DataError, match="file not found") as error:
        load_records(tmp_path / "nope.json")
    one_line_naming(error.value, tmp_path / "nope.json")
    monkeypatch.setenv("VISEDIT_MAX_JSON_BYTES", "100")
    with pytest.raises(DataError, match="over the 100-byte limit") as error:
        load_records(world / "vqa_eval.json")
    one_line_naming(error.value, world / "vqa_eval.json")


@pytest.mark.parametrize("mutate,message", [
    (lambda rs: rs.__setitem__(1, ["not", "an", "object"]), r"record 1: expected an object, found a list"),
    (lambda rs: rs[1].pop("alt"), r"record 1: missing field 'alt'"),
    (lambda rs: rs[1].__setitem__("alt", 7), r"record 1, field 'alt': expected a string, found a whole number"),
    (lambda rs: rs[2].__setitem__("m_loc", None), r"record 2, field 'm_loc': expected a string, found null"),
    (lambda rs: rs[0].__setitem__("image", "a\nb.png"), r"record 0, field 'image': control character"),
    (lambda rs: rs[0].__setitem__("image", "a\x00b.png"), r"record 0, field 'image': control character"),
    (lambda rs: rs[0].__setitem__("image", "a\u2028b.png"), r"record 0, field 'image': control character"),
    (lambda rs: rs[0].__setitem__("m_loc", "\ud800.png"), r"record 0, field 'm_loc': .*cannot be a file name"),
])
def test_bad_records_are_named_by_index_and_field(tmp_path, raw, mutate, message):
    records = json.loads(json.dumps(raw))
    mutate(records)
    path = write_records(tmp_path, records, "bad.json")
    with pytest.raises(DataError, match=message) as error:
        load_records(path)
    one_line_naming(error.value, path)


@pytest.mark.parametrize("n,message", [(4, "N=4 is larger than the dataset"), (-1, "N=-1; expected a number")])
def test_record_counts_out_of_range_are_refused(world, n, message):
    with pytest.raises(DataError, match=message):
        load_records(world / "vqa_eval.json", n=n)


# --- image paths and images -------------------------------------------------------------------------------

@pytest.mark.parametrize("field", IMAGE_FIELDS)
@pytest.mark.parametrize("relative,message", [
    ("../outside.png", "leads outside the image root"),
    ("images/../../outside.png", "leads outside the image root"),
    ("/etc/hostname", "absolute path"),
    ("link", "leads outside the image root"),  # a symlink inside the root to a file outside it
    ("linkdir/secret.png", "leads outside the image root"),  # through a symlinked folder
    ("", "empty path"),
    ("images/missing.png", "image not found"),
    ("a" * 5000 + ".png", "cannot read image"),  # longer than a file name may be
])
def test_image_paths_stay_inside_the_root(scratch, raw, field, relative, message):
    records = json.loads(json.dumps(raw))
    records[1][field] = relative
    path = write_records(scratch, records)
    record = load_records(path)[1]
    for read in (record.load_image, record.image_size):
        with pytest.raises(DataError, match=message) as error:
            read(field)
        one_line_naming(error.value, path, f"record 1, field {field!r}")


def test_symlinks_and_dot_segments_inside_the_root_are_fine(scratch, raw, tmp_path):
    (scratch / "inner").symlink_to(scratch / "images" / "x.png")
    records = json.loads(json.dumps(raw))
    records[0].update(image="inner", image_rephrase="images/./vqa_eval/../x.png")
    record = load_records(write_records(scratch, records, "fine.json"))[0]
    assert record.load_image("image").size == record.load_image("image_rephrase").size == (64, 64)


@pytest.mark.parametrize("content,field,message", [
    (png_header(8000, 8000), "image", "8000 × 8000 = 64,000,000 pixels, over the 50,000,000-pixel limit"),
    (png_header(20000, 20000), "m_loc", "decompression bomb"),  # over PIL's own limit too
    (b"not an image at all", "image_rephrase", "cannot read image"),
])
def test_oversized_or_unreadable_images_are_refused_from_the_header(scratch, raw, content, field, message):
    (scratch / "images" / "bad.png").write_bytes(content)
    records = json.loads(json.dumps(raw))
    records[0][field] = "images/bad.png"
    record = load_records(write_records(scratch, records))[0]
    for read in (record.image_size, record.load_image):
        with pytest.raises(DataError, match=message) as error:
            read(field)
        one_line_naming(error.value, "record 0", "bad.png")


def test_pixel_limit_follows_the_environment_and_header_checks_decode_nothing(scratch, raw, world, monkeypatch):
    truncated = scratch / "images" / "truncated.png"
    truncated.write_bytes(png_header(64, 64))  # a valid header, no image data
    records = json.loads(json.dumps(raw))
    records[0]["image_rephrase"] = "images/truncated.png"
    record = load_records(write_records(scratch, records), image_root=scratch)[0]
    assert record.image_size("image_rephrase") == (64, 64)  # the header alone
    with pytest.raises(DataError, match="cannot read image"):
        record.load_image("image_rephrase")
    monkeypatch.setenv("VISEDIT_MAX_IMAGE_PIXELS", "4095")
    with pytest.raises(DataError, match="64 × 64 = 4,096 pixels, over the 4,095-pixel limit"):
        record.image_size("image")
    with pytest.raises(DataError, match="over the 4,095-pixel limit"):
        record.load_image("image")


# --- truth.json ----------------------------------------------------------------------------------------------

@pytest.fixture
def truth_folder(tmp_path, world) -> Path:
    shutil.copy(world / "vqa_eval.json", tmp_path / "vqa_eval.json")
    shutil.copy(world / "truth.json", tmp_path / "truth.json")
    return tmp_path


def _set_truth(folder: Path, mutate) -> Path:
    truth = json.loads((folder / "truth.json").read_text())
    mutate(truth)
    (folder / "truth.json").write_text(json.dumps(truth))
    return folder / "truth.json"


@pytest.mark.parametrize("mutate,message", [
    (lambda t: t.__setitem__("vqa_eval", {"0": None}), r"split 'vqa_eval': expected a list of per-record entries"),
    (lambda t: t["vqa_eval"].__setitem__(1, "box"), r"split 'vqa_eval', record 1: expected an object or null, "
                                                     "found a string"),
    (lambda t: t["vqa_eval"][1].__setitem__("image", [1, 2, 3]), r"record 1, field 'image': expected a box "
                                                                 r"\[x0, y0, x1, y1\] of 4 finite numbers or null, "
                                                                 "found a list of 3 items"),
    (lambda t: t["vqa_eval"][2].__setitem__("m_loc", [0, 0, "8", 8]), r"record 2, field 'm_loc': expected a box"),
    (lambda t: t["vqa_eval"][2].__setitem__("m_loc", [0, 0, float("nan"), 8]), r"record 2, field 'm_loc'"),
    (lambda t: t["vqa_eval"][0].__setitem__("image_rephrase", [0, 0, True, 8]), r"field 'image_rephrase'"),
    (lambda t: t["vqa_eval"][0].__setitem__("answer", 3), r"record 0, field 'answer': expected a string"),
    (lambda t: t["vqa_eval"][0].__setitem__("novel_target", "no"), r"record 0, field 'novel_target'"),
    (lambda t: t["vqa_eval"][0].__setitem__("same_image", [{"question": "q?"}]),
     r"record 0, field 'same_image', item 0: missing field 'answer'"),
    (lambda t: t["vqa_eval"].pop(), r"split 'vqa_eval' has 2 entries for the 3 records of .*vqa_eval.json"),
    (lambda t: t["vqa_eval"].append(None), r"split 'vqa_eval' has 4 entries for the 3 records"),
])
def test_bad_truth_is_named_by_split_record_and_field(truth_folder, mutate, message):
    truth_file = _set_truth(truth_folder, mutate)
    with pytest.raises(DataError, match=message) as error:
        load_records(truth_folder / "vqa_eval.json", n=1)  # the whole split is checked, not the first n
    one_line_naming(error.value, truth_file)


@pytest.mark.parametrize("content,message", [
    ("[]", "expected an object of splits"),
    ('{"vqa_eval": [', "not valid JSON"),
])
def test_unreadable_truth_files_are_named(truth_folder, content, message):
    (truth_folder / "truth.json").write_text(content)
    with pytest.raises(DataError, match=message) as error:
        load_records(truth_folder / "vqa_eval.json")
    one_line_naming(error.value, truth_folder / "truth.json")


def test_truth_entries_may_be_null_or_older_and_other_files_get_none(truth_folder):
    def older(truth):  # world folders written before novel targets and same-image questions
        for entry in truth["vqa_eval"]:
            del entry["novel_target"]
            del entry["same_image"]
        truth["vqa_eval"][1] = None

    _set_truth(truth_folder, older)
    records = load_records(truth_folder / "vqa_eval.json")
    assert records[1].truth is None and records[0].box("image") is not None
    shutil.copy(truth_folder / "vqa_eval.json", truth_folder / "mine.json")  # the user's own file: no split
    assert all(r.truth is None for r in load_records(truth_folder / "mine.json"))
    with pytest.raises(DataError, match=r"truth.json: no split 'mine'"):
        load_records(truth_folder / "mine.json", truth_split="mine")


# --- prompt length ------------------------------------------------------------------------------------------

def test_prompt_length_counts_what_the_model_sees(tiny_backbone, tiny_images):
    prompt, target = "what color is the circle?", "red"
    with_target = tiny_backbone.encode(tiny_images[:1], [prompt], [target])["input_ids"].shape[1]
    assert prompt_length(tiny_backbone, prompt, target) == with_target
    assert prompt_length(tiny_backbone, prompt) == tiny_backbone.encode(tiny_images[:1], [prompt])["input_ids"].shape[1]
    text_only = tiny_backbone.encode(None, [prompt])["input_ids"].shape[1]
    assert prompt_length(tiny_backbone, prompt, with_image=False) == text_only


def test_prompts_longer_than_the_context_are_refused_before_attribution(tiny_dirs, world, tiny_images):
    from attrib.attribution import check_inputs
    from attrib.backbones.loader import load_backbone

    backbone = load_backbone("blip2", tiny_dirs["blip2"])  # OPT: learned positions, no room past the table
    limit = backbone.config.text_config.max_position_embeddings
    record = load_records(world / "vqa_eval.json")[0]
    long = dataclasses.replace(record, fields={**record.fields, "src": "red " * limit})
    assert check_prompt_length(backbone, record, "src", record.src) < limit
    with pytest.raises(DataError, match=rf"record 0, field 'src': prompt and image tokens take \d+ positions, "
                                        rf"more than the language model's {limit}") as error:
        check_inputs(backbone, [long], tiny_images[:1], [long.src])
    one_line_naming(error.value, world / "vqa_eval.json")


# --- fuzzing ----------------------------------------------------------------------------------------------------

def _loads_or_names(path: Path, **kwargs) -> list:
    try:
        records = load_records(path, **kwargs)
    except DataError as error:
        one_line_naming(error, path.name)
        event("refused")
        return []
    event("loaded")
    assert all(isinstance(r.fields[f], str) for r in records for f in FIELDS)
    return records


@given(document=JSON | st.lists(st.fixed_dictionaries({f: JSON for f in FIELDS}), max_size=2))
def test_fuzz_random_json_documents(scratch, document):
    _loads_or_names(write_records(scratch, document, "fuzz_documents.json"))


@given(index=st.integers(0, 2), field=st.sampled_from([*FIELDS, None]), value=st.text(max_size=20) | JSON,
       drop=st.integers(0, 3).map(lambda k: k == 0))
def test_fuzz_one_field_replaced(scratch, raw, index, field, value, drop):
    records = json.loads(json.dumps(raw))
    if field is None:
        records[index] = value  # the whole record
    elif drop:
        del records[index][field]
    else:
        records[index][field] = value
    path = write_records(scratch, records, "fuzz_field.json")
    for record in _loads_or_names(path):
        if field in IMAGE_FIELDS:
            try:
                record.image_size(field)
            except DataError as error:
                one_line_naming(error, path.name)


def _damaged(data: bytes, how: str, at: int, flips: list[int], junk: bytes) -> bytes:
    if how == "truncate":
        return data[:at % (len(data) + 1)]
    if how == "flip":
        damaged = bytearray(data)
        for bit in flips:
            damaged[(bit // 8) % len(damaged)] ^= 1 << (bit % 8)
        return bytes(damaged)
    return junk


DAMAGE = dict(how=st.sampled_from(["truncate", "flip", "junk"]), at=st.integers(0, 1 << 20),
              flips=st.lists(st.integers(0, 1 << 24), min_size=1, max_size=4), junk=st.binary(max_size=200))


@given(**DAMAGE)
def test_fuzz_damaged_records_bytes(scratch, world, how, at, flips, junk):
    path = scratch / "fuzz_bytes.json"
    path.write_bytes(_damaged((world / "vqa_eval.json").read_bytes(), how, at, flips, junk))
    _loads_or_names(path)


@given(field=st.sampled_from(IMAGE_FIELDS), relative=PATHS)
def test_fuzz_image_paths(scratch, raw, field, relative):
    records = json.loads(json.dumps(raw))
    records[0][field] = relative
    path = write_records(scratch, records, "fuzz_paths.json")
    for record in _loads_or_names(path)[:1]:
        for read in (record.image_path, record.image_size, record.load_image):
            try:
                result = read(field)
            except DataError as error:
                one_line_naming(error, path.name, f"record 0, field {field!r}")
                event(f"{read.__name__}: refused")
                continue
            event(f"{read.__name__}: read")
            if read == record.image_path:  # a path that is let through stays inside the root
                root = os.path.realpath(scratch)
                assert os.path.realpath(result) == root or os.path.realpath(result).startswith(root + os.sep)


@pytest.fixture(scope="module")
def truth_scratch(tmp_path_factory, world) -> Path:
    folder = tmp_path_factory.mktemp("truth_fuzz")
    shutil.copy(world / "vqa_eval.json", folder / "vqa_eval.json")
    return folder


def _truth_loads_or_names(folder: Path) -> None:
    try:
        records = load_records(folder / "vqa_eval.json")
    except DataError as error:
        one_line_naming(error, folder / "truth.json")
        event("refused")
        return
    event("loaded")
    for record in records:  # what loads is what the readers of truth rely on
        for field in IMAGE_FIELDS:
            box = record.box(field)
            assert box is None or (len(box) == 4 and all(isinstance(v, (int, float)) for v in box))


@given(document=JSON | st.fixed_dictionaries({"vqa_eval": st.lists(JSON, min_size=3, max_size=3)}))
def test_fuzz_truth_documents(truth_scratch, document):
    (truth_scratch / "truth.json").write_text(json.dumps(document))
    _truth_loads_or_names(truth_scratch)


@given(index=st.integers(0, 2), field=st.sampled_from([*IMAGE_FIELDS, "answer", "family", "novel_target",
                                                       "same_image", None]), value=JSON)
def test_fuzz_truth_one_field_replaced(truth_scratch, world, index, field, value):
    truth = json.loads((world / "truth.json").read_text())
    if field is None:
        truth["vqa_eval"][index] = value
    else:
        truth["vqa_eval"][index][field] = value
    (truth_scratch / "truth.json").write_text(json.dumps(truth))
    _truth_loads_or_names(truth_scratch)


@given(**DAMAGE)
def test_fuzz_damaged_truth_bytes(truth_scratch, world, how, at, flips, junk):
    (truth_scratch / "truth.json").write_bytes(_damaged((world / "truth.json").read_bytes(), how, at, flips, junk))
    _truth_loads_or_names(truth_scratch)
