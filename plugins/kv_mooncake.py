"""``disaggregation.transfer_backend=mooncake``: KV pages written by the Mooncake transfer
engine (TCP here; RDMA where the hosts have it). See ``core/disagg/mooncake_transfer.py``."""

from __future__ import annotations

from loopserve.core import hookimpl
from loopserve.plugins.kv_zmq import manager_options


@hookimpl
def loopserve_make_kv_manager(name, role, config, kv_args):
    if name != "mooncake":
        return None
    from loopserve.core.disagg.mooncake_transfer import MooncakeManager

    return MooncakeManager(role, kv_args, float(config.disaggregation.transfer_timeout_s),
                           **manager_options(role, config, kv_args))
