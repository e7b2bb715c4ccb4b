"""UniAlignPipeline on tiny random models: wiring, per-item seeds, outputs, bad input."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from unialign_jax.checkpoints.pipeline_folder import PipelineComponents
from unialign_jax.models.mmdit import MMDiT, MMDiTConfig
from unialign_jax.models.t5 import T5Config, T5Encoder
from unialign_jax.models.vae import AutoencoderKL, VAEConfig
from unialign_jax.sampling.unialign_pipeline import UniAlignPipeline
from unialign_jax.sampling.preprocess import InputError
from unialign_jax.text.tokenizer import mask_token_id, train_tiny_tokenizer

RES = 64  # px: 8×8 latents, 4×4 patches
TEXTS = ["a red cube on a table", "a photo of a cat", "what color is the cube",
         "make the sky blue", "a dog running on grass"] * 20


def random_module(build, seed):
    """`build()`'s module with random weights drawn on the host: tracing the constructor
    abstractly is far cheaper on CPU than running its many small initialisers eagerly."""
    graphdef, state = nnx.split(nnx.eval_shape(build))
    rng = np.random.default_rng(seed)

    def draw(x):
        fan_in = int(np.prod(x.shape[:-1])) if len(x.shape) > 1 else 1
        return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(x.dtype)

    return nnx.merge(graphdef, jax.tree.map(draw, state))


def tiny_components(tokenizer_dir):
    """Random tiny transformer, T5 and VAE with a real (tiny) T5-layout tokenizer."""
    tok = train_tiny_tokenizer(TEXTS, tokenizer_dir, vocab_size=60)
    vocab = len(tok)
    t5 = random_module(lambda: T5Encoder(T5Config(
        vocab_size=vocab, d_model=32, num_heads=2, head_dim=8, d_ff=48, num_layers=1),
        rngs=nnx.Rngs(0)), 1)
    transformer = random_module(lambda: MMDiT(
        MMDiTConfig.tiny(vocab_size=vocab, joint_attention_dim=32), rngs=nnx.Rngs(0)), 2)
    vae = random_module(lambda: AutoencoderKL(VAEConfig(
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4),
        rngs=nnx.Rngs(0)), 3)
    return PipelineComponents(
        transformer=transformer, t5=t5, vae=vae, tokenizer=tok,
        scheduler={"shift": 3.0, "num_train_timesteps": 1000},
        mask_token_id=mask_token_id(tok), path="<tiny>")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return UniAlignPipeline(tiny_components(tmp_path_factory.mktemp("tok")), batch_size=2,
                            progress=False)


def picture(seed, size=(80, 56)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size[::-1] + (3,),
                                                                dtype=np.uint8))


def as_array(image):
    return np.asarray(image, np.int16)


def test_generate_gives_one_rgb_image_per_prompt_each_fixed_by_its_seed(pipe):
    kw = dict(height=RES, width=RES + 16, num_steps=2)
    three = pipe.generate(["a cat", "a dog", "a red cube"], seed=[7, 8, 9], **kw)
    assert [im.size for im in three] == [(RES + 16, RES)] * 3
    assert all(im.mode == "RGB" for im in three)
    # The cube ran in a padded chunk of its own; first, beside another prompt, it is the same.
    again = pipe.generate(["a red cube", "a red cube"], seed=[9, 10], **kw)
    np.testing.assert_array_equal(as_array(again[0]), as_array(three[2]))
    assert np.abs(as_array(again[1]) - as_array(again[0])).max() > 8


def test_negative_prompt_and_guidance_reach_the_sampler(pipe):
    kw = dict(height=RES, width=RES, num_steps=2, seed=3)
    base = as_array(pipe.generate(["a cat", "a dog"], **kw)[0])
    assert np.abs(as_array(pipe.generate(["a cat", "a dog"], negative_prompt="a dog",
                                          **kw)[0]) - base).max() > 8
    assert np.abs(as_array(pipe.generate(["a cat", "a dog"], guidance_scale=2.0, **kw)[0])
                  - base).max() > 8


def test_edit_accepts_paths_arrays_and_pil_and_uses_the_source(pipe, tmp_path):
    src = picture(0)
    path = tmp_path / "src.png"
    src.save(path)
    kw = dict(resolution=RES, num_steps=2, seed=4)
    # One item a call: XLA's result for a row may depend on its batch shape and, on some
    # CPUs, on its row, by one 8-bit level; the same input at the same shape and row is
    # bit-identical, whatever form it came in.
    edit = lambda image: pipe.edit([image], "make the sky blue", **kw)[0]
    from_pil, from_path, from_array = edit(src), edit(str(path)), edit(np.asarray(src))
    assert from_pil.size == (RES, RES)
    np.testing.assert_array_equal(as_array(from_pil), as_array(from_path))
    np.testing.assert_array_equal(as_array(from_pil), as_array(from_array))
    perceived = pipe.perceive([src], "make the sky blue", **kw)[0]
    other_source = pipe.perceive([picture(1)], "make the sky blue", **kw)[0]
    np.testing.assert_array_equal(as_array(perceived), as_array(from_pil))
    assert np.abs(as_array(other_source) - as_array(from_pil)).max() > 2


def test_compose_keeps_order_across_different_condition_counts(pipe):
    a, b, c = picture(1), picture(2), picture(3)
    kw = dict(resolution=RES, num_steps=2)
    mixed = pipe.compose([[a, b], [c], [a, b, c]], ["x", "y", "z"], seed=[1, 2, 3], **kw)
    assert len(mixed) == 3
    single, triple = pipe.compose([[c], [a, b, c]], ["y", "z"], seed=[2, 3], **kw)
    np.testing.assert_array_equal(as_array(mixed[1]), as_array(single))
    np.testing.assert_array_equal(as_array(mixed[2]), as_array(triple))
    assert np.abs(as_array(mixed[1]) - as_array(mixed[2])).max() > 8


def test_caption_returns_text_deterministic_per_seed(pipe):
    images = [picture(5), picture(6), picture(7)]
    kw = dict(resolution=RES, length=12, num_steps=4)
    got = []
    texts = pipe.caption(images, seed=11, on_result=lambda i, t: got.append(i), **kw)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert sorted(got) == [0, 1, 2]
    assert pipe.caption([images[2], images[0]], seed=[13, 11], **kw) == [texts[2], texts[0]]
    answers = pipe.caption(images[:2], prompt="a cat", seed=11, **kw)
    assert len(answers) == 2 and all(isinstance(t, str) for t in answers)


@pytest.mark.parametrize("call, message", [
    (lambda p: p.generate([], height=RES, width=RES), "prompt list is empty"),
    (lambda p: p.generate("a cat", height=RES + 8, width=RES), "multiple of 16"),
    (lambda p: p.generate("a cat", height=RES, width=4096), "position table"),
    (lambda p: p.generate("a cat", height=RES, width=RES, num_steps=0), "num_steps"),
    (lambda p: p.edit(["/nonexistent/x.png"], "edit", resolution=RES), "cannot read image"),
    (lambda p: p.edit([picture(0), picture(1)], ["a", "b", "c"], resolution=RES),
     "3 instructions for 2 items"),
    (lambda p: p.compose([[picture(i) for i in range(4)]], "mix", resolution=RES),
     "at most 3"),
    (lambda p: p.caption([picture(0)], prompt="a cat " * 40, length=8, resolution=RES),
     "nothing would be left"),
    (lambda p: p.generate(["a", "b"], seed=[1], height=RES, width=RES), "1 seeds for 2"),
])
def test_bad_input_fails_clearly_before_any_compilation(pipe, call, message):
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with pytest.raises(InputError, match=message):
            call(pipe)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


def test_unreadable_image_file_is_reported(pipe, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(InputError, match="cannot decode image .*broken.png"):
        pipe.edit([str(bad)], "edit", resolution=RES)


def test_two_devices_shard_the_batch_and_give_the_same_images(pipe, tmp_path):
    """A fresh process with 2 host devices (default mesh: batch and weights split over
    'fsdp') draws the same images as this process's single device, from the same models."""
    script = textwrap.dedent(f"""
        import sys, numpy as np, jax
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_sampling_pipeline import tiny_components
        from unialign_jax.sampling.unialign_pipeline import UniAlignPipeline
        assert jax.device_count() == 2
        pipe = UniAlignPipeline(tiny_components({str(tmp_path / "tok")!r}), batch_size=2,
                                progress=False)
        assert pipe.mesh.size == 2
        kernel = pipe.components.transformer.context_embedder.kernel[...]
        assert not kernel.sharding.is_fully_replicated, kernel.sharding  # FSDP weights
        images = pipe.generate(["a cat", "a dog", "a cube"], height=64, width=64, num_steps=2)
        np.save({str(tmp_path / "two.npy")!r}, np.stack([np.asarray(i) for i in images]))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    two = np.load(tmp_path / "two.npy").astype(np.int16)
    one = pipe.generate(["a cat", "a dog", "a cube"], height=RES, width=RES, num_steps=2)
    assert np.abs(two - np.stack([as_array(i) for i in one])).max() <= 1


def test_source_images_are_encoded_a_chunk_at_a_time_each_with_its_own_key(pipe, monkeypatch):
    """Edit and compose sources go through the VAE encoder one chunk of
    `vae.PIXELS_PER_CHUNK` pixels at a time (a batch of 1024 px sources must fit where one
    does): the encoder's temporaries of a batch of 4 stay under twice those of one image (a
    whole-batch encode needs 4×), and each item's latents are those it gets alone."""
    from unialign_jax.models import vae as vae_lib
    from unialign_jax.sampling.unialign_pipeline import _encode_each

    monkeypatch.setattr(vae_lib, "PIXELS_PER_CHUNK", RES * RES)  # one image a chunk
    vae_def, vae_state = nnx.split(pipe.components.vae)
    encode = jax.jit(_encode_each.__wrapped__, static_argnums=0)
    pixels = np.random.default_rng(0).uniform(-1, 1, (4, RES, RES, 3)).astype(np.float32)
    keys = jax.random.split(jax.random.key(5), 4)

    def temporaries(batch):
        compiled = encode.lower(vae_def, vae_state, pixels[:batch], keys[:batch]).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temporaries(4) < 2 * temporaries(1)
    together = np.asarray(encode(vae_def, vae_state, pixels, keys))
    for i in range(4):
        alone = np.asarray(encode(vae_def, vae_state, pixels[i:i + 1], keys[i:i + 1]))
        np.testing.assert_allclose(together[i:i + 1], alone, rtol=0, atol=1e-6)
