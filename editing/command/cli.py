"""The editing side of the ``visedit`` command line: ``edit``, ``scenes``, ``compare``, ``caption-tokens``.

As in `attrib.commands`: ``<name>_arguments(parser)`` declares a command's options, ``<name>(args)`` runs
it; `visedit.cli` puts them together and prints raised errors as one line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from attrib.commands import WORLD, add_model_arguments
from attrib.parallel import processes
from editing.adapter.scene_gate import SCENE_SIMILARITIES
from editing.command.compare import CompareOptions, prepare_methods, run_compare
from editing.command.run import TASKS, EditOptions, run_edit
from editing.training.recipe import default_steps


def edit_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--task", default="vqa", choices=TASKS, help="E-VQA (vqa) or E-IC (caption)")
    p.add_argument("--train", type=Path, default=None,
                   help=f"MMEdit training JSON (default: the world's, {WORLD}/<task>_train.json)")
    p.add_argument("--eval", type=Path, default=None,
                   help=f"MMEdit evaluation JSON (default: the world's, {WORLD}/<task>_eval.json)")
    p.add_argument("--images", type=Path, default=None, help="image root (default: each file's folder)")
    p.add_argument("--attribution", type=Path, default=None,
                   help="attribution.json (or its folder) to place from (default: run the attribution first)")
    p.add_argument("--checkpoint", type=Path, default=None, help="trained adapter: evaluate without training")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps of --batch-size edits (default: {default_steps('llava')} for llava, "
                        f"{default_steps('llava', 'caption')} for its captions, {default_steps('blip2')} otherwise)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/edit/<backbone>)")
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in OUT/checkpoint")
    p.add_argument("--skip-bad", action="store_true", help="skip records with a missing image or field")
    p.add_argument("--batch-size", type=int, default=4, help="edits per training step")
    p.add_argument("--lr", type=float, default=None, help="adapter LR (default: 1e-4 for 7B-wide LMs, 1e-3 below)")
    p.add_argument("--seed", type=int, default=0, help="seed of the adapter's initialisation and training draws")
    p.add_argument("--mid-dim", type=int, default=None, help="VEAD / IM width (default: sized from the LM)")
    p.add_argument("--heads", type=int, default=None, help="VEAD attention heads (default: sized from --mid-dim)")
    p.add_argument("--scene-gate", action=argparse.BooleanOptionalAction, default=EditOptions.scene_gate,
                   help="gate each input's edit by its scene match to the edit image (our extension; "
                        "--no-scene-gate: the paper's adapter)")
    p.add_argument("--scene-similarity", choices=SCENE_SIMILARITIES, default=EditOptions.scene_similarity,
                   help="what the scene gate compares: salient (states minus the training images' mean per "
                        "position, weighted by distance from it) or chamfer (the raw states)")
    p.add_argument("--target-role", action=argparse.BooleanOptionalAction, default=EditOptions.target_role,
                   help="mark the edit sample's target tokens for VEAD's keys and values (our extension; "
                        "--no-target-role: the paper's adapter)")
    p.add_argument("--n-eval", type=int, default=None, help="evaluate the first N records only (default: all)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="training steps between checkpoints")
    p.add_argument("--rows-per-backward", type=int, default=0,
                   help="run the layers above the edit site on this many rows at a time, to bound memory on "
                        "large backbones (default: 0 = every row of a step at once)")
    p.add_argument("--same-image-weight", type=float, default=0.0,
                   help="weight of the same-image locality term: other questions about the edit image held to "
                        "their unedited answers (default: 0 = none, the paper's loss)")


def edit(args: argparse.Namespace) -> int:
    """Train VEAD + IM at the attribution's placement and evaluate single edits."""
    options = EditOptions(
        backbone=args.backbone, model=args.model, device=args.device, dtype=args.dtype, task=args.task,
        train=args.train, eval=args.eval,
        images=args.images, attribution=args.attribution, checkpoint=args.checkpoint, steps=args.steps,
        out=args.out, resume=args.resume, skip_bad=args.skip_bad, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, mid_dim=args.mid_dim, heads=args.heads, scene_gate=args.scene_gate,
        scene_similarity=args.scene_similarity, target_role=args.target_role, n_eval=args.n_eval,
        checkpoint_every=args.checkpoint_every, rows_per_backward=args.rows_per_backward,
        same_image_weight=args.same_image_weight, progress=not args.no_progress)
    results = run_edit(options)
    if not results:  # a helper process under `accelerate launch`: the main one reports
        return 0
    v = results["methods"]["visedit"]
    skipped = results["n_skipped"]
    note = f"; skipped {skipped['train']} train / {skipped['eval']} eval records" if sum(skipped.values()) else ""
    print(f"{results['backbone']} on {results['dataset']}: {results['n_eval']} edits, Rel {v['rel']} "
          f"T-Gen {v['t_gen']} M-Gen {v['m_gen']} T-Loc {v['t_loc']} M-Loc {v['m_loc']}{note}; results in "
          f"{options.output()}")
    return 0


