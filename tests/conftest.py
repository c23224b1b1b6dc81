import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from fake_worker import FakeWorkerPlugin  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """The embedded tiny model is written once per test session, into a temp cache dir."""
    if "LOOPSERVE_CACHE_DIR" not in os.environ:
        os.environ["LOOPSERVE_CACHE_DIR"] = str(tmp_path_factory.mktemp("loopserve-cache"))
    yield


@pytest.fixture
def fake_plugin():
    return FakeWorkerPlugin()


@pytest.fixture
def fake_engine(fake_plugin):
    """Factory: an Engine on the fake worker with extra overrides."""
    from loopserve.core import Engine

    engines = []

    def make(*overrides, **kw):
        eng = Engine(overrides=["worker=fake", *overrides], plugins=[("fake_worker", fake_plugin)], **kw)
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        eng.shutdown()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Factory: the directory of an ``hf_reference.ARCHS`` checkpoint (random weights, fixed
    seed), written once per session under the session's temporary directory."""
    from hf_reference import checkpoint

    root = str(tmp_path_factory.getbasetemp() / "parity-checkpoints")
    return lambda name: checkpoint(root, name)
