"""Loading a Llama-family model from a local Hugging Face checkpoint directory.

Reads ``config.json`` into a ``ModelArchConfig``, builds the decoder with uninitialized
parameters (no random init of weights that are about to be overwritten), and fills every parameter from
``model.safetensors`` or the shards listed in ``model.safetensors.index.json``. Every
problem a user can cause (wrong path, missing file or tensor, unsupported dtype) is a
``ValueError`` that names the file or tensor and what to do about it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import defaultdict
from typing import Any, Iterator

import torch
from safetensors import safe_open

from loopserve.core.model.arch_config import ModelArchConfig
from loopserve.core.model.llama import LlamaForCausalLM

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"


def check_model_dir(model_dir: str) -> None:
    """ValueError unless ``model_dir`` is an existing directory."""
    if not os.path.isdir(model_dir):
        raise ValueError(
            f"model directory {model_dir!r} does not exist: set model.path to a local Hugging "
            "Face checkpoint directory (or leave it unset for the embedded tiny model)"
        )


def resolve_dtype(dtype: str, arch: ModelArchConfig, device: torch.device) -> torch.dtype:
    """The torch dtype to run in. ``auto`` takes the checkpoint's dtype on CUDA, float32 on
    the CPU (half-precision CPU matmuls are slow and drift from the reference); half
    precision on the CPU must be asked for explicitly, and only bfloat16 is allowed there."""
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return DTYPES.get(str(arch.torch_dtype), torch.float32)
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not supported; use auto, {', '.join(DTYPES)}")
    if dtype == "float16" and device.type == "cpu":
        raise ValueError("model.dtype=float16 is not supported on the CPU; use bfloat16 or float32")
    return DTYPES[dtype]


@contextlib.contextmanager
def _open_safetensors(path: str, device: str = "cpu") -> Iterator[Any]:
    """``safe_open`` with a truncated or corrupt file reported as a ValueError naming it."""
    try:
        f = safe_open(path, framework="pt", device=device)
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: the file is unusable
        raise ValueError(f"{path} is not a readable safetensors file ({e}); the download may be "
                         "truncated or corrupt: re-download the checkpoint") from None
    with f:
        yield f


def _weight_files(model_dir: str) -> dict[str, str]:
    """Tensor name -> safetensors file holding it."""
    single = os.path.join(model_dir, _SINGLE_FILE)
    index = os.path.join(model_dir, _INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise ValueError("weight_map must map tensor names to file names")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{index} is not a valid safetensors index ({e!r}); re-download the checkpoint"
            ) from e
        files = {name: os.path.join(model_dir, shard) for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not os.path.isfile(shard):
                raise ValueError(f"{shard} (listed in {index}) not found; re-download the checkpoint")
        return files
    if os.path.isfile(single):
        with _open_safetensors(single) as f:
            return {name: single for name in f.keys()}
    raise ValueError(
        f"no weights in {model_dir}: expected {_SINGLE_FILE} or {_INDEX_FILE} (only safetensors "
        "checkpoints are supported; convert .bin/.pth weights with transformers' save_pretrained)"
    )


def _is_ignored(name: str) -> bool:
    # Older checkpoints saved the rotary table as a buffer; it is recomputed from the config.
    return name.endswith("rotary_emb.inv_freq")


def load_model(
    model_dir: str,
    *,
    dtype: str = "auto",
    device: str | torch.device = "cpu",
    arch: ModelArchConfig | None = None,
    layer_range: tuple[int, int] | None = None,
) -> LlamaForCausalLM:
    """Build the decoder for ``model_dir`` (or the pipeline stage of ``layer_range``) and
    load its weights onto ``device``; a stage reads only its own tensors.

    Parameters are frozen (``requires_grad=False``): serving never trains the base weights,
    and frozen weights build no autograd graph even when a loop runs with gradients enabled.
    """
    check_model_dir(model_dir)
    arch = arch or ModelArchConfig.from_model_dir(model_dir)
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, arch, device)
    files = _weight_files(model_dir)

    # Names and shapes are checked against the files' headers on the meta device first, so a
    # config.json that does not match the weights (or asks for absurd sizes) fails before
    # anything large is allocated. A pipeline stage loads only its own tensors, but tensors
    # no stage uses are still rejected.
    known = {n for n, _ in LlamaForCausalLM(arch, dtype=torch_dtype, device="meta").named_parameters()}
    params = dict(LlamaForCausalLM(arch, dtype=torch_dtype, device="meta", layer_range=layer_range)
                  .named_parameters())

    if arch.tie_word_embeddings:
        # Tied checkpoints sometimes still store a copy of the head; it is the embedding.
        files.pop("lm_head.weight", None)
    missing = sorted(set(params) - set(files))
    if missing:
        raise ValueError(
            f"checkpoint {model_dir} lacks tensor {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f" needed by {arch.architecture}; check that config.json matches the weights"
        )
    unexpected = sorted(n for n in files if n not in known and not _is_ignored(n))
    if unexpected:
        raise ValueError(
            f"checkpoint {model_dir} has tensor {unexpected[0]} that {arch.architecture} as "
            "configured does not use (e.g. a bias the config does not declare); check that "
            "config.json matches the weights"
        )

    by_file: dict[str, list[str]] = defaultdict(list)
    for name in params:
        by_file[files[name]].append(name)
    for path, names in by_file.items():
        with _open_safetensors(path) as f:
            for name in names:
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(params[name].shape):
                    raise ValueError(
                        f"tensor {name} in {path} has shape {shape} but config.json implies "
                        f"{tuple(params[name].shape)}; check that config.json matches the weights")

    # Allocated once, directly in the target dtype and device (no float32 staging copy).
    model = LlamaForCausalLM(arch, dtype=torch_dtype, device=device, layer_range=layer_range)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for path, names in by_file.items():
            with _open_safetensors(path) as f:
                for name in names:
                    try:
                        tensor = f.get_tensor(name)
                    except Exception as e:  # noqa: BLE001 - a corrupt payload
                        raise ValueError(f"tensor {name} in {path} cannot be read ({e}); re-download "
                                         "the checkpoint") from None
                    params[name].copy_(tensor)
    model.requires_grad_(False)
    model.eval()
    return model
