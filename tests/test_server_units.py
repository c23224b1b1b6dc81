"""Server pieces that need no running server: the text of a streamed output, the request -> sampling
mapping, the chat template, logprob extraction in the sampler."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from loopserve.core.server.errors import APIError


@pytest.fixture(scope="module")
def tokenizer():
    from loopserve.core.model.tiny import ensure_tiny_model
    from loopserve.core.model.tokenizer import Tokenizer

    return Tokenizer(ensure_tiny_model())


def test_output_text_holds_back_split_utf8_and_stop_prefixes(tokenizer):
    from loopserve.core.server.output_text import OutputText

    text = "héllo wörld ✓ done"
    ids = tokenizer.encode(text, add_special_tokens=False)  # one id per byte
    out = OutputText(tokenizer, [], stops=["done"])
    # The scheduler finishes the request with the token that completes the stop string.
    deltas = [out.add([t]) for t in ids[:-1]]
    assert all("\ufffd" not in d for d in deltas)
    shown = "".join(deltas)
    assert not shown.endswith("d") and text.startswith(shown)
    out.add(ids[-1:], emit=False)
    assert shown + out.finish("done") == "héllo wörld ✓ " == out.text
    # No stop: everything comes out, and the final text equals a one-shot decode.
    out = OutputText(tokenizer, [])
    assert "".join(out.add([t]) for t in ids) + out.finish() == tokenizer.decode(ids)


def test_sampling_mapping_types_and_field_names():
    from loopserve.core.server.params import openai_sampling, sglang_sampling

    sp = openai_sampling({"temperature": 0, "top_k": 40.0, "seed": 3, "stop": "x", "max_tokens": 5},
                         max_tokens=5, max_tokens_name="max_tokens")
    assert (sp.top_k, sp.seed, sp.stop, sp.max_new_tokens) == (40, 3, ["x"], 5)
    for body, field in [({"top_k": True}, "top_k"), ({"temperature": float("nan")}, "temperature"),
                        ({"seed": "1"}, "seed"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
                        ({"ignore_eos": 1}, "ignore_eos")]:
        with pytest.raises(APIError) as e:
            openai_sampling(body, max_tokens=None, max_tokens_name="max_tokens")
        assert e.value.status == 400 and e.value.param == field
    with pytest.raises(APIError) as e:
        openai_sampling({}, max_tokens=0, max_tokens_name="max_completion_tokens")
    assert e.value.param == "max_completion_tokens" and "max_completion_tokens" in e.value.message
    assert sglang_sampling({"max_new_tokens": 3, "sampling_seed": 9}).seed == 9
    with pytest.raises(APIError) as e:
        sglang_sampling({"top_p": 2})
    assert e.value.param == "sampling_params.top_p"


def test_logprobs_refused_when_the_worker_has_none():
    from loopserve.core.server.openai_api import logprobs_wanted

    fe = SimpleNamespace(info=SimpleNamespace(supports_logprobs=False))
    with pytest.raises(APIError) as e:
        logprobs_wanted(fe, 1, "logprobs")
    assert e.value.status == 400 and e.value.message == "logprobs not supported by this worker"
    assert logprobs_wanted(fe, None, "logprobs") is None


def test_chat_template_default_and_checkpoint(tmp_path):
    import json

    from loopserve.core.server.chat_template import DEFAULT_CHAT_TEMPLATE, load_chat_template, render_chat

    template, specials = load_chat_template(None)
    assert template == DEFAULT_CHAT_TEMPLATE
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert render_chat(template, msgs, specials) == "<|user|>\nab\n<|assistant|>\n"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
                                             "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"}))
    template, specials = load_chat_template(str(tmp_path))
    assert render_chat(template, [{"role": "user", "content": "hi"}], specials) == "<s>[hi]"
    with pytest.raises(APIError) as e:
        render_chat(template, [{"role": "system", "content": "hi"}], specials)
    assert "user first" in e.value.message and e.value.status == 400


def test_token_logprobs_match_log_softmax():
    import torch

    from loopserve.core.model.sampler import token_logprobs

    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, 0.5, 4.0, 1.0]])
    lp = torch.log_softmax(logits, -1)
    chosen, top = token_logprobs(lp, torch.tensor([2, 2]), [2, 0])
    assert chosen == pytest.approx([lp[0, 2].item(), lp[1, 2].item()])
    assert [t for t, _ in top[0]] == [1, 2] and top[1] == []
    assert math.isclose(top[0][0][1], lp[0, 1].item(), rel_tol=1e-6)


def test_model_worker_returns_logprobs_only_when_asked():
    from loopserve.core import Engine, SamplingParams

    with Engine() as engine:
        worker = engine.worker
        assert worker.supports_logprobs
        seen = []
        orig = worker.forward_batch

        def spy(fb):
            res = orig(fb)
            seen.append(res)
            return res

        worker.forward_batch = spy
        engine.generate(input_ids=[[1, 2, 3]], sampling_params=SamplingParams(max_new_tokens=2, temperature=0))
        assert all(r.logprobs is None for r in seen)
        seen.clear()
        out = engine.generate(input_ids=[[1, 2, 3], [1, 5]], sampling_params=[
            SamplingParams(max_new_tokens=2, temperature=0, logprobs=2), SamplingParams(max_new_tokens=2)])
        assert out[0].token_ids
        first = seen[0]
        assert first.logprobs[0] is not None and first.logprobs[1] is None
        assert len(first.top_logprobs[0]) == 2 and first.top_logprobs[0][0][0] == first.next_token_ids[0]
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=True)


def test_scheduler_process_sends_one_message_per_loop_step():
    """Outputs leave the scheduler process batched: each loop iteration sends one StepOutputs
    with the new tokens of every request that advanced, never one message per token."""
    import zmq

    from fake_worker import Stepped
    from loopserve.core import Req, SamplingParams
    from loopserve.core.server import protocol as P
    from loopserve.core.server.scheduler_process import LogprobCollector, SchedulerService

    collector = LogprobCollector()
    st = Stepped("loop=normal", plugins=[("server.logprobs", collector)])
    ctx = zmq.Context()
    names = {k: f"inproc://units-{k}" for k in ("requests", "outputs", "control")}
    sinks = {}
    try:
        for k, kind in (("requests", zmq.PUSH), ("control", zmq.DEALER), ("outputs", zmq.PULL)):
            sinks[k] = ctx.socket(kind)
            sinks[k].bind(names[k])
        out = ctx.socket(zmq.PUSH)
        out.connect(names["outputs"])
        service = SchedulerService(st.built, ctx, out, names, parent_pid=0, collector=collector)
        reqs = [Req(rid=f"q{i}", input_ids=[3, 4, 5 + i], sampling_params=SamplingParams(
            max_new_tokens=4, temperature=0.0, ignore_eos=True)) for i in range(3)]
        for r in reqs:
            r.on_update = service._on_update
            service.live[r.rid], service.sent[r.rid] = r, 0
        st.scheduler.submit(*reqs)
        steps = 0
        while not all(r.finished for r in reqs):
            st.step()
            steps += 1
        messages = []
        while sinks["outputs"].poll(1000):
            messages.append(P.from_scheduler_decoder.decode(sinks["outputs"].recv()))
            if sum(o.finish is not None for m in messages for o in m.outputs) == 3:
                break
        assert len(messages) == 4 == steps  # one prefill step and three decode steps
        assert all(sorted(o.rid for o in m.outputs) == ["q0", "q1", "q2"] for m in messages)
        assert all(len(o.new_ids) == 1 for m in messages for o in m.outputs)
        for r in reqs:
            assert [t for m in messages for o in m.outputs if o.rid == r.rid for t in o.new_ids] == r.output_ids
        assert [o.finish for o in messages[-1].outputs] == ["length"] * 3 and not service.live
        service.requests.close(0)
        service.control.close(0)
        out.close(0)
    finally:
        for s in sinks.values():
            s.close(0)
        ctx.term()
        st.built.close()


def test_prompt_logprobs_are_validated_like_logprobs():
    from loopserve.core.sched.sampling_params import SamplingParams

    assert SamplingParams(prompt_logprobs=3.0).prompt_logprobs == 3
    for bad in (-1, 21, "2", 1.5):
        with pytest.raises(ValueError, match="prompt_logprobs must be None or an integer"):
            SamplingParams(prompt_logprobs=bad)
