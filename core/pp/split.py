"""Which decoder layers each pipeline stage runs, and which stages each node hosts.

Checked before anything starts (no process spawned, no port bound), so a bad
``parallel.*`` setting is a ``ValueError`` naming the key and what to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


def split_layers(num_layers: int, pp_size: int, pp_layers: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """``(start, end)`` of each stage's layers. Default: as even as possible, the earlier
    stages taking the extra layers of an uneven split (3 layers on 2 stages: 2 + 1), since
    the last stage also runs the final norm, LM head and sampling. ``pp_layers`` pins the
    count per stage."""
    if pp_size < 1:
        raise ValueError(f"parallel.pp_size must be >= 1; got {pp_size}")
    if pp_size > num_layers:
        raise ValueError(f"parallel.pp_size={pp_size} is larger than the model's {num_layers} layers; "
                         f"use at most {num_layers} stages")
    if pp_layers:
        counts = [int(n) for n in pp_layers]
        if len(counts) != pp_size or any(n < 1 for n in counts) or sum(counts) != num_layers:
            raise ValueError(
                f"parallel.pp_layers={counts} must give {pp_size} stage sizes (one per stage), each >= 1, "
                f"summing to the model's {num_layers} layers")
    else:
        base, extra = divmod(num_layers, pp_size)
        counts = [base + (1 if i < extra else 0) for i in range(pp_size)]
    bounds, start = [], 0
    for n in counts:
        bounds.append((start, start + n))
        start += n
    return bounds


@dataclass(frozen=True)
class Placement:
    """The pipeline's ranks and the part of them this node runs."""

    pp_size: int
    nnodes: int
    node_rank: int
    host: str  # the rendezvous (TCP store) host; rank 0's node serves it
    port: int | None  # None: pick a free port on 127.0.0.1 (single node only)

    @property
    def ranks_per_node(self) -> int:
        return self.pp_size // self.nnodes

    @property
    def local_ranks(self) -> list[int]:
        k = self.ranks_per_node
        return list(range(self.node_rank * k, (self.node_rank + 1) * k))


def placement(parallel: Any) -> Placement:
    """Validate ``parallel.nnodes / node_rank / dist_init_addr`` against ``pp_size``."""
    pp, nnodes, node_rank = int(parallel.pp_size), int(parallel.nnodes), int(parallel.node_rank)
    if nnodes < 1:
        raise ValueError(f"parallel.nnodes must be >= 1; got {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"parallel.node_rank={node_rank} must be in [0, parallel.nnodes={nnodes}); "
                         "number the nodes 0 .. nnodes - 1")
    if pp % nnodes:
        raise ValueError(f"parallel.pp_size={pp} must be a multiple of parallel.nnodes={nnodes} "
                         "(every node runs the same number of stages)")
    addr = parallel.get("dist_init_addr") if hasattr(parallel, "get") else getattr(parallel, "dist_init_addr", None)
    if addr in (None, ""):
        if nnodes > 1:
            raise ValueError("parallel.dist_init_addr=HOST:PORT is required with parallel.nnodes > 1 "
                             "(node 0's address, the same on every node)")
        return Placement(pp, nnodes, node_rank, "127.0.0.1", None)
    host, sep, port = str(addr).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"parallel.dist_init_addr={addr!r} must be HOST:PORT, e.g. 127.0.0.1:29500")
    return Placement(pp, nnodes, node_rank, host.strip("[]"), int(port))
