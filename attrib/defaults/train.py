"""Training the default backbones on the synthetic world (``make toy-models``, ``visedit train-defaults``).

Deterministic for a seed (fixed step counts; every draw from recorded generators), resumable: a
checkpoint in the work folder after every ``save_every`` steps lets a killed run continue where it was.

The checkpoint is two files, no pickle: ``checkpoint-stage<S>-step<N>.safetensors`` (model, patch heads
and optimizer tensors) and ``checkpoint.json`` (stage, step, log, the optimizer's param groups, the
sampler's and torch's RNG states), each written atomically, the JSON last: it names its tensor file and is
the commit point, so a run killed mid-save resumes from the previous complete pair (older tensor files are
removed only after the new JSON is in place). A malformed checkpoint raises `ArtifactError` before
training; a NaN or infinite loss or gradient stops the run with `TrainingDiverged`, the last good
checkpoint kept.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoTokenizer

from attrib.artifact import check_state_dict, optimizer_state, optimizer_tensors, rng_state, rng_text
from attrib.backbones.build import build_backbone, save_backbone, sizes_dict
from attrib.backbones.loader import load_backbone
from attrib.backbones.spec import get_spec
from attrib.backbones.tokenizer import train_bpe_tokenizer
from attrib.defaults import DEFAULTS_DIR
from attrib.defaults.batches import Templates
from attrib.defaults.losses import PatchHeads, language_loss, vision_loss
from attrib.defaults.recipe import PROMPTS, RECIPES, TOKENIZER_EXTRA, TOKENIZER_VOCAB, Recipe, Stage
from attrib.errors import ArtifactError, TrainingDiverged
from attrib.io import atomic_write, atomic_write_json, read_json, read_safetensors, require, stored_path
from attrib.world import SIZES, WorldConfig, WorldSampler, answer_words, corpus_lines

DEFAULT_OUT = Path("runs/toy-models/models")  # the shipped folders are refreshed only when asked (--out)
DEFAULT_WORK = Path("runs/toy-models/checkpoints")
CHECKPOINT = "checkpoint.json"
CHECKPOINT_FORMAT = "visedit-defaults-train/1"
PICKLED_CHECKPOINT = "checkpoint.pt"  # what earlier versions wrote; never read (no pickle)


def world_tokenizer(seed: int = 0):
    """The BPE shared by all defaults: every world answer word is one token."""
    lines = corpus_lines(seed, 4000) + list(TOKENIZER_EXTRA) * 50
    return train_bpe_tokenizer(lines, TOKENIZER_VOCAB, whole_words=answer_words() + list(SIZES))


def _run_tokenizer(work: Path, seed: int):
    """The run's tokenizer, saved in its work folder at the start so a resumed run uses the very same
    vocabulary even if the world's text changed in between."""
    folder = work / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer = world_tokenizer(seed)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _schedule(stage: Stage, step: int) -> float:
    """LR factor: linear warm-up, then cosine down to 10 %."""
    if step < stage.warmup:
        return (step + 1) / stage.warmup
    progress = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _param_groups(model, stage: Stage) -> list[dict]:
    groups = {prefix: [] for prefix in stage.train}
    for name, param in model.named_parameters():
        prefix = next((p for p in stage.train if name == p or name.startswith(p + ".")), None)
        param.requires_grad_(prefix is not None)
        if prefix is not None:
            groups[prefix].append(param)
    empty = [p for p, params in groups.items() if not params]
    if empty:
        raise ValueError(f"stage {stage.name!r}: no parameters under {empty}")
    return [{"params": params, "lr": stage.lr * stage.train[p], "base_lr": stage.lr * stage.train[p]}
            for p, params in groups.items()]


def _optimizer(model, heads: PatchHeads, stage: Stage) -> torch.optim.AdamW:
    """AdamW over the parameters ``stage`` trains (and the patch heads in a vision stage)."""
    groups = _param_groups(model, stage)
    if stage.kind == "vision":
        groups.append({"params": list(heads.parameters()), "lr": stage.lr, "base_lr": stage.lr})
    return torch.optim.AdamW(groups, weight_decay=0.01)


def _init_from(model, recipe: Recipe, folder: Path) -> None:
    """Copy the parameters the recipe's ``init_from`` mapping names from the default in ``folder``."""
    source_name, mapping = recipe.init_from
    source = load_backbone(RECIPES[source_name].backbone, folder).model.state_dict()
    target = model.state_dict()
    copied = 0
    for key, value in source.items():
        for src_prefix, dst_prefix in mapping.items():
            if key.startswith(src_prefix):
                dst = dst_prefix + key[len(src_prefix):]
                if target[dst].shape != value.shape:
                    raise ValueError(f"init {recipe.backbone} from {source_name}: {key} {tuple(value.shape)} "
                                     f"vs {dst} {tuple(target[dst].shape)}")
                target[dst].copy_(value)
                copied += 1
    if not copied:
        raise ValueError(f"init {recipe.backbone} from {source_name}: nothing matched {list(mapping)}")


