"""Beyond the paper: is a found threshold robust to other attackers and threat models?"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence

from tf_dlg import io as io_lib
from tf_dlg.study import records, tables
from tf_dlg.study.records import UNTESTED


def rescore(
  evaluator,
  rows: List[Dict[str, Any]],
  attacks: Sequence[str] = ("ig", "masked_ig"),
  delta_attack: str = "idlg",
  progress: bool = True,
) -> List[Dict[str, Any]]:
  """Re-attacks every plain threshold with other attackers; writes robustness.csv/md.

  Each found threshold is attacked again by `attacks` on the single-image gradient,
  and by `delta_attack` on a multi-step FedAvg delta of the same image. The same
  attacks without a defence are run too: a threshold that "holds" only counts if that
  attacker recovers the undefended images. `evaluator` is the search's `PointEvaluator`;
  robustness.csv/md go to its output_dir.
  """
  from tqdm import tqdm

  plan = [(a, "gradient") for a in attacks] + [(delta_attack, "fedavg_delta")]
  todo = [
    (r, a, u)
    for r in rows
    if r["threshold"] is not None and r.get("kind", "plain") == "plain"
    for a, u in plan
  ]
  out = []
  for r, attack, update in tqdm(
    todo, desc="adaptive re-scoring", unit="cell", disable=not progress
  ):
    base = evaluator.evaluate(r["dataset"], attack, "none", None, update)
    at = evaluator.evaluate(r["dataset"], attack, r["defense"], r["threshold"], update)
    attack_works = base["fraction_defended"] < 1.0
    out.append(
      {
        "dataset": r["dataset"],
        "defense": r["defense"],
        "threshold": r["threshold"],
        "searched_with": r["attack"],
        "attack": attack,
        "update": update,
        "undefended_adjusted_ssim": base["median_adjusted_ssim"],
        "undefended_leak_fraction": 1.0 - base["fraction_defended"],
        "fraction_defended": at["fraction_defended"],
        "adjusted_ssim": at["median_adjusted_ssim"],
        "max_adjusted_ssim": at["max_adjusted_ssim"],
        "verdict": ("broken" if not at["defended"] else "holds" if attack_works else UNTESTED),
      }
    )
  write_robustness(evaluator, out)
  return out


def write_robustness(evaluator, out: List[Dict[str, Any]]) -> None:
  """robustness.csv and robustness.md."""
  fields = list(out[0]) if out else ["dataset"]
  records.write_csv(os.path.join(evaluator.output_dir, "robustness.csv"), fields, out)
  text = tables.robustness_markdown(out, evaluator)
  io_lib.atomic_write_text(os.path.join(evaluator.output_dir, "robustness.md"), text)
