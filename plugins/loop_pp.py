"""``loop=pp``: pipeline parallelism over torch.distributed (gloo), one host or several.

With ``parallel.pp_size > 1`` the worker becomes a ``PipelineWorker`` (core/pp/pipeline.py):
rank 0 runs the scheduler and the first stage's layers in this process, the other stages
run in child processes (or on other nodes). The loop keeps ``pp_size - 1 +
parallel.pp_async_depth`` micro-batches in flight so every stage has one to work on while
stage 0 schedules the next; the scheduler role forms each micro-batch only from requests
whose previous token is back, so micro-batches in flight never share a request.
"""

from __future__ import annotations

from loopserve.core import hookimpl


def make_pipeline_worker(name: str, config):
    """The pipeline for ``worker=model`` (or None: another worker, or pp_size 1)."""
    if int(config.parallel.pp_size) <= 1 or name != "model":
        return None
    from loopserve.core.model.arch_config import ModelArchConfig
    from loopserve.core.model.loader import check_model_dir
    from loopserve.core.model.worker import ModelWorker
    from loopserve.core.pp.pipeline import PipelineWorker
    from loopserve.plugins.worker_model import model_worker_kwargs

    kwargs = model_worker_kwargs(config)
    check_model_dir(kwargs["model_path"])
    num_layers = ModelArchConfig.from_model_dir(kwargs["model_path"]).num_hidden_layers

    def make_stage0(layer_range, kv_size_layers):
        return ModelWorker(kv_num_tokens=config.kv_cache.num_tokens, layer_range=layer_range,
                           kv_size_layers=kv_size_layers, **kwargs)

    return PipelineWorker(config, num_layers, make_stage0, dict(worker="model", worker_kwargs=kwargs))


@hookimpl(tryfirst=True)
def loopserve_make_worker(name, config):
    return make_pipeline_worker(str(name), config)
