"""Every source on its own fixture (files written here in the raw format) and on the real samples in
../shared/realdata when present (those tests skip cleanly otherwise)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from benchmarks import yfcc_naive
from filters import apply_filters, build_filters
from pmd_pipeline.config import BuildConfig, FilterConfig, SourceConfig
from pmd_pipeline.config_file import load_config
from pmd_pipeline.errors import PmdError
from pmd_pipeline.process import filter_chain
from sources import REGISTRY, get_source
from sources.base import RejectLog, candidates_frame
from sources.localized_narratives import split_sentences
from sources.wit import english_attribution
from tests.conftest import realdata


def read(name: str, metadata=(), images=None, options=None):
    """All candidate rows of a source and its reject log."""
    rejects = RejectLog()
    cfg = SourceConfig(name, metadata=[str(m) for m in metadata], images=images or {}, options=options or {})
    batches = list(get_source(name).read(cfg, rejects))
    rows = pl.concat(batches).to_dicts() if batches else []
    return rows, rejects


def decided(name: str, rows: list[dict], cfg: BuildConfig | None = None) -> pl.DataFrame:
    """The rows after the chain a build runs for the source: its own, else the config's global one (by
    default only empty captions are dropped)."""
    cfg = cfg or BuildConfig(sources=[SourceConfig(name)])
    return apply_filters(candidates_frame(rows), build_filters(filter_chain(cfg, name)))


def test_every_registered_source_has_its_table_facts():
    paired = [s for name, s in REGISTRY.items() if name not in ("imagenet", "text_corpus")]
    assert len({s.info.paper_pairs for s in paired}) >= 8  # nine sources, LN's four subsets share one figure
    for name, source in REGISTRY.items():
        assert source.info.name == name and source.info.license and source.info.raw_files


# --- SBU --------------------------------------------------------------------------------------------


def test_sbu_real_sample_parallel_lists():
    rows, rejects = read("sbu_captions", [realdata("sbu", "sbu-captions-all.head5.json")])
    doc = json.loads(realdata("sbu", "sbu-captions-all.head5.json").read_text())
    assert [r["captions"] for r in rows] == [[c] for c in doc["captions"]]  # unchanged
    assert [r["image_url"] for r in rows] == doc["image_urls"] and not rejects


def test_sbu_lists_of_different_lengths_are_refused(tmp_path):
    path = tmp_path / "sbu.json"
    path.write_text(json.dumps({"image_urls": ["http://a/1.jpg"], "user_ids": [], "captions": ["x y z"]}))
    with pytest.raises(PmdError, match="different lengths"):
        read("sbu_captions", [path])


# --- CC12M ------------------------------------------------------------------------------------------


def test_cc12m_real_sample_url_first_person_token_and_no_final_newline():
    path = realdata("cc12m", "cc12m.head5.tsv")
    rows, rejects = read("conceptual_12m", [path])
    assert len(rows) == 5 and not rejects
    assert any("<PERSON>" in r["captions"][0] for r in rows)
    assert all(r["image_url"].startswith("http") for r in rows)
    assert rows[-1]["captions"][0] == path.read_text().split("\t")[-1]  # last line read without its newline


# --- RedCaps ----------------------------------------------------------------------------------------


def test_redcaps_real_annotations_use_raw_caption():
    files = sorted(realdata("redcaps", "annotations").glob("*.json"))
    rows, rejects = read("red_caps", files)
    raw = [a for f in files for a in json.loads(f.read_text())["annotations"]]
    assert [r["captions"] for r in rows] == [[a["raw_caption"]] for a in raw] and not rejects
    assert any(a["raw_caption"] != a["caption"] for a in raw)  # the case the rule is about


def test_redcaps_with_info_block_and_a_broken_record(tmp_path):
    path = tmp_path / "pics_2019.json"
    good = {"image_id": "a1", "url": "https://i.redd.it/a1.jpg", "raw_caption": "My cat [OC]", "caption": "my cat"}
    path.write_text(json.dumps({"info": {"version": "1.0"}, "annotations": [good, {"image_id": "b"}]}))
    rows, rejects = read("red_caps", [path])
    assert [r["captions"] for r in rows] == [["My cat [OC]"]]
    assert [(r.line, r.reason) for r in rejects.rejects] == [(2, "bad_record:missing_field")]


def test_redcaps_real_two_word_captions_are_kept(tmp_path):
    """PMD's text filters are YFCC's: RedCaps keeps "vintage toys" and "gas station" (119 of the 1,000 real
    r/abandoned captions have one or two words; the old global more-than-two-words filter dropped them)."""
    template = json.loads(realdata("redcaps", "annotations", "abandoned_2017.json").read_text())["annotations"][0]
    site = json.loads(realdata("redcaps", "explore", "abandoned.json").read_text())  # [id, file, permalink, caption]
    annotations = [
        template | {"image_id": i, "url": f"https://i.redd.it/{file}", "raw_caption": text, "caption": text.lower()}
        for i, file, _, text in site
    ]
    path = tmp_path / "abandoned_2020.json"  # the release's layout: {info, annotations}
    path.write_text(json.dumps({"info": {"version": "1.0"}, "annotations": annotations}))
    rows, rejects = read("red_caps", [path])
    assert len(rows) == 1000 and not rejects
    out = {r["key"]: r for r in decided("red_caps", rows).iter_rows(named=True)}
    decisions = [(r["captions"][0], out[r["key"]]) for r in rows]
    short = [(text, row) for text, row in decisions if 0 < len(text.split()) <= 2]
    assert len(short) == 119 and {"vintage toys", "gas station", "buttons"} <= {text for text, _ in short}
    assert all(row["kept_captions"] == [text] and row["reason"] is None for text, row in short)
    dropped = [(text, row["reason"]) for text, row in decisions if row["reason"] is not None]
    assert dropped == [("", "too_few_words")]  # the one empty caption is the only drop


def test_only_yfcc_runs_the_text_filters_and_a_global_list_replaces_the_default(tmp_path):
    """Without `[[filters]]` every source but YFCC keeps every non-empty caption; a global list written in
    the config runs on the sources without a chain of their own (YFCC, VG and WIT keep theirs); a source's
    `filters` replaces its chain, YFCC's included."""
    other = ["coco", "sbu_captions", "conceptual_captions", "conceptual_12m", "red_caps", "text_corpus"]
    other += [n for n in REGISTRY if n.startswith("localized_narratives__")]
    own = ["yfcc100m", "visual_genome", "wit"]
    non_empty = [FilterConfig("caption_length", {"min_words": 1})]

    def chains(toml: str, yfcc_filters: str = "") -> dict:
        tables = "".join(f"\n[sources.{n}]\nenabled = false\n" for n in other + own)
        path = tmp_path / "c.toml"
        path.write_text(toml + tables.replace("[sources.yfcc100m]\n", f"[sources.yfcc100m]\n{yfcc_filters}"))
        cfg = load_config(path)
        return {n: filter_chain(cfg, n) for n in other + own}

    default = chains("")
    assert all(default[n] == non_empty for n in other), {n: default[n] for n in other}
    assert default["yfcc100m"] == list(get_source("yfcc100m").default_filters)
    assert default["visual_genome"] == non_empty and default["wit"] == []  # their own rules
    written = chains('[[filters]]\nname = "caption_length"\n')  # the old default, written out: still honoured
    assert all(written[n] == [FilterConfig("caption_length")] for n in other)
    assert {n: written[n] for n in own} == {n: default[n] for n in own}
    assert chains("", 'filters = [{ name = "english" }]\n')["yfcc100m"] == [FilterConfig("english")]


# --- YFCC100M ---------------------------------------------------------------------------------------


def test_yfcc_real_rows_decided_row_by_row_like_the_rule_says():
    """The 1,000 real rows: the pipeline's decision for every row equals the straightforward row-by-row
    statement of the rule (benchmarks/yfcc_naive.py): unquote_plus, strip HTML, collapse whitespace;
    description if it passes (>2 words, not date/time only, no odd characters, English), else title."""
    path = realdata("yfcc100m", "yfcc100m_1k.tsv")
    rows, rejects = read("yfcc100m", [path])
    assert len(rows) == 1000 and not rejects
    out = decided("yfcc100m", rows)
    got = {
        r["key"].removeprefix("yfcc_"): ((r["kept_captions"] or [None])[0], r["reason"])
        for r in out.iter_rows(named=True)
    }
    expected = {pid: (text, reason) for pid, text, reason in map(yfcc_naive.decide, path.open(encoding="utf-8"))}
    assert got == expected
    reasons = out["reason"].value_counts()
    counts = dict(reasons.iter_rows())
    assert counts["not_a_photo"] == 3  # the 3 videos (marker 1)
    # Rows 0-2 of the file, by hand: IMG_0520 (camera default, one word, no description) is dropped;
    # row 1's title has a date in it but is a real sentence, kept; row 2's description is HTML-decoded.
    assert got["6985418911"] == (None, "too_few_words")
    assert got["10201275523"][0] == "Images from the intersection of Parliament and Queen, 2013 10 09 (3)"
    assert got["2297552664"][0].startswith("recipe here: allrecipes.com/Recipe/Denises-Peanut-Chicken")


