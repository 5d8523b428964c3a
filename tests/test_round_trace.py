"""Following `cfg` from `fedhead run` through one round (issue "One round loop", done-when; bench/round_trace.py):
at most 6 modules entered with the run's options, and control back at the driver at most twice."""

from __future__ import annotations

from tests.conftest import load_bench


def test_one_round_enters_at_most_six_modules_and_returns_to_the_driver_twice(tiny_bert_dir, tmp_path):
    # Prepare
    trace = load_bench("round_trace")
    # Execute: one in-process round of 3 clients under the profiler
    entered, returns = trace.trace_round(tiny_bert_dir, tmp_path / "run")
    # Assert: the server's two core calls are all that returns to the driver; the clients' work does not
    assert len(entered) <= 6, sorted(entered)
    assert "fedhead.federated.client" in entered  # the clients did train (their module saw the options)
    assert dict(returns) == {"fedhead.federated.server.plan_round": 1, "fedhead.federated.server.close_round": 1}
