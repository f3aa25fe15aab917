"""thresholds.csv files for tests of its readers (convergence, claims, strict parsing)."""

from tf_dlg.study import records

# A found masking threshold on a log scale: the fields every reader needs.
BASE_ROW = dict(
  dataset="mnist",
  dataset_source="x",
  kind="plain",
  attack="idlg",
  defense="masking",
  status="found",
  threshold="0.3",
  search_low="0.0001",
  search_high="0.99",
  search_scale="log",
  stronger="higher",
  attack_works_undefended="True",
)


def write_thresholds_csv(path, rows=({},), **base):
  """Writes one row per dict in `rows` (each over `BASE_ROW` and `base`); returns the path."""
  out = []
  for overrides in rows:
    row = {k: "" for k in records.THRESHOLD_FIELDS}
    row.update(BASE_ROW, **base)
    row.update(overrides)
    out.append(row)
  records.write_csv(str(path), records.THRESHOLD_FIELDS, out)
  return str(path)
