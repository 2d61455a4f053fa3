"""The four analysis notebooks run top to bottom on a shipped default each (offline, a small world written
for them) and show what they promise: figures, the exact logit decomposition, the three region methods and
the ground-truth table, an edit that takes, the comparison table."""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parents[2] / "notebooks"
SETTINGS = ("VISEDIT_BACKBONE", "VISEDIT_MODEL", "VISEDIT_DATA", "VISEDIT_IMAGES", "VISEDIT_TRAIN", "VISEDIT_WORLD",
            "VISEDIT_ATTRIBUTION", "VISEDIT_ADAPTER", "VISEDIT_STEPS", "VISEDIT_RESULTS")


def run(name: str, backbone: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    """Execute notebooks/<name>.ipynb as Jupyter would (from notebooks/) on ``backbone``'s shipped default,
    with nothing of the caller's own settings and a world folder that does not exist yet."""
    for setting in SETTINGS:
        monkeypatch.delenv(setting, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VISEDIT_BACKBONE", backbone)
    monkeypatch.setenv("VISEDIT_WORLD", str(tmp_path / "world"))  # missing: the notebook writes a small one
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    errors = [o for o in outputs(notebook) if o.output_type == "error"]
    assert not errors, errors
    return notebook


def outputs(notebook: nbformat.NotebookNode) -> list:
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]


def printed(notebook: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in outputs(notebook) if o.output_type == "stream" and o.name == "stdout")


def figures(notebook: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs(notebook))


def test_committed_without_outputs():
    """Outputs are stripped before committing: the notebooks stay small and diff as code."""
    names = sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb"))
    assert names == ["01_contribution", "02_regions", "03_editing", "04_compare"]
    for name in names:
        notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert code and not any(cell.outputs or cell.execution_count for cell in code), name
        first = notebook.cells.index(code[0])
        assert "real checkpoint" in "".join(cell.source for cell in notebook.cells[:first]), name  # says how


def test_contribution(tmp_path, monkeypatch):
    notebook = run("01_contribution", "llava", tmp_path, monkeypatch)
    assert figures(notebook) >= 6  # one sample's two bar charts, the mean's two, the per-sample rows, the artifact's
    text = printed(notebook)
    total, logit = map(float, re.search(r"= (-?\d+\.\d+); the logit of .*?: (-?\d+\.\d+)", text).groups())
    assert abs(total - logit) < 1e-2  # the direct-logit terms add up to the logit
    assert "contribution rule on these records: {'edit_layer'" in text
    assert "figures/llava (24 samples): edit layer -1" in text  # the committed artifact, read back and checked
    assert (tmp_path / "notebook_world" / "vqa_eval.json").is_file()


def test_regions(tmp_path, monkeypatch):
    notebook = run("02_regions", "blip2", tmp_path, monkeypatch)
    text = printed(notebook)
    for method in ("vit_noise", "query_noise", "causal_noise"):  # the registry's three for a Q-Former backbone
        assert re.search(rf"^{method} .*maps \(\d+, \d+, \d+\)", text, re.M), method
    assert "query tokens, not image cells" in text
    # three layer × region maps, the per-layer panels, two overlays, the pointing game, the validation curves
    assert figures(notebook) >= 8
    assert "ground-truth validation" in text and "| layer_integrated_gradients |" in text


def test_editing(tmp_path, monkeypatch):
    notebook = run("03_editing", "blip2", tmp_path, monkeypatch)
    text = printed(notebook)
    assert "edit layer -1, IT layers [1, 2, 3, 4, 5, 6, 7], IM read layer 1" in text  # figures/blip2's placement
    target = re.search(r"edit: .* → '(.+)' \(record", text).group(1)
    table = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.splitlines()
             if line.startswith("| ")]
    rows = {row[0]: row for row in table}  # probe | prompt | should be | before | after
    assert set(rows) >= {"edit", "rephrase", "image rephrase", "same image, other question", "unrelated image"}
    _, _, expected, before, after = rows["edit"]
    starts = lambda answer: f"{answer} ".startswith(f"{target} ")  # noqa: E731  (greedy answers run on)
    assert expected == target and starts(after) and not starts(before)
    assert rows["unrelated image"][2] == "unchanged"
    assert figures(notebook) >= 3  # the losses, the probes, the IM map
    assert "mean gate: {'edit_image'" in text and re.search(r"\d+ edits: rel \d", text)


def test_compare(tmp_path, monkeypatch):
    notebook = run("04_compare", "minigpt4", tmp_path, monkeypatch)  # its committed comparison
    assert "figures/minigpt4/compare/results.json: minigpt4, task vqa, 300 test edits" in printed(notebook)
    table = "".join(o["data"].get("text/markdown", "") for o in outputs(notebook) if "data" in o)
    assert "| method | Rel | T-Gen |" in table
    for method in ("none", "visedit", "visedit_gated", "serac", "lookup"):
        assert f"| {method}" in table
    assert figures(notebook) >= 3  # the metrics figure, locality against the mean, novel against known
