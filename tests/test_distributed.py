"""DistributedDataParallel on CPU (gloo): two processes against one, sharded evaluation, bad launches."""

import json
import math
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from audioclf.config import AugmentConfig, TrainConfig
from audioclf.distributed import DistInfo, ShardSampler, env_info, init_distributed
from audioclf.errors import ConfigError
from audioclf.runtime import make_runtime, seed_epoch

sys.path.insert(0, str(Path(__file__).parent))
from test_train import LABELS, Tones, config  # noqa: E402

# No MixUp, SpecAugment or dropout: they are drawn per rank by design, and would hide
# what the comparison with one process is about.
DDP_CFG = config(AugmentConfig(freq_masks=0, time_masks=0, mixup_alpha=0.0), epochs=6, batch_size=8,
                 lr=1e-2, swa_start=4, plateau_patience=6).replace(model={"drop_rate": 0.0})
TRAIN, VAL = (6, 1), (10, 2)  # Tones(per_class, seed): 18 training and 30 validation clips


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("n", [0, 1, 5, 7, 12])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_every_clip_exactly_once(n, world):
    seen = [i for rank in range(world) for i in ShardSampler(n, rank, world)]
    assert sorted(seen) == list(range(n))
    assert sum(len(ShardSampler(n, rank, world)) for rank in range(world)) == n


def test_environment_is_checked(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="RANK=2 and WORLD_SIZE=2"):
        env_info()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ConfigError, match="RANK must be an integer \\('one' given\\)"):
        env_info()


def test_missing_rendezvous_is_a_clear_error_not_a_hang(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR and MASTER_PORT is not set; launch with torchrun"):
        init_distributed(torch.device("cpu"))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # nobody listens there
    with pytest.raises(ConfigError, match=r"rank 1: could not meet the other 1 process\(es\) at "
                                          r"127.0.0.1:\d+ within 2 s"):
        init_distributed(torch.device("cpu"), timeout_s=2)
    assert not torch.distributed.is_initialized()


def test_each_rank_draws_its_own_random_streams(tmp_path, monkeypatch):
    """fit() gives MixUp and every augmentation of the model (speed, time and frequency shift,
    SpecAugment) a stream of its own, re-seeded with dropout's per (seed, rank, epoch): the
    same triple replays the same draws, another rank or epoch gets other draws."""
    import audioclf.train as train
    from audioclf.model import build_model

    runs = []
    real_epoch = train._run_epoch
    monkeypatch.setattr(train, "_run_epoch", lambda run, epoch: runs.append(run) or real_epoch(run, epoch))
    cfg = config(AugmentConfig(time_shift=0.1, freq_shift=2, speed_perturb=0.1, freq_mask_width=4), epochs=1)
    model = build_model(cfg, len(LABELS))
    train.fit(model, Tones(2, 1), Tones(1, 2), cfg, tmp_path, label_names=LABELS)
    run = runs[0]
    streams = [run.mixup.generator] + [m.generator for m in model.augmentations()]
    assert all(isinstance(g, torch.Generator) for g in streams)
    assert sorted(map(id, streams)) == sorted(map(id, run.generators))  # one each, every one re-seeded

    def draws(seed, rank, epoch):
        seed_epoch(seed, rank, epoch, run.generators)
        return [torch.rand(4, generator=g) for g in streams] + [torch.rand(4)]  # + dropout's

    first = draws(0, 0, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, draws(0, 0, 1)))
    for other in (draws(0, 1, 1), draws(0, 0, 2), draws(1, 0, 1)):
        assert not any(torch.equal(a, b) for a, b in zip(first, other))
    assert len({tuple(d.tolist()) for d in first}) == len(first)  # and the streams differ from each other


BN_CLIPS = torch.randn(8, 3, generator=torch.Generator().manual_seed(5))  # 8 "clips" of 3 features


def bn_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5))


