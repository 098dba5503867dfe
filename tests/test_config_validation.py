"""The config is checked when it is read: every value's TOML type and range, every source option and filter
parameter, each refusal one line naming the key, the value and what is allowed (exit 2, before Ray)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pmd_pipeline.cli import app
from pmd_pipeline.config import (
    BuildConfig,
    FetchConfig,
    ImageConfig,
    RunConfig,
    SourceConfig,
    TokenizeConfig,
)
from pmd_pipeline.config_file import load_config
from pmd_pipeline.embedded import default_config, materialize, served_locally
from pmd_pipeline.errors import PmdError
from pmd_pipeline.output import saved_config
from sources import REGISTRY, get_source
from sources.base import RejectLog

SOURCE = '[sources.conceptual_captions]\nmetadata = ["cc.tsv"]\n'


def refusal(tmp_path: Path, toml: str) -> str:
    path = tmp_path / "build.toml"
    path.write_text(toml)
    with pytest.raises(PmdError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message, message
    return message


# (TOML, the key and value the message must name, what it must say is allowed): the cases and more.
BAD = [
    ('shard_size = "10"\n' + SOURCE, 'shard_size = "10"', "valid integer"),
    ("shard_size = 2.5\n" + SOURCE, "shard_size = 2.5", "valid integer"),
    ("shard_size = true\n" + SOURCE, "shard_size = true", "valid integer"),
    ("shard_size = 0\n" + SOURCE, "shard_size = 0", "greater than or equal to 1"),
    (SOURCE + 'limit = "10"\n', 'sources.conceptual_captions.limit = "10"', "valid integer"),
    (SOURCE + "limit = 0\n", "sources.conceptual_captions.limit = 0", "greater than or equal to 1"),
    ("[sources.coco]\nmetadata = 5\n", "sources.coco.metadata = 5", "valid list"),
    ('[sources.coco]\nmetadata = ["a.json", 5]\n', "sources.coco.metadata[1] = 5", "valid string"),
    (SOURCE + 'enabled = "false"\n', 'sources.conceptual_captions.enabled = "false"', "valid boolean"),
    (SOURCE + "[fetch]\nretries = -1\n", "fetch.retries = -1", "greater than or equal to 0"),
    (SOURCE + '[fetch]\ntimeout_s = "3"\n', 'fetch.timeout_s = "3"', "valid number"),
    (SOURCE + "[fetch]\ntimeout_s = 0\n", "fetch.timeout_s = 0", "greater than 0"),
    (SOURCE + "[fetch]\ndeadline_s = inf\n", "fetch.deadline_s = Infinity", "finite number"),
    (SOURCE + "[fetch]\nthread_count = 0\n", "fetch.thread_count = 0", "greater than or equal to 1"),
    (SOURCE + "[image]\nsize = 0\n", "image.size = 0", "greater than or equal to 1"),
    (SOURCE + '[image]\nresize_mode = "crop"\n', 'image.resize_mode = "crop"', "'center_crop'"),
    (SOURCE + "[image]\nencode_quality = 101\n", "image.encode_quality = 101", "less than or equal to 100"),
    (SOURCE + "[run]\nnum_cpus = 0\n", "run.num_cpus = 0", "greater than or equal to 1"),
    (SOURCE + '[tokenize]\nprecision = "fp16"\n', 'tokenize.precision = "fp16"', "'int8'"),
    (SOURCE + '[fetch]\nallowed_private_hosts = ["a", 1]\n', "fetch.allowed_private_hosts[1] = 1", "valid string"),
    ("metadata = 5\n" + SOURCE, "unknown key(s) metadata", "valid keys:"),
    ("sources = 5\n", "sources must be a table", "not 5"),
    ("filters = 5\n" + SOURCE, "filters must be an array of tables", "not 5"),
]


@pytest.mark.parametrize(("toml", "named", "allowed"), BAD, ids=[b[1] for b in BAD])
def test_a_wrong_value_is_refused_in_one_line_naming_key_value_and_what_is_allowed(tmp_path, toml, named, allowed):
    message = refusal(tmp_path, toml)
    assert named in message and allowed in message, message


def wrong_toml_value(default) -> str:
    """A value of another TOML type than the field's default (what a typo in the config gives)."""
    if isinstance(default, bool):
        return '"true"'
    if isinstance(default, int | float):
        return f'"{default}"'
    if isinstance(default, str):
        return "5"
    return '"x"'  # lists, tables and None-able ints


