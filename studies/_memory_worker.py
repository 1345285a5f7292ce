"""Memory measurements in fresh processes, for :mod:`studies.memory`.

* ``python -m studies._memory_worker '<json spec>'``: import, measure one spec,
  print the result (a new interpreter per measurement: ``--set launcher=spawn``);
* ``python -m studies._memory_worker --serve``: import once, then for each spec
  read from stdin (one JSON per line) fork a child that measures it and prints
  the result (the default: the imports, 20 s on a loaded 2-core machine, are
  paid once; the server itself runs no torch operation, so forking is safe).

Either way each measurement runs in its own process from a clean heap.  The spec (JSON) holds ``model`` (a shape
name and overrides), ``method``, ``rank``, ``batch``, ``seq_len``, ``dtype``,
``device``, ``seed``, ``steps`` and ``threads``.  The process prints one line
``MEMORY-RESULT {json}`` with:

* ``peak_bytes``: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the
  peak resident set (``VmHWM`` of ``/proc/self/status``, reset through
  ``/proc/self/clear_refs`` after the imports) minus the resident set at that
  moment (``baseline_bytes``); :mod:`studies.memory` starts the workers with
  glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB so that freed tensors leave
  the resident set at once;
* ``saved_bytes``: bytes of the tensors autograd saved for backward during the
  first step (``torch.autograd.graph.saved_tensors_hooks``; each storage counted
  once, parameters and buffers excluded since they are not copies);
* ``weight_bytes`` (parameters and buffers), ``grad_bytes`` (``.grad`` after the
  backward pass or the estimate), ``opt_bytes`` (tensors in the optimiser state)
  and ``state_bytes`` = their sum;
* ``step_s``: wall time of the last step (the first one also allocates the
  optimiser state, and GaLore's first step computes its SVDs).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import warnings

_TAG = "MEMORY-RESULT"


# --------------------------------------------------------------------------- process memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", fh.read(), re.M)
    return int(m.group(1)) if m else -1


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _cpu_peak_bytes() -> int:
    hwm = _status_kib("VmHWM")
    if hwm >= 0:
        return hwm * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def _state_tensor_bytes(obj, seen) -> int:
    """Bytes of the tensors reachable from an optimiser-state entry (GaLore keeps a projector object)."""
    import torch

    if isinstance(obj, torch.Tensor):
        key = (obj.data_ptr(), obj.numel())
        if key in seen or obj.numel() == 0:
            return 0
        seen.add(key)
        return _tensor_bytes(obj)
    if isinstance(obj, dict):
        return sum(_state_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(_state_tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


# --------------------------------------------------------------------------- models and data
def _build(spec, generator):
    import torch

    from estimators.llm import build_llama, build_roberta_classifier

    dtype = getattr(torch, spec["dtype"])
    kind, shape, over = spec["model"]["kind"], spec["model"]["shape"], dict(spec["model"].get("overrides", {}))
    if kind == "roberta":
        model = build_roberta_classifier(shape, num_labels=2, dtype=dtype, device=spec["device"],
                                         generator=generator, **over)
    elif kind == "llama":
        model = build_llama(shape, dtype=dtype, device=spec["device"], generator=generator, **over)
    else:  # pragma: no cover - memory.py only sends the two kinds
        raise ValueError(f"unknown model kind {kind!r}")
    return model, kind


def _batch_and_loss(model, kind, spec, generator):
    import torch
    import torch.nn.functional as F

    N, T, dev = spec["batch"], spec["seq_len"], spec["device"]
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (N, T), generator=generator, device=generator.device).to(dev)
    if kind == "roberta":
        labels = torch.randint(0, 2, (N,), generator=generator, device=generator.device).to(dev)

        def loss_fn(m, batch):
            return F.cross_entropy(m(input_ids=batch[0]).logits, batch[1], reduction="none")

        return (ids, labels), loss_fn

    def loss_fn(m, batch):
        logits = m(input_ids=batch[0]).logits[:, :-1]
        tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[0][:, 1:].reshape(-1), reduction="none")
        return tok.view(batch[0].shape[0], -1).mean(1)

    return (ids, None), loss_fn


# --------------------------------------------------------------------------- methods
class _Method:
    """A training method: ``step(batch)`` and the optimiser whose state is counted."""

    opt = None
    backprop = True

    def __init__(self, model, loss_fn, spec, generator):
        self.model, self.loss_fn, self.spec, self.generator = model, loss_fn, spec, generator

    def loss(self, batch):
        return self.loss_fn(self.model, batch).mean()


class FullBP(_Method):
    """Full backpropagation, torch AdamW on every parameter (full fine-tuning / pretraining)."""

    def __init__(self, *a):
        super().__init__(*a)
        import torch

        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)

    def step(self, batch, measure):
        loss = self.loss(batch)
        loss.backward()
        measure()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


class GaLore(FullBP):
    """GaLore (galore-torch's GaLoreAdamW) on the block Linear weights, its defaults, same rank."""

    def __init__(self, model, loss_fn, spec, generator):
        _Method.__init__(self, model, loss_fn, spec, generator)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from galore_torch import GaLoreAdamW

        from estimators.llm import block_linear_names

        galore = [model.get_submodule(n).weight for n in block_linear_names(model)]
        ids = {id(p) for p in galore}
        rest = [p for p in model.parameters() if id(p) not in ids]
        groups = [{"params": rest},
                  {"params": galore, "rank": spec["rank"], "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.opt = GaLoreAdamW(groups, lr=1e-5)


class MeZO(_Method):
    """MeZO: two-point ZO on every parameter, in-place perturbation regenerated from a seed, SGD."""

    backprop = False
    mu, lr = 1e-3, 1e-6

    def __init__(self, *a):
        super().__init__(*a)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def _perturb(self, seed, scale):
        import torch

        g = torch.Generator(device=self.params[0].device).manual_seed(seed)
        for p in self.params:
            z = torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype)
            p.add_(z, alpha=scale)
            del z

    def step(self, batch, measure):
        import torch

        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator, device=self.generator.device))
        with torch.no_grad():
            self._perturb(seed, self.mu)
            lp = self.loss(batch).item()
            self._perturb(seed, -2 * self.mu)
            lm = self.loss(batch).item()
            self._perturb(seed, self.mu)
            proj = (lp - lm) / (2 * self.mu)
            measure()
            self._perturb(seed, -self.lr * proj)
        return 0.5 * (lp + lm)


