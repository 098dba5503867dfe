"""The build configuration: one TOML file loaded into dataclasses, resolved, hashed and saved with the output.

Every value is checked for its TOML type and range when the file is read (pydantic validates the
dataclasses' annotated fields), so a wrong value stops the run with one line before any work starts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import tomllib
from pydantic import Field, Strict, TypeAdapter, ValidationError

from pmd_pipeline.errors import PmdError

FORMAT_VERSION = 1  # bump when the shard layout changes; part of the config hash

# TOML types, strictly: an int is an int (not true, not "10", not 2.0), a bool is a bool (not "false"),
# a float may be written as an int (timeout_s = 3). Ranges are the ones the code can work with.
Text = Annotated[str, Strict()]
Flag = Annotated[bool, Strict()]
AtLeastOne = Annotated[int, Strict(), Field(ge=1)]
AtLeastZero = Annotated[int, Strict(), Field(ge=0)]
Seconds = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]
SecondsOrZero = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]
Share = Annotated[float, Strict(), Field(ge=0, le=1)]  # a fraction or probability


@dataclass
class FilterConfig:
    name: Text
    params: dict[Text, Any] = field(default_factory=dict)  # checked by the filter itself (filters.build_filters)


@dataclass
class SourceConfig:
    name: Text
    metadata: list[Text] = field(default_factory=list)  # raw metadata files or http(s) URLs, read in order
    images: dict[Text, Text] = field(default_factory=dict)  # local image archives by role (e.g. train2014)
    options: dict[Text, Any] = field(default_factory=dict)  # source-specific rules, declared by the source
    enabled: Flag = True
    limit: AtLeastOne | None = None  # stop after this many candidate rows (for samples and smoke runs)
    filters: list[FilterConfig] | None = None  # None: the source's own default chain, else the global one


@dataclass
class ImageConfig:
    size: Annotated[int, Strict(), Field(ge=1, le=8192)] = 224  # a larger square is >200 MB decoded
    resize_mode: Literal["center_crop", "keep_ratio", "keep_ratio_largest", "border", "no"] = "center_crop"
    encode_format: Literal["jpg"] = "jpg"  # shards store KEY.jpg (shards/layout.py IMAGE_EXT): JPEG only
    encode_quality: Annotated[int, Strict(), Field(ge=0, le=100)] = 95
    max_pixels: AtLeastOne = 50_000_000  # larger images are refused from their header, before decoding (bombs)


@dataclass
class FetchConfig:
    thread_count: AtLeastOne = 32  # download threads per shard task
    timeout_s: Seconds = 10.0  # per socket operation
    deadline_s: Seconds = 60.0  # per request, body included: a server trickling bytes is cut off
    max_response_bytes: AtLeastOne = 20_000_000
    retries: AtLeastZero = 2  # of transient failures (timeouts, resets, 429, 5xx); never of 404 or a refusal
    backoff_s: SecondsOrZero = 1.0  # doubled per retry; 429/503 also honour Retry-After up to backoff_max_s
    backoff_max_s: SecondsOrZero = 30.0
    max_per_host: AtLeastOne = 16  # requests in flight per host, per shard task
    # Hosts that may resolve to loopback/private addresses: a mirror or cache you run on purpose.
    # Everything else that resolves to such an address is refused (no requests into your network).
    allowed_private_hosts: list[Text] = field(default_factory=list)
    mirror: Text = ""  # URL prefix replacing scheme+host: https://h/p -> {mirror}/h/p
    user_agent_token: Text = "pmd-pipeline"


@dataclass
class RunConfig:
    """How the build runs. Not part of the config hash: changing it never invalidates an output."""

    ray_address: Text = ""  # empty: start a local Ray instance
    num_cpus: AtLeastOne | None = None  # local Ray only; None = all cores
    max_in_flight: AtLeastZero = 0  # shard tasks in flight; 0 = twice the cluster's CPUs
    shard_retries: AtLeastZero = 3


INT8_SUFFIX = ", int8 approximation"  # appended to the codebook identity of int8 tokens (never mixed with exact ones)


@dataclass
class TokenizeConfig:
    """The dVAE token stage. Not in the config hash: each shard's sidecar records its codebook's identity instead."""

    enabled: Flag = True
    codebook: Text = ""  # HF FlavaImageCodebook folder or DALL-E encoder.pkl; empty = random codebook (seeded)
    batch_size: AtLeastZero = 0  # images per encoder call; 0 = sized for the device (1 on CPUs, 256 on GPUs)
    # auto (bf16 on GPUs with bf16, fp32 on CPUs), fp32, bf16, or int8 (CPU, ~5x fp32, approximate: the
    # agreement with fp32 is measured on held-out images of the build and recorded in every sidecar)
    precision: Literal["auto", "fp32", "bf16", "int8"] = "auto"  # dvae.PRECISIONS
    actors: AtLeastZero = 0  # 0 = one per GPU, or one CPU actor using every core
    seed: AtLeastZero = 0  # of the random codebook


@dataclass
class BuildConfig:
    out: Annotated[str, Strict(), Field(min_length=1)] = "pmd_out"
    shard_size: AtLeastOne = 1000
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
    """A checked BuildConfig from TOML data (or the saved OUT/config.json); paths resolved from base_dir."""
    raw = dict(raw)
    sources = [_source_from(name, spec, base_dir) for name, spec in _table(raw.pop("sources", {}), "sources").items()]
    filters = _filters_from(raw.pop("filters", [{"name": "caption_length"}]), "filters")
    sections = {name: _section(cls, raw.pop(name, {}), name) for name, cls in _SECTIONS.items()}
    cfg = _build(BuildConfig, raw, "", sources=sources, filters=filters, **sections)
    cfg.out = str(_resolve(cfg.out, base_dir))
    if cfg.tokenize.codebook:
        cfg.tokenize.codebook = str(_resolve(cfg.tokenize.codebook, base_dir))
    _check_filters(cfg)
    return cfg


_SECTIONS = {"image": ImageConfig, "fetch": FetchConfig, "run": RunConfig, "tokenize": TokenizeConfig}


def _source_from(name: str, spec: dict, base_dir: Path) -> SourceConfig:
    if not isinstance(spec, dict):
        raise PmdError(f"config: [sources.{name}] must be a table")
    spec = dict(spec)
    if isinstance(spec.get("metadata"), str):  # one file may be given without a list
        spec["metadata"] = [spec["metadata"]]
    if spec.get("filters") is not None:
        spec["filters"] = _filters_from(spec["filters"], f"sources.{name}.filters")
    cfg = _build(SourceConfig, spec, f"sources.{name}", name=name)
    _check_options(cfg)
    cfg.metadata = [p if p.startswith(("http://", "https://")) else str(_resolve(p, base_dir)) for p in cfg.metadata]
    cfg.images = {k: str(_resolve(v, base_dir)) for k, v in cfg.images.items()}
    cfg.options = {  # options naming files (karpathy_split_file) are paths like the others
        k: str(_resolve(v, base_dir)) if k.endswith(("_file", "_dir")) and isinstance(v, str) else v
        for k, v in cfg.options.items()
    }
    return cfg


def _check_options(cfg: SourceConfig) -> None:
    from sources import get_source  # late: the sources import this module

    get_source(cfg.name).check_options(cfg)


def _check_filters(cfg: BuildConfig) -> None:
    """Filter names and parameters are refused with the config, not when the first shard runs."""
    from filters import build_filters  # late: the filters import this module

    chains = {"[[filters]]": cfg.filters} | {f"[sources.{s.name}] filters": s.filters or [] for s in cfg.sources}
    for where, chain in chains.items():
        try:
            build_filters(chain)
        except PmdError as err:
            raise PmdError(f"config {where}: {err}") from None


def _table(value, key: str) -> dict:
    if not isinstance(value, dict):
        raise PmdError(f"config: {key} must be a table ([{key}.<name>]), not {_shown(value)}")
    return value


def _filters_from(value, key: str) -> list[FilterConfig]:
    if not isinstance(value, list):
        raise PmdError(f"config: {key} must be an array of tables ([[filters]]), not {_shown(value)}")
    return [_filter_from(spec) for spec in value]


def _filter_from(spec: dict) -> FilterConfig:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise PmdError("config: every [[filters]] entry needs a name")
    if set(spec) == {"name", "params"} and isinstance(spec["params"], dict):  # the saved (resolved) form
        return FilterConfig(name=spec["name"], params=dict(spec["params"]))
    params = {k: v for k, v in spec.items() if k != "name"}
    return FilterConfig(name=spec["name"], params=params)


def _section(cls, values: dict, name: str):
    if not isinstance(values, dict):
        raise PmdError(f"config: [{name}] must be a table")
    return _build(cls, values, name)


def _build(cls, values: dict, section: str, **extra):
    """`cls` from a TOML table: unknown keys, then every value's type and range, refused in one line."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"[{section}]" if section else "top level"
        raise PmdError(f"config {where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    return checked(cls, {**values, **extra}, section)


@functools.cache
def _adapter(cls) -> TypeAdapter:
    return TypeAdapter(cls)


def checked(kind, value, key: str):
    """`value` validated as `kind` (a dataclass or an annotated type); PmdError naming `key` otherwise."""
    adapter = _adapter(kind) if isinstance(kind, type) else TypeAdapter(kind)
    try:
        return adapter.validate_python(value)
    except ValidationError as err:
        raise PmdError(f"config: {refusal(err, key)}") from None


def refusal(err: ValidationError, key: str) -> str:
    """`key = value is not allowed: what is` for the first problem pydantic found."""
    first = err.errors(include_url=False)[0]
    path = key
    for part in first["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    why = first["msg"]
    return f"{path} = {_shown(first['input'])} is not allowed: {why[:1].lower()}{why[1:]}"


def _shown(value) -> str:
    """A value as it would be written in TOML (strings quoted, true/false), cut to one short line."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _resolve(p: str, base_dir: Path) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()
