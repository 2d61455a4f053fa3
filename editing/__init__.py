"""VisEdit knowledge editing: VEAD + Influence Mapper adapters placed from attribution (SPEC §5–7).

    editor = VisEditEditor(backbone, EditPlacement.from_artifact(artifact, backbone), VeadConfig())
    editor.edit(EditRequest(image, "What color is the square? The answer is:", "green"))
    ...                                   # every image input now sees the edit
    editor.restore()                      # bit-identical to the unedited model again
    scores = evaluate_edits(editor, records).to_json()

Modules: `vead` (the adapter, its optional scene gate and target role, its config), `adapter` (hooks
and bypass rules), `inputs` (teacher-forced rows), `editor` (edit / restore / weights), `metrics` and
`evaluation` (SPEC §7), `same_object` (the M-Loc split rule for world data); training: `split` (no-grad
prefix / differentiable top), `examples` (per-record no-grad products, IM alignment targets), `losses`,
`checkpoint`, `train`; `localisation` (IM maps, pointing game), `checks` (named record errors), `run` +
`__main__` (the CLI).

    result = train(editor, load_records("vqa_train.json"), TrainConfig(steps=2000), "runs/llava/checkpoint")
"""
from editing.adapter import LM_INPUT, AdapterHook
from editing.editor import (
    EditPlacement, EditRequest, VisEditEditor, weights_config, weights_metadata, weights_placement,
)
from editing.evaluation import RestoreError, evaluate_edits
from editing.metrics import EditScores, RecordScores
from editing.same_object import WorldSameObject, edited_object_in_m_loc
from editing.localisation import ImMaps, im_maps
from editing.split import EditSite, SplitForward
from editing.train import TrainConfig, TrainResult, train
from editing.vead import EditAdapter, EditSignal, VeadConfig, count_parameters

__all__ = ["AdapterHook", "EditAdapter", "EditPlacement", "EditRequest", "EditScores", "EditSignal", "EditSite",
           "ImMaps", "LM_INPUT", "RecordScores", "RestoreError", "SplitForward", "TrainConfig", "TrainResult",
           "VeadConfig", "VisEditEditor", "WorldSameObject", "count_parameters", "edited_object_in_m_loc",
           "evaluate_edits", "im_maps", "train", "weights_config", "weights_metadata", "weights_placement"]