SECTIONS = {"": BuildConfig, "image": ImageConfig, "fetch": FetchConfig, "run": RunConfig, "tokenize": TokenizeConfig}
EVERY_KEY = [
    (section, f.name, wrong_toml_value(getattr(cls(), f.name)))
    for section, cls in SECTIONS.items()
    for f in dataclasses.fields(cls)
    if f.name not in SECTIONS and f.name not in ("sources", "filters")
]


@pytest.mark.parametrize(("section", "key", "value"), EVERY_KEY, ids=[f"{s}.{k}" for s, k, _ in EVERY_KEY])
def test_every_key_of_every_section_has_its_type_checked(tmp_path, section, key, value):
    line = f"{key} = {value}\n"
    toml = line + SOURCE if not section else f"{SOURCE}[{section}]\n{line}"
    message = refusal(tmp_path, toml)
    assert f"{section + '.' if section else ''}{key} = {value}" in message and "is not allowed" in message, message


SOURCE_KEYS = {
    "metadata": "5",
    "images": "5",
    "options": "5",
    "enabled": '"yes"',
    "limit": '"x"',
    "filters": "5",
    "checksums": "5",
}


def test_every_key_of_a_source_table_has_its_type_checked(tmp_path):
    assert set(SOURCE_KEYS) == {f.name for f in dataclasses.fields(SourceConfig)} - {"name"}
    for key, value in SOURCE_KEYS.items():
        message = refusal(tmp_path, f"[sources.conceptual_captions]\n{key} = {value}\n")
        assert f"sources.conceptual_captions.{key} = {value} is not allowed" in message or (
            key == "filters" and "sources.conceptual_captions.filters must be an array of tables" in message
        ), message


def test_right_values_are_kept_and_a_float_may_be_written_as_an_int(tmp_path):
    path = tmp_path / "build.toml"
    path.write_text(f"shard_size = 7\n{SOURCE}limit = 3\nenabled = false\n[fetch]\ntimeout_s = 3\nretries = 0\n")
    cfg = load_config(path)
    assert cfg.shard_size == 7 and cfg.fetch.timeout_s == 3.0 and isinstance(cfg.fetch.timeout_s, float)
    assert cfg.fetch.retries == 0 and cfg.sources[0].limit == 3 and cfg.sources[0].enabled is False


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ('[{name = "caption_length", min_words = "3"}]', 'min_words = "3" is not allowed'),
        ('[{name = "caption_length", min_wrds = 3}]', "unknown parameter(s) min_wrds; valid parameters: max_words"),
        ('[{name = "english", min_probability = 1.5}]', "min_probability = 1.5 is not allowed"),
        ('[{name = "no_datetime_only", strict = true}]', "unknown parameter(s) strict; valid parameters: none"),
    ],
)
def test_filter_parameters_are_checked_with_the_config(tmp_path, filters, message):
    assert message in refusal(tmp_path, f"filters = {filters}\n{SOURCE}")
    assert message in refusal(tmp_path, f"{SOURCE}filters = {filters}\n")  # a source's own chain too


