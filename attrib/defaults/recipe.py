"""The training recipes of the three shipped default models, as data.

Each default is a small VLLM of the real Hugging Face class, trained on the synthetic world
(`attrib.world`) in stages; a `Stage` says which parameters train, for how many steps, on what mix of
questions, and which extra terms it adds. The three retrain from nothing in one chain
(`DEFAULT_CHAIN`): LLaVA from scratch, MiniGPT-4 on LLaVA's trained Llama, BLIP-2 on MiniGPT-4's tower and
laid-out Q-Former with an OPT of its own. What each stage buys, with the measurements behind the step
counts and weights, is in docs/experiments/defaults-recipes.md.

Sizes: 12 × 128 Llama LMs (OPT: 8 layers), a 4-layer 128-wide vision tower on 64-px images with 8-px
patches (an 8 × 8 grid), 16 Q-Former queries. Objects snap to the patch grid.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from attrib.backbones.build import BackboneSizes
from attrib.prompts import load_prompts

# Trained in this order; each may start from the parameters of one trained before it (`Recipe.init_from`).
DEFAULT_CHAIN = ("llava", "minigpt4", "blip2")

TOY_SIZES = BackboneSizes(
    image_size=64, patch_size=8, vision_hidden=128, vision_layers=4, vision_heads=4, vision_mlp=512,
    text_hidden=128, text_layers=12, text_heads=4, text_mlp=512, num_query_tokens=16,
    qformer_hidden=128, qformer_layers=2, qformer_heads=4, qformer_mlp=512, max_positions=256,
)
# BLIP-2's OPT at 8 layers: the fewest that leave the attribution layers to find.
_BLIP2_SIZES = replace(TOY_SIZES, text_layers=8)
TOKENIZER_VOCAB = 720
TOKENIZER_EXTRA = ("USER: <image>\n ASSISTANT:", "###Human: <Img><image></Img> ###Assistant:",
                   " The answer is:", "nq question: ?")

# The VisEdit protocol's prompt formats (attrib/configs/prompts.yaml).
PROMPTS = load_prompts()


@dataclass(frozen=True)
class Stage:
    """One training stage: which parameters train (path prefix → LR multiplier) for how many steps."""

    name: str
    kind: str  # "vision": per-patch heads on the tower; "language": answers, captions, facts
    steps: int
    lr: float
    train: dict[str, float]
    warmup: int = 100
    batch_images: int = 16
    questions_per_image: int = 8
    facts: int = 16
    fact_weight: float = 0.5
    # Curriculum: (until_step, n) pairs — before nominal step until_step, scenes hold at most n objects.
    max_objects: tuple[tuple[int, int], ...] = ()
    # Relative share of each question family (None: uniform over the families a scene can pose).
    family_weights: dict[str, float] | None = None
    # Attention term (batches.object_attention_loss), at these LM layers and this weight: from "answer",
    # the answer position's attention within the image is pressed onto the asked-about object's tokens;
    # from "directions", each direction word of a position question's region onto the half it names. The
    # image tokens must form a grid: LLaVA's patches, or a Q-Former's queries laid out by layout_weight.
    attend_layers: tuple[int, ...] = ()
    attend_weight: float = 0.0
    attend_from: str = "answer"
    # With attend_from "answer": the direction words' looks too, at these LM layers (one stage grounds both).
    direction_layers: tuple[int, ...] = ()
    # Chance that an existence question answered "no" is re-asked with its shape present in another colour.
    hard_negatives: float = 0.0
    # Q-Former layout term (batches.layout_loss): each query token's cross-attention onto its own block.
    layout_weight: float = 0.0
    # Chance that an existence question becomes a contrastive pair (batches.existence_pair) on its image:
    # the same question about a present object and about that shape in a colour it lacks (from pair_colors).
    exists_pairs: float = 0.0
    pair_colors: tuple[str, ...] = ()
    # True: this stage runs in fp32 even when the recipe's autocast is on (BLIP-2's laid-out stages did not
    # learn position under bf16 autocast).
    fp32: bool = False

    def object_limit(self, step: int) -> int | None:
        """The curriculum's object limit at nominal ``step`` (None: the world's own range)."""
        return next((n for until, n in self.max_objects if step < until), None)


@dataclass(frozen=True)
class Recipe:
    backbone: str
    stages: tuple[Stage, ...]
    # Parameters copied from an already trained default before training: (source default,
    # {source prefix: destination prefix}).
    init_from: tuple[str, dict[str, str]] | None = None
    seed: int = 0
    sizes: BackboneSizes = TOY_SIZES
    # "bf16": every stage not marked ``fp32`` runs eager attention under bf16 autocast (weights and optimizer
    # stay fp32). None: fp32, with sdpa except where a stage reads attention weights.
    autocast: str | None = None


# Question families that bind a word to one object of several (shape of a colour, position, existence)
# learn slowest; count is solved within a few hundred steps on LLaVA.
_FAMILIES = {"color_of_shape": 1.0, "shape_of_color": 1.5, "count": 0.5, "position": 1.25, "exists": 1.5}
# Counting through 16 query tokens is new to the LM: the Q-Former backbones ask it as often as colour of shape.
_QFORMER_FAMILIES = {**_FAMILIES, "count": 1.0}
# One-object scenes for the first 200 steps and at most two up to step 400: a fresh LM on a frozen tower
# learns colour-of-shape binding far sooner with it.
_CURRICULUM = ((200, 1), (400, 2))
# Language stages: 5e-4 on batches of 8 images (a fresh 12 × 128 LM at 1.5e-3 read only the shape).
_LANGUAGE = {"lr": 5e-4, "batch_images": 8, "facts": 8}
_JOINT = {**_LANGUAGE, "lr": 3e-4, "warmup": 20, "family_weights": _FAMILIES}
# The answer-look term: the answer position's attention within the image pressed onto the asked-about
# object at LM layers 5-7, so the lookup a region method should find happens at known layers; position,
# whose lookup is the hardest, asked 4x as often.
_ATTEND = {**_JOINT, "family_weights": {**_FAMILIES, "position": 4.0}, "attend_layers": (5, 6, 7),
           "attend_weight": 2.0}
# The direction term: each direction word of a position question ("top", "left") looks at the half of the
# image it names at LM layers 0-1, where its query is still the word itself.
_DIRECTIONS = {**_ATTEND, "attend_layers": (0, 1), "attend_from": "directions"}
# Existence pairs: both questions of a pair asked on one image, differing in the colour word only, so
# "is there a blue circle?" is told apart from a yellow or purple circle (colours the LM confused).
_EXISTS_PAIRS = {**_ATTEND, "batch_images": 16, "facts": 16,
                 "family_weights": {**_FAMILIES, "exists": 3.0, "position": 2.0},
                 "exists_pairs": 0.5, "pair_colors": ("blue", "yellow", "purple")}

# ---- LLaVA: from scratch -------------------------------------------------------------------------------
_LLAVA_LM = {"model.language_model": 1.0, "lm_head": 1.0}
# After the language stage the projector moves only gently; the tower stays as its own stage left it.
_LLAVA_GROUNDING = {"model.multi_modal_projector": 0.3, **_LLAVA_LM}
_LLAVA = Recipe("llava", (
    Stage("vision", "vision", 400, 2e-3, {"model.vision_tower": 1.0}, warmup=20, batch_images=64),
    # Under 2,400 steps this stage does not reliably learn position.
    Stage("language", "language", 2400, train={"model.multi_modal_projector": 1.0, **_LLAVA_LM},
          max_objects=_CURRICULUM, family_weights=_FAMILIES, **_LANGUAGE),
    Stage("attend", "language", 300, train=_LLAVA_GROUNDING, **_ATTEND),
    Stage("exists-pairs", "language", 400, train=_LLAVA_GROUNDING, **_EXISTS_PAIRS),
), autocast="bf16")

# ---- MiniGPT-4: LLaVA's Llama, its own tower, a Q-Former laid out as a grid ---------------------------
# LLaVA's parameter names → BLIP-2 classes' names for the same Llama.
_LLAVA_LLAMA = {"model.language_model.": "language_model.model.", "lm_head.": "language_model.lm_head."}
# Everything but the vision tower trains in the laid-out stages (the layout moves the Q-Former; the looks,
# the LM).
_GRID_TRAIN = {"qformer": 1.0, "query_tokens": 1.0, "language_projection": 1.0, "language_model": 1.0}
_LAYOUT = {"train": _GRID_TRAIN, "layout_weight": 1.0}  # the layout term stays on in every laid-out stage


def _laid_out_stages(look_layers: tuple[int, ...], fp32: bool, attend_steps: int,
                     captions: dict[str, float]) -> tuple[Stage, ...]:
    """The Q-Former backbones' laid-out stages: the 16 queries are a 4 × 4 grid of 2 × 2-patch blocks
    (`batches.layout_loss`), so the LM's query tokens form a grid its looks can use; the direction words'
    looks at LM layers 0-1, the answer position's (and the existence pairs') at ``look_layers``.
    ``captions``: family weights the last stage sets on top of the pair stage's."""
    look = {"attend_layers": look_layers}
    position = {**_QFORMER_FAMILIES, "position": 4.0}
    # Colour of shape asked twice as often from the joint stage on: its errors were other objects' colours.
    binding = {**_QFORMER_FAMILIES, "color_of_shape": 2.0, "count": 2.0, "position": 2.0}
    pairs = {**binding, "exists": 3.0, "count": 3.0}
    return (
        Stage("layout-directions", "language", 450, fp32=fp32, **_LAYOUT,
              **{**_DIRECTIONS, "family_weights": position}),
        Stage("layout-attend", "language", attend_steps, fp32=fp32, **_LAYOUT,
              **{**_ATTEND, **look, "family_weights": position}),
        Stage("layout-joint", "language", 300, fp32=fp32, **_LAYOUT,
              **{**_ATTEND, **look, "lr": 2e-4, "family_weights": binding}),
        # Existence pairs over any two colours.
        Stage("layout-pairs", "language", 400, fp32=fp32, **_LAYOUT,
              **{**_EXISTS_PAIRS, **look, "lr": 2e-4, "pair_colors": (), "family_weights": pairs}),
        # Two questions per image: the caption is a third of the rows instead of a ninth, and a step sees
        # four times the scenes per question.
        Stage("layout-captions", "language", 1100, fp32=fp32, **_LAYOUT,
              **{**_EXISTS_PAIRS, **look, "lr": 2e-4, "questions_per_image": 2, "pair_colors": (),
                 "family_weights": {**pairs, **captions}}),
    )


