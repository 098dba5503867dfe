"""Zero-shot evaluation, as FLAVA and CLIP report it: image-text retrieval (R@1/5/10 both ways) and
classification of an ImageNet-style folder by prompt templates.

Held-out pairs come from shards (a build folder or a shard list) or from COCO's Karpathy test split, read
with the build's own COCO reader and resized by the build's own resizer (so the pixels are those a shard
would hold). The model is a run of ours (a run folder or a step_*.pt) or a Hugging Face FLAVA folder.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image
from torch.nn import functional as F

from pmd_pipeline.archive_members import open_member, split_member
from pmd_pipeline.config import ImageConfig, SourceConfig
from pmd_pipeline.errors import PmdError
from pmd_pipeline.fetch.images import make_resizer
from pmd_pipeline.storage import as_path
from pmd_pipeline.train.config import DataConfig, TrainConfig
from pmd_pipeline.train.export import load_trained
from pmd_pipeline.train.model import normalise_pixels
from pmd_pipeline.train.preflight import is_shard_list
from shards.layout import JSON_EXT, TEXT_EXT, shard_tars
from shards.tar import shard_samples
from sources.base import RejectLog
from sources.coco import SOURCE as COCO
from sources.imagenet import IMAGE_SUFFIXES

KS = (1, 5, 10)
PAIR_TEXT_LEN = 77  # FLAVA's text length for image-text pairs, used unless the run's config says otherwise
# A few of CLIP's ImageNet prompts (its 7-template ensemble, Radford et al. 2021, notebook "Prompt Engineering")
TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "art of the {}.",
    "a photo of the small {}.",
    "a photo of a {}.",
)
BATCH = 64
IMAGE_SIZE = 224


# --- the metrics -------------------------------------------------------------------------------------------


def retrieval_recall(similarity: torch.Tensor, text_image: torch.Tensor, ks=KS) -> dict[str, dict[str, float]]:
    """R@k both ways from a [images, texts] similarity; text_image[t] = the image text t describes.

    Image -> text: an image is found at k when any of its texts ranks in its top k (the COCO/Flickr protocol)."""
    images = similarity.shape[0]
    order = similarity.argsort(dim=1, descending=True)  # texts, best first, per image
    correct = text_image[order] == torch.arange(images)[:, None]
    first_hit = torch.where(correct.any(1), correct.float().argmax(1), torch.full((images,), similarity.shape[1]))
    image_rank = (similarity.T.argsort(dim=1, descending=True) == text_image[:, None]).float().argmax(1)
    return {
        "image_to_text": {f"R@{k}": (first_hit < k).float().mean().item() for k in ks},
        "text_to_image": {f"R@{k}": (image_rank < k).float().mean().item() for k in ks},
    }


def retrieval_chance(text_image: torch.Tensor, images: int, ks=KS) -> dict[str, dict[str, float]]:
    """The expected R@k of a model that ranks at random (what 'above chance' is measured against)."""
    texts = len(text_image)
    per_image = torch.bincount(text_image, minlength=images).tolist()

    def any_of(c: int, k: int) -> float:  # P(at least one of c right texts among k drawn of `texts`)
        return 1.0 - math.prod((texts - c - j) / (texts - j) for j in range(min(k, texts))) if c else 0.0

    return {
        "image_to_text": {f"R@{k}": sum(any_of(c, k) for c in per_image) / images for k in ks},
        "text_to_image": {f"R@{k}": min(k, images) / images for k in ks},
    }


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    order = logits.argsort(dim=1, descending=True)
    hits = {k: (order[:, :k] == labels[:, None]).any(1) for k in ks if k <= logits.shape[1]}
    return {f"top{k}": hit.float().mean().item() for k, hit in hits.items()}


# --- the model ---------------------------------------------------------------------------------------------


@dataclass
class Encoder:
    """FLAVA's unimodal embeddings as its contrastive loss compares them: projected [CLS], L2-normalised."""

    flava: object  # a FlavaModel (ours: FlavaForPreTraining.flava)
    tokenizer: object
    max_text_len: int
    name: str

    @torch.no_grad()
    def images(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, 224, 224] -> [N, projection_dim]."""
        out = [_cls(self.flava.get_image_features(pixel_values=normalise_pixels(b))) for b in pixels.split(BATCH)]
        return F.normalize(torch.cat(out).float(), dim=-1)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), BATCH):
            enc = self.tokenizer(texts[start : start + BATCH], padding="max_length", truncation=True,
                                 max_length=self.max_text_len, return_tensors="pt")  # fmt: skip
            features = self.flava.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            out.append(_cls(features))
        return F.normalize(torch.cat(out).float(), dim=-1)


def _cls(features) -> torch.Tensor:
    """The projected [CLS]: transformers 5 returns the projections as the output's pooler_output, 4 as a tensor."""
    return getattr(features, "pooler_output", features)[:, 0]


