"""Metadata read in place inside its published packaging: the Karpathy zip, Visual Genome's zipped jsons,
SBU's tar.gz, RedCaps' zip of annotation files (a glob member), gzipped WIT; local or in a bucket.

Each source plans the same rows from its archive as from the files unpacked by hand; a missing archive, a
missing member and a glob that matches nothing stop the build with one line before any work; a damaged
member is one reject after the records before it (metadata) or one image's `archive_error` (images).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import tarfile
import tracemalloc
import zipfile
from pathlib import Path

import polars as pl
import pytest
from PIL import Image
from typer.testing import CliRunner

from pmd_pipeline.archive_members import MemberPath, metadata_files, open_member
from pmd_pipeline.build import validate
from pmd_pipeline.cli import app
from pmd_pipeline.config import BuildConfig, SourceConfig
from pmd_pipeline.config_file import config_from_dict
from pmd_pipeline.embedded import default_config
from pmd_pipeline.embedded.packaging import (
    BUNDLE,
    PUBLISHED_METADATA,
    PUBLISHED_OPTIONS,
    tar_gz_bytes,
    write_published,
    zip_bytes,
)
from pmd_pipeline.errors import PmdError
from pmd_pipeline.fetch.archives import ArchiveReader
from pmd_pipeline.fetch.images import read_local
from pmd_pipeline.plan import plan_source
from shards.layout import REJECTS_FILE, plan_folder
from sources import get_source
from sources.base import RejectLog
from sources.rawio import iter_json_array
from tests.conftest import realdata

# --- helpers ----------------------------------------------------------------------------------------


def unpack(published: Path, folder: Path) -> dict[str, list[Path]]:
    """Each published entry unpacked by hand, as users had to: entry -> the plain files it stands for."""
    plain = {}
    for entries in PUBLISHED_METADATA.values():
        for entry in entries:
            archive, _, member = entry.partition("::")
            target = folder / archive.replace(".", "_")
            if not member:  # a gzipped file: gunzipped
                target.mkdir(parents=True, exist_ok=True)
                plain[entry] = [target / archive.removesuffix(".gz")]
                plain[entry][0].write_bytes(gzip.decompress((published / archive).read_bytes()))
                continue
            if not target.exists():
                if zipfile.is_zipfile(published / archive):
                    zipfile.ZipFile(published / archive).extractall(target)
                else:
                    with tarfile.open(published / archive) as tar:
                        tar.extractall(target, filter="data")
            plain[entry] = sorted(target.glob(member))
    return plain


def source_config(tmp_path: Path, name: str) -> SourceConfig:
    """The embedded default's source; its image archives (URLs there) as local names: a plan never opens them."""
    source = next(s for s in default_config(str(tmp_path / "embedded")).sources if s.name == name)
    return dataclasses.replace(source, images={role: str(tmp_path / f"{role}.zip") for role in source.images})


def in_place_and_by_hand(tmp_path: Path, name: str) -> tuple[SourceConfig, SourceConfig]:
    """The embedded default's source read from its published files in place, and from them unpacked."""
    packed = write_published(tmp_path / "published")
    plain = unpack(tmp_path / "published", tmp_path / "unpacked")
    base = source_config(tmp_path, name)
    options = PUBLISHED_OPTIONS.get(name, {})
    in_place = dataclasses.replace(
        base,
        metadata=packed[name],
        options={**base.options, **{k: f"{tmp_path}/published/{v}" for k, v in options.items()}},
    )
    by_hand = dataclasses.replace(
        base,
        metadata=[str(p) for entry in PUBLISHED_METADATA[name] for p in plain[entry]],
        options={**base.options, **{k: str(plain[v][0]) for k, v in options.items()}},
    )
    return in_place, by_hand


def planned(out: Path, source_cfg: SourceConfig) -> tuple[list[dict], list[dict]]:
    """The plan's rows, in order, and the reject log, of one source planned into `out` (no Ray)."""
    plan_source(BuildConfig(out=str(out), sources=[]), source_cfg)
    rows = [
        r for p in sorted(plan_folder(out, source_cfg.name).glob("*.parquet")) for r in pl.read_parquet(p).to_dicts()
    ]
    rejects = [json.loads(line) for line in (out / source_cfg.name / REJECTS_FILE).read_text().splitlines()]
    return rows, rejects


