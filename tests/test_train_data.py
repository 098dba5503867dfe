"""Preflight checks and the streaming loader on fixture shards in the built format."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from pmd_pipeline.errors import PmdError
from pmd_pipeline.train.config import DataConfig
from pmd_pipeline.train.data import TaskStream, make_loader
from pmd_pipeline.train.preflight import preflight
from pmd_pipeline.train.tokenizer import prepare_tokenizer
from tests.train_fixtures import make_pmd, make_shards, write_shard


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


def test_pair_batches_hold_tokens_masks_and_outside_negatives(pmd):
    _, report, tok = pmd
    batches = _take(TaskStream("pairs", report.tars["pairs"], tok, 8, 24, 0, 0, 1), 4)
    for batch in batches:
        assert batch["pixel_values"].shape == (8, 3, 224, 224)
        assert batch["bool_masked_pos"].sum(1).tolist() == [75] * 8
        assert batch["mim_labels"].shape == (8, 196) and int(batch["mim_labels"].max()) < 8192
        assert batch["input_ids"].shape == batch["mlm_labels"].shape == (8, 24)
        assert (batch["mlm_labels"] != -100).any(1).all()
    itm = np.concatenate([b["itm_labels"].numpy() for b in batches])
    assert 0.2 < (itm == 0).mean() < 0.8
    for batch in batches:  # a negative caption comes from a neighbouring batch, never from this one
        texts = [tuple(row[row != 0]) for row in batch["input_ids"].numpy()]
        positives = {t for t, label in zip(texts, batch["itm_labels"], strict=True) if label == 1}
        negatives = [t for t, label in zip(texts, batch["itm_labels"], strict=True) if label == 0]
        assert negatives and not positives & set(negatives)


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
    samples = [dict(good, __key__=f"k{i}") for i in range(6)]
    samples[1]["jpg"] = b"not a jpeg"
    samples[2]["dvae.npy"] = _npy(np.full((14, 14), 9000, np.uint16))
    samples[3]["jpg"] = _jpeg(size=100)
    del samples[4]["dvae.npy"]
    write_shard(tmp_path / "00000", samples, "image")
    batch = _take(TaskStream("image", [str(tmp_path / "00000.tar")], tok, 3, 24, 0, 0, 1), 1)[0]
    assert batch["pixel_values"].shape[0] == 3
    reasons = {"decode_error": 1, "bad_tokens": 1, "wrong_image_size": 1, "no_tokens": 1}
    assert batch["failures"] == reasons


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