def test_an_unknown_source_option_is_refused_with_the_valid_names(tmp_path):
    message = refusal(tmp_path, '[sources.text_corpus]\nmetadata = ["t.txt"]\noptions = { max_wrods = 5 }\n')
    assert "unknown option(s) max_wrods; valid options: max_words, text_field" in message
    message = refusal(tmp_path, f"{SOURCE}options = {{ split = 'train' }}\n")
    assert "unknown option(s) split; valid options: none" in message


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ('[sources.text_corpus]\noptions = { max_words = "300" }\n', 'options.max_words = "300"'),
        ("[sources.text_corpus]\noptions = { max_words = 0 }\n", "options.max_words = 0"),
        ('[sources.coco]\noptions = { splits = "train" }\n', 'options.splits = "train"'),
        ('[sources.visual_genome]\noptions = { contamination_check = "no" }\n', 'contamination_check = "no"'),
        ('[sources.localized_narratives__openimages]\noptions = { split = "val" }\n', 'options.split = "val"'),
    ],
)
def test_a_source_option_has_its_type_checked(tmp_path, toml, named):
    message = refusal(tmp_path, toml)
    assert named in message and "is not allowed" in message, message


class RecordingOptions(dict):
    """Options that remember every name a source reader asks for."""

    def __init__(self):
        super().__init__()
        self.asked: set[str] = set()

    def get(self, name, default=None):
        self.asked.add(name)
        return super().get(name, default)

    def __getitem__(self, name):
        self.asked.add(name)
        return super().__getitem__(name)

    def __contains__(self, name):
        self.asked.add(name)
        return super().__contains__(name)


def bundle_config(source_cfg: SourceConfig, root: Path) -> SourceConfig:
    """The embedded default's source on its files as materialized in `root` (OUT/_embedded): the mirror's
    published packaging read in place, without a server."""
    return served_locally(source_cfg, materialize(str(root.parent)))


@pytest.fixture(scope="module")
def bundle_out(tmp_path_factory) -> Path:
    """One materialized embedded sample for the module: the sources only read it."""
    out = tmp_path_factory.mktemp("bundle")
    materialize(str(out))
    return out


@pytest.mark.parametrize("name", [s.name for s in default_config("/x").sources if s.metadata])
def test_every_option_a_source_reads_is_declared(bundle_out, name):
    root = bundle_out / "_embedded"
    source_cfg = bundle_config(next(s for s in default_config(str(bundle_out)).sources if s.name == name), root)
    options = RecordingOptions()
    options.update(source_cfg.options)
    rows = sum(b.height for b in get_source(name).read(dataclasses.replace(source_cfg, options=options), RejectLog()))
    assert rows > 0
    assert options.asked <= set(REGISTRY[name].options), options.asked - set(REGISTRY[name].options)


def test_the_saved_config_is_read_back_through_the_same_checks(tmp_path):
    cfg = default_config(str(tmp_path / "out"))
    cfg.sources[0].limit, cfg.sources[1].filters = 5, [cfg.filters[0]]
    out = Path(cfg.out)
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"config": cfg.to_dict()}))
    assert saved_config(out) == cfg  # every source's options, limits and filters survive the round trip
    damaged = cfg.to_dict() | {"shard_size": "64"}
    (out / "config.json").write_text(json.dumps({"config": damaged}))
    with pytest.raises(PmdError, match='shard_size = "64" is not allowed'):
        saved_config(out)


def test_the_cli_exits_2_with_one_line_before_ray_starts(tmp_path, monkeypatch):
    import pmd_pipeline.cli

    monkeypatch.setattr(pmd_pipeline.cli, "start_ray", lambda cfg: pytest.fail("Ray was started"))
    path = tmp_path / "build.toml"
    path.write_text(f"{SOURCE}[fetch]\nretries = -1\n")
    result = CliRunner().invoke(app, ["build", "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert " ".join(result.output.split()).startswith("error: config: fetch.retries = -1 is not allowed")


def test_the_precisions_allowed_are_the_tokenizers():
    import typing

    from pmd_pipeline.tokens.encoder import PRECISIONS

    assert typing.get_args(typing.get_type_hints(TokenizeConfig)["precision"]) == PRECISIONS
