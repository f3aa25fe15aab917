"""tf_dlg.study.records: one schema per record, strict CSV read-back, both criteria."""

import dataclasses
import json

import pytest

from tf_dlg.study import records, tables


def _row(**kw):
  base = dict(
    dataset="digits",
    dataset_source="x",
    kind="plain",
    attack="idlg",
    defense="masking",
    unit="rate",
    status="found",
    threshold=0.3,
    low=0.2,
    high=0.5,
    interval_open=False,
    num_images=4,
    num_tested=4,
    rank=4,
    restarts=1,
    seed=0,
    iterations=10,
    defended_fraction=1.0,
    resolution=1.5,
    per_image=json.dumps([0.1, 0.2, 0.3, 0.25]),
    per_image_status=json.dumps(["found"] * 4),
    absolute_equivalent=None,
    relative_equivalent=None,
    attack_works_undefended=True,
    search_low=1e-4,
    search_high=0.99,
    search_scale="log",
    stronger="higher",
  )
  return records.ThresholdRow(**dict(base, **kw))


def test_threshold_row_is_the_csv_schema():
  assert set(records.THRESHOLD_FIELDS) == {f.name for f in dataclasses.fields(records.ThresholdRow)}
  assert len(set(records.THRESHOLD_FIELDS)) == len(records.THRESHOLD_FIELDS)
  # The identification columns follow the paper's, and the protective setting's measures
  # come last, so older readers see the same prefix.
  tail = records.ID_FIELDS + records.PROTECTIVE_FIELDS
  assert records.THRESHOLD_FIELDS[-len(tail) :] == tail


def test_both_criteria_round_trip_and_format(tmp_path):
  row = _row(
    id_status="found",
    id_threshold=0.6,
    id_low=0.4,
    id_high=0.9,
    id_interval_open=False,
    id_num_tested=3,
    id_rank=3,
    id_per_image=json.dumps([0.6, 0.5, None, 0.4]),
    id_per_image_status=json.dumps(["found", "found", "untested", "found"]),
    id_attack_works_undefended=True,
    top1_at_threshold=0.5,
    top1_at_threshold_low=0.068,
    top1_at_threshold_high=0.932,
    top1_at_id_threshold=0.0,
    top1_at_id_threshold_low=0.0,
    top1_at_id_threshold_high=0.602,
    gallery_size=1797,
  )
  path = str(tmp_path / "thresholds.csv")
  records.write_csv(path, records.THRESHOLD_FIELDS, [row.to_dict()])
  (back,) = records.read_thresholds(path)
  assert back["id_threshold"] == 0.6 and back["id_per_image"] == [0.6, 0.5, None, 0.4]
  assert back["id_status"] == "found" and back["gallery_size"] == 1797.0
  view = tables.identification_view(back)
  assert view["threshold"] == 0.6 and view["num_tested"] == 3
  assert tables.format_threshold(view) == "0.6 [0.4, 0.9] (n=3/4)"
  assert tables.format_threshold(back) == "0.3 [0.2, 0.5] (n=4/4)"
  # Distinct column names: a table read back as {column: cell} keeps every cell.
  assert len(set(tables._BOTH_HEADER)) == len(tables._BOTH_HEADER) == 8
  (cells,) = tables.both_criteria_rows([back])
  assert cells[3:] == [
    "0.3 [0.2, 0.5] (n=4/4)",
    "0.5 [0.068, 0.93]",
    "0.6 [0.4, 0.9] (n=3/4)",
    "0 [0, 0.6]",
    "-",  # no undefended rate in this row
  ]


def test_rows_without_identification_still_read_and_show_a_dash(tmp_path):
  path = str(tmp_path / "thresholds.csv")
  fields = [f for f in records.THRESHOLD_FIELDS if f not in records.ID_FIELDS]
  records.write_csv(path, fields, [_row().to_dict()])
  (back,) = records.read_thresholds(path)
  assert back["id_status"] is None and tables.identification_view(back) is None
  assert tables.both_criteria_rows([back])[0][5] == "-"


@pytest.mark.parametrize(
  "cells, message",
  [
    (dict(id_status="maybe"), r"column 'id_status': 'maybe' is not one of found"),
    (dict(id_status="found", id_threshold=None), r"'id_threshold': empty, but id_status"),
    (dict(id_status="found", id_threshold="inf"), r"'id_threshold': 'inf' is not a finite"),
    (dict(id_status="found", id_threshold=0.5, id_per_image="[true]"), "JSON list of numbers"),
    (dict(top1_at_threshold="often"), r"'top1_at_threshold': 'often' is not a number"),
  ],
)
def test_bad_identification_cells_are_refused_with_file_line_column(tmp_path, cells, message):
  path = str(tmp_path / "thresholds.csv")
  records.write_csv(path, records.THRESHOLD_FIELDS, [dict(_row().to_dict(), **cells)])
  with pytest.raises(ValueError, match=message) as err:
    records.read_thresholds(path)
  assert "line 2" in str(err.value)


def test_point_record_round_trip_and_missing_fields():
  fields = {f.name: 0 for f in dataclasses.fields(records.Point)}
  point = records.Point(**dict(fields, leaked=True, id_defended=False))
  rec = point.to_record()
  assert rec["defended"] is False and records.Point.from_record(rec) == point
  del rec["rank"]
  with pytest.raises(ValueError, match=r"lacks fields \['rank'\]"):
    records.Point.from_record(rec)


def test_every_leak_measure_has_its_protective_column():
  from tf_dlg.study import matching

  cols = {matching.column(n, "_at_protective") for n in matching.MEASURES}
  assert cols | {"protective_setting"} == set(records.PROTECTIVE_FIELDS)
  assert matching.column("auc_low", "") == "auc_low"