def scenes_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--data", type=Path, default=WORLD / "vqa_eval.json", help="MMEdit JSON file")
    p.add_argument("--images", type=Path, default=None, help="image root (default: the file's folder)")
    p.add_argument("--n", type=int, default=None, help="first N records only (default: all)")
    p.add_argument("--edit-layer", type=int, default=-1, help="where to read the visual states (-1 = LM input)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON summary to this file")


def scenes(args: argparse.Namespace) -> int:
    """How well scene similarity separates each record's image_rephrase from its m_loc image, untrained."""
    from attrib.data import load_records
    from attrib.defaults import load_model
    from attrib.io import OutputLock, atomic_write_text
    from editing.adapter.scenes import scene_separation

    with OutputLock(args.out, beside=True) if args.out is not None else contextlib.nullcontext():
        backbone = load_model(args.backbone, args.model, args.device, args.dtype)
        records = load_records(args.data, args.images, n=args.n)
        summary = scene_separation(backbone, records, args.edit_layer, progress=not args.no_progress).to_json()
        text = json.dumps(summary, indent=2)
        if args.out is not None:
            atomic_write_text(args.out, text + "\n")
    print(text)
    return 0


def _roles_arguments(p: argparse.ArgumentParser) -> None:
    """The options that pick the train / dev / test records (`editing.command.compare.data_roles`)."""
    p.add_argument("--test-seed", type=int, default=CompareOptions.test_seed,
                   help="world seed of the test split (not 1, the development world's)")
    p.add_argument("--train", type=Path, default=None, help="MMEdit training JSON (real data; dev is carved from it)")
    p.add_argument("--eval", type=Path, default=None, help="MMEdit test JSON (real data)")
    p.add_argument("--images", type=Path, default=None, help="image root (default: each file's folder)")
    p.add_argument("--n-test", type=int, default=CompareOptions.n_test, help="test edits (the first N)")
    p.add_argument("--dev-n", type=int, default=CompareOptions.dev_n,
                   help="real data: records of --train set aside as dev (drawn with --seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of every method and of the dev draw")


def compare_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--task", default="vqa", choices=TASKS, help="E-VQA (vqa) or E-IC (caption)")
    p.add_argument("--methods", default="all",
                   help="comma-separated methods (default: all): " + ", ".join(_method_names()))
    _roles_arguments(p)
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: runs/compare/<backbone>-<task>, with -lifelong for --edits)")
    p.add_argument("--edits", type=_counts, default=(),
                   help="lifelong editing: comma-separated numbers of edits live at once (e.g. 1,10,100,1000); each "
                        "method whose edits accumulate is scored in chunks of N on the first max(N) test edits")
    p.add_argument("--prepare-only", action="store_true",
                   help="only train the learned methods (visedit, visedit_gated, mend, serac) into OUT/work, for a "
                        "later compare to reuse; the one mode that runs under `accelerate launch`")
    p.add_argument("--set", dest="overrides", metavar="METHOD.KEY=VALUE", type=_override, action="append",
                   default=[], help="replace one value of a method's config file (editing/methods/config/"
                                    "METHOD.yaml) in this run, e.g. ft_l.norm_constraint=4e-4; repeatable; recorded "
                                    "in its results, and a resumed run must ask for the same")
    p.add_argument("--jobs", type=int, default=1,
                   help="methods run side by side, each with its share of the torch threads (default 1); the "
                        "timings each method reports (edit time, latency) are then measured beside the others")
    p.add_argument("--latency-only", action="store_true",
                   help="with --edits: measure again only the latency of the lifelong results already in OUT "
                        "(their scores kept), then rewrite the report")


