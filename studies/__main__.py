"""Command line of the studies.

``python -m studies`` lists the studies; ``python -m studies NAME [NAME ...] [options]``
runs them; ``python -m studies all --quick`` runs every study in quick mode.  Results
go to ``results/NAME/`` (``--out DIR``; with several studies, ``DIR/NAME``): tidy CSV,
PNG and PDF figures and ``run.json``.  With several studies a failing one is
reported and the others still run (exit status 1).  Rerunning into the same folder resumes: units
already written are skipped (``--fresh`` discards them instead).

Examples::

    python -m studies                                  # list
    python -m studies projector-moments --quick        # one study, small settings
    python -m studies mse-vs-samples --n-jobs 2        # full settings, 2 worker processes
    python -m studies unbiasedness --quick --set n_reps=2000
    python -m studies all --quick --out /tmp/res       # everything, minutes on a laptop
    python -m studies projector-moments --quick --figures docs/figures   # refresh a README figure
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

from . import STUDIES
from ._core import StudyContext

__all__ = ["main", "run_study", "export_figures"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME", help="study names, or 'all' for every study")
    p.add_argument("--quick", action="store_true", help="small settings: minutes on 2 CPU cores")
    p.add_argument("--out", type=Path, default=None, help="output folder (default results/NAME)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="torch device")
    p.add_argument("--seed", type=int, default=0, help="study seed (every unit's seed derives from it)")
    p.add_argument("--n-jobs", type=int, default=None,
                   help="joblib workers for the units (-1: all cores; default: joblib's active "
                        "configuration, i.e. sequential unless run inside parallel_config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="override a study parameter (repeatable; lists comma-separated)")
    p.add_argument("--fresh", action="store_true", help="discard earlier results in the output folder")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads during each study (default: the study's QUICK_THREADS "
                        "with --quick, e.g. 1 for the Monte Carlo studies whose tiny models run fastest "
                        "single-threaded; torch's default otherwise)")
    p.add_argument("--figures", type=Path, default=None, metavar="DIR",
                   help="also copy each study's PNG figures, downscaled, into DIR (e.g. docs/figures)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _parse_overrides(items) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"--set expects NAME=VALUE, got {item!r}")
        out[name.strip()] = value.strip()
    return out


def run_study(name: str, *, quick: bool, out: Path | None, device: str = "cpu", seed: int = 0,
              n_jobs: int | None = None, progress: bool = True, overrides: dict | None = None,
              fresh: bool = False, threads: int | None = None) -> Path:
    """Run one study and return the path of its ``run.json``.

    Parameters
    ----------
    name : str
        A key of :data:`studies.STUDIES`.
    quick : bool
        Small settings.
    out : path or None
        Output folder (default ``results/NAME``).
    device, seed, n_jobs, progress, overrides, fresh
        See :class:`studies.StudyContext`.
    threads : int, optional
        ``torch.set_num_threads`` for the duration of the study (restored after).
        ``None``: the study module's ``QUICK_THREADS`` in quick mode, if it has
        one, else torch's setting is left alone.

    Examples
    --------
    >>> import tempfile, json
    >>> path = run_study("projector-moments", quick=True, out=tempfile.mkdtemp(), progress=False,
    ...                  overrides={"n_reps": "200", "ranks": "1,2", "n": "4"})  # doctest: +SKIP
    """
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; known: {', '.join(STUDIES)}")
    module, func, _ = STUDIES[name]
    mod = importlib.import_module(f"studies.{module}")
    fn = getattr(mod, func)
    if threads is None and quick:
        threads = getattr(mod, "QUICK_THREADS", None)
    ctx = StudyContext(name=name, out=out or Path("results") / name, quick=quick, seed=seed,
                       device=device, n_jobs=n_jobs, progress=progress,
                       extra=dict(overrides or {}), fresh=fresh)
    if threads is None:
        fn(ctx)
        return ctx.finish()
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    ctx.record_config(torch_threads=int(threads))
    try:
        fn(ctx)
    finally:
        torch.set_num_threads(before)
    return ctx.finish()


def export_figures(study_dir: Path, dest: Path, *, max_width: int = 900, colors: int = 64) -> list[Path]:
    """Copy the PNG figures of a study folder into ``dest``: at most ``max_width`` pixels wide,
    quantised to a ``colors``-colour palette (tens of kB each).

    The small copies are what the README's tour shows (``docs/figures``).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for png in sorted(Path(study_dir).glob("*.png")):
        target = dest / png.name
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - Pillow ships with matplotlib
            target.write_bytes(png.read_bytes())
        else:
            with Image.open(png) as im:
                im = im.convert("RGB")
                if im.width > max_width:
                    im = im.resize((max_width, round(im.height * max_width / im.width)), Image.LANCZOS)
                im.quantize(colors=colors).save(target, optimize=True)
        written.append(target)
    return written


def _summarise(path: Path) -> str:
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return ""
    checks = info.get("checks", [])
    if not checks:
        return ""
    failed = [c for c in checks if not c.get("passed")]
    line = f"{len(checks) - len(failed)}/{len(checks)} checks against theory passed"
    for c in failed[:10]:
        why = c.get("why") or c.get("detail") or ""
        line += f"\n    not passed: {c['check']}" + (f" ({why})" if why else "")
    return line


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    if not args.names:
        print("studies (python -m studies NAME [--quick] [--out DIR] [--seed S] [--n-jobs J]):")
        for name, (_, _, desc) in STUDIES.items():
            print(f"  {name:<20s} {desc}")
        print("  all                  every study above, in order")
        return 0
    unknown = [n for n in args.names if n != "all" and n not in STUDIES]
    if unknown:
        print(f"unknown study {unknown[0]!r}; known: {', '.join(STUDIES)}, all", file=sys.stderr)
        return 2
    several = len(args.names) > 1 or args.names == ["all"]
    names = list(STUDIES) if "all" in args.names else list(dict.fromkeys(args.names))
    overrides = _parse_overrides(args.overrides)
    threads = args.threads
    if threads is not None and threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {threads}")
    failures = []
    t_all = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        out = (args.out / name) if (args.out is not None and several) else args.out
        try:
            path = run_study(name, quick=args.quick, out=out, device=args.device, seed=args.seed,
                             n_jobs=args.n_jobs, progress=not args.no_progress,
                             overrides=overrides, fresh=args.fresh, threads=threads)
        except KeyboardInterrupt:
            print(f"[{name}] interrupted: rerun the same command to resume", file=sys.stderr)
            return 130
        except Exception:  # noqa: BLE001 - report, go on with the other studies
            if not several:
                raise
            failures.append(name)
            print(f"[{name}] FAILED after {time.perf_counter() - t0:.1f} s:", file=sys.stderr)
            traceback.print_exc()
            continue
        print(f"[{name}] done in {time.perf_counter() - t0:.1f} s -> {path.parent}", flush=True)
        if args.figures is not None:
            for fig in export_figures(path.parent, args.figures):
                print(f"    figure -> {fig}", flush=True)
        summary = _summarise(path)
        if summary:
            print(f"    {summary}", flush=True)
    if several:
        print(f"[all] {len(names) - len(failures)}/{len(names)} studies done in "
              f"{time.perf_counter() - t_all:.1f} s" + (f"; failed: {', '.join(failures)}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
