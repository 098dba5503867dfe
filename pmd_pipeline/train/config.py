"""The pretrain config: one TOML file loaded into dataclasses (defaults = the embedded tiny run)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from pmd_pipeline.errors import PmdError

DEFAULT_CONFIG = Path(__file__).with_name("default.toml")


@dataclass
class DataConfig:
    shards: str = "pmd_out"  # a `pmd build` output folder
    pairs: list[str] = field(default_factory=list)  # source folders with image-text pairs; empty = all others
    image_only: list[str] = field(default_factory=lambda: ["imagenet"])
    text_only: list[str] = field(default_factory=lambda: ["text_corpus"])
    mix: dict[str, float] = field(default_factory=lambda: {"pairs": 0.70, "image": 0.15, "text": 0.15})
    batch_size: int = 8  # per rank; equal on every rank (global contrastive needs it)
    workers: int = 2
    pair_text_len: int = 77  # tokens of a paired caption (FLAVA: 77)
    text_len: int = 512  # tokens of a text-only passage (FLAVA: 512); the model's positions cover the longer
    shuffle_buffer: int = 1000  # samples per shuffle window of each stream (0: shards in order, unshuffled)
    shard_lanes: int = 4  # shards each stream reads at once, round-robin, so a window mixes sources and images
    itm_negative_rate: float = 0.1  # torchmultimodal's FLAVA itm_probability (see data.ITM_NEGATIVE_RATE)
    codebook: str = "auto"  # "auto" = the one all shards share; else must equal the sidecars' codebook
    skip_untokenized: bool = False  # True: leave shards without tokens out (counted) instead of stopping


@dataclass
class ModelConfig:
    pretrained: str = ""  # a local facebook/flava-full-layout folder; empty = a fresh model of the sizes below
    hidden_size: int = 64
    layers: int = 2
    multimodal_layers: int = 1
    heads: int = 2
    intermediate_size: int = 128
    projection_dim: int = 64
    # Recompute each transformer layer's activations in the backward instead of keeping them (HF's
    # activation_checkpointing_enable): same losses and gradients, far less memory, about a third more compute.
    activation_checkpointing: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-3  # the paper's recipe: AdamW, lr 1e-3, wd 0.1, betas (0.9, 0.999), warmup + cosine
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 20
    steps: int = 200
    # Samples per optimizer step over all ranks; 0 = data.batch_size x ranks (no accumulation). Otherwise
    # accumulation = global_batch / (data.batch_size x ranks) micro-batches per step, which must divide exactly.
    global_batch: int = 0


@dataclass
class MetricsConfig:
    tensorboard: bool = True  # event files in RUN/tensorboard (`tensorboard --logdir RUN`)
    wandb: bool = False  # also log to Weights & Biases; needs `wandb` installed and logged in
    wandb_project: str = "pmd-flava"


@dataclass
class EvalConfig:
    every: int = 0  # steps between zero-shot retrieval evaluations during training; 0 = never
    data: str = ""  # held-out shards (a build folder or a shard list), as `pmd eval --shards`
    limit: int = 1000  # image-text pairs read from them


@dataclass
class TrainConfig:
    run_dir: str = "pmd_runs/tiny"
    tokenizer: str = ""  # a local HF tokenizer folder; empty = train WordPiece on the shards' text
    vocab_size: int = 1000  # of the trained WordPiece vocabulary
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 50
    bf16: bool = True  # autocast on GPU only
    fsdp: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# What `--resume` lets a config change: how the run is logged, checkpointed and fed, and how long it runs
# (a longer optim.steps extends the run; its cosine then stretches to the new end from the resumed step), and
# where its shards are (data moved to a bucket or another disk: the shards' codebook is still checked).
# Everything else changes what is trained, and a resume with it changed is refused.
RESUMABLE_CHANGES = ("run_dir", "log_every", "checkpoint_every", "optim.steps", "data.workers", "data.shards",
                     "metrics.*", "model.activation_checkpointing", "eval.*")  # fmt: skip


def load_train_config(path: Path | None = None, **overrides) -> TrainConfig:
    """Read a TOML file (none = the embedded default); unknown keys are errors, not silently ignored."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise PmdError(f"pretrain config not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise PmdError(f"{path}: not valid TOML ({err})") from None
    raw.update(overrides)
    return _build(TrainConfig, raw, str(path))


