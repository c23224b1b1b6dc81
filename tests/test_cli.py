"""``loopserve generate`` as a user meets it: greedy tokens and text equal transformers' on
random Llama, Qwen2 and Qwen3 checkpoints, the embedded tiny model answers "Hello", and bad
input exits with code 2 and a message on stderr saying what to change.

The console-script runs are real subprocesses, started together (two at a time) by one
module fixture; the bad-input matrix calls the script's ``main()`` in-process (it is what
the console script calls), with two cases repeated as subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hf_reference import ARCHS, TEXT_PROMPTS, find_eos_prompt, hf_decode, hf_encode, hf_greedy
from loopserve.core import Engine, SamplingParams
from loopserve.core.cli import main
from loopserve.core.model.tiny import EOS_ID

N_NEW = 16
EOS_N = 32
# Prompts (indices into TEXT_PROMPTS) run through the CLI per checkpoint: every one for llama,
# a short and a long one for the others (each run is a process start, ~2.5 s of CPU).
CLI_PROMPTS = {"llama": [0, 1, 2, 3], "qwen2": [1, 3], "qwen3": [2, 3]}


def _loopserve() -> list[str]:
    exe = Path(sys.executable).with_name("loopserve")
    assert exe.exists(), f"console script missing next to {sys.executable}"
    return [str(exe)]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([*_loopserve(), *args], capture_output=True, timeout=180,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    # Decoded by hand: text mode would turn a generated "\r" into "\n".
    proc.stdout, proc.stderr = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    return proc


@pytest.fixture(scope="module")
def broken_dir(ckpt, tmp_path_factory):
    """Factory: a copy of the llama checkpoint without ``missing``."""
    root = tmp_path_factory.mktemp("cli-broken")

    def make(missing: str) -> str:
        d = root / f"no-{missing}"
        if not d.exists():
            shutil.copytree(ckpt("llama"), d)
            (d / missing).unlink()
        return str(d)

    return make


@pytest.fixture(scope="module")
def runs(ckpt, broken_dir):
    """Every subprocess of this module, run concurrently: name -> CompletedProcess."""
    eos_prompt = find_eos_prompt(ckpt("llama"), EOS_N)
    jobs: dict[str, list[str]] = {}
    for arch in ARCHS:
        for i in CLI_PROMPTS[arch]:
            text = TEXT_PROMPTS[i]
            jobs[f"{arch}-{i}"] = ["generate", f"prompt={text}", f"model.path={ckpt(arch)}", "output_format=json",
                                   f"sampling.max_new_tokens={N_NEW}", "sampling.ignore_eos=true"]
    if eos_prompt is not None:
        jobs["eos"] = ["generate", f"prompt={eos_prompt}", f"model.path={ckpt('llama')}", "output_format=json",
                       f"sampling.max_new_tokens={EOS_N}"]
    jobs["hello"] = ["generate", "prompt=Hello"]
    jobs["help"] = ["--help"]
    jobs["no-args"] = []
    jobs["bad-loop"] = ["generate", "prompt=Hello", "loop=nosuchloop"]
    jobs["bad-dir"] = ["generate", "prompt=Hello", f"model.path={broken_dir('model.safetensors')}"]
    jobs["bad-tokens"] = ["generate", "prompt=Hello", "sampling.max_new_tokens=0"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run, args) for name, args in jobs.items()}
        results = {name: f.result() for name, f in futures.items()}
    results["eos-prompt"] = eos_prompt
    return results


def _json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# ---- parity with transformers ----------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_generate_json_equals_transformers(runs, ckpt, arch):
    path = ckpt(arch)
    for i in CLI_PROMPTS[arch]:
        text = TEXT_PROMPTS[i]
        out = _json(runs[f"{arch}-{i}"])
        ids = hf_encode(path, text)
        ref = hf_greedy(path, ids, N_NEW, ignore_eos=True)
        assert out["prompt_token_ids"] == ids, text  # the prompt arrives verbatim, commas and all
        assert out["token_ids"] == ref, f"{arch} {text!r}: ours {out['token_ids']} vs HF {ref}"
        assert out["text"] == hf_decode(path, ref)
        assert out["finish_reason"] == "length"


def test_generate_stops_at_eos_like_transformers(runs, ckpt):
    path = ckpt("llama")
    assert runs["eos-prompt"] is not None, "no candidate prompt reaches </s>; change the candidates"
    out = _json(runs["eos"])
    ref = hf_greedy(path, hf_encode(path, runs["eos-prompt"]), EOS_N, ignore_eos=False)
    assert ref[-1] == EOS_ID and len(ref) < EOS_N
    assert out["token_ids"] == ref  # up to and including </s>
    assert out["text"] == hf_decode(path, ref)
    assert out["finish_reason"] == "stop" and out["matched_stop"] == EOS_ID


# ---- the tiny model and usage ----------------------------------------------------------------


def test_generate_hello_on_the_tiny_model_prints_the_completion(runs):
    proc = runs["hello"]
    assert proc.returncode == 0, proc.stderr
    # The CLI's defaults: greedy, 32 new tokens, stop at </s>.
    with Engine() as engine:
        expected = engine.generate("Hello", SamplingParams(max_new_tokens=32, temperature=0.0))[0].text
    assert expected and proc.stdout == expected + "\n"


def test_help_exits_0_and_no_arguments_exit_2(runs):
    assert runs["help"].returncode == 0
    assert "generate" in runs["help"].stdout and "prompt=" in runs["help"].stdout
    assert runs["no-args"].returncode == 2
    assert "usage" in runs["no-args"].stdout + runs["no-args"].stderr


@pytest.mark.parametrize("name, words", [
    ("bad-loop", ["nosuchloop", "normal"]),
    ("bad-dir", ["model.safetensors"]),
    ("bad-tokens", ["max_new_tokens", "at least one token"]),
])
def test_bad_input_subprocess_exits_2(runs, name, words):
    proc = runs[name]
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert proc.stderr.startswith("loopserve generate: error:")
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in proc.stderr


# ---- bad input, in-process -------------------------------------------------------------------------


BAD_INPUT = [
    # (overrides, words the message must contain)
    (["prompt="], ["prompt is empty", "at least one character"]),
    (["prompt=Hello", "sampling.max_new_tokens=0"], ["max_new_tokens", "at least one token"]),
    (["prompt=Hello", "sampling.max_new_tokens=-2"], ["max_new_tokens", "at least one token"]),
    (["prompt=" + "long prompt " * 4, "model.context_length=32"], ["context length is 32", "shorten the prompt"]),
    (["prompt=Hello", "sampling.temperature=-0.5"], ["temperature", ">= 0"]),
    (["prompt=Hello", "loop=nosuchloop"], ["nosuchloop", "normal"]),
    (["prompt=Hello", "policy=nosuchpolicy"], ["nosuchpolicy", "fcfs"]),
    (["prompt=Hello", "model.path={missing:model.safetensors}"], ["model.safetensors", "no weights"]),
    (["prompt=Hello", "model.path={missing:config.json}"], ["config.json", "model.path"]),
    (["prompt=Hello", "model.path={missing:tokenizer.json}"], ["tokenizer.json", "save_pretrained"]),
    (["prompt=Hello", "model.path={nowhere}"], ["does not exist", "model.path"]),
    (["sampling.max_new_tokens=4"], ["needs a prompt", 'prompt="Hello"']),
    (["prompt=Hello", "sampling.nosuchkey=1"], ["sampling.nosuchkey"]),
]


@pytest.mark.parametrize("overrides, words", BAD_INPUT, ids=[str(i) for i in range(len(BAD_INPUT))])
def test_bad_input_exits_2_with_a_message_saying_what_to_change(capsys, broken_dir, tmp_path, overrides, words):
    args = []
    for ov in overrides:
        if "{missing:" in ov:
            ov = ov.replace(ov[ov.index("{"):], broken_dir(ov[ov.index(":") + 1 : -1]))
        args.append(ov.replace("{nowhere}", str(tmp_path / "nowhere")))
    assert main(["generate", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("loopserve generate: error:")
    for w in words:
        assert w in captured.err, captured.err


def test_prompt_is_taken_verbatim(capsys):
    """Text that Hydra's override grammar would reject or change reaches the model as is."""
    for text in ["Hi, there. What's up?", "  a=b [1, 2] {x: y}  "]:
        assert main(["generate", f"prompt={text}", "output_format=json", "sampling.max_new_tokens=1",
                     "loop=normal"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["prompt_token_ids"] == [256, *text.encode()], text
