"""A run's model out of its checkpoint: rebuilt from the config it carries, and exported as a Hugging Face folder.

The exported folder is what `FlavaForPreTraining.from_pretrained` and `FlavaModel.from_pretrained` load
(local_files_only), with the run's tokenizer, the codebook identity of the tokens it learned (CODEBOOK_FILE)
and the resolved train config (CONFIG_FILE): `model.pretrained = DIR` continues from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pmd_pipeline.errors import PmdError
from pmd_pipeline.train.checkpoint import check_codebook, last_checkpoint, read_checkpoint
from pmd_pipeline.train.config import TrainConfig, as_dict, config_from_dict
from pmd_pipeline.train.model import build_model
from pmd_pipeline.train.tokenizer import TRAINED_FOLDER

CODEBOOK_FILE = "pmd_codebook.json"  # {"codebook": identity}: which dVAE's codes the MIM heads predict
CONFIG_FILE = "pmd_train_config.json"  # the resolved train config of the run the weights come from


@dataclass
class Trained:
    model: object  # FlavaForPreTraining with the checkpoint's weights, in eval mode
    tokenizer_dir: Path
    config: TrainConfig
    codebook: str | None
    checkpoint: Path


def checkpoint_path(path: str | Path) -> Path:
    """A step_*.pt as given, or a run folder's last checkpoint."""
    path = Path(path)
    if path.is_file():
        return path
    found = last_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise PmdError(f"{path} is neither a checkpoint (step_*.pt) nor a run folder with checkpoints/step_*.pt")
    return found


def load_trained(path: str | Path) -> Trained:
    """The model of a run folder (its last checkpoint) or of one step_*.pt, with the run's tokenizer."""
    from transformers import AutoTokenizer

    checkpoint = checkpoint_path(path)
    state = read_checkpoint(checkpoint)
    if not state.get("config"):
        raise PmdError(f"{checkpoint} carries no train config (made before checkpoints did): cannot rebuild its model")
    cfg = config_from_dict(state["config"], f"the config in {checkpoint}")
    tokenizer_dir = run_tokenizer(checkpoint.parent.parent, cfg)
    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True))
    model = build_model(cfg.model, vocab, max(cfg.data.pair_text_len, cfg.data.text_len))  # as train() built it
    model.load_state_dict(state["model"])
    return Trained(model.eval(), tokenizer_dir, cfg, state.get("codebook"), checkpoint)


def run_tokenizer(run_dir: Path, cfg: TrainConfig) -> Path:
    """The vocabulary the run trained with: its own (trained on the shards), else the configured or pretrained one."""
    for folder in (run_dir / TRAINED_FOLDER, Path(cfg.tokenizer or cfg.model.pretrained or run_dir / TRAINED_FOLDER)):
        if (folder / "tokenizer.json").exists() or (folder / "vocab.txt").exists():
            return folder
    raise PmdError(f"no tokenizer for the run in {run_dir}: neither {run_dir / TRAINED_FOLDER} nor a configured one")


def export(path: str | Path, to: Path) -> Path:
    """Write the run's model as a Hugging Face FLAVA folder `to`; returns the checkpoint it came from."""
    from transformers import AutoTokenizer

    trained = load_trained(path)
    to = Path(to)
    if to.exists() and any(to.iterdir()):
        raise PmdError(f"{to} exists and is not empty: export into a new folder")
    to.mkdir(parents=True, exist_ok=True)
    trained.model.save_pretrained(str(to))
    AutoTokenizer.from_pretrained(str(trained.tokenizer_dir), local_files_only=True).save_pretrained(str(to))
    write_codebook(to, trained.codebook)
    (to / CONFIG_FILE).write_text(json.dumps(as_dict(trained.config), indent=1) + "\n")
    return trained.checkpoint


def write_codebook(folder: Path, identity: str | None) -> None:
    (Path(folder) / CODEBOOK_FILE).write_text(json.dumps({"codebook": identity}) + "\n")


def folder_codebook(folder: str | Path) -> str | None:
    """The codebook identity an exported folder carries; None for a folder without one (a stock FLAVA)."""
    path = Path(folder) / CODEBOOK_FILE
    return json.loads(path.read_text()).get("codebook") if path.exists() else None


def check_pretrained_codebook(folder: str | Path, shards_codebook: str) -> None:
    """Continuing from a pretrained folder: its MIM heads predict its codebook's codes, so the shards' must match.

    A folder without an identity is a stock FLAVA (facebook/flava-full learned DALL-E's dVAE codes): shards
    tokenized with a random codebook are refused for it; a real codebook is taken on the user's word."""
    identity = folder_codebook(folder)
    if identity is None and shards_codebook.startswith("random"):
        raise PmdError(
            f"{folder} has no {CODEBOOK_FILE} (a stock FLAVA checkpoint: its MIM heads learned DALL-E's dVAE codes), "
            f"but the shards carry tokens of codebook {shards_codebook!r}: tokenize them with FLAVA's codebook "
            "(`pmd tokenize OUT --codebook <facebook/flava-image-codebook folder> --force`)"
        )
    check_codebook(identity, shards_codebook, folder)
