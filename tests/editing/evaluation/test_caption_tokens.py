"""Which caption tokens an editor misses: the counting on constructed rows, and the loop on a tiny world."""
from __future__ import annotations

import torch

from attrib.data import load_records
from editing.evaluation.caption_tokens import CaptionTokens, caption_token_misses, edited_span
from tests.editing.conftest import FlagEditor, one_token_everywhere


def ids(*values):
    return torch.tensor(values)


def test_each_wrong_token_lands_in_its_class():
    counts = CaptionTokens()
    # target 1 2 3 4 3 against the unedited caption 1 5 3 4 3: position 1 is the edited word (5 -> 2)
    counts.add(alt=ids(1, 2, 3, 4, 3), old=ids(1, 5, 3, 4, 3),
               edited_top=ids(1, 5, 2, 4, 6),      # edit not taken, new word spread to 2, another miss at 4
               unedited_top=ids(1, 5, 3, 4, 6))    # the unedited model already missed position 4
    out = counts.to_json()
    assert out["wrong_tokens"] == {"edited_kept_old": 1, "edited_other": 0, "rest_new_word": 1, "rest_other": 1,
                                   "rest_wrong_unedited_too": 1, "unedited_rest_wrong": 1}
    assert out["exact"] == 0.0 and out["exact_ceiling_edited_word_only"] == 0.0
    assert out["edited_right"] == 0.0 and out["rest_right"] == 50.0 and out["rest_right_unedited"] == 75.0
    assert out["miss_records"] == {"edited": 0, "rest": 0, "both": 1}
    counts.add(alt=ids(7, 8), old=ids(7, 9), edited_top=ids(7, 8), unedited_top=ids(7, 9))  # a clean edit
    out = counts.to_json()
    assert out["n_records"] == 2 and out["n_tokens"] == 7
    assert out["exact"] == 50.0 and out["edited_right"] == 50.0 and out["exact_ceiling_edited_word_only"] == 50.0


def test_the_edited_span_follows_words_of_different_lengths():
    edited, old_at = edited_span(ids(1, 2, 3, 4), ids(1, 5, 6, 7, 4))  # one new token for three old ones
    assert edited.tolist() == [False, True, True, False] and old_at.tolist() == [-1, 5, 6, -1]
    edited, old_at = edited_span(ids(1, 2, 3, 4), ids(1, 5, 4))  # two new tokens for one old one
    assert edited.tolist() == [False, True, True, False] and old_at.tolist() == [-1, 5, -1, -1]
    counts = CaptionTokens()
    counts.add(alt=ids(1, 2, 3, 4), old=ids(1, 5, 4), edited_top=ids(1, 5, 3, 4), unedited_top=ids(1, 5, 4, 4))
    assert counts.edited_kept_old == 1 and counts.n_edited == 2 and counts.unedited_rest_wrong == 0


def test_an_edit_that_changes_nothing_keeps_the_unedited_misses(llava, tiny_world):
    records = load_records(tiny_world / "caption_eval.json")
    out = caption_token_misses(FlagEditor(llava), records).to_json()
    wrong = out["wrong_tokens"]
    assert out["n_records"] == len(records) and out["n_edited_tokens"] >= 1
    rest_wrong = wrong["rest_new_word"] + wrong["rest_other"]
    assert wrong["rest_wrong_unedited_too"] == wrong["unedited_rest_wrong"] == rest_wrong
    assert out["rest_right"] == out["rest_right_unedited"]


def test_an_edit_that_answers_one_token_everywhere_misses_the_rest(llava, tiny_world, monkeypatch):
    records = load_records(tiny_world / "caption_eval.json")
    counts = caption_token_misses(one_token_everywhere(monkeypatch, llava, 7), records)
    wrong = counts.to_json()["wrong_tokens"]
    labels = llava.tokenizer(" " + records[0].alt, add_special_tokens=False).input_ids
    assert counts.exact == 0 and sum(wrong[k] for k in ("edited_kept_old", "edited_other", "rest_new_word",
                                                       "rest_other")) == sum(t != 7 for t in labels)
