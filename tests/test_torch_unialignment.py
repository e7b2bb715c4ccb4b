"""`unialign_convert.torch_unialignment.SD3JointModelFlexible`, the PyTorch class of the
UniAlignment layout at any size: it reproduces the release's stored outputs of every task
(../shared/fixtures/unialignment_tiny, made by the original code), its release-sized
state dict is the release's, and what it adds to a plain forward — LoRA scale, gradient
checkpointing, controlnet residuals — does what diffusers' SD3 does with them."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from safetensors.numpy import load_file  # noqa: E402

from conftest import TINY_UNIALIGNMENT, shared_fixture  # noqa: E402
from unialign_convert.torch_unialignment import SD3JointModelFlexible  # noqa: E402

FP32_RTOL = 1e-4  # max |ours - release| / max |release|; measured ≤ 5e-7
CONDITIONS = {"edit": ("img_edit", ["edit_latents"]),
              "compose": ("img_compose", ["compose_1", "compose_2", "compose_3"])}


def rel(ours, theirs):
    return np.abs(ours - theirs).max() / np.abs(theirs).max()


@pytest.fixture(scope="module")
def reference():
    ref = load_file(shared_fixture("unialignment_tiny", "reference_io.safetensors"))
    return ref, json.load(open(shared_fixture("unialignment_tiny", "reference_io.json")))


@pytest.fixture(scope="module")
def model():
    shared_fixture("unialignment_tiny", "config.json")
    model, info = SD3JointModelFlexible.from_pretrained(TINY_UNIALIGNMENT,
                                                        output_loading_info=True)
    assert not any(info.values()), info
    return model.eval()


def inputs(ref, case):
    """The release's forward arguments of a fixture case."""
    batch = ref[f"{case}.text_logits"].shape[0]
    latents = {"gen_rect": "latents_rect", "text_only": None}.get(case, "latents")
    timestep = np.zeros(batch, np.float32) if case == "text_only" else ref["timestep"][:batch]
    kwargs = dict(encoder_hidden_states=torch.from_numpy(ref["context"][:batch]),
                  timestep=torch.from_numpy(timestep))
    if case in CONDITIONS:
        data_type, names = CONDITIONS[case]
        images = [torch.from_numpy(ref[n]) for n in names]
        kwargs.update(data_type=data_type,
                      edit_hidden_states=images[0] if data_type == "img_edit" else images)
    return (None if latents is None else torch.from_numpy(ref[latents])), kwargs


@pytest.mark.parametrize("case", ["gen", "gen_rect", "edit", "compose", "text_only"])
def test_reproduces_the_releases_outputs(model, reference, case):
    ref, meta = reference
    latents, kwargs = inputs(ref, case)
    with torch.no_grad():
        out = model(latents, block_depth=meta["block_depth"], **kwargs)
    assert len(out) == len(meta["outputs"]) == 6
    for name, value in zip(meta["outputs"], out):
        expected = ref[f"{case}.{name}"]
        assert tuple(value.shape) == expected.shape, name
        assert rel(value.numpy(), expected) <= FP32_RTOL, f"{case}.{name}"


def test_adapter_features_only_with_block_depth(model, reference):
    ref, meta = reference
    latents, kwargs = inputs(ref, "gen")
    with torch.no_grad():
        out = model(latents, **kwargs)
        other = model(latents, block_depth=meta["block_depth"] + 1, **kwargs)
    assert out[4] is None and out[5] is None
    assert rel(out[0].numpy(), ref["gen.sample"]) <= FP32_RTOL
    assert np.abs(other[4].numpy() - ref["gen.mid_image_proj"]).max() > 1e-3


def test_release_sized_model_has_the_releases_state_dict():
    """Built from the release's config.json alone (no width of ours in it), on the meta
    device: the release's keys and shapes, so release checkpoints load."""
    full = json.load(open(shared_fixture("unialignment_full_shapes.json")))
    with torch.device("meta"):
        model = SD3JointModelFlexible(**full["config"])
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == full["shapes"]


