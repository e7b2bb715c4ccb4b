"""LoRA files between us and diffusers / PEFT (PyTorch, float32, tiny random models):
our file in diffusers' `SD3Transformer2DModel` (both of diffusers' loading paths), a LoRA
saved by PyTorch (`peft` adapter + `save_lora_weights`, alpha ≠ rank, per-layer ranks and
alphas) in our transformer and pipeline, merged = unmerged, exact unloading, the
`unialign-sample --lora` flags and clear errors for files that do not fit."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

import unialign_jax  # noqa: E402
from safetensors.numpy import load_file, save_file as save_numpy  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from test_sampling_pipeline import tiny_components  # noqa: E402
from unialign_convert.cli import main as convert_main  # noqa: E402
from unialign_convert.export import write_export  # noqa: E402
from unialign_convert.torch_unialignment import SD3JointModelFlexible  # noqa: E402
from unialign_jax.checkpoints import lora_files  # noqa: E402
from unialign_jax.checkpoints.io import CheckpointError  # noqa: E402
from unialign_jax.models import lora  # noqa: E402
from unialign_jax.sampling import cli as sample_cli  # noqa: E402
from unialign_jax.sampling.unialign_pipeline import UniAlignPipeline  # noqa: E402
from unialign_jax.sampling.preprocess import InputError  # noqa: E402

RTOL = 1e-4  # max |ours - torch| / max |torch|, float32
SD3 = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
           num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
           pooled_projection_dim=6, out_channels=4, pos_embed_max_size=8)
Pipeline = diffusers.StableDiffusion3Pipeline


def randomise(model, scale=0.2, seed=0, only=None):
    """Every parameter (or those whose name contains `only`) redrawn: no zero-initialised
    tensor may hide a mapping error."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only is None or only in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """A random SD3-layout transformer saved by diffusers and converted by us."""
    root = tmp_path_factory.mktemp("sd3")
    randomise(diffusers.SD3Transformer2DModel(**SD3)).save_pretrained(root / "torch")
    assert convert_main(["transformer", str(root / "torch"), str(root / "ours")]) == 0
    return root


def sd3_inputs():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((2, SD3["in_channels"], 8, 8), dtype=np.float32),
            rng.standard_normal((2, 5, SD3["joint_attention_dim"]), dtype=np.float32),
            rng.standard_normal((2, SD3["pooled_projection_dim"]), dtype=np.float32),
            np.array([950.0, 40.0], np.float32))


def torch_sd3(model):
    latents, context, pooled, timestep = map(torch.from_numpy, sd3_inputs())
    with torch.no_grad():
        return model(hidden_states=latents, encoder_hidden_states=context,
                     pooled_projections=pooled, timestep=timestep).sample.numpy()


def ours_sd3(module):
    latents, context, pooled, timestep = sd3_inputs()
    out = module(jnp.asarray(latents.transpose(0, 2, 3, 1)), jnp.asarray(timestep),
                 jnp.asarray(context), pooled=jnp.asarray(pooled)).sample
    return np.asarray(out).transpose(0, 3, 1, 2)


def rel(ours, theirs):
    return np.abs(ours - theirs).max() / np.abs(theirs).max()


def flat_state(module):
    return {k: np.asarray(v) for k, v in
            traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(module))).items()}


def assert_same_state(module, expected):
    state = flat_state(module)
    assert state.keys() == expected.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(value, expected[key], err_msg=str(key))


def test_our_lora_file_gives_diffusers_our_merged_output(sd3, tmp_path):
    ours = unialign_jax.load_transformer(str(sd3 / "ours"))
    targets = ("image_attn", "text_attn", "image_mlp", "*.norm1", "proj_out",
               "context_embedder")
    factors = lora.new_factors(lora.target_shapes(ours, targets), 4, jax.random.key(0))
    rng = np.random.default_rng(1)
    factors = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32)
        if p[-1].key == "lora_b" else x, factors)
    path = str(tmp_path / "ours.safetensors")
    summary = lora_files.write_lora(path, ours.config, factors, 2.0)  # alpha 8, rank 4
    # 3 blocks: q/k/v/out 12, add_q/k/v 9 + to_add_out 2 (not in the last), ff 6, norm1 3;
    # proj_out and context_embedder.
    assert summary["rank"] == 4 and summary["layers"] == 12 + 11 + 6 + 3 + 2
    lora.merge(ours, factors, 2.0)
    expected = ours_sd3(ours)

    def pipeline_path(model):  # what pipe.load_lora_weights(path) runs
        state, metadata = Pipeline.lora_state_dict(path, return_lora_metadata=True)
        Pipeline.load_lora_into_transformer(state, transformer=model, metadata=metadata)

    def model_path(model):
        model.load_lora_adapter(path, prefix="transformer")

    for load in (pipeline_path, model_path):
        model = diffusers.SD3Transformer2DModel.from_pretrained(str(sd3 / "torch")).eval()
        base = torch_sd3(model)
        load(model)
        assert len(model.peft_config) == 1
        theirs = torch_sd3(model)
        assert rel(theirs, base) > 1e-2, "the LoRA changes the output"
        assert rel(expected, theirs) <= RTOL, load.__name__


def peft_lora(model, tmp_path, metadata=True):
    """`model` with a PEFT adapter (ranks and alphas differing per layer, B drawn), and
    the file diffusers' `save_lora_weights` writes for it (with its adapter metadata, or
    only the tensors, as older tools write them)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=4, lora_alpha=6, init_lora_weights="gaussian",
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                        "to_add_out", "ff_context.net.2", "text_proj_out",
                                        "proj_out"],
                        rank_pattern={"to_k": 2}, alpha_pattern={"add_q_proj": 3})
    if not metadata:
        config = LoraConfig(r=3, lora_alpha=3, target_modules=["to_q", "ff.net.0.proj"])
    model.add_adapter(config)
    randomise(model, 0.3, seed=5, only="lora_B")
    layers = get_peft_model_state_dict(model)
    if metadata:
        Pipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=layers,
                                   transformer_lora_adapter_metadata=config.to_dict())
    else:
        save_file({f"transformer.{k}": v.contiguous() for k, v in layers.items()},
                  str(tmp_path / "pytorch_lora_weights.safetensors"))
    return str(tmp_path / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("metadata", [True, False], ids=["with_metadata", "tensors_only"])
def test_a_pytorch_saved_lora_has_the_same_effect_here(sd3, tmp_path, metadata):
    model = diffusers.SD3Transformer2DModel.from_pretrained(str(sd3 / "torch")).eval()
    path = peft_lora(model, tmp_path, metadata)
    theirs = torch_sd3(model)
    ours = unialign_jax.load_transformer(str(sd3 / "ours"))
    base = flat_state(ours)
    factors, summary = lora_files.read_lora(path, ours)
    assert summary["alpha_from_metadata"] is metadata
    assert summary["ranks"] == ([2, 4] if metadata else [3])
    kernels = lora.merge(ours, factors, 1.0)
    merged = ours_sd3(ours)
    assert rel(merged, theirs) <= RTOL
    lora.restore_kernels(ours, kernels)
    assert_same_state(ours, base)
    layers = lora.wrap(ours, factors, 1.0)
    assert rel(ours_sd3(ours), merged) <= 1e-5
    lora.unwrap(ours, layers)
    assert_same_state(ours, base)


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    return UniAlignPipeline(tiny_components(tmp_path_factory.mktemp("tok")), batch_size=2,
                            progress=False)


@pytest.fixture(scope="module")
def pytorch_lora(tiny_pipe, tmp_path_factory):
    """The tiny pipeline's transformer in PyTorch (the release's layout), a PEFT LoRA on it
    saved by diffusers, and the PyTorch outputs with the LoRA."""
    root = tmp_path_factory.mktemp("pytorch_lora")
    transformer = tiny_pipe.components.transformer
    tree = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(transformer)))
    write_export("transformer", transformer.config, tree, str(root))
    model = SD3JointModelFlexible.from_pretrained(str(root)).eval()
    path = peft_lora(model, root / "lora")
    rng = np.random.default_rng(2)
    cfg = transformer.config
    inputs = (rng.standard_normal((2, cfg.in_channels, 8, 8), dtype=np.float32),
              rng.standard_normal((2, 6, cfg.joint_attention_dim), dtype=np.float32),
              np.array([999.0, 3.0], np.float32))
    with torch.no_grad():
        latents, context, timestep = map(torch.from_numpy, inputs)
        sample, logits, *_ = model(latents, encoder_hidden_states=context, timestep=timestep)
    return path, inputs, (sample.numpy(), logits.numpy())


