"""The text tokenizer: a local Hugging Face folder, or a WordPiece vocabulary trained on the shards' text."""

from __future__ import annotations

from pathlib import Path

import webdataset as wds

from pmd_pipeline.errors import PmdError

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def prepare_tokenizer(
    configured: str, run_dir: Path, text_tars: list[str], vocab_size: int, pretrained: str = ""
) -> Path:
    """The folder to load with AutoTokenizer; a trained vocabulary is saved in the run (and reused on resume).

    A pretrained checkpoint's text embeddings only make sense with its own vocabulary: with `pretrained`
    and no tokenizer configured, the checkpoint folder's tokenizer is used, and none there is an error.
    """
    if not configured and pretrained:
        if not _has_tokenizer(Path(pretrained)):
            raise PmdError(
                f"the pretrained checkpoint {pretrained} has no tokenizer files; set `tokenizer` to the folder of "
                "the vocabulary it was trained with (e.g. a local copy of bert-base-uncased for flava-full)"
            )
        configured = pretrained
    if configured:
        folder = Path(configured)
        if not _has_tokenizer(folder):
            raise PmdError(f"tokenizer folder {folder} has neither tokenizer.json nor vocab.txt")
        return folder
    folder = run_dir / "tokenizer"
    if (folder / "tokenizer.json").exists():
        return folder
    texts = list(_texts(text_tars))
    if not texts:
        raise PmdError("no text in the shards to train a WordPiece vocabulary on; set `tokenizer` to a local folder")
    train_wordpiece(texts, vocab_size).save_pretrained(str(folder))
    return folder


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists() or (folder / "vocab.txt").exists()


def train_wordpiece(texts: list[str], vocab_size: int):
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False)
    return BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, **_special_kwargs())


def _special_kwargs() -> dict:
    return {
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    }


def _texts(tars: list[str]):
    for sample in wds.tarfile_samples([{"url": t} for t in tars]):
        if "txt" in sample:
            yield sample["txt"].decode("utf-8", errors="replace")
