"""AsyncEngine: streamed deltas equal the sync result, abort on break/cancel, errors, shutdown."""
import asyncio

import pytest

from server.config import EngineConfig
from server.engine.async_engine import AsyncEngine
from server.engine.engine import Engine
from server.engine.offline import generate
from server.engine.request import FinishReason, Request, SamplingParams
from server.errors import PromptTooLongError

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    eng = Engine(EngineConfig(quantization="none", kv_cache_tokens=2048,
                              adapters_dir=str(tmp_path_factory.mktemp("adapters"))))
    chat = eng.tokenizer.encode_chat([{"role": "user", "content": "Name three colors."}])
    reference = generate(eng, [chat], GREEDY)[0]       # before the loop thread owns the engine
    ae = AsyncEngine(eng)
    yield eng, ae, chat, reference
    ae.shutdown()


async def collect(ae, req):
    return [out async for out in ae.generate(req)]


def test_stream_equals_sync_and_concurrent_streams(engines):
    eng, ae, chat, ref = engines

    async def main():
        return await asyncio.gather(*(collect(ae, Request(list(chat), GREEDY)) for _ in range(3)))

    for outs in asyncio.run(main()):
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert "".join(o.new_text for o in outs) == ref.text
        assert [t for o in outs for t in o.new_token_ids] == ref.token_ids
        assert outs[-1].finish_reason == ref.finish_reason and outs[-1].completion_tokens == len(ref.token_ids)
        assert len(outs) == len(ref.token_ids)                  # one delta per token


def test_break_and_cancel_abort_the_request(engines):
    eng, ae, chat, _ = engines

    async def main():
        n = 0
        async for _ in ae.generate(Request(list(chat), LONG)):
            n += 1
            if n == 2:
                break                                           # the generator is closed: abort
        task = asyncio.create_task(collect(ae, Request(list(chat), LONG)))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if await ae.run_on_loop(lambda: not eng.has_unfinished()):
                break
            await asyncio.sleep(0.01)
        return await ae.run_on_loop(lambda: (eng.has_unfinished(), eng.pool.num_used))

    assert asyncio.run(main()) == (False, 0)


def test_add_errors_raise_in_the_caller_and_run_on_loop_returns(engines):
    eng, ae, _, _ = engines

    async def main():
        with pytest.raises(PromptTooLongError):
            await collect(ae, Request(list(range(10, 3000)), GREEDY))
        with pytest.raises(ZeroDivisionError):
            await ae.run_on_loop(lambda: 1 / 0)
        return await ae.run_on_loop(eng.snapshot)

    snap = asyncio.run(main())
    assert snap.running == 0 and snap.kv_blocks_used == 0 and ae.is_alive


def test_explicit_abort_and_shutdown_end_streams(tmp_path):
    eng = Engine(EngineConfig(quantization="none", kv_cache_tokens=1024, adapters_dir=str(tmp_path)))
    ae = AsyncEngine(eng)
    ids = eng.tokenizer.encode("Once upon a time")

    async def main():
        a, b = Request(list(ids), LONG), Request(list(ids), LONG)
        ta = asyncio.create_task(collect(ae, a))
        tb = asyncio.create_task(collect(ae, b))
        await asyncio.sleep(0.3)
        ae.abort(a.request_id)
        outs_a = await ta
        await asyncio.to_thread(ae.shutdown)
        return outs_a, await tb

    outs_a, outs_b = asyncio.run(main())
    assert outs_a[-1].finished and outs_a[-1].finish_reason == FinishReason.ABORT
    assert outs_b[-1].finish_reason == FinishReason.ABORT and not ae.is_alive
    assert eng.pool.num_used == 0


def test_a_failing_step_ends_live_requests_and_the_loop_goes_on(engines):
    eng, ae, chat, ref = engines
    real_run = eng.runner.run

    def broken(sched):
        eng.runner.run = real_run            # fail once
        raise RuntimeError("boom")

    async def main():
        await ae.run_on_loop(lambda: setattr(eng.runner, "run", broken))
        failed = await collect(ae, Request(list(chat), GREEDY))
        again = await collect(ae, Request(list(chat), GREEDY))
        return failed, again, await ae.run_on_loop(lambda: eng.pool.num_used)

    failed, again, used = asyncio.run(main())
    assert failed[-1].finished and failed[-1].finish_reason == FinishReason.ABORT and "boom" in failed[-1].error
    assert "".join(o.new_text for o in again) == ref.text and used == 0 and ae.is_alive
