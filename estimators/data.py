r"""Text corpora and token blocks for causal-language-model pretraining.

Three sources, one result (:class:`LMData`):

* ``"stdlib"`` (the offline default): the Python standard library's own ``.py``
  sources (code, comments and docstrings) under ``sysconfig``'s ``stdlib`` path,
  without ``site-packages``, test suites and caches.  It is real English-and-code
  text present on every machine that runs this package, with no download
  (CPython 3.11: 799 files, 12.6 MB).
* local text files: a file, a directory (every file with a suffix in
  ``suffixes``, recursively) or a list of them.
* a Hugging Face dataset name (``"hf:openwebtext"``, ``"hf:allenai/c4:en"``)
  through :mod:`datasets` when it is installed (it is optional; the literature
  pretrains on OpenWebText and C4).

Documents are split into train and validation by a hash of their name, so the
split does not depend on the order in which files are listed, on the machine or
on a seed.  Each side is tokenised (byte-level, :class:`ByteTokenizer`), joined
with an end-of-text token and cut into fixed-length blocks.  Mini-batches are
drawn by :func:`sample_batch` from a ``torch.Generator`` passed in, so every
method trained with the same generator seed sees the same tokens.
"""

from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from theory._checks import check_int, check_positive

from ._checks import check_generator

__all__ = [
    "ByteTokenizer",
    "LMData",
    "stdlib_files",
    "load_documents",
    "split_documents",
    "make_blocks",
    "load_lm_data",
    "sample_batch",
]


class ByteTokenizer:
    """Byte-level tokenizer: the 256 byte values plus ``<bos>``, ``<eos>``, ``<pad>``.

    Lossless for any UTF-8 text and needs no training or download.

    Attributes
    ----------
    vocab_size : int
        259 (256 bytes and three specials).
    bos_id, eos_id, pad_id : int
        256, 257, 258.

    Examples
    --------
    >>> tok = ByteTokenizer()
    >>> ids = tok.encode("héllo")
    >>> ids.tolist()
    [104, 195, 169, 108, 108, 111]
    >>> tok.decode(ids)
    'héllo'
    """

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str) -> np.ndarray:
        """UTF-8 bytes of ``text`` as an ``int64`` array."""
        if not isinstance(text, str):
            raise TypeError(f"`text` must be a str, got {type(text).__name__}")
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        """Inverse of :meth:`encode`; special tokens are dropped, invalid UTF-8 replaced."""
        arr = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids).astype(np.int64).ravel()
        return bytes(arr[arr < 256].astype(np.uint8).tolist()).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


