"""The measured recipe for the shipped default backbones, as data.

Sizes follow the world issue's measurements: deep and narrow LMs (12 × 128) train fastest here;
objects snap to the 8-px patch grid of a 64-px image. Training is staged: the vision tower first with
per-patch heads, then LM + bridge on a frozen tower, then everything with the tower at 0.1× LR
(``llava_base``). The ``llava`` variant (the LLaVA default until stop 31) adds two attention stages to
``llava_base``: each direction word of a position question is pressed to look at the half of the image it
names (LM layers 0-1), then the answer position onto the asked-about object (layers 5-7) — position 77 ->
97.5 %, and its image lookup happens at known layers, which the region methods are validated on. The
``llava_bf16`` variant trains ``llava_base``'s stages under bf16 autocast and then the existence-pair stage
alone, in one folder. The LLaVA default, ``llava_one``, trains in one folder under bf16 too: the vision and
language stages, then a short answer-look stage (layers 5-7) and the existence-pair stage. MiniGPT-4
reuses ``llava_base``'s trained Llama; BLIP-2 reuses MiniGPT-4's vision tower and Q-Former but trains its
OPT LM itself. The ``minigpt4_grid`` and ``blip2_grid`` variants lay the Q-Former's 16 queries out as a 4 x 4
grid of patch blocks and add the same attention stages on that grid; ``blip2_laid`` trains BLIP-2's OPT on
``minigpt4_grid``'s already laid-out Q-Former, in one folder; ``minigpt4_laid`` trains MiniGPT-4 in one folder on
``llava_base``'s Llama, its Q-Former laid out from the bridge on. The MiniGPT-4 and BLIP-2 defaults,
``minigpt4_one`` and ``blip2_one``, run those two recipes on the LLaVA default's Llama and on ``minigpt4_one``'s
parts, so the three defaults retrain from nothing in one chain (``DEFAULT_CHAIN``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from attrib.backbones.build import BackboneSizes
from attrib.prompts import load_prompts

if TYPE_CHECKING:
    from attrib.backbones.loader import Backbone

DEFAULTS_DIR = Path(__file__).parent / "models"
# The folder each backbone's commands use when no MODEL is given, each trained in one folder from scratch or from
# another default's parts (DEFAULT_CHAIN). LLaVA's is `llava_one` (stop 32): from scratch under bf16, 29.8 min
# here, every family at 97.5-100 %; from stop 20 it was `llava` (two folders, `llava_base` + the attention stages,
# ~51 min), which stays as a variant with its base. MiniGPT-4's is `minigpt4_one` (stop 33): `llava_one`'s Llama,
# 26.7-30.4 min here (two runs, the same weights), 97-100 %; before it `minigpt4_laid` (stop 31, the same stages
# on llava_base's Llama) and from stop 23 `minigpt4_grid` (two folders, `minigpt4` + laid-out stages), both
# variants now. BLIP-2's is `blip2_one` (stop 33): `minigpt4_one`'s tower and laid-out Q-Former, 26.8 min here,
# 99-100 %; before it `blip2_laid` (stop 29, the same stages on `minigpt4_grid`'s) and from stop 24 `blip2_grid`
# (two folders, `blip2` + laid-out stages), both variants now.
DEFAULT_MODELS = {"llava": "llava_one", "blip2": "blip2_one", "minigpt4": "minigpt4_one"}


def default_model(backbone: str) -> Path:
    """The shipped folder a backbone's commands load when no model is given."""
    return DEFAULTS_DIR / DEFAULT_MODELS.get(backbone, backbone)


def load_model(backbone: str, model: str | Path | None = None) -> Backbone:
    """The ``backbone`` at the local folder ``model``, or its shipped default — what every command loads. An
    unknown backbone name lists the choices; a default not built yet says how to build it."""
    from attrib.backbones.loader import load_backbone
    from attrib.backbones.spec import get_spec
    from attrib.data import DataError

    get_spec(backbone)  # before any folder is looked for
    path = default_model(backbone) if model is None else Path(model)
    if model is None and not (path / "config.json").is_file():
        raise DataError(f"{path}: the default {backbone} model is not there; run `make toy-models` or pass MODEL=")
    return load_backbone(backbone, path)


