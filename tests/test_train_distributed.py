"""Two CPU processes (gloo): global contrastive gradients, same task on every rank, no hang on data failure."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from pmd_pipeline.errors import PmdError
from pmd_pipeline.train.losses import global_contrastive
from pmd_pipeline.train.sampling import task_for_step
from pmd_pipeline.train.trainer import _next_batch_everywhere

WORLD, BATCH = 2, 4


class TwoTowers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image, self.text = nn.Linear(10, 8), nn.Linear(12, 8)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x, y):
        image, text = F.normalize(self.image(x), dim=-1), F.normalize(self.text(y), dim=-1)
        return global_contrastive(image, text, self.logit_scale)


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * BATCH, 10, generator=generator), torch.randn(WORLD * BATCH, 12, generator=generator)


class _FailingOn:
    def __init__(self, rank):
        self.rank = rank

    def next(self, task):
        if self.rank == 1:
            raise StopIteration
        return {"ok": True}


def _worker(rank: int, init_file: str, out: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(TwoTowers())
        x, y = _inputs()
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        model(x[rows], y[rows]).backward()  # DDP averages the gradients over the ranks
        grads = {n: p.grad.clone() for n, p in model.module.named_parameters()}
        tasks = [task_for_step(s, 3, {"pairs": 0.7, "image": 0.15, "text": 0.15}) for s in range(500)]
        try:
            _next_batch_everywhere(_FailingOn(rank), "pairs", WORLD)
            stopped = False
        except PmdError:
            stopped = True
        torch.save((grads, tasks, stopped), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_the_full_batch_and_each_other(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    by_rank = {rank: torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)}

    full = TwoTowers()
    full(*_inputs()).backward()
    for name, param in full.named_parameters():
        for rank in range(WORLD):
            torch.testing.assert_close(by_rank[rank][0][name], param.grad, rtol=1e-5, atol=1e-6)
    # The gradient reaches the other rank's rows only through the all-gather: without it they would differ.
    assert by_rank[0][1] == by_rank[1][1]  # same task at every step on every rank
    assert by_rank[0][2] and by_rank[1][2]  # rank 1 ran out of data: both ranks stop, neither hangs
