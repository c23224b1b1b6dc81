"""``worker=model``: the torch model worker that runs a real Llama-family checkpoint.

``model.path`` unset means the embedded tiny model, written on first use to the user cache
dir and then loaded through the same code path as any checkpoint.
"""

from __future__ import annotations

from loopserve.core import hookimpl


def resolve_attention_backend(backend: str, device: str) -> str:
    """``auto``: the Triton kernels on CUDA (when triton is installed), the torch reference on
    the CPU (where Triton only has its slow interpreter)."""
    if backend != "auto":
        return backend
    if not device.startswith("cuda"):
        return "torch"
    import importlib.util

    return "triton" if importlib.util.find_spec("triton") is not None else "torch"


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@hookimpl
def loopserve_make_worker(name, config):
    if name != "model":
        return None
    from loopserve.core.model.worker import ModelWorker

    return ModelWorker(kv_num_tokens=config.kv_cache.num_tokens, **model_worker_kwargs(config))


def model_worker_kwargs(config) -> dict:
    """``ModelWorker`` arguments from config (plain values: pipeline stages get them too)."""
    from loopserve.core.model.tiny import ensure_tiny_model

    device = resolve_device(str(config.model.device))
    return dict(
        model_path=config.model.path or ensure_tiny_model(),
        dtype=str(config.model.dtype),
        device=device,
        attention_backend=resolve_attention_backend(str(config.attention.backend), device),
        kv_mem_fraction=float(config.kv_cache.mem_fraction),
        page_size=int(config.kv_cache.page_size),
        max_running_requests=int(config.scheduler.max_running_requests),
        max_context_len=config.model.context_length,
        seed=int(config.model.seed),
        num_threads=config.model.num_threads,
        cuda_graph=config.model.get("cuda_graph"),
        cpu_kernel=str(config.attention.get("cpu_kernel", "auto")),
        cpu_linear=str(config.model.get("cpu_linear", "auto")),
        cpu_fused_ops=str(config.model.get("cpu_fused_ops", "auto")),
        cpu_malloc=str(config.model.get("cpu_malloc", "auto")),
    )
