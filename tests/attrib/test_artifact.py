"""Reading an attribution artifact back: the JSON and the tensors checked against each other, every
mismatch an ArtifactError naming the file and the field or tensor; fuzzed JSON and tensor files."""
from __future__ import annotations

import itertools
import json
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from attrib.artifact import check_placement, load_artifact
from attrib.attribution import ARTIFACT_JSON, ARTIFACT_TENSORS, AttributionConfig, run_attribution
from attrib.backbones.loader import load_backbone
from attrib.data import load_records
from attrib.errors import ArtifactError
from attrib.io import REPOSITORY
from attrib.world import write_world
from tests.mutations import damaged_bytes, json_mutations, valid_or_clean_error


@pytest.fixture(scope="module")
def saved(tiny_dirs, tmp_path_factory):
    """(folder, JSON, tensors) of one real artifact: tiny LLaVA, two records, every region method."""
    world = write_world(tmp_path_factory.mktemp("w") / "world", seed=3, n_train=1, n_eval=2, n_caption_train=1,
                        n_caption_eval=1)
    backbone = load_backbone("llava", tiny_dirs["llava"])
    config = AttributionConfig(draws=1, causal_samples=1, causal_draws=1, window=1, ceiling_samples=0)
    folder = run_attribution(backbone, load_records(world / "vqa_eval.json"), config, progress=False).save(
        tmp_path_factory.mktemp("artifact"))
    return folder, json.loads((folder / ARTIFACT_JSON).read_text()), load_file(folder / ARTIFACT_TENSORS)


_fresh = itertools.count()


def _write(tmp_path, data, tensors=None, raw: bytes | None = None):
    """A new artifact folder with ``data`` as its JSON and ``tensors`` (or ``raw`` bytes) as its tensors."""
    folder = tmp_path / f"a{next(_fresh)}"
    folder.mkdir()
    (folder / ARTIFACT_JSON).write_text(json.dumps(data))
    if raw is not None:
        (folder / ARTIFACT_TENSORS).write_bytes(raw)
    else:
        save_file({k: v.clone().contiguous() for k, v in tensors.items()}, folder / ARTIFACT_TENSORS)
    return folder


def _consistent(artifact) -> None:
    """What a caller may rely on once an artifact has loaded."""
    n, layers = artifact.n_samples, artifact.n_layers
    assert artifact.contribution.attn.shape == (n, layers) and artifact.contribution.logit.shape == (n,)
    rows, cols = artifact.grid
    assert artifact.regions[artifact.primary].shape == (n, len(artifact.layers), rows * cols)
    assert all(torch.isfinite(maps).all() for maps in artifact.regions.values())
    assert artifact.placement["edit_layer"] < layers


def test_a_saved_artifact_loads_from_its_folder_or_either_file(saved):
    folder, data, _ = saved
    artifact = load_artifact(folder)
    assert (artifact.backbone, artifact.n_samples, artifact.n_layers) == ("llava", 2, 2)
    assert artifact.primary == data["regions"]["method"] == "attention_noise"
    assert set(artifact.regions) == set(data["details"]["methods"])
    assert artifact.contribution.mean() == data["contribution"]
    assert artifact.placement["edit_layer"] == data["placement"]["edit_layer"]
    _consistent(artifact)
    for path in (folder / ARTIFACT_JSON, folder / ARTIFACT_TENSORS):
        assert load_artifact(path).data == data


def _with(data, dotted: str, value):
    out = json.loads(json.dumps(data))
    node = out
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return out


def test_json_and_tensors_that_disagree_are_named(saved, tmp_path):
    _, data, tensors = saved
    nan_maps = tensors["regions.attention_knockout"].clone()
    nan_maps[0, 0, 0] = float("nan")
    t = tensors
    cases = [
        (_with(data, "n_samples", 3), t, r"tensor 'contribution.key_tokens' has shape \[2\]; the JSON states \[3\]"),
        (_with(data, "regions.grid", [2, 4]), t,
         r"tensor 'regions.attention_noise' has shape \[2, 2, 16\]; the JSON states \[2, 2, 8\]"),
        (_with(data, "regions.layers", [1]), t, r"'regions.attention_noise' has shape \[2, 2, 16\]; "
                                                r"the JSON states \[2, 1, 16\]"),
        (_with(data, "contribution.attn", [0.1, 0.2, 0.3]), t, r"field 'contribution.mlp': 2 values, expected 3"),
        (_with(data, "contribution.attn", [5.0, 5.0]), t, r"'contribution.attn': layer \d states 5, .* different runs"),
        (_with(data, "placement.edit_layer", 2), t, r"in 'placement', field 'edit_layer': item 0 is 2, outside -1..1"),
        (_with(data, "placement.it_layers", [0, "1"]), t, r"field 'it_layers': item 1 is '1', expected a whole"),
        (_with(data, "regions.method", "nope"), t, r"field 'regions.method': 'nope' is not among details.methods"),
        ({k: v for k, v in data.items() if k != "model"}, t, r"attribution.json: missing field 'model'"),
        (data, {k: v for k, v in t.items() if k != "regions.causal_noise"}, r"missing 'regions.causal_noise'"),
        (data, {**t, "regions.extra": t["regions.causal_noise"]}, r"unexpected 'regions.extra'"),
        (data, {**t, "regions.attention_knockout": nan_maps}, r"'regions.attention_knockout': 1 of 64 values are NaN"),
        (data, {**t, "contribution.key_tokens": t["contribution.key_tokens"].float()},
         r"'contribution.key_tokens': expected token ids"),
        (data, {**t, "regions.causal_noise": torch.zeros(5, 1, 16)}, r"'regions.causal_noise' has shape \[5, 1, 16\]"),
    ]
    for bad_json, bad_tensors, message in cases:
        folder = _write(tmp_path, bad_json, bad_tensors)
        with pytest.raises(ArtifactError, match=message) as caught:
            load_artifact(folder)
        assert str(folder) in str(caught.value) and "\n" not in str(caught.value)


