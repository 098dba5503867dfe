"""The build configuration's dataclasses, every field typed and ranged for pydantic to check.

`config_file.py` reads a TOML file into them; the sources and filters check their own options with
`checked`. This module imports nothing of the project but its error type, so everyone can use it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Field, Strict, TypeAdapter, ValidationError

from pmd_pipeline.errors import PmdError

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


def non_empty_filters() -> list[FilterConfig]:
    """The global chain when the config names none: drop empty captions only (at least one word).

    PMD's text filters (English, more than two words) are YFCC's rule, and YFCC keeps them as its own
    chain (sources/yfcc100m.py); every other source keeps every non-empty caption it yields unless the
    config adds filters, globally (`[[filters]]`) or per source (`[sources.NAME] filters`)."""
    return [FilterConfig("caption_length", {"min_words": 1})]


@dataclass
class SourceConfig:
    name: Text
    metadata: list[Text] = field(default_factory=list)  # raw metadata files or http(s) URLs, read in order
    images: dict[Text, Text] = field(default_factory=dict)  # image archives by role (e.g. train2014), paths or URLs
    options: dict[Text, Any] = field(default_factory=dict)  # source-specific rules, declared by the source
    enabled: Flag = True
    limit: AtLeastOne | None = None  # stop after this many candidate rows (for samples and smoke runs)
    filters: list[FilterConfig] | None = None  # None: the source's own default chain, else the global one
    # What a downloaded file must hash to, where its publisher gives one: {URL or file name: "sha256:<hex>" or
    # "md5:<hex>"} (pmd_pipeline.fetch.downloads). Checked when downloaded; not part of the output's hash.
    checksums: dict[Text, Text] = field(default_factory=dict)


@dataclass
class ImageConfig:
    size: Annotated[int, Strict(), Field(ge=1, le=8192)] = 224  # a larger square is >200 MB decoded
    resize_mode: Literal["center_crop", "keep_ratio", "keep_ratio_largest", "border", "no"] = "center_crop"
    encode_format: Literal["jpg"] = "jpg"  # shards store KEY.jpg (shards/layout.py IMAGE_EXT): JPEG only
    encode_quality: Annotated[int, Strict(), Field(ge=0, le=100)] = 95
    max_pixels: AtLeastOne = 50_000_000  # larger images are refused from their header, before decoding (bombs)
    # Thinner images (long side / short side) are refused from their header too: 100,000 x 10 is a 3 KB PNG
    # that scaling its short side to `size` turns into gigabytes. Real panoramas and banners stay under ~10.
    max_aspect_ratio: Annotated[float, Strict(), Field(ge=1, allow_inf_nan=False)] = 20.0


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
    # Entries are host:port (that port only) or a bare host (ports 80 and 443 only).
    allowed_private_hosts: list[Text] = field(default_factory=list)
    mirror: Text = ""  # URL prefix replacing scheme+host: https://h/p -> {mirror}/h/p
    user_agent_token: Text = "pmd-pipeline"
    # Files a config names by URL (metadata, image archives) downloaded at once, one Ray task each, before
    # the plan stage (pmd_pipeline.fetch.downloads): resumed with HTTP Range, verified, once per OUT.
    download_parallelism: AtLeastOne = 4


@dataclass
class RunConfig:
    """How the build runs. Not part of the config hash: changing it never invalidates an output."""

    ray_address: Text = ""  # empty: start a local Ray instance
    num_cpus: AtLeastOne | None = None  # local Ray only; None = all cores
    max_in_flight: AtLeastZero = 0  # shard tasks in flight; 0 = twice the cluster's CPUs
    shard_retries: AtLeastZero = 3
    # stderr not a terminal (CI, a cluster job's log): one plain progress line this often; 0 = none
    progress_every_s: AtLeastZero = 30


@dataclass
class TokenizeConfig:
    """The dVAE token stage. Not in the config hash: each shard's sidecar records its codebook's identity instead."""

    enabled: Flag = True
    codebook: Text = ""  # HF FlavaImageCodebook folder or DALL-E encoder.pkl; empty = random codebook (seeded)
    batch_size: AtLeastZero = 0  # images per encoder call; 0 = sized for the device (1 on CPUs, 256 on GPUs)
    # auto (bf16 on GPUs with bf16, fp32 on CPUs), fp32, bf16, or int8 (CPU, ~5x fp32, approximate: the
    # agreement with fp32 is measured on held-out images of the build and recorded in every sidecar)
    precision: Literal["auto", "fp32", "bf16", "int8"] = "auto"  # dvae.PRECISIONS
    actors: AtLeastZero = 0  # 0 = one per GPU, or one single-threaded CPU actor per core
    seed: AtLeastZero = 0  # of the random codebook


@dataclass
class BuildConfig:
    out: Annotated[str, Strict(), Field(min_length=1)] = "pmd_out"
    shard_size: AtLeastOne = 1000
    sources: list[SourceConfig] = field(default_factory=list)
    # Sources without a chain of their own (all but yfcc100m, visual_genome, wit, imagenet) run this one.
    filters: list[FilterConfig] = field(default_factory=non_empty_filters)
    image: ImageConfig = field(default_factory=ImageConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)

    def enabled_sources(self) -> list[SourceConfig]:
        return [s for s in self.sources if s.enabled]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
    return f"{path} = {shown_value(first['input'])} is not allowed: {why[:1].lower()}{why[1:]}"


def shown_value(value) -> str:
    """A value as it would be written in TOML (strings quoted, true/false), cut to one short line."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
