"""Where TFF computations run: confined local workers and remote execution targets.

Foundation code below both `tf_dlg.defenses` and `tf_dlg.federated` (neither imports the
other through it), using only the standard library until TFF itself is asked for:
- `runtime`: `import_tff()` (the only way tf-dlg imports TensorFlow Federated: it
  replaces TFF's default context, whose worker listens on every interface and outlives
  the process, with a loopback-only worker stopped at exit), `execution_target(workers)`.
- `local_context`: the local context's confined worker (`LocalWorker`) and TFF's native
  C++ context pieces shared with the remote targets.
- `worker`: starting TFF's `worker_binary` on loopback only, bound to its parent's life
  (`python -m tf_dlg.execution.worker --port=8000 [--expose]` for remote workers).
- `shim`: building, caching and checking the loopback shim the worker is started with.
"""
