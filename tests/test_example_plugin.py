"""The example third-party plugin (examples/third_party_plugin) works as its README says: its
loop and policy are selectable, and its progress lines go to logging, never to stdout."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "third_party_plugin"


@pytest.fixture
def example(monkeypatch):
    from hydra.core.config_store import ConfigStore

    monkeypatch.syspath_prepend(str(EXAMPLE))
    import loopserve_example_plugin

    yield loopserve_example_plugin
    sys.modules.pop("loopserve_example_plugin", None)
    repo = ConfigStore.instance().repo
    repo.get("loop", {}).pop("budgeted.yaml", None)
    repo.get("policy", {}).pop("shortest_first.yaml", None)


def test_example_plugin_logs_instead_of_printing(example, capsys, caplog):
    from loopserve.core import Engine, SamplingParams

    caplog.set_level(logging.INFO, logger="loopserve_example_plugin")
    with Engine(overrides=["loop=budgeted", "policy=shortest_first", "loop.params.report_every=1", "worker=sim"],
                plugins=[("example_plugin", example)]) as engine:
        assert engine.loop_name == "budgeted"
        out = engine.generate(input_ids=[[1, 2, 3]], sampling_params=SamplingParams(max_new_tokens=3))[0]
    assert len(out.token_ids) == 3
    assert capsys.readouterr().out == ""
    lines = [r.getMessage() for r in caplog.records if r.name == "loopserve_example_plugin"]
    assert lines and lines[0].startswith("budgeted loop: ")
