"""Gradient-inversion attacks (DLG, iDLG, Inverting Gradients, masked IG), batched.

Pieces (breaching style):
  `threat_model`  what the server observes (`ObservedUpdate`, `observe_gradient`,
                  `observe_fedavg_delta`);
  `functional`    the Keras model as a batched function of per-attack weights;
  `objectives`    interchangeable matching objectives (Euclidean, cosine + TV, masked);
  `labels`        iDLG label inference (and its batch extension);
  `optimize`      batched L-BFGS / tfp L-BFGS / Adam loops with per-attack stopping;
  `runner`        `run_attacks`, which puts them together.
Scoring lives in `tf_dlg.metrics` (`score`, `score_results`).

Usage:
  from tf_dlg import data, models, metrics
  from tf_dlg.attacks import observe_gradient, run_attacks
  ds = data.load_dataset("lfw_subset")
  model = models.lenet(ds.input_shape, ds.num_classes, seed=0)
  observed = [observe_gradient(model, ds.x_train[i:i + 1], ds.y_train[i:i + 1])
              for i in range(32)]              # optionally defense=get_defense(...)
  results = run_attacks(model, observed, attack="idlg", iterations=3000, seed=0)
  rows = metrics.score_results(results)       # dicts: ssim, adjusted_ssim, psnr, ...
"""

from tf_dlg.attacks.runner import ATTACKS, AttackResult, make_objective, run_attacks
from tf_dlg.attacks.threat_model import (ObservedUpdate, observe_fedavg_delta,
                                         observe_gradient)

__all__ = ["ATTACKS", "AttackResult", "ObservedUpdate", "make_objective",
           "observe_fedavg_delta", "observe_gradient", "run_attacks"]