# Each may start from the ones before it.
ORDER = ("llava_base", "llava", "llava_bf16", "llava_one", "minigpt4_laid", "minigpt4_one", "minigpt4", "blip2",
         "minigpt4_grid", "minigpt4_routed", "blip2_grid", "blip2_laid", "blip2_one")
# What `make toy-models` retrains with BACKBONES unset: the three defaults, each starting from scratch or from
# another default's parts, so the chain needs nothing else.
DEFAULT_CHAIN = tuple(name for name in ORDER if name in DEFAULT_MODELS.values())

TOY_SIZES = BackboneSizes(
    image_size=64, patch_size=8, vision_hidden=128, vision_layers=4, vision_heads=4, vision_mlp=512,
    text_hidden=128, text_layers=12, text_heads=4, text_mlp=512, num_query_tokens=16,
    qformer_hidden=128, qformer_layers=2, qformer_heads=4, qformer_mlp=512, max_positions=256,
)
# BLIP-2's OPT at 8 layers, the minimum that leaves attribution room (its own LM and its laid-out variant's).
_BLIP2_SIZES = replace(TOY_SIZES, text_layers=8)
TOKENIZER_VOCAB = 720
TOKENIZER_EXTRA = ("USER: <image>\n ASSISTANT:", "###Human: <Img><image></Img> ###Assistant:",
                   " The answer is:", "nq question: ?")

# Prompt formats of the VisEdit protocol (SPEC §6), from the versioned configuration.
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
    # train under bf16 autocast, stop 27, though one batch's loss and gradient match fp32's; at stop 29 they
    # failed the same way in fp32 from a shortened start, so the start may matter as much as the precision).
    fp32: bool = False

    def object_limit(self, step: int) -> int | None:
        """The curriculum's object limit at nominal ``step`` (None: the world's own range)."""
        return next((n for until, n in self.max_objects if step < until), None)


@dataclass(frozen=True)
class Recipe:
    backbone: str
    stages: tuple[Stage, ...]
    # Parameters copied from an already trained default before training: (source backbone,
    # {source prefix: destination prefix}).
    init_from: tuple[str, dict[str, str]] | None = None
    seed: int = 0
    sizes: BackboneSizes = TOY_SIZES
    # "bf16": every stage not marked ``fp32`` runs eager attention under bf16 autocast (weights and optimizer
    # stay fp32). None: fp32, with sdpa except where a stage reads attention weights.
    autocast: str | None = None


_LLAVA_LM = {"model.language_model": 1.0, "lm_head": 1.0}
# Language stages run at 5e-4 on batches of 8 images: measured on one-object scenes (tower frozen), a
# fresh 12 x 128 LM at 1.5e-3 still answered colour questions at chance after 300 steps (it read the
# shape only), at 5e-4 it answered all of them; 4e-3 learned nothing.
_LANGUAGE = {"lr": 5e-4, "batch_images": 8, "facts": 8}
# Families that bind a question word to one object of several (shape of a colour, position, existence)
# learn slowest; count is solved within a few hundred steps.
_FAMILIES = {"color_of_shape": 1.0, "shape_of_color": 1.5, "count": 0.5, "position": 1.25, "exists": 1.5}
# Curriculum: measured on a fresh LM over the frozen tower, one-object scenes for the first 200 steps
# and at most two up to step 400 took colour-of-shape (1-4 objects) to 100 % by step 500, against 13 %
# at step 400 and 78 % at step 2,400 without it.
_CURRICULUM = ((200, 1), (400, 2))
_JOINT = {**_LANGUAGE, "lr": 3e-4, "warmup": 20, "family_weights": _FAMILIES}
# Count at LLaVA's weight 0.5 reached only 84.5 % on MiniGPT-4 (93 % on BLIP-2): counting through 16
# query tokens is new to the LM, so the Q-Former backbones ask it as often as colour of shape.
_QFORMER_FAMILIES = {**_FAMILIES, "count": 1.0}
_QFORMER_JOINT = {**_JOINT, "family_weights": _QFORMER_FAMILIES}
# A second joint stage at a lower peak LR, asking position twice as often as colour of shape: after the
# first 600 joint steps BLIP-2 was at 68 % on position and 94-96 % on the others (loss still 0.17).
_POSITION_FAMILIES = {**_QFORMER_FAMILIES, "position": 2.0}
# MiniGPT-4 got the same two joint stages (600 + 700 steps; it had one of 400): count 90.0 -> 97.5 %,
# position 73.0 -> 75.5 %, captions 87.3 -> 88.4 %. Its second stage also re-asks 60 % of the "no" existence
# questions with the shape present in another colour (answered right 79 % of the time before; with the
# colour on another object too, 83 %; these held all its existence errors but two "yes"). That moved them
# to 80 % and existence 92.5 -> 93.5 % only: the colour-shape binding is not learnt in these steps.
_MINIGPT4_ALL = {"vision_model": 0.1, "qformer": 1.0, "query_tokens": 1.0, "language_projection": 1.0,
                 "language_model": 0.3}