def load_encoder(path: str | Path) -> Encoder:
    """A Hugging Face FLAVA folder (config.json + weights + tokenizer) or a run of ours (folder or step_*.pt)."""
    from transformers import AutoTokenizer, FlavaModel

    path = Path(path)
    ours = path.is_file() or (path / "checkpoints").is_dir()  # a run folder has a config.json too: the train config
    if not ours and (path / "config.json").exists():
        flava = _quietly(FlavaModel.from_pretrained, str(path), local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        length = _text_len(_saved_config(path), flava)
        return Encoder(flava, tokenizer, length, str(path))
    trained = load_trained(path)
    tokenizer = AutoTokenizer.from_pretrained(str(trained.tokenizer_dir), local_files_only=True)
    flava = trained.model.flava
    return Encoder(flava, tokenizer, _text_len(trained.config, flava), str(trained.checkpoint))


def _quietly(load, *args, **kwargs):
    """transformers lists every pretraining head a FlavaModel leaves unused (expected here) as a warning."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return load(*args, **kwargs)
    finally:
        logging.set_verbosity(level)


def encoder_of(model, tokenizer_dir: str | Path, cfg: TrainConfig) -> Encoder:
    """The encoder of a model being trained (FlavaForPreTraining), for evaluations during the run."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    return Encoder(model.flava, tokenizer, _text_len(cfg, model.flava), cfg.run_dir)


def _saved_config(folder: Path) -> TrainConfig | None:
    from pmd_pipeline.train.config import config_from_dict
    from pmd_pipeline.train.export import CONFIG_FILE

    path = folder / CONFIG_FILE
    return config_from_dict(json.loads(path.read_text()), str(path)) if path.exists() else None


def _text_len(cfg: TrainConfig | None, flava) -> int:
    """The run's own pair length (what its text encoder saw), else FLAVA's 77; never past its positions."""
    length = cfg.data.pair_text_len if cfg is not None else PAIR_TEXT_LEN
    return min(length, flava.config.text_config.max_position_embeddings)


# --- held-out pairs and labelled images ----------------------------------------------------------------------


@dataclass
class Pairs:
    pixels: list[np.ndarray] = field(default_factory=list)  # uint8 [3, 224, 224] each
    captions: list[list[str]] = field(default_factory=list)  # the texts of each image
    skipped: Counter = field(default_factory=Counter)  # reason -> samples left out

    def add(self, jpeg: bytes, captions: list[str]) -> None:
        pixels, reason = _pixels(jpeg)
        captions = [c.strip() for c in captions if c and c.strip()]
        reason = reason or (None if captions else "no_caption")
        if reason:
            self.skipped[reason] += 1
        else:
            self.pixels.append(pixels)
            self.captions.append(captions)


def shard_pairs(shards: str, limit: int) -> Pairs:
    """The image-text pairs of a build folder's paired sources, of one source's folder or of listed tars, all
    captions of each."""
    pairs = Pairs()
    for sample in shard_samples(_pair_tars(shards)):
        if len(pairs.pixels) >= limit:
            break
        if "__error__" in sample or "jpg" not in sample:
            pairs.skipped[sample.get("__error__", "no_image")] += 1
            continue
        pairs.add(sample["jpg"], _sample_captions(sample))
    return _nonempty(pairs, shards)


def _pair_tars(shards: str) -> list[str]:
    if is_shard_list(shards):
        return [url for part in shards.split("::") for url in braceexpand(part)]
    root = as_path(shards)
    if not root.is_dir():
        raise PmdError(f"held-out shards not found: {shards} (a build folder or a shard list)")
    if shard_tars(root):  # one source's folder
        return [str(tar) for tar in shard_tars(root)]
    unimodal = set(DataConfig().image_only) | set(DataConfig().text_only)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_") and p.name not in unimodal)
    return [str(tar) for folder in folders for tar in shard_tars(folder)]


def _sample_captions(sample: dict) -> list[str]:
    if JSON_EXT in sample:
        captions = json.loads(sample[JSON_EXT]).get("captions")
        if captions:
            return list(captions)
    return [sample[TEXT_EXT].decode("utf-8", errors="replace")] if TEXT_EXT in sample else []


def karpathy_pairs(karpathy: str, images: dict[str, str], split: str, limit: int) -> Pairs:
    """A Karpathy split of COCO (`test` by default): the build's COCO reader, the build's resize."""
    cfg = SourceConfig("coco", metadata=[karpathy], images=images, options={"splits": [split]})
    rejects, pairs = RejectLog(), Pairs()
    for frame in COCO.read(cfg, rejects):
        for row in frame.filter(frame["drop_reason"].is_null()).iter_rows(named=True):
            if len(pairs.pixels) >= limit:
                break
            archive, member = split_member(row["image_path"])
            try:
                with open_member(archive, member) as f:
                    raw = f.read()
            except FileNotFoundError:
                pairs.skipped["image_missing"] += 1
                continue
            encoded, *_, error = RESIZER.resize_bytes(raw)
            if error:
                pairs.skipped["image_refused"] += 1
                continue
            pairs.add(encoded, row["captions"])
    if len(rejects):
        pairs.skipped["bad_record"] += len(rejects)
    return _nonempty(pairs, f"{karpathy} split {split!r}")


RESIZER = make_resizer(ImageConfig())  # the build's default: 224 px, centre crop, JPEG 95


def _pixels(jpeg: bytes) -> tuple[np.ndarray | None, str | None]:
    try:
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    except Exception:  # noqa: BLE001 - any decoder error means this one image is unusable
        return None, "decode_error"
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        return None, "wrong_image_size"
    return np.asarray(image).transpose(2, 0, 1), None


def _nonempty(pairs: Pairs, where: str) -> Pairs:
    if not pairs.pixels:
        raise PmdError(f"no usable image-text pairs in {where} (left out: {dict(pairs.skipped) or 'none'})")
    return pairs


@dataclass
class Labelled:
    pixels: list[np.ndarray] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)  # class names, in label order
    skipped: Counter = field(default_factory=Counter)


def class_images(root: str, class_names: str | None = None, limit: int = 50_000) -> Labelled:
    """An ImageNet-style folder (or tar/zip of one): each image's class is its folder; names from a json
    mapping {folder: name} or the folder names (underscores as spaces). Resized as the build resizes."""
    names = _class_names(class_names)
    folders: dict[str, int] = {}
    found = Labelled()
    for folder, data in _folder_images(as_path(root)):
        if len(found.pixels) >= limit:
            break
        if names is not None and folder not in names:
            raise PmdError(f"class folder {folder!r} of {root} is not in {class_names}")
        encoded, *_, error = RESIZER.resize_bytes(data)
        pixels, reason = (None, "image_refused") if error else _pixels(encoded)
        if reason:
            found.skipped[reason] += 1
            continue
        if folder not in folders:
            folders[folder] = len(folders)
            found.classes.append(names[folder] if names is not None else folder.replace("_", " "))
        found.pixels.append(pixels)
        found.labels.append(folders[folder])
    if len(found.classes) < 2:
        raise PmdError(f"{root}: zero-shot classification needs images in at least 2 class folders")
    return found


def _class_names(path: str | None) -> dict[str, str] | None:
    if not path:
        return None
    try:
        names = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PmdError(f"class names {path}: not a readable json mapping {{folder: name}} ({err})") from None
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise PmdError(f"class names {path}: expected a json object {{folder: name}}")
    return names


def _folder_images(root: Path) -> Iterator[tuple[str, bytes]]:
    """(class folder, bytes) of each image, in name order (a tar is read through once)."""
    if root.is_dir():
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                yield path.parent.name, path.read_bytes()
    elif root.is_file() and zipfile.is_zipfile(root):
        with zipfile.ZipFile(root) as z:
            for name in sorted(n for n in z.namelist() if Path(n).suffix.lower() in IMAGE_SUFFIXES):
                yield Path(name).parent.name, z.read(name)
    elif root.is_file():
        try:
            with tarfile.open(root) as tar:
                for member in sorted((m for m in tar if m.isfile()), key=lambda m: m.name):
                    if Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                        yield Path(member.name).parent.name, tar.extractfile(member).read()
        except tarfile.TarError as err:
            raise PmdError(f"{root} is neither an image folder nor a readable zip or tar ({err})") from None
    else:
        raise PmdError(f"image folder not found: {root}")


