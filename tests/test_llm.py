"""Model builders: named shapes, reproducible random initialisation, the pretrained path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from estimators.llm import (
    block_linear_names,
    build_llama,
    build_roberta_classifier,
    count_parameters,
    from_pretrained,
    llama_config,
    model_shapes,
    roberta_config,
)

REFERENCE = Path("/work/shared/reference/llama_configs.json")
TINY_ROBERTA = dict(vocab_size=50, num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                    num_attention_heads=2, max_position_embeddings=40)


def test_shapes_match_packaged_reference():
    shapes = model_shapes()
    assert set(shapes) == {"llama_20m", "llama_60m", "llama_100m", "llama_130m", "llama_350m", "roberta_large"}
    if REFERENCE.exists():  # the shared reference file this package copies
        ref = json.loads(REFERENCE.read_text())
        assert shapes == {k: v for k, v in ref.items() if not k.startswith("_")}


@pytest.mark.parametrize("name", ["llama_20m", "llama_60m", "llama_100m", "llama_130m", "llama_350m"])
def test_llama_config_fields(name):
    shape = model_shapes()[name]
    cfg = llama_config(name)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        assert getattr(cfg, key) == shape[key]
    assert cfg.max_position_embeddings == shape["max_sequence_length"]
    assert cfg.attention_dropout == 0.0


def test_llama_20m_parameter_count_from_meta():
    # exact count of the LLaMA-20M shape (vocab 32000, untied head), built on the meta device
    from transformers import LlamaForCausalLM

    cfg = llama_config("llama_20m")
    with torch.device("meta"):
        m = LlamaForCausalLM(cfg)
    h, f, L, v = 256, 688, 4, 32000
    expected = 2 * v * h + L * (4 * h * h + 3 * h * f + 2 * h) + h
    assert count_parameters(m) == expected


def test_roberta_large_config():
    cfg = roberta_config()
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (1024, 4096, 24, 16)
    assert cfg.vocab_size == 50265 and cfg.max_position_embeddings == 514 and cfg.type_vocab_size == 1
    assert cfg.hidden_dropout_prob == 0.0 and cfg.num_labels == 2


def test_build_reproducible_and_global_rng_untouched():
    a = build_llama("llama_20m", vocab_size=40, num_hidden_layers=1, hidden_size=32, intermediate_size=48,
                    num_attention_heads=2, generator=torch.Generator().manual_seed(3))
    b = build_llama("llama_20m", vocab_size=40, num_hidden_layers=1, hidden_size=32, intermediate_size=48,
                    num_attention_heads=2, generator=torch.Generator().manual_seed(3))
    c = build_llama("llama_20m", vocab_size=40, num_hidden_layers=1, hidden_size=32, intermediate_size=48,
                    num_attention_heads=2, generator=torch.Generator().manual_seed(4))
    for (na, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb), na
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    # the autouse fixture of conftest checks that the global RNG was not touched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_roberta_classifier_forward(dtype):
    m = build_roberta_classifier(num_labels=3, dtype=dtype, generator=torch.Generator().manual_seed(0), **TINY_ROBERTA)
    ids = torch.randint(3, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    out = m(input_ids=ids, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.logits.dtype == dtype
    assert torch.isfinite(out.loss)
    names = block_linear_names(m)
    assert names == [
        "roberta.encoder.layer.0.attention.self.query",
        "roberta.encoder.layer.0.attention.self.key",
        "roberta.encoder.layer.0.attention.self.value",
        "roberta.encoder.layer.0.attention.output.dense",
        "roberta.encoder.layer.0.intermediate.dense",
        "roberta.encoder.layer.0.output.dense",
    ]


def test_block_linear_names_llama():
    m = build_llama("llama_20m", vocab_size=40, num_hidden_layers=2, generator=torch.Generator().manual_seed(0))
    names = block_linear_names(m)
    assert len(names) == 14 and "lm_head" not in names
    assert all(n.startswith("model.layers.") for n in names)


def test_from_pretrained_local_directory(tmp_path):
    # the hub path by name, exercised offline on a directory written by save_pretrained
    m = build_roberta_classifier(generator=torch.Generator().manual_seed(0), **TINY_ROBERTA)
    m.save_pretrained(tmp_path)
    loaded = from_pretrained(str(tmp_path), task="sequence-classification", local_files_only=True)
    for (n, p), (_, q) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), n


def test_errors():
    with pytest.raises(ValueError, match="name_or_config"):
        llama_config("llama_7b")
    with pytest.raises(TypeError, match="name_or_config"):
        llama_config(3)
    with pytest.raises(ValueError, match="vocab_size"):
        llama_config("llama_20m", vocab_size=0)
    with pytest.raises(ValueError, match="dropout"):
        roberta_config(dropout=1.5)
    with pytest.raises(TypeError, match="generator"):
        build_llama("llama_20m", num_hidden_layers=1, vocab_size=8, generator=0)
    with pytest.raises(ValueError, match="task"):
        from_pretrained("roberta_large", task="masked-lm")
    with pytest.raises(TypeError, match="model"):
        block_linear_names("not a model")


# ---------------------------------------------------------------- the memory study's worker
MICRO = {"kind": "roberta", "shape": "roberta_large",
         "overrides": {"vocab_size": 50, "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                       "num_attention_heads": 2, "max_position_embeddings": 40}}


def test_memory_worker_in_process():
    from studies._memory_worker import measure

    threads = torch.get_num_threads()
    res = {}
    try:
        for method in ("full_bp", "galore", "mezo", "ipa_lowrank", "zo_lowrank"):
            spec = {"model": MICRO, "method": method, "rank": 4, "batch": 2, "seq_len": 16, "dtype": "float32",
                    "device": "cpu", "seed": 0, "steps": 2, "threads": threads}
            res[method] = measure(spec)
    finally:
        torch.set_num_threads(threads)
    for method, r in res.items():
        assert r["state_bytes"] == r["weight_bytes"] + r["grad_bytes"] + r["opt_bytes"], method
        assert r["peak_bytes"] >= 0 and r["step_s"] > 0 and len(r["losses"]) == 2
    full, ipa = res["full_bp"], res["ipa_lowrank"]
    assert 0.95 * full["weight_bytes"] < full["grad_bytes"] <= full["weight_bytes"]  # weights include buffers
    assert full["opt_bytes"] >= 2 * full["grad_bytes"]  # AdamW: two moments per parameter
    assert res["galore"]["opt_bytes"] < full["opt_bytes"]
    assert 0 < ipa["saved_bytes"] < full["saved_bytes"]
    assert ipa["grad_bytes"] < full["grad_bytes"] / 2
    for method in ("mezo", "zo_lowrank"):
        assert res[method]["saved_bytes"] == 0
    assert res["mezo"]["grad_bytes"] == 0 and res["mezo"]["opt_bytes"] == 0


@pytest.mark.slow
def test_memory_study_quick(tmp_path):
    import csv
    import subprocess
    import sys

    out = tmp_path / "memory"
    subprocess.run([sys.executable, "-m", "studies", "memory", "--quick", "--out", str(out), "--no-progress"],
                   check=True, cwd=Path(__file__).resolve().parent.parent, capture_output=True)
    rows = list(csv.DictReader((out / "memory.csv").open()))
    assert list(rows[0]) == ["model", "method", "rank", "batch", "seq_len", "dtype", "device",
                             "peak_bytes", "saved_bytes", "state_bytes", "step_s"]
    assert [r["method"] for r in rows] == ["full_bp", "galore", "mezo", "lr_full", "ipa_lowrank", "lr_lowrank",
                                           "zo_lowrank"]
    assert all(int(r["peak_bytes"]) > 0 for r in rows)
    for name in ("memory_breakdown.csv", "memory_table.md", "memory.png", "run.json"):
        assert (out / name).exists()
