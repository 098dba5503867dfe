"""`pmd eval` and `pmd export`: the retrieval and classification metrics on known answers, a tiny trained run
evaluated as a run folder and as its exported Hugging Face folder, the export round trip, the codebook
identity checkpoints carry and its checks."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pmd_pipeline.cli import app
from pmd_pipeline.config import ImageConfig
from pmd_pipeline.embedded import synth_body
from pmd_pipeline.errors import PmdError
from pmd_pipeline.fetch.images import make_resizer
from pmd_pipeline.train.checkpoint import last_checkpoint, read_checkpoint
from pmd_pipeline.train.config import load_train_config
from pmd_pipeline.train.evaluate import (
    class_images,
    karpathy_pairs,
    retrieval_chance,
    retrieval_recall,
    top_k_accuracy,
)
from pmd_pipeline.train.export import CODEBOOK_FILE, CONFIG_FILE, load_trained
from pmd_pipeline.train.trainer import train
from tests.train_fixtures import CODEBOOK, COLOURS, make_pmd

# --- the metrics on features whose answer is known -------------------------------------------------------


def test_perfectly_matched_pairs_give_recall_one_both_ways():
    features = torch.nn.functional.normalize(torch.randn(20, 16), dim=-1)
    recall = retrieval_recall(features @ features.T, torch.arange(20))
    assert recall == {d: {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0} for d in ("image_to_text", "text_to_image")}


def test_recall_counts_the_rank_of_the_right_item():
    # 3 images, 4 texts (image 0 has two). Image 0's best text is image 1's; its own come second and third.
    similarity = torch.tensor(
        [
            [0.5, 0.4, 0.9, 0.25],  # image 0: texts 0, 1 are its own; text 2 (image 1's) ranks first
            [0.0, 0.1, 0.8, 0.3],  # image 1: its text 2 first
            [0.3, 0.0, 0.1, 0.2],  # image 2: its text 3 ranks second, after text 0
        ]
    )
    text_image = torch.tensor([0, 0, 1, 2])
    recall = retrieval_recall(similarity, text_image, ks=(1, 2))
    assert recall["image_to_text"] == {"R@1": pytest.approx(1 / 3), "R@2": 1.0}
    # text -> image: texts 0 and 1 find image 0 first; text 2 finds image 0 before its image 1; text 3 its image last
    assert recall["text_to_image"] == {"R@1": pytest.approx(2 / 4), "R@2": pytest.approx(3 / 4)}


def test_chance_is_what_random_rankings_score():
    text_image = torch.tensor([0, 0, 1, 2, 3, 4])  # image 0 has two texts of six
    chance = retrieval_chance(text_image, 5, ks=(1, 5))
    assert chance["text_to_image"] == {"R@1": pytest.approx(0.2), "R@5": 1.0}
    expected_r1 = (2 / 6 + 4 * (1 / 6)) / 5
    assert chance["image_to_text"]["R@1"] == pytest.approx(expected_r1)
    generator = torch.Generator().manual_seed(0)
    runs = [retrieval_recall(torch.rand(5, 6, generator=generator), text_image, ks=(1,)) for _ in range(3000)]
    assert np.mean([r["image_to_text"]["R@1"] for r in runs]) == pytest.approx(expected_r1, abs=0.02)


def test_top_k_accuracy():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.1, 0.7], [0.5, 0.4, 0.3]])
    assert top_k_accuracy(logits, torch.tensor([0, 1, 1]), ks=(1, 2, 5)) == {
        "top1": pytest.approx(1 / 3),
        "top2": pytest.approx(2 / 3),
    }  # top5 is left out: 3 classes


# --- the held-out data, read as the build reads it -----------------------------------------------------------


def _coco(tmp_path):
    """A Karpathy split file and a val2014 zip: two test images (one missing from the zip), a train one."""
    images, zipped = [], {}
    for i, split in enumerate(("test", "train", "test", "test")):
        name = f"COCO_val2014_{i:012d}.jpg"
        sentences = [{"raw": f"a {c} thing {i}"} for c in ("red", "green")]
        images.append({"filepath": "val2014", "filename": name, "cocoid": i, "split": split, "sentences": sentences})
        if i != 3:
            zipped[f"val2014/{name}"] = synth_body("jpg", name, "red circle")
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    with zipfile.ZipFile(tmp_path / "val2014.zip", "w") as z:
        for member, body in zipped.items():
            z.writestr(member, body)
    return str(tmp_path / "dataset_coco.json"), {"val2014": str(tmp_path / "val2014.zip")}, zipped


def test_karpathy_test_split_is_read_and_resized_as_the_build_does(tmp_path):
    karpathy, images, zipped = _coco(tmp_path)
    pairs = karpathy_pairs(karpathy, images, "test", limit=100)
    assert pairs.captions == [["a red thing 0", "a green thing 0"], ["a red thing 2", "a green thing 2"]]
    assert dict(pairs.skipped) == {"image_missing": 1}
    built = make_resizer(ImageConfig()).resize_bytes(zipped["val2014/COCO_val2014_000000000002.jpg"])[0]
    expected = np.asarray(Image.open(io.BytesIO(built)).convert("RGB")).transpose(2, 0, 1)
    assert pairs.pixels[1].shape == (3, 224, 224) and np.array_equal(pairs.pixels[1], expected)
    with pytest.raises(PmdError, match="no usable image-text pairs"):
        karpathy_pairs(karpathy, images, "val", limit=100)


def _class_folder(root, classes=("red", "green", "blue"), per_class=3):
    for c in classes:
        (root / f"n0{c}").mkdir(parents=True)
        for i in range(per_class):
            rgb = np.full((240 + 10 * i, 300, 3), COLOURS[c], dtype=np.uint8)
            Image.fromarray(rgb).save(root / f"n0{c}" / f"{i}.JPEG")
    names = root.parent / f"{root.name}_names.json"
    names.write_text(json.dumps({f"n0{c}": f"{c} square" for c in classes}))
    return root, names


def test_class_folders_are_labelled_by_folder_and_named_by_the_mapping(tmp_path):
    root, names = _class_folder(tmp_path / "imagenet")
    found = class_images(str(root), str(names))
    assert found.classes == ["blue square", "green square", "red square"]
    assert found.labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(p.shape == (3, 224, 224) for p in found.pixels)
    names.write_text(json.dumps({"n0red": "red"}))
    with pytest.raises(PmdError, match="class folder 'n0blue' .* is not in"):
        class_images(str(root), str(names))


# --- a tiny trained run: eval, export, codebook -------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_pmd(tmp_path_factory.mktemp("pmd") / "out", per_shard=12, shards=1)


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory):
    """Four steps of the tiny model, evaluated on the fixture's pairs every two steps."""
    cfg = _config(shards, tmp_path_factory.mktemp("run") / "run")
    cfg.eval.every, cfg.eval.data, cfg.eval.limit = 2, str(shards), 16
    return train(cfg, say=lambda _: None)


