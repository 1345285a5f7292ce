"""Machinery shared by the studies: output folder, resumable tidy CSV, seeds, run.json.

A study is a function ``run(ctx: StudyContext) -> None`` registered in
:data:`studies.STUDIES`.  It splits its work into *units* (one row group each,
identified by a key of plain values) and hands them to :meth:`StudyContext.run_units`,
which

* skips units whose rows are already in the CSV (an interrupted run resumes
  without redoing or losing finished work),
* gives each unit its own seed derived from ``(--seed, key)`` only, so results
  do not depend on order, resumption or the number of worker processes,
* appends each unit's rows to the CSV as soon as it is done (joblib workers
  stream results back), with a tqdm progress bar,
* and finally rewrites the CSV sorted by key, so that a resumed run and an
  uninterrupted one give the same file.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

__all__ = ["StudyContext", "unit_seed", "set_plot_theme", "save_figure"]


def unit_seed(seed: int, key: Sequence[Any]) -> int:
    """A 63-bit seed that depends only on the study seed and the unit's key."""
    digest = zlib.crc32(repr(tuple(key)).encode())
    ss = np.random.SeedSequence([int(seed), digest])
    return int(ss.generate_state(2, dtype=np.uint32).astype(np.uint64) @ np.array([1, 2**31], dtype=np.uint64))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for mod in ("numpy", "scipy", "torch", "pandas", "statsmodels", "matplotlib", "seaborn", "transformers"):
        m = sys.modules.get(mod)
        if m is None:
            try:
                m = __import__(mod)
            except Exception:  # noqa: BLE001 - optional package
                continue
        versions[mod] = getattr(m, "__version__", "?")
    return versions


@dataclass
class StudyContext:
    """What a study gets: its configuration and the means to write results."""

    name: str
    out: Path
    quick: bool = True
    seed: int = 0
    device: str = "cpu"
    n_jobs: int = 1
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.out = Path(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._t0 = time.perf_counter()
        self._timings: dict[str, float] = {}
        self._config: dict[str, Any] = {}

    # ---------------------------------------------------------------- config
    def record_config(self, **config) -> None:
        """Record configuration values in ``run.json``."""
        self._config.update(config)

    # ---------------------------------------------------------------- CSV
    def csv_path(self, name: str) -> Path:
        return self.out / name

    def read_rows(self, name: str) -> list[dict[str, str]]:
        path = self.csv_path(name)
        if not path.exists():
            return []
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))

    def run_units(
        self,
        name: str,
        columns: Sequence[str],
        key_columns: Sequence[str],
        units: Iterable[dict[str, Any]],
        fn: Callable[..., list[dict[str, Any]]],
        *,
        desc: str | None = None,
    ) -> list[dict[str, str]]:
        """Compute the rows of every unit not yet in ``name`` and append them.

        Parameters
        ----------
        name : str
            CSV file name inside the output folder.
        columns : sequence of str
            The CSV schema (column order).
        key_columns : sequence of str
            Columns that identify a unit (a subset of ``columns``).
        units : iterable of dict
            Each unit's key values, ``{col: value for col in key_columns}``.
        fn : callable
            ``fn(unit: dict, seed: int) -> list[dict]``: the rows of one unit; each
            row holds every column, and the unit's key values.  Must be picklable
            when ``n_jobs > 1``.

        Returns
        -------
        list of dict
            All rows of the CSV (as strings), sorted by key.
        """
        columns = list(columns)
        key_columns = list(key_columns)
        path = self.csv_path(name)
        existing = self.read_rows(name)
        if existing and list(existing[0].keys()) != columns:
            raise ValueError(f"{path} has columns {list(existing[0].keys())}, expected {columns}; use another --out")
        done = {tuple(row[k] for k in key_columns) for row in existing}
        units = list(units)
        todo = [u for u in units if tuple(str(u[k]) for k in key_columns) not in done]
        t0 = time.perf_counter()
        new_file = not path.exists()
        with path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            if new_file:
                writer.writeheader()
                fh.flush()
            results = self._map(fn, todo)
            try:
                from tqdm.auto import tqdm
                results = tqdm(results, total=len(todo), desc=desc or f"{self.name}:{name}",
                               disable=not self.progress or not todo, leave=False)
            except ImportError:  # pragma: no cover
                pass
            for rows in results:
                for row in rows:
                    writer.writerow({c: _fmt(row[c]) for c in columns})
                fh.flush()
                os.fsync(fh.fileno())
        self._timings[name] = self._timings.get(name, 0.0) + time.perf_counter() - t0
        # canonical order: by the position of each unit in ``units``
        order = {tuple(str(u[k]) for k in key_columns): i for i, u in enumerate(units)}
        rows = self.read_rows(name)
        rows.sort(key=lambda row: order.get(tuple(row[k] for k in key_columns), len(order)))
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(path)
        return rows

    def _map(self, fn, todo):
        seeds = [unit_seed(self.seed, tuple(str(v) for v in u.values())) for u in todo]
        if self.n_jobs == 1 or len(todo) <= 1:
            return (fn(u, s) for u, s in zip(todo, seeds))
        from joblib import Parallel, delayed

        return Parallel(n_jobs=self.n_jobs, return_as="generator")(
            delayed(fn)(u, s) for u, s in zip(todo, seeds)
        )

    def write_json(self, name: str, obj) -> Path:
        path = self.out / name
        path.write_text(json.dumps(obj, indent=2, default=str))
        return path

    # ---------------------------------------------------------------- finish
    def finish(self) -> Path:
        """Write ``run.json``: configuration, seed, versions, commit, timings."""
        info = {
            "study": self.name,
            "quick": self.quick,
            "seed": self.seed,
            "device": self.device,
            "n_jobs": self.n_jobs,
            "config": self._config,
            "extra": self.extra,
            "versions": _versions(),
            "git_commit": _git_commit(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "wall_s": time.perf_counter() - self._t0,
            "timings_s": self._timings,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        return self.write_json("run.json", info)


def _fmt(value):
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    return value


def set_plot_theme():
    """The one seaborn theme of every figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=1.1)


def save_figure(fig, out: Path, stem: str) -> list[Path]:
    """Save ``fig`` as PNG and PDF under ``out``; return the paths."""
    paths = []
    for ext in ("png", "pdf"):
        p = Path(out) / f"{stem}.{ext}"
        fig.savefig(p, dpi=130 if ext == "png" else None, bbox_inches="tight")
        paths.append(p)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths
