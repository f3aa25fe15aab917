"""The median / trimmed-mean / capture `tff.aggregators` against NumPy and SciPy."""

import collections

import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

from tf_dlg.execution import runtime
from tf_dlg.federated import aggregators

tff = runtime.install_context()

# A structured value: a vector, a matrix and a scalar, as a model update would be.
_SPECS = collections.OrderedDict(
  w=tf.TensorSpec([3], tf.float32),
  k=tf.TensorSpec([2, 2], tf.float32),
  b=tf.TensorSpec([], tf.float32),
)
_TYPE = tff.types.tensorflow_to_type(_SPECS)


def _client_values(n, seed):
  rng = np.random.default_rng(seed)
  return [
    collections.OrderedDict(
      w=rng.normal(size=3).astype(np.float32),
      k=rng.normal(size=(2, 2)).astype(np.float32),
      b=np.float32(rng.normal()),
    )
    for _ in range(n)
  ]


def _stack(values, key):
  return np.stack([v[key] for v in values])


@pytest.fixture(scope="module")
def median_process():
  return aggregators.median_factory().create(_TYPE)


@pytest.fixture(scope="module")
def trimmed_process():
  return aggregators.trimmed_mean_factory(0.2).create(_TYPE)


@pytest.mark.parametrize("n", [1, 2, 5, 6, 10])
def test_median_equals_numpy_median(median_process, n):
  values = _client_values(n, seed=n)
  out = median_process.next(median_process.initialize(), values)
  for key in _SPECS:
    np.testing.assert_allclose(
      out.result[key], np.median(_stack(values, key), axis=0), rtol=1e-6, atol=1e-7
    )
  assert out.measurements["num_clients"] == n


def test_median_even_count_averages_middle_values(median_process):
  values = [
    collections.OrderedDict(
      w=np.full(3, x, np.float32), k=np.zeros((2, 2), np.float32), b=np.float32(x)
    )
    for x in (1.0, 2.0, 10.0, 4.0)
  ]
  out = median_process.next(median_process.initialize(), values)
  np.testing.assert_allclose(out.result["w"], [3.0, 3.0, 3.0])  # (2 + 4) / 2
  assert float(out.result["b"]) == 3.0


def test_median_ignores_one_huge_outlier(median_process):
  values = _client_values(7, seed=3)
  values[2] = collections.OrderedDict((k, v * np.float32(1000.0)) for k, v in values[2].items())
  honest = [v for i, v in enumerate(values) if i != 2]
  out = median_process.next(median_process.initialize(), values)
  for key in _SPECS:
    lo, hi = _stack(honest, key).min(axis=0), _stack(honest, key).max(axis=0)
    assert np.all(out.result[key] >= lo - 1e-6) and np.all(out.result[key] <= hi + 1e-6)


def test_median_of_nan_coordinates_is_numpys(median_process):
  """NaN sent by some clients in some coordinates: those coordinates are NaN (as
  np.median), the others the median of their values; +-inf are ordinary extremes."""
  values = _client_values(5, seed=11)
  values[1]["w"][0] = np.nan
  values[3]["w"][0] = np.nan
  values[4]["k"][1, 1] = np.nan
  values[0]["k"][0, 0] = np.inf
  values[2]["b"] = np.float32(-np.inf)
  out = median_process.next(median_process.initialize(), values)
  for key in _SPECS:
    want = np.median(_stack(values, key), axis=0)
    np.testing.assert_array_equal(np.isnan(out.result[key]), np.isnan(want))
    np.testing.assert_allclose(out.result[key], want, rtol=1e-6, atol=1e-7)
  assert np.isnan(out.result["w"][0]) and np.isfinite(out.result["w"][1:]).all()


def test_trimmed_mean_of_nan_coordinates_is_nan_and_others_scipys(trimmed_process):
  """A NaN in a coordinate makes that coordinate NaN whatever trimming would drop; the
  other coordinates are scipy's trimmed mean of their values (+-inf trimmed as extremes)."""
  values = _client_values(5, seed=12)
  values[1]["w"][0] = np.nan
  values[4]["k"][1, 1] = np.nan
  values[0]["k"][0, 0] = np.inf
  out = trimmed_process.next(trimmed_process.initialize(), values)
  for key in _SPECS:
    stacked = _stack(values, key)
    nan = np.isnan(stacked).any(axis=0)
    want = scipy.stats.trim_mean(np.where(np.isnan(stacked), 0.0, stacked), 0.2, axis=0)
    np.testing.assert_array_equal(np.isnan(out.result[key]), nan)
    np.testing.assert_allclose(np.where(nan, 0.0, out.result[key]), np.where(nan, 0.0, want), 1e-6)
  assert np.isnan(out.result["w"][0]) and np.isfinite(out.result["w"][1:]).all()
  assert np.isnan(out.result["k"][1, 1]) and np.isfinite(out.result["k"][0, 0])


