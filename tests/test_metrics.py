"""Prometheus metrics: ``Engine.metrics()`` parses with prometheus_client's own parser, counters
and histograms move with traffic, gauges are read at scrape time, each engine has its own
registry, and nothing is wrapped unless ``metrics.stage_times`` asks for it."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loopserve.core import Req, SamplingParams
from loopserve.core.loop import available_loops
from loopserve.core.plugin_manager import has_wrappers, make_plugin_manager
from loopserve.plugins.metrics import MetricsPlugin

from fake_worker import wait_until

TIMEOUT = 30.0
# Loops that serve requests on their own; the disaggregated roles need a paired server and are
# covered (tracing included) by tests/test_disagg.py.
INSTALLED_LOOPS = sorted(name for name, cls in available_loops(make_plugin_manager()).items()
                         if getattr(cls.scheduler_cls, "role", None) is None)


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples, name, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.mark.parametrize("loop_name", INSTALLED_LOOPS)
def test_metrics_text_parses_and_counters_move_with_traffic(fake_engine, loop_name):
    engine = fake_engine(f"loop={loop_name}")
    before = parse(engine.metrics())
    prompts = [[3, 4, 5], [6, 7, 8, 9], [10, 11]]
    outs = engine.generate(input_ids=prompts, sampling_params=SamplingParams(max_new_tokens=5, temperature=0.0),
                           timeout=TIMEOUT)
    assert all(o.finish_reason == "length" for o in outs)
    after = parse(engine.metrics())

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("loopserve_generation_tokens_total") == 15
    assert delta("loopserve_prompt_tokens_total") == 9
    assert delta("loopserve_requests_finished_total", finish_reason="length") == 3
    assert delta("loopserve_requests_finished_total", finish_reason="abort") == 0
    assert delta("loopserve_forward_passes_total") == engine.get_stats()["forwards"]
    for hist in ("loopserve_time_to_first_token_seconds", "loopserve_e2e_request_latency_seconds",
                 "loopserve_queue_time_seconds", "loopserve_inter_token_latency_seconds"):
        assert delta(f"{hist}_count") == 3, hist
        assert value(after, f"{hist}_bucket", le="+Inf") == 3
        assert value(after, f"{hist}_sum") > 0
    # TTFT <= e2e for the same requests.
    assert value(after, "loopserve_time_to_first_token_seconds_sum") <= value(
        after, "loopserve_e2e_request_latency_seconds_sum")
    assert value(after, "loopserve_num_running_requests") == 0
    assert value(after, "loopserve_num_queued_requests") == 0
    assert 0.0 <= value(after, "loopserve_kv_cache_usage_ratio") <= 1.0
    assert 0.0 <= value(after, "loopserve_busy_fraction") <= 1.0
    assert value(after, "loopserve_engine_info", loop=loop_name, policy="fcfs", worker="fake") == 1
    stats = engine.get_stats()
    assert value(after, "loopserve_generation_tokens_total") == stats["generated_tokens"]
    assert value(after, "loopserve_cache_hit_rate") == pytest.approx(stats["cache_hit_rate"])
    # More traffic moves them again (counters are cumulative, not per scrape).
    engine.generate(input_ids=[[20, 21]], sampling_params=SamplingParams(max_new_tokens=3, temperature=0.0),
                    timeout=TIMEOUT)
    again = parse(engine.metrics())
    assert value(again, "loopserve_generation_tokens_total") - value(after, "loopserve_generation_tokens_total") == 3
    assert value(again, "loopserve_prompt_tokens_total") - value(after, "loopserve_prompt_tokens_total") == 2
    assert value(again, "loopserve_e2e_request_latency_seconds_count") == value(
        before, "loopserve_e2e_request_latency_seconds_count") + 4


def test_cache_hit_rate_follows_the_prefix_cache(fake_engine):
    engine = fake_engine("loop=normal")
    prompt = list(range(2, 40))
    sp = SamplingParams(max_new_tokens=2, temperature=0.0)
    engine.generate(input_ids=[prompt], sampling_params=sp, timeout=TIMEOUT)
    first = parse(engine.metrics())
    engine.generate(input_ids=[prompt + [50]], sampling_params=sp, timeout=TIMEOUT)
    second = parse(engine.metrics())
    cached = value(second, "loopserve_prompt_tokens_cached_total")
    prompt_tokens = value(second, "loopserve_prompt_tokens_total")
    assert value(first, "loopserve_prompt_tokens_cached_total") == 0
    assert cached > 0  # the second request reused the first one's prompt
    assert value(second, "loopserve_cache_hit_rate") == pytest.approx(cached / prompt_tokens)
    assert value(second, "loopserve_prefill_tokens_total") == prompt_tokens - cached


def test_gauges_are_read_at_scrape_time(fake_engine):
    engine = fake_engine("loop=normal", "scheduler.max_running_requests=1", "+worker.params.delay_s=0.02")
    handles = [engine.submit(input_ids=[3 + i, 4, 5], sampling_params=SamplingParams(max_new_tokens=20))
               for i in range(3)]

    def busy():
        s = parse(engine.metrics())
        return value(s, "loopserve_num_running_requests") == 1 and value(s, "loopserve_num_queued_requests") >= 1

    wait_until(busy, TIMEOUT, what="one running and some queued requests in the metrics")
    assert value(parse(engine.metrics()), "loopserve_kv_cache_usage_ratio") > 0
    for h in handles:
        h.result(TIMEOUT)
    s = parse(engine.metrics())
    assert value(s, "loopserve_num_running_requests") == 0 and value(s, "loopserve_num_queued_requests") == 0
    assert value(s, "loopserve_busy_fraction") > 0.1  # the worker slept 20 ms per forward
    assert value(s, "loopserve_forward_time_seconds_total") >= 0.02 * 60 * 0.9


def test_aborted_requests_are_counted_by_reason(fake_engine):
    engine = fake_engine("loop=normal", "+worker.params.delay_s=0.01")
    handle = engine.submit(input_ids=[3, 4, 5], sampling_params=SamplingParams(max_new_tokens=500))
    wait_until(lambda: handle.req.output_ids, TIMEOUT, what="the first token")
    engine.abort(handle.rid)
    assert handle.result(TIMEOUT).finish_reason == "abort"
    s = parse(engine.metrics())
    assert value(s, "loopserve_requests_finished_total", finish_reason="abort") == 1
    assert value(s, "loopserve_requests_finished_total", finish_reason="length") == 0


def test_inter_token_latency_is_the_mean_gap_after_the_first_token():
    from prometheus_client import CollectorRegistry

    plugin = MetricsPlugin(CollectorRegistry())
    req = Req(rid="r", input_ids=[1, 2], sampling_params=SamplingParams(max_new_tokens=5))
    req.arrival_time, req.schedule_time, req.first_token_time, req.finish_time = 10.0, 10.5, 11.0, 13.0
    req.output_ids = [5, 6, 7, 8, 9]
    one = Req(rid="s", input_ids=[1], sampling_params=SamplingParams(max_new_tokens=1))
    one.arrival_time, one.schedule_time, one.first_token_time, one.finish_time = 0.0, 0.0, 0.25, 0.25
    one.output_ids = [4]
    plugin.loopserve_requests_finished(scheduler=None, reqs=[req, one])
    s = parse(__import__("prometheus_client").generate_latest(plugin.registry).decode())
    assert value(s, "loopserve_inter_token_latency_seconds_count") == 1  # one output token: no gap
    assert value(s, "loopserve_inter_token_latency_seconds_sum") == pytest.approx(0.5)  # (13 - 11) / 4
    assert value(s, "loopserve_time_to_first_token_seconds_sum") == pytest.approx(1.25)
    assert value(s, "loopserve_queue_time_seconds_sum") == pytest.approx(0.5)
    assert value(s, "loopserve_e2e_request_latency_seconds_sum") == pytest.approx(3.25)


def test_each_engine_has_its_own_registry_and_the_global_one_is_untouched(fake_engine):
    from prometheus_client import REGISTRY, generate_latest

    a = fake_engine("loop=normal")
    b = fake_engine("loop=normal")
    assert a.telemetry.metrics_registry is not b.telemetry.metrics_registry
    a.generate(input_ids=[[3, 4]], sampling_params=SamplingParams(max_new_tokens=4), timeout=TIMEOUT)
    assert value(parse(a.metrics()), "loopserve_generation_tokens_total") == 4
    assert value(parse(b.metrics()), "loopserve_generation_tokens_total") == 0
    assert "loopserve_" not in generate_latest(REGISTRY).decode()


@pytest.mark.parametrize("loop_name", INSTALLED_LOOPS)
def test_stage_times_are_off_by_default_and_wrap_stages_when_on(fake_engine, loop_name):
    plain = fake_engine(f"loop={loop_name}")
    assert not has_wrappers(plain.pm.hook.loopserve_run_stage)
    assert "loopserve_stage_duration_seconds" not in plain.metrics()

    engine = fake_engine(f"loop={loop_name}", "metrics.stage_times=true")
    assert has_wrappers(engine.pm.hook.loopserve_run_stage) and engine.loop._wrap_stage
    engine.generate(input_ids=[[3, 4, 5]], sampling_params=SamplingParams(max_new_tokens=3), timeout=TIMEOUT)
    s = parse(engine.metrics())
    for stage in ("recv_requests", "process_input_requests", "get_next_batch_to_run", "run_batch",
                  "process_batch_result"):
        assert value(s, "loopserve_stage_duration_seconds_count", stage=stage) >= 3, stage
    assert value(s, "loopserve_iteration_duration_seconds_count") >= 3


def test_metrics_off_registers_nothing(fake_engine):
    engine = fake_engine("loop=normal", "metrics.enabled=false")
    assert engine.telemetry.metrics_registry is None
    assert engine.pm.get_plugin("metrics.collector") is None
    assert engine.metrics() == ""


def test_metrics_with_the_real_tiny_model():
    """Once with the default worker (the embedded tiny model): forward time is the model's."""
    from loopserve.core import Engine

    with Engine(overrides=["loop=normal"]) as engine:
        engine.generate(["Hello"], SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True),
                        timeout=120)
        s = parse(engine.metrics())
    assert value(s, "loopserve_generation_tokens_total") == 4
    assert value(s, "loopserve_forward_time_seconds_total") > 0
    assert value(s, "loopserve_engine_info", loop="normal", policy="fcfs", worker="model") == 1
