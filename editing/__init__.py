"""Knowledge editing of vision-language models: VisEdit's VEAD + IM, placed from attribution.

The flow, one subpackage a step:

- `editing.editor`: the `Editor` interface (``edit(request)`` / ``restore()``) every method implements, and
  `EditRequest`;
- `editing.adapter`: VisEdit's adapter — VEAD, IM and the scene gate (`vead`, `scene_gate`), the hooks that
  put it into a backbone (`hook`), the split forward around its site (`split`), and `VisEditEditor`
  (`visedit`), which places it from an attribution artifact and saves / loads its weights;
- `editing.training`: training VEAD + IM on MMEdit records with the backbone frozen (`trainer`), its
  per-record products (`examples`), losses and resumable checkpoints;
- `editing.evaluation`: single-edit evaluation (`evaluate`) with the field's metrics (`metrics`), the M-Loc
  same-object split (`same_object`) and IM maps (`localisation`);
- `editing.command`: the ``edit`` and ``scenes`` commands (place, train, evaluate, report).

    editor = VisEditEditor(backbone, EditPlacement.from_artifact(artifact, backbone), VeadConfig())
    train(editor, load_records("vqa_train.json"), TrainConfig(steps=2000), "runs/llava/checkpoint")
    editor.edit(EditRequest(image, "What color is the square? The answer is:", "green"))
    ...                                   # every image input now sees the edit
    editor.restore()                      # bit-identical to the unedited model again
    scores = evaluate_edits(editor, records).to_json()
"""
from editing.adapter.hook import LM_INPUT, AdapterHook
from editing.adapter.split import EditSite, SplitForward
from editing.adapter.vead import EditAdapter, EditSignal, VeadConfig, count_parameters
from editing.adapter.visedit import (
    EditPlacement,
    VisEditEditor,
    weights_config,
    weights_metadata,
    weights_placement,
)
from editing.editor import Editor, EditRequest
from editing.evaluation.evaluate import RestoreError, evaluate_edits
from editing.evaluation.localisation import ImMaps, im_maps
from editing.evaluation.metrics import EditScores, RecordScores
from editing.evaluation.same_object import WorldSameObject, edited_object_in_m_loc
from editing.training.config import TrainConfig, TrainResult
from editing.training.loop import train

__all__ = ["AdapterHook", "EditAdapter", "EditPlacement", "EditRequest", "EditScores", "EditSignal", "EditSite",
           "Editor", "ImMaps", "LM_INPUT", "RecordScores", "RestoreError", "SplitForward", "TrainConfig",
           "TrainResult", "VeadConfig", "VisEditEditor", "WorldSameObject", "count_parameters",
           "edited_object_in_m_loc", "evaluate_edits", "im_maps", "train", "weights_config", "weights_metadata",
           "weights_placement"]
