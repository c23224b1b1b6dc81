"""``loop=pp``: pipeline parallelism over torch.distributed (gloo), one host or several.

With ``parallel.pp_size > 1`` the worker becomes a ``PipelineWorker`` (core/pp/pipeline.py):
rank 0 runs the scheduler and the first stage's layers in this process, the other stages
run in child processes (or on other nodes). The loop is a runner of depth
``pp_size * (1 + parallel.pp_async_depth) - 1``, so every stage has a micro-batch to work on
while stage 0 schedules the next; the scheduler role (core/pp/scheduler.py) keeps the
running requests in ``pp_size`` groups and never puts a request into a micro-batch before
its earlier ones (at most ``pp_async_depth`` of them) are back. Docs: docs/pipeline.md.
"""

from __future__ import annotations

from loopserve.core import hookimpl
from loopserve.core.loop import RunnerLoop
from loopserve.core.pp.future import StageError
from loopserve.core.pp.scheduler import PPScheduler


def pipeline_parts(name: str, config):
    """``(num_layers, make_stage0, stage_spec)`` for ``worker=model`` or ``worker=sim``:
    the layer count to split, rank 0's stage-worker factory ``(layer_range, kv_size_layers)``,
    and what a stage process needs to build its worker (plain values)."""
    if name == "sim":
        from loopserve.core.bench.cost_model import get_shape
        from loopserve.core.pp.sim_stage import SimStageWorker
        from loopserve.plugins.worker_sim import sim_worker_kwargs

        kwargs = sim_worker_kwargs(config)
        if int(config.parallel.nnodes) > 1:  # the modelled devices share no clock across hosts
            if kwargs.get("async_device"):
                raise ValueError("worker.params.async_device=true needs every pipeline stage on one host (its ready "
                                 "times are this host's monotonic clock); with parallel.nnodes > 1 leave it unset "
                                 "or set it to false")
            kwargs["async_device"] = False
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


class PPLoop(RunnerLoop):
    """A runner of depth ``pp_size * (1 + parallel.pp_async_depth) - 1`` over the pipeline
    worker.

    Each iteration launches the next micro-batch if one can be formed (stage 0 starts on it in
    the pipeline's launch thread; the requests get placeholder tokens), then processes the
    oldest micro-batch's result once more than ``depth`` are in flight, or at once when
    nothing could be launched (its requests are the ones the next micro-batch needs). A
    pipeline that failed (a stage died or hung) ends the loop, so the engine raises and the
    server answers 503 and exits.
    """

    name = "pp"
    scheduler_cls = PPScheduler
    pp_rank = 0  # the scheduling stage (its spans carry it; the other stages run no loop)

    def runner_depth(self) -> int:
        return pp_depth(self.config)

    def iteration(self) -> bool:
        return pipeline_iteration(self, super().iteration)


def pp_depth(config) -> int:
    """Each of the pp_size request groups has up to 1 + pp_async_depth micro-batches out."""
    par = config.parallel
    return max(0, int(par.pp_size) * (1 + int(par.pp_async_depth)) - 1)


def check_pipeline(loop) -> None:
    """A pipeline that failed (a stage died or hung) ends the loop. The micro-batches still in
    flight are processed first: each fails with the pipeline's error, so its requests end with
    that message before the loop stops. Then the error is raised."""
    error = getattr(loop.scheduler.worker, "error", None)
    if error is None:
        return
    runner = loop.runner
    while runner.pending:
        for entry in runner.due(False):
            loop.stage("process_batch_result", runner.process, entry.batch, entry)
    raise StageError(f"the pipeline failed: {error}") from error


def pipeline_iteration(loop, iteration) -> bool:
    """One loop iteration over a pipeline worker, ended by ``check_pipeline`` when the
    pipeline failed (before, so nothing is launched on it, during, and after)."""
    check_pipeline(loop)
    try:
        worked = iteration()
    except StageError:
        check_pipeline(loop)
        raise
    check_pipeline(loop)
    return worked


@hookimpl
def loopserve_register_loops():
    return [PPLoop]
