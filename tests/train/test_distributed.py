"""Two CPU processes under gloo (torch.multiprocessing spawn) reproduce the one-process run's losses.

TinyNet without BatchNorm: DDP averages gradients over the processes, so with each process taking half of
every (unshuffled) batch the update equals the one-process update on the whole batch; BN would make the two
differ (per-process statistics), which is why it is left out here.
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:torch.distributed.*"),  # gloo/DDP notices, not ours
              pytest.mark.filterwarnings("ignore::ResourceWarning")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from kcengine.data.datasets import make_loader
    from kcengine.train import distributed as dd
    from kcengine.train import finetune

    helpers = _helpers()
    assert dd.init_from_env() is True
    try:
        torch.manual_seed(0)
        model = helpers.TinyNet(bn=False).eval()
        ds = helpers.tiny_data(n=64)
        res = finetune(model, make_loader(ds, 16, shuffle=False), plan={"ratio": 0.5}, epochs=2, augment=False,
                       mixup=0.0, progress=False, calibration_images=32, lr=0.05, checkpoint_dir=out_dir)
        if rank != 0:  # the sensitivity plan is measured on rank 0 only, and sent to the others
            import kcengine.train.sensitivity as sens

            def refuse(*args, **kwargs):
                raise AssertionError("a rank other than 0 measured the sensitivity plan")

            sens.sensitivity_plan = refuse
        sres = finetune(model, make_loader(ds, 16, shuffle=False), plan={"sensitivity": 0.5}, epochs=0,
                        progress=False, calibration_images=32)
        torch.save({"losses": [h["loss"] for h in res.history], "state": res.model.state_dict(),
                    "sensitivity_ks": sres.layer_ks}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dd.cleanup()


def _helpers():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_train_conftest", os.path.join(os.path.dirname(__file__),
                                                                                    "conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_two_gloo_processes_match_one(tmp_path):
    from kcengine.data.datasets import make_loader
    from kcengine.train import finetune
    from kcengine.train.checkpoint import CHECKPOINT_NAME

    helpers = _helpers()
    torch.manual_seed(0)
    model = helpers.TinyNet(bn=False).eval()
    ds = helpers.tiny_data(n=64)
    one = finetune(model, make_loader(ds, 16, shuffle=False), plan={"ratio": 0.5}, epochs=2, augment=False,
                   mixup=0.0, progress=False, calibration_images=32, lr=0.05)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    losses = [h["loss"] for h in one.history]
    assert r0["losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    assert r1["losses"] == pytest.approx(r0["losses"], rel=0, abs=1e-12)  # reduced: the same on every rank
    for k, v in one.model.state_dict().items():
        torch.testing.assert_close(r0["state"][k], v, atol=1e-5, rtol=1e-5, msg=k)
        torch.testing.assert_close(r1["state"][k], r0["state"][k], atol=0, rtol=0, msg=k)
    assert (tmp_path / CHECKPOINT_NAME).is_file()  # written by rank 0
    ks = finetune(model, make_loader(ds, 16, shuffle=False), plan={"sensitivity": 0.5}, epochs=0, progress=False,
                  calibration_images=32).layer_ks
    assert r0["sensitivity_ks"] == r1["sensitivity_ks"] == ks and sum(ks.values()) == 4 + 6
    assert losses[1] < losses[0]  # it trained: the comparison is not between two idle runs
