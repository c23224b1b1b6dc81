"""The ``loopserve`` console script: the first word picks the command, the rest are Hydra
overrides (``loopserve generate prompt="Hello" loop=normal sampling.max_new_tokens=16``).

Bad input exits with code 2 and a message on stderr that says what to change.
"""

from __future__ import annotations

import json
import sys
from typing import Callable

USAGE = """usage: loopserve COMMAND [key=value ...]
       loopserve COMMAND --help      the command's keys and examples
       loopserve --version

commands:
  generate   prompt="..." [overrides]   print the completion of one prompt
             input_ids=[1,2,3]          (or of token ids: worker=sim has no tokenizer)
  config     [overrides]                print the composed config
  serve      [overrides]                HTTP server (OpenAI + SGLang APIs)
  bench      [-m] [overrides]           offline throughput benchmark (JSON on stdout);
                                        -m sweeps: loopserve bench -m policy=fcfs,lpm

Overrides are Hydra's: loop=normal policy=fcfs model.path=/models/x sampling.max_new_tokens=64
(prompt="..." is taken verbatim: commas, quotes and '=' need no Hydra quoting;
 model.path=~/x is expanded; other values with spaces or brackets need quotes:
 'model.served_name="my model"')
"""


class UsageError(ValueError):
    pass


def _generate(args: list[str]) -> int:
    from loopserve.core.console.args import early_checks, split_generate_args

    parsed = split_generate_args(args)
    if parsed.prompt is None and parsed.input_ids is None:
        raise UsageError('generate needs a prompt: loopserve generate prompt="Hello" '
                         "(or token ids: input_ids=[1,2,3])")
    early_checks(parsed.overrides)  # before torch is imported
    from loopserve.core.console.terminal import for_stream
    from loopserve.core.engine import Engine
    from loopserve.core.sched.sampling_params import SamplingParams

    args = parsed.overrides
    with Engine(overrides=args) as engine:
        cfg = engine.config
        s = cfg.sampling
        sp = SamplingParams(
            max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
            min_p=s.min_p, repetition_penalty=s.repetition_penalty, frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty, seed=s.seed, stop=list(s.stop),
            stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos,
        )
        if parsed.input_ids is not None:
            out = engine.generate(input_ids=[parsed.input_ids], sampling_params=sp)[0]
        else:
            out = engine.generate(parsed.prompt, sp)[0]
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
        elif engine.tokenizer is None:  # a worker without a tokenizer (worker=sim): the ids
            print(" ".join(str(t) for t in out.token_ids))
        else:
            print(for_stream(out.text, sys.stdout))
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
    if argv[0] in ("-V", "--version", "version"):
        from loopserve.core.console.help import version

        print(f"loopserve {version()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = [c for c in COMMANDS if c.startswith(command[:3])] if "=" not in command else []
        hint = (f"; did you mean `loopserve {close[0]}`?" if close else
                f"; overrides come after the command: loopserve generate {command}" if "=" in command else "")
        print(f"loopserve: unknown command {command!r}{hint}\n\n{USAGE}", file=sys.stderr, end="")
        return 2
    from loopserve.core.console.help import COMMANDS as HELP, command_help, wants_help

    if wants_help(rest) and command in HELP:
        print(command_help(command), end="")
        return 0
    _setup_logging(command)
    try:
        return COMMANDS[command](rest)
    except ValueError as exc:
        print(f"loopserve {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _setup_logging(command: str) -> None:
    """loopserve's own log lines on stderr: start-up choices (CPU threads) for the long-running
    commands, warnings (settings that have no effect) for all; LOOPSERVE_LOG_LEVEL overrides."""
    import logging
    import os

    level = os.environ.get("LOOPSERVE_LOG_LEVEL", "INFO" if command in ("serve", "bench") else "WARNING")
    logger = logging.getLogger("loopserve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"loopserve {command}: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper() if level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR") else "INFO")


if __name__ == "__main__":
    sys.exit(main())
