"""The sim worker as one pipeline stage (``worker=sim parallel.pp_size=N``).

Each stage models only its share of the layers (the last one also the LM head), sleeps for
that, and, when it is not the first, first waits for the hidden states to cross the link
(``T x hidden x dtype bytes / worker.params.link_bandwidth``). That wait is charged after the
message arrives, which is exact while the stage was idle waiting for it and pessimistic when
it was still busy (a real link would have overlapped). On the wire only a one-column
stand-in for the hidden states travels, so a 70B-shaped pipeline runs on this CPU. Only the
last stage computes tokens (from its own token-id "KV cache", as the single sim worker does).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch

from loopserve.plugins.worker_sim import DEFAULT_LINK_BANDWIDTH, SimWorker


class SimStageWorker(SimWorker):
    hidden_size = 1  # the stand-in's width on the wire
    dtype = torch.float32

    def __init__(self, *, layer_range: tuple[int, int], kv_size_layers: int | None = None,
                 link_bandwidth: float | None = None, **kwargs: Any) -> None:
        self._range = tuple(layer_range)
        self._layers = kv_size_layers or (self._range[1] - self._range[0])
        super().__init__(**kwargs)
        self._layers = self._range[1] - self._range[0]
        self.shape = self._full_shape
        self.link_bandwidth = float(link_bandwidth or DEFAULT_LINK_BANDWIDTH)
        self.is_first = self._range[0] == 0
        self.is_last = self._range[1] == self._full_shape.num_layers
        self.busy_s = 0.0  # modelled compute time
        self.wait_s = 0.0  # modelled hidden-state transfer time
        self.num_stage_forwards = 0

    @property
    def shape(self) -> Any:
        return self._shape

    @shape.setter
    def shape(self, value: Any) -> None:
        # SimWorker's __init__ sets the full model's shape; a stage keeps its layers' share.
        self._full_shape = value
        self._shape = replace(value, num_layers=self._layers)

    def forward_stage(self, fb: Any, hidden: torch.Tensor | None = None) -> torch.Tensor:
        if not self.is_first:
            transfer = fb.num_tokens * self._full_shape.hidden_size * self.dtype_bytes / self.link_bandwidth
            self.wait_s += transfer
            if self.sleep:
                time.sleep(transfer)
        start = time.perf_counter()
        if self.is_last:
            result = self.forward_batch(fb)
            self.busy_s += self.last_cost.time_s if self.last_cost else 0.0
            self.num_stage_forwards += 1
            return torch.tensor(result.next_token_ids, dtype=torch.int64)
        cost = self.cost(fb.prefix_lens, fb.extend_lens, 0)
        self.busy_s += cost.time_s
        self.num_stage_forwards += 1
        if self.sleep:
            remaining = start + cost.time_s - time.perf_counter()
            if remaining > 0:
                time.sleep(remaining)
        return torch.zeros((fb.num_tokens, 1), dtype=torch.float32)
