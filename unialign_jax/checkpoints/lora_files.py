"""LoRA files in the diffusers / PEFT layout, read and written without PyTorch.

One safetensors file holding, per adapted layer, `transformer.<diffusers module>.lora_A.weight`
(r, in) and `.lora_B.weight` (out, r): the names that `pipe.load_lora_weights` and
`SD3Transformer2DModel.load_lora_adapter` (peft backend) take, mapped with the converter's
own table (`models.mmdit_names`).

The scale: PEFT computes alpha / r, and diffusers' `save_lora_weights` stores alpha in the
header entry `lora_adapter_metadata` (the `peft.LoraConfig` arguments). diffusers 0.42
reads that entry in `pipe.load_lora_weights`, but `transformer.load_lora_adapter(file)`
does not (it opens the file down its `.bin` path) and then takes alpha = r, as do loaders
that ignore the entry. So `write_lora` folds alpha / r into B and declares lora_alpha = r:
every loader gets the same update. `read_lora` honours the entry when a file has one
(alpha, alpha_pattern, use_rslora) and otherwise takes alpha = r, like diffusers.
"""

from __future__ import annotations

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.flax
from flax import nnx, traverse_util
from safetensors import SafetensorError, safe_open

from unialign_jax import files
from unialign_jax.checkpoints.io import CheckpointError
from unialign_jax.models import lora
from unialign_jax.models.mmdit import MMDiT, MMDiTConfig
from unialign_jax.models.mmdit_names import diffusers_module

METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PREFIX = "transformer"
PEFT_DEFAULT_ALPHA = 8  # peft.LoraConfig's lora_alpha when metadata leaves it out
_KEY = re.compile(rf"(?:{PREFIX}\.)?(?P<module>.+)\.lora_(?P<factor>[AB])\.weight")
# Components of diffusers' SD3 pipeline other than the transformer, as LoRA keys name them.
_OTHER_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")
_LIST = 12  # keys named per problem


def layer_names(module: MMDiT) -> dict[str, tuple[lora.Path, int | None]]:
    """{diffusers module name: (our layer path, its block in a stacked layer or None)} of
    every linear layer of `module` (it may be abstract)."""
    out = {}
    for path in lora.linear_paths(module):
        kernel = lora.layer(module, path).kernel
        for block in (range(kernel.shape[0]) if kernel.ndim == 3 else (None,)):
            out[diffusers_module(path, module.config, block)] = (path, block)
    return out


def write_lora(path: str, config: MMDiTConfig, factors: dict, scale: float,
               dtype=jnp.float32, about: dict | None = None) -> dict:
    """Writes the factor tree `factors` (one rank) of a `config` model with its `scale`
    (alpha / rank) folded into B, atomically; `about` (JSON) is kept in the header as
    'unialign_lora'. Returns a summary."""
    abstract = nnx.eval_shape(lambda: MMDiT(config, rngs=nnx.Rngs(0)))
    names = {where: name for name, where in layer_names(abstract).items()}
    tensors, ranks = {}, set()
    for layer_path, (a, b) in lora.split_tree(factors)[0].items():
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32) * scale
        ranks.add(a.shape[-1])
        for block in (range(a.shape[0]) if a.ndim == 3 else (None,)):
            name = f"{PREFIX}.{names[(layer_path, block)]}"
            ai, bi = (a, b) if block is None else (a[block], b[block])
            tensors[f"{name}.lora_A.weight"] = jnp.asarray(ai.T, dtype)
            tensors[f"{name}.lora_B.weight"] = jnp.asarray(bi.T, dtype)
    if len(ranks) != 1:
        raise ValueError(f"the factors have ranks {sorted(ranks)}; a LoRA file here has one")
    rank = ranks.pop()
    modules = sorted({k.split(".", 1)[1].rsplit(".lora_", 1)[0] for k in tensors})
    adapter = {"r": rank, "lora_alpha": rank, "target_modules": modules}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(
        {f"{PREFIX}.{k}": v for k, v in adapter.items()}, sort_keys=True)}
    if about is not None:
        metadata["unialign_lora"] = json.dumps(about, sort_keys=True)
    files.write_bytes(path, safetensors.flax.save(tensors, metadata=metadata))
    return {"tensors": len(tensors), "layers": len(modules), "rank": rank, "scale": scale}


