"""The ``loopserve`` console script: the first word picks the command, the rest are Hydra
overrides (``loopserve generate prompt="Hello" loop=normal sampling.max_new_tokens=16``).

Bad input exits with code 2 and a message on stderr that says what to change.
"""

from __future__ import annotations

import json
import sys
from typing import Callable

USAGE = """usage: loopserve COMMAND [key=value ...]

commands:
  generate   prompt="..." [overrides]   print the completion of one prompt
  config     [overrides]                print the composed config
  serve      [overrides]                HTTP server (OpenAI + SGLang APIs)
  bench      [-m] [overrides]           offline throughput benchmark (JSON on stdout);
                                        -m sweeps: loopserve bench -m policy=fcfs,lpm

Overrides are Hydra's: loop=normal policy=fcfs model.path=/models/x sampling.max_new_tokens=64
(prompt="..." is taken verbatim: commas, quotes and '=' need no Hydra quoting)
"""


class UsageError(ValueError):
    pass


def _split_prompt(args: list[str]) -> tuple[str | None, list[str]]:
    """Take ``prompt=...`` out of the overrides verbatim (the last one wins). Hydra's grammar
    would reject ordinary text such as "Hello, world" or "What's up?" and strip spaces."""
    prompt, rest = None, []
    for arg in args:
        if arg.startswith("prompt="):
            prompt = arg[len("prompt="):]
        else:
            rest.append(arg)
    return prompt, rest


def _generate(args: list[str]) -> int:
    from loopserve.core.engine import Engine
    from loopserve.core.sched.sampling_params import SamplingParams

    prompt, args = _split_prompt(args)
    if prompt is None:
        raise UsageError('generate needs a prompt: loopserve generate prompt="Hello"')
    with Engine(overrides=args) as engine:
        cfg = engine.config
        s = cfg.sampling
        sp = SamplingParams(
            max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
            min_p=s.min_p, repetition_penalty=s.repetition_penalty, frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty, seed=s.seed, stop=list(s.stop),
            stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos,
        )
        out = engine.generate(prompt, sp)[0]
        if out.finish_reason == "abort":
            raise ValueError(out.error or "the request was aborted")
        if cfg.output_format == "json":
            print(json.dumps({
                "text": out.text,
                "token_ids": out.token_ids,
                "prompt_token_ids": out.prompt_token_ids,
                "finish_reason": out.finish_reason,
                "matched_stop": out.matched_stop,
                "loop": engine.loop_name,
            }))
        else:
            print(out.text)
    return 0


def _config(args: list[str]) -> int:
    from loopserve.core.config import compose_config, to_yaml
    from loopserve.core.loop.build import disabled_plugins as _disabled_plugins
    from loopserve.core.plugin_manager import make_plugin_manager

    pm = make_plugin_manager(disable=_disabled_plugins(args))
    print(to_yaml(compose_config(args, pm)), end="")
    return 0


def _bench(args: list[str]) -> int:
    from loopserve.core.bench.throughput import main as bench_main

    return bench_main(args)


def _serve(args: list[str]) -> int:
    from loopserve.core.server.launch import serve

    return serve(args)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "generate": _generate,
    "config": _config,
    "serve": _serve,
    "bench": _bench,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"loopserve: unknown command {command!r}\n\n{USAGE}", file=sys.stderr, end="")
        return 2
    try:
        return COMMANDS[command](rest)
    except ValueError as exc:
        print(f"loopserve {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