def pipe_outputs(pipe, inputs):
    latents, context, timestep = inputs
    out = pipe.components.transformer(jnp.asarray(latents.transpose(0, 2, 3, 1)),
                                      jnp.asarray(timestep), jnp.asarray(context))
    return np.asarray(out.sample).transpose(0, 3, 1, 2), np.asarray(out.text_logits)


def test_pipeline_loads_a_pytorch_lora_merged_or_not_and_unloads_it_exactly(
        tiny_pipe, pytorch_lora):
    path, inputs, expected = pytorch_lora
    transformer = tiny_pipe.components.transformer
    base = flat_state(transformer)
    kw = dict(height=64, width=64, num_steps=2, seed=3)
    base_images = [np.asarray(im) for im in tiny_pipe.generate(["a cat", "a dog"], **kw)]

    info = tiny_pipe.load_lora(path)
    assert info["merged"] and info["alpha_from_metadata"] and tiny_pipe.lora == info
    merged = pipe_outputs(tiny_pipe, inputs)
    for ours, theirs in zip(merged, expected):
        assert rel(ours, theirs) <= RTOL
    images = [np.asarray(im) for im in tiny_pipe.generate(["a cat", "a dog"], **kw)]
    assert any((a != b).any() for a, b in zip(images, base_images))
    with pytest.raises(InputError, match="a LoRA is loaded already"):
        tiny_pipe.load_lora(path)
    tiny_pipe.unload_lora()
    assert_same_state(transformer, base)

    tiny_pipe.load_lora(path, merge=False)
    for ours, theirs in zip(pipe_outputs(tiny_pipe, inputs), merged):
        assert rel(ours, theirs) <= 1e-5
    unmerged = [np.asarray(im) for im in tiny_pipe.generate(["a cat", "a dog"], **kw)]
    for a, b in zip(unmerged, images):  # float rounding may move a pixel by one level
        assert np.abs(a.astype(int) - b).max() <= 1
    tiny_pipe.unload_lora()
    assert_same_state(transformer, base)
    again = [np.asarray(im) for im in tiny_pipe.generate(["a cat", "a dog"], **kw)]
    for a, b in zip(again, base_images):
        np.testing.assert_array_equal(a, b)

    # The scale multiplies the update.
    kernel = np.asarray(transformer.blocks.attn.to_q.kernel[...])
    deltas = []
    for scale in (1.0, 0.25):
        tiny_pipe.load_lora(path, scale=scale)
        deltas.append(np.asarray(transformer.blocks.attn.to_q.kernel[...]) - kernel)
        tiny_pipe.unload_lora()
    np.testing.assert_allclose(deltas[1], 0.25 * deltas[0], rtol=1e-4, atol=1e-6)
    with pytest.raises(InputError, match="no LoRA is loaded"):
        tiny_pipe.unload_lora()