_BLIP2_ALL = {**_MINIGPT4_ALL, "language_model": 1.0}  # BLIP-2's OPT trains at full LR (its own LM)
# The object attention stage (a grid backbone: LLaVA's visual tokens are the grid). llava_base reads
# the image in LM layers 0-1, and its answer position's attention within the image at layers 5-7 puts
# 10-13 % of its weight on the asked-about object; this stage presses it onto the object there, so the
# lookup a region method should find happens at known layers. Position is asked 4x as often: its lookup is
# the hardest. On llava_base itself (stop 14's `llava_attend`) it reached 65-67 % of that attention on the
# object for colour / shape questions but 34-35 % for position (position 77 -> 81 %); after the direction
# stage below it took position 91.5 -> 98 % (stop 17's `llava_grounded`).
_ATTEND = {**_JOINT, "family_weights": {**_FAMILIES, "position": 4.0}, "attend_layers": (5, 6, 7),
           "attend_weight": 2.0}
# The direction stage. On llava_base, the last word of a position question's
# region ("left" of "top left", "half" of "left half") does not tell the 8 regions apart (linear probe on its
# hidden state: 39-58 % at every layer), and no layer's attention from the region words or the answer
# position selects the named region: the LM never composes the two-word region with a spatial lookup,
# though a single attention readout over its own visual states finds the object in a region at 99-100 %.
# Pressing the answer position (the stage above) or the region's last word (layers 1-2) onto the object
# moved position to 81-85 %; grounding each direction word alone ("top" -> the top half, at layers 0-1,
# where its query is the word itself) took it 77 -> 91.5 % (3-4 objects 57.5 -> 80 %).
_DIRECTIONS = {**_ATTEND, "attend_layers": (0, 1), "attend_from": "directions"}
# The existence stage. After the two stages above, "is there a blue circle?" was answered "yes" on 98 % of
# held-out scenes that hold a yellow or purple circle and no blue one (and likewise among the three): blue,
# yellow and purple, not the others, share the features existence reads (62 of its 63 hard-negative errors),
# though the LM tells them apart when asked the colour (100 %) or the shape of a colour with two of them
# present (100 %). Hard negatives alone moved the yes / no threshold (stop 19: "no" 95-97 %, but "yes" on
# those colours 70-83 %); asking both questions of a pair on the same image, differing in the colour word
# only, took the pair's "no" 2 -> 94 % and its "yes" 99 -> 96 % (400 steps, a throw-away run); this stage,
# from the shipped weights of the two above: existence 95.0 -> 97.5 %, position 97.5 -> 99.5 %.
_EXISTS_PAIRS = {**_ATTEND, "batch_images": 16, "facts": 16,
                 "family_weights": {**_FAMILIES, "exists": 3.0, "position": 2.0},
                 "exists_pairs": 0.5, "pair_colors": ("blue", "yellow", "purple")}
_ALL = {"": ""}  # every parameter, same names
# The laid-out stages (both Q-Former defaults) train everything but the vision tower (the layout moves the
# Q-Former; the looks, the LM).
_GRID_TRAIN = {"qformer": 1.0, "query_tokens": 1.0, "language_projection": 1.0, "language_model": 1.0}
# The routed MiniGPT-4 stages: the Q-Former must move for its queries to take up regions, the projection only
# gently (as LLaVA's projector), the LM fully.
_ROUTED = {"qformer": 1.0, "query_tokens": 1.0, "language_projection": 0.3, "language_model": 1.0}


