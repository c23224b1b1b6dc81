"""The ``loopserve`` console script as a new user meets it in the first hour: per-command help,
``--version``, ``~`` in paths, quoting hints, "did you mean", settings that would be ignored,
loops that are not installed, ``input_ids=[...]`` for the sim worker, escaped control
characters on a terminal, and a bad ``model.path`` reported before torch is imported.

Every case is a real subprocess of the console script (or of ``python -c`` where the test must
look inside the process); they run two at a time from one module fixture.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import pytest

from loopserve.core.console.terminal import escape_controls

EXE = str(Path(sys.executable).with_name("loopserve"))
FAST = ["sampling.max_new_tokens=4", "loop=normal"]


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "HOME": str(home)}


def _run(args: list[str], env: dict[str, str], exe: list[str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([*(exe or [EXE]), *args], capture_output=True, timeout=180, env=env)
    proc.stdout, proc.stderr = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    return proc


NO_TORCH = ("import sys; from loopserve.core.cli import main; rc = main(sys.argv[1:]); "
            "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(rc)")

JOBS: dict[str, list[str]] = {
    "help-generate": ["generate", "--help"],
    "help-bench": ["bench", "--help"],
    "help-config": ["config", "-h"],
    "help-serve": ["serve", "--help"],
    "version": ["--version"],
    "tilde-config": ["config", "model.path=~/models/x", "bench.output_dir=~/results"],
    "tilde-missing": ["generate", "prompt=Hi", "model.path=~/no/such/model"],
    "unparsable": ["generate", "prompt=Hi", "model.served_name=my model [v2]"],
    "dym-bare": ["generate", "prompt=Hi", "max_new_tokens=4"],
    "dym-typo": ["generate", "prompt=Hi", "schedular.max_running_requests=4"],
    "disable-unknown": ["generate", "prompt=Hi", "plugins.disable=[loop_overlapp]"],
    "nnodes": ["generate", "prompt=Hi", "loop=normal", "parallel.nnodes=2"],
    "loop-pp": ["generate", "prompt=Hi", "loop=pp"],
    "disagg": ["generate", "prompt=Hi", "disaggregation.mode=prefill", "plugins.disable=[loop_disagg]"],
    "sim-ids": ["generate", "worker=sim", "input_ids=[1,2,3]", *FAST],
    "sim-ids-json": ["generate", "worker=sim", "input_ids=[1,2,3]", "output_format=json", *FAST],
    "sim-ignored": ["generate", "worker=sim", "input_ids=[1,2,3]", "model.dtype=bfloat16", *FAST],
    "bad-ids": ["generate", "input_ids=[1,x]"],
    "both": ["generate", "prompt=Hi", "input_ids=[1]"],
    "hello-pipe": ["generate", "prompt=Hello"],
    "hello-json": ["generate", "prompt=Hello", "output_format=json"],
}
# Run through ``python -c`` to see whether torch was imported.
PY_JOBS: dict[str, list[str]] = {
    "no-torch-bad-path": ["generate", "prompt=Hi", "model.path=/no/such/dir"],
    "no-torch-bad-key": ["generate", "prompt=Hi", "sampling.max_new_token=3"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = _env(home)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run, args, env) for name, args in JOBS.items()}
        futures.update({name: pool.submit(_run, args, env, [sys.executable, "-c", NO_TORCH])
                        for name, args in PY_JOBS.items()})
        results = {name: f.result() for name, f in futures.items()}
    results["home"] = home
    return results


def _error(proc, *words):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("loopserve generate: error:"), proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr


# ---- help and version ------------------------------------------------------------------------


@pytest.mark.parametrize("command, own, other", [
    ("generate", ["sampling.max_new_tokens=32", "input_ids=[1,2,3]", "loopserve generate prompt="],
     "bench.num_requests"),
    ("bench", ["bench.num_requests=256", "bench.peer=none", "loopserve bench -m"], "sampling.max_new_tokens"),
    ("config", ["sampling", "scheduler", "loopserve config loop=overlap"], "bench.num_requests="),
    ("serve", ["server.port=30000", "server.host=127.0.0.1", "loopserve serve"], "bench.num_requests"),
])
def test_each_command_has_help_with_its_own_keys_and_examples(runs, command, own, other):
    proc = runs[f"help-{command}"]
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: loopserve {command}")
    assert "examples:" in proc.stdout
    for text in own:
        assert text in proc.stdout, text
    assert other not in proc.stdout


def test_help_shows_the_schema_comment_of_a_key(runs):
    line = next(x for x in runs["help-generate"].stdout.splitlines() if "model.dtype=auto" in x)
    assert "float32" in line


def test_version(runs):
    assert runs["version"].returncode == 0
    assert runs["version"].stdout == f"loopserve {version('loopserve')}\n"


# ---- paths, quoting, suggestions -----------------------------------------------------------------


def test_tilde_in_path_values_is_expanded(runs):
    proc, home = runs["tilde-config"], runs["home"]
    assert proc.returncode == 0, proc.stderr
    assert f"path: {home}/models/x" in proc.stdout
    assert f"output_dir: {home}/results" in proc.stdout


def test_missing_model_path_names_the_expanded_directory(runs):
    _error(runs["tilde-missing"], f"{runs['home']}/no/such/model", "does not exist", "model.path")


def test_unparsable_override_says_how_to_quote_it(runs):
    _error(runs["unparsable"], "model.served_name=my model [v2]", "quote",
           "'model.served_name=\"my model [v2]\"'")


@pytest.mark.parametrize("name, meant", [("dym-bare", "sampling.max_new_tokens"),
                                         ("dym-typo", "scheduler.max_running_requests")])
def test_unknown_keys_get_did_you_mean(runs, name, meant):
    _error(runs[name], "unknown config key", f"did you mean {meant}?")


def test_suggestions_in_process():
    from loopserve.core.overrides import suggest_key

    assert suggest_key("max_new_tokens") == ["sampling.max_new_tokens"]
    assert suggest_key("schedular.max_running_requests") == ["scheduler.max_running_requests"]
    assert suggest_key("kv_cach.page_siz") == ["kv_cache.page_size"]
    assert suggest_key("zzzz.qqqq") == []


# ---- settings that would be ignored; loops that are not there -----------------------------------


def test_disabling_a_plugin_that_is_not_installed_is_an_error(runs):
    _error(runs["disable-unknown"], "plugins.disable", "loop_overlapp", "did you mean 'loop_overlap'?")


def test_parallel_settings_without_a_pp_loop_are_an_error(runs):
    _error(runs["nnodes"], "parallel.nnodes=2", "loop=normal", "pp")


@pytest.mark.parametrize("name, loop", [("loop-pp", "pp"), ("disagg", "disagg_prefill")])
def test_coming_loops_say_install_the_plugin_and_not_built_yet(runs, name, loop):
    _error(runs[name], f"'{loop}' is not installed", "install the plugin that provides it", "not built yet")


def test_the_not_built_yet_note_goes_away_once_a_plugin_registers_the_loop():
    from hydra.core.config_store import ConfigStore

    from loopserve.core import hookimpl
    from loopserve.core.config import LoopConfig, compose_config
    from loopserve.core.loop.base import resolve_loop_class
    from loopserve.core.plugin_manager import make_plugin_manager
    from loopserve.plugins.loop_normal import NormalLoop

    class PP:
        @hookimpl
        def loopserve_add_config(self, config_store):
            ConfigStore.instance().store(group="loop", name="pp", node=LoopConfig(name="pp"))

        @hookimpl
        def loopserve_register_loops(self):
            return {"pp": NormalLoop}

    pm = make_plugin_manager(plugins=[("pp_plugin", PP())])
    cfg = compose_config(["loop=pp", "parallel.pp_size=2"], pm)
    assert resolve_loop_class(cfg, pm) is NormalLoop


def test_settings_the_sim_worker_ignores_are_warned_about(runs):
    proc = runs["sim-ignored"]
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: model.dtype=bfloat16 is read by the model worker only" in proc.stderr


# ---- input_ids, terminal output ---------------------------------------------------------------------


def test_generate_with_input_ids_on_the_sim_worker(runs):
    text, js = runs["sim-ids"], runs["sim-ids-json"]
    assert text.returncode == 0 and js.returncode == 0, (text.stderr, js.stderr)
    out = json.loads(js.stdout)
    assert out["prompt_token_ids"] == [1, 2, 3] and len(out["token_ids"]) == 4
    assert text.stdout == " ".join(map(str, out["token_ids"])) + "\n"


@pytest.mark.parametrize("name, words", [("bad-ids", ["input_ids", "input_ids=[1,2,3]"]),
                                         ("both", ["either prompt", "not both"])])
def test_bad_input_ids(runs, name, words):
    _error(runs[name], *words)


def _run_on_a_terminal(args: list[str], timeout: float = 120.0) -> str:
    """Run the console script with stdout on a pseudo-terminal; what it printed there."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([EXE, *args], stdout=slave, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(master)
    assert proc.returncode == 0
    return b"".join(chunks).decode("utf-8").replace("\r\n", "\n")


