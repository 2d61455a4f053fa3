"""Checkpoint files: Adam's state and the torch RNG round-trip; the state JSON is the commit point; a malformed
checkpoint is refused naming file and field, with nothing restored (fuzzed too)."""
from __future__ import annotations

import itertools
import json
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from attrib.errors import ArtifactError
from editing.adapter.vead import VeadConfig
from editing.adapter.visedit import VisEditEditor
from editing.training.checkpoint import STATE_FILE, load_checkpoint, read_state, save_checkpoint
from tests.mutations import damaged_bytes, json_mutations, valid_or_clean_error


def test_round_trip(llava, make_editor, tmp_path):
    editor = make_editor(llava, 0)
    optimizer = torch.optim.Adam(editor.adapter.parameters(), lr=0.01)
    sum(p.square().sum() for p in editor.adapter.parameters()).backward()
    optimizer.step()
    rng = torch.get_rng_state()
    save_checkpoint(tmp_path, editor, optimizer, 1, {"config": {"lr": 0.01}})
    save_checkpoint(tmp_path, editor, optimizer, 2, {"config": {"lr": 0.01}})
    (tmp_path / f".{STATE_FILE}.tmp").write_text("{half a write")  # a kill mid-save leaves this behind
    assert read_state(tmp_path)["step"] == 2 and not (tmp_path / "adapter-step0000001.safetensors").exists()

    other = make_editor(llava, 0)
    fresh = torch.optim.Adam(other.adapter.parameters(), lr=0.5)
    torch.rand(3)  # move the global RNG on
    state = load_checkpoint(tmp_path, other, fresh)
    assert state["config"] == {"lr": 0.01} and torch.equal(torch.get_rng_state(), rng)
    for a, b in zip(editor.adapter.state_dict().values(), other.adapter.state_dict().values()):
        assert torch.equal(a, b)
    mine, theirs = optimizer.state_dict(), fresh.state_dict()
    assert theirs["param_groups"][0]["lr"] == 0.01
    for index, slots in mine["state"].items():
        for name, value in slots.items():
            assert torch.equal(value, theirs["state"][index][name])


def test_missing_state(llava, make_editor, tmp_path):
    editor = make_editor(llava, 0)
    assert read_state(tmp_path) is None
    with pytest.raises(ArtifactError, match="train_state.json: no training state to resume from"):
        load_checkpoint(tmp_path, editor, torch.optim.Adam(editor.adapter.parameters()))


@pytest.fixture(scope="module")
def saved(llava, tmp_path_factory):
    """(editor, its Adam after one step, the checkpoint folder of that step); the editor is removed after."""
    editor = VisEditEditor(llava, 0, VeadConfig(mid_dim=16, n_heads=2, im_hidden=16, im_heads=2))
    optimizer = torch.optim.Adam(editor.adapter.parameters(), lr=0.01)
    sum(p.square().sum() for p in editor.adapter.parameters()).backward()
    optimizer.step()
    folder = tmp_path_factory.mktemp("checkpoint")
    save_checkpoint(folder, editor, optimizer, 3, {"config": {"lr": 0.01}, "train_s": 1.5})
    yield editor, optimizer, folder
    editor.remove()


_fresh = itertools.count()


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / f"c{next(_fresh)}")


def _snapshot(editor, optimizer) -> list[torch.Tensor]:
    """Everything a load could change: adapter weights, Adam's tensors and hyperparameters, the torch RNG."""
    state = optimizer.state_dict()
    moments = [v.clone() for slots in state["state"].values() for v in slots.values()]
    groups = [torch.tensor([g["lr"], *g["betas"], g["eps"]]) for g in state["param_groups"]]
    return [v.clone() for v in editor.adapter.state_dict().values()] + moments + groups + [torch.get_rng_state()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def _edit_state(folder, change) -> None:
    path = folder / STATE_FILE
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))


