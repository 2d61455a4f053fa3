"""The default recipes as data: the chain each default starts from, and the stages' schedules."""
from __future__ import annotations

from attrib.defaults.recipe import DEFAULT_CHAIN, RECIPES, Stage


def test_object_curriculum_limits_by_nominal_step():
    stage = Stage("language", "language", 900, 5e-4, {"x": 1.0}, max_objects=((200, 1), (500, 2)))
    assert [stage.object_limit(s) for s in (0, 199, 200, 499, 500, 899)] == [1, 1, 2, 2, None, None]
    assert Stage("v", "vision", 10, 1e-3, {"x": 1.0}).object_limit(0) is None


def test_the_chain_starts_from_scratch_and_reuses_only_earlier_defaults():
    assert DEFAULT_CHAIN == ("llava", "minigpt4", "blip2")
    assert RECIPES["llava"].init_from is None
    assert RECIPES["minigpt4"].init_from[0] == "llava" and RECIPES["blip2"].init_from[0] == "minigpt4"
    # MiniGPT-4 takes LLaVA's Llama only; BLIP-2 takes MiniGPT-4's tower and Q-Former, not its LM.
    assert all("language_model" in dst for dst in RECIPES["minigpt4"].init_from[1].values())
    assert not any("language_model" in dst for dst in RECIPES["blip2"].init_from[1].values())


def test_blip2_runs_its_laid_out_stages_in_fp32_under_a_bf16_recipe():
    blip2 = RECIPES["blip2"]
    assert blip2.autocast == "bf16"
    assert [s.name for s in blip2.stages if s.fp32] == [s.name for s in blip2.stages if s.name.startswith("layout")]
    assert not any(s.fp32 for s in RECIPES["minigpt4"].stages)