def _layout_stages(look_layers: tuple[int, ...]) -> tuple[Stage, ...]:
    """The laid-out Q-Former stages (minigpt4_grid, blip2_grid): every one keeps the layout term on; the
    answer position's look (and the existence pairs') at ``look_layers``, the direction words' at 0-1."""
    look = {"attend_layers": look_layers}
    grid = {"train": _GRID_TRAIN, "layout_weight": 1.0}
    return (
        Stage("layout-directions", "language", 600, **grid,
              **{**_DIRECTIONS, "family_weights": {**_QFORMER_FAMILIES, "position": 4.0}}),
        Stage("layout-attend", "language", 600, **grid,
              **{**_ATTEND, **look, "family_weights": {**_QFORMER_FAMILIES, "position": 4.0}}),
        Stage("layout-joint", "language", 400, **grid,
              **{**_ATTEND, **look, "lr": 2e-4,
                 "family_weights": {**_QFORMER_FAMILIES, "count": 2.0, "position": 2.0}}),
        Stage("layout-pairs", "language", 400, **grid,
              **{**_EXISTS_PAIRS, **look, "lr": 2e-4,
                 "family_weights": {**_QFORMER_FAMILIES, "exists": 3.0, "position": 2.0, "count": 3.0}}),
        # Two questions per image: the caption (one row per image) is a third of the rows instead of a ninth,
        # and a step sees four times the scenes per question (stop 24; EXPERIMENTS.md).
        Stage("layout-captions", "language", 1200, **grid,
              **{**_EXISTS_PAIRS, **look, "lr": 2e-4, "questions_per_image": 2,
                 "family_weights": {**_QFORMER_FAMILIES, "exists": 2.0, "position": 2.0, "count": 3.0}}),
    )


_LLAVA_JOINT = {"model.vision_tower": 0.1, "model.multi_modal_projector": 1.0, **_LLAVA_LM}
# The attention stages move the LM and, gently, the projector; the tower stays as llava_base left it.
_LLAVA_GROUNDING = {"model.multi_modal_projector": 0.3, **_LLAVA_LM}
# The vision, language and joint stages: `llava_base` in fp32 (the default and MiniGPT-4 start from it),
# the llava_bf16 variant's first three stages under bf16.
_LLAVA_BASE = (
    Stage("vision", "vision", 400, 2e-3, {"model.vision_tower": 1.0}, warmup=20, batch_images=64),
    Stage("language", "language", 2400, train={"model.multi_modal_projector": 1.0, **_LLAVA_LM},
          max_objects=_CURRICULUM, family_weights=_FAMILIES, **_LANGUAGE),
    Stage("joint", "language", 400, train=_LLAVA_JOINT, **_JOINT),
)
# The existence-pair stage, last in both the default and llava_bf16.
_LLAVA_PAIRS = Stage("exists-pairs", "language", 400, train=_LLAVA_GROUNDING, **_EXISTS_PAIRS)
# What MiniGPT-4 takes from llava_base: its trained Llama (LLaVA's names -> BLIP-2's classes' names).
_LLAVA_LLAMA = {"model.language_model.": "language_model.model.", "lm_head.": "language_model.lm_head."}
# MiniGPT-4's own first stages (`minigpt4`; `minigpt4_laid` runs them longer, its bridge with the layout term):
# the tower with per-patch heads, then the bridge (Q-Former, queries, projection) on the frozen LM.
_MINIGPT4_VISION = Stage("vision", "vision", 300, 2e-3, {"vision_model": 1.0}, warmup=20, batch_images=64)
_MINIGPT4_BRIDGE = Stage("bridge", "language", 700,
                         train={"qformer": 1.0, "query_tokens": 1.0, "language_projection": 1.0},
                         max_objects=((100, 1), (200, 2)), family_weights=_QFORMER_FAMILIES, **_LANGUAGE)
# What BLIP-2 takes from a MiniGPT-4 folder: its tower and Q-Former (the OPT is its own).
_QFORMER_PARTS = {"vision_model.": "vision_model.", "qformer.": "qformer.", "query_tokens": "query_tokens"}
# BLIP-2's language stage (its OPT from scratch under the frozen Q-Former) and first joint stage, the start of
# both `blip2` and `blip2_laid`.
_BLIP2_FIRST = (
    Stage("language", "language", 3000, train={"language_projection": 1.0, "language_model": 1.0},
          max_objects=_CURRICULUM, family_weights=_QFORMER_FAMILIES, **_LANGUAGE),
    Stage("joint", "language", 600, train=_BLIP2_ALL, **_QFORMER_JOINT),
)
# blip2_laid's laid-out stages: the shortened ones, and the binding ones, whose family weights change (colour of
# shape asked twice as often; existence 3x in the captions stage) and whose existence pairs take any two colours.
_LAID_STEPS = {"layout-directions": 450, "layout-joint": 300, "layout-captions": 1100}
_LAID_BINDING = {"layout-joint": {"color_of_shape": 2.0}, "layout-pairs": {"color_of_shape": 2.0},
                 "layout-captions": {"color_of_shape": 2.0, "exists": 3.0}}


