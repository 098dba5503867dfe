"""Read a build config: one TOML file (data only, never executed) into checked dataclasses, paths resolved.

Every value is checked for its TOML type and range when the file is read (pydantic validates the
dataclasses' annotated fields), each source's options by the source and each filter chain by the filters,
so a wrong value stops the run with one line before any work starts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tomllib

from filters import build_filters
from pmd_pipeline.archive_members import SEPARATOR, split_member
from pmd_pipeline.config import (
    BuildConfig,
    FetchConfig,
    FilterConfig,
    ImageConfig,
    RunConfig,
    SourceConfig,
    TokenizeConfig,
    checked,
    non_empty_filters,
    shown_value,
)
from pmd_pipeline.errors import PmdError
from pmd_pipeline.fetch.downloads import check_checksums
from sources import get_source


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
    filters = _filters_from(raw.pop("filters"), "filters") if "filters" in raw else non_empty_filters()
    sections = {name: _section(cls, raw.pop(name, {}), name) for name, cls in _SECTIONS.items()}
    cfg = _build(BuildConfig, raw, "", sources=sources, filters=filters, **sections)
    cfg.out = _resolve(cfg.out, base_dir)
    if cfg.tokenize.codebook:
        cfg.tokenize.codebook = _resolve(cfg.tokenize.codebook, base_dir)
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
    cfg.metadata = [_resolve(p, base_dir) for p in cfg.metadata]
    cfg.images = {k: _resolve(v, base_dir) for k, v in cfg.images.items()}
    cfg.options = {  # options naming files (karpathy_split_file) are paths like the others
        k: _resolve(v, base_dir) if k.endswith(("_file", "_dir")) and isinstance(v, str) else v
        for k, v in cfg.options.items()
    }
    return cfg


def _check_options(cfg: SourceConfig) -> None:
    get_source(cfg.name).check_options(cfg)
    check_checksums(cfg)


def _check_filters(cfg: BuildConfig) -> None:
    """Filter names and parameters are refused with the config, not when the first shard runs."""
    chains = {"[[filters]]": cfg.filters} | {f"[sources.{s.name}] filters": s.filters or [] for s in cfg.sources}
    for where, chain in chains.items():
        try:
            build_filters(chain)
        except PmdError as err:
            raise PmdError(f"config {where}: {err}") from None


def _table(value, key: str) -> dict:
    if not isinstance(value, dict):
        raise PmdError(f"config: {key} must be a table ([{key}.<name>]), not {shown_value(value)}")
    return value


def _filters_from(value, key: str) -> list[FilterConfig]:
    if not isinstance(value, list):
        raise PmdError(f"config: {key} must be an array of tables ([[filters]]), not {shown_value(value)}")
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


def _resolve(p: str, base_dir: Path) -> str:
    """A local path made absolute from the config's folder; a URL (s3://, gs://, https://, ...) as written.

    In `archive::member` only the archive is a path: the member is a name inside it, kept as written."""
    if parts := split_member(p):
        return f"{_resolve(parts[0], base_dir)}{SEPARATOR}{parts[1]}"
    if "://" in p and not p.startswith("file://"):
        return p
    path = Path(p.removeprefix("file://")).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())
