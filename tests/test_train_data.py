"""Preflight checks and the streaming loader on fixture shards in the built format."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pmd_pipeline.errors import PmdError
from pmd_pipeline.train.config import DataConfig, load_train_config
from pmd_pipeline.train.data import TaskStream, make_loader, task_stream
from pmd_pipeline.train.preflight import preflight
from pmd_pipeline.train.tokenizer import prepare_tokenizer
from tests.train_fixtures import make_pmd, make_shards, make_tagged_shards, write_shard


@pytest.fixture(scope="module")
def pmd(tmp_path_factory):
    root = make_pmd(tmp_path_factory.mktemp("pmd") / "out", per_shard=12, shards=2)
    report = preflight(DataConfig(shards=str(root)))
    tok = prepare_tokenizer("", root.parent / "run", report.tars["pairs"] + report.tars["text"], 200)
    return root, report, str(tok)


def test_preflight_finds_every_task_and_the_codebook(pmd):
    _, report, _ = pmd
    assert report.samples == {"pairs": 48, "image": 24, "text": 24}
    assert report.codebook == "random, seed 0"
    assert report.mix == {"pairs": 0.7, "image": 0.15, "text": 0.15}


def test_missing_build_says_run_build_pmd(tmp_path):
    with pytest.raises(PmdError, match="just build-pmd"):
        preflight(DataConfig(shards=str(tmp_path / "pmd_out")))


def test_shards_without_tokens_stop_or_are_counted(tmp_path):
    make_shards(tmp_path, "pairs", "cc3m", shards=2, per_shard=4)
    make_shards(tmp_path, "pairs", "coco", shards=1, per_shard=4, tokens=False)
    with pytest.raises(PmdError, match="no dVAE tokens.*tokenize"):
        preflight(DataConfig(shards=str(tmp_path)))
    report = preflight(DataConfig(shards=str(tmp_path), skip_untokenized=True))
    assert report.skipped == {"no_tokens": 1} and report.samples["pairs"] == 8


def test_tokens_from_another_codebook_are_refused(tmp_path):
    make_shards(tmp_path, "pairs", "cc3m", per_shard=4)
    make_shards(tmp_path, "image", "imagenet", per_shard=4, codebook="sha256:abc")
    with pytest.raises(PmdError, match="2 different codebooks"):
        preflight(DataConfig(shards=str(tmp_path)))
    single = make_shards(tmp_path / "single", "pairs", "cc3m", per_shard=4).parent
    with pytest.raises(PmdError, match="expects 'sha256:fff'"):
        preflight(DataConfig(shards=str(single), codebook="sha256:fff"))


def test_empty_sources_drop_their_task_with_a_note(tmp_path):
    make_shards(tmp_path, "pairs", "cc3m", per_shard=4)
    report = preflight(DataConfig(shards=str(tmp_path)))
    assert report.mix == {"pairs": 0.7, "image": 0.0, "text": 0.0}
    assert any("'image' has no samples" in note for note in report.notes)


def test_pair_batches_hold_tokens_masks_and_negatives_at_the_configured_rate(pmd):
    _, report, tok = pmd
    stream = TaskStream("pairs", report.tars["pairs"], tok, 8, 24, 0, 0, 1, shuffle_buffer=16, itm_negative_rate=0.5)
    batches = _take(stream, 6)
    for batch in batches:
        assert batch["pixel_values"].shape == (8, 3, 224, 224)
        assert batch["bool_masked_pos"].sum(1).tolist() == [75] * 8
        assert batch["mim_labels"].shape == (8, 196) and int(batch["mim_labels"].max()) < 8192
        assert batch["input_ids"].shape == batch["mlm_labels"].shape == (8, 24)
        assert (batch["mlm_labels"] != -100).any(1).all()
    itm = np.concatenate([b["itm_labels"].numpy() for b in batches])
    assert 0.3 < (itm == 0).mean() < 0.7


def test_resumed_stream_continues_where_the_first_left_off(pmd):
    _, report, tok = pmd
    args = ("image", report.tars["image"], tok, 4, 24, 0, 0, 1)
    whole = _take(TaskStream(*args), 7, workers=2)  # spans an epoch boundary (24 samples / 4 = 6 batches)
    resumed = _take(TaskStream(*args, skip_batches=3), 4, workers=2)
    for a, b in zip(whole[3:], resumed, strict=True):
        assert (a["pixel_values"] == b["pixel_values"]).all()
        assert (a["bool_masked_pos"] == b["bool_masked_pos"]).all()


def test_corrupt_samples_are_counted_and_replaced(tmp_path, pmd):
    _, _, tok = pmd
    good = {"__key__": "k0", "jpg": _jpeg(), "dvae.npy": _npy(np.zeros((14, 14), np.uint16)), "json": b"{}"}
    samples = [dict(good, __key__=f"k{i}", **{"dvae.npy": _npy(np.full((14, 14), i, np.uint16))}) for i in range(6)]
    samples[1]["jpg"] = b"not a jpeg"
    samples[2]["dvae.npy"] = _npy(np.full((14, 14), 9000, np.uint16))
    samples[3]["jpg"] = _jpeg(size=100)
    del samples[4]["dvae.npy"]
    write_shard(tmp_path / "00000", samples, "image")
    tars = [str(tmp_path / "00000.tar")]
    reasons = {"decode_error", "bad_tokens", "wrong_image_size", "no_tokens"}
    # A window of 6 (the epoch): bad ones are replaced by the window's next good ones; a window of one batch
    # (no shuffle) has no spare outside the batch: a good sample of the batch itself stands in.
    for shuffle in (6, 0):
        failures = Counter()
        for batch in _take(TaskStream("image", tars, tok, 3, 24, 0, 0, 1, shuffle_buffer=shuffle), 2):  # an epoch
            assert batch["pixel_values"].shape[0] == 3 and set(_ids(batch)) <= {0, 5}
            failures.update(batch["failures"])
        assert set(failures) == reasons, shuffle


def test_fast_tokenizer_path_equals_the_hugging_face_call(pmd):
    from pmd_pipeline.train.data import _Tokenizer

    _, _, tok = pmd
    texts = ["a red dog", "", "A BLUE car on the old tree " * 9, "café naïve 東京 [MASK] [SEP] x", "  spaced   out  "]
    for max_length in (8, 24):
        tokenizer = _Tokenizer(tok, max_length)
        assert tokenizer.backend is not None
        ids, attention = tokenizer.encode(texts)
        ref_ids, ref_attention = tokenizer.reference(texts)
        assert ids.dtype == attention.dtype == np.int64 and ids.shape == (len(texts), max_length)
        assert (ids == ref_ids).all() and (attention == ref_attention).all()


def test_packed_batches_unpack_to_the_same_tensors(pmd):
    import torch

    from pmd_pipeline.train.data import PackedBatch

    rng = np.random.default_rng(0)
    hwc = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(3)]
    arrays = {"mask": rng.random((3, 196)) < 0.4, "ids": rng.integers(-100, 9000, (3, 7)), "one": np.ones(3, np.int64)}
    for shared in (False, True):
        batch = PackedBatch.build(arrays, [p.transpose(2, 0, 1) for p in hwc], {"failures": {"x": 1}}, shared).unpack()
        expected = torch.from_numpy(np.stack([p.transpose(2, 0, 1) for p in hwc]))
        assert batch["pixel_values"].stride() == expected.stride()  # channels-last memory, as np.stack gave
        assert torch.equal(batch["pixel_values"], expected) and batch["failures"] == {"x": 1}
        for key, array in arrays.items():
            expected = torch.from_numpy(array)
            assert batch[key].dtype == expected.dtype and torch.equal(batch[key], expected)


def _ids(batch) -> list[int]:
    """The tagged fixtures' sample ids: every dVAE token of a sample is its id."""
    return batch["mim_labels"][:, 0].tolist()


