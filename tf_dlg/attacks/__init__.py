"""Gradient-inversion attacks (DLG, iDLG, Inverting Gradients, masked IG), batched.

Pieces (breaching style):
  `threat_model`  what the server observes (`ObservedUpdate`, `observe_gradient`,
                  `observe_fedavg_delta`);
  `functional`    the Keras model as a batched function of per-attack weights;
  `objectives`    interchangeable matching objectives (Euclidean, cosine + TV, masked);
  `labels`        iDLG label inference (and its batch extension);
  `optimize`      L-BFGS / tfp L-BFGS / Adam over a fixed number of slots, with
                  continuous batching (`run_queue`: finished slots are refilled;
                  `run_lanes`: several such loops on threads, one queue);
  `runner`        `AttackConfig` and `run_attacks`, which put them together;
  `group`         one group of same-shaped observations on one compiled loop;
  `schedule`      lanes and slots, restart seeds, the restart order (`RestartQueue`);
  `compile_cache` `CompileCache`: compiled loops reused across runs;
  `results`       `AttackResult` and the `Snapshot`s a hook receives;
  `summaries`     `TensorBoardHook`: reconstruction progress for TensorBoard;
  `gallery`       `match_gallery`: no reconstruction; ranks a gallery of candidates by
                  how alike their own updates are to the observed one (the attacker the
                  identification criterion assumes).
Scoring lives in `tf_dlg.metrics` (`score`, `score_results`).

Usage:
  from tf_dlg import data, models, metrics
  from tf_dlg.attacks import AttackConfig, observe_gradient, run_attacks
  ds = data.load_dataset("lfw_subset")
  model = models.lenet(ds.input_shape, ds.num_classes, seed=0)
  observed = [observe_gradient(model, ds.x_train[i:i + 1], ds.y_train[i:i + 1])
              for i in range(32)]              # optionally defense=get_defense(...)
  config = AttackConfig(attack="idlg", iterations=3000, seed=0, restarts=4)
  results = run_attacks(model, observed, config=config)
  rows = metrics.score_results(results)       # dicts: ssim, adjusted_ssim, psnr, ...
"""

from tf_dlg.attacks.compile_cache import CompileCache
from tf_dlg.attacks.gallery import match_gallery
from tf_dlg.attacks.results import AttackResult
from tf_dlg.attacks.runner import ATTACKS, AttackConfig, make_objective, run_attacks
from tf_dlg.attacks.threat_model import ObservedUpdate, observe_fedavg_delta, observe_gradient

__all__ = [
  "ATTACKS",
  "AttackConfig",
  "AttackResult",
  "CompileCache",
  "ObservedUpdate",
  "make_objective",
  "match_gallery",
  "observe_fedavg_delta",
  "observe_gradient",
  "run_attacks",
]