def read(source_cfg: SourceConfig) -> tuple[list[dict], list[tuple]]:
    rejects = RejectLog()
    batches = list(get_source(source_cfg.name).read(source_cfg, rejects))
    rows = pl.concat(batches).to_dicts() if batches else []
    return rows, [(r.file, r.line, r.reason) for r in rejects.rejects]


def file_name_of(reject_file: str) -> str:
    return Path(reject_file.rpartition("::")[2]).name


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# --- every packaged source, in place vs unpacked -------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PUBLISHED_METADATA))
def test_a_source_plans_the_same_rows_from_its_published_archive_as_from_the_unpacked_files(tmp_path, name):
    in_place, by_hand = in_place_and_by_hand(tmp_path, name)
    rows, rejects = planned(tmp_path / "out-in-place", in_place)
    expected_rows, expected_rejects = planned(tmp_path / "out-by-hand", by_hand)
    if name == "wit":  # the gzipped file vs its gunzipped copy: only the file name in `meta` differs
        assert {json.loads(r["meta"])["file"] for r in rows} == {Path(in_place.metadata[0]).name}
        rows, expected_rows = ([{**r, "meta": _without_file(r["meta"])} for r in x] for x in (rows, expected_rows))
    assert rows and rows == expected_rows
    assert [(file_name_of(r["file"]), r["line"], r["reason"], r["raw"]) for r in rejects] == [
        (Path(r["file"]).name, r["line"], r["reason"], r["raw"]) for r in expected_rejects
    ]
    archived = [e for e in in_place.metadata if "::" in e]
    for reject in rejects:  # a member is named the way the config names it, with the record's line
        assert not archived or any(reject["file"].startswith(e.split("::")[0] + "::") for e in archived), reject


def _without_file(meta: str) -> str:
    record = json.loads(meta)
    record.pop("file")
    return json.dumps(record)


def test_redcaps_glob_is_every_matching_member_in_name_order_each_a_file_of_its_own(tmp_path):
    packed = write_published(tmp_path)
    files = metadata_files(packed["red_caps"][0], "source red_caps")
    members = [f.member for f in files]
    assert members == sorted(members) and len(members) == 6 and all(m.startswith("annotations/") for m in members)
    assert all(
        isinstance(f, MemberPath) and str(f) == f"{tmp_path}/redcaps_v1.0_annotations.zip::{f.member}" for f in files
    )
    zipped = zip_bytes({"annotations/b_2019.json": b"{}", "annotations/a_2017.json": b"{}", "README.txt": b"x"})
    (tmp_path / "r.zip").write_bytes(zipped)
    assert [f.member for f in metadata_files(f"{tmp_path}/r.zip::annotations/*.json", "s")] == [
        "annotations/a_2017.json",
        "annotations/b_2019.json",
    ]
    assert [f.member for f in metadata_files(f"{tmp_path}/r.zip::*", "s")] == ["README.txt"]  # no folder crossing


def test_the_published_files_are_the_same_bytes_every_time(tmp_path):
    first, second = write_published(tmp_path / "a"), write_published(tmp_path / "b")
    assert first.keys() == second.keys()
    for name in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


# --- refused before any work ----------------------------------------------------------------------------


def test_a_missing_archive_member_or_glob_match_is_one_line_before_any_work(tmp_path):
    packed = write_published(tmp_path)
    zip_path, tgz_path = f"{tmp_path}/caption_datasets.zip", f"{tmp_path}/sbu-captions-all.tar.gz"
    (tmp_path / "not-an-archive.zip").write_bytes(b"just some text\n" * 100)
    cases = {
        f"{tmp_path}/gone.zip::dataset_coco.json": ("metadata archive not found", "gone.zip"),
        f"{zip_path}::dataset_cocoa.json": ("metadata file not found", "dataset_cocoa.json", "dataset_coco.json"),
        f"{tmp_path}/redcaps_v1.0_annotations.zip::annots/*.json": ("no member of", "annots/*.json"),
        f"{tgz_path}::sbu/sbu-captions-all.json": ("did you mean", f"{tgz_path}::sbu-captions-all.json"),
        f"{tmp_path}/not-an-archive.zip::x.json": ("not a readable zip or tar archive", "not-an-archive.zip"),
    }
    for entry, fragments in cases.items():
        cfg = BuildConfig(out=str(tmp_path / "out"), sources=[SourceConfig("coco", metadata=[entry])])
        with pytest.raises(PmdError) as err:
            validate(cfg)
        message = one_line(err)
        assert message.startswith("source coco: ") and all(f in message for f in fragments), message
    assert not (tmp_path / "out").exists()
    cfg = BuildConfig(out=str(tmp_path / "out"), sources=[SourceConfig("red_caps", metadata=packed["red_caps"])])
    validate(cfg)  # the real ones pass


