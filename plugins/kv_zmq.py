"""``disaggregation.transfer_backend=zmq`` (the default): KV pages over TCP with pyzmq.

The machinery is in ``core/disagg/zmq_transfer.py``; this plugin only builds it from config.
The prefill side binds its endpoint on ``server.host`` and starts the bootstrap server on
``disaggregation.bootstrap_port``.
"""

from __future__ import annotations

from loopserve.core import hookimpl


def manager_options(role, config) -> dict:
    d = config.disaggregation
    return {
        "host": str(config.server.host),
        "bootstrap_port": int(d.bootstrap_port) if role == "prefill" else None,
    }


@hookimpl
def loopserve_make_kv_manager(name, role, config, kv_args):
    if name != "zmq":
        return None
    from loopserve.core.disagg.zmq_transfer import ZmqManager

    return ZmqManager(role, kv_args, float(config.disaggregation.transfer_timeout_s),
                      **manager_options(role, config))
