"""`t3s.dist` and the passes split across ranks, on 2 gloo processes started here.

* `on_main`: rank 0's result on every rank; rank 0's error raised on every rank, the
  copies marked ``from_main``; `gather_objects`, `broadcast_object`, `rank_share`.
* `t3s.profile(split_across_ranks=True)`: each rank profiles its share into its own
  shard; the returned table equals one process's, and every token key is written once.
* `t3s.training_accuracy` under a process group: split and gathered, equal to one
  process's answers in subset order.
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch
from two_ranks import run_two_ranks


def _tiny_lm_and_data(seed: int):
    import transformers
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float().eval()
    g = torch.Generator().manual_seed(seed)
    data = []
    for i in range(13):  # odd: the ranks' shares differ in size
        prompt, resp = int(torch.randint(2, 6, (), generator=g)), int(torch.randint(2, 7, (), generator=g))
        ids = torch.randint(3, 61, (prompt + resp,), generator=g)
        labels = ids.clone()
        labels[:prompt] = -100
        data.append({"example_id": 100 + i, "input_ids": ids, "labels": labels,
                     "prompt_length": prompt, "answer": str(i % 3)})
    return model, data


class _DigitTokenizer:
    """decode: token ids -> digits (id mod 10), enough for a verifier to score."""
    pad_token_id = 0
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return "".join(str(i % 10) for i in ids if i > 2)


def _worker(rank, port, seed, store, errors):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                          RANK=str(rank))
        import torch.distributed as dist_
        dist_.init_process_group("gloo", rank=rank, world_size=2)
        from t3s import dist, profile, training_accuracy
        from t3s.pipeline.settings import UsageError
        assert dist.world_size() == 2 and dist.rank() == rank
        assert dist.broadcast_object(("x", rank)) == ("x", 0)
        assert dist.gather_objects(rank * 10) == [0, 10]
        assert list(dist.rank_share(5)) == ([0, 2, 4] if rank == 0 else [1, 3])
        assert dist.on_main(lambda: dist.rank() + 41) == 41
        try:
            dist.on_main(lambda: (_ for _ in ()).throw(UsageError("bad setting")))
        except UsageError as exc:
            assert "bad setting" in str(exc)
            assert getattr(exc, "from_main", False) == (rank != 0)
        else:
            raise AssertionError("on_main swallowed rank 0's error")

        model, data = _tiny_lm_and_data(seed)
        # the exact profiling pass: split across ranks == one process, each key once
        alone = profile(model, data, batch_size=3, progress=False, backend="torch")
        split = profile(model, data, batch_size=3, progress=False, backend="torch",
                        store_dir=store, dataset_fingerprint="fp", split_across_ranks=True)
        assert split.num_rows == alone.num_rows
        for col in ("example_id", "position"):
            assert split[col].to_pylist() == alone[col].to_pylist()
        torch.testing.assert_close(torch.tensor(split["logprob"].to_numpy()),
                                   torch.tensor(alone["logprob"].to_numpy()), rtol=1e-5, atol=1e-5)
        in_memory = profile(model, data, batch_size=3, progress=False, backend="torch",
                            split_across_ranks=True)
        assert in_memory["example_id"].to_pylist() == alone["example_id"].to_pylist()
        # generation split and gathered == one process, in subset order
        tok = _DigitTokenizer()
        kw = dict(verifier=lambda pred, gold: pred[-1:] == gold, subset_size=11,
                  max_new_tokens=3, batch_size=2, seed=seed, progress=False,
                  return_details=True)
        acc, details = training_accuracy(model, tok, data, **kw)
        acc1, details1 = training_accuracy(model, tok, data, split_across_ranks=False, **kw)
        assert details == details1 and acc == acc1 and len(details) == 11
        dist.barrier()
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    os._exit(0)  # gloo's threads can abort a normal interpreter exit


def test_split_passes_on_two_ranks(tmp_path):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    store = str(tmp_path / "profile")
    run_two_ranks(_worker, seed, store, what=f"seed {seed}")
    # every key of the store in exactly one rank's shard
    import pyarrow.ipc as ipc
    from t3s.trajectory.shards import shard_path
    keys = []
    for rank in (0, 1):
        with ipc.open_stream(shard_path(store, rank)) as r:
            t = r.read_all()
        keys.append(set(zip(t["example_id"].to_pylist(), t["position"].to_pylist())))
        assert len(keys[-1]) == t.num_rows
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    assert {e for e, _ in keys[0]} | {e for e, _ in keys[1]} == set(range(100, 113))


def test_one_process_collectives_are_plain_calls():
    from t3s import dist
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert dist.gather_objects(3) == [3] and dist.broadcast_object(4) == 4
    assert dist.on_main(lambda x: x + 1, 1) == 2
    with pytest.raises(KeyError):
        dist.on_main(lambda: {}["missing"])
    assert list(dist.rank_share(3)) == [0, 1, 2]
    dist.barrier()
    dist.shutdown()   # no process group: nothing to leave


def test_is_sharded_tells_which_models_need_every_rank_in_each_forward():
    from t3s import dist
    model, _ = _tiny_lm_and_data(0)
    assert not dist.is_sharded(model)
    # a ZeRO-3 partition carries a ds_id (deepspeed.runtime.zero.partition_parameters)
    next(model.parameters()).ds_id = 0
    assert dist.is_sharded(model)
