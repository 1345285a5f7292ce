"""Tests of estimators.data: corpus loading, split, byte tokenizer, blocks, batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from estimators.data import (
    ByteTokenizer,
    load_documents,
    load_lm_data,
    make_blocks,
    sample_batch,
    split_documents,
    stdlib_files,
)


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    text = "def f(x):\n    \"\"\"Return x² — ünïcode.\"\"\"\n    return x\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.max() < 256
    assert tok.decode(ids) == text
    assert tok.decode(np.r_[ids, tok.eos_id, tok.pad_id]) == text  # specials dropped
    assert tok.vocab_size == 259 and {tok.bos_id, tok.eos_id, tok.pad_id} == {256, 257, 258}
    with pytest.raises(TypeError, match="text"):
        tok.encode(b"bytes")


def test_stdlib_corpus_is_real_text_without_site_packages():
    files = stdlib_files()
    assert len(files) > 100
    assert not any("site-packages" in f.parts or "__pycache__" in f.parts for f in files)
    assert not any("test" in f.parts for f in files)
    names = [f.as_posix() for f in files]
    assert names == sorted(names)
    docs = load_documents("stdlib", max_documents=5)
    assert len(docs) == 5 and all(isinstance(t, str) and t for _, t in docs)


def test_split_is_deterministic_and_order_free():
    docs = [(f"doc{i}.txt", f"text {i}") for i in range(200)]
    tr, va = split_documents(docs, val_fraction=0.1)
    tr2, va2 = split_documents(docs[::-1], val_fraction=0.1)
    assert {n for n, _ in va} == {n for n, _ in va2}
    assert {n for n, _ in tr}.isdisjoint({n for n, _ in va})
    assert len(tr) + len(va) == 200 and 5 <= len(va) <= 40
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(docs, val_fraction=1.5)


def test_blocks_and_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 20)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second document " * 20)
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    docs = load_documents(tmp_path)
    assert [n.rsplit("/", 1)[-1] for n, _ in docs] == ["a.txt", "b.md"]
    blocks = make_blocks(docs, 16)
    total = sum(len(t.encode()) + 1 for _, t in docs)
    assert blocks.shape == (total // 16, 16) and blocks.dtype == torch.int64
    assert int((blocks == ByteTokenizer.eos_id).sum()) >= 1
    assert ByteTokenizer().decode(blocks[0]) == ("hello world " * 20)[:16]
    with pytest.raises(ValueError, match="source"):
        load_documents(tmp_path / "missing")
    with pytest.raises(ValueError, match="seq_len"):
        make_blocks(docs, 1)


def test_load_lm_data_stdlib_quick():
    data = load_lm_data(seq_len=32, max_train_tokens=32 * 50, max_val_tokens=32 * 10)
    assert data.train.shape == (50, 32) and data.val.shape == (10, 32)
    assert data.vocab_size == 259 and data.info["n_val_documents"] >= 1
    assert data.info["n_bytes"] > 1_000_000


def test_sample_batch_reproducible_and_needs_generator():
    blocks = torch.arange(100).reshape(50, 2)
    a = sample_batch(blocks, 8, generator=torch.Generator().manual_seed(1))
    b = sample_batch(blocks, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (8, 2)
    with pytest.raises(TypeError, match="generator"):
        sample_batch(blocks, 8, generator=None)
    with pytest.raises(ValueError, match="batch_size"):
        sample_batch(blocks, 0, generator=torch.Generator())


def test_hf_source_without_datasets_is_a_clear_error():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="datasets"):
            load_documents("hf:openwebtext", max_documents=1)
    else:  # pragma: no cover - would need the network
        pytest.skip("datasets installed; the Hugging Face path needs network access")