def test_empty_round_reports_zeros_and_no_clients(median_process, trimmed_process):
  for process in (median_process, trimmed_process):
    out = process.next(process.initialize(), [])
    assert out.measurements["num_clients"] == 0
    for key, spec in _SPECS.items():
      np.testing.assert_array_equal(out.result[key], np.zeros(spec.shape, np.float32))


@pytest.mark.parametrize("split", [0, 2, 3, 7])
def test_merge_of_partial_stacks_gives_the_median_of_all(split):
  """Clients spread over workers: each worker stacks its share, `merge` joins the stacks
  (an empty share included), `report` reads the median of every client."""
  zero, accumulate, merge, report = aggregators._build_stack_computations(
    _TYPE, lambda stack: tf.nest.map_structure(aggregators.coordinate_median, stack)
  )
  values = _client_values(7, seed=split)
  parts = []
  for share in (values[:split], values[split:]):
    stack = zero()
    for v in share:
      stack = accumulate(stack, v)
    parts.append(stack)
  merged = merge(parts[0], parts[1])
  for key in _SPECS:
    np.testing.assert_array_equal(merged[key], _stack(values, key))  # client order kept
  out = report(merged)
  for key in _SPECS:
    np.testing.assert_allclose(
      out[key], np.median(_stack(values, key), axis=0), rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("n", [3, 5, 10, 11])
def test_trimmed_mean_equals_scipy(trimmed_process, n):
  values = _client_values(n, seed=100 + n)
  out = trimmed_process.next(trimmed_process.initialize(), values)
  for key in _SPECS:
    np.testing.assert_allclose(
      out.result[key], scipy.stats.trim_mean(_stack(values, key), 0.2, axis=0), rtol=1e-5, atol=1e-6
    )


def test_trimmed_mean_zero_fraction_is_the_mean():
  process = aggregators.trimmed_mean_factory(0.0).create(_TYPE)
  values = _client_values(4, seed=9)
  out = process.next(process.initialize(), values)
  np.testing.assert_allclose(out.result["k"], _stack(values, "k").mean(axis=0), rtol=1e-5)


def test_single_tensor_value_type():
  process = aggregators.median_factory().create(tff.TensorType(np.float32, [4]))
  values = [np.arange(4, dtype=np.float32) * s for s in (1.0, -2.0, 5.0)]
  out = process.next(process.initialize(), values)
  np.testing.assert_allclose(out.result, np.median(np.stack(values), axis=0))


def test_capture_reports_values_in_client_order_and_keeps_inner_result():
  process = aggregators.capture_factory(aggregators.median_factory()).create(_TYPE)
  values = _client_values(5, seed=42)
  out = process.next(process.initialize(), values)
  # add_measurements: the inner measurements stay, the stack is added beside them.
  assert set(out.measurements) == {"num_clients", "client_values"}
  assert out.measurements["num_clients"] == 5
  for key in _SPECS:
    np.testing.assert_array_equal(out.measurements["client_values"][key], _stack(values, key))
    np.testing.assert_allclose(out.result[key], np.median(_stack(values, key), axis=0), rtol=1e-6)


def test_capture_of_weighted_mean_stays_weighted():
  factory = aggregators.capture_factory(tff.aggregators.MeanFactory())
  assert isinstance(factory, tff.aggregators.WeightedAggregationFactory)
  process = factory.create(_TYPE, tff.TensorType(np.float32))
  values = _client_values(3, seed=1)
  weights = [1.0, 2.0, 5.0]
  out = process.next(process.initialize(), values, weights)
  np.testing.assert_allclose(
    out.result["w"], np.average(_stack(values, "w"), axis=0, weights=weights), rtol=1e-5
  )
  np.testing.assert_array_equal(out.measurements["client_values"]["w"], _stack(values, "w"))


def test_factories_are_unweighted():
  assert isinstance(aggregators.median_factory(), tff.aggregators.UnweightedAggregationFactory)
  assert isinstance(
    aggregators.trimmed_mean_factory(0.1), tff.aggregators.UnweightedAggregationFactory
  )


@pytest.mark.parametrize("bad", [-0.1, 0.5, 0.7, float("nan")])
def test_trim_fraction_out_of_range(bad):
  with pytest.raises(ValueError, match=r"trim_fraction=.*\[0, 0\.5\)"):
    aggregators.trimmed_mean_factory(bad)


def test_trim_fraction_wrong_type():
  with pytest.raises(TypeError, match="str"):
    aggregators.trimmed_mean_factory("0.1")


def test_integer_values_are_refused():
  with pytest.raises(TypeError, match="int32"):
    aggregators.median_factory().create(tff.TensorType(np.int32, [3]))


def test_capture_refuses_non_factory():
  with pytest.raises(TypeError, match="list"):
    aggregators.capture_factory([])
