"""Flower's own DP for the `dp` defence on the Flower engine, BatchNorm arrays left out.

The clip norm C is `DPGaussian.l2_norm_clip`, the noise multiplier z the defence's
parameter. `dp_mod` is the client mod of a mechanism (`DP_MECHANISMS`); `on_kept_arrays`
runs a Flower mod on the arrays the defence keeps and passes the others (BatchNorm's
moving statistics) through bit for bit; `numpy_seed` seeds the global NumPy generator
Flower's DP draws from, so a rerun repeats exactly.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from typing import Sequence

import numpy as np

# How the `dp` defence runs on this engine (Flower's own DP; the engine's docstring). Epsilon
# (`tf_dlg.defenses.dp_fedavg_epsilon`): both release, each round, a Gaussian mechanism
# of noise z C on the sum of updates clipped to C, so one accounting fits both; what
# differs is who sees the noised value. "local": each client's own update (the view of
# this study's attacker, the server) -- the TFF engine's `dp`; "central": only the
# aggregate, while the server sees each clipped update un-noised (against it, this is
# clipping to C alone).
DP_MECHANISMS = ("local", "central")
# LocalDpMod is parameterised by a one-release (epsilon, delta); it draws noise of std
# sensitivity x sqrt(2 ln(1.25 / delta)) / epsilon. With sensitivity C and this delta,
# epsilon = sqrt(2 ln(1.25 / delta)) / z gives std z C: the mod's own epsilon is only that
# calibration, not the run's epsilon (which composes every round; see DP_MECHANISMS).
LOCAL_DP_DELTA = 1e-5


@contextlib.contextmanager
def numpy_seed(*entropy: int):
  """NumPy's global generator seeded from `entropy` inside the block, restored after.

  Flower's DP (`LocalDpMod`, the strategy wrappers) draws its noise from `np.random`,
  unseeded: seeding it per (seed, client, round) makes a rerun repeat exactly.
  """
  state = np.random.get_state()
  np.random.seed(np.random.SeedSequence([int(e) for e in entropy]).generate_state(8))
  try:
    yield
  finally:
    np.random.set_state(state)


def _tag_seed(tag: str) -> int:
  return zlib.crc32(tag.encode())


def on_kept_arrays(flower_mod, exclude: Sequence[bool], clip_norm: float):
  """A client mod: `flower_mod` applied to the arrays not excluded; the others as trained.

  Flower's DP mods clip (and noise) every array of the record; the TFF engine's `dp`
  leaves BatchNorm's moving statistics out, as every defence here does. The wrapper
  hands `flower_mod` a message and a reply that hold only the kept arrays (so its own
  checks and errors apply to them), then puts the excluded arrays back, bit for bit.
  It adds to the reply's MetricRecord `tf_dlg.update_norm` (the kept update's L2 norm as
  trained), `tf_dlg.clipped` (1 where that exceeds `clip_norm`, which both of Flower's
  DP mods clip to) and `tf_dlg.zero_fraction` (zero entries of the kept update sent).
  """
  from flwr.app import ArrayRecord

  from tf_dlg.integrations.flower import add_metrics

  exclude = [bool(e) for e in exclude]

  def mod(msg, context, call_next):
    if len(msg.content.array_records) != 1:
      return flower_mod(msg, context, call_next)  # Flower's mod gives its error reply
    ((key, received),) = msg.content.array_records.items()
    names = list(received.keys())
    if len(names) != len(exclude):
      raise ValueError(f"exclude has {len(exclude)} entries, the record {len(names)} arrays.")
    kept = [n for n, e in zip(names, exclude) if not e]
    seen = {}

    def inner(m, c):
      m.content[key] = received  # local training starts from every array
      out = call_next(m, c)
      if out.has_error() or len(out.content.array_records) != 1:
        return out
      ((out_key, sent),) = out.content.array_records.items()
      if list(sent.keys()) == names:  # else Flower's mod refuses the key mismatch
        seen.update(key=out_key, sent=sent)
        out.content[out_key] = ArrayRecord({n: sent[n] for n in kept})
      return out

    msg.content[key] = ArrayRecord({n: received[n] for n in kept})
    try:
      out = flower_mod(msg, context, inner)
    finally:
      msg.content[key] = received
    if out.has_error() or "sent" not in seen:
      return out
    sent, defended = seen["sent"], out.content.array_records[seen["key"]]
    out.content[seen["key"]] = ArrayRecord(
      {n: defended[n] if n in kept else sent[n] for n in names}
    )
    before = [sent[n].numpy().astype(np.float64) - received[n].numpy() for n in kept]
    after = [defended[n].numpy().astype(np.float64) - received[n].numpy() for n in kept]
    norm = float(np.sqrt(sum(np.sum(d**2) for d in before)))
    zeros = sum(int(np.sum(d == 0)) for d in after)
    stats = {"update_norm": norm, "clipped": int(norm > clip_norm)}
    stats["zero_fraction"] = zeros / max(sum(d.size for d in after), 1)
    return add_metrics(out, {"tf_dlg." + k: v for k, v in stats.items()})

  return mod


def dp_mod(defense, seed: int, dp_mechanism: str, exclude, tag: str):
  """The client mod of the run's `dp` defence with Flower's own DP (see `DP_MECHANISMS`).

  "local": `LocalDpMod` (clip C, noise of std z C); "central": `fixedclipping_mod` (clip
  C; the server's `DifferentialPrivacyClientSideFixedClipping` sends C and adds the
  noise). Both on the kept arrays (`on_kept_arrays`), NumPy seeded by (`seed`, `tag`).
  `defense` is the run's `DPGaussian` (built once a run; its C and z are read here).
  """
  from flwr.clientapp import mod as flower_mods

  clip, z = float(defense.l2_norm_clip), float(defense.param)
  if dp_mechanism == "central":
    inner = flower_mods.fixedclipping_mod
  else:
    epsilon = math.sqrt(2 * math.log(1.25 / LOCAL_DP_DELTA)) / z if z > 0 else math.inf
    inner = flower_mods.LocalDpMod(clip, clip, epsilon, LOCAL_DP_DELTA)
  kept = on_kept_arrays(inner, exclude, clip)

  def mod(msg, context, call_next):
    with numpy_seed(seed, _tag_seed(tag)):
      return kept(msg, context, call_next)

  return mod
