"""SERAC: memory + scope classifier + counterfactual copy; the base model is never changed."""
from __future__ import annotations

import pytest
import torch

from attrib.answers import target_token_ids, teacher_forced_hits
from attrib.data import load_records
from attrib.prompts import load_prompts
from editing.editor import EditRequest
from editing.inputs import teacher_forced_batch
from editing.methods import MethodContext, build_method, method_config
from editing.methods.serac_parts import context_prompt

FAST = {"feature_batch": 8, "dev_records": 2, "dev_every": 20, "cls_records": 8, "cls_steps": 40, "cls_batch": 8,
        "cls_lr": 1e-2, "cf_steps": 40, "cf_batch": 2, "cf_lr": 3e-3, "cf_swap_fraction": 0.0,
        "cf_random_fraction": 0.0}


def make(backbone, work=None, **overrides):
    hyper = {**method_config("serac", backbone.spec.name), **FAST, **overrides}
    return build_method("serac", MethodContext(backbone, task="vqa", seed=0, hyper=hyper, work=work))


def base_logits(backbone, images, prompts, targets=None):
    with torch.no_grad():
        return backbone.forward(backbone.encode(images, prompts, targets), use_cache=False).logits


def view_logits(editor, images, prompts, targets=None):
    view = editor.backbone
    with torch.no_grad():
        return view.forward(view.encode(images, prompts, targets), use_cache=False).logits


