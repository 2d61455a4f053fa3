"""The editor: edit signal contents, edit → restore, early stop, IM read layer, weights, placement checks."""
from __future__ import annotations

import json

import pytest
import torch

from editing.adapter.vead import VeadConfig
from editing.adapter.visedit import EditPlacement, VisEditEditor, weights_placement
from editing.editor import EditRequest
from editing.inputs import teacher_forced_batch

PROMPT, TARGET = "what color is the circle?", "blue square"


def _request(images, index: int = 0, prompt: str = PROMPT, target: str = TARGET) -> EditRequest:
    return EditRequest(images[index], prompt, target)


def _layer_outputs(backbone, inputs) -> dict[int, torch.Tensor]:
    """Every decoder layer's output (and -1: layer 0's input) from one plain forward."""
    seen, handles = {}, []
    layers = backbone.module(backbone.spec.layers)
    handles.append(layers[0].register_forward_pre_hook(lambda m, args: seen.__setitem__(-1, args[0])))
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)))
    with torch.no_grad():
        backbone.forward(inputs)
    for handle in handles:
        handle.remove()
    return seen


def test_edit_then_restore_gives_bit_identical_logits(tiny_backbone, tiny_images, make_editor):
    editor = make_editor(tiny_backbone, 0)
    inputs = tiny_backbone.encode(tiny_images, [PROMPT, "how many objects are there?"])
    with torch.no_grad():
        plain = tiny_backbone.forward(inputs).logits
        editor.edit(_request(tiny_images))
        assert editor.is_edited
        assert not torch.equal(tiny_backbone.forward(inputs).logits, plain)
        editor.restore()
        assert not editor.is_edited
        assert torch.equal(tiny_backbone.forward(inputs).logits, plain)


@pytest.mark.parametrize("edit_layer, read_layer", [(-1, 1), (0, None), (1, 0)])
def test_edit_signal_holds_the_edit_sample_states(tiny_backbone, tiny_images, make_editor, edit_layer, read_layer):
    editor = make_editor(tiny_backbone, EditPlacement(edit_layer, im_read_layer=read_layer))
    signal = editor.edit_signal(_request(tiny_images))
    batch = teacher_forced_batch(tiny_backbone, tiny_images[:1], [PROMPT], [TARGET])
    reference = _layer_outputs(tiny_backbone, batch.inputs)
    assert torch.equal(signal.states, reference[edit_layer])  # all tokens: [1, L, d]
    assert signal.mask.all() and signal.mask.shape == batch.inputs["input_ids"].shape
    end = int(signal.prompt_end[0])
    read = edit_layer if read_layer is None else read_layer
    assert torch.equal(signal.query[0], reference[read][0, end])
    full = tiny_backbone.tokenizer(tiny_backbone.format_prompt(PROMPT) + " " + TARGET).input_ids
    target_ids = full[-batch.target_lengths[0]:]
    assert batch.inputs["input_ids"][0, end + 1:].tolist() == target_ids  # the last prompt token precedes the target


def test_edit_forward_stops_after_the_deepest_layer_it_needs(tiny_backbone, tiny_images, make_editor):
    editor = make_editor(tiny_backbone, EditPlacement(0, im_read_layer=0))
    calls = []
    last = tiny_backbone.module(tiny_backbone.spec.layer_path(tiny_backbone.n_layers - 1))
    handle = last.register_forward_pre_hook(lambda m, args: calls.append(1))
    try:
        editor.edit(_request(tiny_images))
    finally:
        handle.remove()
    assert calls == []


def test_batched_edit_signals_are_left_padded(tiny_backbone, tiny_images, make_editor):
    editor = make_editor(tiny_backbone, 0)
    requests = [_request(tiny_images, 0), _request(tiny_images, 1, "how many objects are there?", "two")]
    signal = editor.edit(requests)
    lengths = [tiny_backbone.encode([r.image], [r.prompt], [r.target])["input_ids"].shape[1] for r in requests]
    assert len(signal) == 2 and signal.mask.sum(1).tolist() == lengths  # padding masked (BLIP-2 pads mid-row)
    inputs = tiny_backbone.encode(tiny_images, [PROMPT, PROMPT])
    with torch.no_grad():
        assert tiny_backbone.forward(inputs).logits.shape[0] == 2  # one edit per input row


