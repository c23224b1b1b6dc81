"""``disaggregation.transfer_backend=zmq`` (the default): KV pages over TCP with pyzmq.

The machinery is in ``core/disagg/zmq_transfer.py``; this plugin only builds it from config.
The prefill side binds its endpoint on ``server.host`` and starts the bootstrap server on
``disaggregation.bootstrap_port`` (on its first pipeline stage only).
"""

from __future__ import annotations

from loopserve.core import hookimpl


def manager_options(role, config, kv_args=None) -> dict:
    """Where the endpoint binds, and the bootstrap server's port: only a prefill server's
    first pipeline stage runs one (the other stages register through it)."""
    d = config.disaggregation
    first = kv_args is None or kv_args.pp_rank == 0
    return {
        "host": str(config.server.host),
        "bootstrap_port": int(d.bootstrap_port) if role == "prefill" and first else None,
    }


@hookimpl
def loopserve_make_kv_manager(name, role, config, kv_args):
    if name != "zmq":
        return None
    from loopserve.core.disagg.zmq_transfer import ZmqManager

    return ZmqManager(role, kv_args, float(config.disaggregation.transfer_timeout_s),
                      **manager_options(role, config, kv_args))
