"""tf-dlg: deep leakage from gradients in federated learning, and the defences against it.

Data flow: `tf_dlg.data` (dataset) -> `tf_dlg.attacks.threat_model` (the client update an
attacker observes) -> `tf_dlg.defenses` (what the client does to it first) ->
`tf_dlg.attacks` (reconstruction) -> `tf_dlg.metrics` (leakage score).
Federated training with the same defences lives in `tf_dlg.federated`, Keras and Flower
glue in `tf_dlg.integrations`, the studies in `tf_dlg.study` (layers: docs/ARCHITECTURE.md;
the audit of a user's own model: `tf_dlg.study.audit.audit`).
"""

__version__ = "0.1.0"