def _take(stream, n, workers=0):
    loader = make_loader(stream, workers)
    return [next(loader) for _ in range(n)]


def _jpeg(size=224) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_fixture_sidecar_follows_the_contract(pmd):
    root, _, _ = pmd
    sidecar = json.loads((root / "cc3m" / "00000_dvae.json").read_text())
    assert len(sidecar["code_counts"]) == 8192 and sidecar["codebook_random"] is True


def test_trained_vocabulary_is_the_same_on_every_run(pmd):
    """The stock trainer numbers its `##c` pieces in hash order and breaks merge ties by those numbers:
    on these captions eight trainings gave eight different vocabularies (tokenizers#1794)."""
    from transformers import AutoTokenizer

    from pmd_pipeline.train.tokenizer import _texts, train_wordpiece

    root, report, tok = pmd
    texts = list(_texts(report.tars["pairs"] + report.tars["text"]))
    vocabularies = [train_wordpiece(texts, 200).get_vocab() for _ in range(6)]
    assert all(vocabulary == vocabularies[0] for vocabulary in vocabularies)
    saved = AutoTokenizer.from_pretrained(tok)  # what prepare_tokenizer saved with the run
    assert saved.get_vocab() == vocabularies[0]
    assert saved.all_special_tokens == ["[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]"]
    ids = saved("A red red cat")["input_ids"]
    assert ids[0] == saved.cls_token_id and ids[-1] == saved.sep_token_id and saved.unk_token_id not in ids
    assert saved.tokenize("A red red cat") == ["a", "red", "red", "cat"]


