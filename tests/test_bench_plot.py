"""The plots show the quantities the tables show: each run's step-time bar is as long as its
``step_time_ms.total``, for a loop whose forward runs inside ``run_batch`` (normal) and for one
whose forward runs on another thread (overlap)."""

from __future__ import annotations

import pytest

from loopserve.core.bench import plot


class _Axis:
    def __init__(self):
        self.bars: dict[str, list[float]] = {}

    def barh(self, labels, widths, left=None, label=None, **kw):
        self.bars[label] = list(widths)

    def set_xlabel(self, *a, **kw):
        pass

    def legend(self, *a, **kw):
        pass


NORMAL = {"recv_requests": 0.01, "process_input_requests": 0.02, "get_next_batch_to_run": 0.1,
          "run_batch": 3.0, "process_batch_result": 0.2, "forward": 2.8, "total": 3.4}
# The overlap loop: the forward (3.2 ms) runs on the forward thread; the stages take 0.43 ms
# and the iteration waits for the forward outside them.
OVERLAP = {"recv_requests": 0.01, "process_input_requests": 0.02, "get_next_batch_to_run": 0.1,
           "run_batch": 0.05, "process_batch_result": 0.25, "forward": 3.2, "total": 3.64}


@pytest.mark.parametrize("step", [NORMAL, OVERLAP], ids=["normal", "overlap"])
def test_stage_bar_sums_to_the_step_time_of_the_table(step):
    ax = _Axis()
    plot._stage_bars(ax, ["run"], [step])
    assert sum(w[0] for w in ax.bars.values()) == pytest.approx(step["total"])
    if step is NORMAL:
        assert ax.bars["forward (in run_batch)"] == [pytest.approx(2.8)]
    else:
        assert ax.bars[plot.REST] == [pytest.approx(3.64 - 0.43)]
