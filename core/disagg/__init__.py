"""Disaggregated prefill and decode: the KV-transfer interface, the bootstrap server and the
prefill / decode scheduler roles. Torch-free (workers hand their KV buffers over as arrays)."""

from loopserve.core.disagg.base import (
    BootstrapAddr,
    KVArgs,
    KVManager,
    KVPoll,
    KVReceiver,
    KVSender,
    TransferError,
)

__all__ = ["BootstrapAddr", "KVArgs", "KVManager", "KVPoll", "KVReceiver", "KVSender", "TransferError"]
