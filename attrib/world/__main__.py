"""Write the synthetic world's MMEdit datasets (JSON records, PNG images, truth.json) from one seed.

    python -m attrib.world --seed 0 --out runs/world [--n-train N] [--n-eval N] [--overwrite]

--n-train / --n-eval set both the VQA and the caption counts when given (defaults: VQA 3000 / 1000,
captions 1000 / 300). Failures print one line starting with "error:" and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .dataset import write_world


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m attrib.world", description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, required=True, help="world seed (>= 0); same seed, same bytes")
    p.add_argument("--out", type=Path, required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--n-train", type=int, default=None, help="records in vqa_train and caption_train")
    p.add_argument("--n-eval", type=int, default=None, help="records in vqa_eval and caption_eval")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    counts = {}
    if args.n_train is not None:
        counts.update(n_train=args.n_train, n_caption_train=args.n_train)
    if args.n_eval is not None:
        counts.update(n_eval=args.n_eval, n_caption_eval=args.n_eval)
    start = time.perf_counter()
    try:
        out = write_world(args.out, args.seed, overwrite=args.overwrite, **counts)
    except PermissionError as e:
        print(f"error: cannot write {args.out}: {e.strerror or e} ({e.filename or args.out.parent})", file=sys.stderr)
        return 2
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: writing {args.out} failed: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote world seed={args.seed} to {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