def config_from_dict(raw: dict, where: str) -> TrainConfig:
    """The config a checkpoint carries (`as_dict` of it), checked as a TOML file is."""
    return _build(TrainConfig, dict(raw), where)


def _build(cls, raw: dict, where: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    if cls is DataConfig and "max_text_len" in raw:  # one length for both was split in two (issue 16)
        raise PmdError(
            f"{where}: max_text_len is gone: set pair_text_len (paired captions, FLAVA 77) and text_len "
            "(text-only passages, FLAVA 512) instead"
        )
    unknown = set(raw) - set(names)
    if unknown:
        raise PmdError(f"{where}: unknown key(s) {sorted(unknown)}; valid: {sorted(names)}")
    values = {}
    tables = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig}
    tables.update(metrics=MetricsConfig, eval=EvalConfig)
    for name, value in raw.items():
        sub = tables.get(name)
        values[name] = _build(sub, value, f"{where}, table {name}") if sub and cls is TrainConfig else value
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    cfg = cls(**values)
    if cls is DataConfig:
        _check_mix(cfg.mix, where)
        _check_data(cfg, where)
    return cfg


def _check_mix(mix: dict[str, float], where: str) -> None:
    if set(mix) - {"pairs", "image", "text"} or not mix or sum(mix.values()) <= 0 or min(mix.values()) < 0:
        raise PmdError(f"{where}: mix must weight 'pairs', 'image', 'text' with non-negative numbers, got {mix}")


def _check_data(data: DataConfig, where: str) -> None:
    if min(data.pair_text_len, data.text_len) < 8:
        raise PmdError(f"{where}: pair_text_len and text_len must be at least 8 tokens")
    if data.shuffle_buffer < 0 or data.shard_lanes < 1:
        raise PmdError(f"{where}: shuffle_buffer must be >= 0 and shard_lanes >= 1")
    if not 0 <= data.itm_negative_rate < 1:
        raise PmdError(f"{where}: itm_negative_rate must be in [0, 1), got {data.itm_negative_rate}")


def as_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def accumulation(cfg: TrainConfig, world: int) -> int:
    """Micro-batches per optimizer step: global_batch = data.batch_size x ranks x accumulation."""
    per_step = cfg.data.batch_size * world
    if cfg.optim.global_batch == 0:
        return 1
    if cfg.optim.global_batch < 0 or cfg.optim.global_batch % per_step:
        raise PmdError(
            f"optim.global_batch = {cfg.optim.global_batch} is not a positive multiple of data.batch_size x ranks "
            f"= {cfg.data.batch_size} x {world} = {per_step}: change one of them so that they divide exactly"
        )
    return cfg.optim.global_batch // per_step


def changed_on_resume(saved: dict, now: dict) -> list[str]:
    """The dotted keys whose values differ between a checkpoint's config and this one, except RESUMABLE_CHANGES.
    A key one side lacks (a checkpoint from before it existed) is not a change."""
    saved_flat, now_flat = flat_config(saved), flat_config(now)
    changed = [k for k in sorted(saved_flat.keys() & now_flat.keys()) if _norm(saved_flat[k]) != _norm(now_flat[k])]
    return [k for k in changed if not any(_matches(k, allowed) for allowed in RESUMABLE_CHANGES)]


def flat_config(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and key in ("data", "model", "optim", "metrics", "eval"):
            out.update(flat_config(value, f"{key}."))
        else:
            out[prefix + key] = value
    return out


def _norm(value):
    return list(value) if isinstance(value, tuple) else value  # betas: a tuple here, a list after JSON


def _matches(key: str, allowed: str) -> bool:
    return key.startswith(allowed[:-1]) if allowed.endswith("*") else key == allowed