def test_malformed_checkpoints_are_named_and_nothing_is_restored(saved, tmp_path):
    editor, optimizer, folder = saved
    state = json.loads((folder / STATE_FILE).read_text())
    moments = folder / state["optimizer"]["file"]
    tensors = load_file(moments)

    def set_key(*keys, value):
        def change(data):
            node = data
            for key in keys[:-1]:
                node = node[key]
            node[keys[-1]] = value
        return change

    def retensor(key, value):
        def change(copy):
            save_file({**{k: v.clone() for k, v in tensors.items()}, key: value}, copy / moments.name)
        return change

    cases = [
        (lambda c: (c / STATE_FILE).write_text("{"), r"train_state.json: not valid JSON"),
        (lambda c: _edit_state(c, set_key("format", value="x/1")), r"not a VisEdit training state .format 'x/1'"),
        (lambda c: _edit_state(c, set_key("step", value="3")), r"field 'step': expected a whole number, found a str"),
        (lambda c: _edit_state(c, set_key("step", value=-1)), r"field 'step': -1; expected a step number"),
        (lambda c: _edit_state(c, set_key("config", value=[1])), r"field 'config': expected an object, found a list"),
        (lambda c: _edit_state(c, set_key("weights", value="../adapter.safetensors")),
         r"field 'weights': '../adapter.safetensors' is not a file name in the checkpoint folder"),
        (lambda c: (c / state["weights"]).unlink(), r"field 'weights': .*adapter-step0000003.safetensors is missing"),
        (lambda c: (c / moments.name).unlink(), r"in 'optimizer', field 'file': .* is missing"),
        (lambda c: (c / moments.name).write_bytes(moments.read_bytes()[:100]), r"not a readable optimizer state file"),
        (lambda c: _edit_state(c, set_key("optimizer", "param_groups", value=[])),
         r"field 'param_groups': 0 param groups; the optimizer has 1"),
        (lambda c: _edit_state(c, set_key("optimizer", "param_groups", 0, "lr", value="fast")),
         r"param group 0, field 'lr': 'fast' does not fit the optimizer's 0.01"),
        (lambda c: _edit_state(c, set_key("optimizer", "param_groups", 0, "betas", value=[0.9])),
         r"param group 0, field 'betas'"),
        (lambda c: _edit_state(c, set_key("optimizer", "param_groups", 0, "params", value=[0, 1])),
         r"param group 0, field 'params': \[0, 1\] is not the optimizer's"),
        (retensor("0.exp_avg", torch.zeros(3)), r"tensor '0.exp_avg' has shape \[3\]; parameter 0 needs \[32\]"),
        (retensor("99.exp_avg", torch.zeros(3)), r"tensor '99.exp_avg' is not '<parameter index>.<slot>'"),
        (retensor("1.exp_avg_sq", tensors["1.exp_avg_sq"] * float("nan")), r"tensor '1.exp_avg_sq': .* NaN"),
        (lambda c: _edit_state(c, set_key("rng", "torch", value="!!")), r"in 'rng', field 'torch': not a torch RNG"),
        (lambda c: _edit_state(c, set_key("rng", "torch", value="AAAA")), r"not a torch RNG state .3 bytes"),
        (lambda c: save_file({}, c / state["weights"], metadata={"format": "visedit-adapter/1"}),
         r"adapter weights lack metadata"),
    ]
    before = _snapshot(editor, optimizer)
    for damage, message in cases:
        copy = _copy(folder, tmp_path)
        damage(copy)
        with pytest.raises(ArtifactError, match=message) as caught:
            read_state(copy)
            load_checkpoint(copy, editor, optimizer)
        assert str(copy) in str(caught.value) and "\n" not in str(caught.value)
        assert _same(_snapshot(editor, optimizer), before)


def _damage(folder, state: dict, draw) -> None:
    """One of: a JSON value of the state mutated, a file it names removed or cut short / bit-flipped, an
    optimizer tensor reshaped."""
    kind = draw(st.sampled_from(["json", "remove", "bytes", "reshape"]))
    files = [state["weights"], state["optimizer"]["file"]]
    if kind == "json":
        (folder / STATE_FILE).write_text(json.dumps(draw(json_mutations(state))))
    elif kind == "remove":
        (folder / draw(st.sampled_from([STATE_FILE, *files]))).unlink()
    elif kind == "bytes":
        path = folder / draw(st.sampled_from(files))
        path.write_bytes(draw(damaged_bytes(path.read_bytes())))
    else:
        path = folder / state["optimizer"]["file"]
        tensors = load_file(path)
        key = draw(st.sampled_from(sorted(tensors)))
        tensors[key] = torch.zeros(tuple(draw(st.lists(st.integers(0, 33), max_size=2))))
        save_file(tensors, path)


@given(data=st.data())
def test_fuzz_training_state(saved, tmp_path, data):
    editor, optimizer, folder = saved
    state = json.loads((folder / STATE_FILE).read_text())
    copy = _copy(folder, tmp_path)
    _damage(copy, state, data.draw)
    rng = torch.get_rng_state()
    before = _snapshot(editor, optimizer)

    def resume():
        found = read_state(copy)
        return found if found is None else load_checkpoint(copy, editor, optimizer)

    loaded, error = valid_or_clean_error(resume, copy)
    if error is not None:
        assert _same(_snapshot(editor, optimizer), before)
    elif loaded is not None:
        assert isinstance(loaded["step"], int) and optimizer.state_dict()["state"]
    torch.set_rng_state(rng)
    shutil.rmtree(copy)
