"""AsyncLLM: the LLM API as coroutines over one worker thread, against the blocking LLM
on the same weights."""
import asyncio
import random
import time

import pytest
import torch
from transformers import BertConfig

from pyengine import LLM, AsyncLLM, LoRARequest, PoolingParams
from test_engine import random_texts
from test_lora import write_adapter
from tiny import save_tiny

ATOL = 1e-5  # batches differ between the two: DESIGN's fp32 batch-invariance bar


def _config(num_labels):
    return BertConfig(vocab_size=160, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, num_labels=num_labels)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    clf, ce = tmp_path_factory.mktemp("clf"), tmp_path_factory.mktemp("ce")
    save_tiny(clf, _config(3), seed=3)
    save_tiny(ce, _config(1), seed=4)
    return clf, ce


def close(a, b):
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=ATOL, rtol=0)


def test_calls_match_llm_and_share_batches(paths):
    """Eight concurrent classify calls: each gets LLM's numbers, and while the first batch
    runs the other seven queue up and share the next one."""
    clf, _ = paths
    import random

    texts = [random_texts(4, random.Random(i)) for i in range(8)]
    want = [[o.outputs.probs for o in LLM(str(clf)).classify(t, use_tqdm=False)] for t in texts]

    async def main():
        async with AsyncLLM(str(clf)) as llm:
            core, batches = llm.engine, []
            launch = core.launch_batch

            def spy(prompts, activations, loras=None):
                batches.append(len(prompts))
                deadline = time.monotonic() + 20
                # Hold the first batch until every call has handed its prompts over.
                while len(batches) == 1 and llm._driver.num_waiting() < 32 and time.monotonic() < deadline:
                    time.sleep(0.002)
                return launch(prompts, activations, loras)

            core.launch_batch = spy
            outs = await asyncio.gather(*(llm.classify(t) for t in texts))
            return outs, batches

    outs, batches = asyncio.run(main())
    for got, ref in zip(outs, want):
        close([o.outputs.probs for o in got], ref)
    assert sum(batches) == 32 and len(batches) <= 2, batches
    assert len({o.request_id for got in outs for o in got}) == 32


def test_encode_score_options_and_lora(paths, tmp_path):
    clf, ce = paths
    adapter = write_adapter(ce, tmp_path / "a", ["query", "value"], seed=5)
    lora = LoRARequest("a", 1, str(adapter))
    docs = ["the cat sat", "a dog", "why is it blue"]
    sync = LLM(str(ce), enable_lora=True)
    params = PoolingParams(truncate_prompt_tokens=4, use_activation=False)

    async def main():
        async with AsyncLLM(str(ce), enable_lora=True) as llm:
            return (await llm.score("where is the cat", docs, lora_request=lora),
                    await llm.score("where is the cat", docs, use_activation=False),
                    await llm.encode(docs, pooling_params=params))

    scored, raw, encoded = asyncio.run(main())
    close([o.outputs.score for o in scored],
          [o.outputs.score for o in sync.score("where is the cat", docs, lora_request=lora, use_tqdm=False)])
    close([o.outputs.score for o in raw],
          [o.outputs.score for o in sync.score("where is the cat", docs, use_activation=False, use_tqdm=False)])
    ref = sync.encode(docs, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in encoded] == [o.prompt_token_ids for o in ref]
    assert all(len(o.prompt_token_ids) <= 4 for o in encoded)
    close([o.outputs.data.tolist() for o in encoded], [o.outputs.data.tolist() for o in ref])


def test_bad_calls_fail_alone_and_shutdown(paths):
    clf, ce = paths

    async def main():
        llm = AsyncLLM(str(clf))
        with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
            await llm.classify(["the cat", ""])
        with pytest.raises(ValueError, match="num_labels == 1"):
            await llm.score("a", ["b"])
        with pytest.raises(ValueError, match="LoRA is not enabled"):
            await llm.classify("the cat", lora_request=LoRARequest("a", 1, str(ce)))
        assert not llm.engine.has_unfinished()
        ok = await llm.classify(["the cat", "a dog"])  # the engine carries on
        llm.shutdown()
        with pytest.raises(RuntimeError, match="the engine was shut down"):
            await llm.classify("the cat")
        return ok

    ok = asyncio.run(main())
    close([o.outputs.probs for o in ok],
          [o.outputs.probs for o in LLM(str(clf)).classify(["the cat", "a dog"], use_tqdm=False)])


def test_request_ids_follow_call_order(paths):
    """A call's ids are taken when it is made (f"{call}-{i}", as the engine core's), not
    when it finishes: the long first call keeps 0 though the short second one, in the
    long one's last batch, is handed back first."""
    clf, _ = paths

    async def main():
        async with AsyncLLM(str(clf)) as llm:
            return await asyncio.gather(llm.classify(["the cat sat on the mat"] * 300), llm.classify("a dog"))

    long, short = asyncio.run(main())
    assert [o.request_id for o in long] == [f"0-{i}" for i in range(300)]
    assert [o.request_id for o in short] == ["1-0"]


def test_shutdown_fails_calls_waiting_to_tokenise(paths):
    """A call still queued for the tokenizer thread at shutdown raises the shutdown's
    RuntimeError, as a call already in the core does, not a CancelledError nobody asked for."""
    clf, _ = paths
    import threading

    async def main():
        llm = AsyncLLM(str(clf))
        hold = threading.Event()
        busy = asyncio.ensure_future(llm._driver.preprocess(hold.wait, 20))  # occupies the tokenizer thread
        waiting = asyncio.ensure_future(llm.classify("a dog"))
        await asyncio.sleep(0.1)
        llm.shutdown()
        hold.set()
        await busy
        with pytest.raises(RuntimeError, match="the engine was shut down"):
            await waiting
        assert not waiting.cancelled()

    asyncio.run(main())


def test_a_failed_batch_fails_its_call_and_drops_the_calls_other_sequences(paths):
    """A batch that raises fails the call that owns it; that call's other sequences never
    run (nobody would read them), and the engine serves the next call."""
    clf, _ = paths

    async def main():
        llm = AsyncLLM(str(clf), max_num_seqs=2)
        core = llm.engine
        launch, launched = core.launch_batch, []

        def first_fails(prompts, *args):
            launched.append(len(prompts))
            if len(launched) == 1:
                raise RuntimeError("fault")
            return launch(prompts, *args)

        core.launch_batch = first_fails
        try:
            with pytest.raises(RuntimeError, match="fault"):
                await llm.classify(random_texts(8, random.Random(1)))
            ok = await llm.classify(["the cat", "a dog"])
            return ok, list(launched), core.has_unfinished()
        finally:
            llm.shutdown()

    ok, launched, unfinished = asyncio.run(main())
    assert launched == [2, 2] and not unfinished, launched  # the failed batch, then the next call's
    close([o.outputs.probs for o in ok],
          [o.outputs.probs for o in LLM(str(clf)).classify(["the cat", "a dog"], use_tqdm=False)])
