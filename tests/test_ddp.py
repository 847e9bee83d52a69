"""Data-parallel training through torch.distributed: two CPU processes (gloo) launched with torchrun.

The workers (this file run as a script under torchrun) build the model and batches with fastode.train's own
code (``init_distributed``, ``BatchSource``, ``build_model``, ``wrap_for_training``), take one DDP backward
on their halves of the batch, and save the averaged gradients and the two halves. The test recomputes the
gradient in one process on the combined batch and compares. The workers then run a short end-to-end
``train`` so that the distributed training loop, evaluation and report are exercised too.
"""
import json
import os
import shutil
import subprocess
import sys

import torch

ARGS = ["--data", "8gaussians", "--dims", "8-8", "--method", "rk4", "--step-size", "0.25", "--batch-size", "16",
        "--dtype", "float64", "--trace", "exact", "--kinetic", "0.1", "--T-mode", "joint", "--threads", "1",
        "--toy-val-size", "32", "--toy-test-size", "32", "--test-batch-size", "32", "--no-progress", "--no-plot"]


def _worker(out_dir):
    import torch.distributed as dist

    from fastode import train as T
    from fastode.flows import density_loss

    args = T.parse_args(ARGS + ["--save", os.path.join(out_dir, "run"), "--niters", "3", "--val-every", "2"])
    info = T.init_distributed("cpu")
    assert info.distributed and info.world_size == 2 and info.backend == "gloo"
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    source = T.BatchSource(args, info)
    flow = T.build_model(args, source.dim).to(torch.float64)
    module = T.wrap_for_training(flow, info)
    assert isinstance(module, torch.nn.parallel.DistributedDataParallel)
    x = torch.as_tensor(source.batch(0), dtype=torch.float64)
    loss, _ = density_loss(flow, x, module=module)
    loss.backward()
    halves = [torch.empty_like(x) for _ in range(2)]
    dist.all_gather(halves, x)
    if info.rank == 0:
        torch.save({"grads": {n: p.grad.clone() for n, p in flow.named_parameters()},
                    "batch": torch.cat(halves), "loss0": loss.detach()}, os.path.join(out_dir, "ddp.pt"))
    dist.barrier()
    first = T.train(args, info)
    # TO-FLOW coordinate descent: the second (T-only) backward runs outside DDP with averaged T gradients
    args = T.parse_args(ARGS + ["--save", os.path.join(out_dir, "run_alt"), "--niters", "2", "--val-every", "2",
                                "--T-mode", "alternate", "--T-lr", "0.05"])
    second = T.train(args, info)
    if info.rank == 0:
        torch.save({"in_sync": [first["replicas_identical"], second["replicas_identical"]],
                    "T_moved": second["T"][0] != 0.5}, os.path.join(out_dir, "sync.pt"))
    dist.destroy_process_group()


def test_ddp_gradients_equal_single_process_gradients(tmp_path):
    torchrun = shutil.which("torchrun")
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--standalone", "--nnodes", "1", "--nproc-per-node", "2", __file__, str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    saved = torch.load(tmp_path / "ddp.pt", weights_only=False)

    from fastode import train as T
    from fastode.flows import density_loss

    args = T.parse_args(ARGS + ["--save", str(tmp_path / "single")])
    torch.manual_seed(args.seed)
    flow = T.build_model(args, 2).to(torch.float64)
    assert T.wrap_for_training(flow, T.DistInfo()) is flow
    batch = saved["batch"]
    assert batch.shape == (16, 2)
    assert not torch.equal(batch[:8], batch[8:])  # the processes trained on different data
    loss, _ = density_loss(flow, batch)
    loss.backward()
    for name, p in flow.named_parameters():
        torch.testing.assert_close(saved["grads"][name], p.grad, rtol=1e-10, atol=1e-12, msg=name)
    assert "_T_raw" in "".join(saved["grads"])  # the end time is learned and its gradient averaged too

    report = json.load(open(tmp_path / "run" / "report.json"))
    assert report["world_size"] == 2 and report["iterations"] == 3
    sync = torch.load(tmp_path / "sync.pt", weights_only=False)
    assert sync["in_sync"] == [True, True] and sync["T_moved"]


if __name__ == "__main__":
    _worker(sys.argv[1])
