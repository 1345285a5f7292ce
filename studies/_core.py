"""Machinery shared by the studies: output folder, resumable tidy CSV, seeds, run.json.

A study is a function ``run(ctx: StudyContext) -> None`` registered in
:data:`studies.STUDIES`.  It splits its work into *units* (one row group each,
identified by a key of plain values) and hands them to :meth:`StudyContext.run_units`,
which

* skips units already completed (an interrupted run resumes without redoing or
  losing finished work),
* gives each unit its own seed derived from ``(--seed, unit)`` only, so results
  do not depend on order, resumption or the number of worker processes,
* appends each unit's rows to the CSV as soon as it is done (joblib workers
  stream results back), with a tqdm progress bar,
* and finally rewrites the CSV in the canonical unit order, so that a resumed
  run and an uninterrupted one give the same file, byte for byte.

Crash safety.  Beside ``NAME.csv`` a journal ``.NAME.units.jsonl`` records, after
a unit's rows are written and flushed to disk, the unit's key and its number of
rows.  On resume a unit counts as done only if the journal lists it *and* the CSV
holds exactly that many of its rows; anything else (a unit killed half-way, a
truncated last line) is dropped and recomputed.  The journal's first line holds
the run's identity (columns, seed, quick, overridden parameters): resuming into a
folder written with another identity is refused, naming the difference.

Parallelism.  With ``n_jobs`` other than 1, units fan out through
:class:`joblib.Parallel`, which honours an enclosing
``joblib.parallel_config(backend=...)``: the same study runs on a Dask or Ray
cluster without code changes (``n_jobs=None`` takes the number of workers from
that context too).
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import socket
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

__all__ = [
    "StudyContext",
    "unit_seed",
    "make_generator",
    "set_plot_theme",
    "save_figure",
    "quick_from_env",
]


def unit_seed(seed: int, key: Sequence[Any]) -> int:
    """A 63-bit seed that depends only on the study seed and the unit's key.

    Examples
    --------
    >>> unit_seed(0, ("haar", 4)) == unit_seed(0, ("haar", 4))
    True
    >>> unit_seed(0, ("haar", 4)) != unit_seed(1, ("haar", 4))
    True
    """
    digest = zlib.crc32(repr(tuple(key)).encode())
    ss = np.random.SeedSequence([int(seed), digest])
    return int(ss.generate_state(2, dtype=np.uint32).astype(np.uint64) @ np.array([1, 2**31], dtype=np.uint64))


def make_generator(seed: int, device: str = "cpu"):
    """A ``torch.Generator`` on ``device`` seeded with ``seed`` (never the global RNG).

    Examples
    --------
    >>> g = make_generator(3)
    >>> g.initial_seed()
    3
    """
    import torch

    return torch.Generator(device=device).manual_seed(int(seed))


def quick_from_env(default: bool = True) -> bool:
    """``LRSGE_QUICK`` as a bool (``"0"``/``"false"``/``"no"`` are False): the notebooks' switch."""
    value = os.environ.get("LRSGE_QUICK")
    if value is None:
        return default
    return value.strip().lower() not in ("0", "false", "no", "off", "")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_commit() -> str | None:
    return _git("rev-parse", "HEAD") or None


def _git_dirty() -> bool | None:
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for mod in ("numpy", "scipy", "torch", "pandas", "statsmodels", "matplotlib", "seaborn",
                "joblib", "transformers"):
        m = sys.modules.get(mod)
        if m is None:
            try:
                m = __import__(mod)
            except Exception:  # noqa: BLE001 - optional package
                continue
        versions[mod] = getattr(m, "__version__", "?")
    return versions


def _fmt(value):
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    return value


