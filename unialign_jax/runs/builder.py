"""The models of a run — trained transformer, frozen T5 and VAE — built in one place for
everyone who needs them: the trainer (`build_models`), the memory planner (abstractly), and
the readers of a finished run (`runs.work_dir`: sampling from a run, `from-run`, exports).

`run_model` is the one way a run's model comes to be: read from the converted folder the
run names, straight into its sharded placement, or drawn at random inside `jit` from the
run's seed table, each device creating only its own shards — the same draw, bit for bit,
whoever asks. A LoRA run (`lora.rank > 0`) builds the transformer as its frozen base, in
`lora.base_dtype`, and wraps the targeted layers with factors initialised in place
(`models.lora`); its trained parameters are then only the factors and the `train_also`
tensors (in `compute.param_dtype`), and the base joins the frozen state.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from unialign_jax.checkpoints import registry
from unialign_jax.models import lora as lora_layers
from unialign_jax.models.mmdit import MMDiTConfig
from unialign_jax.models.runtime import Runtime
from unialign_jax.parallel import rules
from unialign_jax.runs.config import ComputeConfig, LoraConfig, ModelsConfig

TRAINED = "transformer"
# What each random draw of a run adds to run.seed: the three models' initialisations and
# the LoRA factors'. Every reader that redraws a run's random models looks them up here.
SEED_OFFSETS = {"transformer": 0, "t5": 1, "vae": 2, "lora": 3}


@dataclasses.dataclass
class SplitModel:
    """A module as (graph definition, state as a nested dict of arrays or abstract arrays);
    `params` are the trained `nnx.Param`s (empty for frozen models), `rest` the others."""

    graphdef: nnx.GraphDef
    params: dict
    rest: dict

    def module(self, params: dict | None = None) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params if params is None else params, self.rest)


def _split(module: nnx.Module, trained=None) -> SplitModel:
    """`trained`: the nnx filter of the trained variables (None: a frozen model)."""
    if trained is not None:
        graphdef, params, rest = nnx.split(module, trained, ...)
        return SplitModel(graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest))
    graphdef, state = nnx.split(module)
    return SplitModel(graphdef, {}, nnx.to_pure_dict(state))


def wrap_factors(module: nnx.Module, lora: LoraConfig, param_dtype, seed: int = 0):
    """Wraps `module`'s `lora.targets` layers with factors of the run's shapes, abstract
    (shapes and dtypes only); returns the draw that fills them from run `seed`'s LoRA key."""
    draw = functools.partial(lora_layers.new_factors,
                             lora_layers.target_shapes(module, lora.targets), lora.rank,
                             jax.random.key(seed + SEED_OFFSETS["lora"]), lora.init, param_dtype)
    lora_layers.wrap(module, jax.eval_shape(draw), lora.scale)
    return draw


def add_lora(module: nnx.Module, lora: LoraConfig, param_dtype, mesh: Mesh, seed: int,
             abstract: bool = False):
    """Wraps `module`'s targeted layers with fresh factors drawn in place (from `seed`),
    casts its `train_also` tensors to `param_dtype`; returns the trained filter."""
    lora_layers.check_train_also(module, lora.train_also)
    draw = wrap_factors(module, lora, param_dtype, seed)
    factors = nnx.state(module, lora_layers.LoraParam)
    shardings = nnx.to_pure_dict(rules.state_shardings(factors, mesh))
    if abstract:
        values = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              nnx.to_pure_dict(factors), shardings)
        cast = lambda x: jax.ShapeDtypeStruct(  # noqa: E731
            x.shape, param_dtype, sharding=x.sharding)
    else:
        values = jax.jit(draw, out_shardings=shardings)()
        cast = lambda x: x.astype(param_dtype)  # noqa: E731
    nnx.replace_by_pure_dict(factors, values)
    full = nnx.state(module, lora_layers.full_filter(lora.train_also))
    nnx.update(module, factors, jax.tree.map(cast, full))
    return lora_layers.trained_filter(lora.train_also)


def transformer_config(models: ModelsConfig, vocab_size: int | None) -> MMDiTConfig:
    """The transformer's config: from `transformer_path`, else `models.transformer` with the
    tokenizer's length as vocabulary when it leaves vocab_size None."""
    if models.transformer_path:
        config, _ = registry.read_config(models.transformer_path, "transformer")
        if config.is_sd3:
            raise ValueError(f"{models.transformer_path} is an SD3-layout transformer; port it "
                             "first with `unialign-convert transformer SRC DST --to "
                             "unialignment --vocab-size N`")
    else:
        config = models.transformer
        if config.vocab_size is None and vocab_size is not None:
            config = dataclasses.replace(config, vocab_size=vocab_size)
    if vocab_size is not None and config.vocab_size != vocab_size:
        raise ValueError(f"transformer vocabulary {config.vocab_size} differs from the "
                         f"tokenizer's length {vocab_size}")
    return config


def frozen_config(models: ModelsConfig, kind: str):
    """The config of the frozen `kind` ('t5' or 'vae'): from its folder when given, else
    the inline one."""
    path = getattr(models, f"{kind}_path")
    return registry.read_config(path, kind)[0] if path else getattr(models, kind)


def frozen_configs(models: ModelsConfig):
    """(T5 config, VAE config)."""
    return frozen_config(models, "t5"), frozen_config(models, "vae")


