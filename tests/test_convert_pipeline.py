"""`unialign-convert pipeline` on small SD3-layout and UniAlignment-layout diffusers folders:
the converted folder loads with `load_components`/`load_pipeline` and every component
reproduces its torch original; bad folders fail clearly and leave nothing behind."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import unialign_jax  # noqa: E402
from conftest import shared_fixture  # noqa: E402
from unialign_convert import cli  # noqa: E402
from test_t5 import random_t5  # noqa: E402
from test_vae import random_vae  # noqa: E402
from unialign_jax.checkpoints.pipeline_folder import load_components  # noqa: E402
from unialign_jax.models.runtime import Runtime  # noqa: E402
from unialign_jax.text.tokenizer import train_tiny_tokenizer  # noqa: E402

TEXTS = ["a red cube on a table", "a photo of a cat", "what color is the cube",
         "make the sky blue", "a dog running on grass", "depth map of the scene"] * 20
SD3_TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2,
                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                       caption_projection_dim=16, pooled_projection_dim=8, out_channels=16,
                       pos_embed_max_size=8)


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float32) - ref).max() / np.abs(ref).max())


def _scheduler(folder):
    diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_config(
        folder)


def build_sd3_folder(root):
    """SD3-medium layout, CLIP encoders included (as junk) to show they are ignored."""
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(**SD3_TRANSFORMER).eval()
    with torch.no_grad():
        for p in transformer.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    transformer.save_pretrained(root / "transformer")
    tok = train_tiny_tokenizer(TEXTS, root / "tokenizer_3", vocab_size=50)
    t5 = random_t5(root / "text_encoder_3", d_model=24, vocab_size=len(tok) + 8, seed=1)
    vae = random_vae(root / "vae", seed=2)
    _scheduler(root / "scheduler")
    for junk in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        os.makedirs(root / junk)
        (root / junk / "config.json").write_text(
            '{"architectures": ["CLIPTextModelWithProjection"]}')
    return dict(transformer=transformer, t5=t5, vae=vae, tokenizer=tok)


def build_unialignment_folder(root):
    """UniAlignment layout around a copy of the released-layout tiny transformer fixture."""
    fixture = os.path.dirname(shared_fixture("unialignment_tiny", "config.json"))
    os.makedirs(root / "transformer")
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy(os.path.join(fixture, name), root / "transformer" / name)
    vocab = json.loads((root / "transformer" / "config.json").read_text())["vocab_size"]
    tok = train_tiny_tokenizer(TEXTS, root / "tokenizer", vocab_size=30, extra_ids=vocab - 30)
    assert len(tok) == vocab, "the test tokenizer must match the fixture's text vocabulary"
    t5 = random_t5(root / "text_encoder", d_model=64, num_heads=4, d_kv=16, vocab_size=vocab + 28,
                   seed=3)
    vae = random_vae(root / "vae", seed=4)
    _scheduler(root / "scheduler")
    return dict(t5=t5, vae=vae, tokenizer=tok, fixture=fixture)


def check_t5(components, torch_t5, mask_vector):
    """Outputs equal torch's T5 with the tokenizer's mask row replaced by `mask_vector`."""
    mask_id = components.mask_token_id
    assert mask_id == components.tokenizer.convert_tokens_to_ids("<extra_id_0>")
    np.testing.assert_array_equal(np.asarray(components.t5.embedding[...])[mask_id], mask_vector)
    with torch.no_grad():
        torch_t5.shared.weight[mask_id] = torch.from_numpy(mask_vector)
    ids = np.asarray(components.tokenizer(["a red cube", "make the sky blue"], padding="max_length",
                                          max_length=16)["input_ids"])
    ids[:, 3] = mask_id
    with torch.no_grad():
        ref = torch_t5(torch.from_numpy(ids)).last_hidden_state.numpy()
    assert rel_err(nnx.jit(lambda m, i: m(i))(components.t5, jnp.asarray(ids)), ref) <= 1e-4


def check_vae(components, torch_vae, output):
    """The posterior mean or the decoded image equals diffusers' (one compile per layout)."""
    vae = components.vae
    with torch.no_grad():
        if output == "posterior_mean":
            x = np.random.RandomState(0).uniform(-1, 1, (1, 3, 16, 24)).astype(np.float32)
            ref = torch_vae.encode(torch.from_numpy(x)).latent_dist.mean.numpy()
            ours = nnx.jit(lambda m, x: m.posterior(x)[0])
        else:
            x = np.random.RandomState(1).randn(1, 16, 2, 3).astype(np.float32)
            ref = torch_vae.decode(torch.from_numpy(x) / vae.config.scaling_factor
                                   + vae.config.shift_factor).sample.numpy()
            ours = nnx.jit(lambda m, z: m.decode(z))
    out = ours(vae, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert rel_err(np.asarray(out).transpose(0, 3, 1, 2), ref) <= 1e-4


def convert(src, dst, mask_file):
    assert cli.main(["pipeline", str(src), str(dst), "--mask-embedding", str(mask_file)]) == 0
    index = json.loads((dst / "pipeline.json").read_text())
    assert json.loads((dst / "scheduler.json").read_text()) == {
        "shift": 3.0, "num_train_timesteps": 1000}
    return index


def test_sd3_layout(tmp_path):
    torch_parts = build_sd3_folder(tmp_path / "src")
    mask = np.random.RandomState(5).randn(24).astype(np.float32)
    np.save(tmp_path / "mask.npy", mask)
    index = convert(tmp_path / "src", tmp_path / "dst", tmp_path / "mask.npy")
    assert index["layout"] == "sd3" and index["transformer_initialised"]

    components = load_components(str(tmp_path / "dst"))
    vocab = len(torch_parts["tokenizer"])
    assert len(components.tokenizer) == vocab
    assert components.transformer.config.variant == "unialignment"
    assert components.transformer.config.vocab_size == vocab
    # weights the SD3 → UniAlignment port keeps are the torch ones (the port itself and the
    # ported model's forward are tested with the transformer converter)
    tm = torch_parts["transformer"]
    np.testing.assert_array_equal(np.asarray(components.transformer.context_embedder.kernel[...]),
                                  tm.context_embedder.weight.detach().numpy().T)
    assert components.transformer.text_proj_out.kernel.shape[-1] == vocab
    check_t5(components, torch_parts["t5"], mask)
    check_vae(components, torch_parts["vae"], "decoded")


def test_unialignment_layout(tmp_path):
    torch_parts = build_unialignment_folder(tmp_path / "src")
    mask = np.random.RandomState(6).randn(64).astype(np.float32)
    np.save(tmp_path / "mask.npy", mask)
    index = convert(tmp_path / "src", tmp_path / "dst", tmp_path / "mask.npy")
    assert index["layout"] == "unialignment" and not index["transformer_initialised"]

    pipe = unialign_jax.load_pipeline(str(tmp_path / "dst"))
    from unialign_jax.sampling.unialign_pipeline import UniAlignPipeline

    assert isinstance(pipe, UniAlignPipeline) and pipe.shift == 3.0
    components = pipe.components
    # the transformer reproduces the original PyTorch outputs stored with the fixture
    ref = load_file(os.path.join(torch_parts["fixture"], "reference_io.safetensors"))
    batch = ref["gen.sample"].shape[0]
    out = components.transformer(jnp.asarray(ref["latents"].transpose(0, 2, 3, 1)),
                                 jnp.asarray(ref["timestep"][:batch]),
                                 jnp.asarray(ref["context"][:batch]))
    assert rel_err(np.asarray(out.sample).transpose(0, 3, 1, 2), ref["gen.sample"]) <= 1e-4
    assert rel_err(out.text_logits, ref["gen.text_logits"]) <= 1e-4
    check_t5(components, torch_parts["t5"], mask)
    check_vae(components, torch_parts["vae"], "posterior_mean")

    # bf16 inference: transformer and T5 weights stored in bf16, the VAE kept in float32
    light = load_components(str(tmp_path / "dst"),
                            Runtime(jnp.bfloat16, param_dtype=jnp.bfloat16))
    assert light.transformer.context_embedder.kernel[...].dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(nnx.state(light.t5)))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(light.vae)))
    out16 = light.transformer(jnp.asarray(ref["latents"].transpose(0, 2, 3, 1)),
                              jnp.asarray(ref["timestep"][:batch]),
                              jnp.asarray(ref["context"][:batch]))
    assert rel_err(np.asarray(out16.sample).transpose(0, 3, 1, 2), ref["gen.sample"]) <= 3e-2


