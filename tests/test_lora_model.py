"""LoRA on the MMDiT (`unialign_jax.models.lora`) and its config section: the wrapped
layer's output against numpy, merged against unmerged, exact removal, what the trainer
builds (trained / frozen split, dtypes, shardings' logical names), clear errors."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from unialign_jax import configlib
from unialign_jax.models import lora
from unialign_jax.models.mmdit import MMDiT, MMDiTConfig
from unialign_jax.models.runtime import Runtime
from unialign_jax.parallel import make_mesh, placed_on
from unialign_jax.runs.config import LoraConfig, TrainConfig
from unialign_jax.runs.builder import add_lora, run_model
from unialign_jax.runs.resolve import resolve

RTOL = 1e-5  # float32: merged vs unmerged, wrapped layer vs numpy
CONFIG = MMDiTConfig.tiny(vocab_size=20)
TARGETS = ("image_attn", "text_attn", "image_mlp", "adapters", "context_embedder")


def model(config=CONFIG):
    """A random tiny MMDiT, drawn on the host (eager initialisers are slow on CPU)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MMDiT(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(
        rng.standard_normal(x.shape) / math.sqrt(x.shape[-2] if x.ndim > 1 else 1), x.dtype),
        state))


def random_factors(module, targets=TARGETS, rank=3, seed=1):
    """Fresh factors with B drawn too (B = 0 would hide any error in the update)."""
    tree = lora.new_factors(lora.target_shapes(module, targets), rank, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype)
        if p[-1].key == "lora_b" else x, tree)


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((2, 8, 8, 16), dtype=np.float32)),
            jnp.asarray([731.0, 12.0]),
            jnp.asarray(rng.standard_normal((2, 5, 32), dtype=np.float32)))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, latents, timestep, context):
    out = nnx.merge(graphdef, state)(latents, timestep, context, block_depth=1)
    return out.sample, out.text_logits, out.mid_image_proj


def outputs(module):
    return [np.asarray(x) for x in _forward(*nnx.split(module), *inputs())]


def flat_state(module):
    return {k: np.asarray(v) for k, v in
            traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(module))).items()}


def rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def test_wrapped_layer_adds_the_scaled_low_rank_update_for_stacked_and_plain_layers():
    m = model()
    factors = random_factors(m)
    lora.wrap(m, factors, scale=1.5)
    x = np.random.default_rng(3).standard_normal((2, 4, 32)).astype(np.float32)
    # One block of a stacked layer (sliced as the scan slices it) and a plain layer.
    stacked = m.blocks.attn.to_q
    assert isinstance(stacked, lora.LoraLinear) and stacked.lora_a.shape == (2, 32, 3)
    graphdef, state = nnx.split(stacked)
    one = nnx.merge(graphdef, jax.tree.map(lambda v: v[1], state))
    w, b_ = (np.asarray(stacked.kernel[...][1]), np.asarray(stacked.bias[...][1]))
    a, b = np.asarray(stacked.lora_a[...][1]), np.asarray(stacked.lora_b[...][1])
    np.testing.assert_allclose(np.asarray(one(jnp.asarray(x))), x @ w + b_ + 1.5 * (x @ a @ b),
                               rtol=RTOL, atol=1e-5)
    plain = m.adapter_img.fc_1
    w, b_ = np.asarray(plain.kernel[...]), np.asarray(plain.bias[...])
    a, b = np.asarray(plain.lora_a[...]), np.asarray(plain.lora_b[...])
    np.testing.assert_allclose(np.asarray(plain(jnp.asarray(x))), x @ w + b_ + 1.5 * (x @ a @ b),
                               rtol=RTOL, atol=1e-5)


def test_fresh_factors_leave_the_model_unchanged_and_are_drawn_as_peft_draws_them():
    m = model()
    before = outputs(m)
    shapes = lora.target_shapes(m, TARGETS)
    lora.wrap(m, lora.new_factors(shapes, 8, jax.random.key(0)), scale=2.0)
    for x, y in zip(outputs(m), before):
        np.testing.assert_array_equal(x, y)  # B = 0: exactly the base
    a = np.asarray(m.blocks.ff.proj_in.lora_a[...])
    assert a.shape == (2, 32, 8) and np.abs(a).max() <= 1 / math.sqrt(32)
    assert np.abs(a).max() > 0.9 / math.sqrt(32)  # uniform over the whole bound
    gaussian = lora.new_factors(shapes, 8, jax.random.key(0), init="gaussian")
    a = np.asarray(gaussian["blocks"]["ff"]["proj_in"]["lora_a"])
    assert abs(a.std() - 1 / 8) < 0.02


