"""Shared pytest set-up: quiet TensorFlow, deterministic seeds, no TFF orphans."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
  if os.environ.get("TF_DLG_SLOW") == "1":
    for item in items:
      item.own_markers = [m for m in item.own_markers if m.name != "slow"]


@pytest.fixture(scope="session", autouse=True)
def _stop_tff_workers_at_end():
  yield
  from tf_dlg.federated import runtime  # pylint: disable=g-import-not-at-top
  runtime.stop_tff_workers()