def _plain(value):
    """numpy scalars as Python ones (for JSON)."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def _key_str(value) -> str:
    """How a key value reads back from the CSV."""
    return str(_fmt(value))


def _coerce(text: str, like):
    """Parse a ``--set`` string to the type of the default ``like``."""
    if isinstance(like, bool):
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a bool, got {text!r}")
    if isinstance(like, int):
        return int(text)
    if isinstance(like, float):
        return float(text)
    if isinstance(like, (list, tuple)):
        items = [s for s in text.split(",") if s.strip()]
        elem = like[0] if len(like) else ""
        return type(like)(_coerce(s, elem) for s in items)
    return text


@dataclass
class StudyContext:
    """What a study gets: its configuration and the means to write results.

    Parameters
    ----------
    name : str
        Study name.
    out : path
        Output folder (created).
    quick : bool, default True
        Small settings (minutes on 2 CPU cores) or the full ones.
    seed : int, default 0
        Study seed; every unit's seed derives from it and the unit's key.
    device : str, default "cpu"
        Torch device for the studies that use one.
    n_jobs : int or None, default None
        joblib workers for the units; ``None`` follows the active
        ``joblib.parallel_config`` (sequential outside one), ``1`` is sequential.
    progress : bool, default True
        Show tqdm progress bars.
    extra : dict
        Parameter overrides (``--set NAME=VALUE``), read through :meth:`param`.
    fresh : bool, default False
        Discard earlier results in ``out`` instead of resuming them.
    """

    name: str
    out: Path
    quick: bool = True
    seed: int = 0
    device: str = "cpu"
    n_jobs: int | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)
    fresh: bool = False

    def __post_init__(self):
        self.out = Path(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._t0 = time.perf_counter()
        self._timings: dict[str, float] = {}
        self._config: dict[str, Any] = {}
        self._units: dict[str, dict[str, int]] = {}
        self._checks: list[dict[str, Any]] = []
        self._used_extra: set[str] = set()
        self._freshened: set[str] = set()

    # ---------------------------------------------------------------- config
    def record_config(self, **config) -> None:
        """Record configuration values in ``run.json``."""
        self._config.update(config)

    def param(self, name: str, quick, full=None):
        """A study parameter: the ``--set`` override if given, else the quick or full default.

        The value is recorded in ``run.json``.  An override string is parsed to
        the type of the default (comma-separated for lists).

        Examples
        --------
        >>> import tempfile
        >>> ctx = StudyContext("demo", tempfile.mkdtemp(), quick=True, extra={"n_reps": "50"})
        >>> ctx.param("n_reps", 1000, 100000), ctx.param("ranks", [1, 2], [1, 2, 4])
        (50, [1, 2])
        """
        default = quick if (self.quick or full is None) else full
        if name in self.extra:
            self._used_extra.add(name)
            raw = self.extra[name]
            try:
                value = _coerce(raw, default) if isinstance(raw, str) else raw
            except ValueError as exc:
                raise ValueError(f"--set {name}={raw!r}: {exc}") from exc
        else:
            value = default
        self._config[name] = value
        return value

    def add_check(self, name: str, passed: bool, **detail) -> None:
        """Record the outcome of a check of the results against theory (in ``run.json``)."""
        self._checks.append({"check": name, "passed": bool(passed), **{k: _plain(v) for k, v in detail.items()}})

    @property
    def checks(self) -> list[dict[str, Any]]:
        return list(self._checks)

    # ---------------------------------------------------------------- CSV
    def csv_path(self, name: str) -> Path:
        return self.out / name

    def journal_path(self, name: str) -> Path:
        return self.out / f".{Path(name).stem}.units.jsonl"

    def read_rows(self, name: str) -> list[dict[str, str]]:
        path = self.csv_path(name)
        if not path.exists():
            return []
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))

    def _identity(self, columns, key_columns) -> dict[str, Any]:
        return {
            "columns": list(columns),
            "key_columns": list(key_columns),
            "seed": int(self.seed),
            "quick": bool(self.quick),
            "params": {k: str(v) for k, v in sorted(self.extra.items())},
        }

    def _resume_state(self, name, columns, key_columns):
        """Rows of completed units (others dropped) and the completed keys."""
        path, jpath = self.csv_path(name), self.journal_path(name)
        identity = self._identity(columns, key_columns)
        if self.fresh and name not in self._freshened:
            for p in (path, jpath):
                if p.exists():
                    p.unlink()
        self._freshened.add(name)
        header = None
        entries: dict[tuple, int] = {}
        if jpath.exists():
            with jpath.open() as fh:
                lines = fh.read().splitlines()
            for i, line in enumerate(lines):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if i == 0 and "identity" in obj:
                    header = obj["identity"]
                elif "key" in obj:
                    entries[tuple(obj["key"])] = int(obj["rows"])
        raw_text = path.read_text() if path.exists() else ""
        rows = self.read_rows(name) if raw_text else []
        if raw_text:
            found = list(csv.reader(io.StringIO(raw_text.splitlines()[0])))[0]
            if found != list(columns):
                raise ValueError(
                    f"{path} has columns {found}, expected {list(columns)}; use another --out or --fresh"
                )
        if header is not None:
            diff = {k: (header.get(k), v) for k, v in identity.items() if header.get(k) != v}
            if diff:
                what = ", ".join(f"{k}: earlier {a!r}, now {b!r}" for k, (a, b) in diff.items())
                raise ValueError(
                    f"{self.out} holds results of another configuration ({what}); "
                    "use another --out, or --fresh to discard them"
                )
        elif rows:
            # results written before journals existed: trust complete rows
            for row in rows:
                if None in row.values():
                    continue
                k = tuple(row[c] for c in key_columns)
                entries[k] = entries.get(k, 0) + 1
        counts: dict[tuple, int] = {}
        for row in rows:
            if None in row.values() or None in row:
                continue
            k = tuple(row[c] for c in key_columns)
            counts[k] = counts.get(k, 0) + 1
        done = {k for k, n in entries.items() if counts.get(k) == n}
        kept = [row for row in rows
                if None not in row.values() and None not in row
                and tuple(row[c] for c in key_columns) in done]
        # rewrite the CSV and the journal whenever something was dropped or is missing
        clean = (header is not None and len(kept) == len(rows) and set(entries) == done
                 and (not raw_text or raw_text.endswith("\n")))
        if not clean:
            self._write_csv(path, columns, kept)
            with jpath.open("w") as fh:
                fh.write(json.dumps({"identity": identity}) + "\n")
                for k in done:
                    fh.write(json.dumps({"key": list(k), "rows": entries[k]}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        return done

    @staticmethod
    def _write_csv(path: Path, columns, rows) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows(rows)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)

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
        """Compute the rows of every unit not yet done and append them to ``name``.

        Parameters
        ----------
        name : str
            CSV file name inside the output folder.
        columns : sequence of str
            The CSV schema (column order).
        key_columns : sequence of str
            Columns that identify a unit (a subset of ``columns``).
        units : iterable of dict
            Each unit's parameters; must include ``{col: value for col in
            key_columns}`` and may carry more (passed to ``fn``, and part of the
            unit's seed, except entries whose name starts with ``_``, such as a
            path that differs between output folders).
        fn : callable
            ``fn(unit: dict, seed: int) -> list[dict]``: the rows of one unit; each
            row holds every column, and the unit's key values.  Must be a
            module-level (picklable) function when units run in worker processes.
        desc : str, optional
            Progress-bar label.

        Returns
        -------
        list of dict
            All rows of the CSV (as strings), in the order of ``units``.

        Notes
        -----
        A unit's seed is :func:`unit_seed` of the study seed and the unit's
        values, so a resumed, a parallel and an uninterrupted run give the same
        rows; the final CSV is rewritten in the order of ``units``.
        """
        columns = list(columns)
        key_columns = list(key_columns)
        missing = [k for k in key_columns if k not in columns]
        if missing:
            raise ValueError(f"`key_columns` {missing} are not in `columns` {columns}")
        path, jpath = self.csv_path(name), self.journal_path(name)
        units = list(units)
        keys = [tuple(_key_str(u[k]) for k in key_columns) for u in units]
        if len(set(keys)) != len(keys):
            raise ValueError(f"units of {name} have duplicate keys over {key_columns}")
        done = self._resume_state(name, columns, key_columns)
        todo = [u for u, k in zip(units, keys) if k not in done]
        stats = self._units.setdefault(name, {"computed": 0, "resumed": 0})
        stats["resumed"] += len(units) - len(todo)
        t0 = time.perf_counter()
        if not path.exists():
            self._write_csv(path, columns, [])
        if todo:
            results = self._map(fn, todo)
            if self.progress:
                try:
                    from tqdm.auto import tqdm
                except ImportError:  # pragma: no cover
                    tqdm = None
                if tqdm is not None:
                    label = desc or f"{self.name}:{name}"
                    if len(units) != len(todo):
                        label += f" (resuming, {len(units) - len(todo)} done)"
                    results = tqdm(results, total=len(todo), desc=label, leave=False)
            with path.open("a", newline="") as fh, jpath.open("a") as jh:
                for rows in results:
                    rows = list(rows)
                    if not rows:
                        raise ValueError(f"a unit of {name} returned no rows")
                    ukeys = {tuple(_key_str(row[k]) for k in key_columns) for row in rows}
                    if len(ukeys) != 1:
                        raise ValueError(f"the rows of one unit of {name} have several keys: {sorted(ukeys)}")
                    buf = io.StringIO()
                    writer = csv.DictWriter(buf, fieldnames=columns)
                    for row in rows:
                        absent = [c for c in columns if c not in row]
                        if absent:
                            raise ValueError(f"a row of {name} lacks columns {absent}")
                        writer.writerow({c: _fmt(row[c]) for c in columns})
                    fh.write(buf.getvalue())  # one write per unit
                    fh.flush()
                    os.fsync(fh.fileno())
                    jh.write(json.dumps({"key": list(ukeys.pop()), "rows": len(rows)}) + "\n")
                    jh.flush()
                    os.fsync(jh.fileno())
                    stats["computed"] += 1
        self._timings[name] = self._timings.get(name, 0.0) + time.perf_counter() - t0
        # canonical order: by the position of each unit in ``units``
        order = {k: i for i, k in enumerate(keys)}
        rows = self.read_rows(name)
        rows.sort(key=lambda row: order.get(tuple(row[k] for k in key_columns), len(order)))
        self._write_csv(path, columns, rows)
        return rows

    def _map(self, fn, todo):
        # keys starting with "_" (paths, handles) do not enter the seed
        seeds = [unit_seed(self.seed, tuple(str(v) for k, v in u.items() if not str(k).startswith("_")))
                 for u in todo]
        n_jobs = self.n_jobs
        if n_jobs is None:
            from joblib.parallel import get_active_backend

            n_jobs = get_active_backend()[1]
        if n_jobs in (None, 1) or len(todo) <= 1:
            return (fn(u, s) for u, s in zip(todo, seeds))
        from joblib import Parallel, delayed

        return Parallel(n_jobs=n_jobs, return_as="generator_unordered")(
            delayed(fn)(u, s) for u, s in zip(todo, seeds)
        )

    def write_json(self, name: str, obj) -> Path:
        path = self.out / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        tmp.replace(path)
        return path

    # ---------------------------------------------------------------- finish
    def finish(self) -> Path:
        """Write ``run.json``: configuration, seed, versions, commit, timings, checks."""
        unused = sorted(set(self.extra) - self._used_extra)
        info = {
            "study": self.name,
            "quick": self.quick,
            "seed": self.seed,
            "device": self.device,
            "n_jobs": self.n_jobs,
            "command": " ".join(sys.argv),
            "config": self._config,
            "overrides": self.extra,
            "unused_overrides": unused,
            "units": self._units,
            "checks": self._checks,
            "checks_passed": all(c["passed"] for c in self._checks),
            "versions": _versions(),
            "git_commit": _git_commit(),
            "git_dirty": _git_dirty(),
            "platform": platform.platform(),
            "hostname": socket.gethostname(),
            "cpu_count": os.cpu_count(),
            "wall_s": time.perf_counter() - self._t0,
            "timings_s": self._timings,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        return self.write_json("run.json", info)


def set_plot_theme():
    """The one seaborn theme of every figure."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules and "ipykernel" not in sys.modules:
        matplotlib.use("Agg", force=False)  # headless outside Jupyter
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
