"""benchmarks/bench_runs.py's own bookkeeping: how `check` tells a configuration whose row was recorded under
another spec (a draw now would start a new row) from one whose row it would add to."""

from __future__ import annotations

from benchmark_scripts import load_benchmark


def test_check_names_rows_recorded_under_another_spec() -> None:
    bench_runs = load_benchmark("bench_runs")
    rows = [{"config": "a", "spec_hash": "h1", "draws": 3, "commits": ["c1"], "superseded": ""},
            {"config": "b", "spec_hash": "old", "draws": 3, "commits": ["c0"], "superseded": "an older job"},
            {"config": "b", "spec_hash": "h2", "draws": 2, "commits": ["c2", "c3"], "superseded": ""}]
    assert bench_runs.row_status(rows, "a", "h1") == "its row matches"
    assert bench_runs.row_status(rows, "a", "h9") == "recorded under h1 (3 draws at c1)"
    # A superseded row never counts as the configuration's row, even when its hash is the one resolved now.
    assert bench_runs.row_status(rows, "b", "old") == "recorded under h2 (2 draws at c2/c3)"
    assert bench_runs.row_status(rows, "c", "h1") == "no row yet"


def test_a_rescore_may_set_every_option_an_evaluate_job_draws_a_fresh_set_with() -> None:
    """bench_rescore keeps its own list (it loads no torch); it must not fall behind evaluate_job.GENERATION, nor
    let through a method option an evaluate job refuses."""
    from dpdistill.pipelines.evaluate_job import GENERATION

    allowed = load_benchmark("bench_rescore").ALLOWED
    method = {a.removeprefix("method.").removesuffix("=") for a in allowed if a.startswith("method.")}
    assert method == set(GENERATION)
