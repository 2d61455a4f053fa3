"""``python -m attrib.defaults [--backbones NAME,...]``: train, evaluate, write the shipped defaults (the
three in ``recipe.DEFAULT_CHAIN`` unless named; any recipe of ``recipe.ORDER`` can be named)."""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from attrib.defaults.recipe import DEFAULT_CHAIN, DEFAULTS_DIR, ORDER, RECIPES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attrib.defaults", description=__doc__)
    parser.add_argument("--backbones", default=",".join(DEFAULT_CHAIN),
                        help="comma-separated, trained in this order (default: the three defaults)")
    parser.add_argument("--out", type=Path, default=DEFAULTS_DIR, help="where the model folders go")
    parser.add_argument("--work", type=Path, default=Path("runs/toy-models"), help="checkpoints (resumable)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step count")
    parser.add_argument("--eval-only", action="store_true", help="only re-measure the shipped models")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    from attrib.defaults.evaluate import evaluate_default
    from attrib.defaults.train import train_default, write_manifest_metrics

    for name in args.backbones.split(","):
        if name not in ORDER:
            parser.error(f"unknown backbone {name!r}; choose from {', '.join(ORDER)}")
        out_dir = args.out / name if args.eval_only else train_default(name, args.out, args.work, scale=args.scale)
        metrics = evaluate_default(RECIPES[name].backbone, out_dir)
        write_manifest_metrics(out_dir, metrics)
        print(name, metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
