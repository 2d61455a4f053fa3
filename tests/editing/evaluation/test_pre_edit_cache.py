"""The lifelong protocol's shared pre-edit rows: written by the first method, read by the next only when its
own unedited model gives the same rows, and equal to computing them directly."""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from attrib.data import load_records
from attrib.errors import ArtifactError
from editing.editor import Editor
from editing.evaluation import pre_edit_cache, sequential
from editing.evaluation.metrics import RowPredictions
from editing.methods import MethodContext, build_method, method_config


class Fixed(Editor):
    """An editor without edits whose locality rows all answer ``answer``."""

    lifelong = True

    def __init__(self, answer: int = 5):
        self.backbone = SimpleNamespace(fingerprint=lambda: "fake")
        self.answer = answer
        self.calls = 0  # records whose locality rows were computed

    def edit(self, request) -> None:
        raise AssertionError("no edit is made")

    def restore(self) -> None:
        pass


@pytest.fixture
def fake(monkeypatch):
    def locality(editor, records, formats):
        editor.calls += len(records)
        top = torch.tensor([[editor.answer]], dtype=torch.int32)
        return [[RowPredictions(torch.tensor([5]), top, top)] * 3 for _ in records]

    monkeypatch.setattr(sequential, "_locality", locality)


@pytest.fixture(scope="module")
def records(tiny_world):
    three = load_records(tiny_world / "vqa_eval.json")
    return [replace(three[i % 3], index=i) for i in range(40)]


def test_the_second_method_reads_the_rows_after_checking_the_first_records(fake, records, tmp_path):
    first, second = Fixed(), Fixed()
    pre, how = pre_edit_cache.shared_pre_edit(first, records, 10, tmp_path)
    assert how == "computed" and first.calls == 40 and (tmp_path / "10.safetensors").is_file()
    again, how = pre_edit_cache.shared_pre_edit(second, records, 10, tmp_path)
    assert how == "shared" and second.calls == 20  # the two blocks that start below BLOCK (16): records 0-19
    assert again.n_live == 10 and pre_edit_cache.same_rows(again.rows, pre.rows)


def test_a_method_whose_unedited_rows_differ_computes_its_own_and_keeps_the_file(fake, records, tmp_path):
    pre_edit_cache.shared_pre_edit(Fixed(5), records, 4, tmp_path)
    written = (tmp_path / "4.safetensors").read_bytes()
    other = Fixed(6)
    pre, how = pre_edit_cache.shared_pre_edit(other, records, 4, tmp_path)
    assert how == "computed" and other.calls == 16 + 40
    assert all(int(row.answer_top) == 6 for rows in pre.rows for row in rows)
    assert (tmp_path / "4.safetensors").read_bytes() == written


def test_other_inputs_compute_the_rows_again_and_replace_the_file(fake, records, tmp_path):
    pre_edit_cache.shared_pre_edit(Fixed(5), records, 4, tmp_path)
    for changed in (records[:-1], [replace(records[0], fields={**records[0].fields, "loc": "another"}), *records[1:]]):
        editor = Fixed(5)
        assert pre_edit_cache.shared_pre_edit(editor, changed, 4, tmp_path)[1] == "computed"
        assert editor.calls == len(changed) // 4 * 4
    assert pre_edit_cache.shared_pre_edit(Fixed(5), records, 8, tmp_path)[1] == "computed"  # another N, own file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4.safetensors", "8.safetensors"]


def test_a_damaged_cache_is_named(fake, records, tmp_path):
    (tmp_path / "4.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="4.safetensors: not a readable pre-edit rows cache"):
        pre_edit_cache.shared_pre_edit(Fixed(), records, 4, tmp_path)


@pytest.mark.parametrize("second", ["ft_l", "tp"])
def test_shared_rows_equal_the_rows_another_method_computes(tiny_backbone, tiny_world, tmp_path, second):
    """On a tiny backbone: rows written by the unedited model (``none``) and read by another method equal
    that method's own `pre_edit_locality`, every field of every row; the file round-trips them exactly."""
    records = load_records(tiny_world / "vqa_eval.json")
    methods = [build_method(name, MethodContext(tiny_backbone, hyper=method_config(name, tiny_backbone.spec.name)))
               for name in ("none", second)]
    written, how = pre_edit_cache.shared_pre_edit(methods[0], records, 1, tmp_path)
    assert how == "computed"
    read, how = pre_edit_cache.shared_pre_edit(methods[1], records, 1, tmp_path)
    assert how == "shared"
    assert pre_edit_cache.same_rows(read.rows, sequential.pre_edit_locality(methods[1], records, 1).rows)
    assert pre_edit_cache.same_rows(read.rows, written.rows) and len(read.rows) == len(records)
    for method in methods:
        method.close()
