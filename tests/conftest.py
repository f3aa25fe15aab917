"""Shared pytest set-up: quiet TensorFlow, deterministic seeds, no TFF orphans."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _stop_tff_workers_at_end():
  yield
  from tf_dlg.federated import runtime  # pylint: disable=g-import-not-at-top
  runtime.stop_tff_workers()