# --- bad input ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline") / "src"
    build_sd3_folder(root)
    return root


def _drop_tensor(path, key):
    from safetensors.numpy import save_file

    tensors = load_file(path)
    del tensors[key]
    save_file(tensors, path)


def _edit_json(path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


VAE_WEIGHTS = os.path.join("vae", "diffusion_pytorch_model.safetensors")
BAD_SOURCES = {
    "no_vae": (lambda src: shutil.rmtree(src / "vae"), r"missing component folders \['vae'\]"),
    "context_width": (lambda src: _edit_json(src / "transformer" / "config.json",
                                             joint_attention_dim=32),
                      "joint_attention_dim 32 differs from the text encoder's d_model 24"),
    "small_t5_vocab": (lambda src: _edit_json(src / "text_encoder_3" / "config.json",
                                              vocab_size=100),
                       r"tokenizer has 137 ids but the text encoder embeds 100"),
    "scheduler": (lambda src: _edit_json(src / "scheduler" / "scheduler_config.json",
                                         _class_name="DDPMScheduler"),
                  "expected a FlowMatchEulerDiscreteScheduler"),
    # the release's pipeline would compute a resolution-dependent mu from these: refused,
    # never silently sampled with the plain shift
    "dynamic_shifting": (lambda src: _edit_json(src / "scheduler" / "scheduler_config.json",
                                                use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15),
                         r"\{'use_dynamic_shifting': True\} change the sigma schedule"),
    "karras_sigmas": (lambda src: _edit_json(src / "scheduler" / "scheduler_config.json",
                                             use_karras_sigmas=True),
                      r"\{'use_karras_sigmas': True\} change the sigma schedule"),
    "corrupt_vae": (lambda src: os.truncate(src / VAE_WEIGHTS, 1000),
                    r"vae/diffusion_pytorch_model.safetensors: corrupt safetensors header"),
    # found in the last stage, after the transformer and T5 were written to the temporary folder
    "missing_vae_tensor": (lambda src: _drop_tensor(src / VAE_WEIGHTS, "decoder.conv_out.bias"),
                           r"missing tensors: decoder\.conv_out\.bias"),
    "wrong_vae_class": (lambda src: _edit_json(src / "vae" / "config.json",
                                               _class_name="AutoencoderTiny"),
                        "expected an AutoencoderKL"),
}


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_bad_pipeline_is_refused_and_nothing_is_written(tmp_path, capsys, good_source, case):
    damage, message = BAD_SOURCES[case]
    src = tmp_path / "src"
    shutil.copytree(good_source, src)
    damage(src)
    assert cli.main(["pipeline", str(src), str(tmp_path / "dst")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert os.listdir(tmp_path) == ["src"], "nothing may be left at or beside DST"


def test_mask_embedding_of_wrong_width_fails_before_converting(tmp_path, capsys, good_source):
    np.save(tmp_path / "mask.npy", np.zeros(4096, np.float32))  # the T5 here is 24 wide
    assert cli.main(["pipeline", str(good_source), str(tmp_path / "dst"),
                     "--mask-embedding", str(tmp_path / "mask.npy")]) == 2
    err = capsys.readouterr().err
    assert "shape (4096,), expected (24,)" in err and "[1/3]" not in err
    assert os.listdir(tmp_path) == ["mask.npy"]


def test_tokenizer_must_match_a_unialignment_transformer(tmp_path, capsys):
    build_unialignment_folder(tmp_path / "src")
    shutil.rmtree(tmp_path / "src" / "tokenizer")
    train_tiny_tokenizer(TEXTS, tmp_path / "src" / "tokenizer", vocab_size=30, extra_ids=20)
    assert cli.main(["pipeline", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    assert "transformer text vocabulary 100 differs from the tokenizer length 50" in \
        capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


def test_loading_a_component_folder_as_a_pipeline_is_refused(tmp_path):
    with pytest.raises(unialign_jax.checkpoints.io.CheckpointError, match="pipeline.json"):
        load_components(str(tmp_path))
