"""Contribution allocation: exact DLA sums, the VisEdit formula against a hook-based reference, key
tokens, batch-size independence, plotting and the refusals of non-decomposable OPT configurations."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on test machines

import matplotlib.pyplot as plt
import pytest
import torch

from attrib.backbones.loader import load_backbone
from attrib.contribution import ContributionResult, check_decomposable, contribution

PROMPTS = ["what color is the circle?", "red"]  # different lengths, so left padding is exercised
TARGETS = ["red", "blue"]


@pytest.fixture(scope="module")
def image_result(tiny_backbone, tiny_images) -> ContributionResult:
    return contribution(tiny_backbone, tiny_images, PROMPTS)


def _reference(backbone, images, prompts, keys: torch.Tensor | None = None):
    """The test's own reading: a plain forward with hooks, then each term through the real norm and head
    one at a time. Returns (C [B, 2L], v [B, 2L], p [B, 2L], keys [B], logits [B, V])."""
    spec, n_layers = backbone.spec, backbone.n_layers
    inputs = backbone.encode(images, prompts)
    batch = inputs["input_ids"].shape[0]
    outputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            outputs[name] = out.reshape(batch, -1, out.shape[-1])[:, -1]  # OPT's fc2 is [B*T, D]
        return hook

    handles = [backbone.module(spec.layer_path(layer, part)).register_forward_hook(keep(f"{part}{layer}"))
               for layer in range(n_layers) for part in ("attn", "mlp")]
    try:
        with torch.no_grad():
            logits = backbone.forward(inputs).logits[:, -1]
    finally:
        for handle in handles:
            handle.remove()
    keys = logits.argmax(-1) if keys is None else keys
    norm, head = backbone.module(spec.final_norm), backbone.module(spec.lm_head)
    values, probs = torch.zeros(batch, 2 * n_layers), torch.zeros(batch, 2 * n_layers)
    for b in range(batch):
        for j, name in enumerate([f"attn{i}" for i in range(n_layers)] + [f"mlp{i}" for i in range(n_layers)]):
            with torch.no_grad():
                z = head(norm(outputs[name][b]))
            values[b, j] = z[keys[b]]
            probs[b, j] = torch.softmax(z, -1)[keys[b]]
    big_m = values.abs().max(1, keepdim=True).values
    c = values.sign() * (values / big_m).abs().sqrt() * probs.sqrt()
    return c, values, probs, keys, logits


def _assert_dla_sums(result: ContributionResult) -> None:
    total = result.dla_embed + result.dla_attn.sum(1) + result.dla_mlp.sum(1) + result.dla_bias
    assert torch.allclose(total, result.logit, atol=1e-4), (total - result.logit).abs().max()


def test_dla_sums_to_logit_with_images(tiny_backbone, tiny_images, image_result):
    _assert_dla_sums(image_result)
    _, _, _, keys, logits = _reference(tiny_backbone, tiny_images, PROMPTS)
    # The logit is the plain forward's, not only self-consistent.
    assert torch.allclose(image_result.logit, logits.gather(-1, keys[:, None]).squeeze(-1), atol=1e-5)


def test_dla_sums_to_logit_text_only(tiny_backbone):
    result = contribution(tiny_backbone, None, PROMPTS)
    _assert_dla_sums(result)
    _, _, _, keys, logits = _reference(tiny_backbone, None, PROMPTS)
    assert torch.equal(result.key_tokens, keys)
    assert torch.allclose(result.logit, logits.gather(-1, keys[:, None]).squeeze(-1), atol=1e-5)
    if tiny_backbone.spec.text_model_type == "llama":
        assert torch.count_nonzero(result.dla_bias) == 0  # RMSNorm has no bias term


def test_visedit_matches_per_term_reference(tiny_backbone, tiny_images, image_result):
    c, values, probs, keys, _ = _reference(tiny_backbone, tiny_images, PROMPTS)
    n_layers = tiny_backbone.n_layers
    assert torch.equal(image_result.key_tokens, keys)
    assert torch.allclose(image_result.attn, c[:, :n_layers], atol=1e-5)
    assert torch.allclose(image_result.mlp, c[:, n_layers:], atol=1e-5)
    # M normalisation: |C| <= 1 everywhere; the term with the largest |v| has |C| = p^0.5.
    both = torch.cat([image_result.attn, image_result.mlp], 1)
    assert both.abs().max() <= 1 + 1e-6
    top = values.abs().argmax(1)
    rows = torch.arange(len(PROMPTS))
    assert torch.allclose(both[rows, top].abs(), probs[rows, top].sqrt(), atol=1e-6)


def test_key_tokens_follow_targets(tiny_backbone, tiny_images):
    result = contribution(tiny_backbone, tiny_images, PROMPTS, targets=TARGETS)
    tokenizer = tiny_backbone.tokenizer
    expected = [tokenizer(" " + t, add_special_tokens=False).input_ids[0] for t in TARGETS]
    assert result.key_tokens.tolist() == expected
    _assert_dla_sums(result)
    c, _, _, _, _ = _reference(tiny_backbone, tiny_images, PROMPTS, keys=result.key_tokens)
    assert torch.allclose(result.attn, c[:, :tiny_backbone.n_layers], atol=1e-5)


def test_batch_size_does_not_change_results(tiny_backbone, tiny_images, image_result):
    single = contribution(tiny_backbone, tiny_images, PROMPTS, batch_size=1)
    for name, value in image_result.to_tensors().items():
        assert torch.allclose(single.to_tensors()[name].float(), value.float(), atol=1e-5), name


def test_result_api_and_bars(tiny_backbone, image_result):
    n_layers = tiny_backbone.n_layers
    tensors = image_result.to_tensors()
    assert tensors["attn"].shape == tensors["dla_mlp"].shape == (len(PROMPTS), n_layers)
    assert tensors["key_tokens"].dtype == torch.long and tensors["logit"].shape == (len(PROMPTS),)
    means = image_result.mean()
    assert set(means) == {"attn", "mlp"} and len(means["attn"]) == n_layers
    assert means["mlp"][0] == pytest.approx(image_result.mlp[:, 0].mean().item())
    for kind in ("visedit", "dla"):
        figure = image_result.plot_bars(kind=kind)
        assert len(figure.axes[0].patches) == 2 * n_layers
        plt.close(figure)
    with pytest.raises(ValueError, match="kind"):
        image_result.plot_bars(kind="heatmap")


class _OnePlusWeightNorm(torch.nn.Module):
    """Looks like a Llama RMSNorm (weight, variance_epsilon) but scales by 1 + w, as Gemma does."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((width,), 0.5))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def test_refuses_lookalike_norm(tiny_backbone, tiny_dirs):
    spec = tiny_backbone.spec
    if spec.text_model_type != "llama":
        pytest.skip("Llama-only norm check")
    own = load_backbone(spec.name, tiny_dirs[spec.name])  # a private copy: the shared one stays intact
    parent, _, attr = spec.final_norm.rpartition(".")
    width = own.config.text_config.hidden_size
    setattr(own.module(parent), attr, _OnePlusWeightNorm(width))
    with pytest.raises(ValueError, match="exact decomposition would not hold"):
        check_decomposable(own)


def test_refuses_non_decomposable_opt(tiny_backbone, monkeypatch):
    text = tiny_backbone.config.text_config
    if tiny_backbone.spec.text_model_type != "opt":
        pytest.skip("OPT-only configuration checks")
    check_decomposable(tiny_backbone)  # the tiny OPT itself is fine
    monkeypatch.setattr(text, "do_layer_norm_before", False)
    with pytest.raises(ValueError, match="post-norm"):
        check_decomposable(tiny_backbone)
    monkeypatch.setattr(text, "do_layer_norm_before", True)
    monkeypatch.setattr(text, "word_embed_proj_dim", text.hidden_size // 2)
    with pytest.raises(ValueError, match="project_out"):
        check_decomposable(tiny_backbone)


def test_refuses_training_mode_and_mismatched_lengths(tiny_backbone, tiny_images):
    with pytest.raises(ValueError, match="images for"):
        contribution(tiny_backbone, tiny_images[:1], PROMPTS)
    tiny_backbone.model.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            contribution(tiny_backbone, tiny_images, PROMPTS)
    finally:
        tiny_backbone.model.eval()