def stdlib_files(*, include_tests=False) -> list[Path]:
    """The ``.py`` files of the running interpreter's standard library, sorted.

    Parameters
    ----------
    include_tests : bool, default False
        Also take the ``test``/``tests`` packages (CPython's own test suite).

    Returns
    -------
    list of pathlib.Path
        Files under ``sysconfig.get_paths()["stdlib"]`` excluding
        ``site-packages`` (third-party code differs between machines) and
        ``__pycache__``.

    Examples
    --------
    >>> files = stdlib_files()
    >>> any(f.name == "functools.py" for f in files)
    True
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    if not include_tests:
        skip |= {"test", "tests"}
    files = [f for f in root.rglob("*.py") if not skip.intersection(f.relative_to(root).parts)]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def load_documents(source="stdlib", *, suffixes=(".py", ".txt", ".md", ".rst"), max_documents=None):
    """Load the documents of a corpus as ``(name, text)`` pairs.

    Parameters
    ----------
    source : str, path or list of paths, default "stdlib"
        ``"stdlib"``: :func:`stdlib_files`; ``"hf:NAME"`` or ``"hf:NAME:CONFIG"``:
        the ``train`` split of a Hugging Face dataset's ``text`` column (needs
        the optional ``datasets`` package and, the first time, network access);
        otherwise a file, a directory or a list of files/directories.
    suffixes : tuple of str
        File suffixes taken from a directory.
    max_documents : int, optional
        Keep only the first documents (in name order; a Hugging Face dataset is
        streamed and cut).

    Returns
    -------
    list of (str, str)
        ``(name, text)``, sorted by name for files.

    Raises
    ------
    ValueError
        A path that does not exist, or no documents found.
    ImportError
        ``"hf:..."`` without the ``datasets`` package.
    """
    if max_documents is not None:
        max_documents = check_int(max_documents, "max_documents", minimum=1)
    if isinstance(source, str) and source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = stdlib_files()
        docs = [(f.relative_to(root).as_posix(), _read(f)) for f in files[:max_documents]]
    elif isinstance(source, str) and source.startswith("hf:"):
        docs = _hf_documents(source[3:], max_documents)
    else:
        paths = [source] if isinstance(source, (str, Path)) else list(source)
        files = []
        for p in paths:
            p = Path(p)
            if p.is_dir():
                files += [f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes]
            elif p.is_file():
                files.append(p)
            else:
                raise ValueError(f"`source` path does not exist: {str(p)!r}")
        files = sorted(set(files), key=lambda f: f.as_posix())
        docs = [(f.as_posix(), _read(f)) for f in files[:max_documents]]
    if not docs:
        raise ValueError(f"`source` yielded no documents, got source={source!r}")
    return docs


def _hf_documents(spec: str, max_documents):
    try:
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise ImportError(
            f"source 'hf:{spec}' needs the optional `datasets` package (pip install datasets)"
        ) from exc
    name, _, config = spec.partition(":")
    ds = datasets.load_dataset(name, config or None, split="train", streaming=max_documents is not None)
    docs = []
    for i, row in enumerate(ds):
        if max_documents is not None and i >= max_documents:
            break
        docs.append((f"{name}/{i:09d}", row["text"]))
    return docs


def split_documents(docs, *, val_fraction=0.05):
    """Deterministic train/validation split by a CRC-32 hash of each name.

    A document goes to validation when ``crc32(name) mod 10⁶ < val_fraction·10⁶``,
    so the split is independent of order and seed.  If that leaves one side
    empty, the last document (by name) is moved across.

    Returns
    -------
    (list, list)
        Train and validation ``(name, text)`` lists.
    """
    val_fraction = check_positive(val_fraction, "val_fraction")
    if val_fraction >= 1:
        raise ValueError(f"`val_fraction` must be in (0, 1), got val_fraction={val_fraction}")
    docs = list(docs)
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to split, got {len(docs)}")
    cut = int(round(val_fraction * 1_000_000))
    train, val = [], []
    for name, text in docs:
        (val if zlib.crc32(name.encode()) % 1_000_000 < cut else train).append((name, text))
    if not val:
        val.append(train.pop())
    elif not train:
        train.append(val.pop())
    return train, val


def make_blocks(docs, seq_len, *, tokenizer=None, max_tokens=None) -> torch.Tensor:
    """Tokenise, join with ``<eos>`` and cut into non-overlapping blocks.

    Parameters
    ----------
    docs : list of (str, str)
    seq_len : int
        Tokens per block (``>= 2``).
    tokenizer : ByteTokenizer, optional
        Anything with ``encode(str) -> int array`` and ``eos_id``.
    max_tokens : int, optional
        Cut the token stream to this length first.

    Returns
    -------
    torch.Tensor
        ``int64`` of shape ``(n_blocks, seq_len)``; the incomplete tail is dropped.
    """
    seq_len = check_int(seq_len, "seq_len", minimum=2)
    tok = tokenizer or ByteTokenizer()
    parts = []
    eos = np.array([tok.eos_id], dtype=np.int64)
    for _, text in docs:
        parts += [np.asarray(tok.encode(text), dtype=np.int64), eos]
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if max_tokens is not None:
        stream = stream[: check_int(max_tokens, "max_tokens", minimum=seq_len)]
    n = stream.size // seq_len
    if n == 0:
        raise ValueError(f"corpus has {stream.size} tokens, fewer than one block of seq_len={seq_len}")
    return torch.from_numpy(stream[: n * seq_len].reshape(n, seq_len).copy())


@dataclass(frozen=True)
class LMData:
    """Token blocks of a corpus, split into train and validation.

    Attributes
    ----------
    train, val : torch.Tensor
        ``int64`` blocks, shapes ``(n_train, seq_len)`` and ``(n_val, seq_len)``.
    vocab_size : int
    source : str
    info : dict
        ``n_documents``, ``n_train_documents``, ``n_val_documents``, ``n_bytes``,
        ``train_tokens``, ``val_tokens``, ``seq_len``.
    """

    train: torch.Tensor
    val: torch.Tensor
    vocab_size: int
    source: str
    info: dict = field(default_factory=dict)


def load_lm_data(source="stdlib", *, seq_len=128, val_fraction=0.05, tokenizer=None,
                 max_documents=None, max_train_tokens=None, max_val_tokens=None) -> LMData:
    """Corpus → deterministic split → byte tokens → fixed-length blocks.

    Parameters
    ----------
    source : str, path or list, default "stdlib"
        See :func:`load_documents`.
    seq_len : int, default 128
    val_fraction : float, default 0.05
        Share of documents (by name hash) held out for validation.
    tokenizer : ByteTokenizer, optional
    max_documents, max_train_tokens, max_val_tokens : int, optional
        Caps (for quick runs).

    Returns
    -------
    LMData

    Examples
    --------
    >>> data = load_lm_data(seq_len=64, max_train_tokens=4096, max_val_tokens=1024)
    >>> data.train.shape, data.val.shape, data.vocab_size
    (torch.Size([64, 64]), torch.Size([16, 64]), 259)
    """
    tok = tokenizer or ByteTokenizer()
    docs = load_documents(source, max_documents=max_documents)
    train_docs, val_docs = split_documents(docs, val_fraction=val_fraction)
    train = make_blocks(train_docs, seq_len, tokenizer=tok, max_tokens=max_train_tokens)
    val = make_blocks(val_docs, seq_len, tokenizer=tok, max_tokens=max_val_tokens)
    info = {
        "n_documents": len(docs),
        "n_train_documents": len(train_docs),
        "n_val_documents": len(val_docs),
        "n_bytes": int(sum(len(t.encode("utf-8", errors="replace")) for _, t in docs)),
        "train_tokens": int(train.numel()),
        "val_tokens": int(val.numel()),
        "seq_len": seq_len,
    }
    return LMData(train=train, val=val, vocab_size=int(tok.vocab_size), source=str(source), info=info)


def sample_batch(blocks, batch_size, *, generator) -> torch.Tensor:
    """Draw ``batch_size`` blocks uniformly with replacement.

    Parameters
    ----------
    blocks : torch.Tensor, shape (n_blocks, seq_len)
    batch_size : int
    generator : torch.Generator
        Required: the draw must be reproducible and never use the global RNG.

    Returns
    -------
    torch.Tensor
        ``(batch_size, seq_len)``.

    Examples
    --------
    >>> blocks = torch.arange(20).reshape(10, 2)
    >>> sample_batch(blocks, 3, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([3, 2])
    """
    if not isinstance(blocks, torch.Tensor) or blocks.ndim != 2:
        raise ValueError(f"`blocks` must be a 2-D tensor, got {type(blocks).__name__}"
                         f"{tuple(blocks.shape) if isinstance(blocks, torch.Tensor) else ''}")
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    if generator is None:
        raise TypeError("`generator` is required (a torch.Generator), got None")
    check_generator(generator)
    idx = torch.randint(blocks.shape[0], (batch_size,), generator=generator, device=generator.device)
    return blocks[idx.to(blocks.device)]
