"""Integrations of tf-dlg's defences with federated-learning frameworks (optional extras).

`tf_dlg.integrations.flower`: a Flower client mod (`pip install tf-dlg[flower]`).
"""
