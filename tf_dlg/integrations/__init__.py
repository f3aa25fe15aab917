"""Integrations of tf-dlg's defences with federated-learning frameworks (optional extras).

`tf_dlg.integrations.keras`: Keras training on defended gradients or weights deltas.
`tf_dlg.integrations.flower`: a Flower client mod (`pip install tf-dlg[flower]`).
"""
