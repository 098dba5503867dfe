"""FlavaForPreTraining (tiny config or local checkpoint) and one forward per task, with no wasted passes."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from pmd_pipeline.errors import PmdError
from pmd_pipeline.train.config import ModelConfig
from pmd_pipeline.train.losses import global_contrastive

IGNORE = -100
LOGIT_SCALE_MAX = 4.6052  # ln 100, FLAVA's own bound
# FLAVA's image processor normalisation (the CLIP statistics), applied on the training device.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def normalise_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] from the loader -> the float input FLAVA expects."""
    mean = torch.tensor(MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def build_model(cfg: ModelConfig, text_vocab: int, max_text_len: int):
    from transformers import FlavaConfig, FlavaForPreTraining

    if cfg.pretrained:
        if not Path(cfg.pretrained, "config.json").exists():
            raise PmdError(f"{cfg.pretrained} is not a facebook/flava-full-layout folder (no config.json)")
        model = FlavaForPreTraining.from_pretrained(cfg.pretrained, local_files_only=True)
        if model.config.text_config.vocab_size < text_vocab:
            raise PmdError(f"checkpoint text vocab {model.config.text_config.vocab_size} < tokenizer's {text_vocab}")
        if model.config.text_config.max_position_embeddings < max_text_len:
            raise PmdError(
                f"checkpoint's text positions ({model.config.text_config.max_position_embeddings}) < the "
                f"configured text length {max_text_len}: lower data.text_len / data.pair_text_len"
            )
    else:
        model = FlavaForPreTraining(FlavaConfig(**tiny_config(cfg, text_vocab, max_text_len)))
    # The paired step computes the global contrastive loss itself (losses.py), so the stock head is off.
    model.global_contrastive_weight = 0.0
    if cfg.activation_checkpointing:  # each FlavaLayer recomputed in the backward (torch checkpoint, non-reentrant)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model.train()  # from_pretrained leaves eval mode, under which HF skips the checkpointing


def tiny_config(cfg: ModelConfig, text_vocab: int, max_text_len: int) -> dict:
    encoder = {
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.intermediate_size,
    }
    return {
        "image_config": {**encoder, "image_size": 224, "patch_size": 16, "vocab_size": 8192},
        "text_config": {**encoder, "vocab_size": text_vocab, "max_position_embeddings": max(max_text_len, 64)},
        "multimodal_config": {**encoder, "num_hidden_layers": cfg.multimodal_layers},
        "hidden_size": cfg.hidden_size,
        "projection_dim": cfg.projection_dim,
        "init_codebook": False,  # tokens come precomputed in the shards; the codebook never runs here
    }


class CachedFeatures:
    """open_clip's `--accum-freq` for the contrastive loss: the features of all of a step's micro-batches, computed
    without gradients first; micro-batch `live` then puts its own (with gradients) in its place, so each pass
    computes the whole accumulated batch's loss, every micro-batch the others' negatives, and its gradient
    reaches only the live features. Summed over the passes, the gradients are the big batch's exactly.
    FLAVA has no dropout (hidden and attention dropout 0), so the recomputed features equal the cached ones."""

    def __init__(self, images: list[torch.Tensor], texts: list[torch.Tensor], positives: list[torch.Tensor]):
        self.images, self.texts, self.positive = images, texts, torch.cat(positives)
        self.live = 0

    def with_live(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor):
        images, texts = list(self.images), list(self.texts)
        images[self.live], texts[self.live] = image, text
        # The temperature is in every pass's loss: scaling its gradient by 1/passes makes the sum count it once.
        passes = len(images)
        scale = logit_scale.detach() + (logit_scale - logit_scale.detach()) / passes
        return torch.cat(images), torch.cat(texts), self.positive, scale


def loss_counts(task: str, batch: dict, step_has_match: bool = True) -> dict[str, int]:
    """How many items each of the task's losses averages over in this batch (the stock model's masks).

    Accumulation weights each micro-batch's loss by its share of the step's items, so that the sum is the mean
    over the whole step's batch: MLM and MMM-text count masked tokens, MIM and MMM-image masked patches, ITM rows.
    MMM counts matched pairs only, as the stock model filters them, and all pairs when none is matched: per
    step, as one big batch would (a micro-batch without a match while the step has some weighs 0 for MMM).
    The contrastive loss is not a mean of this kind: see CachedFeatures.
    """
    if task == "image":
        return {"mim": int(batch["bool_masked_pos"].sum())}
    text_targets = batch["mlm_labels"] != IGNORE
    if task == "text":
        return {"mlm": int(text_targets.sum())}
    matched = batch["itm_labels"] != 0 if step_has_match else torch.ones_like(batch["itm_labels"], dtype=torch.bool)
    return {
        "mmm_image": int(batch["bool_masked_pos"][matched].sum()),
        "mmm_text": int(text_targets[matched].sum()),
        "itm": int(matched.numel()),
    }


class FlavaTasks(nn.Module):
    """One module whose forward runs any task, so DDP/FSDP see every step through their wrapper."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, task: str, batch: dict, cached: CachedFeatures | None = None) -> dict[str, torch.Tensor]:
        """task: 'pairs', 'image', 'text', or 'features' (the contrastive features, as accumulation caches them)."""
        if "pixel_values" in batch and batch["pixel_values"].dtype == torch.uint8:
            batch = {**batch, "pixel_values": normalise_pixels(batch["pixel_values"])}
        if task == "pairs":
            return self.pairs(batch, cached)
        return {"image": self.image, "text": self.text, "features": self.features}[task](batch)

    def features(self, b: dict) -> dict[str, torch.Tensor]:
        """The normalised image and text embeddings the contrastive loss compares: the unmasked image and text
        passes of the stock forward, projected (what pairs() computes, without the rest of the step)."""
        flava = self.model.flava
        image = flava.image_model(pixel_values=b["pixel_values"]).last_hidden_state
        text = flava.text_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        return {
            "image": F.normalize(flava.image_projection(image[:, 0]), dim=-1),
            "text": F.normalize(flava.text_projection(text[:, 0]), dim=-1),
        }

    def pairs(self, b: dict, cached: CachedFeatures | None = None) -> dict[str, torch.Tensor]:
        out = self.model(
            input_ids=b["input_ids"],
            input_ids_masked=b["input_ids_masked"],
            attention_mask=b["attention_mask"],
            pixel_values=b["pixel_values"],
            bool_masked_pos=b["bool_masked_pos"],
            mim_labels=b["mim_labels"].clone(),  # the stock model writes into it
            mlm_labels=b["mlm_labels"],
            itm_labels=b["itm_labels"],
            return_loss=True,
        )
        flava = self.model.flava
        image = F.normalize(flava.image_projection(out.image_embeddings[:, 0]), dim=-1)
        text = F.normalize(flava.text_projection(out.text_embeddings[:, 0]), dim=-1)
        self.clamp_temperature()
        scale, positive = flava.logit_scale, b["itm_labels"].bool()
        if cached is not None:  # accumulation: this micro-batch's features among the step's other ones
            image, text, positive, scale = cached.with_live(image, text, scale)
        contrastive = global_contrastive(image, text, scale, positive=positive)
        losses = out.loss_info
        return {
            "contrastive": contrastive,
            "mmm_image": losses.mmm_image,
            "mmm_text": losses.mmm_text,
            "itm": losses.itm,
        }

    def clamp_temperature(self) -> None:
        """FLAVA's bound on the contrastive temperature (logit scale in [0, ln 100]), in place on the stored value.

        Through .data, as the stock model does: under FSDP the parameter is a view of the gathered flat
        parameter here, and autograd refuses in-place changes to such views. FSDP frees that gathered copy
        after the forward, so the trainer clamps its shard again after the optimizer step (train_step).
        """
        self.model.flava.logit_scale.data.clamp_(0, LOGIT_SCALE_MAX)

    def image(self, b: dict) -> dict[str, torch.Tensor]:
        # Only the masked image pass: the stock forward would also run an unmasked pass nothing uses here.
        hidden = self.model.flava.image_model(pixel_values=b["pixel_values"], bool_masked_pos=b["bool_masked_pos"])
        patches = hidden.last_hidden_state[:, 1:]
        mask = b["bool_masked_pos"].bool()
        logits = self.model.mim_head(patches[mask])
        return {"mim": F.cross_entropy(logits.float(), b["mim_labels"][mask])}

    def text(self, b: dict) -> dict[str, torch.Tensor]:
        hidden = self.model.flava.text_model(input_ids=b["input_ids_masked"], attention_mask=b["attention_mask"])
        targets = b["mlm_labels"] != IGNORE
        logits = self.model.mlm_head(hidden.last_hidden_state[targets])
        return {"mlm": F.cross_entropy(logits.float(), b["mlm_labels"][targets])}
