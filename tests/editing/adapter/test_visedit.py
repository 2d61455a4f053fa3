"""The editor: edit signal contents, edit → restore, early stop, IM read layer, weights, placement checks."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from attrib.errors import ArtifactError
from editing.adapter.vead import VeadConfig
from editing.adapter.visedit import EditPlacement, VisEditEditor, weights_placement
from editing.editor import EditRequest
from editing.inputs import teacher_forced_batch
from tests.mutations import damaged_bytes, json_mutations, valid_or_clean_error

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
    with pytest.raises(ArtifactError, match="other.safetensors: not a readable VisEdit adapter weights file"):
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
    with pytest.raises(ArtifactError, match="made for backbone 'other'"):
        EditPlacement.from_artifact(path, tiny_backbone)
    path.write_text(json.dumps(dict(artifact, model={"path": "x", "fingerprint": "0123"})))
    with pytest.raises(ArtifactError, match="model fingerprint '0123'"):
        EditPlacement.from_artifact(path, tiny_backbone)


def test_placement_from_a_malformed_artifact_names_the_field(llava, tmp_path):
    good = {"backbone": "llava", "model": {"path": "m", "fingerprint": llava.fingerprint()},
            "placement": {"edit_layer": 0, "it_layers": [1]}}
    path = tmp_path / "attribution.json"
    cases = [
        ({**good, "placement": {"edit_layer": "0", "it_layers": [1]}},
         r"attribution.json, in 'placement', field 'edit_layer': expected a whole number, found a string"),
        ({**good, "placement": {"edit_layer": 5, "it_layers": [1]}},
         r"in 'placement', field 'edit_layer': item 0 is 5, outside -1..1"),
        ({**good, "placement": {"edit_layer": 0, "it_layers": [1, None]}},
         r"in 'placement', field 'it_layers': item 1 is None, expected a whole number"),
        ({**good, "placement": {"edit_layer": 0}}, r"in 'placement': missing field 'it_layers'"),
        ({**good, "model": "m"}, r"attribution.json, field 'model': expected an object, found a string"),
        ({k: v for k, v in good.items() if k != "backbone"}, r"attribution.json: missing field 'backbone'"),
        ([good], r"attribution.json: expected an object, found a list"),
    ]
    for data, message in cases:
        path.write_text(json.dumps(data))
        with pytest.raises(ArtifactError, match=message):
            EditPlacement.from_artifact(tmp_path, llava)
    path.write_text("{")
    with pytest.raises(ArtifactError, match=r"attribution.json: not valid JSON .*VisEdit attribution artifact"):
        EditPlacement.from_artifact(path, llava)
    path.unlink()
    with pytest.raises(ArtifactError, match=r"attribution.json: file not found"):
        EditPlacement.from_artifact(tmp_path, llava)


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


# -- weights files that do not fit, and fuzzing ---------------------------------------------------------------

def _state(editor) -> dict:
    return {k: v.clone() for k, v in editor.adapter.state_dict().items()}


def _unchanged(editor, before: dict) -> bool:
    return all(torch.equal(v, before[k]) for k, v in editor.adapter.state_dict().items())


@pytest.fixture
def saved_weights(llava, make_editor, tmp_path):
    """(editor at layer 0, its weights file, the file's tensors and metadata)."""
    editor = make_editor(llava, 0, config=VeadConfig(mid_dim=16, n_heads=2, im_hidden=16, im_heads=2, scene_gate=True))
    editor.adapter.scene.set_reference(torch.randn(5, editor.adapter.width))
    path = editor.save_weights(tmp_path / "adapter.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    return editor, path, load_file(path), metadata


def test_weight_files_that_do_not_fit_are_named_and_nothing_is_loaded(saved_weights, tmp_path):
    editor, path, tensors, metadata = saved_weights
    before = _state(editor)
    begin = tensors["vead.begin.weight"]
    without = lambda key: {k: v for k, v in metadata.items() if k != key}
    config = json.loads(metadata["config"])
    cases = [
        (path.read_bytes()[:200], None, "not a readable VisEdit adapter weights file"),
        (b"not safetensors at all", None, "not a readable VisEdit adapter weights file"),
        (tensors, without("placement"), "adapter weights lack metadata 'placement'"),
        (tensors, {**metadata, "format": "other/1"}, "not a VisEdit adapter file .format 'other/1'"),
        (tensors, {**metadata, "config": "{"}, "metadata 'config' is not JSON"),
        (tensors, {**metadata, "config": "[" * 100_000}, "metadata 'config' is not JSON that can be read"),
        (tensors, {**metadata, "placement": "9" * 5000}, "metadata 'placement' is not JSON that can be read"),
        (tensors, {**metadata, "config": json.dumps({**config, "mid_dim": "16"})},
         "metadata 'config', field 'mid_dim': expected a whole number, found a string"),
        (tensors, {**metadata, "config": json.dumps({**config, "n_heads": 0})}, r"sizes must be positive"),
        (tensors, {**metadata, "config": json.dumps({**config, "n_heads": 3})}, "mid_dim 16 is not divisible"),
        (tensors, {**metadata, "config": json.dumps({**config, "extra": 1})}, "unknown field.s. 'extra'"),
        (tensors, {**metadata, "width": "-3"}, "metadata 'width' is '-3'"),
        (tensors, {**metadata, "placement": '{"edit_layer": "0"}'}, "metadata 'placement', field 'edit_layer'"),
        (tensors, {**metadata, "backbone": "blip2"}, "do not fit this editor .backbone: file has 'blip2'"),
        ({**tensors, "vead.begin.weight": begin[:, :-1]}, metadata,
         r"tensor 'vead.begin.weight' has shape \[16, 31\], this editor's adapter weights need \[16, 32\]"),
        ({k: v for k, v in tensors.items() if k != "im.map_edit.up.bias"}, metadata, "missing 'im.map_edit.up.bias'"),
        ({**tensors, "vead.extra": begin}, metadata, "unexpected 'vead.extra'"),
        ({**tensors, "vead.begin.weight": begin.long()}, metadata, "'vead.begin.weight' is torch.int64"),
        ({**tensors, "vead.begin.weight": begin * float("inf")}, metadata, "'vead.begin.weight': .* NaN or infinite"),
        ({**tensors, "scene.reference": torch.zeros(5, 7)}, metadata, r"'scene.reference' has shape \[5, 7\]"),
    ]
    for data, meta, message in cases:
        bad = tmp_path / "bad.safetensors"
        if isinstance(data, bytes):
            bad.write_bytes(data)
        else:
            save_file({k: v.clone().contiguous() for k, v in data.items()}, bad, metadata=meta)
        with pytest.raises(ArtifactError, match=message) as caught:
            editor.load_weights(bad)
        assert str(bad) in str(caught.value) and "\n" not in str(caught.value)
        assert _unchanged(editor, before)
    editor.load_weights({**tensors, "scene.reference": torch.zeros(9, 32)})  # its length is the file's
    assert editor.adapter.scene.reference.shape == (9, 32)
    with pytest.raises(ArtifactError, match="adapter state dict: does not hold"):
        editor.load_weights({"x": begin})


def _metadata_damage(metadata: dict, draw) -> dict:
    """One metadata entry removed or replaced; the JSON ones may have one value inside them mutated."""
    key = draw(st.sampled_from(sorted(metadata)))
    action = draw(st.sampled_from(["remove", "text", "json"]))
    if action == "remove":
        return {k: v for k, v in metadata.items() if k != key}
    if action == "text" or key not in ("config", "placement"):
        return {**metadata, key: draw(st.text(max_size=12))}
    return {**metadata, key: json.dumps(draw(json_mutations(json.loads(metadata[key]))))}


def _tensor_damage(tensors: dict, draw) -> dict:
    name = draw(st.sampled_from(sorted(tensors)))
    action = draw(st.sampled_from(["drop", "add", "reshape", "retype"]))
    out = dict(tensors)
    if action == "drop":
        del out[name]
    elif action == "add":
        out[name + ".x"] = torch.zeros(1)
    elif action == "reshape":
        out[name] = torch.rand(tuple(draw(st.lists(st.integers(0, 33), max_size=3))))
    else:
        out[name] = tensors[name].to(draw(st.sampled_from([torch.int64, torch.float16, torch.bool])))
    return out


@given(data=st.data())
def test_fuzz_weight_files(saved_weights, tmp_path, data):
    editor, path, tensors, metadata = saved_weights
    bad = tmp_path / "fuzz.safetensors"
    kind = data.draw(st.sampled_from(["bytes", "metadata", "tensors"]))
    if kind == "bytes":
        bad.write_bytes(data.draw(damaged_bytes(path.read_bytes())))
    else:
        meta = _metadata_damage(metadata, data.draw) if kind == "metadata" else metadata
        damaged = _tensor_damage(tensors, data.draw) if kind == "tensors" else tensors
        save_file({k: v.clone().contiguous() for k, v in damaged.items()}, bad, metadata=meta)
    before = _state(editor)
    _, error = valid_or_clean_error(lambda: editor.load_weights(bad), bad)
    if error is not None:
        assert _unchanged(editor, before)
    else:
        assert all(torch.isfinite(v).all() for v in editor.adapter.state_dict().values())
