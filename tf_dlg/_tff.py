"""The one way tf-dlg's library packages import TensorFlow Federated.

`tf_dlg.defenses` reaches TFF only through this module, and only on first use (its
TFF aggregators are lazy attributes), so `import tf_dlg.defenses` loads neither TFF nor
`tf_dlg.federated`, and no module of `tf_dlg.defenses` imports `tf_dlg.federated`.

TFF must never run with its default execution context: that starts a worker listening
on every interface that outlives the process. `tf_dlg.federated.runtime.import_tff`
installs the confined local context and the exit clean-up, so this function imports
TFF through it (a stdlib-only module; the `tf_dlg.federated` package itself is lazy).
That runtime is foundation code that happens to live in `tf_dlg.federated`; once it
moves below both packages, this function becomes its home.
"""

from __future__ import annotations

import importlib


def import_tff():
  """Returns `tensorflow_federated`, imported with the confined local worker context."""
  runtime = importlib.import_module("tf_dlg.federated.runtime")
  return runtime.import_tff()