def test_merged_equals_unmerged_and_both_come_off_exactly():
    m = model()
    base_out, base_state = outputs(m), flat_state(m)
    factors = random_factors(m)
    originals = lora.wrap(m, factors, scale=0.7)
    unmerged = outputs(m)
    assert rel(unmerged[0], base_out[0]) > 1e-2  # the LoRA changes the output
    lora.unwrap(m, originals)
    assert flat_state(m).keys() == base_state.keys()
    for key, value in flat_state(m).items():
        np.testing.assert_array_equal(value, base_state[key], err_msg=str(key))
    kernels = lora.merge(m, factors, scale=0.7)
    merged = outputs(m)
    for x, y in zip(merged, unmerged):
        assert rel(x, y) <= RTOL
    lora.restore_kernels(m, kernels)
    for key, value in flat_state(m).items():
        np.testing.assert_array_equal(value, base_state[key], err_msg=str(key))
    for x, y in zip(outputs(m), base_out):
        np.testing.assert_array_equal(x, y)


def test_wrapped_model_keeps_every_base_path_and_names_its_factors_axes():
    m = model()
    base_paths = set(flat_state(m))
    lora.wrap(m, random_factors(m, ("image_attn",)), scale=1.0)
    paths = set(flat_state(m))
    assert base_paths < paths
    assert {p[-1] for p in paths - base_paths} == {"lora_a", "lora_b"}
    def names(layer, factor):
        return getattr(layer, factor).get_metadata()["out_sharding"]

    assert names(m.blocks.attn.to_q, "lora_a") == ("layers", "embed", None)
    assert names(m.blocks.attn.to_q, "lora_b") == ("layers", None, "heads")
    assert names(m.blocks.attn.to_out, "lora_a") == ("layers", "heads", None)


def test_targets_and_train_also_resolve_against_the_model_or_fail_clearly():
    m = model()
    dotted = {lora.dotted(p) for p in lora.resolve_targets(m, ("text_attn", "*.ff.proj_in"))}
    assert dotted == {"blocks.attn.add_q_proj", "blocks.attn.add_k_proj",
                      "blocks.attn.add_v_proj", "blocks.attn.to_add_out", "blocks.ff.proj_in"}
    with pytest.raises(ValueError, match="'imgae_attn' matches no linear layer.*image_attn"):
        lora.resolve_targets(m, ("imgae_attn",))
    sd3 = nnx.eval_shape(lambda: MMDiT(MMDiTConfig.tiny(variant="sd3", vocab_size=None,
                                                       num_layers=3), rngs=nnx.Rngs(0)))
    assert ("final_block", "attn", "to_q") in lora.resolve_targets(sd3, ("image_attn",))
    with pytest.raises(ValueError, match="'adapters' matches no linear layer"):
        lora.resolve_targets(sd3, ("adapters",))
    lora.check_train_also(m, ("text_proj_out.*",))
    with pytest.raises(ValueError, match="'text_head.*' matches no parameter"):
        lora.check_train_also(m, ("text_head.*",))
    with pytest.raises(ValueError, match="already carries a LoRA"):
        factors = random_factors(m, ("image_attn",))
        lora.wrap(m, factors, 1.0)
        lora.wrap(m, factors, 1.0)
    bad = random_factors(model(), ("image_attn",), rank=2)
    bad["blocks"]["attn"]["to_q"]["lora_b"] = jnp.zeros((2, 3, 32))
    with pytest.raises(ValueError, match=r"blocks.attn.to_q have shapes A \(2, 32, 2\), B "
                                         r"\(2, 3, 32\)"):
        lora.merge(model(), bad, 1.0)


