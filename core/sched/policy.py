"""The batching-policy interface: how the waiting queue is ordered before prefill admission.

Concrete policies are plugins (``plugins/policy_*.py``) registered through
``loopserve_register_policies``. No torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from loopserve.core.sched.req import Req


class BatchingPolicy(ABC):
    """Orders the waiting queue once per scheduling step.

    Contract: ``order`` returns the same requests (no additions, no losses), in the order the
    scheduler should try to admit them; the scheduler admits a prefix of that order that fits
    the token and KV budgets. It is called once per step with a non-empty queue.
    """

    name: ClassVar[str]

    def __init__(self, params: dict[str, Any] | None = None, scheduler: Any = None) -> None:
        self.params = dict(params or {})
        self.scheduler = scheduler

    @abstractmethod
    def order(self, waiting: list[Req]) -> list[Req]:
        """The waiting requests in admission order."""

    def preempt_for(self, req: Req, running: list[Req]) -> list[Req]:
        """Running requests that may be retracted so that ``req`` (the policy's first choice,
        which does not fit now) can be admitted, most expendable first; the scheduler retracts
        them one at a time until ``req`` fits. The default preempts nothing. Retracted requests go
        back to the queue and are recomputed later, so preemption loses no output."""
        return []
