"""``DynamicGradMode``: the decorator that sets torch's autograd mode around a loop's step/run.

``grad_mode=no_grad`` (default) and ``inference`` save memory for pure serving;
``enable_grad`` lets an operation inside the loop build a graph (e.g. training an adapter).
torch is imported lazily so that importing the loop machinery stays cheap.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

GRAD_MODES = ("no_grad", "inference", "enable_grad")


def grad_context(mode: str) -> contextlib.AbstractContextManager[Any]:
    import torch

    if mode == "no_grad":
        return torch.no_grad()
    if mode == "inference":
        return torch.inference_mode()
    if mode == "enable_grad":
        return torch.enable_grad()
    raise ValueError(f"grad_mode must be one of {', '.join(GRAD_MODES)}; got {mode!r}")


def DynamicGradMode(fn: F) -> F:  # noqa: N802 - the design's name for it
    """Run ``fn(self, ...)`` under the autograd mode named by ``self.grad_mode``.

    The mode is read at call time, so one loop class serves every ``grad_mode``.
    """
    if getattr(fn, "__loopserve_grad_mode__", False):
        return fn

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with grad_context(self.grad_mode):
            return fn(self, *args, **kwargs)

    wrapper.__loopserve_grad_mode__ = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