def _source_folder(recipe: Recipe, out_root: Path) -> Path:
    """Where a recipe's ``init_from`` default is read: ``out_root``, else the shipped folder."""
    name = recipe.init_from[0]
    for folder in (out_root / name, DEFAULTS_DIR / name):
        if (folder / "config.json").is_file():
            return folder
    raise FileNotFoundError(f"{out_root / name}: the {recipe.backbone} recipe starts from the {name} default, "
                            f"found neither there nor in {DEFAULTS_DIR}; train {name} first")


def _start(name: str, recipe: Recipe, out_root: Path, work: Path):
    """The untrained model of a recipe (its start copied in when it has one), processor and patch heads.
    The order of seeded draws here is part of the recipe: keep it."""
    torch.manual_seed(recipe.seed)
    # A default that starts from another one's weights must share its vocabulary exactly.
    source = _source_folder(recipe, out_root) if recipe.init_from else None
    tokenizer = (AutoTokenizer.from_pretrained(source, local_files_only=True) if source is not None
                 else _run_tokenizer(work, recipe.seed))
    for option in ("is_local", "local_files_only"):  # how it was loaded, not what it is: keep it out of the save
        tokenizer.init_kwargs.pop(option, None)
    model, processor = build_backbone(recipe.backbone, recipe.sizes, tokenizer, seed=recipe.seed)
    if source is not None:
        _init_from(model, recipe, source)
    model.eval()  # no dropout: training only needs gradients, and eval mode keeps steps deterministic
    heads = PatchHeads(recipe.sizes.vision_hidden, recipe.sizes.image_size // recipe.sizes.patch_size)
    return model, processor, heads


@dataclass
class _Run:
    """One training run: what every stage of it shares."""

    name: str
    recipe: Recipe
    model: torch.nn.Module
    processor: object
    heads: PatchHeads
    checkpoint: Path  # the state JSON; its tensor file lies beside it
    log: dict  # finished stages and wall time, saved in every checkpoint
    started: float  # time.time() at the start, less the wall time of the runs this one resumes
    default_attention: str  # the model's own attention implementation (stages may switch to eager)
    save_every: int
    scale: float


def _tensors(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` under ``prefix``, contiguous on the CPU; tied tensors (one storage) copied apart, since
    safetensors refuses to store shared memory."""
    out, seen = {}, set()
    for key, value in state.items():
        value = value.detach().cpu().contiguous()
        storage = value.untyped_storage().data_ptr()
        out[prefix + key] = value.clone() if storage in seen else value
        seen.add(storage)
    return out


def _save_checkpoint(run: _Run, stage: int, step: int, optimizer: torch.optim.Optimizer,
                     sampler: WorldSampler) -> None:
    """The tensors of (stage, step), then the JSON naming them, then older tensor files removed."""
    folder = run.checkpoint.parent
    name = f"checkpoint-stage{stage}-step{step:07d}.safetensors"
    moments, groups = optimizer_tensors(optimizer)
    tensors = {**_tensors("model.", run.model.state_dict()), **_tensors("heads.", run.heads.state_dict()),
               **_tensors("optimizer.", moments)}
    atomic_write(folder / name, lambda tmp: save_file(tensors, tmp))
    atomic_write_json(run.checkpoint, {
        "format": CHECKPOINT_FORMAT, "stage": stage, "step": step, "tensors": name,
        "optimizer": {"param_groups": groups}, "sampler_rng": sampler.rng.bit_generator.state,
        "torch_rng": rng_text(), "log": run.log}, indent=1)
    for old in folder.glob("checkpoint-stage*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def _read_checkpoint(work: Path, model: torch.nn.Module, heads: PatchHeads, n_stages: int) -> dict | None:
    """The committed checkpoint in ``work`` with its model and heads weights loaded into ``model`` and
    ``heads``, or None when there is none. Every field, the tensor file and its tensors (names, shapes,
    finite values) are checked first; anything malformed raises `ArtifactError` naming file and field."""
    path = work / CHECKPOINT
    if not path.exists():
        if (work / PICKLED_CHECKPOINT).exists():
            raise ArtifactError(f"{work / PICKLED_CHECKPOINT}: a pickled checkpoint of an earlier version, which "
                                f"is not read (no pickle); delete it to train {work.name} from the start")
        return None
    state, where = read_json(path, "default-model training checkpoint"), str(path)
    if require(state, "format", str, where, default=None) != CHECKPOINT_FORMAT:
        raise ArtifactError(f"{path}: not a default-model training checkpoint (format {state.get('format')!r}, "
                            f"expected {CHECKPOINT_FORMAT!r})")
    stage, step = require(state, "stage", int, where), require(state, "step", int, where)
    if not 0 <= stage <= n_stages or step < 0:
        raise ArtifactError(f"{path}: stage {stage}, step {step} is not a point of this recipe's {n_stages} stages")
    name = require(state, "tensors", str, where)
    if Path(name).name != name or not (work / name).is_file():
        raise ArtifactError(f"{path}, field 'tensors': {name!r} is not a file in {work}; the checkpoint is incomplete")
    log = require(state, "log", dict, where)
    require(log, "stages", list, f"{where}, in 'log'")
    require(log, "wall_s", float, f"{where}, in 'log'")
    require(require(state, "optimizer", dict, where), "param_groups", list, f"{where}, in 'optimizer'")
    try:  # numpy checks a bit generator's state as it is set
        np.random.default_rng().bit_generator.state = require(state, "sampler_rng", dict, where)
    except (TypeError, ValueError, KeyError, OverflowError) as error:
        raise ArtifactError(f"{path}, field 'sampler_rng': not a numpy PCG64 state ({error})") from None
    torch_rng = rng_state(require(state, "torch_rng", str, where), f"{path}, field 'torch_rng'")
    tensors, _ = read_safetensors(work / name, "default-model checkpoint tensors")
    parts = {prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
             for prefix in ("model.", "heads.", "optimizer.")}
    unknown = sorted(k for k in tensors if not k.startswith(tuple(parts)))
    if unknown:
        raise ArtifactError(f"{work / name}: unexpected tensor {unknown[0]!r} (not model., heads. or optimizer.)")
    check_state_dict(parts["model."], model.state_dict(), work / name, "this recipe's model")
    check_state_dict(parts["heads."], heads.state_dict(), work / name, "this recipe's patch heads")
    model.load_state_dict(parts["model."])
    heads.load_state_dict(parts["heads."])
    return {**state, "torch_rng": torch_rng, "optimizer_tensors": parts["optimizer."], "tensor_file": work / name}


def _resume_stage(state: dict, optimizer: torch.optim.Optimizer, sampler: WorldSampler, steps: int,
                  checkpoint: Path) -> int:
    """Restore the optimizer and RNG states of a checkpoint taken mid-stage (read by `_read_checkpoint`
    from ``checkpoint``); returns the step to go on from."""
    if state["step"] >= steps:
        raise ArtifactError(f"{checkpoint}: step {state['step']} of stage {state['stage']}, which has {steps} steps "
                            f"at this scale; resume with the scale the run started with")
    optimizer.load_state_dict(optimizer_state(state["optimizer_tensors"], state["optimizer"]["param_groups"],
                                              optimizer, state["tensor_file"], f"{checkpoint}, in 'optimizer'"))
    sampler.rng.bit_generator.state = state["sampler_rng"]
    torch.set_rng_state(state["torch_rng"])
    return state["step"]


def _diverged(run: _Run, stage: Stage, step: int, steps: int, term: str, value: torch.Tensor) -> TrainingDiverged:
    return TrainingDiverged(f"{run.name}: stage {stage.name!r}, step {step} of {steps}: {term} is {value.item()}; "
                            f"stopped before the update, the last good checkpoint stays in {run.checkpoint}")


def _run_stage(run: _Run, index: int, state: dict | None) -> None:
    """Train stage ``index`` of the run's recipe (resuming mid-stage from ``state``), checkpointing every
    ``save_every`` steps and at its end; a non-finite loss or gradient raises `TrainingDiverged`."""
    recipe, model, processor, heads, log = run.recipe, run.model, run.processor, run.heads, run.log
    stage = recipe.stages[index]
    spec = get_spec(recipe.backbone)
    templates = Templates(spec.prompt_template, spec.text_template)
    bf16 = recipe.autocast == "bf16" and not stage.fp32
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    steps = max(1, round(stage.steps * run.scale))
    sampler = WorldSampler(WorldConfig(), seed=recipe.seed * 1000 + index)
    world = sampler.config
    optimizer = _optimizer(model, heads, stage)
    first = 0
    if state and index == state["stage"] and state["step"] > 0:  # mid-stage; at a boundary start fresh
        first = _resume_stage(state, optimizer, sampler, steps, run.checkpoint)
    # Attention weights come from eager attention only (sdpa returns none). Every stage under bf16 autocast
    # runs eager: sdpa's bf16 backward on the CPU took a third of a step.
    eager = stage.attend_layers or stage.layout_weight or bf16  # direction_layers need attend_layers
    model.set_attn_implementation("eager" if eager else run.default_attention)
    bar = tqdm(range(first, steps), desc=f"{run.name}:{stage.name}", initial=first, total=steps,
               file=sys.stderr, mininterval=5)
    metric = 0.0
    for step in bar:
        nominal = step * stage.steps // steps
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * _schedule(stage, nominal)
        sampler.config = replace(world, max_objects=stage.object_limit(nominal) or world.max_objects)
        with precision:
            if stage.kind == "vision":
                loss, metric = vision_loss(model, processor, spec, heads, sampler, stage.batch_images)
            else:
                loss = language_loss(model, processor, spec, templates, sampler, stage)
        if not torch.isfinite(loss):
            raise _diverged(run, stage, step + 1, steps, f"the {stage.kind} loss", loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        if not torch.isfinite(norm):
            raise _diverged(run, stage, step + 1, steps, f"the gradient norm of the {stage.kind} loss", norm)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", **({"patch_shape_acc": f"{metric:.3f}"} if metric else {}))
        done = step + 1
        if done % run.save_every == 0 or done == steps:
            log["wall_s"] = time.time() - run.started
            if done == steps:
                log["stages"].append({"name": stage.name, "steps": steps, "final_loss": round(loss.item(), 4),
                                      "wall_s_total": round(log["wall_s"], 1)})
            _save_checkpoint(run, index + (done == steps), 0 if done == steps else done, optimizer, sampler)


def train_default(name: str, out_root: Path = DEFAULT_OUT, work_root: Path = DEFAULT_WORK,
                  save_every: int = 100, scale: float = 1.0) -> Path:
    """Train default ``name`` (a backbone: "llava", "minigpt4", "blip2") by its recipe, write it to
    ``out_root/name`` and return that folder.

    Resumable: a checkpoint in ``work_root/name`` after every ``save_every`` steps lets a killed run go on
    where it was, to the same weights. ``scale`` multiplies every stage's step count (tests use a tiny
    fraction). A recipe that starts from another default reads it from ``out_root`` or, failing that, from
    the shipped folder.
    """
    recipe = RECIPES[name]
    if recipe.autocast not in (None, "bf16"):
        raise ValueError(f"recipe {name!r}: autocast must be None or 'bf16', got {recipe.autocast!r}")
    work = work_root / name
    work.mkdir(parents=True, exist_ok=True)
    model, processor, heads = _start(name, recipe, out_root, work)
    state = _read_checkpoint(work, model, heads, len(recipe.stages))
    log = state["log"] if state else {"stages": [], "wall_s": 0.0}
    run = _Run(name, recipe, model, processor, heads, work / CHECKPOINT, log, time.time() - log["wall_s"],
               model.config._attn_implementation, save_every, scale)
    for index in range(len(recipe.stages)):
        if state and index < state["stage"]:
            continue
        _run_stage(run, index, state)
        state = None
    model.set_attn_implementation(run.default_attention)
    return _write_default(run, out_root / name, time.time() - run.started)


def _write_default(run: _Run, out_dir: Path, wall_s: float) -> Path:
    """Save the trained model (fp16 on disk keeps each folder small) with its manifest."""
    recipe, name, scale = run.recipe, run.name, run.scale
    spec = get_spec(recipe.backbone)
    manifest = {
        "backbone": recipe.backbone, "name": name, "seed": recipe.seed,
        "command": f"make toy-models BACKBONES={name} OUT={stored_path(out_dir.parent)}",
        "stages": run.log["stages"], "wall_s": round(wall_s, 1), "sizes": sizes_dict(recipe.sizes),
        "prompt_template": spec.prompt_template, "text_template": spec.text_template, "prompts": PROMPTS,
        "image_tokens": _image_token_note(spec),
        "init_from": recipe.init_from[0] if recipe.init_from else None, "scale": scale,
        "autocast": recipe.autocast,
        **({"fp32_stages": [s.name for s in recipe.stages if s.fp32]} if recipe.autocast else {}),
    }
    return save_backbone(run.model.half(), run.processor, out_dir, manifest)


def _image_token_note(spec) -> str:
    if spec.placeholder_expansion == "template":
        return ("the template's <image> is expanded in place into num_query_tokens <image> tokens "
                "(attrib.backbones.TemplateProcessor, saved as template_processor.json)")
    return f"{spec.processor_class} expands the images into <image> tokens"


def write_manifest_metrics(out_dir: Path, metrics: dict) -> None:
    manifest_file = out_dir / "manifest.json"
    manifest = read_json(manifest_file, "default model manifest")
    require(manifest, "backbone", str, str(manifest_file))  # an object, as `_write_default` wrote it
    manifest["heldout"] = metrics
    atomic_write_json(manifest_file, manifest)
