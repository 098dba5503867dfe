"""Two CPU processes (gloo): global contrastive gradients, same task on every rank, no hang on data failure,
accumulated micro-batches across ranks (DDP and per-layer FSDP),
the trainer under FSDP (same losses as DDP, full checkpoints on rank 0, exact resume), and the torchrun entry point."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from pmd_pipeline.errors import PmdError
from pmd_pipeline.train.checkpoint import restore_rng
from pmd_pipeline.train.distributed import mean_over_ranks, next_batch_everywhere
from pmd_pipeline.train.losses import global_contrastive
from pmd_pipeline.train.sampling import task_for_step
from pmd_pipeline.train.trainer import train
from tests.train_fixtures import make_pmd

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
            next_batch_everywhere(_FailingOn(rank), "pairs", WORLD)
            stopped = False
        except PmdError:
            stopped = True
        logged = mean_over_ranks({"mlm": torch.tensor(float(rank + 1))}, WORLD)  # what rank 0 logs of a step
        torch.save((grads, tasks, stopped, logged), f"{out}/rank{rank}.pt")
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
    assert by_rank[0][3] == by_rank[1][3] == {"mlm": 1.5}  # logged losses: the mean over the ranks


def _train_worker(rank: int, init_file: str, shards: str, run_dir: str, fsdp: bool, resume: bool):
    from tests.test_train_run import _config

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        cfg = _config(shards, run_dir, batch_size=4, steps=6, lr=2e-3)
        cfg.checkpoint_every, cfg.fsdp = 3, fsdp
        train(cfg, resume=resume, say=lambda _: None)
    finally:
        dist.destroy_process_group()


def _spawn_training(tmp_path, name: str, shards, run_dir, fsdp: bool, resume: bool = False) -> list[dict]:
    args = (str(tmp_path / f"init_{name}"), str(shards), str(run_dir), fsdp, resume)
    mp.spawn(_train_worker, args=args, nprocs=WORLD, join=True)
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def spawned_run(tmp_path_factory):
    """Shards and a 6-step DDP run on 2 ranks started with mp.spawn (its folder and log rows): the reference
    the FSDP and torchrun runs are compared with."""
    tmp_path = tmp_path_factory.mktemp("spawned")
    shards = make_pmd(tmp_path / "pmd", per_shard=24, shards=2)
    run_dir = tmp_path / "run"
    return shards, run_dir, _spawn_training(tmp_path, "spawned", shards, run_dir, fsdp=False)


def test_fsdp_trains_like_ddp_and_resumes_exactly_from_its_full_checkpoint(spawned_run, tmp_path):
    shards, ddp_dir, ddp = spawned_run
    whole = _spawn_training(tmp_path, "fsdp", shards, tmp_path / "fsdp", fsdp=True)
    assert [r["task"] for r in whole] == [r["task"] for r in ddp] and "pairs" in {r["task"] for r in whole[3:]}
    for a, b in zip(ddp, whole, strict=True):  # same start (rank 0's weights), same averaged gradients
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-4, abs=1e-5)

    # The checkpoint holds the whole model in the plain model's keys and shapes, gathered on rank 0.
    state = torch.load(tmp_path / "fsdp" / "checkpoints" / "step_00000003.pt", weights_only=False)
    plain = torch.load(ddp_dir / "checkpoints" / "step_00000003.pt", weights_only=False)
    assert {k: v.shape for k, v in state["model"].items()} == {k: v.shape for k, v in plain["model"].items()}
    # every rank's RNG is saved (ranks are seeded apart), and a resumed rank gets back its own
    assert len(state["rng"]) == WORLD and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    restore_rng(state["rng"], rank=1)
    assert torch.equal(torch.get_rng_state(), state["rng"][1]["torch"])

    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "fsdp", cut)
    (cut / "checkpoints" / "step_00000006.pt").unlink()
    (cut / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in whole[:3]))
    resumed = _spawn_training(tmp_path, "resume", shards, cut, fsdp=True, resume=True)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(whole[3:], resumed[3:], strict=True):
        assert a["task"] == b["task"]
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-5, abs=1e-6)


def _torchrun(launcher_args: list[str], config: Path) -> subprocess.Popen:
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), *launcher_args, "-m", "pmd_pipeline.train", str(config)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("layout", ["one node, 2 processes", "2 nodes, 1 process each"])
def test_torchrun_entry_point_trains_like_the_spawned_ranks(spawned_run, tmp_path, layout):
    """The documented command, `torchrun ... -m pmd_pipeline.train CONFIG`, on 2 CPU ranks: torchrun's
    environment starts the process group (gloo), rank 0 alone writes the log and checkpoints, and the losses
    equal those of the same config on ranks started with mp.spawn. Two nodes are two torchrun launchers
    meeting at a static rendezvous on 127.0.0.1, as two machines would at their master's address."""
    shards, _, spawned = spawned_run
    config = tmp_path / "run.toml"  # the config of _train_worker's runs
    config.write_text(
        f'run_dir = "{tmp_path / "run"}"\nvocab_size = 200\nlog_every = 100\ncheckpoint_every = 3\n'
        f'[data]\nshards = "{shards}"\nbatch_size = 4\nworkers = 0\n'
        "[optim]\nlr = 2e-3\nwarmup_steps = 2\nsteps = 6\n"
    )
    if layout == "one node, 2 processes":
        launchers = [_torchrun(["--standalone", "--nproc-per-node", str(WORLD)], config)]
    else:
        master = ["--nnodes", str(WORLD), "--nproc-per-node", "1", "--master-addr", "127.0.0.1"]
        master += ["--master-port", str(_free_port())]
        launchers = [_torchrun([*master, "--node-rank", str(node)], config) for node in range(WORLD)]
    try:
        outputs = [launcher.communicate(timeout=300)[0] for launcher in launchers]
    finally:  # a launcher left waiting for its peer must not outlive the test
        for launcher in launchers:
            launcher.kill()
    assert [launcher.returncode for launcher in launchers] == [0] * len(launchers), outputs[0][-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))  # one line a step: only rank 0 writes
    assert [r["task"] for r in rows] == [r["task"] for r in spawned]
    for a, b in zip(spawned, rows, strict=True):
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-5, abs=1e-6)
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved == ["step_00000003.pt", "step_00000006.pt"]


