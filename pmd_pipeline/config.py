"""The build configuration: one TOML file loaded into dataclasses, resolved, hashed and saved with the output."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from pmd_pipeline.errors import PmdError

FORMAT_VERSION = 1  # bump when the shard layout changes; part of the config hash


@dataclass
class FilterConfig:
    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceConfig:
    name: str
    metadata: list[str] = field(default_factory=list)  # raw metadata files or http(s) URLs, read in order
    images: dict[str, str] = field(default_factory=dict)  # local image archives by role (e.g. train2014)
    options: dict[str, Any] = field(default_factory=dict)  # source-specific rules (see `pmd sources`)
    enabled: bool = True
    limit: int | None = None  # stop after this many candidate rows (for samples and smoke runs)
    filters: list[FilterConfig] | None = None  # None: the source's own default chain, else the global one


@dataclass
class ImageConfig:
    size: int = 224
    resize_mode: str = "center_crop"  # img2dataset resize modes: center_crop, keep_ratio, border, no
    encode_format: str = "jpg"
    encode_quality: int = 95
    max_pixels: int = 50_000_000  # larger images are refused from their header, before decoding (bombs)
    # Thinner images (long side / short side) are refused from their header too: 100,000 x 10 is a 3 KB PNG
    # that scaling its short side to `size` turns into gigabytes. Real panoramas and banners stay under ~10.
    max_aspect_ratio: float = 20.0


@dataclass
class FetchConfig:
    thread_count: int = 32  # download threads per shard task
    timeout_s: float = 10.0  # per socket operation
    deadline_s: float = 60.0  # per request, body included: a server trickling bytes is cut off
    max_response_bytes: int = 20_000_000
    retries: int = 2  # of transient failures (timeouts, resets, 429, 5xx); never of 404 or a refusal
    backoff_s: float = 1.0  # doubled per retry; 429/503 also honour Retry-After up to backoff_max_s
    backoff_max_s: float = 30.0
    max_per_host: int = 16  # requests in flight per host, per shard task
    # Hosts that may resolve to loopback/private addresses: a mirror or cache you run on purpose.
    # Everything else that resolves to such an address is refused (no requests into your network).
    allowed_private_hosts: list[str] = field(default_factory=list)
    mirror: str = ""  # URL prefix replacing scheme+host: https://h/p -> {mirror}/h/p
    user_agent_token: str = "pmd-pipeline"


@dataclass
class RunConfig:
    """How the build runs. Not part of the config hash: changing it never invalidates an output."""

    ray_address: str = ""  # empty: start a local Ray instance
    num_cpus: int | None = None  # local Ray only; None = all cores
    max_in_flight: int = 0  # shard tasks in flight; 0 = twice the cluster's CPUs
    shard_retries: int = 3


INT8_SUFFIX = ", int8 approximation"  # appended to the codebook identity of int8 tokens (never mixed with exact ones)


@dataclass
class TokenizeConfig:
    """The dVAE token stage. Not in the config hash: each shard's sidecar records its codebook's identity instead."""

    enabled: bool = True
    codebook: str = ""  # HF FlavaImageCodebook folder or DALL-E encoder.pkl; empty = random codebook (seeded)
    batch_size: int = 0  # images per encoder call; 0 = sized for the device (1 on CPUs, 256 on GPUs)
    # auto (bf16 on GPUs with bf16, fp32 on CPUs), fp32, bf16, or int8 (CPU, ~5x fp32, approximate: the
    # agreement with fp32 is measured on held-out images of the build and recorded in every sidecar)
    precision: str = "auto"
    actors: int = 0  # 0 = one per GPU, or one CPU actor using every core
    seed: int = 0  # of the random codebook


@dataclass
class BuildConfig:
    out: str = "pmd_out"
    shard_size: int = 1000
    sources: list[SourceConfig] = field(default_factory=list)
    filters: list[FilterConfig] = field(default_factory=lambda: [FilterConfig("caption_length")])
    image: ImageConfig = field(default_factory=ImageConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)

    def enabled_sources(self) -> list[SourceConfig]:
        return [s for s in self.sources if s.enabled]

    def content_hash(self) -> str:
        """Hash of everything that decides what the shards contain (not how fast or from which mirror)."""
        content = {
            "format_version": FORMAT_VERSION,
            "shard_size": self.shard_size,
            "sources": [dataclasses.asdict(s) for s in self.enabled_sources()],
            "filters": [dataclasses.asdict(f) for f in self.filters],
            "filter_chains": self._filter_chains(),
            "image": dataclasses.asdict(self.image),
        }
        blob = json.dumps(content, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def _filter_chains(self) -> dict:
        """Each source's resolved chain: a source's built-in default decides content as much as the config."""
        from pmd_pipeline.process import filter_chain  # late: process imports the sources, which import this

        return {s.name: [dataclasses.asdict(f) for f in filter_chain(self, s.name)] for s in self.enabled_sources()}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | Path) -> BuildConfig:
    """Read a TOML config (data only, never executed); relative paths are taken from the file's folder."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PmdError(f"config file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise PmdError(f"config file {path} is not valid TOML ({err}); fix the file and run again") from None
    return config_from_dict(raw, base_dir=path.resolve().parent)


