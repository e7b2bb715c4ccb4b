"""The T5 tokenizer exactly as UniAlignment uses it (spec sections 2 and 5).

Training pads with `</s>` (id 1); the release's inference pipeline keeps the pad token of
the checkpoint's tokenizer folder. Sequences are padded/truncated to 256 and no attention
mask is ever used. The mask token of the caption diffusion is `<extra_id_0>` (32099 for
real T5). Tokenizers load from local folders only: nothing comes from a hub.
"""

from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

import numpy as np

MAX_LENGTH = 256
# The prompt training drops an instruction to (10% of samples, the release's " "): what the
# unconditional branch of classifier-free guidance learns.
NULL_PROMPT = " "
MASK_TOKEN = "<extra_id_0>"


PAD_CHOICES = ("eos", "folder")


def load_tokenizer(path: str | os.PathLike, pad: str = "eos"):
    """Loads a T5 tokenizer folder (tokenizer.json / spiece.model).

    `pad="eos"`: pad with `</s>`, as training does; `pad="folder"`: keep the folder's own pad
    token, as the release's inference pipeline does. The T5 class is named directly:
    `AutoTokenizer` would import torch (seconds per data worker) to resolve the class.
    """
    from transformers import T5TokenizerFast

    if pad not in PAD_CHOICES:
        raise ValueError(f"pad must be one of {PAD_CHOICES}, got {pad!r}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    tok = T5TokenizerFast.from_pretrained(os.fspath(path), local_files_only=True)
    if pad == "eos" or tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.convert_tokens_to_ids(MASK_TOKEN) in (None, tok.unk_token_id):
        raise ValueError(f"tokenizer at {path} has no {MASK_TOKEN} token: not a T5 tokenizer")
    return tok


def mask_token_id(tok) -> int:
    """Id of `<extra_id_0>`, the caption diffusion's mask (32099 for the real vocabulary)."""
    return int(tok.convert_tokens_to_ids(MASK_TOKEN))


def tokenize(tok, texts: Sequence[str], max_length: int = MAX_LENGTH) -> np.ndarray:
    """(B, max_length) int32 ids with `</s>`, padded with the tokenizer's pad and truncated."""
    enc = tok(list(texts), padding="max_length", max_length=max_length, truncation=True,
              return_tensors="np")
    return enc["input_ids"].astype(np.int32)


def prompt_ids(tok, prompt: str, max_length: int) -> np.ndarray:
    """A VQA prompt's ids as the release fixes them in the caption sequence: with its
    `</s>`, truncated to `max_length`, unpadded."""
    return np.asarray(tok(prompt, max_length=max_length, truncation=True)["input_ids"],
                      np.int32)


def decode(tok, ids: np.ndarray) -> list[str]:
    """Ids back to text as the release decodes captions: the whole sequence, `</s>`
    removed (other special tokens are kept as text)."""
    return [tok.decode(row).replace(tok.eos_token, "") for row in np.asarray(ids)]


def train_tiny_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 200,
                         extra_ids: int = 100, pad_token: str = "<pad>"):
    """Trains a small T5-style SentencePiece tokenizer offline and saves it to `out_dir`.

    Tests and the quickstart need a real tokenizer with T5's layout (<pad>=0, </s>=1, <unk>=2,
    pieces, then the extra ids with `<extra_id_0>` last) but must not download T5's.
    `pad_token` is the folder's pad token, the one inference pads with (`pad="folder"`).
    """
    import sentencepiece as spm
    from transformers import T5Tokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
        eos_piece="</s>", unk_piece="<unk>", hard_vocab_limit=False, character_coverage=1.0,
        minloglevel=2)
    proc = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(proc.id_to_piece(i), float(proc.get_score(i))) for i in range(proc.get_piece_size())]
    tok = T5Tokenizer(vocab=vocab, extra_ids=extra_ids, pad_token=pad_token)
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(os.fspath(out_dir))
    return load_tokenizer(out_dir)