class LRFull(_Method):
    """Full-rank likelihood ratio (vanilla LR): Gaussian noise on every block Linear output, SGD."""

    backprop = False
    sigma, lr = 1e-2, 1e-6

    def __init__(self, *a):
        super().__init__(*a)
        import torch

        from estimators.llm import block_linear_names

        self.names = block_linear_names(self.model)
        self.weights = {n: self.model.get_submodule(n).weight for n in self.names}
        self.opt = torch.optim.SGD(list(self.weights.values()), lr=self.lr)

    def step(self, batch, measure):
        import torch

        from estimators.estimate import estimate

        with torch.no_grad():
            est = estimate(self.model, self.loss_fn, batch, method="lr", projector=None, params=self.names,
                           generator=self.generator, sigma=self.sigma)
        for n, w in self.weights.items():
            key = n if n in est else f"{n}.weight"
            w.grad = est[key]
        del est
        measure()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            return self.loss(batch).item()


class LowRank(_Method):
    """Our low-rank estimators: block Linears converted (rank r, Haar–Stiefel), LazyUpdate(AdamW)."""

    how = "ipa"

    def __init__(self, model, loss_fn, spec, generator):
        super().__init__(model, loss_fn, spec, generator)
        import torch

        from estimators.lazy import LazyUpdate
        from estimators.llm import block_linear_names
        from estimators.lowrank import convert

        convert(model, rank=spec["rank"], projector="haar", target=block_linear_names(model), generator=generator)
        for mod in model.modules():  # embeddings stay frozen, as in adapter-style fine-tuning
            if isinstance(mod, torch.nn.Embedding):
                mod.weight.requires_grad_(False)
        self.backprop = self.how == "ipa"
        self.opt = LazyUpdate(model, inner=torch.optim.AdamW, inner_kwargs={"lr": 1e-4}, K=200,
                              generator=generator)

    def step(self, batch, measure):
        import torch

        if self.how == "ipa":
            loss = self.loss(batch)
            loss.backward()
            measure()
            self.opt.step()
            self.opt.zero_grad()
            return loss.item()
        opts = {"mu": 1e-3} if self.how == "zo" else {"sigma": 1e-2}
        self.opt.step_estimate(self.loss_fn, batch, method=self.how, **opts)
        measure()
        with torch.no_grad():
            return self.loss(batch).item()

    @property
    def inner(self):
        return self.opt.inner