def test_pmd_build_names_the_missing_member_and_stops(tmp_path):
    write_published(tmp_path)
    config = tmp_path / "build.toml"
    config.write_text(
        f'out = "{tmp_path}/out"\n[sources.sbu_captions]\nmetadata = ["sbu-captions-all.tar.gz::sbu.json"]\n'
    )
    result = CliRunner().invoke(app, ["build", "--config", str(config)])
    message = result.output
    assert result.exit_code == 2 and message.startswith("error:") and message.count("\n") == 1, result.output
    assert f"{tmp_path}/sbu-captions-all.tar.gz::sbu.json" in message and "has no member sbu.json" in message
    assert not (tmp_path / "out" / "_plan").exists()


def test_a_config_resolves_the_archive_of_a_member_and_keeps_the_member_as_written(tmp_path):
    cfg = config_from_dict(
        {
            "sources": {
                "red_caps": {"metadata": "data/redcaps_v1.0_annotations.zip::annotations/*.json"},
                "visual_genome": {
                    "metadata": [
                        "vg/region_descriptions.json.zip::region_descriptions.json",
                        "s3://b/image_data.json.zip::image_data.json",
                    ],
                    "options": {"karpathy_split_file": "../coco/caption_datasets.zip::dataset_coco.json"},
                },
            }
        },
        base_dir=tmp_path / "configs",
    )
    red_caps, vg = cfg.sources
    assert red_caps.metadata == [f"{tmp_path}/configs/data/redcaps_v1.0_annotations.zip::annotations/*.json"]
    assert vg.metadata == [
        f"{tmp_path}/configs/vg/region_descriptions.json.zip::region_descriptions.json",
        "s3://b/image_data.json.zip::image_data.json",
    ]
    assert vg.options["karpathy_split_file"] == f"{tmp_path}/coco/caption_datasets.zip::dataset_coco.json"


# --- damaged members --------------------------------------------------------------------------------------


def _flip_case_after(data: bytes, marker: bytes, start: int = 0) -> bytes:
    """The archive with one letter's case changed just after `marker`: still valid JSON, a wrong CRC."""
    at = data.index(marker, start) + len(marker)
    while not chr(data[at]).isalpha():
        at += 1
    return data[:at] + bytes([data[at] ^ 0x20]) + data[at + 1 :]


def test_a_zip_member_with_a_bad_crc_is_one_reject_and_the_other_members_are_read(tmp_path):
    members = {p.name: p.read_bytes() for p in sorted((BUNDLE / "red_caps/annotations").glob("*.json"))}
    first, second = sorted(members)
    zipped = zip_bytes({f"annotations/{n}": b for n, b in members.items()}, stored=True)
    start = zipped.index(members[second][:40])
    damaged = tmp_path / "redcaps_v1.0_annotations.zip"
    damaged.write_bytes(_flip_case_after(zipped, b'"raw_caption": "', start))
    source_cfg = SourceConfig("red_caps", metadata=[f"{damaged}::annotations/*.json"])
    rows, rejects = read(source_cfg)
    good, good_rejects = read(SourceConfig("red_caps", metadata=[str(BUNDLE / "red_caps/annotations" / first)]))
    assert rows == good and rejects[: len(good_rejects)] == [
        (f"{damaged}::annotations/{first}", *r[1:]) for r in good_rejects
    ]
    assert rejects[len(good_rejects) :] == [(f"{damaged}::annotations/{second}", 0, "corrupt_compressed_stream")]