# --- the evaluations -----------------------------------------------------------------------------------------


def evaluate_retrieval(encoder: Encoder, pairs: Pairs) -> dict:
    images = encoder.images(torch.from_numpy(np.stack(pairs.pixels)))
    texts = [t for captions in pairs.captions for t in captions]
    text_image = torch.tensor([i for i, captions in enumerate(pairs.captions) for _ in captions])
    similarity = images @ encoder.texts(texts).T
    return {
        "images": len(pairs.pixels),
        "texts": len(texts),
        **retrieval_recall(similarity, text_image),
        "chance": retrieval_chance(text_image, len(pairs.pixels)),
        "skipped": dict(pairs.skipped),
    }


def evaluate_classification(encoder: Encoder, found: Labelled, templates=TEMPLATES) -> dict:
    """CLIP's zero-shot protocol: a class's text embedding is the normalised mean over its prompts."""
    prompts = encoder.texts([t.format(name) for name in found.classes for t in templates])
    classes = F.normalize(prompts.view(len(found.classes), len(templates), -1).mean(1), dim=-1)
    logits = encoder.images(torch.from_numpy(np.stack(found.pixels))) @ classes.T
    labels = torch.tensor(found.labels)
    return {
        "images": len(found.pixels),
        "classes": len(found.classes),
        "templates": len(templates),
        **top_k_accuracy(logits, labels),
        "chance_top1": 1 / len(found.classes),
        "skipped": dict(found.skipped),
    }


def evaluate_during_training(step: int, model, tok_dir, cfg: TrainConfig, rank: int, say=print) -> None:
    """What the trainer calls after each step: every `eval.every` steps, retrieval on `eval.data` (rank 0),
    a row in RUN/eval.jsonl. No randomness is drawn, so a resumed run's losses are unchanged."""
    if cfg.eval.every and cfg.fsdp:  # rank 0 holds a shard of the weights only: checked at the first step
        raise PmdError("[eval] every needs the whole model on rank 0, not FSDP's shards: evaluate the "
                       "checkpoints with `pmd eval` instead (or set fsdp = false)")  # fmt: skip
    if not cfg.eval.every or step % cfg.eval.every or rank != 0:
        return
    model = getattr(model, "module", model).model  # DDP's wrapped FlavaTasks -> FlavaForPreTraining
    was_training = model.training
    model.eval()
    try:
        result = evaluate_retrieval(encoder_of(model, tok_dir, cfg), shard_pairs(cfg.eval.data, cfg.eval.limit))
    finally:
        model.train(was_training)
    with open(Path(cfg.run_dir) / "eval.jsonl", "a") as log:
        log.write(json.dumps({"step": step, "retrieval": result}) + "\n")
    i2t, t2i = result["image_to_text"], result["text_to_image"]
    say(f"eval step {step}: image->text R@1={i2t['R@1']:.3f} R@5={i2t['R@5']:.3f}, "
        f"text->image R@1={t2i['R@1']:.3f} R@5={t2i['R@5']:.3f} ({result['images']} images)")  # fmt: skip


def run_eval(model, shards, karpathy, coco_images, split, imagenet, classes, limit) -> dict:
    """What `pmd eval` runs: every evaluation given data for, on one model."""
    if not (shards or karpathy or imagenet):
        raise PmdError("nothing to evaluate on: give --shards, --karpathy (with --coco-images) or --imagenet")
    encoder = load_encoder(model)
    result = {"model": encoder.name, "text_length": encoder.max_text_len}
    if shards:
        result["retrieval_shards"] = {"data": shards, **evaluate_retrieval(encoder, shard_pairs(shards, limit))}
    if karpathy:
        pairs = karpathy_pairs(karpathy, coco_images, split, limit)
        result["retrieval_karpathy"] = {"data": f"{karpathy} ({split})", **evaluate_retrieval(encoder, pairs)}
    if imagenet:
        found = class_images(imagenet, classes, limit)
        result["classification"] = {"data": imagenet, **evaluate_classification(encoder, found)}
    return result
