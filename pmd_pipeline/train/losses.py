"""Global contrastive loss over all ranks, with gradients flowing back through the all-gather."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather
from torch.nn import functional as F


def global_contrastive(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, positive=None):
    """Each rank scores its rows against every rank's columns; DDP's gradient average then equals the
    gradient of the full-batch loss (local batch sizes must be equal, which the loader guarantees)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if world > 1:
        with warnings.catch_warnings():  # deprecated in name only; it is the public autograd all-gather
            warnings.simplefilter("ignore", FutureWarning)
            all_image, all_text = torch.cat(all_gather(image)), torch.cat(all_gather(text))
    else:
        all_image, all_text = image, text
    scale = logit_scale.exp()
    labels = rank * image.shape[0] + torch.arange(image.shape[0], device=image.device)
    per_image = image @ all_text.T * scale
    per_text = text @ all_image.T * scale
    if positive is not None and positive.any():  # rows whose caption was swapped for ITM have no match
        per_image, per_text, labels = per_image[positive], per_text[positive], labels[positive]
    return (F.cross_entropy(per_image.float(), labels) + F.cross_entropy(per_text.float(), labels)) / 2
