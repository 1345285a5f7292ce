"""Command line: ``python -m studies`` lists; ``python -m studies NAME ...`` runs one."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from . import STUDIES
from ._core import StudyContext


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies", description=__doc__)
    p.add_argument("name", nargs="?", help="study name, or 'all' for every study")
    p.add_argument("--quick", action="store_true", help="small settings: minutes on 2 CPU cores")
    p.add_argument("--out", type=Path, default=None, help="output folder (default results/NAME)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="torch device")
    p.add_argument("--seed", type=int, default=0, help="study seed (every unit's seed derives from it)")
    p.add_argument("--n-jobs", type=int, default=1, help="joblib worker processes for replications")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def run_study(name: str, *, quick: bool, out: Path | None, device: str, seed: int,
              n_jobs: int = 1, progress: bool = True) -> Path:
    if name not in STUDIES:
        raise SystemExit(f"unknown study {name!r}; known: {', '.join(STUDIES)}")
    module, func, _ = STUDIES[name]
    fn = getattr(importlib.import_module(f"studies.{module}"), func)
    ctx = StudyContext(name=name, out=out or Path("results") / name, quick=quick, seed=seed,
                       device=device, n_jobs=n_jobs, progress=progress)
    fn(ctx)
    return ctx.finish()


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    if args.name is None:
        print("studies (python -m studies NAME [--quick]):")
        for name, (_, _, desc) in STUDIES.items():
            print(f"  {name:<20s} {desc}")
        print("  all                  every study above, in order")
        return 0
    names = list(STUDIES) if args.name == "all" else [args.name]
    for name in names:
        t0 = time.perf_counter()
        out = (args.out / name) if (args.out is not None and args.name == "all") else args.out
        path = run_study(name, quick=args.quick, out=out, device=args.device, seed=args.seed,
                         n_jobs=args.n_jobs, progress=not args.no_progress)
        print(f"[{name}] done in {time.perf_counter() - t0:.1f} s -> {path.parent}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
