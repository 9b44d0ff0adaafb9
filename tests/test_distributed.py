"""DistributedDataParallel on CPU (gloo): two processes against one, sharded evaluation, bad launches."""

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from audioclf.config import AugmentConfig
from audioclf.distributed import ShardSampler, env_info, init_distributed
from audioclf.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
from test_train import LABELS, Tones, config  # noqa: E402

# No MixUp, SpecAugment or dropout: they are drawn per rank by design, and would hide
# what the comparison with one process is about.
DDP_CFG = config(AugmentConfig(freq_masks=0, time_masks=0, mixup_alpha=0.0), epochs=6, batch_size=8,
                 lr=1e-2, swa_start=4, plateau_patience=6).replace(model={"drop_rate": 0.0})
TRAIN, VAL = (6, 1), (10, 2)  # Tones(per_class, seed): 18 training and 30 validation clips


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks gain little from a second thread and lose much when the cores are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
        report["checksum"] = sum(float(v.double().sum()) for v in model.state_dict().values())
        report["proba"] = predict_proba(model, Tones(*VAL), batch_size=4).tolist()
        if rank == 0:
            save_checkpoint(model, Path(report_dir, "first"), DDP_CFG, LABELS)
        longer = DDP_CFG.replace(train={"epochs": 7})
        resumed = fit(build_model(longer, 3), Tones(*TRAIN), Tones(*VAL), longer, out,
                      label_names=LABELS, resume=True)
        report["resumed_history"] = resumed.history
    finally:
        destroy_distributed()
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps(report))


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


def test_ranks_take_identical_decisions_and_hold_identical_models(two_processes):
    _, (r0, r1), _ = two_processes
    for key in ("history", "result", "checksum", "proba", "resumed_history"):
        if key == "history":
            strip = [[{k: v for k, v in row.items() if k != "seconds"} for row in r["history"]] for r in (r0, r1)]
            assert strip[0] == strip[1]
        elif key != "resumed_history":
            assert r0[key] == r1[key], key
    assert len(r0["resumed_history"]) == 7 and r0["resumed_history"][:6] == r0["history"]


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
