"""Load the DALL-E dVAE encoder as a `transformers.FlavaImageCodebook`, and name it (its identity goes in the manifest).

Three kinds of weights, all local (nothing is ever downloaded):
- a Hugging Face folder in the `facebook/flava-image-codebook` layout (config.json + weights);
- DALL-E's `encoder.pkl` (a pickled `dall_e.encoder.Encoder` module tree, or its state dict), read by
  torch's weights-only unpickler with only DALL-E's three module classes mapped to inert stand-ins,
  then renamed to FLAVA's keys;
- no path: a seeded random codebook of the real architecture (valid tokens, meaningless content).
"""

from __future__ import annotations

import hashlib
import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # transformers is imported where a model is made: 2.4 s CPU in every Ray worker that
    # imports this module, and a shard task's worker only needs `codebook_identity`
    from transformers import FlavaImageCodebook

from pmd_pipeline.errors import PmdError
from shards.layout import CODEBOOK_SIZE

WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass
class Codebook:
    model: FlavaImageCodebook
    identity: str  # "sha256:<hex of the weights file(s)>" or "random, seed N"
    random: bool


def load_codebook(path: str | Path | None = None, seed: int = 0) -> Codebook:
    """The encoder in eval mode on the CPU; `path` is an HF folder, an encoder.pkl, or empty for a random one."""
    if not path:
        return Codebook(random_codebook(seed), f"random, seed {seed}", random=True)
    path = Path(path).expanduser()
    if path.is_dir():
        model = _load_hf_folder(path)
        identity = files_identity(_weight_files(path))
    elif path.is_file():
        model = _load_dalle_pickle(path)
        identity = files_identity([path])
    else:
        raise PmdError(f"dVAE codebook not found: {path} (give an HF folder or DALL-E's encoder.pkl, or no path)")
    return Codebook(model.eval(), identity, random=False)


def codebook_identity(path: str | Path | None, seed: int = 0) -> str:
    """The identity `load_codebook` would give, without loading the model (for quick refusals)."""
    if not path:
        return f"random, seed {seed}"
    path = Path(path).expanduser()
    if path.is_dir():
        return files_identity(_weight_files(path))
    if path.is_file():
        return files_identity([path])
    raise PmdError(f"dVAE codebook not found: {path} (give an HF folder or DALL-E's encoder.pkl, or no path)")


def random_codebook(seed: int) -> FlavaImageCodebook:
    """The real architecture with DALL-E's own init (N(0, 1/fan_in), zero bias) from a seeded generator.

    DALL-E's init rather than transformers' (std 0.02) keeps the logits spread out, so the random tokens
    use many codes like real ones; our own generator keeps them the same across library versions.
    """
    from transformers import FlavaImageCodebook, FlavaImageCodebookConfig

    model = FlavaImageCodebook(FlavaImageCodebookConfig())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / math.sqrt(fan_in))
                module.bias.zero_()
    return model.eval()


def files_identity(files: list[Path]) -> str:
    """sha256 over the files' bytes in order: the same weights give the same identity wherever they live."""
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not (folder / "config.json").exists() or not files:
        raise PmdError(f"{folder} is not a FlavaImageCodebook folder (needs config.json and *.safetensors or *.bin)")
    return files


def _load_hf_folder(folder: Path) -> FlavaImageCodebook:
    _weight_files(folder)
    try:
        from transformers import FlavaImageCodebook
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a "Loading weights" bar per actor is noise in the build's display
        model = FlavaImageCodebook.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PmdError(f"cannot load the FlavaImageCodebook in {folder}: {err}") from None
    _check_vocab(model.config.vocab_size, folder)
    return model


def _check_vocab(vocab_size: int, where: Path) -> None:
    if vocab_size != CODEBOOK_SIZE:
        raise PmdError(f"{where}: codebook has {vocab_size} codes; the shard format needs DALL-E's {CODEBOOK_SIZE}")


# --- DALL-E's encoder.pkl ---------------------------------------------------------------------------------


class _DalleModule(nn.Module):
    """Stands in for dall_e's Encoder, EncoderBlock and Conv2d while unpickling: holds their parameters only."""

    def forward(self, *args):  # never called: the weights are copied into FlavaImageCodebook
        raise NotImplementedError


class _DalleEncoder(_DalleModule):
    pass


class _DalleEncoderBlock(_DalleModule):
    pass


class _DalleConv2d(_DalleModule):
    pass


# The only classes a pickled DALL-E encoder may name; everything else is refused by the weights-only unpickler.
DALLE_CLASSES = [
    (_DalleEncoder, "dall_e.encoder.Encoder"),
    (_DalleEncoderBlock, "dall_e.encoder.EncoderBlock"),
    (_DalleConv2d, "dall_e.utils.Conv2d"),
    nn.Sequential,
    nn.ReLU,
    nn.MaxPool2d,
    nn.Identity,
    set,
]


def _load_dalle_pickle(path: Path) -> FlavaImageCodebook:
    from transformers import FlavaImageCodebook, FlavaImageCodebookConfig

    state = dalle_state_dict(path)
    model = FlavaImageCodebook(FlavaImageCodebookConfig())
    renamed = dalle_to_flava_keys(state)
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    if missing or unexpected:
        raise PmdError(
            f"{path} is not DALL-E's encoder: {len(missing)} weights missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    return model


def dalle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """DALL-E's parameters by their own names (`blocks.group_1.block_1.res_path.conv_1.w`), read safely."""
    if not zipfile.is_zipfile(path) and not _looks_like_legacy_torch(path):
        raise PmdError(f"{path} is neither an HF folder nor a torch-saved DALL-E encoder.pkl")
    try:
        with torch.serialization.safe_globals(DALLE_CLASSES):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as err:
        raise PmdError(f"refusing to load {path}: not a plain DALL-E encoder ({str(err).splitlines()[0]})") from None
    state = loaded.state_dict() if isinstance(loaded, nn.Module) else loaded
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PmdError(f"{path} holds {type(loaded).__name__}, not a DALL-E encoder or its state dict")
    return state


def _looks_like_legacy_torch(path: Path) -> bool:
    """torch.save's pre-1.6 format starts with a pickle protocol opcode (0x80)."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def dalle_to_flava_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename DALL-E's keys to FlavaImageCodebook's (the mapping of transformers' conversion script).

    `blocks.group_1.block_1.res_path.conv_1.w` -> `blocks.group_1.group.block_1.res_path.path.conv_1.weight`;
    `blocks.input.b` -> `blocks.input.bias`. Values are cast to fp32 (DALL-E stored some as fp16).
    """
    renamed = {}
    for key, value in state.items():
        for group in ("group_1", "group_2", "group_3", "group_4"):
            key = key.replace(f"{group}.", f"{group}.group.")
        key = key.replace("res_path.", "res_path.path.")
        if key.endswith(".w"):
            key = key[: -len(".w")] + ".weight"
        elif key.endswith(".b"):
            key = key[: -len(".b")] + ".bias"
        renamed[key] = value.float()
    return renamed
