"""``loop=auto``: picks the loop from config by the loop-selection table (docs/architecture.md).

disaggregation.mode prefill/decode -> the disaggregated loops (each handles its own pp /
overlap variants); else pp_size > 1 -> pp; else scheduler.enable_overlap -> overlap; else normal.
``enable_overlap`` unset picks overlap on CUDA and with the sim worker (``overlap_by_default``).
"""

from __future__ import annotations

from loopserve.core import hookimpl


def select_loop_name(mode: str | None, pp_size: int, enable_overlap: bool) -> str:
    if mode == "prefill":
        return "disagg_prefill"
    if mode == "decode":
        return "disagg_decode"
    if pp_size > 1:
        return "pp"
    if enable_overlap:
        return "overlap"
    return "normal"


def overlap_by_default(config) -> bool:
    """``scheduler.enable_overlap=null``: overlap where it measured faster (docs/benchmarks.md,
    "Overlap loop"): a CUDA device, or the sim worker (a modeled GPU). On the CPU the model
    worker's forward already uses every core, so overlapping the scheduler gains nothing."""
    worker = str(config.worker.name)
    if worker == "sim":
        return True
    if worker != "model":
        return False
    device = str(config.model.device)
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


@hookimpl
def loopserve_select_loop(config):
    overlap = config.scheduler.enable_overlap
    return select_loop_name(
        config.disaggregation.mode,
        int(config.parallel.pp_size),
        overlap_by_default(config) if overlap is None else bool(overlap),
    )
