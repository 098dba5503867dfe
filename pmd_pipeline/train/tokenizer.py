"""The text tokenizer: a local Hugging Face folder, or a WordPiece vocabulary trained on the shards' text."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pmd_pipeline.errors import PmdError
from pmd_pipeline.train.data import captions_of
from shards.tar import shard_samples

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TRAINED_FOLDER = "tokenizer"  # in the run folder: a vocabulary trained on the shards


def prepare_tokenizer(
    configured: str, run_dir: Path, text_tars: list[str], vocab_size: int, pretrained: str = ""
) -> Path:
    """The folder to load with AutoTokenizer; a trained vocabulary is saved in the run (and reused on resume)."""
    given = _given_tokenizer(configured, pretrained)
    if given:
        return given
    folder = run_dir / TRAINED_FOLDER
    if (folder / "tokenizer.json").exists():
        return folder
    texts = list(_texts(text_tars))
    if not texts:
        raise PmdError("no text in the shards to train a WordPiece vocabulary on; set `tokenizer` to a local folder")
    train_wordpiece(texts, vocab_size).save_pretrained(str(folder))
    return folder


def rank0_tokenizer(configured: str, run_dir: Path, pretrained: str = "") -> Path:
    """The folder rank 0 prepared, for the other ranks (after a barrier); they never train their own."""
    given = _given_tokenizer(configured, pretrained)
    if given:
        return given
    folder = run_dir / TRAINED_FOLDER
    if not (folder / "tokenizer.json").exists():
        raise PmdError(
            f"{folder}, written by rank 0, is not visible to this rank: on several machines the run folder "
            "must be on storage every node sees"
        )
    return folder


def _given_tokenizer(configured: str, pretrained: str) -> Path | None:
    """The configured folder, else a pretrained checkpoint's own; None when the run trains its vocabulary.

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
    if not configured:
        return None
    folder = Path(configured)
    if not _has_tokenizer(folder):
        raise PmdError(f"tokenizer folder {folder} has neither tokenizer.json nor vocab.txt")
    return folder


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists() or (folder / "vocab.txt").exists()


def train_wordpiece(texts: list[str], vocab_size: int, limit_alphabet: int = 1000):
    """A WordPiece vocabulary that is the same on every run over the same texts.

    The `tokenizers` trainer alone is not (huggingface/tokenizers#1794): it numbers the `##c`
    continuation pieces in hash-map order, and merge ties are broken by those numbers, so two runs
    learn different merges and every loss of a run that trains its vocabulary changes. Handing the
    trainer the continuation pieces (sorted) and the alphabet (chosen by count, then character) fixes
    every number before training; the vocabulary is then rebuilt with only the real special tokens.
    """
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    wordpiece = BertWordPieceTokenizer(lowercase=True)
    alphabet, continuations = _alphabet_and_continuations(wordpiece, texts, limit_alphabet)
    wordpiece.train_from_iterator(
        texts,
        vocab_size=vocab_size,
        limit_alphabet=len(alphabet),
        initial_alphabet=alphabet,
        special_tokens=SPECIAL + continuations,
        show_progress=False,
    )
    vocabulary = BertWordPieceTokenizer(wordpiece.get_vocab(), lowercase=True)
    return BertTokenizerFast(tokenizer_object=vocabulary._tokenizer, **_special_kwargs())


def _alphabet_and_continuations(wordpiece, texts: list[str], limit: int) -> tuple[list[str], list[str]]:
    """The `limit` most frequent characters of the words the trainer will see (ties by character),
    and the `##c` piece of each of them that occurs after a word's first character."""
    normalize, split = wordpiece._tokenizer.normalizer.normalize_str, wordpiece._tokenizer.pre_tokenizer
    # The normalizer works character by character, so it can run once per distinct space-separated piece
    # of raw text; the real pre-tokenizer then splits each normalized piece into the trainer's words.
    pieces: Counter[str] = Counter()
    for text in texts:
        pieces.update(text.split(" "))
    counts: Counter[str] = Counter()
    inner: set[str] = set()
    for piece, count in pieces.items():
        for word, _ in split.pre_tokenize_str(normalize(piece)):
            for character in word:
                counts[character] += count
            inner.update(word[1:])
    alphabet = sorted(sorted(counts, key=lambda c: (-counts[c], c))[:limit])
    return alphabet, [f"##{c}" for c in alphabet if c in inner]


def _special_kwargs() -> dict:
    return {
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    }


def _texts(tars: list[str]):
    for sample in shard_samples(tars):
        yield from captions_of(sample)  # every caption is trained on, so every caption is in the vocabulary