def test_missing_truncated_and_foreign_files_are_named(saved, tmp_path):
    folder, data, tensors = saved
    with pytest.raises(ArtifactError, match=r"attribution.json: file not found; expected a VisEdit attribution"):
        load_artifact(tmp_path)
    raw = (folder / ARTIFACT_TENSORS).read_bytes()
    bad = _write(tmp_path, data, raw=raw[:len(raw) // 2])
    with pytest.raises(ArtifactError, match=r"attribution.safetensors: not a readable attribution tensor file"):
        load_artifact(bad)
    (bad / ARTIFACT_TENSORS).unlink()
    with pytest.raises(ArtifactError, match=r"attribution.safetensors: file not found"):
        load_artifact(bad)
    (bad / ARTIFACT_JSON).write_text("[1, 2]")
    with pytest.raises(ArtifactError, match=r"attribution.json: expected an object, found a list"):
        load_artifact(bad)


def test_check_placement_names_the_field():
    assert check_placement({"edit_layer": -1, "it_layers": [0, 1]}, "f")["im_read_layer"] is None
    with pytest.raises(ArtifactError, match=r"^f, field 'ceiling': 2 values, expected 3$"):
        check_placement({"edit_layer": 0, "it_layers": [], "ceiling": [1.0, 0.5]}, "f", n_layers=2)
    with pytest.raises(ArtifactError, match=r"^f, field 'edit_layer': expected a whole number, found a boolean$"):
        check_placement({"edit_layer": True, "it_layers": []}, "f")


@given(data=st.data())
def test_fuzz_json_fields(saved, tmp_path, data):
    _, document, tensors = saved
    folder = _write(tmp_path, data.draw(json_mutations(document)), tensors)
    artifact, _ = valid_or_clean_error(lambda: load_artifact(folder), folder)
    if artifact is not None:
        _consistent(artifact)
    shutil.rmtree(folder)


def _tensor_damage(tensors: dict, draw) -> dict:
    """One tensor dropped, added, reshaped, retyped or given a NaN."""
    name = draw(st.sampled_from(sorted(tensors)))
    out = dict(tensors)
    action = draw(st.sampled_from(["drop", "add", "reshape", "retype", "nan"]))
    if action == "drop":
        del out[name]
    elif action == "add":
        out[f"regions.{draw(st.text('abc_', min_size=1, max_size=4))}"] = torch.rand(2, 2, 16)
    elif action == "reshape":
        out[name] = torch.rand(tuple(draw(st.lists(st.integers(0, 5), max_size=4))))
    elif action == "retype":
        out[name] = tensors[name].to(draw(st.sampled_from([torch.int32, torch.float16, torch.bool, torch.uint8])))
    elif tensors[name].is_floating_point() and tensors[name].numel():
        out[name] = tensors[name].clone().flatten().index_fill(0, torch.tensor([0]), float("inf")).reshape(
            tensors[name].shape)
    return out


@given(data=st.data())
def test_fuzz_tensor_files(saved, tmp_path, data):
    folder, document, tensors = saved
    if data.draw(st.booleans()):
        bad = _write(tmp_path, document, raw=data.draw(damaged_bytes((folder / ARTIFACT_TENSORS).read_bytes())))
    else:
        bad = _write(tmp_path, document, _tensor_damage(tensors, data.draw))
    artifact, _ = valid_or_clean_error(lambda: load_artifact(bad), bad)
    if artifact is not None:
        _consistent(artifact)
    shutil.rmtree(bad)


@pytest.mark.parametrize("backbone", ["llava", "blip2", "minigpt4"])
def test_the_committed_artifacts_pass_the_checks(backbone):
    artifact = load_artifact(REPOSITORY / "figures" / backbone)
    assert artifact.backbone == backbone and artifact.n_samples == 24
    _consistent(artifact)