def many_regions(images: int) -> bytes:
    """A region_descriptions.json of `images` images (the bundle's, repeated under new ids): about 1 KB each."""
    elements = json.loads((BUNDLE / "visual_genome/region_descriptions.json").read_text())
    return json.dumps([{**elements[i % len(elements)], "id": i} for i in range(images)]).encode()


def test_a_damaged_deflate_stream_keeps_the_regions_before_it_and_is_one_reject(tmp_path):
    regions = many_regions(2000)
    zipped = zip_bytes({"region_descriptions.json": regions})
    info = zipfile.ZipFile(io.BytesIO(zipped)).getinfo("region_descriptions.json")
    middle = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    damaged = tmp_path / "region_descriptions.json.zip"
    damaged.write_bytes(zipped[:middle] + b"\x00" * 64 + zipped[middle + 64 :])
    rejects = RejectLog()
    entry = f"{damaged}::region_descriptions.json"
    got = [i for i, _ in iter_json_array(metadata_files(entry, "s")[0], "visual_genome", rejects)]
    total = len(json.loads(regions))
    assert 0 < len(got) < total and got == list(range(1, len(got) + 1)), "the elements before the damage, in order"
    assert [(r.file, r.line, r.reason) for r in rejects.rejects] == [(entry, len(got) + 1, "corrupt_compressed_stream")]


def test_a_truncated_tar_gz_is_one_reject_naming_the_member_and_the_source_fails_alone_with_one_line(tmp_path):
    published = tar_gz_bytes({"sbu-captions-all.json": (BUNDLE / "sbu_captions/sbu-captions-all.json").read_bytes()})
    damaged = tmp_path / "sbu-captions-all.tar.gz"
    damaged.write_bytes(published[: int(len(published) * 0.6)])
    entry = f"{damaged}::sbu-captions-all.json"
    rows, rejects = read(SourceConfig("sbu_captions", metadata=[entry]))
    assert rows == [] and rejects == [(entry, 0, "corrupt_compressed_stream")]
    with pytest.raises(PmdError) as err:
        plan_source(BuildConfig(out=str(tmp_path / "out")), SourceConfig("sbu_captions", metadata=[entry]))
    assert "corrupt_compressed_stream x1" in one_line(err)


def test_a_damaged_lookup_table_member_fails_the_source_with_one_line(tmp_path):
    split = (BUNDLE / "coco/dataset_coco.json").read_bytes()
    damaged = tmp_path / "caption_datasets.zip"
    damaged.write_bytes(_flip_case_after(zip_bytes({"dataset_coco.json": split}, stored=True), b'"raw": "'))
    vg = source_config(tmp_path, "visual_genome")
    vg = dataclasses.replace(
        vg,
        metadata=[str(BUNDLE / "visual_genome" / n) for n in ("region_descriptions.json", "image_data.json")],
        options={"karpathy_split_file": f"{damaged}::dataset_coco.json"},
    )
    with pytest.raises(PmdError) as err:
        read(vg)  # without the split file the contamination rule cannot be kept: no rows at all
    assert f"{damaged}::dataset_coco.json is damaged (BadZipFile" in one_line(err)


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64 + seed, 48), (seed * 40 % 255, 90, 160)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_a_damaged_image_member_is_that_rows_archive_error_not_the_shards(tmp_path):
    images = {f"train2014/{i}.jpg": jpeg(i) for i in range(3)}
    zipped = zip_bytes(images, stored=True)
    at = zipped.index(images["train2014/1.jpg"]) + 400
    (tmp_path / "train2014.zip").write_bytes(zipped[:at] + bytes([zipped[at] ^ 0xFF]) + zipped[at + 1 :])
    deflated = zip_bytes(images)
    info = zipfile.ZipFile(io.BytesIO(deflated)).getinfo("train2014/2.jpg")
    at = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    (tmp_path / "deflated.zip").write_bytes(deflated[:at] + b"\x00" * 32 + deflated[at + 32 :])
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    paths = [f"{tmp_path}/train2014.zip::train2014/{i}.jpg" for i in range(3)]
    paths += [f"{tmp_path}/deflated.zip::train2014/2.jpg", f"{tmp_path}/broken.zip::train2014/0.jpg"]
    paths += [f"{tmp_path}/train2014.zip::train2014/9.jpg"]
    rows = pl.DataFrame(
        {"key": [f"k{i}" for i in range(len(paths))], "image_path": paths, "crop_box": [None] * len(paths)},
        schema={"key": pl.Utf8, "image_path": pl.Utf8, "crop_box": pl.List(pl.Int64)},
    )
    got = read_local(rows, BuildConfig())
    assert [f.reason for f in got.values()] == [
        None,
        "archive_error",
        None,
        "archive_error",
        "archive_error",
        "image_missing",
    ]
    assert "damaged member train2014/1.jpg" in got["k1"].error and "BadZipFile" in got["k1"].error
    reader = ArchiveReader()
    with pytest.raises(ValueError, match="damaged member train2014/2.jpg"):
        reader.read(paths[3])
    reader.close()