def test_yfcc_real_rows_tags_leave_nothing_in_their_place():
    rows, _ = read("yfcc100m", [realdata("yfcc100m", "yfcc100m_1k.tsv")])
    text = {r["key"].removeprefix("yfcc_"): r["captions"][0] for r in rows}  # the cleaned descriptions
    assert text["89467346"] == "Hyro's office at Albert St, East Melbourne. Salvation Army 1901 Printing Works"
    assert text["11512100683"] == "Follow our trip at Trekking Asia."
    assert text["2463834526"].startswith("See Julian's pictures from the day here. See Nikki's pictures here.")
    assert text["5436472501"] == "Eye-Fiからアップロードされました"  # a tag between words of a script without spaces
    assert "Estrada Vimioso<->Miranda" in text["2695492697"]  # "<->" is text, not a tag
    assert text["2695492697"].startswith("(Galerida cristata)")  # <i> inside the brackets


def test_yfcc_tag_stripping_on_real_format_rows(tmp_path):
    """Real rows with their title and description replaced, encoded as the dataset encodes them
    (quote_plus: '+' for a space, %3C for '<'; 1,997 of the sample's 2,000 text fields round-trip so)."""
    from urllib.parse import quote_plus

    template = real_yfcc_lines("89467346")["89467346"].split("\t")
    descriptions = {
        "1": 'The <a href="http://x.example/" rel="nofollow">old mill</a>, seen from the bridge!',  # before ","
        "2": "A wa<b>t</b>erfall in the <i>Black</i>Forest hills",  # inside a word / joining two words
        "3": "Tom &amp; Jerry &quot;live&quot; at the &lt;b&gt;old&lt;/b&gt; theatre",  # entities: text
        "4": "Sunset over the bay <A HREF='http://x'>(more)</A>.\nTaken <br/>from the pier",  # caps, newline
        "5": "I <3 the view when 2 < 3 > 1 here",  # no tag name after "<": text
        "6": '<a\nhref="http://x.example/">Multi line tag</a> on a long walk',  # a tag spanning a line break
    }
    lines = []
    for pid, description in descriptions.items():
        fields = list(template)
        fields[1], fields[8], fields[9] = pid, quote_plus("Some title here"), quote_plus(description)
        lines.append("\t".join(fields))
    path = tmp_path / "yfcc100m_dataset"
    path.write_text("\n".join(lines) + "\n")
    rows, rejects = read("yfcc100m", [path])
    assert not rejects
    assert {r["key"].removeprefix("yfcc_"): r["captions"][0] for r in rows} == {
        "1": "The old mill, seen from the bridge!",
        "2": "A waterfall in the BlackForest hills",
        "3": "Tom &amp; Jerry &quot;live&quot; at the &lt;b&gt;old&lt;/b&gt; theatre",
        "4": "Sunset over the bay (more). Taken from the pier",
        "5": "I <3 the view when 2 < 3 > 1 here",
        "6": "Multi line tag on a long walk",
    }
    assert [yfcc_naive.clean(quote_plus(d)) for d in descriptions.values()] == [r["captions"][0] for r in rows]


