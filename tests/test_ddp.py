"""DDP: 2 CPU processes (gloo) train AdapMTL; every rank must take the same cap decisions and (controlled
mode) the same controller pushes, hold the same adaptive weights and end with identical parameters."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adapmtl.train import Trainer, config_from_dict


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, root, out_dir, results_dir, control):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = config_from_dict({
        "method": "adapmtl", "seed": 7, "out_dir": out_dir, "device": "cpu",
        "data": {"dataset": "synthetic", "root": root, "n_train": 12, "n_test": 2, "image_size": 32, "crop_size": 32, "batch_size": 2, "val_fraction": 0.25},
        "model": {"backbone": "tiny", "head_channels": 4},
        # a large lr makes the sparsity swing around the target: the cap fires on some steps, not on others
        # controlled: the ramp (iterations 0-3) pushes, the hold (4-5) caps
        "prune": {"s0": -4.2, "target_sparsity": 0.25, "control": control},
        "optim": {"lr": 0.05, "weight_decay": 1e-2},
        "loss_weights": {"start": 1, "window": 2},
        "train": {"iterations": 6, "log_every": 100, "val_every": 100, "ckpt_every": 100, "progress": False,
                  "tensorboard": False, "plots": False},
    })
    tr = Trainer(cfg)
    assert tr.distributed and tr.world == world
    data = tr._train_batches(0)
    caps, weights, pushes = [], [], []
    for _ in range(cfg.train.iterations):
        out = tr.train_step(next(data))
        caps.append(out["cap"])
        weights.append(tr.loss_weights.weights().clone())
        pushes.append(tr.method.log_scalars().get("control/push"))
    params = {k: v.detach().clone() for k, v in tr.model.named_parameters()}
    torch.save({"caps": caps, "weights": weights, "params": params, "pushes": pushes,
                "first_batch_index": next(tr._train_batches(0))["index"]},
               os.path.join(results_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
@pytest.mark.parametrize("control", ["paper", "controlled"])
def test_two_rank_gloo_ranks_stay_identical(tmp_path, control):
    from adapmtl.data import make_synthetic_scenes

    root = str(tmp_path / "scenes")
    make_synthetic_scenes(root, n_train=12, n_test=2, size=32, seed=0)
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), root, str(tmp_path / "run"), str(results), control), nprocs=2, join=True)
    r0, r1 = (torch.load(results / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["first_batch_index"] != r1["first_batch_index"]  # the ranks really see different data
    assert r0["caps"] == r1["caps"]
    assert 0.0 in r0["caps"] and 1.0 in r0["caps"], r0["caps"]  # both decisions happened
    assert r0["pushes"] == r1["pushes"]
    if control == "controlled":
        assert all(p is not None for p in r0["pushes"]) and any(p != 0.0 for p in r0["pushes"])
    for a, b in zip(r0["weights"], r1["weights"]):
        assert torch.equal(a, b)
    assert any(not torch.equal(w, torch.ones_like(w)) for w in r0["weights"])  # adaptive weights were active
    assert r0["params"].keys() == r1["params"].keys()
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
