"""The plugin system: documented hookspecs (datasette-style: each documented and exercised),
a plugin manager built on demand only, built-ins loaded through the ``loopserve`` entry-point
group, blocking by name, misspelled hooks caught, and a real third-party distribution written
at test time whose loop and policy an Engine then uses."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
import threading

import pluggy
import pytest

from loopserve.core import ForwardBatch, ForwardResult, SamplingParams, hookimpl
from loopserve.core import hookspecs as hookspecs_module
from loopserve.core.plugin_manager import make_plugin_manager

from fake_worker import Stepped, reference_tokens

BUILTINS = {"loop_auto", "loop_normal", "policy_fcfs", "worker_model", "tracing", "metrics"}


def all_hookspecs() -> dict[str, object]:
    return {
        name: fn
        for name, fn in inspect.getmembers(hookspecs_module, inspect.isfunction)
        if name.startswith("loopserve_") and hasattr(fn, "loopserve_spec")
    }


# Hooks no built-in plugin implements, and the test in this file that exercises each. A new
# hookspec must either get a built-in implementation or a line here (and its test).
EXERCISED_BY_TEST = {
    "loopserve_add_config": "test_third_party_distribution_plugs_in_loop_and_policy",
    "loopserve_configure": "test_configure_hook_can_reject_the_config",
    "loopserve_before_forward": "test_lifecycle_and_forward_hooks_are_called",
    "loopserve_after_forward": "test_lifecycle_and_forward_hooks_are_called",
    "loopserve_startup": "test_lifecycle_and_forward_hooks_are_called",
    "loopserve_shutdown": "test_lifecycle_and_forward_hooks_are_called",
    "loopserve_run_iteration": "test_iteration_and_stage_wrappers",
    "loopserve_run_stage": "test_iteration_and_stage_wrappers",
    "loopserve_register_loops": "test_third_party_distribution_plugs_in_loop_and_policy",
    "loopserve_register_policies": "test_third_party_distribution_plugs_in_loop_and_policy",
    "loopserve_make_worker": "test_disabling_the_worker_plugin",
    "loopserve_select_loop": "test_select_loop_hook_is_firstresult",
    "loopserve_requests_finished": "test_requests_finished_hook_is_called_once_per_step",
    "loopserve_make_kv_manager": "test_kv_transfer_backend_plugin_is_picked_by_name",
}


# ------------------------------------------------------------------------- (a) hookspecs


def test_there_are_hookspecs():
    assert {"loopserve_register_loops", "loopserve_select_loop", "loopserve_register_policies",
            "loopserve_make_worker"} <= set(all_hookspecs())


@pytest.mark.parametrize("name", sorted(all_hookspecs()))
def test_hookspec_is_documented(name):
    fn = all_hookspecs()[name]
    doc = " ".join((inspect.getdoc(fn) or "").split())  # line wraps do not matter
    assert "Called by" in doc, f"{name}: the docstring must say who calls it ('Called by: ...')"
    opts = fn.loopserve_spec
    if opts.get("firstresult"):
        assert "Stops at first non-None result" in doc, name
    # A :param: line for every argument (pytest's convention).
    for arg in inspect.signature(fn).parameters:
        assert f":param {arg}:" in doc, f"{name}: no ':param {arg}:' line"


def test_every_hookspec_is_implemented_by_a_builtin_or_exercised_here():
    pm = make_plugin_manager()
    implemented_by_builtin = {
        name
        for name in all_hookspecs()
        if any(impl.plugin_name in BUILTINS for impl in getattr(pm.hook, name).get_hookimpls())
    }
    for name in all_hookspecs():
        assert name in implemented_by_builtin or name in EXERCISED_BY_TEST, (
            f"{name} is neither implemented by a built-in plugin nor exercised by a test")
    for hook, test_name in EXERCISED_BY_TEST.items():
        assert hook in all_hookspecs(), f"stale entry {hook}"
        assert callable(globals().get(test_name)), f"{hook}: test {test_name} does not exist"
    # Which built-ins implement what (documents the table above).
    assert {"loopserve_register_loops", "loopserve_select_loop", "loopserve_register_policies",
            "loopserve_make_worker"} <= implemented_by_builtin


# ------------------------------------------------------------------------- (b) no import-time pm


def test_importing_loopserve_builds_no_plugin_manager():
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        import pluggy
        created = []
        original = pluggy.PluginManager.__init__
        def counting_init(self, *args, **kwargs):
            created.append(args)
            original(self, *args, **kwargs)
        pluggy.PluginManager.__init__ = counting_init

        import loopserve.core, loopserve.plugins
        # Every module of core and plugins, walked (not listed): the torch-free ones first.
        walked = [m.name for m in pkgutil.walk_packages(loopserve.core.__path__, "loopserve.core.")]
        walked += [m.name for m in pkgutil.iter_modules(loopserve.plugins.__path__, "loopserve.plugins.")]
        heavy = ("loopserve.core.model.", "loopserve.core.bench.peers", "loopserve.plugins.worker_model",
                 "loopserve.core.pp.wire", "loopserve.core.pp.pipeline", "loopserve.core.pp.sim_stage")
        light = [n for n in walked if not n.startswith(heavy)]
        modules = [importlib.import_module(n) for n in light]
        assert "torch" not in sys.modules, "importing the scheduling core pulled in torch"
        modules += [importlib.import_module(n) for n in walked if n.startswith(heavy)]
        assert not created, f"PluginManager built at import time: {created}"
        for mod in modules + [loopserve.core, loopserve.plugins]:
            for attr, value in vars(mod).items():
                assert not isinstance(value, pluggy.PluginManager), f"module-level pm {mod.__name__}.{attr}"
        names = walked
        from loopserve.core.plugin_manager import make_plugin_manager
        make_plugin_manager()
        assert len(created) == 1
        print("ok", len(names))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok")


def test_each_call_builds_a_fresh_manager():
    assert make_plugin_manager() is not make_plugin_manager()


def test_builtins_are_registered_through_the_entry_point_group():
    pm = make_plugin_manager()
    by_name = {pm.get_name(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    assert BUILTINS <= set(by_name), by_name
    for name in BUILTINS:
        assert by_name[name].metadata["name"] == "loopserve", name
    # And they are the plugin modules, not something registered by hand.
    assert pm.get_plugin("loop_normal").__name__ == "loopserve.plugins.loop_normal"
    assert pm.get_plugin("policy_fcfs").__name__ == "loopserve.plugins.policy_fcfs"


def test_without_entry_points_no_builtins():
    pm = make_plugin_manager(load_entrypoints=False)
    assert not BUILTINS & {name for name, _ in pm.list_name_plugin()}
    assert pm.hook.loopserve_register_loops() == []


# ------------------------------------------------------------------------- (c) blocking by name


def test_disable_blocks_a_builtin_loop(fake_plugin):
    from loopserve.core import Engine

    with pytest.raises(ValueError) as info:
        Engine(overrides=["worker=fake", "loop=normal", "plugins.disable=[loop_normal,loop_overlap,loop_disagg,loop_pp]"],
               plugins=[("fake_worker", fake_plugin)])
    message = str(info.value)
    assert "'normal' is not installed" in message
    assert "installed loops: none" in message
    assert fake_plugin.last is None  # failed before any worker was built


class _ExtraLoopPlugin:
    """Registers a second loop so that the list of installed loops is not empty."""

    def __init__(self):
        from loopserve.plugins.loop_normal import NormalLoop

        class SpareLoop(NormalLoop):
            name = "spare"

        self.cls = SpareLoop

    @hookimpl
    def loopserve_register_loops(self):
        return {"spare": self.cls}


def test_disabled_loop_error_lists_the_installed_loops(fake_plugin):
    from loopserve.core import Engine

    with pytest.raises(ValueError, match=r"installed loops: spare\b"):
        Engine(overrides=["worker=fake", "loop=normal", "plugins.disable=[loop_normal,loop_overlap,loop_disagg,loop_pp]"],
               plugins=[("fake_worker", fake_plugin), ("spare", _ExtraLoopPlugin())])


def test_disable_blocks_directly_passed_plugins_too(fake_plugin):
    pm = make_plugin_manager(disable=["spare"], plugins=[("spare", _ExtraLoopPlugin())])
    assert pm.get_plugin("spare") is None
    assert pm.is_blocked("spare")


def test_disabling_the_worker_plugin():
    from loopserve.core import Engine

    with pytest.raises(ValueError, match="worker 'model'"):
        Engine(overrides=["worker=model", "loop=normal", "plugins.disable=[worker_model]"])


def test_kv_transfer_backend_plugin_is_picked_by_name(fake_plugin):
    """A third-party KV-transfer backend: built for disaggregation.transfer_backend=its name,
    with the server's role and KV layout; an unknown name fails before anything runs."""
    from loopserve.core import Engine
    from loopserve.core.disagg.zmq_transfer import ZmqManager

    class Backend:
        calls = []

        @hookimpl
        def loopserve_make_kv_manager(self, name, role, config, kv_args):
            if name != "mine":
                return None
            self.calls.append((role, kv_args.page_size, kv_args.buffers))
            return ZmqManager(role, kv_args, 1.0)

    plugins = [("fake_worker", fake_plugin), ("my_backend", Backend())]
    with Engine(overrides=["worker=fake", "disaggregation.mode=decode", "disaggregation.transfer_backend=mine",
                           "kv_cache.page_size=4"], plugins=plugins) as engine:
        assert Backend.calls == [("decode", 4, [])]  # the fake worker has no KV data
        assert engine.loop_name == "disagg_decode"
    with pytest.raises(ValueError, match="KV-transfer backend 'nope'"):
        Engine(overrides=["worker=fake", "disaggregation.mode=prefill", "disaggregation.transfer_backend=nope"],
               plugins=plugins)


