"""service_procs.metric_value, the tests' reader of a service's /metrics: it reads what
prometheus_client exports (counters, gauges, histogram samples, labelled or not) and a missing
sample fails loudly, so an assertion like `< 100` cannot pass on a metric that was renamed."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from service_procs import metric_value


@pytest.fixture(scope="module")
def text() -> str:
    registry = CollectorRegistry()
    requests = Counter("svc_requests_total", "calls", ["method", "code"], registry=registry)
    requests.labels(method="Plan", code="OK").inc(3)
    requests.labels(method="Report", code="OK").inc()
    Counter("svc_steps_total", "steps", registry=registry).inc(7)
    Counter("svc_errors_total", "no label set used yet", ["code"], registry=registry)
    Gauge("svc_edges_live", "edges", registry=registry).set(2)
    sizes = Histogram("svc_batch_size", "batch", buckets=(1.5, 4.5), registry=registry)
    for size in (1, 3, 3):
        sizes.observe(size)
    return generate_latest(registry).decode()


def test_counters_and_gauges_are_read_and_labels_match_in_any_order(text):
    assert metric_value(text, "svc_steps_total") == 7
    assert metric_value(text, "svc_edges_live") == 2
    assert metric_value(text, "svc_requests_total", 'method="Plan",code="OK"') == 3
    assert metric_value(text, "svc_requests_total", 'code="OK",method="Report"') == 1


def test_histogram_count_sum_and_bucket_samples_are_read(text):
    assert metric_value(text, "svc_batch_size_count") == 3
    assert metric_value(text, "svc_batch_size_sum") == 7
    assert metric_value(text, "svc_batch_size_bucket", 'le="1.5"') == 1
    assert metric_value(text, "svc_batch_size_bucket", 'le="4.5"') == 3
    assert metric_value(text, "svc_batch_size_bucket", 'le="+Inf"') == 3


def test_a_renamed_metric_raises_naming_it_and_similar_names(text):
    with pytest.raises(AssertionError, match=r"no sample svc_step_total\b.*similar names: .*svc_steps_total"):
        metric_value(text, "svc_step_total")
    with pytest.raises(AssertionError, match="no sample svc_gone"):
        metric_value(text, "svc_gone", default=0)  # a default is for label sets, not for undeclared metrics


def test_a_label_set_not_exported_raises_listing_the_ones_that_are(text):
    with pytest.raises(AssertionError, match=r'svc_requests_total has only .*code="OK",method="Plan"'):
        metric_value(text, "svc_requests_total", 'code="INTERNAL",method="Plan"')
    with pytest.raises(AssertionError, match="has only"):
        metric_value(text, "svc_requests_total", 'code="OK"')  # the whole label set, not a part of it
    with pytest.raises(AssertionError, match="declared but has no samples"):
        metric_value(text, "svc_errors_total", 'code="INTERNAL"')


def test_a_default_stands_for_a_label_set_of_a_declared_metric_not_used_yet(text):
    assert metric_value(text, "svc_errors_total", 'code="INTERNAL"', default=0) == 0
    assert metric_value(text, "svc_requests_total", 'code="INTERNAL",method="Plan"', default=0) == 0
    assert metric_value(text, "svc_requests_total", 'code="OK",method="Plan"', default=0) == 3