def test_yfcc_rules_on_a_fixture(tmp_path):
    from benchmarks.yfcc_naive import decide
    from pmd_pipeline.embedded.make_bundle import yfcc_row

    lines = [
        yfcc_row(1, "Camera", "<b>A long walk</b> on the beach\n\n at sunset with the dog"),
        yfcc_row(2, "A trip to the old harbour with my family", "2013 10 09"),
        yfcc_row(3, "A trip to the old harbour with my family", "une belle journée au bord de la mer avec des amis"),
        yfcc_row(4, "A video of the harbour at night", "A long walk on the beach at sunset with the dog", marker=1),
        yfcc_row(5, "12:30:01", "___ ||| ___ {{ }} ### ___"),
    ]
    path = tmp_path / "yfcc100m_dataset"
    path.write_text("\n".join(lines) + "\nbroken\tline\n")
    rows, rejects = read("yfcc100m", [path])
    assert [(r.line, r.reason) for r in rejects.rejects] == [(6, "wrong_column_count")]
    out = decided("yfcc100m", rows)
    assert [((r["kept_captions"] or [None])[0], r["reason"]) for r in out.iter_rows(named=True)] == [
        ("A long walk on the beach at sunset with the dog", None),  # HTML stripped, + decoded
        ("A trip to the old harbour with my family", None),  # date-only description: title instead
        ("A trip to the old harbour with my family", None),  # French description: title instead
        (None, "not_a_photo"),
        (None, "too_few_words"),  # odd-character description, then the title's own reason (one word)
    ]
    assert [decide(line)[1:] for line in lines] == [
        ((r["kept_captions"] or [None])[0], r["reason"]) for r in out.iter_rows(named=True)
    ]


def real_yfcc_lines(*photo_ids: str) -> dict[str, str]:
    """Lines of the real 1,000-row sample, by photo id (field 2)."""
    lines = realdata("yfcc100m", "yfcc100m_1k.tsv").read_text(encoding="utf-8").splitlines()
    return {line.split("\t")[1]: line for line in lines if line.split("\t")[1] in photo_ids}


def test_yfcc_real_one_word_description_falls_back_to_the_title(tmp_path):
    """Only YFCC runs PMD's text filters, with its description-then-title fallback, under the build's
    default config: a one-word description (a bare link's text) gives way to the title."""
    line = real_yfcc_lines("7151485591")["7151485591"]
    path = tmp_path / "yfcc100m_dataset"
    path.write_text(line + "\n")
    rows, _ = read("yfcc100m", [path])
    assert rows[0]["captions"] == ["www.budapestdailyphoto.com", "Liberty bridge, Budapest"]
    row = decided("yfcc100m", rows).row(0, named=True)
    assert (row["kept_captions"], row["kept_fields"], row["reason"]) == (["Liberty bridge, Budapest"], ["title"], None)
    assert row["caption_reasons"] == ["too_few_words", None]


# --- WIT --------------------------------------------------------------------------------------------


def test_wit_real_samples_english_only_quotes_newlines_and_a_truncated_file():
    rows, rejects = read("wit", [realdata("wit", "wit_v1.train.all-00000-of-00010.head2.tsv")])
    assert [r["drop_reason"] for r in rows] == ["not_english", "not_english"]  # fr, nl; quoted newlines parsed
    rows, rejects = read("wit", [realdata("wit", "tfds_dummy_test-00000-of-00005.tsv")])
    assert rows == [] and [(r.line, r.reason) for r in rejects.rejects] == [(2, "wrong_column_count")]
    rows, _ = read("wit", [realdata("wit", "tfds_wit_kaggle_dummy_train-00000-of-00005.tsv")])  # 18 columns
    assert [(r["captions"], r["drop_reason"]) for r in rows] == [([], "not_english"), (["Downtown Deer Park"], None)]


def test_wit_caption_fallbacks_and_ascii_strip(tmp_path):
    from pmd_pipeline.embedded.make_bundle import WIT_COLUMNS

    def row(ref="", attribution="", alt="", language="en", n=0):
        values = dict.fromkeys(WIT_COLUMNS, "")
        values |= {"language": language, "image_url": f"https://u.example/{n}.jpg", "page_url": "p"}
        values |= {"caption_reference_description": ref, "caption_attribution_description": attribution}
        values |= {"caption_alt_text_description": alt, "context_page_description": "line one\nline two"}
        return [values[c] for c in WIT_COLUMNS]

    import csv

    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(WIT_COLUMNS)
    writer.writerow(row(ref="Eiffel Tower", n=1))  # 2 words suffice for the reference
    writer.writerow(row(ref="Tower", attribution="English: The tower at night. Français : la tour", n=2))
    writer.writerow(row(attribution="English: too short. Deutsch: zu kurz", alt="A café in Paris at noon", n=3))
    writer.writerow(row(alt="two words", n=4))
    writer.writerow(row(ref="東京 タワー", n=5))
    path = tmp_path / "wit_v1.train.all-00000-of-00010.tsv.gz"
    path.write_bytes(gzip.compress(buffer.getvalue().encode()))
    rows, rejects = read("wit", [path])
    assert not rejects
    assert [(r["captions"], r["caption_fields"], r["drop_reason"]) for r in rows] == [
        (["Eiffel Tower"], ["caption_reference_description"], None),
        (["The tower at night."], ["caption_attribution_description"], None),
        (["A caf in Paris at noon"], ["caption_alt_text_description"], None),  # non-ASCII stripped
        ([], [], "no_caption_passes"),
        ([], [], "empty_after_ascii_strip"),
    ]
    assert english_attribution("english: Tulips in Holland. Nederlands: Tulpen") == "Tulips in Holland."