def _laid(stage: Stage, fp32: bool = True) -> Stage:
    """A laid-out stage as blip2_laid runs it: in fp32 (unless ``fp32`` is False), shortened per `_LAID_STEPS`,
    and in the `_LAID_BINDING` stages with those family weights and existence pairs over any two colours."""
    stage = replace(stage, fp32=fp32, steps=_LAID_STEPS.get(stage.name, stage.steps))
    if stage.name not in _LAID_BINDING:
        return stage
    return replace(stage, family_weights={**stage.family_weights, **_LAID_BINDING[stage.name]}, pair_colors=())


# minigpt4_laid counts more often: its first two runs (count asked as the other Q-Former recipes ask it) ended
# at count 96.0 / 95.5 %, the errors between three and four objects; its Q-Former learns what to encode in the
# bridge, where count had been asked as often as colour of shape.
_COUNT_FAMILIES = {**_QFORMER_FAMILIES, "count": 2.0}


def _counted(stage: Stage) -> Stage:
    """minigpt4_laid's laid-out captions stage asks count 4x instead of 3x."""
    if stage.name != "layout-captions":
        return stage
    return replace(stage, family_weights={**stage.family_weights, "count": 4.0})


# blip2_laid's stages: `blip2`'s language and first joint stages, then the laid-out stages (looks at layers 3-5).
_BLIP2_LAID = (*_BLIP2_FIRST, *map(_laid, _layout_stages((3, 4, 5))))
# minigpt4_laid's stages (and, adjusted, minigpt4_one's): its own tower, the bridge with the layout term on from
# the start, then blip2_laid's shortened laid-out stages (looks at layers 5-7), count asked more often.
_MINIGPT4_LAID = (
    replace(_MINIGPT4_VISION, steps=600),
    replace(_MINIGPT4_BRIDGE, name="bridge-layout", steps=600, layout_weight=1.0, family_weights=_COUNT_FAMILIES),
    *(_counted(_laid(stage, fp32=False)) for stage in _layout_stages((5, 6, 7))),
)


def _one(stage: Stage) -> Stage:
    """minigpt4_one's version of a minigpt4_laid stage: the answer-look stage 540 steps, existence asked 4x in
    the captions stage."""
    if stage.name == "layout-attend":
        return replace(stage, steps=540)
    if stage.name == "layout-captions":
        return replace(stage, family_weights={**stage.family_weights, "exists": 4.0})
    return stage