def stored_dtype(compute: ComputeConfig, lora: LoraConfig, kind: str):
    """The dtype a run keeps its `kind` model in as it builds it: the trained transformer in
    compute.param_dtype, a LoRA run's frozen base in lora.base_dtype (default: the compute
    dtype), the frozen T5 and VAE in compute.frozen_param_dtype."""
    if kind != TRAINED:
        return jnp.dtype(compute.frozen_param_dtype)
    return jnp.dtype((lora.base_dtype or compute.dtype) if lora.rank else compute.param_dtype)


def build_models(models: ModelsConfig, compute: ComputeConfig, mesh: Mesh,
                 vocab_size: int | None, *, seed: int = 0, abstract: bool = False,
                 lora: LoraConfig = LoraConfig()) -> dict[str, SplitModel]:
    """{'transformer', 't5', 'vae'}, placed on `mesh` by the logical-axis rules, their
    activations constrained by the same rules; with `lora.rank`, the transformer is a
    frozen base carrying trained LoRA factors.

    `abstract=True` builds ShapeDtypeStructs only (memory planning); converted folders are
    then read for their configs, never for weights.
    """
    tcfg = transformer_config(models, vocab_size)
    t5_cfg, vae_cfg = frozen_configs(models)
    if t5_cfg.d_model != tcfg.joint_attention_dim:
        raise ValueError(f"T5 width {t5_cfg.d_model} differs from the transformer's context "
                         f"width {tcfg.joint_attention_dim}")
    if vae_cfg.latent_channels != tcfg.in_channels:
        raise ValueError(f"VAE latent channels {vae_cfg.latent_channels} differ from the "
                         f"transformer's input channels {tcfg.in_channels}")
    if vocab_size is not None and t5_cfg.vocab_size < vocab_size:
        raise ValueError(f"T5 vocabulary {t5_cfg.vocab_size} is smaller than the tokenizer's "
                         f"{vocab_size}")

    runtime = compute.runtime(mesh)
    out = {}
    for name, config, folder in (("transformer", tcfg, models.transformer_path),
                                 ("t5", t5_cfg, models.t5_path),
                                 ("vae", vae_cfg, models.vae_path)):
        made_in = dataclasses.replace(runtime, param_dtype=stored_dtype(compute, lora, name))
        module = run_model(name, config, made_in, seed=seed, folder=folder, abstract=abstract)
        trained = None if name != TRAINED else (
            add_lora(module, lora, jnp.dtype(compute.param_dtype), mesh, seed, abstract)
            if lora.rank else nnx.Param)
        out[name] = _split(module, trained)
    return out


def run_model(kind: str, config, runtime: Runtime, *, seed: int = 0, folder: str | None = None,
              abstract: bool = False) -> nnx.Module:
    """The `kind` model ('transformer', 't5' or 'vae') a run starts from, made in
    `runtime.param_dtype` (None: float32) and placed by `runtime.shardings` as it is made:
    read from its converted `folder` when the run names one, else drawn from
    `nnx.Rngs(seed + SEED_OFFSETS[kind])` (`seed`: the run's). `abstract`: only
    ShapeDtypeStructs carrying their shardings — nothing is read, drawn or allocated."""
    module_class = registry.KINDS[kind].module_class
    seed = seed + SEED_OFFSETS[kind]
    build = lambda: runtime.build(module_class, config, nnx.Rngs(seed))  # noqa: E731
    if folder and not abstract:
        return registry.restore_module(folder, build, runtime.param_dtype, runtime.shardings)
    shape = nnx.eval_shape(build)
    placement = runtime.shardings(shape) if runtime.shardings is not None else None
    if abstract:
        if placement is None:
            return shape
        state = nnx.state(shape)
        return nnx.merge(nnx.graphdef(shape), jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, placement))
    state = _initialiser(module_class, config, seed, jnp.dtype(runtime.param_dtype or "float32"),
                         nnx.Variable, _hashable(placement))()
    return nnx.merge(nnx.graphdef(shape), state)


def fixed_buffers(model_config: MMDiTConfig, param_dtype,
                  placement: nnx.State | None = None) -> nnx.State:
    """The transformer's variables that are not trained parameters (the position table),
    computed from its config; the parameters' initialisation is compiled away."""
    return _initialiser(registry.KINDS[TRAINED].module_class, model_config, 0,
                        jnp.dtype(param_dtype), nnx.Not(nnx.Param), _hashable(placement))()


def _hashable(tree):
    return None if tree is None else (jax.tree.structure(tree), tuple(jax.tree.leaves(tree)))


@functools.lru_cache(maxsize=16)
def _initialiser(module_class, model_config, seed: int, param_dtype, which, placement):
    """The jitted initialisation of the `which` variables of a module (`nnx.Variable`: all;
    `nnx.Not(nnx.Param)`: the fixed buffers) with out-shardings `placement`, cached so that
    loading a run again reuses the compiled program. The compute dtype and the other runtime
    options change no initial value, so they are left out."""
    out = None if placement is None else jax.tree.unflatten(*placement)
    return jax.jit(lambda: nnx.state(module_class(model_config, rngs=nnx.Rngs(seed),
                                                  param_dtype=param_dtype), which),
                   out_shardings=out)