# --- how members are read: streamed, by range, their bytes as a plain file's ----------------------------------


@pytest.mark.parametrize("packaging", ["zip", "tar.gz"])
def test_a_member_is_streamed_not_read_whole(tmp_path, packaging):
    element = json.dumps({"regions": [{"phrase": "a red dog near the quiet street " * 30}], "id": 1})
    document = ("[" + ",".join([element] * 40_000) + "]").encode()  # 40 MB unpacked, small packed
    archive = tmp_path / f"regions.json.{packaging}"
    pack = zip_bytes if packaging == "zip" else tar_gz_bytes
    archive.write_bytes(pack({"region_descriptions.json": document}))
    assert archive.stat().st_size < len(document) // 20
    path = metadata_files(f"{archive}::region_descriptions.json", "s")[0]
    del document
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_json_array(path, "visual_genome", RejectLog()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 40_000 and peak < 16 << 20, f"peak {peak / 2**20:.1f} MB for a 40 MB member"


def test_a_zip_in_a_bucket_is_read_in_place_by_range(tmp_path, monkeypatch):
    s3fs = pytest.importorskip("s3fs")
    from tests.s3_server import s3_server

    padding = bytes(range(256)) * (48 << 12)  # 12 MB ahead of the member: a whole download would read it
    split = (BUNDLE / "coco/dataset_coco.json").read_bytes()
    zipped = zip_bytes({"dataset_flickr30k.json": padding, "dataset_coco.json": split}, stored=True)
    fetched = []
    real_fetch = s3fs.core.S3File._fetch_range

    def counted(self, start, end):
        data = real_fetch(self, start, end)
        fetched.append(len(data))
        return data

    with s3_server(buckets=("bucket",)):
        import boto3

        boto3.client("s3").put_object(Bucket="bucket", Key="coco/caption_datasets.zip", Body=zipped)
        coco = source_config(tmp_path, "coco")
        monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counted)
        in_bucket = read(
            dataclasses.replace(coco, metadata=["s3://bucket/coco/caption_datasets.zip::dataset_coco.json"])
        )
        with pytest.raises(PmdError, match="has no member dataset_cocoa.json"):
            read(dataclasses.replace(coco, metadata=["s3://bucket/coco/caption_datasets.zip::dataset_cocoa.json"]))
        with pytest.raises(PmdError, match="metadata archive not found"):
            read(dataclasses.replace(coco, metadata=["s3://bucket/coco/gone.zip::dataset_coco.json"]))
    local = read(dataclasses.replace(coco, metadata=[str(BUNDLE / "coco/dataset_coco.json")]))
    assert in_bucket[0] == local[0] and in_bucket[0]
    assert 0 < sum(fetched) < len(padding), f"{sum(fetched)} bytes fetched of a {len(zipped)}-byte zip"


def test_a_member_with_a_bom_and_crlf_or_gzipped_inside_the_zip_reads_as_the_plain_file(tmp_path):
    redcaps = BUNDLE / "red_caps/annotations/abandoned_2017.json"
    wit = BUNDLE / "wit/wit_v1.train.all-00000-of-00010.tsv.gz"
    (tmp_path / "redcaps.zip").write_bytes(
        zip_bytes({"annotations/abandoned_2017.json": b"\xef\xbb\xbf" + redcaps.read_bytes().replace(b"\n", b"\r\n")})
    )
    (tmp_path / "dummy_data.zip").write_bytes(zip_bytes({f"dummy_data/{wit.name}": wit.read_bytes()}))
    for name, entry, plain in [
        ("red_caps", f"{tmp_path}/redcaps.zip::annotations/abandoned_2017.json", redcaps),
        ("wit", f"{tmp_path}/dummy_data.zip::dummy_data/{wit.name}", wit),
    ]:
        rows, rejects = read(SourceConfig(name, metadata=[entry]))
        expected, expected_rejects = read(SourceConfig(name, metadata=[str(plain)]))
        assert rows and rows == expected, name
        assert [(file_name_of(f), *r) for f, *r in rejects] == [(Path(f).name, *r) for f, *r in expected_rejects]