_MINIGPT4 = Recipe("minigpt4", (
    Stage("vision", "vision", 600, 2e-3, {"vision_model": 1.0}, warmup=20, batch_images=64),
    # The bridge (Q-Former, queries, projection) on the frozen LM, laid out from its first step; count asked
    # twice as often as colour of shape (the Q-Former learns here what to encode).
    Stage("bridge-layout", "language", 600, train={"qformer": 1.0, "query_tokens": 1.0, "language_projection": 1.0},
          max_objects=((100, 1), (200, 2)), layout_weight=1.0,
          family_weights={**_QFORMER_FAMILIES, "count": 2.0}, **_LANGUAGE),
    *_laid_out_stages((5, 6, 7), fp32=False, attend_steps=540, captions={"exists": 4.0, "count": 4.0}),
), init_from=("llava", _LLAVA_LLAMA), autocast="bf16")

# ---- BLIP-2: MiniGPT-4's tower and laid-out Q-Former, an OPT of its own -------------------------------
_QFORMER_PARTS = {"vision_model.": "vision_model.", "qformer.": "qformer.", "query_tokens": "query_tokens"}
_BLIP2 = Recipe("blip2", (
    # The OPT from scratch under the frozen Q-Former: trained along with a random LM from the start, the
    # Q-Former lost colour of shape.
    Stage("language", "language", 3000, train={"language_projection": 1.0, "language_model": 1.0},
          max_objects=_CURRICULUM, family_weights=_QFORMER_FAMILIES, **_LANGUAGE),
    Stage("joint", "language", 600, train={"vision_model": 0.1, "qformer": 1.0, "query_tokens": 1.0,
                                           "language_projection": 1.0, "language_model": 1.0},
          **{**_JOINT, "family_weights": _QFORMER_FAMILIES}),
    # Looks at OPT layers 3-5 (MiniGPT-4's 5-7 of 12, scaled to 8 layers); in fp32: under bf16 autocast these
    # stages did not learn position.
    *_laid_out_stages((3, 4, 5), fp32=True, attend_steps=600, captions={}),
), init_from=("minigpt4", _QFORMER_PARTS), sizes=_BLIP2_SIZES, autocast="bf16")

RECIPES: dict[str, Recipe] = {"llava": _LLAVA, "minigpt4": _MINIGPT4, "blip2": _BLIP2}
