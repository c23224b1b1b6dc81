"""The messages between the HTTP frontend and the scheduler process, encoded with msgspec.

Three ZMQ channels, each socket used by exactly one thread:

- requests (frontend PUSH -> scheduler PULL): ``Generate``, ``Abort``, ``Stop``;
- outputs (scheduler PUSH -> frontend PULL): ``Ready`` / ``StartFailed`` once, then one
  ``StepOutputs`` per loop iteration that produced anything, carrying the new token ids of every
  request that advanced (never one message per token);
- control (frontend DEALER <-> scheduler ROUTER): ``Control`` asks for health, metrics or load
  and gets a ``ControlReply``.

Everything is a tagged msgspec ``Struct``, so a decoder knows the type from the payload and no
Python object is ever pickled onto a socket.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec


class Generate(msgspec.Struct, tag=True, array_like=True):
    """One request, already tokenized. ``sampling`` holds ``SamplingParams`` fields by name
    (the scheduler process rebuilds the dataclass, so fields added later travel unchanged)."""

    rid: str
    input_ids: list[int]
    sampling: dict[str, Any]
    traceparent: Union[str, None] = None
    priority: int = 0
    # Disaggregated mode: [bootstrap_host, bootstrap_port, bootstrap_room].
    bootstrap: Union[list[Any], None] = None


class Abort(msgspec.Struct, tag=True, array_like=True):
    rid: str
    message: str = "aborted by the client"


class Stop(msgspec.Struct, tag=True, array_like=True):
    """Stop the loop, abort what is left, release the worker, exit."""

    message: str = "the server is shutting down"


class Ready(msgspec.Struct, tag=True, array_like=True):
    """Sent once the scheduler is built: what the frontend needs to validate and tokenize."""

    pid: int
    model_path: Union[str, None]  # the checkpoint dir whose tokenizer the frontend loads
    has_tokenizer: bool
    context_len: int
    vocab_size: int
    kv_slots: int
    max_running_requests: int
    supports_logprobs: bool
    loop: str
    policy: str
    worker: str
    gc_frozen_objects: int = 0  # objects moved to the permanent GC generation after startup


class StartFailed(msgspec.Struct, tag=True, array_like=True):
    message: str


class ReqOutput(msgspec.Struct, array_like=True):
    """What one request produced in one step. ``finish`` is None while it runs."""

    rid: str
    new_ids: list[int]
    finish: Union[str, None] = None  # "stop" | "length" | "abort"
    matched: Union[int, str, None] = None
    error: Union[str, None] = None
    cached_tokens: int = 0
    # Per new token: its logprob, and the top alternatives as [token id, logprob] pairs.
    logprobs: Union[list[Union[float, None]], None] = None  # None: the worker sent none for it
    top_logprobs: Union[list[list[list[float]]], None] = None
    # With the first output of a request that asked for prompt logprobs: per prompt position
    # (None for the first token and for any position not scored), the same two lists.
    prompt_logprobs: Union[list[Union[float, None]], None] = None
    prompt_top_logprobs: Union[list[list[list[float]]], None] = None


class StepOutputs(msgspec.Struct, tag=True, array_like=True):
    outputs: list[ReqOutput]
    num_running: int
    num_waiting: int


class Control(msgspec.Struct, tag=True, array_like=True):
    id: int  # echoed in the reply, so a reply that arrives after its caller gave up is dropped
    kind: str  # "health" | "metrics" | "load"


class ControlReply(msgspec.Struct, tag=True):
    id: int
    ok: bool
    text: str = ""
    load: dict[str, int] = {}


ToScheduler = Union[Generate, Abort, Stop]
FromScheduler = Union[Ready, StartFailed, StepOutputs]

encoder = msgspec.msgpack.Encoder()
to_scheduler_decoder = msgspec.msgpack.Decoder(ToScheduler)
from_scheduler_decoder = msgspec.msgpack.Decoder(FromScheduler)
control_decoder = msgspec.msgpack.Decoder(Control)
control_reply_decoder = msgspec.msgpack.Decoder(ControlReply)