def test_tar_names_with_a_leading_dot_slash_are_found_by_their_plain_name(tmp_path):
    sbu = (BUNDLE / "sbu_captions/sbu-captions-all.json").read_bytes()
    (tmp_path / "sbu-captions-all.tar.gz").write_bytes(tar_gz_bytes({"sbu-captions-all.json": sbu}, prefix="./"))
    rows, _ = read(
        SourceConfig("sbu_captions", metadata=[f"{tmp_path}/sbu-captions-all.tar.gz::sbu-captions-all.json"])
    )
    expected, _ = read(SourceConfig("sbu_captions", metadata=[str(BUNDLE / "sbu_captions/sbu-captions-all.json")]))
    assert rows and rows == expected
    with open_member(f"{tmp_path}/sbu-captions-all.tar.gz", "./sbu-captions-all.json") as f:
        assert f.read() == sbu


# --- the real samples in their real packaging ------------------------------------------------------------------


def test_real_redcaps_annotations_in_their_zip_read_as_the_files(tmp_path):
    folder = realdata("redcaps", "annotations")
    files = sorted(folder.glob("*.json"))
    members = {f"annotations/{p.name}": p.read_bytes() for p in files}
    members |= {"annotations/pics_2020.json": b'{"annotations": []}'}  # as most of the real zip's members are
    (tmp_path / "redcaps_v1.0_annotations.zip").write_bytes(zip_bytes(members, folders=("annotations/",)))
    rows, rejects = read(
        SourceConfig("red_caps", metadata=[f"{tmp_path}/redcaps_v1.0_annotations.zip::annotations/*.json"])
    )
    expected, expected_rejects = read(SourceConfig("red_caps", metadata=[str(p) for p in files]))
    assert len(rows) == len(files) and rows == expected and not rejects and not expected_rejects


def test_real_visual_genome_jsons_in_their_zips_read_as_the_files(tmp_path):
    regions, images = (
        realdata("visual_genome", "region_descriptions.first100.json"),
        realdata("visual_genome", "image_data.json"),
    )
    (tmp_path / "region_descriptions.json.zip").write_bytes(
        zip_bytes({"region_descriptions.json": regions.read_bytes()})
    )
    (tmp_path / "image_data.json.zip").write_bytes(zip_bytes({"image_data.json": images.read_bytes()}))
    vg = dataclasses.replace(
        source_config(tmp_path, "visual_genome"),
        images={"VG_100K": "images.zip", "VG_100K_2": "images2.zip"},
        options={"contamination_check": False},
    )
    in_place = dataclasses.replace(
        vg,
        metadata=[
            f"{tmp_path}/region_descriptions.json.zip::region_descriptions.json",
            f"{tmp_path}/image_data.json.zip::image_data.json",
        ],
    )
    rows, rejects = read(in_place)
    expected, expected_rejects = read(dataclasses.replace(vg, metadata=[str(regions), str(images)]))
    assert rows and rows == expected
    assert [(file_name_of(f), *r) for f, *r in rejects] == [(Path(f).name, *r) for f, *r in expected_rejects]


def test_real_sbu_json_in_its_tarball_reads_as_the_file(tmp_path):
    sample = realdata("sbu", "sbu-captions-all.head5.json")
    (tmp_path / "sbu-captions-all.tar.gz").write_bytes(tar_gz_bytes({"sbu-captions-all.json": sample.read_bytes()}))
    rows, rejects = read(
        SourceConfig("sbu_captions", metadata=[f"{tmp_path}/sbu-captions-all.tar.gz::sbu-captions-all.json"])
    )
    expected, _ = read(SourceConfig("sbu_captions", metadata=[str(sample)]))
    assert len(rows) == 5 and rows == expected and not rejects
