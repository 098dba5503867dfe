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
    max_text_len: int = 32
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


@dataclass
class OptimConfig:
    lr: float = 1e-3  # the paper's recipe: AdamW, lr 1e-3, wd 0.1, betas (0.9, 0.999), warmup + cosine
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 20
    steps: int = 200


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
    eval: EvalConfig = field(default_factory=EvalConfig)


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
    unknown = set(raw) - set(names)
    if unknown:
        raise PmdError(f"{where}: unknown key(s) {sorted(unknown)}; valid: {sorted(names)}")
    values = {}
    for name, value in raw.items():
        sub = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "eval": EvalConfig}.get(name)
        values[name] = _build(sub, value, f"{where}, table {name}") if sub and cls is TrainConfig else value
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    cfg = cls(**values)
    if cls is DataConfig:
        _check_mix(cfg.mix, where)
    return cfg


def _check_mix(mix: dict[str, float], where: str) -> None:
    if set(mix) - {"pairs", "image", "text"} or not mix or sum(mix.values()) <= 0 or min(mix.values()) < 0:
        raise PmdError(f"{where}: mix must weight 'pairs', 'image', 'text' with non-negative numbers, got {mix}")


def as_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