def test_weights_round_trip_through_safetensors(tiny_backbone, tiny_images, make_editor, tmp_path):
    editor = make_editor(tiny_backbone, 1)
    path = editor.save_weights(tmp_path / "adapter.safetensors")
    inputs = tiny_backbone.encode(tiny_images[:1], [PROMPT])
    with torch.no_grad():
        editor.edit(_request(tiny_images))
        first = tiny_backbone.forward(inputs).logits
        editor.remove()
        loaded = make_editor(tiny_backbone, 1, config=None, weights=path)  # config read from the file
        assert loaded.config == editor.config
        for name, value in editor.adapter.state_dict().items():
            assert torch.equal(loaded.adapter.state_dict()[name], value)
        loaded.edit(_request(tiny_images))
        assert torch.equal(tiny_backbone.forward(inputs).logits, first)


def test_weights_for_another_placement_or_size_are_refused(tiny_backbone, make_editor, tmp_path):
    path = make_editor(tiny_backbone, 1).save_weights(tmp_path / "adapter.safetensors")
    with pytest.raises(ValueError, match="edit_layer: file has 1, editor has 0"):
        make_editor(tiny_backbone, 0, weights=path)
    with pytest.raises(ValueError, match="im_read_layer: file has 1, editor has 0"):
        make_editor(tiny_backbone, EditPlacement(1, im_read_layer=0), weights=path)
    assert weights_placement(path) == EditPlacement(1, (), 1)
    with pytest.raises(ValueError, match="config: file has"):
        make_editor(tiny_backbone, 1, config=VeadConfig(mid_dim=8, n_heads=2, im_hidden=16, im_heads=2), weights=path)
    (tmp_path / "other.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot read adapter weights"):
        make_editor(tiny_backbone, 1, weights=tmp_path / "other.safetensors")


def test_placement_from_artifact_checks_backbone_and_fingerprint(tiny_backbone, tmp_path):
    artifact = {"backbone": tiny_backbone.spec.name,
                "model": {"path": str(tiny_backbone.path), "fingerprint": tiny_backbone.fingerprint()},
                "placement": {"edit_layer": 0, "it_layers": [1]}}
    path = tmp_path / "attribution.json"
    path.write_text(json.dumps(artifact))
    assert EditPlacement.from_artifact(tmp_path, tiny_backbone) == EditPlacement(0, (1,))
    # The artifact's own IM read layer is used unless one is given.
    path.write_text(json.dumps(dict(artifact, placement={"edit_layer": -1, "it_layers": [0, 1], "im_read_layer": 1})))
    assert EditPlacement.from_artifact(path, tiny_backbone).read_layer == 1
    assert EditPlacement.from_artifact(path, tiny_backbone, im_read_layer=0).read_layer == 0
    path.write_text(json.dumps(dict(artifact, backbone="other")))
    with pytest.raises(ValueError, match="made for backbone 'other'"):
        EditPlacement.from_artifact(path, tiny_backbone)
    path.write_text(json.dumps(dict(artifact, model={"path": "x", "fingerprint": "0123"})))
    with pytest.raises(ValueError, match="model fingerprint '0123'"):
        EditPlacement.from_artifact(path, tiny_backbone)


def test_placement_coercion_and_range(tiny_backbone):
    from attrib.placement import Placement

    assert EditPlacement.coerce(Placement(1, [2, 3], 0.5, [])) == EditPlacement(1, (2, 3))
    assert EditPlacement.coerce(Placement(-1, [0, 1], 0.5, [], im_read_layer=1)).read_layer == 1
    assert EditPlacement.coerce({"edit_layer": -1, "it_layers": [0]}).read_layer == -1
    with pytest.raises(ValueError, match="edit_layer=2 is outside -1..1"):
        VisEditEditor(tiny_backbone, 2)


def test_gradients_flow_into_the_adapter_through_the_model(tiny_backbone, tiny_images, make_editor):
    editor = make_editor(tiny_backbone, 0)
    editor.edit(_request(tiny_images))
    batch = teacher_forced_batch(tiny_backbone, tiny_images[:1], [PROMPT], [TARGET])
    logits = tiny_backbone.forward(batch.inputs).logits
    loss = torch.nn.functional.cross_entropy(batch.answer_logits(logits, 0), batch.labels(0))
    params = list(editor.adapter.parameters())
    grads = torch.autograd.grad(loss, params)  # .grad of the shared model stays untouched
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert grads[[n for n, _ in editor.adapter.named_parameters()].index("vead.end.weight")].abs().sum() > 0