def _open(path: str) -> tuple[dict[str, np.ndarray], dict]:
    try:
        with safe_open(path, framework="flax") as f:
            metadata = f.metadata() or {}
            tensors = {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"LoRA file not found: {path}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    try:
        adapter = json.loads(metadata.get(METADATA_KEY) or "null")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: unreadable {METADATA_KEY} metadata ({e})") from None
    if adapter is not None:  # LoraConfig arguments, prefixed with the component's name
        adapter = {k.removeprefix(f"{PREFIX}."): v for k, v in adapter.items()
                   if "." not in k or k.startswith(f"{PREFIX}.")}
    return tensors, adapter


def _scale(module_name: str, rank: int, adapter: dict | None) -> float:
    """alpha / r of one layer as PEFT computes it from the adapter config (alpha_pattern
    keys match a module name's suffix; use_rslora: alpha / √r); no config: 1."""
    if adapter is None:
        return 1.0
    alpha = adapter.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    for pattern, value in (adapter.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            alpha = value
            break
    return alpha / (math.sqrt(rank) if adapter.get("use_rslora") else rank)


def _listing(keys: list[str]) -> str:
    more = f", … ({len(keys) - _LIST} more)" if len(keys) > _LIST else ""
    return ", ".join(keys[:_LIST]) + more


def read_lora(path: str, module: MMDiT) -> tuple[dict, dict]:
    """(factor tree, summary) of a LoRA file for `module`: A (…, in, r), B (…, r, out), with
    each layer's alpha / r folded into B (so the scale left to apply is the user's); the
    blocks of a stacked layer that the file leaves out get zero factors, ranks that differ
    between blocks are zero-padded. Every problem is reported at once (CheckpointError)."""
    tensors, adapter = _open(path)
    if adapter and adapter.get("use_dora"):
        raise CheckpointError(f"{path} is a DoRA adapter; only plain LoRA is supported")
    names = layer_names(module)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    not_lora, unknown, bad_shape = [], [], []
    for key, value in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None or key.split(".", 1)[0] in _OTHER_COMPONENTS:
            not_lora.append(key)
        elif match["module"] not in names:
            unknown.append(key)
        else:
            pairs.setdefault(match["module"], {})[match["factor"]] = value
    unpaired = [f"{m}.lora_{'B' if 'A' in d else 'A'}.weight" for m, d in sorted(pairs.items())
                if len(d) < 2]
    for name, d in sorted(pairs.items()):
        fan_in, fan_out = lora.layer(module, names[name][0]).kernel.shape[-2:]
        a, b = d.get("A"), d.get("B")
        if a is not None and (a.ndim != 2 or a.shape[1] != fan_in):
            bad_shape.append(f"{name}.lora_A.weight {a.shape} (expected (r, {fan_in}))")
        if b is not None and (b.ndim != 2 or b.shape[0] != fan_out
                              or (a is not None and b.shape[1] != a.shape[0])):
            rank = "r" if a is None else a.shape[0]
            bad_shape.append(f"{name}.lora_B.weight {b.shape} (expected ({fan_out}, {rank}))")
    problems = {"keys that are not transformer LoRA factors (lora_A / lora_B weights; "
                "text-encoder LoRAs, LoRA biases and DoRA are not supported)": not_lora,
                "keys that match no layer of this model": unknown,
                "factors without their partner": unpaired, "shape mismatches": bad_shape}
    found = [f"{what}: {_listing(keys)}" for what, keys in problems.items() if keys]
    if found or not pairs:
        raise CheckpointError(f"{path} cannot be loaded into this transformer:\n  "
                              + ("\n  ".join(found) or "it holds no LoRA factors"))
    return _stack(module, names, pairs, adapter), {
        "layers": len(pairs), "ranks": sorted({d["A"].shape[0] for d in pairs.values()}),
        "alpha_from_metadata": adapter is not None}


def _stack(module, names, pairs, adapter) -> dict:
    """Per-block factors into the factor tree of `module`'s (stacked) layers."""
    by_layer: dict[lora.Path, dict] = {}
    for name, d in pairs.items():
        by_layer.setdefault(names[name][0], {})[names[name][1]] = (
            d["A"].T, d["B"].T * _scale(name, d["A"].shape[0], adapter))
    flat = {}
    for layer_path, blocks in by_layer.items():
        shape = lora.layer(module, layer_path).kernel.shape
        rank = max(a.shape[1] for a, _ in blocks.values())
        a_all = np.zeros((*shape[:-1], rank), np.float32)
        b_all = np.zeros((*shape[:-2], rank, shape[-1]), np.float32)
        for block, (a, b) in blocks.items():
            where = () if block is None else (block,)
            a_all[(*where, ..., slice(0, a.shape[1]))] = a
            b_all[(*where, slice(0, b.shape[0]), slice(None))] = b
        flat[(*layer_path, "lora_a")], flat[(*layer_path, "lora_b")] = a_all, b_all
    return jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat))