def _config(shards, run_dir, steps=4):
    cfg = load_train_config(None, run_dir=str(run_dir), vocab_size=200, log_every=100, checkpoint_every=2)
    cfg.data.shards, cfg.data.workers, cfg.data.batch_size = str(shards), 0, 4
    cfg.optim.steps, cfg.optim.warmup_steps = steps, 1
    return cfg


def test_checkpoints_carry_the_shards_codebook_and_evaluations_are_logged(run):
    assert read_checkpoint(last_checkpoint(run))["codebook"] == CODEBOOK
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all(r["retrieval"]["images"] == 16 for r in rows)


def _eval(model, *args) -> dict:
    result = CliRunner().invoke(app, ["eval", str(model), *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_eval_on_a_run_folder_and_on_its_export_agree(run, shards, tmp_path):
    root, names = _class_folder(tmp_path / "imagenet")
    args = ["--shards", str(shards), "--imagenet", str(root), "--classes", str(names)]
    ours = _eval(run, *args)
    retrieval = ours["retrieval_shards"]
    assert retrieval["images"] == 24 and retrieval["texts"] == 24  # cc3m + coco fixture shards, one caption each
    for direction in ("image_to_text", "text_to_image"):
        values = [retrieval[direction][k] for k in ("R@1", "R@5", "R@10")]
        assert all(0 <= v <= 1 for v in values) and values == sorted(values)
    classification = ours["classification"]
    assert classification["classes"] == 3 and classification["images"] == 9 and 0 <= classification["top1"] <= 1
    assert ours["text_length"] == 77  # the run's own pair length (data.pair_text_len, the embedded default's)

    exported = tmp_path / "hf"
    result = CliRunner().invoke(app, ["export", str(run), "--to", str(exported)])
    assert result.exit_code == 0, result.output
    theirs = _eval(exported, *args)
    assert theirs["retrieval_shards"] == retrieval  # the same weights: the same numbers
    assert theirs["classification"] == classification


def test_export_round_trip_gives_the_checkpoints_outputs(run, tmp_path):
    from transformers import AutoTokenizer, FlavaForPreTraining, FlavaModel

    CliRunner().invoke(app, ["export", str(last_checkpoint(run)), "--to", str(tmp_path / "hf")])
    trained = load_trained(run)
    loaded = FlavaForPreTraining.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    base = FlavaModel.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    texts = ["a red photo", "a blue car on the tree"]
    text = tokenizer(texts, padding="max_length", max_length=32, return_tensors="pt")
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"], "pixel_values": pixels}
    masked = {**batch, "input_ids_masked": text["input_ids"]}
    with torch.no_grad():
        want, got = trained.model(**masked, return_loss=False), loaded(**masked, return_loss=False)
        got_base = base(**batch)
    assert {"image_embeddings", "text_embeddings", "itm_logits", "mmm_text_logits"} <= set(want.keys())
    tensors = [name for name, value in want.items() if isinstance(value, torch.Tensor)]
    for name in tensors:  # the export also has the stock contrastive head's logits, which ours leaves off
        assert torch.equal(want[name], got[name]), name
    assert torch.equal(want.image_embeddings, got_base.image_embeddings)
    assert torch.equal(want.text_embeddings, got_base.text_embeddings)
    assert json.loads((tmp_path / "hf" / CODEBOOK_FILE).read_text()) == {"codebook": CODEBOOK}
    assert json.loads((tmp_path / "hf" / CONFIG_FILE).read_text())["optim"]["steps"] == 4
    result = CliRunner().invoke(app, ["export", str(run), "--to", str(tmp_path / "hf")])
    assert result.exit_code == 2 and "not empty" in result.output


def test_continuing_from_an_export_needs_the_shards_of_its_codebook(run, shards, tmp_path):
    CliRunner().invoke(app, ["export", str(run), "--to", str(tmp_path / "hf")])
    other = make_pmd(tmp_path / "other", per_shard=8, shards=1, codebook="random, seed 7")
    cfg = _config(other, tmp_path / "next", steps=1)
    cfg.model.pretrained = str(tmp_path / "hf")
    with pytest.raises(PmdError, match="codebook 'random, seed 0', but the shards carry codebook 'random, seed 7'"):
        train(cfg, say=lambda _: None)
    cfg.data.shards = str(shards)  # the export's own codebook: accepted
    assert (train(cfg, say=lambda _: None) / "log.jsonl").exists()


def test_a_stock_flava_folder_refuses_shards_of_a_random_codebook(run, shards, tmp_path):
    CliRunner().invoke(app, ["export", str(run), "--to", str(tmp_path / "hf")])
    (tmp_path / "hf" / CODEBOOK_FILE).unlink()  # as facebook/flava-full: no identity of ours
    cfg = _config(shards, tmp_path / "next", steps=1)
    cfg.model.pretrained = str(tmp_path / "hf")
    with pytest.raises(PmdError, match="no pmd_codebook.json .* shards carry tokens of codebook 'random, seed 0'"):
        train(cfg, say=lambda _: None)


def test_resume_on_shards_of_another_codebook_is_refused(run, tmp_path):
    import shutil

    shutil.copytree(run, tmp_path / "run")
    other = make_pmd(tmp_path / "other", per_shard=12, shards=1, codebook="random, seed 3")  # the same, re-tokenized
    cfg = _config(other, tmp_path / "run", steps=6)  # data.shards may move on resume; the codebook not
    cfg.eval.every, cfg.eval.data, cfg.eval.limit = 2, str(other), 16
    with pytest.raises(PmdError, match="'random, seed 0', but the shards carry codebook 'random, seed 3'"):
        train(cfg, resume=True, say=lambda _: None)


def test_eval_needs_data_and_a_model(run, tmp_path):
    result = CliRunner().invoke(app, ["eval", str(run)])
    assert result.exit_code == 2 and "nothing to evaluate on" in result.output
    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--shards", str(tmp_path)])
    assert result.exit_code == 2 and "is neither" in result.output
    result = CliRunner().invoke(app, ["eval", str(run), "--karpathy", "x.json", "--coco-images", "val2014"])
    assert result.exit_code == 2 and "expected ROLE=ZIP" in result.output


def test_evaluating_during_an_fsdp_run_is_refused(shards, tmp_path):
    from pmd_pipeline.train.evaluate import evaluate_during_training

    cfg = _config(shards, tmp_path / "run")
    cfg.fsdp, cfg.eval.every, cfg.eval.data = True, 5, str(shards)
    with pytest.raises(PmdError, match="not FSDP's shards"):
        evaluate_during_training(1, None, None, cfg, rank=0)
    cfg.fsdp = False
    assert evaluate_during_training(1, None, None, cfg, rank=0) is None  # not a step to evaluate on
