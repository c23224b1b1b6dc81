"""``loop=auto``: picks the loop from config by SEED.md's table.

disaggregation.mode prefill/decode -> the disaggregated loops (each handles its own pp /
overlap variants); else pp_size > 1 -> pp; else scheduler.enable_overlap -> overlap; else normal.
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


@hookimpl
def loopserve_select_loop(config):
    return select_loop_name(
        config.disaggregation.mode,
        int(config.parallel.pp_size),
        bool(config.scheduler.enable_overlap),
    )
