"""Sample keys: one rule (sources.base.make_key) for every source, a safe name, stable across runs, and
distinct for distinct ids, so no row can be merged into another or written twice under one name."""

from __future__ import annotations

import json
import random
from pathlib import Path

import polars as pl
import pytest

from pmd_pipeline.config import BuildConfig, SourceConfig
from pmd_pipeline.embedded import BUNDLE
from pmd_pipeline.plan import plan_source
from shards.layout import ShardPaths, check_safe_name
from sources import get_source
from sources.base import RejectLog, make_key
from sources.yfcc100m import COLUMNS

UNSAFE = "./?#:%& \\\t\x00\x7f~"
UNICODE = "éü漢字🙂\u200b\ufeff\u202e\ud800"  # \ud800: a lone surrogate, as json.loads can return


def random_ids(rng: random.Random, n: int) -> set[str]:
    """Ids of every shape: short and long, safe and not, unicode, and families that differ only in unsafe chars."""
    alphabet = "abcXYZ019_-" + UNSAFE + UNICODE
    ids = {
        "".join(rng.choice(alphabet) for _ in range(rng.choice([1, 2, 5, 40, 79, 80, 81, 119, 120, 121, 300])))
        for _ in range(n)
    }
    for base in rng.sample(sorted(ids), 200):
        ids |= {base + c for c in UNSAFE + "-"} | {c + base for c in UNSAFE + "-"}  # abc.1, abc-1, abc?1 ...
    ids |= {"a" * 120 + c for c in "abc.-"} | {"x" * 500 + str(i) for i in range(20)}  # same first 120/500 chars
    # A hashed key's id part given back as an id: the two forms of the rule must never meet.
    ids |= {make_key("p", i).removeprefix("p_") for i in rng.sample(sorted(ids), 300)}
    return ids | {"", "-", "--", "a--b", "abc.1", "abc-1", "x/y", "x?y"}


def test_distinct_ids_give_distinct_safe_keys():
    ids = random_ids(random.Random(0), 5000)
    keys = {make_key("src", i): i for i in ids}
    assert len(keys) == len(ids)  # no two ids share a key: none of their rows can vanish into another
    for key in keys:
        assert check_safe_name(key) == key and len(key) <= len("src_") + 120


def test_keys_are_stable_and_safe_short_ids_keep_the_keys_they_had():
    # The keys of today's builds: numeric COCO/YFCC ids, URL hashes, VG boxes, LN and RedCaps ids.
    today = [
        ("coco", 391895),
        ("yfcc", "5000000013"),
        ("cc3m", "0f8e9c1a2b3c4d5e6f70"),
        ("vg", "1_0_0_800_600"),
        ("ln_openimages", "0003a1b2c3d4e5f6"),
        ("redcaps", "aba000x"),
    ]
    for prefix, original in today:
        assert make_key(prefix, original) == f"{prefix}_{original}"
    assert make_key("src", "abc.1") == "src_abc-1--0b400dd5ba2de4ceadf5"  # hashes are sha1, not Python's hash()
    assert make_key("src", "abc.1") != make_key("src", "abc-1") != make_key("src", "abc?1")


def yfcc_line(index: int, photo_id: str, template: list[str]) -> str:
    fields = list(template)
    fields[COLUMNS.index("photo_id")] = photo_id
    fields[COLUMNS.index("download_url")] = f"http://farm0.staticflickr.com/0/{index}_ab.jpg"
    return "\t".join(fields) + "\n"


def test_yfcc_keys_are_the_shared_rule_over_its_id_column(tmp_path):
    """YFCC used its own vectorised rule (no length limit): now it maps make_key over its id column."""
    template = (BUNDLE / "yfcc100m" / "yfcc100m_dataset").read_text().splitlines()[1].split("\t")
    carried = [i for i in random_ids(random.Random(1), 300) if not set(i) & set("\t\n\r\x00\ud800")]
    path = tmp_path / "yfcc100m_dataset"
    path.write_text("".join(yfcc_line(n, i, template) for n, i in enumerate(sorted(carried))), encoding="utf-8")
    rejects = RejectLog()
    rows = pl.concat(get_source("yfcc100m").read(SourceConfig("yfcc100m", metadata=[str(path)]), rejects))
    assert not rejects and rows.height == len(carried)
    assert rows["key"].to_list() == [make_key("yfcc", i) for i in sorted(carried)]
    assert rows["key"].n_unique() == rows.height  # no two samples under one name in a tar


def test_colliding_ids_are_not_merged_in_the_plan(tmp_path):
    """abc.1 and abc-1 used to become one RedCaps sample: the second image's URL was gone."""
    annotations = [
        {"image_id": image_id, "url": f"https://i.redd.it/{n}.jpg", "raw_caption": f"a red bus number {n}"}
        for n, image_id in enumerate(["abc.1", "abc-1", "abc?1", "x/y", "x?y"])
    ]
    path = tmp_path / "abandoned_2017.json"
    path.write_text(json.dumps({"annotations": annotations}))
    cfg = BuildConfig(out=str(tmp_path / "out"), sources=[])
    plan_source(cfg, SourceConfig("red_caps", metadata=[str(path)]))
    planned = pl.read_parquet(ShardPaths(Path(cfg.out), "red_caps", 0).plan)
    assert sorted(planned["image_url"]) == sorted(a["url"] for a in annotations)
    assert planned["key"].n_unique() == len(annotations)


@pytest.mark.parametrize("names", [("a/b_c.JPEG", "a_b/c.JPEG"), ("x.JPEG", "x.png")])
def test_imagenet_files_whose_names_used_to_meet_keep_distinct_keys(tmp_path, names):
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"not decoded here")
    rows = pl.concat(get_source("imagenet").read(SourceConfig("imagenet", images={"root": str(tmp_path)}), RejectLog()))
    assert rows["key"].n_unique() == 2