def test_other_ranks_use_rank_0s_vocabulary_or_say_the_run_folder_is_not_shared(pmd, tmp_path):
    from pmd_pipeline.train.tokenizer import rank0_tokenizer

    root, _, tok = pmd
    assert rank0_tokenizer("", root.parent / "run") == root.parent / "run" / "tokenizer" == Path(tok)
    with pytest.raises(PmdError, match="storage every node sees"):
        rank0_tokenizer("", tmp_path / "run")  # another machine, where rank 0's folder is not mounted
    assert rank0_tokenizer(tok, tmp_path / "run") == Path(tok)  # a configured folder is used as it is


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    """96 pairs: region crops (8 per image), a multi-caption source, and a plain one; shards of uneven size."""
    root = tmp_path_factory.mktemp("tagged") / "out"
    made = make_tagged_shards(root, "vg", [24, 16], 0, crops=8)
    made |= make_tagged_shards(root, "coco", [20, 12], 40, captions=4)
    made |= make_tagged_shards(root, "cc", [24], 72)
    report = preflight(DataConfig(shards=str(root)))
    texts = [t for _, _, _, captions in made.values() for t in captions]
    tok = prepare_tokenizer("", root.parent / "run", report.tars["pairs"], 300)
    assert report.samples["pairs"] == 96 and len(texts) == 40 + 32 * 10 // 4 + 24
    return report, str(tok), made


def _pairs(tagged, batch=8, shuffle=32, lanes=4, rank=0, world=1, skip=0, rate=0.0) -> TaskStream:
    report, tok, _ = tagged
    return TaskStream(
        "pairs", report.tars["pairs"], tok, batch, 32, 0, rank, world, skip_batches=skip,
        counts=report.counts["pairs"], shuffle_buffer=shuffle, lanes=lanes, itm_negative_rate=rate,
    )  # fmt: skip


def _texts(batch, tok) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in batch["input_ids"].tolist()]


def test_every_caption_is_trained_on_over_as_many_visits_as_it_has(tagged):
    report, tok, made = tagged
    batches = _take(_pairs(tagged), 4 * 12)  # four epochs of 96 samples
    seen = Counter()
    for batch in batches:
        for sample_id, text in zip(_ids(batch), _texts(batch, tok), strict=True):
            assert text in made[sample_id][3]
            seen[sample_id, text] += 1
    # 4 visits: each of a 4-caption sample's captions once, a 2-caption one's twice, of 3 captions one twice.
    for sample_id, (_, _, _, captions) in made.items():
        counts = [seen[sample_id, text] for text in captions]
        assert sum(counts) == 4 and min(counts) >= 4 // len(counts) and max(counts) <= -(-4 // len(counts)), sample_id


def test_batches_mix_images_and_sources(tagged):
    _, _, made = tagged
    shares = {"vg": 40 / 96, "coco": 32 / 96, "cc": 24 / 96}

    def measure(stream):
        most_of_one_image, distance = [], []
        for batch in _take(stream, 24):
            groups, sources = Counter(made[i][2] for i in _ids(batch)), Counter(made[i][1] for i in _ids(batch))
            most_of_one_image.append(max(groups.values()))
            distance.append(sum(abs(sources[s] / 8 - share) for s, share in shares.items()) / 2)
        return max(most_of_one_image), float(np.mean(distance))

    in_order = measure(_pairs(tagged, shuffle=0, lanes=1))  # what the loader did before: shard after shard
    most, distance = measure(_pairs(tagged))
    assert in_order[0] >= 4 and in_order[1] > 0.5  # batches of one image's crops, of one source
    assert most <= 3, most  # never a batch of one image's regions
    assert distance < 0.3, distance  # each batch's sources near the data's mix (total variation distance)