def test_two_plugins_registering_the_same_loop_name_is_an_error(fake_plugin):
    from loopserve.core import Engine

    class Dup:
        def __init__(self):
            from loopserve.plugins.loop_normal import NormalLoop

            class OtherNormal(NormalLoop):
                pass

            self.cls = OtherNormal

        @hookimpl
        def loopserve_register_loops(self):
            return {"normal": self.cls}

    with pytest.raises(ValueError, match="two plugins register a loop named 'normal'"):
        Engine(overrides=["worker=fake", "loop=normal"], plugins=[("fake_worker", fake_plugin), ("dup", Dup())])


# ------------------------------------------------------------------------- (d) check_pending


def test_check_pending_catches_a_misspelled_hook():
    class Misspelled:
        @hookimpl
        def loopserve_register_loop(self):  # missing the final "s"
            return {}

    with pytest.raises(pluggy.PluginValidationError, match="loopserve_register_loop"):
        make_plugin_manager(plugins=[("misspelled", Misspelled())])


def test_check_pending_catches_an_unknown_argument():
    class WrongArg:
        @hookimpl
        def loopserve_startup(self, scheduler, engine):  # the spec has no `engine`
            pass

    with pytest.raises(pluggy.PluginValidationError):
        make_plugin_manager(plugins=[("wrongarg", WrongArg())])


