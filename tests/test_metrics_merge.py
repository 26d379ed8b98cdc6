"""The supervisor's metrics: every worker's exposition as one, labelled by worker."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from trio_cloudhub.metrics_merge import labelled, merge_expositions

WORKER_0 = """\
# HELP trio_cloudhub_sent_total Messages sent.
# TYPE trio_cloudhub_sent_total counter
trio_cloudhub_sent_total{operation="update"} 3.0
# HELP trio_cloudhub_sessions Sessions.
# TYPE trio_cloudhub_sessions gauge
trio_cloudhub_sessions 2.0
"""
WORKER_1 = """\
# HELP trio_cloudhub_sent_total Messages sent.
# TYPE trio_cloudhub_sent_total counter
trio_cloudhub_sent_total{operation="update"} 4.0
trio_cloudhub_sent_total{operation="insert"} 1.0
# HELP trio_cloudhub_sessions Sessions.
# TYPE trio_cloudhub_sessions gauge
trio_cloudhub_sessions 5.0
"""


def test_each_family_once_with_every_workers_samples_labelled() -> None:
    merged = merge_expositions([WORKER_0, WORKER_1], ["0", "1"])
    families = {family.name: family for family in text_string_to_metric_families(merged)}
    sent = {
        (s.labels["worker"], s.labels["operation"]): s.value
        for s in families["trio_cloudhub_sent"].samples
    }
    assert sent == {("0", "update"): 3.0, ("1", "update"): 4.0, ("1", "insert"): 1.0}
    sessions = {s.labels["worker"]: s.value for s in families["trio_cloudhub_sessions"].samples}
    assert sessions == {"0": 2.0, "1": 5.0}
    assert merged.count("# TYPE trio_cloudhub_sent_total counter") == 1


def test_a_label_goes_first_or_alone() -> None:
    assert labelled('a{b="c d"} 1', "worker", "0") == 'a{worker="0",b="c d"} 1'
    assert labelled("a 1", "worker", "2") == 'a{worker="2"} 1'
    assert merge_expositions([], []) == ""