def bn_update(batches, info):
    """The SWA BatchNorm update of :func:`bn_net` over ``batches`` (a list of (B, 3) tensors)."""
    from audioclf.train import update_bn_stats

    net = bn_net()
    rt = make_runtime(TrainConfig(device="cpu", batch_size=8), torch.device("cpu"), info)
    update_bn_stats(net, [(x, None) for x in batches], rt)
    return net[1].running_mean.tolist(), net[1].running_var.tolist()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, report_dir: str) -> None:
    """One torchrun-like process: the same environment variables torchrun sets."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), AUDIOCLF_DIST_TIMEOUT="60")
    torch.set_num_threads(1)
    from audioclf.checkpoint import save_checkpoint
    from audioclf.distributed import destroy_distributed
    from audioclf.model import build_model
    from audioclf.train import fit, predict_proba

    report = {}
    try:
        try:
            odd = DDP_CFG.replace(train={"batch_size": 7})
            fit(build_model(odd, 3), Tones(*TRAIN), Tones(*VAL), odd, out, label_names=LABELS)
        except ConfigError as e:
            report["odd_batch"] = str(e)
        model = build_model(DDP_CFG, 3)
        result = fit(model, Tones(*TRAIN), Tones(*VAL), DDP_CFG, out, label_names=LABELS)
        report["history"] = result.history
        report["result"] = [result.best_metric, result.best_epoch, result.swa_metric, result.chosen]
        report["checksum"] = checksum(model)
        report["proba"] = predict_proba(model, Tones(*VAL), batch_size=4).tolist()
        if rank == 0:
            save_checkpoint(model, Path(report_dir, "first"), DDP_CFG, LABELS)
        longer = DDP_CFG.replace(train={"epochs": 7})
        model = build_model(longer, 3)
        resumed = fit(model, Tones(*TRAIN), Tones(*VAL), longer, out, label_names=LABELS, resume=True)
        report["resumed_history"] = resumed.history
        report["resumed_checksum"] = checksum(model)
        # one epoch with MixUp, SpecAugment and dropout on: MixUp reaches the model through DDP
        augmented = config(epochs=1, batch_size=8, swa_start=None)
        model = build_model(augmented, 3)
        result = fit(model, Tones(*TRAIN), Tones(*VAL), augmented, Path(out).parent / "augmented",
                     label_names=LABELS)
        report["augmented"] = {"history": result.history, "checksum": checksum(model)}
        from audioclf.distributed import current_info
        report["bn_update"] = bn_update([BN_CLIPS[4 * rank:4 * rank + 4]], current_info())  # 4 clips each
    finally:
        destroy_distributed()
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps(report))


def checksum(model) -> float:
    return sum(float(v.double().sum()) for v in model.state_dict().values())


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    import torch.multiprocessing as mp

    base = tmp_path_factory.mktemp("ddp")
    out, reports = base / "run", base / "reports"
    reports.mkdir()
    mp.spawn(_worker, args=(2, free_port(), str(out), str(reports)), nprocs=2, join=True)
    return out, [json.loads((reports / f"rank{r}.json").read_text()) for r in range(2)], reports


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    from audioclf.model import build_model
    from audioclf.train import fit, predict_proba

    out = tmp_path_factory.mktemp("single")
    model = build_model(DDP_CFG, 3)
    result = fit(model, Tones(*TRAIN), Tones(*VAL), DDP_CFG, out, label_names=LABELS)
    return result, predict_proba(model, Tones(*VAL), batch_size=4)


def without_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_ranks_take_identical_decisions_and_hold_identical_models(two_processes):
    _, (r0, r1), _ = two_processes
    for key in ("history", "resumed_history"):
        assert without_seconds(r0[key]) == without_seconds(r1[key]), key
    for key in ("result", "checksum", "proba", "resumed_checksum"):
        assert r0[key] == r1[key], key
    assert len(r0["resumed_history"]) == 7 and r0["resumed_history"][:6] == r0["history"]


def test_an_epoch_with_mixup_specaugment_and_dropout_under_ddp(two_processes):
    """Each rank draws its own augmentations; the averaged gradients keep the models identical."""
    _, (r0, r1), _ = two_processes
    a0, a1 = r0["augmented"], r1["augmented"]
    assert without_seconds(a0["history"]) == without_seconds(a1["history"]) and len(a0["history"]) == 1
    assert math.isfinite(a0["history"][0]["train_loss"]) and a0["checksum"] == a1["checksum"]


def test_swa_batchnorm_update_over_ranks_matches_one_process(two_processes):
    """2 ranks x 4 clips: the running means of one process over all 8 clips (up to rounding),
    and exactly what one process computes from the same two batches of 4."""
    _, (r0, r1), _ = two_processes
    assert r0["bn_update"] == r1["bn_update"]
    means, variances = r0["bn_update"]
    one_batch, _ = bn_update([BN_CLIPS], DistInfo())
    np.testing.assert_allclose(means, one_batch, rtol=1e-6, atol=1e-7)
    two_batches = bn_update([BN_CLIPS[:4], BN_CLIPS[4:]], DistInfo())
    np.testing.assert_allclose([means, variances], two_batches, rtol=1e-6, atol=1e-7)


def test_one_set_of_output_files(two_processes):
    out, _, _ = two_processes
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "model.json", "model.safetensors",
                                                     "state.safetensors"]
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 7  # header + 7 epochs, once


def test_two_processes_match_one_with_the_same_global_batch(two_processes, one_process):
    """Same seed, same global batch of 8: both runs see the same clips in every step
    (rank r takes every second clip of the same permutation) and apply the same averaged
    gradient. They differ only where BatchNorm normalizes each rank's 4 clips instead of
    all 8 (and in summation order), which perturbs the weights slightly and the running
    statistics more; early epochs, scored with lagging running statistics, can differ by
    several clips. By the end both have learned the task: the best and the SWA accuracy
    (the latter with statistics recomputed on the whole training set) agree within 2 of
    the 30 validation clips, and both are far above chance (1/3)."""
    _, (r0, _), _ = two_processes
    single, _ = one_process
    best, _, swa, _ = r0["result"]
    assert abs(best - single.best_metric) <= 2 / 30 + 1e-9
    assert abs(swa - single.swa_metric) <= 2 / 30 + 1e-9
    assert min(best, single.best_metric, swa, single.swa_metric) >= 0.8


def test_sharded_prediction_keeps_dataset_order(two_processes):
    """predict_proba under DDP (each rank scores every second clip, then gathers) equals the
    same model scored by one process: no clip lost, repeated or out of place."""
    from audioclf.checkpoint import load_checkpoint
    from audioclf.train import predict_proba

    _, (r0, _), reports = two_processes
    model, _ = load_checkpoint(reports / "first")
    alone = predict_proba(model, Tones(*VAL), batch_size=4)
    np.testing.assert_allclose(np.array(r0["proba"]), alone, rtol=1e-5, atol=1e-6)


def test_batch_size_not_divisible_by_the_world_is_refused(two_processes):
    _, (r0, r1), _ = two_processes
    assert r0["odd_batch"] == r1["odd_batch"]
    assert "batch_size 7 (global) is not divisible by the 2 processes; use a multiple of 2" in r0["odd_batch"]