def test_wit_unknown_header_is_a_clear_error(tmp_path):
    path = tmp_path / "wit.tsv"
    path.write_text("lang\turl\nen\thttp://x\n")
    with pytest.raises(PmdError, match="WIT header"):
        read("wit", [path])


# --- Visual Genome ----------------------------------------------------------------------------------

VG_IMAGES = {"VG_100K": "/vg/images.zip", "VG_100K_2": "/vg/images2.zip"}
NO_CONTAMINATION = {"contamination_check": False}


def test_visual_genome_real_v12_and_v10_layouts_agree():
    images = realdata("visual_genome", "image_data.json")
    new, _ = read(
        "visual_genome", [realdata("visual_genome", "region_descriptions.json"), images], VG_IMAGES, NO_CONTAMINATION
    )
    old, _ = read(
        "visual_genome",
        [realdata("visual_genome", "region_descriptions_v1.0.json"), images],
        VG_IMAGES,
        NO_CONTAMINATION,
    )
    # The two dumps are different releases (1,278 vs 1,288 regions); the same images, the same first region.
    assert sum(len(r["captions"]) for r in new) == 1278 and sum(len(r["captions"]) for r in old) == 1288
    assert {r["key"].split("_")[1] for r in new} == {r["key"].split("_")[1] for r in old} == {"1", "2", "3", "4", "5"}
    assert (old[0]["key"], old[0]["captions"]) == (new[0]["key"], new[0]["captions"])
    first = new[0]
    assert first["crop_box"] == [421, 57, 503, 196]  # x, y, x+width, y+height
    assert first["image_path"] == "/vg/images2.zip::VG_100K_2/1.jpg"
    assert all(c == c.strip() and c for r in new for c in r["captions"])  # phrases stripped (13 had \n)


def test_visual_genome_first100_merges_identical_boxes():
    rows, rejects = read(
        "visual_genome",
        [realdata("visual_genome", "region_descriptions.first100.json"), realdata("visual_genome", "image_data.json")],
        VG_IMAGES,
        NO_CONTAMINATION,
    )
    assert sum(len(r["captions"]) for r in rows) == 7278 and len(rows) == 7275 and not rejects


def test_visual_genome_contamination_rule_and_a_truncated_file(tmp_path):
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": [{"cocoid": 42, "split": "val"}, {"cocoid": 7, "split": "train"}]}))
    image_data = tmp_path / "image_data.json"
    image_data.write_text(
        json.dumps(
            [
                {"image_id": i, "url": f"https://x/VG_100K/{i}.jpg", "coco_id": c}
                for i, c in ((1, 42), (2, 7), (3, None))
            ]
        )
    )
    regions = [
        {
            "regions": [{"region_id": i, "image_id": i, "x": 0, "y": 0, "width": 5, "height": 5, "phrase": "a b"}],
            "id": i,
        }
        for i in (1, 2, 3)
    ]
    region_file = tmp_path / "region_descriptions.json"
    region_file.write_text(json.dumps(regions)[:-30])  # truncated inside the third image
    rows, rejects = read("visual_genome", [region_file, image_data], VG_IMAGES, {"karpathy_split_file": str(karpathy)})
    assert [r["drop_reason"] for r in rows] == ["karpathy_contamination", None]
    assert [(r.line, r.reason) for r in rejects.rejects] == [(3, "truncated_json")]
    with pytest.raises(PmdError, match="karpathy_split_file"):
        read("visual_genome", [region_file, image_data], VG_IMAGES)


# --- Localized Narratives ---------------------------------------------------------------------------