def test_trainer_trains_only_factors_and_chosen_tensors_over_a_frozen_base():
    """`runs.builder.add_lora` on a bf16 base (as build_models stores it for
    lora.base_dtype=bfloat16), placed and abstract alike."""
    cfg = LoraConfig(rank=4, alpha=8.0, train_also=("text_proj_out.*",))
    mesh = make_mesh()
    made_in = placed_on(mesh, Runtime(param_dtype=jnp.bfloat16))
    for abstract in (True, False):
        module = run_model("transformer", CONFIG, made_in, seed=0, abstract=abstract)
        base = flat_state(module) if not abstract else None
        trained_filter = add_lora(module, cfg, jnp.float32, mesh, seed=0, abstract=abstract)
        _, trained, frozen = nnx.split(module, trained_filter, ...)
        trained = traverse_util.flatten_dict(nnx.to_pure_dict(trained))
        frozen = traverse_util.flatten_dict(nnx.to_pure_dict(frozen))
        factor_paths = {p for p in trained if p[-1] in lora.FACTORS}
        assert set(trained) - factor_paths == {("text_proj_out", "kernel"),
                                              ("text_proj_out", "bias")}
        assert {p[:-1] for p in factor_paths} == {
            ("blocks", "attn", n) for n in ("to_q", "to_k", "to_v", "to_out", "add_q_proj",
                                            "add_k_proj", "add_v_proj", "to_add_out")}
        assert all(x.dtype == jnp.float32 for x in trained.values())
        assert not set(frozen) & set(trained)
        assert frozen[("blocks", "attn", "to_q", "kernel")].dtype == jnp.bfloat16
        assert all(x.sharding is not None for x in trained.values())
    # The frozen base is untouched; train_also tensors start from the base, in float32.
    for path, value in frozen.items():
        np.testing.assert_array_equal(np.asarray(value), base[path], err_msg=str(path))
    np.testing.assert_array_equal(np.asarray(trained[("text_proj_out", "kernel")]),
                                  base[("text_proj_out", "kernel")].astype(np.float32))
    assert not np.asarray(trained[("blocks", "attn", "to_q", "lora_b")]).any()
    assert module.blocks.attn.to_q.scale == 2.0


def test_lora_config_section_overrides_and_validation():
    cfg = configlib.apply_overrides(TrainConfig(), [
        "lora.rank=4", "lora.alpha=8", "lora.targets=('image_attn', '*.ff.proj_in')",
        "lora.base_dtype=bfloat16", "lora.train_also=('text_proj_out.*',)"])
    assert (cfg.lora.rank, cfg.lora.scale, cfg.lora.base_dtype) == (4, 2.0, "bfloat16")
    assert cfg.lora.targets == ("image_attn", "*.ff.proj_in")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig().lora.rank == 0 and LoraConfig(rank=8).scale == 1.0
    with pytest.raises(ValueError, match="lora.base_dtype"):
        configlib.apply_overrides(TrainConfig(), ["lora.base_dtype=float16"])
    bad = dataclasses.replace(cfg, lora=LoraConfig(rank=-1))
    with pytest.raises(ValueError, match="lora.rank must be >= 0"):
        bad.validate()
    for fields, message in ((dict(rank=2, alpha=0.0), "lora.alpha must be > 0"),
                            (dict(rank=2, targets=()), "lora.targets is empty"),
                            (dict(base="/models/x"), "lora.base is set but lora.rank is 0"),
                            (dict(train_also=("x",)), "lora.train_also is set but")):
        assert any(message in p for p in LoraConfig(**fields).problems()), fields


def test_lora_base_becomes_the_runs_transformer_and_is_recorded(tmp_path):
    from unialign_jax import files
    from unialign_jax.checkpoints.pipeline_folder import COMPONENT_DIRS, FORMAT, INDEX_FILE
    from unialign_jax.runs.config import ModelsConfig

    pipe = tmp_path / "pipe"
    files.write_json(pipe / INDEX_FILE, {"format": FORMAT, "components": COMPONENT_DIRS})
    cfg = dataclasses.replace(TrainConfig(), lora=LoraConfig(rank=4, base=str(pipe)))
    assert not any("models.tokenizer" in p for p in _problems(cfg))  # the base may give it
    resolved = resolve(cfg)
    m = resolved.models
    assert (m.pipeline, m.transformer_path, m.tokenizer, m.vae_path) == (
        str(pipe), str(pipe / "transformer"), str(pipe / "tokenizer"), str(pipe / "vae"))
    assert resolved.lora.base == str(pipe) and resolve(resolved) == resolved
    # Without lora.base, the resolved run records the transformer it adapts.
    plain = resolve(dataclasses.replace(TrainConfig(), models=ModelsConfig(pipeline=str(pipe)),
                                        lora=LoraConfig(rank=2)))
    assert plain.lora.base == str(pipe / "transformer")
    assert resolve(dataclasses.replace(TrainConfig(), lora=LoraConfig(rank=2))).lora.base \
        is None  # a random base: run.seed's initialisation
    with pytest.raises(ValueError, match="name different transformers"):
        resolve(dataclasses.replace(cfg, models=ModelsConfig(transformer_path="/elsewhere")))
    run = tmp_path / "run"
    files.write_json(run / "config.json", TrainConfig().to_dict())
    (run / "checkpoints").mkdir()
    with pytest.raises(ValueError, match="is a training work dir: .*from-run"):
        resolve(dataclasses.replace(cfg, lora=LoraConfig(rank=4, base=str(run))))


def _problems(cfg):
    try:
        cfg.validate()
    except ValueError as e:
        return str(e).splitlines()
    return []
