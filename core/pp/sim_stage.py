"""The sim worker as one pipeline stage (``worker=sim parallel.pp_size=N``).

Each stage models only its share of the layers (the last one also the LM head); when it is
not the first, the hidden states must first cross the link (``T x hidden x dtype bytes /
worker.params.link_bandwidth``). On the wire only a one-column stand-in for the hidden
states travels, so a 70B-shaped pipeline runs on this CPU. Only the last stage computes
tokens (from its own token-id "KV cache", as the single sim worker does).

Two models of a stage's device (``worker.params.async_device``):

- ``true`` (default): like a GPU stream. The stage's process enqueues a forward and goes on
  at once (to receive the next micro-batch); the modelled device runs it from
  ``max(device free, hidden states arrived, enqueued)`` for its cost. The stand-in carries the
  time the hidden states are ready on the sending device, the last stage sends that time
  with the tokens, and rank 0 waits for it before it uses them: the one host sync per
  micro-batch a GPU pipeline also has. Times are this host's monotonic clock, so every stage
  must run on one host (on several hosts ``parallel.nnodes > 1`` turns this off).
- ``false``: the stage's process sleeps through its compute and link time, so its CPU work
  (receiving, decoding, sending) adds to every micro-batch: a pessimistic bound.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch

from loopserve.plugins.worker_sim import DEFAULT_LINK_BANDWIDTH, SimWorker


class SimStageWorker(SimWorker):
    hidden_size = 1  # the stand-in's width on the wire
    dtype = torch.float64  # the stand-in holds the ready time (seconds on the monotonic clock)

    def __init__(self, *, layer_range: tuple[int, int], kv_size_layers: int | None = None,
                 link_bandwidth: float | None = None, async_device: bool = True, **kwargs: Any) -> None:
        self._range = tuple(layer_range)
        self._layers = kv_size_layers or (self._range[1] - self._range[0])
        super().__init__(**kwargs)
        self._layers = self._range[1] - self._range[0]
        self.shape = self._full_shape
        self.link_bandwidth = float(link_bandwidth or DEFAULT_LINK_BANDWIDTH)
        self.async_device = bool(async_device) and self.sleep
        self.is_first = self._range[0] == 0
        self.is_last = self._range[1] == self._full_shape.num_layers
        self.busy_s = 0.0  # modelled compute time
        self.wait_s = 0.0  # modelled hidden-state transfer time
        self.num_stage_forwards = 0
        self.device_free = 0.0  # async_device: when the modelled device finishes its queue
        self.ready_at_ns = 0  # the last stage, async_device: when its latest tokens are ready

    def queued_s(self) -> float:
        """Modelled compute enqueued but not yet run (busy time counts only what has run)."""
        return max(0.0, self.device_free - time.monotonic()) if self.async_device else 0.0

    @property
    def shape(self) -> Any:
        return self._shape

    @shape.setter
    def shape(self, value: Any) -> None:
        # SimWorker's __init__ sets the full model's shape; a stage keeps its layers' share.
        self._full_shape = value
        self._shape = replace(value, num_layers=self._layers)

    def forward_stage(self, fb: Any, hidden: torch.Tensor | None = None) -> torch.Tensor:
        transfer = 0.0
        if not self.is_first:
            transfer = fb.num_tokens * self._full_shape.hidden_size * self.dtype_bytes / self.link_bandwidth
            self.wait_s += transfer
        if self.is_last:
            cost = self.cost(fb.prefix_lens, fb.extend_lens, sum(fb.need_sample) if fb.need_sample else None)
            out = torch.tensor(self._tokens(fb), dtype=torch.int64)
        else:
            cost = self.cost(fb.prefix_lens, fb.extend_lens, 0)
            out = None
        self.last_cost = cost
        self.busy_s += cost.time_s
        self.predicted_time_s += cost.time_s
        self.num_forwards += 1
        self.num_stage_forwards += 1
        if self.async_device:
            now = time.monotonic()
            arrived = now
            if hidden is not None and hidden.numel():
                arrived = max(now, float(hidden[0, 0]) + transfer)
            self.device_free = max(self.device_free, arrived) + cost.time_s
            if self.is_last:
                self.ready_at_ns = int(self.device_free * 1e9)
                return out
            return torch.full((fb.num_tokens, 1), self.device_free, dtype=torch.float64)
        if self.sleep:
            start = time.perf_counter()
            time.sleep(transfer)
            remaining = start + transfer + cost.time_s - time.perf_counter()
            if remaining > 0:
                time.sleep(remaining)
        if self.is_last:
            return out
        return torch.zeros((fb.num_tokens, 1), dtype=torch.float64)