def _accumulation_worker(rank: int, init_file: str, batches: str, out: str, fsdp: bool):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers.models.flava.modeling_flava import FlavaLayer

    from pmd_pipeline.train.config import ModelConfig, TrainConfig
    from pmd_pipeline.train.distributed import wrap
    from pmd_pipeline.train.model import FlavaTasks, build_model
    from pmd_pipeline.train.trainer import accumulate_gradients
    from tests.test_train_scale import _split

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        batch, vocab = torch.load(batches)
        batch = {k: v[rank * 8 : (rank + 1) * 8] for k, v in batch.items()}  # this rank's 8 pairs
        cfg = TrainConfig(fsdp=fsdp)
        results, units = {}, []
        for parts in (1, 2):
            torch.manual_seed(0)
            # FSDP accumulates with activation checkpointing on, as configs/flava_full.toml trains
            model = build_model(ModelConfig(activation_checkpointing=fsdp and parts > 1), vocab, 32)
            tasks, _ = wrap(FlavaTasks(model), cfg, torch.device("cpu"), WORLD)
            losses = accumulate_gradients(tasks, "pairs", _split(batch, parts), cfg, torch.device("cpu"))
            if fsdp:
                units = [type(unit.module) for unit in FSDP.fsdp_modules(tasks)]
                with FSDP.summon_full_params(tasks, with_grads=True):
                    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            else:
                grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results[parts] = ({k: v.item() for k, v in losses.items()}, grads)
        torch.save((results, [u is FlavaLayer for u in units]), f"{out}/accum_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~1-2 minutes each on a shared 2-core box
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp per layer"])
def test_accumulation_across_ranks_equals_the_big_batch(tmp_path, fsdp):
    """On 2 ranks, 2 accumulated micro-batches of 4 per rank (reduced at the last one only: no_sync before) give
    the gradients of 8 per rank, global contrastive negatives from both ranks' cached features included. Under
    FSDP each FlavaLayer is its own unit (plus the root), and the gathered gradients are the same, with
    activation checkpointing on in the accumulated run."""
    from tests.test_train_scale import BATCH, assert_grads_equal

    assert BATCH == 8
    shards = make_pmd(tmp_path / "pmd", per_shard=16, shards=1)
    from pmd_pipeline.train.data import TaskStream
    from pmd_pipeline.train.tokenizer import train_wordpiece
    from tests.train_fixtures import COLOURS, WORDS

    tokenizer = train_wordpiece([f"a {c} " + " ".join(WORDS) for c in COLOURS] * 10, 120)
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    tars = [str(p) for p in sorted((shards / "cc3m").glob("*.tar"))]
    stream = iter(TaskStream("pairs", tars, str(tmp_path / "tok"), 16, 32, seed=3, rank=0, world=1))
    batch = {k: v.clone() for k, v in next(stream).items() if k != "failures"}  # own storage each, to be saved
    torch.save((batch, len(tokenizer)), tmp_path / "batches.pt")
    args = (str(tmp_path / "init"), str(tmp_path / "batches.pt"), str(tmp_path), fsdp)
    mp.spawn(_accumulation_worker, args=args, nprocs=WORLD, join=True)
    for rank in range(WORLD):
        results, is_layer = torch.load(tmp_path / f"accum_rank{rank}.pt", weights_only=False)
        (big_losses, big_grads), (losses, grads) = results[1], results[2]
        assert losses == pytest.approx(big_losses, rel=1e-5, abs=1e-6)
        assert_grads_equal(grads, big_grads, f"rank {rank}")
        if fsdp:  # 2 + 2 text/image layers and 1 multimodal layer of the tiny model, and the root
            assert is_layer.count(True) == 5 and len(is_layer) == 6
