"""``loop=pp``: pipeline parallelism over torch.distributed (gloo), one host or several.

With ``parallel.pp_size > 1`` the worker becomes a ``PipelineWorker`` (core/pp/pipeline.py):
rank 0 runs the scheduler and the first stage's layers in this process, the other stages
run in child processes (or on other nodes). The loop keeps ``pp_size - 1 +
parallel.pp_async_depth`` micro-batches in flight so every stage has one to work on while
stage 0 schedules the next; the scheduler role forms each micro-batch only from requests
whose previous token is back, so micro-batches in flight never share a request.
"""

from __future__ import annotations

import collections
from typing import Any

from loopserve.core import hookimpl
from loopserve.core.loop import EventLoop
from loopserve.core.pp.future import SingleStage
from loopserve.core.pp.scheduler import PPScheduler
from loopserve.core.sched.schedule_batch import ScheduleBatch


def pipeline_parts(name: str, config):
    """``(num_layers, make_stage0, stage_spec)`` for ``worker=model`` or ``worker=sim``:
    the layer count to split, rank 0's stage-worker factory ``(layer_range, kv_size_layers)``,
    and what a stage process needs to build its worker (plain values)."""
    if name == "sim":
        from loopserve.core.bench.cost_model import get_shape
        from loopserve.core.pp.sim_stage import SimStageWorker
        from loopserve.plugins.worker_sim import sim_worker_kwargs

        kwargs = sim_worker_kwargs(config)
        num_layers = get_shape(str(kwargs.get("model", "llama3-8b"))).num_layers

        def make_sim0(layer_range, kv_size_layers):
            return SimStageWorker(layer_range=layer_range, kv_size_layers=kv_size_layers, **kwargs)

        return num_layers, make_sim0, dict(worker="sim", worker_kwargs=kwargs)
    from loopserve.core.model.arch_config import ModelArchConfig
    from loopserve.core.model.loader import check_model_dir
    from loopserve.core.model.worker import ModelWorker
    from loopserve.plugins.worker_model import model_worker_kwargs

    kwargs = model_worker_kwargs(config)
    check_model_dir(kwargs["model_path"])
    num_layers = ModelArchConfig.from_model_dir(kwargs["model_path"]).num_hidden_layers

    def make_model0(layer_range, kv_size_layers):
        return ModelWorker(kv_num_tokens=config.kv_cache.num_tokens, layer_range=layer_range,
                           kv_size_layers=kv_size_layers, **kwargs)

    return num_layers, make_model0, dict(worker="model", worker_kwargs=kwargs)


def make_pipeline_worker(name: str, config):
    """The pipeline for ``worker=model`` or ``worker=sim`` (None: another worker, or pp_size 1)."""
    if int(config.parallel.pp_size) <= 1 or name not in ("model", "sim"):
        return None
    from loopserve.core.pp.pipeline import PipelineWorker

    return PipelineWorker(config, *pipeline_parts(name, config))


@hookimpl(tryfirst=True)
def loopserve_make_worker(name, config):
    return make_pipeline_worker(str(name), config)


class PPLoop(EventLoop):
    """Keeps ``depth = pp_size - 1 + parallel.pp_async_depth`` micro-batches in flight.

    Each iteration launches the next micro-batch if one can be formed (``run_batch``: stage 0
    starts on it in the pipeline's launch thread, the requests get placeholder tokens), then
    processes the oldest micro-batch's result (``process_batch_result``) once more than
    ``depth`` are in flight, or at once when nothing could be launched — its requests are
    the ones the next micro-batch needs.
    """

    name = "pp"
    scheduler_cls = PPScheduler
    pp_rank = 0  # the scheduling stage (its spans carry it; the other stages run no loop)

    def __init__(self, scheduler: Any, pm: Any, config: Any = None) -> None:
        super().__init__(scheduler, pm, config)
        worker = scheduler.worker
        # A plain worker (pp_size 1, or one without a pipeline form) runs as a single stage.
        self.pipeline = worker if hasattr(worker, "submit") else SingleStage(worker, self.grad_mode)
        self.pp_size = int(config.parallel.pp_size)
        self.depth = self.pp_size - 1 + int(config.parallel.pp_async_depth)
        self.result_timeout_s = float(config.parallel.stage_timeout_s) * self.pp_size
        self.in_flight: collections.deque[tuple[ScheduleBatch, Any]] = collections.deque()

    def has_pending(self) -> bool:
        return bool(self.in_flight) or self.scheduler.has_work

    def launch_batch(self, batch: ScheduleBatch) -> Any:
        """The ``run_batch`` stage: start the micro-batch down the pipeline; returns at once."""
        s = self.scheduler
        fb = batch.to_forward_batch()
        if fb.output_ids:
            # Penalties read the outputs as they are now; commit_batch appends to them below.
            fb.output_ids = [None if ids is None else list(ids) for ids in fb.output_ids]
        if s._forward_hooks:
            s.pm.hook.loopserve_before_forward(batch=fb)
        future = self.pipeline.submit(fb)
        # Placeholders: no later micro-batch reads them (PPScheduler keeps requests with a
        # token in flight out of decode batches); resolve_batch overwrites them.
        s.commit_batch(batch, [-1] * fb.batch_size)
        batch.trace_context = getattr(self, "current_trace_context", None)
        batch.mb_id = future.mb_id
        return future

    def process_result(self, batch: ScheduleBatch, future: Any) -> None:
        """The ``process_batch_result`` stage: wait for the last stage's tokens, resolve them."""
        s = self.scheduler
        result = future.wait(self.result_timeout_s)
        s.stats.num_forwards += 1
        s.stats.forward_time_s += result.forward_time_s
        if s._forward_hooks:
            s.pm.hook.loopserve_after_forward(batch=future.fb, result=result)
        s.resolve_batch(batch, result.next_token_ids)

    def iteration(self) -> bool:
        s = self.scheduler
        received = self.stage("recv_requests", s.recv_requests)
        self.stage("process_input_requests", s.process_input_requests, received)
        batch = self.stage("get_next_batch_to_run", s.get_next_batch_to_run)
        if batch is not None:
            future = self.stage("run_batch", self.launch_batch, batch)
            self.in_flight.append((batch, future))
        processed = bool(self.in_flight) and (batch is None or len(self.in_flight) > self.depth)
        if processed:
            prev_batch, prev_future = self.in_flight.popleft()
            self.stage("process_batch_result", self.process_result, prev_batch, prev_future)
        if batch is None and not self.in_flight:
            self.stage("self_check_during_idle", s.self_check_during_idle)
        s.last_batch = batch
        return batch is not None or bool(received) or processed

    def close(self) -> None:
        # Results still in flight are abandoned; the worker's shutdown stops the stages.
        self.in_flight.clear()
        if isinstance(self.pipeline, SingleStage):
            self.pipeline.close()


@hookimpl
def loopserve_register_loops():
    return {"pp": PPLoop}
