"""What a person looks at during and after a run (rank 0 only): log.jsonl, TensorBoard, optional W&B, the loss plot.

Every record holds each step once: a resumed run first cuts log.jsonl back to its checkpoint's step and
tells TensorBoard to drop the later events (purge_step), so the replayed steps replace the old ones.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from pmd_pipeline.errors import PmdError
from pmd_pipeline.train.config import TrainConfig, as_dict
from shards.files import atomic_path

LOG = "log.jsonl"
PLOT = "losses.png"
TENSORBOARD = "tensorboard"


class RunLog:
    def __init__(self, run_dir: Path, cfg: TrainConfig, start: int):
        self.run_dir, self.total, self.start = run_dir, cfg.optim.steps, start
        keep_steps_up_to(run_dir / LOG, start)
        self.file = open(run_dir / LOG, "a")
        self.tensorboard = None
        if cfg.metrics.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the events of steps >= start + 1 written before (by the run resumed here,
            # or by an attempt that died before its first checkpoint).
            self.tensorboard = SummaryWriter(str(run_dir / TENSORBOARD), purge_step=start + 1)
        self.wandb = _wandb_run(cfg, run_dir) if cfg.metrics.wandb else None
        self.began = time.perf_counter()

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        scalars = scalars_of(row)
        if self.tensorboard:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, global_step=row["step"])
        if self.wandb:
            self.wandb.log(scalars, step=row["step"])

    def progress(self, row: dict) -> str:
        """The console line: losses, lr, speed, steps done / total and the time left at this session's pace."""
        done = row["step"] - self.start
        left = (time.perf_counter() - self.began) / done * (self.total - row["step"])
        losses = " ".join(f"{k}={v:.3f}" for k, v in row["losses"].items())
        return (
            f"step {row['step']:>5}/{self.total} {row['task']:<5} {losses}  lr={row['lr']:.2e} "
            f"|g|={row['grad_norm']:.3g} {row['samples_per_s']} samples/s  ETA {_duration(left)}"
        )

    def close(self) -> Path:
        """Flush everything and draw the loss curves of the whole run (all of log.jsonl); returns the PNG's path."""
        self.file.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
        return plot_losses(self.run_dir / LOG, self.run_dir / PLOT)


def check_metrics(cfg: TrainConfig) -> None:
    """Before anything runs: W&B asked for but not installed is a config error, not a crash at the first step."""
    import importlib.util

    if cfg.metrics.wandb and importlib.util.find_spec("wandb") is None:
        raise PmdError("metrics.wandb = true but wandb is not installed: pip install wandb, or set it false")


def scalars_of(row: dict) -> dict[str, float]:
    """A log row as named scalars: loss/TASK/NAME for each loss, and the step's lr, grad norm and speed."""
    scalars = {f"loss/{row['task']}/{name}": value for name, value in row["losses"].items()}
    scalars[f"loss/{row['task']}/total"] = row["loss"]
    scalars.update({"lr": row["lr"], "grad_norm": row["grad_norm"], "samples_per_s": row["samples_per_s"]})
    return scalars


def keep_steps_up_to(path: Path, step: int) -> None:
    """Cut a log back to its rows of steps <= step (a resume replays the rest); a fresh run (step 0) empties it."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True) if _step(line) <= step]
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(kept))


def _step(line: str) -> int:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a line cut short by a kill: after any checkpoint, so it goes


def plot_losses(log: Path, png: Path) -> Path:
    """One panel per task, each of its losses against the step (the steps a task ran on)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, tuple[list, list]]] = {}
    for line in log.read_text().splitlines():
        row = json.loads(line)
        for name, value in row["losses"].items():
            steps, values = series.setdefault(row["task"], {}).setdefault(name, ([], []))
            steps.append(row["step"])
            values.append(value)
    tasks = sorted(series)
    figure, axes = plt.subplots(1, max(1, len(tasks)), figsize=(5 * max(1, len(tasks)), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=False):
        for name, (steps, values) in series[task].items():
            ax.plot(steps, values, label=name, linewidth=1)
        ax.set_title(f"{task} steps")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize="small")
    figure.tight_layout()
    with atomic_path(png) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    return png


def _wandb_run(cfg: TrainConfig, run_dir: Path):
    import wandb

    # One W&B run per run folder: its id is kept there, so a resumed run continues the same W&B run.
    id_file = run_dir / "wandb_id"
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:12])
    return wandb.init(
        project=cfg.metrics.wandb_project, name=run_dir.name, id=id_file.read_text().strip(), resume="allow",
        dir=str(run_dir), config=as_dict(cfg),
    )  # fmt: skip


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
