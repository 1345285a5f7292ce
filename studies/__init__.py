"""Studies: ``python -m studies NAME [--quick] [--out DIR] [--device cpu|cuda] [--seed S]``.

Each study writes tidy CSV (long format), PNG and PDF figures and ``run.json``
into ``results/NAME/`` (or ``--out``).  :data:`STUDIES` maps a name to
``(module, function, one-line description)``; modules are imported only when
their study runs, so listing needs no heavy dependency.
"""

from ._core import StudyContext

__all__ = ["STUDIES", "StudyContext"]

#: name -> (module under ``studies``, function name, description)
STUDIES: dict[str, tuple[str, str, str]] = {
    "bench-samplers": ("bench_samplers", "run", "time HaarStiefel against orthogonal_, QR and scipy ortho_group"),
    "projector-moments": ("projector_moments", "run", "second-moment factor of each projector family against r/n"),
    "memory": ("memory", "run", "peak memory of one training step: full backprop, GaLore, MeZO, LR and our low-rank IPA/LR/ZO"),
    "unbiasedness": ("unbiasedness", "run", "every method x projector x mode tested for E[g] = grad (Holm-corrected)"),
    "mse-vs-samples": ("mse_vs_samples", "run", "the paper's Figures 2-5: MSE against N, Monte Carlo beside theory.mse"),
    "functional": ("functional", "run", "functional optimisation (column generation) vs water-filling; instance-dependent MSE gain"),
    "pretrain": ("pretrain", "run", "LLaMA pretraining: lazy low-rank (haar/coordinate/gaussian/instance) vs GaLore, full rank, LR"),
    "llm-gradients": ("llm_gradients", "run", "LLaMA layer gradients: spectra, ranks, projector MSE (Monte Carlo vs theory.mse)"),
}