def config_from_dict(raw: dict, base_dir: Path) -> BuildConfig:
    raw = dict(raw)
    sources = [_source_from(name, spec, base_dir) for name, spec in (raw.pop("sources", {}) or {}).items()]
    filters = [_filter_from(spec) for spec in raw.pop("filters", [{"name": "caption_length"}])]
    sections = {name: _section(cls, raw.pop(name, {}), name) for name, cls in _SECTIONS.items()}
    cfg = _build(BuildConfig, raw, "top level", sources=sources, filters=filters, **sections)
    cfg.out = str(_resolve(cfg.out, base_dir))
    if cfg.tokenize.codebook:
        cfg.tokenize.codebook = str(_resolve(cfg.tokenize.codebook, base_dir))
    if cfg.shard_size < 1:
        raise PmdError("config: shard_size must be at least 1")
    return cfg


_SECTIONS = {"image": ImageConfig, "fetch": FetchConfig, "run": RunConfig, "tokenize": TokenizeConfig}


def _source_from(name: str, spec: dict, base_dir: Path) -> SourceConfig:
    if not isinstance(spec, dict):
        raise PmdError(f"config: [sources.{name}] must be a table")
    spec = dict(spec)
    spec["metadata"] = [
        p if p.startswith(("http://", "https://")) else str(_resolve(p, base_dir))
        for p in _as_list(spec.get("metadata", []))
    ]
    spec["images"] = {k: str(_resolve(v, base_dir)) for k, v in spec.get("images", {}).items()}
    spec["options"] = {
        k: str(_resolve(v, base_dir)) if k.endswith(("_file", "_dir")) and isinstance(v, str) else v
        for k, v in spec.get("options", {}).items()
    }  # options naming files (karpathy_split_file) are paths like the others
    if spec.get("filters") is not None:
        spec["filters"] = [_filter_from(f) for f in spec["filters"]]
    return _build(SourceConfig, spec, f"[sources.{name}]", name=name)


def _filter_from(spec: dict) -> FilterConfig:
    if not isinstance(spec, dict) or "name" not in spec:
        raise PmdError("config: every [[filters]] entry needs a name")
    if set(spec) == {"name", "params"} and isinstance(spec["params"], dict):  # the saved (resolved) form
        return FilterConfig(name=spec["name"], params=dict(spec["params"]))
    params = {k: v for k, v in spec.items() if k != "name"}
    return FilterConfig(name=spec["name"], params=params)


def _section(cls, values: dict, name: str):
    if not isinstance(values, dict):
        raise PmdError(f"config: [{name}] must be a table")
    return _build(cls, values, f"[{name}]")


def _build(cls, values: dict, where: str, **extra):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise PmdError(f"config {where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    try:
        return cls(**values, **extra)
    except TypeError as err:
        raise PmdError(f"config {where}: {err}") from None


def _as_list(value) -> list:
    return [value] if isinstance(value, str) else list(value)


def _resolve(p: str, base_dir: Path) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()
