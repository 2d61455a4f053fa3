"""The adapter's and training's defaults: sizes from the LM width, the learning rate, the steps."""
from __future__ import annotations

from editing.training.recipe import default_lr, default_steps, sized_vead_config


def test_default_lr_follows_the_width():
    assert default_lr(4096) == 1e-4 and default_lr(2560) == 1e-4 and default_lr(128) == 1e-3


def test_adapter_is_sized_from_the_width():
    assert sized_vead_config(4096).mid_dim == 1024 and sized_vead_config(2560).im_heads == 8
    small = sized_vead_config(128)
    assert (small.mid_dim, small.n_heads, small.im_heads) == (128, 8, 8)
    assert sized_vead_config(36, heads=3).n_heads == 3 and sized_vead_config(36).im_heads == 4


def test_llava_trains_fewer_steps_than_the_q_former_backbones():
    assert default_steps("llava") == 1750 and default_steps("blip2") == default_steps("minigpt4") == 2000


def test_llava_captions_train_twice_as_long():
    assert default_steps("llava", "caption") == 3500 == 2 * default_steps("llava", "vqa")
    assert default_steps("blip2", "caption") == default_steps("minigpt4", "caption") == 2000
