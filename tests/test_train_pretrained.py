"""Continuing pretraining from a local facebook/flava-full-layout checkpoint (saved here by save_pretrained)."""

from __future__ import annotations

import json

import pytest
import torch

from pmd_pipeline.errors import PmdError
from pmd_pipeline.train.config import ModelConfig, load_train_config
from pmd_pipeline.train.export import write_codebook
from pmd_pipeline.train.model import build_model
from pmd_pipeline.train.tokenizer import train_wordpiece
from pmd_pipeline.train.trainer import train
from tests.train_fixtures import CODEBOOK, make_pmd

TEXTS = [f"a photo of a {c} {t} on a table" for c in ("red", "green", "blue") for t in ("cup", "cat", "car")]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_pmd(tmp_path_factory.mktemp("pmd") / "out", per_shard=16, shards=1)


def checkpoint(folder, with_tokenizer=True, text_positions=512):
    """A tiny FlavaForPreTraining saved in the flava-full layout, with a recognisable weight."""
    tokenizer = train_wordpiece(TEXTS * 20, 120)
    torch.manual_seed(1)
    model = build_model(ModelConfig(), len(tokenizer), text_positions)
    with torch.no_grad():
        model.flava.text_model.embeddings.word_embeddings.weight[5].fill_(0.123)
    model.save_pretrained(folder)
    write_codebook(folder, CODEBOOK)  # trained on the fixture shards' codebook
    if with_tokenizer:
        tokenizer.save_pretrained(str(folder))
    return model


def config(shards, tmp_path, pretrained):
    cfg = load_train_config(None, run_dir=str(tmp_path / "run"), log_every=100)
    cfg.data.shards, cfg.data.workers, cfg.data.batch_size = str(shards), 0, 4
    cfg.model.pretrained = str(pretrained)
    cfg.optim.steps, cfg.optim.warmup_steps = 3, 1
    return cfg


def test_training_continues_from_the_checkpoint_with_its_own_tokenizer(shards, tmp_path):
    saved = checkpoint(tmp_path / "flava")
    loaded = build_model(ModelConfig(pretrained=str(tmp_path / "flava")), 0, 32)
    for name, tensor in saved.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    run = train(config(shards, tmp_path, tmp_path / "flava"), say=lambda _: None)
    assert not (run / "tokenizer").exists()  # the checkpoint's vocabulary, not one trained on the shards
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_a_checkpoint_without_its_tokenizer_is_refused(shards, tmp_path):
    checkpoint(tmp_path / "flava", with_tokenizer=False)
    with pytest.raises(PmdError, match="has no tokenizer files; set `tokenizer`"):
        train(config(shards, tmp_path, tmp_path / "flava"), say=lambda _: None)


def test_a_checkpoint_with_a_smaller_vocabulary_than_the_tokenizer_is_refused(tmp_path):
    checkpoint(tmp_path / "flava")
    with pytest.raises(PmdError, match="checkpoint text vocab"):
        build_model(ModelConfig(pretrained=str(tmp_path / "flava")), 10_000, 32)


def test_a_checkpoint_with_fewer_text_positions_than_the_text_length_is_refused(tmp_path):
    checkpoint(tmp_path / "flava", text_positions=64)
    with pytest.raises(PmdError, match=r"text positions \(64\) < the configured text length 512"):
        build_model(ModelConfig(pretrained=str(tmp_path / "flava")), 0, 512)


def test_a_folder_that_is_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(PmdError, match="not a facebook/flava-full-layout folder"):
        build_model(ModelConfig(pretrained=str(tmp_path)), 100, 32)