RECIPES: dict[str, Recipe] = {
    "llava_base": Recipe("llava", _LLAVA_BASE),
    # The LLaVA default from stop 20 to stop 31, a variant since (its chain with llava_base ~51 min here).
    # The two attention stages on llava_base, with the vision tower frozen and the projector at 0.3x:
    # position 77.0 -> 97.5 %, and its edits are as good as llava_base's (EXPERIMENTS.md). With the projector at
    # 1.0x and the tower at 0.1x (stop 17's llava_grounded) position reached 98.0 % but the LM-input states
    # of unrelated scenes grew alike (scene chamfer AUC 0.981 -> 0.908) and the edits lost 18 points of Rel
    # and 8 of M-Loc; with both frozen (LM only, 60 % hard negatives) position reached only 83.0 %.
    "llava": Recipe("llava", (
        Stage("directions", "language", 600, train=_LLAVA_GROUNDING, **_DIRECTIONS),
        Stage("attend", "language", 600, train=_LLAVA_GROUNDING, **_ATTEND),
        _LLAVA_PAIRS,
    ), init_from=("llava_base", _ALL)),
    # A variant, not the default: llava_base's stages under bf16 autocast (eager attention; 1.2-1.4x faster per
    # chain, estimated from per-step times), then the existence-pair stage, in one folder from scratch. Stop 27:
    # 1,901 s, 100 / 100 / 100 / 100 / 99.0 %, captions 94.6 % -- position, 77 % on every fp32 llava_base and the
    # reason for the llava variant's two attention stages, came out of the base stages under bf16 -- but its
    # edits fall short (M-Loc 94.0-94.3 at two adapter seeds against the stop-20 default's 97.3), and cut to
    # 29 min it lost position (75.5 %). llava_one (below) keeps its first two stages.
    "llava_bf16": Recipe("llava", (*_LLAVA_BASE, _LLAVA_PAIRS), autocast="bf16"),
    "minigpt4": Recipe("minigpt4", (
        _MINIGPT4_VISION,
        _MINIGPT4_BRIDGE,
        Stage("joint", "language", 600, train=_MINIGPT4_ALL, **_QFORMER_JOINT),
        Stage("joint-position", "language", 700, train=_MINIGPT4_ALL, hard_negatives=0.6,
              **{**_QFORMER_JOINT, "lr": 2e-4, "family_weights": _POSITION_FAMILIES}),
    ), init_from=("llava_base", _LLAVA_LLAMA)),
    # OPT at 8 layers (_BLIP2_SIZES): its LM trains from scratch here, under
    # MiniGPT-4's trained Q-Former, which stays frozen until the joint stage: trained along with a random
    # LM from the start, it ended at 59 % on colour of shape (MiniGPT-4, same Q-Former recipe: 99 %).
    "blip2": Recipe("blip2", (
        *_BLIP2_FIRST,
        Stage("joint-position", "language", 900, train=_BLIP2_ALL,
              **{**_QFORMER_JOINT, "lr": 2e-4, "family_weights": _POSITION_FAMILIES}),
    ), init_from=("minigpt4", _QFORMER_PARTS), sizes=_BLIP2_SIZES),
    # LLaVA's two attention stages carried over to the Q-Former by laying its 16 queries out as a 4 x 4 grid
    # of 2 x 2-patch blocks (the layout term on its first cross-attention, kept on in every stage), so the
    # LM's query tokens form a grid the direction words and the answer position can look at; then a shorter
    # stage asking count twice as often (the first two took it 97.5 -> 92.0 %). minigpt4 -> after three
    # stages: position 75.5 -> 98.0 %, count 97.5 -> 96.0 %, existence 93.5 %, captions 88.4 -> 90.7 %. The
    # layout alone (stop 17, 700 steps) took position down to 66 %, and the layout with answer looks but no
    # direction stage to 84.5 %, the other families to 87-96 %. Stop 23 added LLaVA's existence-pair stage
    # (count asked 3x, peak LR 2e-4; resumed from the three-stage weights at the stage boundary): 100 / 99.5 /
    # 96.0 / 99.5 / 98.0 %, captions 92.2 %. The MiniGPT-4 default in stops 23-30 (`DEFAULT_MODELS`): the
    # plain chamfer scene gate could not tell its laid-out query states' scenes apart (M-Loc 86.3), the
    # salient one can (96.7 on the three-stage weights; EXPERIMENTS.md). Stop 24 added the last of `_layout_stages`
    # (two questions per image, count asked 3x; resumed from the four-stage weights): 100 / 100 / 97.5 / 100 /
    # 98.0 %, captions 94.6 %; a 400-step stage of count asked 3x at eight questions per image had left count
    # at 96.0 % (97.0 against 96.75 % on 400 questions; captions 91.4 %).
    "minigpt4_grid": Recipe("minigpt4", _layout_stages((5, 6, 7)), init_from=("minigpt4", _ALL)),
    # The laid-out stages on the `blip2` folder (its OPT reads the image at layers 1-3 and answered
    # position 68 %): the Q-Former's queries laid out as a 4 x 4 grid, the direction words grounded at OPT
    # layers 0-1, the answer position's look at layers 3-5 (MiniGPT-4's 5-7 of 12, scaled to 8 layers).
    # After the first four (530 s; steps ran at 0.2-0.4 s here): 99.5 / 99.0 / 96.5 / 95.0 / 96.5 %, captions
    # 86.5 -> 84.3 %: the caption's colour words failed most (30-55 % of them, the first object's too), the
    # answer looks had asked for the named object only. A fifth stage with two questions per image (captions a
    # third of the rows instead of a ninth, four times the scenes per question): at 600 steps 98.5 / 99.5 / 96.5 /
    # 99.5 / 97.0 %, captions 89.2 %; at 1,200 (count asked 3x) 98.5 / 99.5 / 98.0 / 99.5 / 97.0 %, captions
    # 91.8 %, facts 100 %. The BLIP-2 default from stop 24 to stop 28; a variant since.
    "blip2_grid": Recipe("blip2", _layout_stages((3, 4, 5)), init_from=("blip2", _ALL), sizes=_BLIP2_SIZES),
    # BLIP-2 in one folder from `minigpt4_grid`'s tower and already laid-out Q-Former: `blip2`'s language stage
    # (the Q-Former frozen, under bf16) straight onto the laid-out queries and its first joint stage (bf16),
    # then the laid-out stages in fp32; `blip2`'s second joint stage is left out.
    # With `_layout_stages` unchanged (stop 28): 1,806 s, position 99.5 %, captions 93.6 %, but colour of shape
    # 91.5 % and existence 93.5 % -- every colour error another object's colour, the existence errors mostly
    # "yes": binding. So colour of shape is asked twice as often after the first two laid-out stages, the
    # existence pairs take any two colours, and three stages are shortened to make room (colour 98.5 %,
    # existence still 93.5 %, 1,388 s); with `blip2`'s first joint stage back (bf16): 1,870 s (31.2 min here),
    # 99.0 / 100 / 99.0 / 100 / 96.5 %, captions 94.4 %, edits 99.3 / 100 / 98.3 / 100 / 98.3 (existence half a
    # point and the time a minute over the bar). Stop 29 asked existence 3x instead of 2x in the captions stage:
    # 1,730 s (28.8 min), 100 / 99.5 / 97.0 / 100 / 98.0 %, captions 94.0 % -- the BLIP-2 default to stop 32. Cutting
    # the language, joint and direction stages instead (2,600 / 500 / 400 steps) saved 4 min but the laid-out
    # stages never took hold (position 82 %, captions 84.9 %; EXPERIMENTS.md).
    "blip2_laid": Recipe("blip2", _BLIP2_LAID, init_from=("minigpt4_grid", _QFORMER_PARTS), sizes=_BLIP2_SIZES,
                         autocast="bf16"),
    # blip2_laid on the MiniGPT-4 default's tower and laid-out Q-Former (stop 33; the BLIP-2 default since), so the
    # BLIP-2 default reuses only another default's parts: 1,609 s (26.8 min), 100 / 100 / 99.0 / 100 / 99.0 %,
    # facts 100 %, captions 97.0 % (blip2_laid, on minigpt4_grid's: 1,730 s, 100 / 99.5 / 97.0 / 100 / 98.0 %,
    # captions 94.0 %).
    "blip2_one": Recipe("blip2", _BLIP2_LAID, init_from=("minigpt4_one", _QFORMER_PARTS), sizes=_BLIP2_SIZES,
                        autocast="bf16"),
    # MiniGPT-4 in one folder on llava_base's Llama, under bf16 (stop 31) -- its own tower, then the bridge with
    # the layout term on from the start (the Q-Former's queries a 4 x 4 grid before the LM ever reads them),
    # then blip2_laid's shortened laid-out stages (looks at layers 5-7); `minigpt4`'s joint stages are left out,
    # the laid-out ones do that work. Three runs took 24-26 min here (the two-folder chain ~50) and met every bar
    # but count's (95.5-96.5 %); count is asked more often (_COUNT_FAMILIES, _counted) and the vision stage runs
    # 600 steps, not 300 (at 300 MiniGPT-4's tower ends with 91 % of patch shapes right, and no joint stage
    # trains it further here): 1,741 s (29.0 min), 99.5 / 100 / 99.5 / 100 / 99.0 %, facts 100 %, captions
    # 96.8 % (EXPERIMENTS.md, "MiniGPT-4 in one folder"). The MiniGPT-4 default in stops 31-32.
    "minigpt4_laid": Recipe("minigpt4", _MINIGPT4_LAID, init_from=("llava_base", _LLAVA_LLAMA), autocast="bf16"),
    # minigpt4_laid on the LLaVA default's Llama (stop 33; the MiniGPT-4 default since), so the MiniGPT-4 default
    # reuses only another default's parts. With minigpt4_laid's stages unchanged (stop 32): 1,788 s, 100 / 100 /
    # 100 / 100 / 96.5 %, captions 94.7 % -- existence one question under the bar, its 7 errors 4 "yes" and 3 "no"
    # -- so the captions stage asks existence 4x instead of 3x, and the answer-look stage runs 540 steps instead of
    # 600 to keep the time.
    # Stop 33: 100 / 99.5 / 98.5 / 100 / 97.0 %, facts 100 %, captions 95.8 %, in 1,827 s (30.4 min; five of its
    # seven stages ran 8-16 % slower per step than in the stop-32 run); re-run for time, 1,602 s (26.7 min) with
    # byte-identical weights.
    "minigpt4_one": Recipe("minigpt4", tuple(map(_one, _MINIGPT4_LAID)), init_from=("llava_one", _LLAVA_LLAMA),
                           autocast="bf16"),
    # LLaVA in one folder, under bf16 (stop 32; the LLaVA default since): llava_bf16's vision and language stages
    # (the same arithmetic: the language stage ended at llava_bf16's loss to four digits), then the llava
    # variant's answer-look stage cut to 300 steps and the existence-pair stage; no joint stage, so the tower trains
    # in its own stage only, and the projector at 0.3x after the language stage. 1,789 s (29.8 min) here, 100 /
    # 100 / 100 / 100 / 97.5 %, facts 100 %, captions 94.3 %; edits at adapter seeds 0 / 1: 100 / 100 / 99.7 / 100
    # / 96.7 and 100 / 99.7 / 98.0 / 100 / 95.7. A first cut (language 2,200 steps, then one 800-step stage
    # grounding the direction words, the answer position and the existence pairs at once; 1,559 s) ended at shape
    # of colour 94.5, position 81.5 and existence 82.0 %: under 2,400 steps the language stage does not reliably
    # learn position (two shortened llava_bf16 runs lost it too).
    "llava_one": Recipe("llava", (
        *_LLAVA_BASE[:2],
        Stage("attend", "language", 300, train=_LLAVA_GROUNDING, **_ATTEND),
        _LLAVA_PAIRS,
    ), autocast="bf16"),
    # LLaVA's attention stages carried to the Q-Former without laying its queries out.
    # Each look's cells are on the ViT patch grid and reached through the queries' cross-attention
    # (batches.query_spread, object_attention_loss's `through`): a query counts toward a look by its share
    # of cross-attention on the cells, so the Q-Former decides which queries hold which part of the image.
    # minigpt4 -> after the direction stage position 73 % (200 questions: no gain by itself), after the
    # object stage 100 / 96.5 / 95.0 / 90.0 / 94.5 %, after the existence-pair stage (count asked 2x) 100 /
    # 98.5 / 93.5 / 90.5 / 96.0 %, after a stage asking count 3x at 2e-4: 99.5 / 97.5 / 97.0 / 89.0 / 96.5 %,
    # captions 88.4 -> 89.98 % (colour of shape / shape of colour / count / position / exists; EXPERIMENTS.md).
    # A variant, not the default: its edits generalise worse to the held-out count template (T-Gen on
    # count edits 30 %, all edits 85.3 against 100; M-Loc 98.3, the scene gate as selective as before).
    "minigpt4_routed": Recipe("minigpt4", (
        Stage("routed-directions", "language", 600, train=_ROUTED,
              **{**_DIRECTIONS, "family_weights": {**_QFORMER_FAMILIES, "position": 4.0}}),
        Stage("routed-attend", "language", 600, train=_ROUTED,
              **{**_ATTEND, "family_weights": {**_QFORMER_FAMILIES, "position": 4.0}}),
        Stage("routed-pairs", "language", 400, train=_ROUTED,
              **{**_EXISTS_PAIRS,
                 "family_weights": {**_QFORMER_FAMILIES, "exists": 3.0, "position": 2.0, "count": 2.0}}),
        Stage("routed-count", "language", 400, train=_ROUTED,
              **{**_ATTEND, "lr": 2e-4, "exists_pairs": 0.5, "pair_colors": ("blue", "yellow", "purple"),
                 "family_weights": {**_QFORMER_FAMILIES, "count": 3.0, "position": 2.0, "exists": 2.0}}),
    ), init_from=("minigpt4", _ALL)),
}