# ------------------------------------------------------------------------- hooks without a built-in


class Recorder:
    """Implements every lifecycle / forward hook and records the calls (taking fewer arguments
    than the spec where it does not need them)."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.lock = threading.Lock()

    def _add(self, *item):
        with self.lock:
            self.calls.append(item)

    @hookimpl
    def loopserve_configure(self, config):
        self._add("configure", str(config.worker.name))

    @hookimpl
    def loopserve_startup(self, scheduler, loop):
        self._add("startup", scheduler, loop)

    @hookimpl
    def loopserve_before_forward(self, batch):
        self._add("before", batch)

    @hookimpl
    def loopserve_after_forward(self, batch, result):
        self._add("after", batch, result)

    @hookimpl
    def loopserve_shutdown(self, scheduler):
        self._add("shutdown", scheduler)

    def names(self):
        with self.lock:
            return [c[0] for c in self.calls]


def test_lifecycle_and_forward_hooks_are_called(fake_plugin):
    from loopserve.core import Engine

    rec = Recorder()
    engine = Engine(overrides=["worker=fake", "loop=normal"], plugins=[("fake_worker", fake_plugin), ("rec", rec)])
    try:
        assert rec.names() == ["configure", "startup"]
        assert rec.calls[0][1] == "fake"
        assert rec.calls[1][1] is engine.scheduler and rec.calls[1][2] is engine.loop
        out = engine.generate(input_ids=[[3, 4, 5, 6]], sampling_params=SamplingParams(max_new_tokens=3, temperature=0),
                              timeout=30)[0]
        assert out.token_ids == reference_tokens([3, 4, 5, 6], 3)
    finally:
        engine.shutdown()
    names = rec.names()
    # One prefill and two decodes, each with a before and an after call; then shutdown.
    assert names == ["configure", "startup"] + ["before", "after"] * 3 + ["shutdown"]
    forwards = [c for c in rec.calls if c[0] == "after"]
    assert all(isinstance(c[1], ForwardBatch) and isinstance(c[2], ForwardResult) for c in forwards)
    assert [c[1].forward_mode.value for c in forwards] == ["extend", "decode", "decode"]
    assert [c[2].next_token_ids[0] for c in forwards] == out.token_ids
    assert rec.calls[-1][1] is engine.scheduler


def test_requests_finished_hook_is_called_once_per_step(fake_plugin):
    from loopserve.core import Engine

    class Finished:
        def __init__(self):
            self.calls = []

        @hookimpl
        def loopserve_requests_finished(self, reqs):
            self.calls.append([(r.rid, r.finished_reason.kind.value, r.finish_time is not None) for r in reqs])

    fin = Finished()
    engine = Engine(overrides=["worker=fake", "loop=normal"], plugins=[("fake_worker", fake_plugin), ("fin", fin)])
    try:
        # Two requests ending in the same decode step arrive in one call; a third ends later.
        outs = engine.generate(input_ids=[[3, 4], [5, 6, 7], [8]],
                               sampling_params=[SamplingParams(max_new_tokens=n, temperature=0) for n in (2, 2, 5)],
                               timeout=30)
    finally:
        engine.shutdown()
    assert [o.finish_reason for o in outs] == ["length"] * 3
    assert fin.calls == [
        [(outs[0].rid, "length", True), (outs[1].rid, "length", True)],
        [(outs[2].rid, "length", True)],
    ]
    # Nobody implements it with the metrics observer off (Stepped registers observers as Engine does).
    assert Stepped("loop=normal", "metrics.enabled=false").scheduler._finish_hook is False


def test_forward_hooks_are_skipped_when_nobody_implements_them():
    st = Stepped("loop=normal")
    assert st.scheduler._forward_hooks is False
    st2 = Stepped("loop=normal", plugins=[("rec", Recorder())])
    assert st2.scheduler._forward_hooks is True


def test_configure_hook_can_reject_the_config(fake_plugin):
    from loopserve.core import Engine

    class Picky:
        def __init__(self):
            self.seen = []

        @hookimpl
        def loopserve_configure(self, config):
            self.seen.append(config.scheduler.max_running_requests)
            if config.scheduler.max_running_requests > 8:
                raise ValueError("picky: set scheduler.max_running_requests <= 8")

    picky = Picky()
    with pytest.raises(ValueError, match="picky"):
        Engine(overrides=["worker=fake", "loop=normal", "scheduler.max_running_requests=9"],
               plugins=[("fake_worker", fake_plugin), ("picky", picky)])
    assert picky.seen == [9]
    assert fake_plugin.last is None  # rejected before the worker was built
    with Engine(overrides=["worker=fake", "loop=normal", "scheduler.max_running_requests=8"],
                plugins=[("fake_worker", fake_plugin), ("picky", picky)]) as engine:
        assert engine.scheduler.max_running == 8


class Wrappers:
    """New-style wrappers around iterations and stages, as the tracing plugin implements them."""

    def __init__(self):
        self.iterations: list[bool] = []
        self.stages: list[str] = []

    @hookimpl(wrapper=True)
    def loopserve_run_iteration(self, loop):
        try:
            result = yield
            self.iterations.append(result)
            return result
        finally:
            pass

    @hookimpl(wrapper=True)
    def loopserve_run_stage(self, stage):
        self.stages.append(stage)
        return (yield)


def test_iteration_and_stage_wrappers():
    wrappers = Wrappers()
    st = Stepped("loop=normal", plugins=[("wrappers", wrappers)])
    assert st.step() is False  # idle
    assert wrappers.iterations == [False]
    assert wrappers.stages == ["recv_requests", "process_input_requests", "get_next_batch_to_run",
                               "self_check_during_idle"]
    wrappers.stages.clear()
    (req,) = st.submit([7, 8, 9], max_new_tokens=2)
    assert st.step() is True
    assert wrappers.iterations == [False, True]
    assert wrappers.stages == ["recv_requests", "process_input_requests", "get_next_batch_to_run",
                               "run_batch", "process_batch_result"]
    st.run_until_done([req])
    assert req.output_ids == reference_tokens([7, 8, 9], 2)  # results pass through the wrappers


def test_no_wrappers_means_no_hook_calls():
    st = Stepped("loop=normal")
    assert st.loop._wrap_iteration is False and st.loop._wrap_stage is False


def test_select_loop_hook_is_firstresult():
    class Chooser:
        @hookimpl(tryfirst=True)
        def loopserve_select_loop(self, config, available):
            return "spare" if "spare" in available else None

    st = Stepped("loop=auto", plugins=[("chooser", Chooser()), ("spare", _ExtraLoopPlugin())])
    assert st.loop.name == "spare"
    # Returning None defers to the built-in table.
    st = Stepped("loop=auto", plugins=[("chooser", Chooser())])
    assert st.loop.name == "normal"


# ------------------------------------------------------------------------- (e) a third-party package

THIRD_PARTY_MODULE = '''
"""A third-party loopserve plugin: a counting loop and a shortest-prompt-first policy."""

from loopserve.core import hookimpl
from loopserve.core.loop import EventLoop
from loopserve.core.sched.policy import BatchingPolicy


class CountingLoop(EventLoop):
    """The normal loop's stages, counting its iterations."""

    name = "counting"

    def __init__(self, scheduler, pm, config=None):
        super().__init__(scheduler, pm, config)
        self.count = 0
        self.batches_run = 0

    def iteration(self):
        self.count += 1
        s = self.scheduler
        received = self.stage("recv_requests", s.recv_requests)
        self.stage("process_input_requests", s.process_input_requests, received)
        batch = self.stage("get_next_batch_to_run", s.get_next_batch_to_run)
        if batch is not None:
            result = self.stage("run_batch", s.run_batch, batch)
            self.stage("process_batch_result", s.process_batch_result, batch, result)
            self.batches_run += 1
        else:
            self.stage("self_check_during_idle", s.self_check_during_idle)
        s.last_batch = batch
        return batch is not None or bool(received)


