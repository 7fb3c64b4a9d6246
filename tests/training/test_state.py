"""The loop's own counts: throughput and the time spent waiting for the loader."""

import pytest

from captune.training import state


def test_the_training_log_says_how_long_the_loop_waited_for_the_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([3.0, 4.0, 4.5, 5.0, 100.0, 101.0])
    monkeypatch.setattr(state.time, "perf_counter", lambda: next(clock))
    speed = state.Throughput(since=0.0)
    speed.fetched()  # the first batch came at 3 s: 3 s waiting
    speed.add(8)  # queued at 4 s
    speed.fetched()  # the next came at once (4.5)
    speed.add(8)  # 5 s
    assert speed.window_rate() == 16 / 5 and speed.window_wait_fraction() == (3 + 0.5) / 5
    speed.new_window()
    speed.skip()  # a checkpoint: 100 s
    speed.fetched()  # 101 s
    assert speed.window_wait_fraction() == 1.0  # (nothing added yet: capped at 1)
