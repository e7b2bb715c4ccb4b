"""UniAlignment's learned mask embedding: the T5 input-embedding row of the mask token.

The release ships it as a pickled torch tensor (`mask_token_emb.00-of-01.pth`, bf16 [4096]);
.safetensors (one tensor) and .npy files are accepted too, so torch is only needed for .pth.
"""

from __future__ import annotations

import os

import numpy as np

from unialign_convert.safetensors_io import ConversionError, SafetensorsFile

DEFAULT_MASK_TOKEN_ID = 32099  # <extra_id_0> in the T5 vocabulary


def _read_torch(path: str) -> np.ndarray:
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{path}: reading a .pth mask embedding needs PyTorch, which is "
                              "not installed; install torch or pass a .safetensors/.npy "
                              "file") from None
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or foreign pickles
        raise ConversionError(f"{path}: not a readable torch tensor file ({e})") from None
    if isinstance(value, dict) and len(value) == 1:
        value = next(iter(value.values()))
    if not isinstance(value, torch.Tensor):
        raise ConversionError(f"{path}: holds a {type(value).__name__}, not one tensor")
    return value.detach().float().numpy()


def _read_safetensors(path: str) -> np.ndarray:
    f = SafetensorsFile(path)
    if len(f.keys()) != 1:
        raise ConversionError(f"{path}: expected exactly one tensor, found {f.keys()}")
    return f.get(f.keys()[0])


def _read_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ConversionError(f"{path}: not a readable .npy array ({e})") from None


_READERS = {".pth": _read_torch, ".pt": _read_torch, ".bin": _read_torch,
            ".safetensors": _read_safetensors, ".npy": _read_npy}


def read_mask_embedding(path: str, width: int) -> np.ndarray:
    """The (width,) vector in `path`, in its stored precision widened to float32."""
    if not os.path.isfile(path):
        raise ConversionError(f"mask embedding file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in _READERS:
        raise ConversionError(f"{path}: unsupported mask embedding format {ext!r}; "
                              f"use one of {sorted(_READERS)}")
    vector = np.asarray(_READERS[ext](path), dtype=np.float32)
    if vector.size != width or vector.ndim > 2:
        raise ConversionError(f"{path}: mask embedding has shape {vector.shape}, expected "
                              f"({width},) to match the text encoder width")
    return vector.reshape(width)


def apply_mask_embedding(table: np.ndarray, vector: np.ndarray, token_id: int) -> None:
    """Writes `vector` into row `token_id` of the (vocab, width) embedding table, in place."""
    if not 0 <= token_id < table.shape[0]:
        raise ConversionError(f"mask token id {token_id} is outside the embedding table "
                              f"({table.shape[0]} rows)")
    table[token_id] = vector.astype(table.dtype)
