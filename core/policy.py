"""The batching-policy interface: how the waiting queue is ordered before prefill admission.

Concrete policies are plugins (``plugins/policy_*.py``) registered through
``loopserve_register_policies``. No torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from loopserve.core.req import Req


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
