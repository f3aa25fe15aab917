"""tf_dlg.io: atomic files, no pickle, clear errors for foreign or damaged files."""

import json
import os

import numpy as np
import pytest

from tf_dlg import io


def test_npz_round_trip_and_format_check(tmp_path):
  path = str(tmp_path / "x.npz")
  io.save_npz(path, {"format": "f1", "n": np.int64(3)}, {"a": np.arange(4.0)})
  header, arrays = io.load_npz(path, "f1")
  assert header == {"format": "f1", "n": 3}
  np.testing.assert_array_equal(arrays["a"], np.arange(4.0))
  with pytest.raises(ValueError, match="format='f1', expected 'f2'"):
    io.load_npz(path, "f2")
  assert [p for p in os.listdir(tmp_path)] == ["x.npz"]  # no temporary left behind


def test_load_refuses_pickled_object_arrays(tmp_path):
  path = str(tmp_path / "evil.npz")
  np.savez(path, header=np.asarray(json.dumps({})), obj=np.array([{"a": 1}], dtype=object))
  with pytest.raises(ValueError, match="not a readable tf-dlg file"):
    io.load_npz(path)


def test_load_damaged_file(tmp_path):
  path = tmp_path / "bad.npz"
  path.write_bytes(b"PK\x03\x04garbage")
  with pytest.raises(ValueError, match="bad.npz"):
    io.load_npz(str(path))


def test_atomic_write_replaces_whole_file(tmp_path):
  path = str(tmp_path / "t.txt")
  io.atomic_write_text(path, "one\n")
  io.atomic_write_text(path, "two\n")
  assert open(path).read() == "two\n"
  assert os.listdir(tmp_path) == ["t.txt"]


def test_jsonable_numpy_and_refusal():
  assert io.dumps({"a": np.float32(0.5), "b": np.arange(2)}) == '{"a": 0.5, "b": [0, 1]}'
  with pytest.raises(TypeError, match="cannot store a set"):
    io.dumps({"a": {1}})


def test_write_json_is_atomic_and_stores_numpy_values(tmp_path):
  path = str(tmp_path / "sub" / "run.json")
  assert io.write_json(path, {"a": np.float32(1.5), "b": np.arange(2)}) == path
  assert json.loads(open(path).read()) == {"a": 1.5, "b": [0, 1]}
  assert os.listdir(tmp_path / "sub") == ["run.json"]
