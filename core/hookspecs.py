"""Every hook specification of loopserve, in one place, grouped by lifecycle phase.

Four spec families make up the framework: **loops** (what drives the scheduler's stages),
**batching policies** (how the waiting queue is ordered and admitted), **workers** (what
turns a batch into sampled tokens) and **KV-transfer backends** (how a disaggregated prefill
server's KV pages reach a decode server). Around them sit lifecycle hooks and two wrapper hooks,
around each loop iteration and each stage, that the tracing and metrics plugins implement.

Built-in plugins implement these exactly like third-party ones, registered through the
entry-point group ``loopserve``. Hooks are called per step or per batch, never per token.
Implementations may accept fewer arguments than a spec names, so specs can grow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    from hydra.core.config_store import ConfigStore
    from omegaconf import DictConfig

    from loopserve.core.disagg.base import KVArgs, KVManager
    from loopserve.core.sched.forward_batch import ForwardBatch, ForwardResult
    from loopserve.core.loop import EventLoop
    from loopserve.core.sched.policy import BatchingPolicy
    from loopserve.core.sched.req import Req
    from loopserve.core.sched.scheduler import Scheduler
    from loopserve.core.telemetry import Telemetry
    from loopserve.core.sched.worker import Worker

PROJECT = "loopserve"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -------------------------------------------------------------------------------------------
# Configuration
# -------------------------------------------------------------------------------------------


@hookspec
def loopserve_add_config(config_store: "ConfigStore") -> None:
    """Register config-group options before the config is composed.

    A plugin that adds a loop, policy or worker stores a node for it here, e.g.
    ``config_store.store(group="loop", name="myloop", node={"name": "myloop"})``, so that
    ``loop=myloop`` composes.

    :param config_store: Hydra's ConfigStore.

    Called by: ``compose_config``, once per composition, in the process that composes (CLI,
    Engine). Not on the hot path.
    """


@hookspec
def loopserve_configure(config: "DictConfig") -> None:
    """Inspect or validate the composed config before anything is built.

    Raise ``ValueError`` to reject a config with a message saying what to change.

    :param config: the composed, read-only config.

    Called by: ``Engine`` / the scheduler process, once at start. Not on the hot path.
    """


# -------------------------------------------------------------------------------------------
# Loop specs
# -------------------------------------------------------------------------------------------


@hookspec
def loopserve_register_loops() -> "list[type[EventLoop]] | dict[str, type[EventLoop]]":
    """Return the event-loop classes this plugin provides: a list of classes, each registered
    under its ``name`` attribute (``[NormalLoop]``; the name is written once), or a
    ``{name: class}`` dict.

    Results of all plugins are merged; a name registered twice is an error. Each registered
    loop gets a config node (``loop=NAME`` composes, ``loop.params`` empty) unless the plugin
    stored one of its own through ``loopserve_add_config``.

    Called by: the loop factory in the scheduler process, once at start. Not on the hot path.
    """


@hookspec(firstresult=True)
def loopserve_select_loop(config: "DictConfig", available: list[str]) -> str | None:
    """Pick the loop name for ``loop=auto``.

    Stops at first non-None result.

    :param config: the composed config (disaggregation mode, ``parallel.pp_size``,
        ``scheduler.enable_overlap``).
    :param available: names of the loops that are registered.

    Called by: the loop factory, once at start, only when ``loop.name`` is ``auto``. Not on
    the hot path.
    """


# -------------------------------------------------------------------------------------------
# Batching-policy specs
# -------------------------------------------------------------------------------------------


@hookspec
def loopserve_register_policies() -> dict[str, type["BatchingPolicy"]]:
    """Return the batching-policy classes this plugin provides, by name.

    Called by: the scheduler, once at start. Not on the hot path (the policy object's own
    methods run once per scheduling step).
    """


# -------------------------------------------------------------------------------------------
# Worker specs
# -------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def loopserve_make_worker(name: str, config: "DictConfig") -> "Worker | None":
    """Build the worker named ``name`` (``worker.name``), or return None if it is not yours.

    Stops at first non-None result.

    :param name: the requested worker name.
    :param config: the composed config.

    Called by: the scheduler process, once at start. Not on the hot path.
    """


@hookspec
def loopserve_before_forward(batch: "ForwardBatch") -> None:
    """Called just before a worker runs ``batch``.

    :param batch: the forward batch about to run (read-only). In an asynchronous loop
        (overlap, pipeline) it is called at launch, on the loop thread, and the batch's
        ``input_ids`` (and penalty histories) may still hold placeholder ids — negative
        numbers standing for tokens of the batch launched before, which the runner resolves
        on its executor just before the forward.

    Called by: ``Scheduler.prepare_forward`` in the ``run_batch`` stage, once per batch, in
    the scheduler process. Hot path: keep it cheap. Skipped entirely when no plugin
    implements it.

    Errors: an exception is contained (logged once per plugin, counted in
    ``loopserve_plugin_errors_total``); the engine keeps serving.
    """


@hookspec
def loopserve_after_forward(batch: "ForwardBatch", result: "ForwardResult") -> None:
    """Called after a worker returned ``result`` for ``batch``.

    :param batch: the forward batch that ran.
    :param result: its sampled tokens and timing.

    Called by: ``Scheduler.record_forward``, once per batch, on the loop thread: in the
    ``run_batch`` stage of a synchronous loop (normal), and in the ``process_batch_result``
    stage of an asynchronous one (overlap, pipeline), i.e. when the loop processes the
    result, one or more iterations after the launch. Hot path; skipped when no plugin
    implements it.

    Errors: an exception is contained (logged once per plugin, counted in
    ``loopserve_plugin_errors_total``); the engine keeps serving.
    """


@hookspec
def loopserve_requests_finished(scheduler: "Scheduler", reqs: list["Req"]) -> None:
    """Requests finished in this step (stop, length or abort), with their timing filled in.

    :param scheduler: the scheduler they ran on.
    :param reqs: the finished requests (read-only; their KV is being freed).

    Called by: the scheduler, at most once per ``process_batch_result`` / input-processing
    step, with all requests that finished in it — per batch, never per token. Skipped when no
    plugin implements it.

    Errors: an exception is contained (logged once per plugin, counted in
    ``loopserve_plugin_errors_total``); the engine keeps serving.
    """


# -------------------------------------------------------------------------------------------
# KV-transfer backend specs (disaggregated prefill and decode)
# -------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def loopserve_make_kv_manager(name: str, role: str, config: "DictConfig", kv_args: "KVArgs") -> "KVManager | None":
    """Build the KV-transfer manager of backend ``name`` (``disaggregation.transfer_backend``)
    for this server, or return None if the backend is not yours.

    The manager (``loopserve.core.disagg.KVManager``) makes one ``KVSender`` per request on a
    prefill server and one ``KVReceiver`` per request on a decode server; the scheduler polls
    them through ``KVPoll`` (Bootstrapping -> WaitingForInput -> Transferring -> Success |
    Failed) and never blocks on them. A prefill manager also publishes its endpoint to the
    bootstrap server (``disaggregation.bootstrap_port``). Each sender and receiver turns Failed
    by itself once ``disaggregation.transfer_timeout_s`` passes without progress. Stops at first
    non-None result.

    :param name: the requested backend name (``zmq``, ``mooncake`` or a plugin's).
    :param role: ``prefill`` or ``decode``.
    :param config: the composed config.
    :param kv_args: the worker's KV buffers (raw bytes per slot) and page size; under pipeline
        parallelism one stage's (``kv_args.layers``, ``kv_args.split``): a manager then moves
        only the layers it shares with each peer stage, and only ``kv_args.pp_rank == 0`` of a
        prefill server runs the bootstrap server (the other stages' routes are registered
        through it).

    Called by: the prefill / decode scheduler's constructor, once, in the scheduler process;
    with ``parallel.pp_size > 1`` also once in every other stage process (core/disagg/staged.py).
    Not on the hot path (the manager's own senders and receivers are polled once per loop
    iteration per request in transfer).
    """


# -------------------------------------------------------------------------------------------
# Lifecycle
# -------------------------------------------------------------------------------------------


@hookspec
def loopserve_register_observers(config: "DictConfig", telemetry: "Telemetry") -> dict[str, object] | None:
    """Return plugin objects to register for this engine, by name, built for its config and
    telemetry (the tracing plugin returns its span wrappers only when ``telemetry.tracing``;
    the metrics plugin its collectors only when ``telemetry.metrics``).

    Observers register here rather than at import so that an engine with tracing off has no
    stage wrapper at all (``has_wrappers`` is False and the loop calls stages directly).

    :param config: the composed config.
    :param telemetry: the engine's ``Telemetry``: its ``tracer_provider`` (None = tracing off),
        ``sample_ratio`` and ``metrics_registry`` (None = metrics off). Never the global ones.

    Called by: ``Engine``, once, after ``loopserve_configure`` and the worker, before the
    scheduler and loop are built. Not on the hot path.
    """


@hookspec
def loopserve_startup(scheduler: "Scheduler", loop: "EventLoop") -> None:
    """The scheduler and its loop are built and about to run.

    :param scheduler: the scheduler (its worker, KV pools and policy are ready).
    :param loop: the event loop that will drive it.

    Called by: ``Engine`` / the scheduler process, once. Not on the hot path.
    """


@hookspec
def loopserve_shutdown(scheduler: "Scheduler") -> None:
    """The loop has stopped; flush and release what the plugin holds.

    :param scheduler: the scheduler being shut down.

    Called by: ``Engine.shutdown`` / the scheduler process, once. Not on the hot path.
    """


# -------------------------------------------------------------------------------------------
# Wrappers around loop iterations and stages (tracing, metrics)
# -------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def loopserve_run_iteration(loop: "EventLoop", call: Callable[[], Any]) -> Any:
    """Run one loop iteration by calling ``call()``; wrappers time or trace it.

    Implement it only as a new-style wrapper (``@hookimpl(wrapper=True)``, ``return (yield)``);
    the core's default implementation is the one that calls ``call()``. Stops at first non-None
    result.

    :param loop: the loop running the iteration.
    :param call: runs the iteration; returns whether the iteration did any work.

    Called by: every loop's ``step``, once per iteration, in the scheduler process. Hot path:
    when no plugin wraps it, the loop calls ``call()`` directly and this hook costs nothing;
    likewise for the iterations a sampling plugin told the loop to skip
    (``loop.skip_wrappers``, see ``EventLoop``).

    Errors: a wrapper's exception is contained and counted; if it raised before yielding,
    the iteration runs unwrapped.
    """


@hookspec(firstresult=True)
def loopserve_run_stage(loop: "EventLoop", stage: str, call: Callable[[], Any], args: tuple) -> Any:
    """Run one scheduler stage (``recv_requests``, ``process_input_requests``,
    ``get_next_batch_to_run``, ``run_batch``, ``process_batch_result``,
    ``self_check_during_idle``) by calling ``call()``; wrappers time or trace it.

    Implement it only as a new-style wrapper (``@hookimpl(wrapper=True)``); the core's default
    implementation is the one that calls ``call()``. Stops at first non-None result.

    :param loop: the loop running the stage.
    :param stage: the stage's name.
    :param call: runs the stage and returns its result.
    :param args: the arguments ``call`` passes to the stage (read-only), e.g. the
        ``ScheduleBatch`` of ``run_batch`` and ``(batch, in_flight_entry)`` of
        ``process_batch_result``. The tracing plugin stores the launching iteration's span
        context on the entry ``run_batch`` returns and reads it back here, to link a
        result's processing to the iteration that launched the batch.

    Called by: every loop, once per stage per iteration, through ``EventLoop.stage`` (a loop
    that calls the hook itself must pass every argument, ``args`` included). Hot path:
    skipped entirely when no plugin wraps it, and for an iteration whose ``loop.wrap_stages``
    a sampling plugin cleared (see ``EventLoop``).

    Errors: a wrapper's exception is contained and counted; if it raised before yielding,
    the stage runs unwrapped. The stage's own exception propagates unchanged.
    """
