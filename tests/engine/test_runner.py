"""Runner.build: the ForwardBatch of a mixed prefill/decode step with adapters, checked by hand."""
import torch

from server.engine.kv_cache import BlockPool
from server.engine.request import Request, SamplingParams
from server.engine.runner import Runner
from server.engine.scheduler import SchedulerOutput


class Slots:
    def slot_and_rank(self, name):
        return {"a": (0, 8), "b": (3, 16)}[name]


class Recorder(torch.nn.Module):
    def forward(self, batch):
        self.batch = batch
        return torch.zeros(batch.num_seqs, 11)


def test_build_mixed_step():
    pool = BlockPool(16, 4)
    decode = Request([5, 6, 7, 8, 9], SamplingParams(), adapter="b")
    decode.output_ids = [10, 11]                        # 7 tokens, 6 cached: decodes token 11 at position 6
    decode.block_ids = [9, 2]
    prefill = Request([20, 21, 22, 23, 24, 25], SamplingParams())    # second chunk: positions 4..5
    prefill.block_ids = [4, 7]
    fresh = Request([30, 31], SamplingParams(), adapter="a")
    fresh.block_ids = [12]
    sched = SchedulerOutput(requests=[decode, prefill, fresh], starts=[6, 4, 0], num_new=[1, 2, 2],
                            sampled=[True, True, True])
    model = Recorder()
    logits = Runner(model, pool, Slots(), "cpu").run(sched)
    b = model.batch
    assert logits.shape == (3, 11)
    assert b.input_ids.tolist() == [11, 24, 25, 30, 31]
    assert b.positions.tolist() == [6, 4, 5, 0, 1]
    assert b.slot_mapping.tolist() == [2 * 4 + 2, 7 * 4 + 0, 7 * 4 + 1, 12 * 4 + 0, 12 * 4 + 1]
    assert b.block_tables.tolist() == [[9, 2], [4, 7], [12, -1]]
    assert b.query_start.tolist() == [0, 1, 3, 5] and b.logits_rows.tolist() == [0, 2, 4]
    assert b.context_lens.tolist() == [7, 6, 2] and b.context_lens_cpu == [7, 6, 2]
    assert b.query_lens_cpu == [1, 2, 2] and not b.is_decode_only
    assert b.lora.token_slots.tolist() == [3, -1, -1, 0, 0]
    assert (b.lora.seg_starts, b.lora.seg_ends, b.lora.seg_slots, b.lora.seg_ranks) == ([0, 3], [1, 5], [3, 0], [16, 8])


def test_base_only_batch_has_no_lora():
    pool = BlockPool(4, 4)
    r = Request([1, 2, 3], SamplingParams())
    r.block_ids = [3]
    model = Recorder()
    Runner(model, pool, Slots(), "cpu").run(SchedulerOutput([r], [0], [3], [True]))
    assert model.batch.lora is None and model.batch.slot_mapping.tolist() == [12, 13, 14]
