"""The analysis notebook runs top to bottom on the shipped default LLaVA and BLIP-2 (offline, a small world)."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parents[2] / "notebooks" / "attribution_walkthrough.ipynb"


@pytest.mark.parametrize("backbone", ["llava", "blip2"])  # the visual-token grid and a ViT-patch grid
def test_walkthrough_runs_and_draws(tmp_path, monkeypatch, backbone):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VISEDIT_BACKBONE", backbone)
    monkeypatch.setenv("VISEDIT_WORLD", str(tmp_path / "world"))  # missing: the notebook writes a small one
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= 5  # two contribution bar charts, the heatmaps, the overlay, the validation curves
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "ground-truth validation" in printed and "| layer_integrated_gradients |" in printed
    placement = [o for o in outputs if o.output_type == "execute_result"][-1]["data"]["text/plain"]
    assert "edit_layer" in placement
    assert (tmp_path / "notebook_world" / "vqa_eval.json").is_file()
