r"""Builders of the transformer models the paper trains: LLaMA shapes and RoBERTa-large.

The shapes come from ``estimators/_data/llama_configs.json`` (a copy of the
project's reference file: the LLaMA-20M … 350M shapes of the GaLore/APOLLO
pretraining benchmarks, and RoBERTa-large).  The builders return
:mod:`transformers` models with **random** weights, initialised reproducibly
from a ``torch.Generator``; :func:`from_pretrained` is the real pretrained-weight
path by Hugging Face name, for users who can reach the hub.

Notes
-----
Hugging Face initialisers draw from torch's global RNG and take no generator.
The builders therefore construct the model inside
``torch.random.fork_rng`` seeded from a 63-bit seed drawn from ``generator``:
the weights are a deterministic function of the generator's state, and the
caller's global RNG state is left exactly as it was.

Dropout also draws from the global RNG (and would make the two forward passes
of a zeroth-order estimator differ), so the builders set every dropout
probability to ``0`` unless ``dropout`` is given.

Examples
--------
>>> import torch
>>> from estimators.llm import build_llama, block_linear_names
>>> m = build_llama("llama_20m", vocab_size=128, num_hidden_layers=1,
...                 generator=torch.Generator().manual_seed(0))
>>> len(block_linear_names(m))
7
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from importlib import resources

import torch
from torch import nn

from theory._checks import check_choice, check_int

from ._checks import check_generator, resolve_dtype

__all__ = [
    "PRETRAINED_NAMES",
    "model_shapes",
    "llama_config",
    "roberta_config",
    "build_llama",
    "build_roberta_classifier",
    "from_pretrained",
    "block_linear_names",
    "count_parameters",
]

#: Hugging Face hub names of the pretrained checkpoints behind our shape names.
PRETRAINED_NAMES = {
    "roberta_large": "FacebookAI/roberta-large",
}

# Fields of the real ``roberta-large`` config.json that the shape file does not list
# (values as published in FacebookAI/roberta-large/config.json on the hub).
_ROBERTA_LARGE_EXTRA = {
    "type_vocab_size": 1,
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}

# LLaMA fields shared by the GaLore configs (silu MLP, RMSNorm eps 1e-6, init std 0.02).
_LLAMA_EXTRA = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "use_cache": False,
}


@lru_cache(maxsize=1)
def _shapes() -> dict:
    text = resources.files("estimators").joinpath("_data/llama_configs.json").read_text()
    return json.loads(text)


def model_shapes() -> dict[str, dict]:
    """The named shapes of ``estimators/_data/llama_configs.json`` (a fresh copy).

    Returns
    -------
    dict
        ``{name: {hidden_size, intermediate_size, num_attention_heads, ...}}`` for
        ``llama_20m``, ``llama_60m``, ``llama_100m``, ``llama_130m``,
        ``llama_350m`` and ``roberta_large``.

    Examples
    --------
    >>> model_shapes()["llama_60m"]["hidden_size"]
    512
    """
    return {k: dict(v) for k, v in _shapes().items() if not k.startswith("_")}


def _shape(name: str, prefix: str) -> dict:
    shapes = model_shapes()
    choices = [k for k in shapes if k.startswith(prefix)]
    check_choice(name, "name_or_config", choices)
    return shapes[name]


def _dropout_fields(dropout, names) -> dict:
    if dropout is None:
        return {}
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"`dropout` must be a float in [0, 1) or None, got dropout={dropout!r}")
    return {n: float(dropout) for n in names}


def llama_config(name_or_config, *, vocab_size=None, max_position_embeddings=None, dropout=0.0, **overrides):
    """A :class:`transformers.LlamaConfig` for a named shape (or a dict of fields).

    Parameters
    ----------
    name_or_config : str, dict or LlamaConfig
        ``"llama_20m"``, ``"llama_60m"``, ``"llama_100m"``, ``"llama_130m"``,
        ``"llama_350m"``; a dict of config fields; or a config (copied).
    vocab_size : int, optional
        Overrides the shape's vocabulary (32000/32100, the t5-base tokenizer).
    max_position_embeddings : int, optional
        Defaults to the shape's ``max_sequence_length`` (1024).
    dropout : float or None, default 0.0
        Attention dropout; ``None`` keeps the config's value.
    **overrides
        Any other config field (``num_hidden_layers=2`` for a shallow model).

    Returns
    -------
    transformers.LlamaConfig

    Examples
    --------
    >>> llama_config("llama_100m").vocab_size
    32100
    """
    from transformers import LlamaConfig

    if isinstance(name_or_config, LlamaConfig):
        cfg = copy.deepcopy(name_or_config)
    else:
        if isinstance(name_or_config, str):
            fields = _shape(name_or_config, "llama_")
        elif isinstance(name_or_config, dict):
            fields = dict(name_or_config)
        else:
            raise TypeError(
                "`name_or_config` must be a shape name, a dict or a LlamaConfig, "
                f"got {type(name_or_config).__name__}"
            )
        fields = {**_LLAMA_EXTRA, **fields}
        if "max_sequence_length" in fields:
            fields.setdefault("max_position_embeddings", fields.pop("max_sequence_length"))
        fields.pop("parameters", None)
        cfg = LlamaConfig(**fields)
    if vocab_size is not None:
        cfg.vocab_size = check_int(vocab_size, "vocab_size", minimum=1)
    if max_position_embeddings is not None:
        cfg.max_position_embeddings = check_int(max_position_embeddings, "max_position_embeddings", minimum=1)
    for key, value in {**_dropout_fields(dropout, ["attention_dropout"]), **overrides}.items():
        setattr(cfg, key, value)
    return cfg


def roberta_config(name_or_config="roberta_large", *, num_labels=2, vocab_size=None, dropout=0.0, **overrides):
    """A :class:`transformers.RobertaConfig` for RoBERTa-large (or a dict of fields).

    Parameters
    ----------
    name_or_config : str, dict or RobertaConfig, default "roberta_large"
    num_labels : int, default 2
        Classes of the sequence-classification head.
    vocab_size : int, optional
        Overrides 50265 (a small vocabulary keeps the embedding cheap in tests).
    dropout : float or None, default 0.0
        Hidden, attention and classifier dropout; ``None`` keeps the config's.
    **overrides
        Any other field (``num_hidden_layers=2``).

    Returns
    -------
    transformers.RobertaConfig

    Examples
    --------
    >>> roberta_config().hidden_size
    1024
    """
    from transformers import RobertaConfig

    if isinstance(name_or_config, RobertaConfig):
        cfg = copy.deepcopy(name_or_config)
    else:
        if isinstance(name_or_config, str):
            fields = {**_ROBERTA_LARGE_EXTRA, **_shape(name_or_config, "roberta")}
        elif isinstance(name_or_config, dict):
            fields = dict(name_or_config)
        else:
            raise TypeError(
                "`name_or_config` must be a shape name, a dict or a RobertaConfig, "
                f"got {type(name_or_config).__name__}"
            )
        fields.pop("parameters", None)
        cfg = RobertaConfig(**fields)
    cfg.num_labels = check_int(num_labels, "num_labels", minimum=1)
    if vocab_size is not None:
        cfg.vocab_size = check_int(vocab_size, "vocab_size", minimum=1)
    drop = _dropout_fields(dropout, ["hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"])
    for key, value in {**drop, **overrides}.items():
        setattr(cfg, key, value)
    return cfg


def _seed_from(generator) -> int:
    generator = check_generator(generator)
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


def _construct(cls, cfg, *, generator, dtype, device):
    out_dtype, _ = resolve_dtype(torch.float32 if dtype is None else dtype)
    seed = _seed_from(generator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    model.to(dtype=out_dtype)
    if device is not None:
        model.to(device=torch.device(device))
    return model


def build_llama(name_or_config, *, vocab_size=None, dtype=None, device=None, generator=None, **overrides):
    """A randomly initialised :class:`transformers.LlamaForCausalLM` of a named shape.

    Parameters
    ----------
    name_or_config : str, dict or LlamaConfig
        See :func:`llama_config`.
    vocab_size : int, optional
        Overrides the shape's vocabulary.
    dtype : torch.dtype, default float32
    device : torch.device or str, optional
    generator : torch.Generator, optional
        Seeds the initialisation (see the module notes); ``None`` is non-deterministic.
    **overrides
        Passed to :func:`llama_config`.

    Returns
    -------
    transformers.LlamaForCausalLM
        In training mode.

    Examples
    --------
    >>> import torch
    >>> m = build_llama("llama_20m", vocab_size=64, num_hidden_layers=1,
    ...                 generator=torch.Generator().manual_seed(0))
    >>> m(torch.zeros(1, 5, dtype=torch.long)).logits.shape
    torch.Size([1, 5, 64])
    """
    from transformers import LlamaForCausalLM

    cfg = llama_config(name_or_config, vocab_size=vocab_size, **overrides)
    return _construct(LlamaForCausalLM, cfg, generator=generator, dtype=dtype, device=device).train()


def build_roberta_classifier(name_or_config="roberta_large", *, num_labels=2, vocab_size=None, dtype=None,
                             device=None, generator=None, **overrides):
    """A randomly initialised :class:`transformers.RobertaForSequenceClassification`.

    Parameters
    ----------
    name_or_config : str, dict or RobertaConfig, default "roberta_large"
        See :func:`roberta_config`.
    num_labels : int, default 2
    vocab_size : int, optional
    dtype : torch.dtype, default float32
    device : torch.device or str, optional
    generator : torch.Generator, optional
        Seeds the initialisation; ``None`` is non-deterministic.
    **overrides
        Passed to :func:`roberta_config` (``num_hidden_layers=2``, ``dropout=0.1``).

    Returns
    -------
    transformers.RobertaForSequenceClassification
        In training mode.  For pretrained weights use
        ``from_pretrained("roberta_large", task="sequence-classification")``.

    Examples
    --------
    >>> import torch
    >>> m = build_roberta_classifier(vocab_size=64, num_hidden_layers=1, hidden_size=32,
    ...     intermediate_size=64, num_attention_heads=2, generator=torch.Generator().manual_seed(0))
    >>> m(torch.full((2, 6), 5)).logits.shape
    torch.Size([2, 2])
    """
    from transformers import RobertaForSequenceClassification

    cfg = roberta_config(name_or_config, num_labels=num_labels, vocab_size=vocab_size, **overrides)
    return _construct(RobertaForSequenceClassification, cfg, generator=generator, dtype=dtype,
                      device=device).train()


_TASKS = ("causal-lm", "sequence-classification")


def from_pretrained(name, *, task="sequence-classification", num_labels=None, dtype=None, **kwargs):
    """Load pretrained weights by Hugging Face name (needs hub access or a local copy).

    Parameters
    ----------
    name : str
        A shape name of :data:`PRETRAINED_NAMES` (``"roberta_large"`` →
        ``"FacebookAI/roberta-large"``), a hub id, or a local directory written by
        ``save_pretrained``.
    task : {"sequence-classification", "causal-lm"}
    num_labels : int, optional
        Classes of a new classification head (its weights are random: transformers
        initialises the missing head).
    dtype : torch.dtype, default float32
    **kwargs
        Passed to ``AutoModelFor*.from_pretrained`` (``revision``, ``cache_dir``,
        ``local_files_only`` …).

    Returns
    -------
    transformers.PreTrainedModel

    Notes
    -----
    Nothing in this project downloads weights; the test suite exercises this path
    on a local directory only.

    Examples
    --------
    >>> from estimators.llm import from_pretrained
    >>> model = from_pretrained("roberta_large", num_labels=2)  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if not isinstance(name, str) or not name:
        raise TypeError(f"`name` must be a non-empty string, got name={name!r}")
    check_choice(task, "task", _TASKS)
    out_dtype, _ = resolve_dtype(torch.float32 if dtype is None else dtype)
    hub_name = PRETRAINED_NAMES.get(name, name)
    if task == "sequence-classification":
        if num_labels is not None:
            kwargs["num_labels"] = check_int(num_labels, "num_labels", minimum=1)
        return AutoModelForSequenceClassification.from_pretrained(hub_name, dtype=out_dtype, **kwargs)
    if num_labels is not None:
        raise ValueError(f"`num_labels` applies to task='sequence-classification', got task={task!r}")
    return AutoModelForCausalLM.from_pretrained(hub_name, dtype=out_dtype, **kwargs)


def block_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the ``nn.Linear`` layers inside the transformer blocks.

    These are the layers the paper makes low-rank (attention projections and MLP);
    embeddings, the LM head and the classification head are left out.  A Linear
    is "inside a block" when its qualified name has an integer component (an index
    into the model's ``ModuleList`` of layers).

    Examples
    --------
    >>> import torch
    >>> m = build_llama("llama_20m", vocab_size=32, num_hidden_layers=2,
    ...                 generator=torch.Generator().manual_seed(0))
    >>> block_linear_names(m)[:2]
    ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    return [
        name for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and any(part.isdigit() for part in name.split("."))
    ]


def count_parameters(model: nn.Module, *, trainable_only=False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``).

    Examples
    --------
    >>> count_parameters(torch.nn.Linear(3, 2))
    8
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