def _counts(text: str) -> tuple[int, ...]:
    """``"1,10,100"`` → (1, 10, 100), refusing anything but positive whole numbers."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers of edits, got {text!r}")
    return tuple(sorted({int(part) for part in parts}))


def _override(text: str) -> tuple[str, str, object]:
    """``"ft_l.steps=20"`` → ("ft_l", "steps", 20): the value read as a number when it is one, else as YAML
    (true, [a, b], a word)."""
    import yaml

    key, sep, value = text.partition("=")
    method, dot, name = key.strip().partition(".")
    if not sep or not dot or not method or not name or not value.strip():
        raise argparse.ArgumentTypeError(f"expected METHOD.KEY=VALUE (e.g. ft_l.steps=20), got {text!r}")
    for cast in (int, float):
        with contextlib.suppress(ValueError):
            return method, name.strip(), cast(value)
    try:
        return method, name.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is neither a number nor YAML") from None


def _overrides(pairs: list[tuple[str, str, object]]) -> dict[str, dict[str, object]]:
    """``--set`` values as method → key → value (a key given twice keeps the last)."""
    table: dict[str, dict[str, object]] = {}
    for method, key, value in pairs:
        table.setdefault(method, {})[key] = value
    return table


def _method_names() -> list[str]:
    from editing.methods import METHODS

    return list(METHODS)


def compare(args: argparse.Namespace) -> int:
    """Every editing method on one backbone, trained on train, chosen on dev, reported on test."""
    options = CompareOptions(backbone=args.backbone, model=args.model, device=args.device, dtype=args.dtype,
                             task=args.task,
                             methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                             test_seed=args.test_seed, train=args.train, eval=args.eval, images=args.images,
                             n_test=args.n_test, dev_n=args.dev_n, seed=args.seed, out=args.out,
                             progress=not args.no_progress, edits=args.edits,
                             latency_only=args.latency_only, overrides=_overrides(args.overrides), jobs=args.jobs)
    if args.prepare_only:
        prepared = prepare_methods(options, options.method_names())
        if processes().main:
            print(f"prepared {', '.join(prepared) or 'nothing (no learned method among --methods)'} in "
                  f"{options.fitted() / 'work'}; `visedit compare` with the same options reuses them")
        return 0
    results = run_compare(options)
    for name, per_n in results.get("sequential", {}).items():
        print(f"{name:>14}: " + " ".join(f"N={n} mean {scores['mean']}" for n, scores in per_n.items()))
    if options.edits:
        print(f"results in {options.output()}")
        return 0
    for name, method in results["methods"].items():
        print(f"{name:>14}: " + " ".join(f"{k} {method[k]}" for k in ("rel", "t_gen", "m_gen", "t_loc", "m_loc", "mean",
                                                                     "loc_same_image")))
    print(f"results in {options.output()}")
    return 0


def caption_tokens_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--methods", default="visedit_gated,visedit",
                   help="comma-separated methods: " + ", ".join(_method_names()))
    _roles_arguments(p)
    p.add_argument("--out", type=Path, default=None,
                   help="the comparison's folder, whose fits are reused (default: runs/compare/<backbone>-caption)")


def caption_tokens(args: argparse.Namespace) -> int:
    """Which target-caption tokens each editor misses: the edited word or the rest (E-IC)."""
    from editing.command.caption_tokens import RESULT, run_caption_tokens

    options = CompareOptions(backbone=args.backbone, model=args.model, device=args.device, dtype=args.dtype,
                             task="caption", methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                             test_seed=args.test_seed, train=args.train, eval=args.eval, images=args.images,
                             n_test=args.n_test, dev_n=args.dev_n, seed=args.seed, out=args.out,
                             progress=not args.no_progress)
    results = run_caption_tokens(options)
    for name, counts in results["methods"].items():
        print(f"{name:>14}: exact {counts['exact']} (ceiling {counts['exact_ceiling_edited_word_only']}), edited "
              f"word right {counts['edited_right']}, rest right {counts['rest_right']} (unedited "
              f"{counts['rest_right_unedited']})")
    print(f"results in {options.output() / RESULT}")
    return 0