def test_control_characters_are_escaped_on_a_terminal_only(runs):
    raw = json.loads(runs["hello-json"].stdout)["text"]
    assert any(ord(c) < 32 and c not in "\n\t" for c in raw), "the tiny model's Hello has no control bytes"
    assert runs["hello-pipe"].stdout == raw + "\n"  # piped: exact
    shown = _run_on_a_terminal(["generate", "prompt=Hello"])
    assert shown == escape_controls(raw) + "\n"
    assert not any(ord(c) < 32 and c not in "\n\t" for c in shown)
    # JSON stays exact on a terminal too.
    assert json.loads(_run_on_a_terminal(["generate", "prompt=Hello", "output_format=json"]))["text"] == raw


def test_escape_controls():
    assert escape_controls("a\x1b[31mb\n\tc\u202e\x7f") == "a\\x1b[31mb\n\tc\\u202e\\x7f"
    assert escape_controls("héllo ✓") == "héllo ✓"


# ---- checked before torch is imported -------------------------------------------------------------


@pytest.mark.parametrize("name, words", [("no-torch-bad-path", ["/no/such/dir", "does not exist"]),
                                         ("no-torch-bad-key", ["sampling.max_new_tokens"])])
def test_bad_input_is_reported_without_importing_torch(runs, name, words):
    proc = runs[name]
    _error(proc, *words)
    assert proc.stdout == "no torch\n"