class ShortestFirst(BatchingPolicy):
    name = "shortest"

    def __init__(self, params=None, scheduler=None):
        super().__init__(params, scheduler)
        self.calls = 0

    def order(self, waiting):
        self.calls += 1
        return sorted(waiting, key=lambda r: len(r.input_ids))


@hookimpl
def loopserve_register_loops():
    return {"counting": CountingLoop}


@hookimpl
def loopserve_register_policies():
    return {"shortest": ShortestFirst}


@hookimpl
def loopserve_add_config(config_store):
    config_store.store(group="loop", name="counting", node={"name": "counting"})
    config_store.store(group="policy", name="shortest", node={"name": "shortest"})
'''

EP_NAME = "lsp_thirdparty"


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """Writes an installed-looking distribution (module + dist-info with an entry point in
    group ``loopserve``) into tmp_path and puts it on sys.path; undoes everything after."""
    from hydra.core.config_store import ConfigStore

    (tmp_path / "lsp_thirdparty.py").write_text(THIRD_PARTY_MODULE)
    info = tmp_path / "lsp_thirdparty-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lsp_thirdparty\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[loopserve]\n{EP_NAME} = lsp_thirdparty\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("lsp_thirdparty", None)
    repo = ConfigStore.instance().repo
    repo.get("loop", {}).pop("counting.yaml", None)
    repo.get("policy", {}).pop("shortest.yaml", None)


def test_third_party_distribution_plugs_in_loop_and_policy(third_party, fake_plugin):
    from loopserve.core import Engine

    pm = make_plugin_manager()
    dists = {pm.get_name(p): d.metadata["name"] for p, d in pm.list_plugin_distinfo()}
    assert dists[EP_NAME] == "lsp_thirdparty"
    assert dists["loop_normal"] == "loopserve"

    prompts = [[5] * 9, [6] * 3, [7] * 12, [8] * 1, [9] * 6]
    with Engine(overrides=["worker=fake", "loop=counting", "policy=shortest", "scheduler.max_running_requests=1"],
                plugins=[("fake_worker", fake_plugin)]) as engine:
        import lsp_thirdparty

        assert type(engine.loop) is lsp_thirdparty.CountingLoop
        assert engine.loop_name == "counting"
        assert type(engine.scheduler.policy) is lsp_thirdparty.ShortestFirst
        # One generate call: all requests arrive in the same step, so only the policy orders them.
        outs = engine.generate(input_ids=prompts, sampling_params=SamplingParams(max_new_tokens=3, temperature=0),
                               timeout=30)
        assert [o.token_ids for o in outs] == [reference_tokens(p, 3) for p in prompts]
        # One request at a time, admitted shortest prompt first: the prefills show the order.
        prefills = [b for b in fake_plugin.last.batches if b.forward_mode.value == "extend"]
        assert [b.extend_lens for b in prefills] == [[1], [3], [6], [9], [12]]
        # By finish time (arrival + e2e latency): e2e latency alone also counts the few
        # microseconds between the arrivals of one call's requests.
        finish = sorted(range(len(outs)), key=lambda i: outs[i].metrics.arrival_time + outs[i].metrics.e2e_latency_s)
        assert [len(prompts[i]) for i in finish] == [1, 3, 6, 9, 12]
        assert engine.loop.count >= 5 * 3  # every forward ran in one of its iterations
        assert engine.loop.batches_run == 15
        assert engine.scheduler.policy.calls >= 5


def test_fcfs_keeps_arrival_order_for_contrast(fake_engine, fake_plugin):
    engine = fake_engine("loop=normal", "scheduler.max_running_requests=1")
    prompts = [[5] * 9, [6] * 3, [7] * 12]
    engine.generate(input_ids=prompts, sampling_params=SamplingParams(max_new_tokens=2, temperature=0), timeout=30)
    prefills = [b for b in fake_plugin.last.batches if b.forward_mode.value == "extend"]
    assert [b.extend_lens for b in prefills] == [[9], [3], [12]]


def test_third_party_plugin_can_be_disabled_by_entry_point_name(third_party, fake_plugin):
    from loopserve.core import Engine

    pm = make_plugin_manager(disable=[EP_NAME])
    assert pm.get_plugin(EP_NAME) is None
    with pytest.raises(ValueError, match="counting"):
        Engine(overrides=["worker=fake", "loop=counting", f"plugins.disable=[{EP_NAME}]"],
               plugins=[("fake_worker", fake_plugin)])
    assert "lsp_thirdparty" not in sys.modules  # blocked plugins are not even imported
    # Blocking it leaves the built-ins working.
    with Engine(overrides=["worker=fake", "loop=normal", f"plugins.disable=[{EP_NAME}]"],
                plugins=[("fake_worker", fake_plugin)]) as engine:
        assert engine.loop_name == "normal"


def test_third_party_is_gone_without_its_distribution(fake_plugin):
    from loopserve.core import Engine

    with pytest.raises(ValueError, match="counting"):
        Engine(overrides=["worker=fake", "loop=counting"], plugins=[("fake_worker", fake_plugin)])