def test_an_sd3_folder_is_refused_with_the_class_to_use(tmp_path):
    from diffusers import SD3Transformer2DModel

    SD3Transformer2DModel(sample_size=8, num_layers=1, attention_head_dim=8,
                          num_attention_heads=2, joint_attention_dim=12,
                          caption_projection_dim=16, pooled_projection_dim=6,
                          pos_embed_max_size=8).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a UniAlignment-layout transformer .* "
                                         "SD3Transformer2DModel"):
        SD3JointModelFlexible.from_pretrained(str(tmp_path))


def with_lora(model):
    """A copy of `model` with a PEFT adapter whose B factors are drawn (not zero)."""
    from peft import LoraConfig

    copy = SD3JointModelFlexible.from_config(model.config).eval()
    copy.load_state_dict(model.state_dict())
    copy.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "text_proj_out"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in copy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return copy


def test_lora_scale_applies_to_its_call_only(model, reference):
    """`joint_attention_kwargs={"scale": s}` scales the LoRA for that call (0: the base)
    and is undone after it, as in diffusers' SD3 (the release's forward never unscales)."""
    pytest.importorskip("peft")
    ref, _ = reference
    latents, kwargs = inputs(ref, "gen")
    adapted = with_lora(model)

    def run(m, scale=None):
        extra = {} if scale is None else {"joint_attention_kwargs": {"scale": scale}}
        with torch.no_grad():
            return m(latents, **kwargs, **extra)[1].numpy()

    base, full = run(model), run(adapted)
    assert rel(full, base) > 1e-2
    np.testing.assert_allclose(run(adapted, 0.0), base, rtol=0, atol=1e-6)
    half = run(adapted, 0.5)
    assert rel(half, base) > 1e-3 and rel(half, full) > 1e-3
    np.testing.assert_array_equal(run(adapted, 0.5), half)
    np.testing.assert_array_equal(run(adapted), full)


def test_gradient_checkpointing_gives_the_same_gradients(model, reference):
    ref, meta = reference
    latents, kwargs = inputs(ref, "edit")
    grads = []
    for checkpointing in (False, True):
        copy = SD3JointModelFlexible.from_config(model.config)
        copy.load_state_dict(model.state_dict())
        calls = []
        if checkpointing:
            copy.enable_gradient_checkpointing()
            checkpoint = copy._gradient_checkpointing_func
            copy._gradient_checkpointing_func = lambda *a: calls.append(1) or checkpoint(*a)
        out = copy(latents, block_depth=meta["block_depth"], **kwargs)
        assert len(calls) == (len(copy.transformer_blocks) if checkpointing else 0)
        sum(o.square().sum() for o in out).backward()
        grads.append({n: p.grad for n, p in copy.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert "transformer_blocks.0.attn.to_q.weight" in grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_controlnet_residuals_add_to_each_blocks_image_stream(model, reference):
    """Two residuals over four blocks: residual k // 2 is added to block k's image output
    (checked against forward hooks that add them from outside)."""
    ref, _ = reference
    latents, kwargs = inputs(ref, "gen")
    gen = torch.Generator().manual_seed(1)
    tokens = model.pos_embed(latents).shape
    residuals = [torch.randn(tokens, generator=gen) for _ in range(2)]
    with torch.no_grad():
        wired = model(latents, block_controlnet_hidden_states=residuals, **kwargs)
        plain = model(latents, **kwargs)
        handles = [block.register_forward_hook(
            lambda module, args, out, r=residuals[k // 2]: (out[0], out[1] + r))
            for k, block in enumerate(model.transformer_blocks)]
        try:
            hooked = model(latents, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
    assert len(model.transformer_blocks) == 4
    assert rel(plain[0].numpy(), wired[0].numpy()) > 1e-2
    for a, b in zip(wired[:4], hooked[:4]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
