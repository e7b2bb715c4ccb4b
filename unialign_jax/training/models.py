"""The three models of a training run — trained transformer, frozen T5 and VAE — built
directly in their sharded placement (random init inside `jit` with out-shardings, or
read from converted folders straight into place), or only abstractly for planning."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from unialign_jax.models.mmdit import MMDiT, MMDiTConfig
from unialign_jax.models.t5 import T5Config, T5Encoder
from unialign_jax.models.vae import AutoencoderKL, VAEConfig
from unialign_jax.parallel import rules


@dataclasses.dataclass
class SplitModel:
    """A module as (graph definition, state as a nested dict of arrays or abstract arrays);
    `params` are the trained `nnx.Param`s (empty for frozen models), `rest` the others."""

    graphdef: nnx.GraphDef
    params: dict
    rest: dict

    def module(self, params: dict | None = None) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params if params is None else params, self.rest)


def _split(module: nnx.Module, trainable: bool) -> SplitModel:
    if trainable:
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)
        return SplitModel(graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest))
    graphdef, state = nnx.split(module)
    return SplitModel(graphdef, {}, nnx.to_pure_dict(state))


def _sharded_init(build: Callable[[], nnx.Module], mesh: Mesh) -> nnx.Module:
    """Random initialisation computed in place: each device creates only its shards."""
    abstract = nnx.eval_shape(build)
    shardings = rules.state_shardings(nnx.state(abstract), mesh)
    state = jax.jit(lambda: nnx.state(build()), out_shardings=shardings)()
    return nnx.merge(nnx.graphdef(abstract), state)


def _abstract(build: Callable[[], nnx.Module], mesh: Mesh) -> nnx.Module:
    """The module with ShapeDtypeStructs carrying their shardings: nothing is allocated."""
    abstract = nnx.eval_shape(build)
    state = nnx.state(abstract)
    shardings = rules.state_shardings(state, mesh)
    placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, shardings)
    return nnx.merge(nnx.graphdef(abstract), placed)


def transformer_config(cfg, vocab_size: int | None) -> MMDiTConfig:
    """The transformer's config: from `init_from`, else `cfg.transformer` fields with the
    tokenizer's length as vocabulary (the full-size defaults otherwise)."""
    if cfg.init_from:
        from unialign_jax.checkpoints.transformer import read_config

        config, _ = read_config(cfg.init_from)
        if config.is_sd3:
            raise ValueError(f"{cfg.init_from} is an SD3-layout transformer; port it first with "
                             "`unialign-convert transformer SRC DST --to unialignment "
                             "--vocab-size N`")
    else:
        fields = dict(cfg.transformer)
        if vocab_size is not None:
            fields.setdefault("vocab_size", vocab_size)
        config = MMDiTConfig(**fields)
    if vocab_size is not None and config.vocab_size != vocab_size:
        raise ValueError(f"transformer vocabulary {config.vocab_size} differs from the "
                         f"tokenizer's length {vocab_size}")
    return config


def build_models(cfg, mesh: Mesh, vocab_size: int | None, *, abstract: bool = False
                 ) -> dict[str, SplitModel]:
    """{'transformer', 't5', 'vae'}, placed on `mesh` by the logical-axis rules.

    `abstract=True` builds ShapeDtypeStructs only (memory planning); converted folders are
    then read for their configs, never for weights.
    """
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    frozen_dtype = jnp.dtype(cfg.frozen_param_dtype)
    tcfg = transformer_config(cfg, vocab_size)
    t5_cfg = _frozen_config(cfg.t5_path, "unialign_jax.t5", T5Config, cfg.t5)
    vae_cfg = _frozen_config(cfg.vae_path, "unialign_jax.vae", VAEConfig, cfg.vae)
    if t5_cfg.d_model != tcfg.joint_attention_dim:
        raise ValueError(f"T5 width {t5_cfg.d_model} differs from the transformer's context "
                         f"width {tcfg.joint_attention_dim}")
    if vae_cfg.latent_channels != tcfg.in_channels:
        raise ValueError(f"VAE latent channels {vae_cfg.latent_channels} differ from the "
                         f"transformer's input channels {tcfg.in_channels}")
    if vocab_size is not None and t5_cfg.vocab_size < vocab_size:
        raise ValueError(f"T5 vocabulary {t5_cfg.vocab_size} is smaller than the tokenizer's "
                         f"{vocab_size}")

    builders: dict[str, tuple[Callable[[], nnx.Module], str | None, Callable]] = {
        "transformer": (lambda: MMDiT(tcfg, rngs=nnx.Rngs(cfg.seed), dtype=dtype,
                                      param_dtype=param_dtype, remat_policy=cfg.remat_policy),
                        cfg.init_from, _load_transformer(dtype, param_dtype, cfg.remat_policy)),
        "t5": (lambda: T5Encoder(t5_cfg, rngs=nnx.Rngs(cfg.seed + 1), dtype=dtype,
                                 param_dtype=frozen_dtype),
               cfg.t5_path, _load_frozen("load_t5", dtype, frozen_dtype)),
        "vae": (lambda: AutoencoderKL(vae_cfg, rngs=nnx.Rngs(cfg.seed + 2), dtype=dtype,
                                      param_dtype=frozen_dtype),
                cfg.vae_path, _load_frozen("load_vae", dtype, frozen_dtype)),
    }
    out = {}
    for name, (build, path, load) in builders.items():
        if abstract:
            module = _abstract(build, mesh)
        elif path:
            module = load(path, rules.module_shardings(mesh))
        else:
            module = _sharded_init(build, mesh)
        out[name] = _split(module, trainable=name == "transformer")
    return out


def _frozen_config(path: str | None, fmt: str, klass, fields: dict) -> Any:
    if path:
        from unialign_jax.checkpoints import module_io

        config, _ = module_io.read_config(path, fmt)
        return klass.from_dict(config)
    return klass(**fields)


def _load_transformer(dtype, param_dtype, remat_policy):
    from unialign_jax.checkpoints.transformer import load_transformer

    return lambda path, shardings: load_transformer(
        path, dtype, param_dtype=param_dtype, remat_policy=remat_policy, shardings=shardings)


def _load_frozen(loader: str, dtype, param_dtype):
    import unialign_jax

    return lambda path, shardings: getattr(unialign_jax, loader)(
        path, dtype, param_dtype=param_dtype, shardings=shardings)