class IPALowRank(LowRank):
    how = "ipa"


class LRLowRank(LowRank):
    how = "lr"


class ZOLowRank(LowRank):
    how = "zo"


METHODS = {
    "full_bp": FullBP,
    "galore": GaLore,
    "mezo": MeZO,
    "lr_full": LRFull,
    "ipa_lowrank": IPALowRank,
    "lr_lowrank": LRLowRank,
    "zo_lowrank": ZOLowRank,
}


# --------------------------------------------------------------------------- measurement
def measure(spec) -> dict:
    import torch

    torch.set_num_threads(int(spec.get("threads", 1)))
    _import_all()
    cuda = spec["device"] == "cuda"
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        reset_ok = True
    else:
        reset_ok = _reset_cpu_peak()
        baseline = _status_kib("VmRSS") * 1024
    g = torch.Generator().manual_seed(int(spec["seed"]))
    model, kind = _build(spec, g)
    batch, loss_fn = _batch_and_loss(model, kind, spec, g)
    method = METHODS[spec["method"]](model, loss_fn, spec, g)

    # saved-for-backward bytes in the first step (each storage once; parameters/buffers excluded)
    param_ptrs = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in param_ptrs:
                saved[ptr] = max(saved.get(ptr, 0), st.nbytes())
        except (RuntimeError, NotImplementedError):  # pragma: no cover - tensor subclasses
            pass
        return t

    grads = {}

    def measure_grads():
        grads["bytes"] = sum(_tensor_bytes(p.grad) for p in model.parameters() if p.grad is not None)

    losses, times = [], []
    for i in range(int(spec["steps"])):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if i == 0:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                losses.append(method.step(batch, measure_grads))
        else:
            losses.append(method.step(batch, lambda: None))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = _cpu_peak_bytes() - baseline
    weight = sum(_tensor_bytes(t) for t in list(model.parameters()) + list(model.buffers()))
    opt = method.opt.inner if hasattr(method.opt, "inner") else method.opt
    opt_bytes = 0 if opt is None else _state_tensor_bytes(dict(opt.state), set())
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "peak_bytes": int(peak),
        "baseline_bytes": int(baseline),
        "peak_reset": bool(reset_ok),
        "saved_bytes": int(sum(saved.values())),
        "weight_bytes": int(weight),
        "grad_bytes": int(grads.get("bytes", 0)),
        "opt_bytes": int(opt_bytes),
        "state_bytes": int(weight + grads.get("bytes", 0) + opt_bytes),
        "step_s": float(times[-1]),
        "first_step_s": float(times[0]),
        "losses": losses,
        "n_params": int(n_params),
        "n_trainable": int(n_train),
        "threads": torch.get_num_threads(),
    }


def _import_all() -> None:
    """Everything any method imports, loaded before the baseline is taken."""
    import torch  # noqa: F401

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import galore_torch  # noqa: F401
        import transformers  # noqa: F401
        from transformers import LlamaForCausalLM, RobertaForSequenceClassification  # noqa: F401

        import estimators  # noqa: F401
        import estimators.estimate  # noqa: F401
        import estimators.lazy  # noqa: F401
        import estimators.llm  # noqa: F401
        import estimators.lr  # noqa: F401
        import estimators.zo  # noqa: F401


def _emit(result: dict) -> None:
    sys.stdout.write(f"{_TAG} {json.dumps(result)}\n")
    sys.stdout.flush()


def _measure_or_error(spec) -> dict:
    import traceback

    try:
        return measure(spec)
    except BaseException:  # noqa: BLE001 - reported to the study, which raises
        return {"error": traceback.format_exc()}


def serve() -> int:
    """Import once, then fork one fresh child per spec read from stdin (one JSON per line).

    The server runs no torch operation itself (so forking is safe: no thread
    pool, no CUDA context), and each child measures from a clean heap: its
    resident set right after the fork is its baseline.
    """
    _import_all()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        spec = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # the child: measure, report, leave without running any cleanup
            res = _measure_or_error(spec)
            try:
                _emit(res)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            _emit({"error": f"measurement process exited with status {os.waitstatus_to_exitcode(status)} "
                            "(killed for memory?)"})
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--serve"]:
        return serve()
    if len(argv) != 1:
        print("usage: python -m studies._memory_worker '<json spec>' | --serve", file=sys.stderr)
        return 2
    _import_all()
    _emit(_measure_or_error(json.loads(argv[0])))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