def test_epochs_are_global_over_four_streams(tagged):
    """2 ranks x 2 DataLoader workers: each epoch hands out every sample exactly once over the four streams."""
    per_epoch = 96 // (4 * 4)  # batches of 4 per stream
    loaders = [make_loader(_pairs(tagged, batch=4, rank=rank, world=2), workers=2) for rank in range(2)]
    for _epoch in range(2):
        ids = Counter()
        for loader in loaders:
            for _ in range(2 * per_epoch):
                ids.update(_ids(next(loader)))
        assert ids == Counter(range(96))
    for loader in loaders:
        loader.close()


def test_itm_negatives_never_show_an_image_its_own_caption(tagged):
    report, tok, made = tagged
    captions_of_group = {}
    for _, _, group, captions in made.values():
        captions_of_group.setdefault(group, set()).update(captions)
    labels = []
    for batch in _take(_pairs(tagged, rate=0.5), 24):
        for sample_id, text, label in zip(_ids(batch), _texts(batch, tok), batch["itm_labels"].tolist(), strict=True):
            own = captions_of_group[made[sample_id][2]]
            assert (text in made[sample_id][3]) if label == 1 else (text not in own), (sample_id, text, label)
            labels.append(label)
    assert 0.35 < 1 - np.mean(labels) < 0.65


def test_resume_equals_the_uninterrupted_stream_and_decodes_nothing_it_skips(tagged):
    whole = _take(_pairs(tagged, rate=0.5), 17, workers=2)  # into the second epoch, mid-window
    resumed = _take(_pairs(tagged, rate=0.5, skip=13), 4, workers=2)
    for a, b in zip(whole[13:], resumed, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k != "failures")
    expected = _take(_pairs(tagged, rate=0.5), 14)[13]  # one stream (no workers): 12 batches an epoch
    stream = _pairs(tagged, rate=0.5, skip=13)
    (batch,) = _take(stream, 1)
    assert all(torch.equal(batch[k], expected[k]) for k in batch if k != "failures")
    assert stream.decoded == 8  # only the batch handed out
    # Read raw (undecoded): one window of 32 and, per lane, the prefix of its shard; never the 104 samples before.
    assert stream.raw_read <= 32 + 4 * 24, stream.raw_read


def test_text_lengths_follow_the_task_and_the_old_key_is_refused(tmp_path, pmd):
    root, report, tok = pmd
    cfg = load_train_config(None)
    cfg.data.pair_text_len, cfg.data.text_len, cfg.data.workers = 20, 40, 0
    pairs = next(make_loader(task_stream(cfg.data, "pairs", report, tok, 0, 0, 1, 0), 0))
    text = next(make_loader(task_stream(cfg.data, "text", report, tok, 0, 0, 1, 0), 0))
    assert pairs["input_ids"].shape == (8, 20) and text["input_ids"].shape == (8, 40)
    path = tmp_path / "old.toml"
    path.write_text("[data]\nmax_text_len = 32\n")
    with pytest.raises(PmdError, match="max_text_len is gone: set pair_text_len .* and text_len"):
        load_train_config(path)


def test_a_task_smaller_than_a_batch_per_stream_repeats_within_an_epoch(tmp_path, pmd):
    _, _, tok = pmd
    make_tagged_shards(tmp_path, "tiny", [5], 0)
    tars = [str(tmp_path / "tiny" / "00000.tar")]
    streams = [TaskStream("pairs", tars, tok, 4, 24, 0, rank, 2, counts=[5], shuffle_buffer=8) for rank in range(2)]
    ids = Counter(i for stream in streams for i in _ids(_take(stream, 1)[0]))  # one epoch: a batch per stream
    assert set(ids) == set(range(5)) and sum(ids.values()) == 8 and max(ids.values()) == 2


def test_shards_named_by_url_are_counted_from_what_the_build_wrote_beside_them(tmp_path, tagged):
    import shutil

    from pmd_pipeline.train.data import count_samples

    report, _, _ = tagged
    assert count_samples(report.tars["pairs"]) == report.counts["pairs"]  # from the sidecars and stats
    bare = tmp_path / "copy.tar"
    shutil.copy(report.tars["pairs"][0], bare)  # no sidecar and stats without a count: its members are counted
    (tmp_path / "copy_stats.json").write_text("{}")
    assert count_samples([str(bare), f"pipe:cat {bare}"]) == [report.counts["pairs"][0]] * 2