def hook_count(model) -> int:
    """Forward hooks on the model's modules, less the output-capturing ones transformers installs itself
    on a first forward."""
    hooks = [h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    return sum("output_capturing" not in getattr(h, "__qualname__", "") for h in hooks)


@pytest.fixture(scope="module")
def prepared(tiny_dirs, tiny_world, tmp_path_factory):
    """One prepared editor per family (own backbone copy, so the shared fixture stays untouched),
    its report and the base weights before anything ran."""
    from attrib.backbones.loader import load_backbone
    out = {}
    train = load_records(tiny_world / "vqa_train.json")
    dev = load_records(tiny_world / "vqa_eval.json")
    for name, path in tiny_dirs.items():
        backbone = load_backbone(name, path)
        before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
        before["hooks"] = hook_count(backbone.model)
        work = tmp_path_factory.mktemp(f"serac-{name}")
        editor = make(backbone, work)
        out[name] = (editor, editor.prepare(train, dev), before, work)
    return out


@pytest.fixture
def serac(tiny_backbone, prepared):
    return prepared[tiny_backbone.spec.name]


def test_prepare_reports_both_phases_and_saves_them(serac):
    editor, report, _, work = serac
    assert report["steps"] == {"classifier": 40, "counterfactual": 40}
    assert report["classifier"]["dev_curve"][0]["step"] == 0 and report["counterfactual"]["dev_curve"]
    assert "shortened" in report and report["seconds"] >= 0
    assert (work / "serac_classifier.safetensors").is_file() and (work / "serac_counterfactual.safetensors").is_file()


def test_a_second_prepare_resumes_from_the_saved_weights(serac, tiny_world):
    editor, _, _, work = serac
    again = make(editor.base, work)
    report = again.prepare(load_records(tiny_world / "vqa_train.json"), load_records(tiny_world / "vqa_eval.json"))
    assert report["classifier"]["resumed"] and report["counterfactual"]["resumed"]
    for mine, theirs in zip(editor.classifier.state_dict().values(), again.classifier.state_dict().values()):
        assert torch.equal(mine, theirs)
    for mine, theirs in zip(editor.counterfactual.model.parameters(), again.counterfactual.model.parameters()):
        assert torch.equal(mine, theirs)


def test_after_an_edit_its_prompt_predicts_the_new_target(serac, tiny_world):
    editor, *_ = serac
    record = load_records(tiny_world / "vqa_train.json")[0]
    request = EditRequest.from_record(record)
    editor.edit(request)
    try:
        hits = teacher_forced_hits(editor.backbone, [request.image], [request.prompt], [request.target])[0]
        assert editor.last_scores[0] > editor.hyper["threshold"]
    finally:
        editor.restore()
    assert all(hits)


def test_restore_gives_bit_identical_logits_on_image_and_text_inputs(serac, tiny_world, tiny_images):
    editor, *_ = serac
    record = load_records(tiny_world / "vqa_train.json")[0]
    request = EditRequest.from_record(record)
    image_row = ([request.image], [request.prompt])
    text_row = (None, [load_prompts()["loc"].format(loc=record.loc)])
    before = [base_logits(editor.base, *image_row), base_logits(editor.base, *text_row)]
    editor.edit(request)
    edited = view_logits(editor, *image_row)
    editor.restore()
    assert not torch.equal(edited, before[0])  # routed while the edit was in memory
    assert torch.equal(view_logits(editor, *image_row), before[0])
    assert torch.equal(view_logits(editor, *text_row), before[1])


def test_the_base_model_is_never_changed_and_the_copy_is_separate(serac, tiny_world):
    editor, _, before, _ = serac
    editor.edit(EditRequest.from_record(load_records(tiny_world / "vqa_train.json")[0]))
    editor.restore()
    for key, value in editor.base.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert hook_count(editor.base.model) == hook_count(editor.counterfactual.model) == before["hooks"]
    base = {p.data_ptr() for p in editor.base.model.parameters()}
    assert not base & {p.data_ptr() for p in editor.counterfactual.model.parameters()}
    assert any(not torch.equal(a, b) for a, b in zip(editor.base.model.parameters(),
                                                     editor.counterfactual.model.parameters()))


def test_routed_rows_take_the_counterfactual_answer_logits_and_others_the_base(serac, tiny_world):
    editor, *_ = serac
    record = load_records(tiny_world / "vqa_train.json")[0]
    request = EditRequest.from_record(record)
    fmt = load_prompts()["vqa"]
    images = [request.image, record.load_image("m_loc")]
    prompts = [request.prompt, fmt.format(src=record.rephrase)]
    targets = [request.target, "yes"]
    base = base_logits(editor.base, images, prompts, targets)
    editor.edit(request)
    try:
        editor.hyper["threshold"] = 2.0  # nothing in scope: every row is the base's
        assert torch.equal(view_logits(editor, images, prompts, targets), base)
        editor.hyper["threshold"] = -1.0  # everything in scope: every row reads the edit
        routed = view_logits(editor, images, prompts, targets)
    finally:
        editor.hyper["threshold"] = 0.5
        editor.restore()
    cf_prompts = [context_prompt(editor.hyper["context_format"], request.prompt, request.target, p) for p in prompts]
    cf_batch = teacher_forced_batch(editor.counterfactual, images, cf_prompts, targets)
    with torch.no_grad():
        cf_logits = editor.counterfactual.forward(cf_batch.inputs, use_cache=False).logits
    batch = teacher_forced_batch(editor.base, images, prompts, targets)
    assert batch.target_lengths == cf_batch.target_lengths
    for row in range(2):
        assert torch.equal(batch.labels(row), cf_batch.labels(row))
        torch.testing.assert_close(batch.answer_logits(routed, row), cf_batch.answer_logits(cf_logits, row))


def test_target_token_ids_are_the_same_through_the_view(serac, tiny_world):
    editor, *_ = serac
    record = load_records(tiny_world / "vqa_train.json")[0]
    prompt = load_prompts()["vqa"].format(src=record.src)
    for with_image in (True, False):
        assert (target_token_ids(editor.backbone, prompt, "dark green", with_image)
                == target_token_ids(editor.base, prompt, "dark green", with_image))


def test_an_edited_view_refuses_inputs_it_did_not_encode(serac, tiny_world):
    editor, *_ = serac
    request = EditRequest.from_record(load_records(tiny_world / "vqa_train.json")[0])
    inputs = editor.base.encode([request.image], [request.prompt])
    editor.edit(request)
    try:
        with pytest.raises(ValueError, match="encode"):
            editor.backbone.forward(inputs)
    finally:
        editor.restore()


def test_a_phase_cache_is_written_atomically_and_a_damaged_one_is_named(tmp_path):
    from safetensors.torch import save_file

    from attrib.errors import ArtifactError
    from editing.methods.serac_parts import run_phase

    module, calls = torch.nn.Linear(3, 2), []
    train = lambda: calls.append(1) or {"steps": 5}  # noqa: E731
    assert run_phase(tmp_path, "phase", {"a": 1}, module, ["weight"], train)["steps"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phase.json", "phase.safetensors"]  # no temporary left
    assert run_phase(tmp_path, "phase", {"a": 1}, module, ["weight"], train)["resumed"] and len(calls) == 1
    weights, meta = tmp_path / "phase.safetensors", tmp_path / "phase.json"
    raw, text = weights.read_bytes(), meta.read_text()
    before = module.weight.detach().clone()
    cases = [(lambda: meta.write_text("{"), "phase.json: not valid JSON"),
             (lambda: meta.write_text('{"signature": [1]}'), "phase.json, field 'signature': expected an object"),
             (lambda: meta.write_text('{"signature": {"a": 1}}'), "phase.json: missing field 'report'"),
             (lambda: weights.write_bytes(raw[:20]), "phase.safetensors: not a readable SERAC phase cache"),
             (lambda: save_file({"weight": torch.zeros(2, 4)}, weights), r"'weight' has shape \[2, 4\]"),
             (lambda: save_file({"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}, weights), "unexpected 'bias'"),
             (lambda: save_file({"weight": torch.full((2, 3), float("nan"))}, weights), "NaN or infinite")]
    for damage, message in cases:
        weights.write_bytes(raw)
        meta.write_text(text)
        damage()
        with pytest.raises(ArtifactError, match=message):
            run_phase(tmp_path, "phase", {"a": 1}, module, ["weight"], train)
        assert torch.equal(module.weight, before)
    assert run_phase(tmp_path, "phase", {"a": 2}, module, ["weight"], train)["steps"] == 5 and len(calls) == 2


def test_two_processes_train_what_one_trains(tiny_dirs, tmp_path):
    """SERAC's training as two CPU processes (``accelerate launch``): the classifier's features are computed
    in the same batches, dealt out and gathered, and the counterfactual copy's steps split each batch of 4
    records in two, the gradients summed. Classifier and trained layers equal a one-process run's after 3
    steps. The attention key biases are left out: softmax ignores a shift shared by every key, so their true
    gradient is zero and Adam turns the rounding noise into ±lr moves in any run."""
    from pathlib import Path

    from safetensors.torch import load_file

    from attrib.world import write_world
    from tests.launch import launch, run_alone

    world = write_world(tmp_path / "world", seed=0, n_train=8, n_eval=2, n_caption_train=1, n_caption_eval=1)
    script = str(Path(__file__).with_name("ddp_serac_run.py"))
    args = ["blip2", str(tiny_dirs["blip2"]), str(world / "vqa_train.json")]
    run_alone(script, *args, str(tmp_path / "one.safetensors"))
    launch(script, *args, str(tmp_path / "two.safetensors"))
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert one.keys() == two.keys() and any(k.startswith("classifier.") for k in one)
    for key in [k for k in one if not k.endswith("k_proj.bias")]:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5, msg=key)
