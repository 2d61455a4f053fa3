"""VEAD + IM: the paper's parameter counts at full size (meta device), shapes, masking, broadcasting."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from attrib.backbones.reference import build_on_meta
from attrib.backbones.spec import get_spec
from editing.adapter.hook import AdapterHook
from editing.adapter.scene_gate import SceneGate, salient_chamfer
from editing.adapter.vead import EditAdapter, EditSignal, VeadConfig, count_parameters, lm_width

# The paper: 34.65 M per adapter on the 7B backbones, 22.05 M on BLIP2-OPT-2.7B. Exact values pin the
# composition (biased Linears, LayerNorms with bias, IM hidden 1024); see editing/vead.py.
PAPER = {"llava": (34.65e6, 34_654_208), "minigpt4": (34.65e6, 34_654_208), "blip2": (22.05e6, 22_054_400)}
OFFICIAL_EDIT_LAYER = {"llava": 18, "minigpt4": 17, "blip2": 19}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_parameter_count_matches_paper_on_full_size_architecture(name):
    model = build_on_meta(name)
    with torch.device("meta"):
        adapter = EditAdapter(lm_width(model.config))
    paper, exact = PAPER[name]
    n = count_parameters(adapter)
    assert abs(n - paper) <= 0.005 * paper
    assert n == exact
    # It installs at the official edit layer of the real architecture (module paths of the real size).
    hook = AdapterHook(model, get_spec(name), adapter, OFFICIAL_EDIT_LAYER[name])
    assert hook.site == f"{get_spec(name).layer_path(OFFICIAL_EDIT_LAYER[name])} (output)"
    assert hook.n_visual == (576 if name == "llava" else 32)
    hook.remove()


def _signal(batch: int, length: int, width: int, pad: int = 0, seed: int = 0) -> EditSignal:
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, length, width, generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[:, :pad] = False
    return EditSignal(states, mask, torch.randn(batch, width, generator=g), torch.full((batch,), length - 2))


def test_shapes_and_gate():
    adapter = EditAdapter(32, VeadConfig(mid_dim=16, n_heads=4, im_hidden=8, im_heads=4))
    visual = torch.randn(3, 5, 32)  # [B, P, d]
    out = adapter(visual, _signal(3, 7, 32))
    assert out.visual.shape == (3, 5, 32) and out.gate_logits.shape == (3, 5)
    # The gate scales VEAD's change token by token: a closed gate leaves the states unchanged.
    adapter.im.forward = lambda v, *_: torch.full(v.shape[:2], -1e4)
    assert torch.equal(adapter(visual, _signal(3, 7, 32)).visual, visual)


def test_padding_of_the_edit_sample_is_masked():
    torch.manual_seed(0)
    adapter = EditAdapter(32, VeadConfig(mid_dim=16, n_heads=2, im_hidden=16, im_heads=2))
    visual = torch.randn(1, 4, 32)
    clean = _signal(1, 6, 32)
    padded = EditSignal(torch.cat([torch.randn(1, 3, 32) * 100, clean.states], 1),
                        torch.cat([torch.zeros(1, 3, dtype=torch.bool), clean.mask], 1), clean.query,
                        clean.prompt_end + 3)
    torch.testing.assert_close(adapter(visual, padded).visual, adapter(visual, clean).visual)


def test_single_edit_broadcasts_over_the_batch():
    adapter = EditAdapter(32, VeadConfig(mid_dim=16, n_heads=2, im_hidden=16, im_heads=2))
    visual = torch.randn(3, 4, 32)
    signal = _signal(1, 6, 32)
    batched = adapter(visual, signal).visual
    for row in range(3):
        torch.testing.assert_close(batched[row:row + 1], adapter(visual[row:row + 1], signal).visual)
    with pytest.raises(ValueError, match="2 edits but the input batch has 3 rows"):
        adapter(visual, _signal(2, 6, 32))


def test_prepared_edit_equals_recomputing_it_and_goes_stale_with_the_weights():
    torch.manual_seed(0)
    adapter = EditAdapter(32, VeadConfig(mid_dim=16, n_heads=2, im_hidden=16, im_heads=2))
    visual, signal = torch.randn(3, 4, 32), _signal(1, 6, 32, pad=2)
    prepared = adapter.prepare(signal)
    assert prepared.cache is not None and signal.cache is None
    with torch.no_grad():
        torch.testing.assert_close(adapter(visual, prepared).visual, adapter(visual, signal).visual,
                                   rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(adapter(visual, prepared).gate_logits, adapter(visual, signal).gate_logits,
                                   rtol=1e-6, atol=1e-6)
        adapter.vead.v.weight.add_(1.0)  # weights changed in place: the cache no longer applies
        fresh = adapter(visual, signal).visual
        assert torch.equal(adapter(visual, prepared).visual, fresh)
    # With gradients on, the edit side is recomputed so its weights get gradients.
    adapter(visual, adapter.prepare(signal)).visual.sum().backward()
    assert adapter.vead.k.weight.grad is not None and adapter.im.map_edit.up.weight.grad is not None


def test_fp32_adapter_on_fp16_states_keeps_the_input_dtype():
    adapter = EditAdapter(32, VeadConfig(mid_dim=16, n_heads=2, im_hidden=16, im_heads=2))
    out = adapter(torch.randn(2, 4, 32).half(), _signal(1, 6, 32))
    assert out.visual.dtype == torch.float16 and adapter.vead.begin.weight.dtype == torch.float32


def test_bad_head_split_is_refused():
    with pytest.raises(ValueError, match="mid_dim 10 is not divisible by n_heads 4"):
        EditAdapter(32, VeadConfig(mid_dim=10, n_heads=4))
    with pytest.raises(ValueError, match="LM width 30 is not divisible"):
        EditAdapter(30, VeadConfig(mid_dim=16, n_heads=2))


def test_scene_gate_scales_the_edit_of_each_input_by_its_match_to_the_edit_image():
    torch.manual_seed(0)
    config = VeadConfig(mid_dim=16, n_heads=2, im_hidden=16, im_heads=2, scene_gate=True, scene_similarity="chamfer")
    adapter = EditAdapter(32, config)
    assert count_parameters(adapter) == count_parameters(EditAdapter(32, replace(config, scene_gate=False))) + 2
    signal = _signal(1, 7, 32)
    signal = replace(signal, visual=torch.tensor([[1, 2, 3, 4]]))
    own = signal.states[:, 1:5]  # the edit image itself, and an unrelated one
    visual = torch.cat([own, torch.randn(1, 4, 32)])
    out = adapter(visual, signal)
    assert out.scene_logits.shape == (2,) and out.scene_logits[0] > out.scene_logits[1]
    # Without the scene gate the change is the IM-gated VEAD output; the scene gate multiplies it per input.
    plain = EditAdapter(32, replace(config, scene_gate=False))
    plain.load_state_dict({k: v for k, v in adapter.state_dict().items() if not k.startswith("scene.")})
    expected = (plain(visual, signal).visual - visual) * torch.sigmoid(out.scene_logits)[:, None, None]
    torch.testing.assert_close(out.visual - visual, expected)
    with torch.no_grad():  # a threshold above any similarity shuts the gate: the input is left as it was
        adapter.scene.threshold.fill_(1e3)
    torch.testing.assert_close(adapter(visual, signal).visual, visual)
    with pytest.raises(ValueError, match="visual tokens"):
        adapter(visual, _signal(1, 7, 32))  # a signal that does not say where its visual tokens are


def test_configs_saved_before_the_scene_gate_load_without_it():
    old = {"mid_dim": 16, "n_heads": 2, "im_hidden": 16, "im_heads": 2, "dtype": "float32"}
    assert VeadConfig.from_json(old) == VeadConfig(16, 2, 16, 2, scene_similarity="chamfer")
    # a scene-gated file from before the salient similarity was trained on the plain chamfer
    assert VeadConfig.from_json({**old, "scene_gate": True}).scene_similarity == "chamfer"


def test_salient_scene_gate_needs_its_reference_and_keeps_it_with_the_weights():
    torch.manual_seed(0)
    config = VeadConfig(mid_dim=16, n_heads=2, im_hidden=16, im_heads=2, scene_gate=True)
    assert config.scene_similarity == "salient"
    adapter = EditAdapter(32, config)
    signal = replace(_signal(1, 7, 32), visual=torch.tensor([[1, 2, 3, 4]]))
    visual = torch.randn(2, 4, 32)
    with pytest.raises(RuntimeError, match="no reference states"):
        adapter(visual, signal)
    reference = torch.randn(4, 32)
    adapter.scene.set_reference(reference)
    out = adapter(visual, signal)
    edit_image = signal.visual_states().expand(2, -1, -1)
    similarity = salient_chamfer(visual, edit_image, reference)
    expected = adapter.scene.log_scale.exp() * (similarity - adapter.scene.threshold)
    torch.testing.assert_close(out.scene_logits, expected)
    # The reference travels in the state dict: a fresh adapter loads it, whatever the backbone's token count.
    fresh = EditAdapter(32, config)
    fresh.load_state_dict(adapter.state_dict())
    torch.testing.assert_close(fresh.scene.reference, reference)
    torch.testing.assert_close(fresh(visual, signal).scene_logits, out.scene_logits)
    with pytest.raises(ValueError, match=r"do not match the reference \(4, 32\)"):
        adapter(torch.randn(2, 5, 32), signal)
    # The plain chamfer gate has no reference to save (files from before the salient gate still load).
    plain = EditAdapter(32, replace(config, scene_similarity="chamfer"))
    assert not any("reference" in k for k in plain.state_dict())
    with pytest.raises(ValueError, match="scene_similarity 'cosine' is not one of"):
        EditAdapter(32, replace(config, scene_similarity="cosine"))
    assert SceneGate("salient").threshold.item() == pytest.approx(SceneGate.INIT_THRESHOLD["salient"])


def test_target_mask_marks_the_real_tokens_after_the_prompt():
    signal = _signal(2, 6, 8, pad=1)  # prompt_end = 4: token 5 is the target
    signal = replace(signal, prompt_end=torch.tensor([4, 2]))
    assert signal.target_mask().tolist() == [[False] * 5 + [True], [False] * 3 + [True] * 3]
    signal.mask[1, 5] = False  # padding after the target is not target
    assert signal.target_mask()[1].tolist() == [False] * 3 + [True, True, False]


def test_target_role_marks_the_target_tokens_keys_and_values_only():
    torch.manual_seed(0)
    config = VeadConfig(mid_dim=16, n_heads=2, im_hidden=16, im_heads=2, target_role=True)
    adapter = EditAdapter(32, config)
    plain = EditAdapter(32, replace(config, target_role=False))
    assert count_parameters(adapter) == count_parameters(plain) + 32
    plain.load_state_dict({k: v for k, v in adapter.state_dict().items() if k != "vead.target_role"})
    signal = _signal(1, 7, 32)
    target = signal.target_mask()
    assert target[0].tolist() == [False] * 6 + [True]
    k, v = adapter.vead.keys_values(signal.states, target)
    k0, v0 = plain.vead.keys_values(signal.states)
    # Prompt and image tokens are keyed as in the paper's VEAD; the target token is moved by the role vector.
    torch.testing.assert_close(k[:, :6], k0[:, :6])
    torch.testing.assert_close(v[:, :6], v0[:, :6])
    role = adapter.vead.target_role
    expected = adapter.vead.k(adapter.vead.norm_edit(signal.states[:, 6]) + role).view(1, 2, -1)
    torch.testing.assert_close(k[:, 6], expected)
    # The forward marks them itself, and a prepared (cached) edit gives the same output.
    visual = torch.randn(2, 4, 32)
    out = adapter(visual, signal).visual
    with torch.no_grad():
        torch.testing.assert_close(adapter(visual, adapter.prepare(signal)).visual, out)
    assert not torch.allclose(out, plain(visual, signal).visual)
    with pytest.raises(ValueError, match="target mask"):
        adapter.vead.keys_values(signal.states)
    # The role vector is re-drawn with the adapter and saved with the weights; files without it load as before.
    assert VeadConfig.from_json(plain.config.to_json() | {"target_role": True}).target_role
    assert not VeadConfig.from_json({k: v for k, v in config.to_json().items() if k != "target_role"}).target_role
    fresh = EditAdapter(32, config)
    assert not torch.equal(fresh.vead.target_role, role)
    fresh.load_state_dict(adapter.state_dict())
    torch.testing.assert_close(fresh(visual, signal).visual, out)
