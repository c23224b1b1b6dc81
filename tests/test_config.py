"""The typed Hydra config tree: every group option composes (through ``compose_config`` and
through Hydra's own API), bad overrides fail at compose time with a message naming the key, and
``validate_config`` rejects out-of-range values. Plus the ``loopserve config`` command."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from loopserve.core.config import (
    CONFIG_MODULE,
    GradMode,
    compose_config,
    register_schema,
    validate_config,
)


def group_options() -> dict[str, list[str]]:
    """``{group: [option, ...]}`` from the ``conf/<group>/*.yaml`` files of the installed package."""
    groups: dict[str, list[str]] = {}
    for entry in files(CONFIG_MODULE).iterdir():
        if entry.is_dir() and not entry.name.startswith(("_", ".")):
            options = sorted(f.name[: -len(".yaml")] for f in entry.iterdir() if f.name.endswith(".yaml"))
            if options:
                groups[entry.name] = options
    return groups


GROUP_OPTIONS = group_options()
ALL_OPTIONS = [(g, o) for g, opts in sorted(GROUP_OPTIONS.items()) for o in opts]


def option_values(group: str, option: str) -> dict:
    text = files(CONFIG_MODULE).joinpath(group, f"{option}.yaml").read_text()
    return yaml.safe_load(text) or {}


@pytest.fixture
def hydra_compose():
    """Hydra's own API, as Hydra's examples compose in tests."""
    register_schema()

    def run(overrides=()):
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    return run


# ------------------------------------------------------------------------- every option composes


def test_expected_group_options_are_shipped():
    expected = {
        "loop": {"auto"},  # the loops' own nodes come from their classes (next test)
        "policy": {"fcfs"},
        "worker": {"model"},
        "attention": {"auto", "torch", "triton"},
        "tracing": {"none"},
        "model": {"default"},
    }
    for group, options in expected.items():
        assert options <= set(GROUP_OPTIONS.get(group, [])), (group, GROUP_OPTIONS.get(group))


def test_every_registered_loop_composes_from_its_class():
    from loopserve.core.loop import available_loops
    from loopserve.core.plugin_manager import make_plugin_manager

    loops = available_loops(make_plugin_manager())
    assert {"normal", "overlap"} <= set(loops)
    for name, cls in loops.items():
        cfg = compose_config([f"loop={name}"])
        assert cfg.loop.name == name == cls.name
        assert dict(cfg.loop.params) == dict(getattr(cls, "default_params", {}))


def test_main_config_defaults():
    cfg = compose_config([])
    assert cfg.loop.name == "auto"
    assert cfg.policy.name == "fcfs"
    assert cfg.worker.name == "model"
    assert cfg.model.path is None and cfg.model.dtype == "auto" and cfg.model.device == "auto"
    assert cfg.attention.backend == "auto"
    assert cfg.tracing.exporter == "none"
    assert cfg.grad_mode == GradMode.no_grad
    assert cfg.disaggregation.mode is None
    assert cfg.parallel.pp_size == 1
    assert cfg.scheduler.enable_overlap is None  # auto: overlap on CUDA and the sim worker
    assert list(cfg.plugins.disable) == []
    assert cfg.server.port == 30000 and cfg.server.host == "127.0.0.1"


@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_option_composes_via_compose_config(group, option):
    cfg = compose_config([f"{group}={option}"])
    for key, value in option_values(group, option).items():
        assert cfg[group][key] == value, (group, option, key)


@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_option_composes_via_hydra(hydra_compose, group, option):
    cfg = hydra_compose([f"{group}={option}"])
    for key, value in option_values(group, option).items():
        assert cfg[group][key] == value, (group, option, key)
    validate_config(cfg)  # what Hydra composes from a shipped option is valid as it stands


def test_hydra_and_compose_config_agree(hydra_compose):
    overrides = ["loop=normal", "attention=torch", "scheduler.max_running_requests=7", "grad_mode=inference"]
    ours = compose_config(overrides)
    theirs = hydra_compose(overrides)
    assert OmegaConf.to_container(ours) == OmegaConf.to_container(theirs)
    assert ours.scheduler.max_running_requests == 7
    assert ours.grad_mode == GradMode.inference


def test_typed_values_are_converted():
    cfg = compose_config(["scheduler.max_running_requests=12", "tracing.sample_ratio=0.5",
                          "scheduler.enable_overlap=true", "plugins.disable=[a,b]", "model.path=/m/x"])
    assert cfg.scheduler.max_running_requests == 12 and isinstance(cfg.scheduler.max_running_requests, int)
    assert cfg.tracing.sample_ratio == 0.5
    assert cfg.scheduler.enable_overlap is True
    assert list(cfg.plugins.disable) == ["a", "b"]
    assert cfg.model.path == "/m/x"


@pytest.mark.parametrize("mode", [m.value for m in GradMode])
def test_grad_mode_values_compose(mode):
    assert compose_config([f"grad_mode={mode}"]).grad_mode == GradMode(mode)


# ------------------------------------------------------------------------- bad overrides


@pytest.mark.parametrize(
    ("override", "must_name"),
    [
        ("scheduler.max_running_requests=abc", ["scheduler.max_running_requests", "abc"]),
        ("kv_cache.page_size=1.5", ["kv_cache.page_size"]),
        ("scheduler.enable_overlap=maybe", ["scheduler.enable_overlap"]),
        ("scheduler.nope=1", ["scheduler.nope"]),
        ("nope=1", ["nope"]),
        ("loop.nope=1", ["loop.nope"]),
        ("+nope=1", ["nope"]),
        ("+scheduler.max_runing_requests=4", ["max_runing_requests"]),
        ("grad_mode=foo", ["grad_mode", "foo", "no_grad", "inference", "enable_grad"]),
    ],
)
def test_bad_override_raises_value_error_naming_the_key(override, must_name):
    with pytest.raises(ValueError) as info:
        compose_config([override])
    message = str(info.value)
    for word in must_name:
        assert word in message, (override, message)


@pytest.mark.parametrize("group", ["loop", "policy", "worker", "attention", "tracing"])
def test_unknown_group_option_lists_available_options(group):
    with pytest.raises(ValueError) as info:
        compose_config([f"{group}=nosuch"])
    message = str(info.value)
    if group in ("loop", "policy", "worker"):  # plugins add these: say so
        assert f"{group} 'nosuch' is not installed" in message
        assert "install the plugin that provides it" in message
    else:
        assert f"{group}/nosuch" in message
        assert "Available options" in message
    for option in GROUP_OPTIONS[group]:
        assert option in message, (group, option, message)


def test_hydra_itself_rejects_unknown_keys(hydra_compose):
    """The schema is what makes a typo fail; without compose_config's wrapping too."""
    with pytest.raises(Exception, match="nope"):
        hydra_compose(["scheduler.nope=1"])


def test_error_message_has_no_search_path_dump():
    with pytest.raises(ValueError) as info:
        compose_config(["loop=nosuch"])
    assert "provider=" not in str(info.value)


# ------------------------------------------------------------------------- validate_config


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("kv_cache.page_size=0", "kv_cache.page_size"),
        ("kv_cache.page_size=-4", "kv_cache.page_size"),
        ("model.dtype=int8", "model.dtype"),
        ("model.device=tpu", "model.device"),
        ("attention.backend=flash", "attention.backend"),
        ("disaggregation.mode=x", "disaggregation.mode"),
        ("scheduler.max_running_requests=0", "scheduler.max_running_requests"),
        ("scheduler.max_prefill_tokens=0", "scheduler.max_prefill_tokens"),
        ("scheduler.chunked_prefill_size=0", "scheduler.chunked_prefill_size"),
        ("scheduler.chunked_prefill_size=-2", "scheduler.chunked_prefill_size"),
        ("kv_cache.mem_fraction=0", "kv_cache.mem_fraction"),
        ("kv_cache.mem_fraction=1.5", "kv_cache.mem_fraction"),
        ("parallel.pp_size=0", "parallel.pp_size"),
        ("tracing.sample_ratio=1.5", "tracing.sample_ratio"),
        ("tracing.sample_ratio=-0.1", "tracing.sample_ratio"),
        ("output_format=xml", "output_format"),
    ],
)
def test_validate_config_range_errors(hydra_compose, override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        compose_config([override])
    # validate_config on its own says the same about what Hydra composed unchecked.
    cfg = hydra_compose([override])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate_config(cfg)


def test_kv_pool_smaller_than_a_page_is_rejected():
    with pytest.raises(ValueError, match=r"kv_cache\.num_tokens"):
        compose_config(["kv_cache.page_size=16", "kv_cache.num_tokens=8"])


@pytest.mark.parametrize(
    "overrides",
    [
        ["scheduler.chunked_prefill_size=-1"],
        ["scheduler.chunked_prefill_size=1"],
        ["model.device=cuda:1"],
        ["model.dtype=bfloat16", "model.device=cpu"],
        ["disaggregation.mode=prefill"],
        ["disaggregation.mode=decode"],
        ["disaggregation.mode=null"],
        ["kv_cache.page_size=16", "kv_cache.num_tokens=16"],
        ["kv_cache.mem_fraction=1.0"],
        ["tracing.sample_ratio=0", "tracing.exporter=console"],
        ["output_format=json"],
        ["+loop.params.depth=3"],  # plugin-owned params are free-form
    ],
)
def test_valid_edge_values_pass(overrides):
    compose_config(overrides)


# ------------------------------------------------------------------------- loopserve config (CLI)


def _loopserve() -> str:
    exe = Path(sys.executable).with_name("loopserve")
    assert exe.exists(), f"console script missing next to {sys.executable}"
    return str(exe)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_loopserve(), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_cli_config_prints_yaml():
    proc = _run_cli("config", "loop=normal", "scheduler.max_running_requests=5", "grad_mode=enable_grad")
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load(proc.stdout)
    assert data["loop"]["name"] == "normal"
    assert data["scheduler"]["max_running_requests"] == 5
    assert data["grad_mode"] == "enable_grad"
    assert data["policy"]["name"] == "fcfs"


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("scheduler.nope=1", ["scheduler.nope"]),
        ("loop=nosuch", ["loop 'nosuch' is not installed", "auto", "normal"]),
        ("kv_cache.page_size=0", ["kv_cache.page_size"]),
    ],
)
def test_cli_config_bad_override_exits_2(override, words):
    proc = _run_cli("config", override)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    for word in words:
        assert word in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_unknown_command_exits_2():
    proc = _run_cli("nosuchcommand")
    assert proc.returncode == 2
    assert "nosuchcommand" in proc.stderr