def test_localized_narratives_sentences_images_and_contamination(tmp_path):
    assert split_sentences("In this image I can see a dog. .  There is grass.") == [
        "In this image I can see a dog.",
        "There is grass.",
    ]
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": [{"cocoid": 139, "split": "test"}]}))
    path = tmp_path / "coco_val_localized_narratives.jsonl"
    narratives = [
        {"dataset_id": "mscoco_val2017", "image_id": "139", "annotator_id": 1, "caption": "A man. A dog."},
        {"dataset_id": "mscoco_val2017", "image_id": "285", "annotator_id": 2, "caption": "A bear in grass."},
    ]  # no traces: real rows lack them sometimes
    path.write_text("\n".join(json.dumps(n) for n in narratives) + "\n{not json\n")
    rows, rejects = read(
        "localized_narratives__coco", [path], {"val2017": "/coco/val2017.zip"}, {"karpathy_split_file": str(karpathy)}
    )
    assert [(r["captions"], r["drop_reason"]) for r in rows] == [
        (["A man.", "A dog."], "karpathy_contamination"),
        (["A bear in grass."], None),
    ]
    assert rows[1]["image_path"] == "/coco/val2017.zip::val2017/000000000285.jpg"
    assert [(r.line, r.reason) for r in rejects.rejects] == [(3, "json_error")]
    oi = tmp_path / "open_images_validation_localized_narratives.jsonl"
    oi.write_text(json.dumps({**narratives[1], "image_id": "0a1b2c", "dataset_id": "open_images"}) + "\n")
    rows, _ = read("localized_narratives__openimages", [oi])
    assert rows[0]["image_url"] == "https://s3.amazonaws.com/open-images-dataset/validation/0a1b2c.jpg"
    with pytest.raises(PmdError, match="flickr30k"):
        read("localized_narratives__flickr30k", [oi])


# --- COCO (official format, real) -------------------------------------------------------------------


def test_coco_official_captions_real_files_and_orphan_annotations():
    rows, rejects = read("coco", [realdata("coco", "captions_val2017.json")], {"val2017": "/coco/val2017.zip"})
    assert len(rows) == 79 and sum(len(r["captions"]) for r in rows) == 395 and not rejects
    rows, rejects = read(
        "coco", [realdata("coco", "captions_val2014.json_samples.json")], {"val2014": "/c/val2014.zip"}
    )
    assert sum(len(r["captions"]) for r in rows) == 4  # only 4 of 100 annotations point at an image here
    assert {r.reason for r in rejects.rejects} == {"annotation_without_image"} and len(rejects) == 96


# --- unimodal ---------------------------------------------------------------------------------------


def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "JPEG")
    return out.getvalue()


def test_imagenet_folder_and_tar_give_the_same_image_only_rows(tmp_path):
    folder = tmp_path / "train"
    for wnid in ("n01440764", "n02102040"):
        (folder / wnid).mkdir(parents=True)
        for i in range(2):
            (folder / wnid / f"{wnid}_{i}.JPEG").write_bytes(_jpeg())
    (folder / "README.txt").write_text("not an image")
    rows, _ = read("imagenet", images={"root": str(folder)})
    assert [json.loads(r["meta"])["label"] for r in rows] == ["n01440764"] * 2 + ["n02102040"] * 2
    assert {r["caption_mode"] for r in rows} == {"image_only"} and all(r["captions"] == [] for r in rows)
    tar_path = tmp_path / "train.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(folder, arcname=".")
    from_tar, _ = read("imagenet", images={"root": str(tar_path)})
    assert [r["key"] for r in from_tar] == [r["key"] for r in rows]
    assert from_tar[0]["image_path"].startswith(f"{tar_path}::")


def test_text_corpus_passages_from_txt_and_jsonl(tmp_path):
    txt = tmp_path / "books.txt"
    txt.write_text(("word " * 250).strip() + "\n\n" + "a short paragraph here\n")
    jsonl = tmp_path / "news.jsonl"
    jsonl.write_text('{"text": "one two three four"}\n{"title": "no text"}\n')
    rows, rejects = read("text_corpus", [txt, jsonl], options={"max_words": 100})
    assert [len(r["captions"][0].split()) for r in rows] == [100, 100, 50, 4, 4]
    assert all(r["image_url"] is None and r["image_path"] is None for r in rows)
    assert [(Path(r.file).name, r.line, r.reason) for r in rejects.rejects] == [("news.jsonl", 2, "missing_field")]