def test_files_that_do_not_fit_fail_clearly_and_change_nothing(tiny_pipe, pytorch_lora,
                                                                tmp_path):
    good = load_file(pytorch_lora[0])
    key = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    cases = {
        "missing.safetensors": (None, "LoRA file not found"),
        "corrupt.safetensors": (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", "not a readable"),
        "text_encoder.safetensors": (
            {**good, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
             np.zeros((4, 8), np.float32)}, "not transformer LoRA factors"),
        "deeper.safetensors": (
            {**good, key.replace("blocks.0", "blocks.7"): good[key]}, "match no layer"),
        "unpaired.safetensors": (
            {k: v for k, v in good.items() if k != key.replace("lora_A", "lora_B")},
            "without their partner: transformer_blocks.0.attn.to_q.lora_B.weight"),
        "wider.safetensors": (
            {**good, key: np.zeros((4, 99), np.float32)}, r"shape mismatches: .*to_q"),
    }
    transformer = tiny_pipe.components.transformer
    base = flat_state(transformer)
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            save_numpy(content, str(path))
        with pytest.raises(InputError, match=message):
            tiny_pipe.load_lora(str(path))
        assert tiny_pipe.lora is None
        assert_same_state(transformer, base)
    with pytest.raises(CheckpointError, match="holds no LoRA factors"):
        save_numpy({}, str(tmp_path / "empty.safetensors"))
        lora_files.read_lora(str(tmp_path / "empty.safetensors"), transformer)


def test_sample_cli_applies_the_lora_and_records_it(tiny_pipe, pytorch_lora, tmp_path,
                                                    monkeypatch, capsys):
    monkeypatch.setattr(UniAlignPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **k: tiny_pipe))
    path = pytorch_lora[0]
    argv = ["t2i", "--ckpt", str(tmp_path), "--prompt", "a cat", "--out", str(tmp_path / "o"),
            "--height", "64", "--width", "64", "--steps", "1", "--batch-size", "2",
            "--no-progress", "--lora", path, "--lora-scale", "0.5"]
    try:
        assert sample_cli.main(argv) == 0
        assert tiny_pipe.lora["path"] == os.path.abspath(path)
        assert tiny_pipe.lora["scale"] == 0.5 and tiny_pipe.lora["merged"]
        side = json.loads((tmp_path / "o" / "00000.json").read_text())
        assert side["lora"]["path"] == os.path.abspath(path) and side["lora"]["scale"] == 0.5
        tiny_pipe.unload_lora()
        assert sample_cli.main(argv) == 0 and tiny_pipe.lora is None  # done: nothing loaded
        assert sample_cli.main(argv[:-1] + ["0.75"]) == 0  # another scale: redone
        assert tiny_pipe.lora["scale"] == 0.75
    finally:
        if tiny_pipe.lora is not None:
            tiny_pipe.unload_lora()
    assert capsys.readouterr().out.count("1 written") == 2
