"""Scene separation: AUC and best split against hand-counted cases, and the measurement on a tiny world."""
from __future__ import annotations

import json

import torch

from editing.adapter.scenes import auc, best_split
from visedit.cli import main


def test_auc_counts_pairs_and_ties_count_half():
    assert auc(torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.2])) == 1.0
    assert auc(torch.tensor([0.1]), torch.tensor([0.9])) == 0.0
    # pairs: (0.5 vs 0.5) tie, (0.5 vs 0.1) win, (0.3 vs 0.5) loss, (0.3 vs 0.1) win → (2 + 0.5) / 4
    assert auc(torch.tensor([0.5, 0.3]), torch.tensor([0.5, 0.1])) == 0.625


def test_best_split_keeps_positives_at_or_above_and_cuts_negatives_below():
    # t = 0.8 keeps 2/3 and cuts all (1.67); t = 0.3 keeps all, cuts 1/3 (1.33); t = 0.5: 2/3 + 2/3
    split = best_split(torch.tensor([0.9, 0.8, 0.3]), torch.tensor([0.5, 0.35, 0.1]))
    assert split == {"threshold": 0.8, "kept": round(2 / 3, 4), "cut": 1.0}


def test_scenes_command_on_a_tiny_world(tiny_dirs, tiny_world, tmp_path, capsys):
    out = tmp_path / "scenes.json"
    code = main(["scenes", "--backbone", "blip2", "--model", str(tiny_dirs["blip2"]), "--data",
                 str(tiny_world / "vqa_eval.json"), "--out", str(out), "--no-progress"])
    assert code == 0
    summary = json.loads(out.read_text())
    assert summary["n"] == 3 and set(summary["auc"]) == {"chamfer", "mean_cosine", "salient"}
    assert all(0 <= v <= 1 for v in summary["auc"].values())
    assert all(-1 <= m[k] <= 1 for m in summary["mean"].values() for k in m)
    assert json.loads(capsys.readouterr().out) == summary
