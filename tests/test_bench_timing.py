"""The benchmarks' one timing method (scripts/bench_common.py), with fake clocks: the sides
alternate A, B, A, B … after one warm-up each, the spread is (max - min) / median, and a
spread over the limit or a machine busy with other processes withholds the ratio. No timing
of real code is checked here (that would make the suite depend on the machine's load)."""

from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))  # the benchmarks import it as a sibling
import bench_common as bench  # noqa: E402


class FakeClock:
    """Time advances only when a side is called: by that side's next duration."""

    def __init__(self):
        self.now, self.calls = 0.0, []

    def side(self, name: str, durations: list[float]):
        it = iter(durations)

        def call():
            self.calls.append(name)
            self.now += next(it)
        return call

    def __call__(self) -> float:
        return self.now


QUIET = {"cpus": 2, "others_cpus": 0.0, "load_average_before": [0.0] * 3,
         "load_average_after": [0.0] * 3}


def test_sides_alternate_after_one_warm_up_each():
    clock = FakeClock()
    # warm-up, then 3 rounds of 2 calls: A's samples 1.0, 2.0, 3.0 s per call; B's 0.5 each
    a = clock.side("A", [9.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0])
    b = clock.side("B", [7.0] + [0.5] * 6)
    out = bench.interleaved({"A": a, "B": b}, repeats=3, iters=2, clock=clock)
    assert clock.calls == ["A", "B"] + ["A", "A", "B", "B"] * 3
    assert out == {"A": {"warmup_s": 9.0, "times": [1.0, 2.0, 3.0]},
                   "B": {"warmup_s": 7.0, "times": [0.5, 0.5, 0.5]}}


def test_spread_is_range_over_median():
    assert bench.spread([1.0, 1.1, 1.3]) == pytest.approx(0.3 / 1.1)
    assert bench.spread([2.0]) == 0.0
    s = bench.summary([3.0, 1.0, 2.0])
    assert (s["min"], s["median"], s["max"], s["n"]) == (1.0, 2.0, 3.0, 3)


def timings(a: list[float], b: list[float]) -> dict:
    return {"PyTorch": {"warmup_s": 1.0, "times": a}, "JAX": {"warmup_s": 5.0, "times": b}}


def test_a_quiet_run_gives_the_ratio_of_medians(capsys):
    record = bench.compare(timings([2.0, 2.1, 2.2], [1.0, 1.05, 1.1]), QUIET, "forward",
                           ("PyTorch", "JAX"))
    assert record["warnings"] == []
    assert record["ratio"] == pytest.approx(2.1 / 1.05)
    assert record["ratio_of_minima"] == pytest.approx(2.0)
    assert "NOISY" not in capsys.readouterr().err


def test_a_wide_spread_withholds_the_ratio_loudly(capsys):
    # JAX's spread: (1.3 - 1.0) / 1.05 = 29% > 20%
    record = bench.compare(timings([2.0, 2.1, 2.2], [1.0, 1.05, 1.3]), QUIET, "forward",
                           ("PyTorch", "JAX"))
    assert record["ratio"] is None and "ratio_of_minima" not in record
    assert len(record["warnings"]) == 1 and record["warnings"][0].startswith("JAX: spread 29%")
    assert "NOISY MACHINE" in capsys.readouterr().err


def test_spread_at_the_limit_still_counts_as_quiet():
    record = bench.compare(timings([1.0, 1.0, 1.2], [1.0, 1.0, 1.0]), QUIET, "x",
                           ("PyTorch", "JAX"))
    assert record["ratio"] == pytest.approx(1.0)


def test_a_busy_machine_withholds_the_ratio_even_with_a_tight_spread():
    """A constant load slows every sample alike: the spread cannot see it, the CPU time
    the other processes took can."""
    busy = {**QUIET, "others_cpus": 1.5}
    record = bench.compare(timings([2.0, 2.0, 2.0], [1.0, 1.0, 1.0]), busy, "x",
                           ("PyTorch", "JAX"))
    assert record["ratio"] is None
    assert record["warnings"][0].startswith("other processes used 1.50 of the 2 CPUs")


def test_one_side_has_no_ratio():
    record = bench.compare({"JAX": {"warmup_s": 1.0, "times": [1.0, 1.0]}}, QUIET, "x")
    assert "ratio" not in record and record["warnings"] == []


def test_others_cpu_is_machine_time_less_ours(monkeypatch):
    machine = iter([(1000, 4000), (1300, 4400)])  # +300 busy of +400 ticks, 2 CPUs
    ours = iter([50, 150])                         # +100 ticks are ours
    monkeypatch.setattr(bench, "_cpu_jiffies", lambda: next(machine))
    monkeypatch.setattr(bench, "_tree_jiffies", lambda pid: next(ours))
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
    load = bench.CpuWatch().start().stop()
    assert load["others_cpus"] == pytest.approx((300 - 100) / 400 * 2)


def _echo_side(offset: int) -> dict:
    return {"add": lambda x: x + offset, "fail": lambda: 1 / 0, "device": lambda: "cpu"}


def test_a_worker_runs_its_side_pinned_and_reports_errors():
    with bench.Worker("echo", 1, _echo_side, 10) as worker:
        assert worker.run("add", 5) == 15
        report = worker.report()
        assert report["cpus_allowed"] == 1 and report["device"] == "cpu"
        assert report["xla_cpu_pool_threads"] == 0
        with pytest.raises(RuntimeError, match="ZeroDivisionError"):
            worker.run("fail")
        assert worker.run("add", 1) == 11  # still serving after an error
    assert not worker.process.is_alive()



def _burn(cpu_seconds: float) -> None:
    """Uses this much CPU time, however long the machine makes that take."""
    import time

    end = time.process_time() + cpu_seconds
    while time.process_time() < end:
        pass


def test_our_cpu_time_counts_the_workers():
    """The ticks a worker process uses are ours, not other processes'."""
    with bench.Worker("burner", 1, _burner_side) as worker:
        before = bench._tree_jiffies(os.getpid())
        worker.run("burn", 0.3)
        ticks = bench._tree_jiffies(os.getpid()) - before
    assert ticks >= 0.25 * os.sysconf("SC_CLK_TCK")


def _burner_side() -> dict:
    return {"burn": _burn, "device": lambda: "cpu"}


def test_readme_rows_give_a_rate_for_one_item_per_call_too():
    """A micro-batch of 1 is one sample per step: the row is samples/s, not seconds."""
    import bench_readme

    side = {"median": 0.5, "min": 0.4, "spread": 0.1}
    assert bench_readme._side(side, 1) == "2 (2.5), spread 10%"
    assert bench_readme._side(side, 4) == "8 (10), spread 10%"
    assert bench_readme._side(side) == "0.5 (0.4), spread 10%"
