"""The transformer converter: SD3 → UniAlignment port, sharded input, dtypes, and bad input
(clear errors, nothing half-written at DST)."""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import unialign_jax
from conftest import shared_fixture
from unialign_convert.export import transformer_config
from unialign_convert.safetensors_io import ConversionError
from unialign_convert.transformer import convert_transformer
from unialign_convert.transformer_keys import tensor_moves, torch_shapes
from unialign_jax.models.mmdit import MMDiTConfig

WEIGHTS = "diffusion_pytorch_model.safetensors"
SD3 = MMDiTConfig.tiny(variant="sd3", vocab_size=None, num_layers=3)


def _write_source(folder, config: MMDiTConfig, tensors=None, shards: int = 1):
    """A diffusers-layout folder with random tensors of `config`'s layout (optionally sharded)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    if tensors is None:
        tensors = {k: rng.standard_normal(s).astype(np.float32)
                   for k, s in torch_shapes(config).items()}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(transformer_config(config), f)
    if shards == 1:
        save_file(tensors, os.path.join(folder, WEIGHTS))
        return tensors
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: tensors[k] for k in part}, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, WEIGHTS + ".index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return tensors


def _converted_tree(dst, config):
    """Our converted parameters back in diffusers naming, to compare with the source."""
    model = unialign_jax.load_transformer(dst)
    from flax import nnx
    tree = nnx.to_pure_dict(nnx.state(model))
    out = {}
    for move in tensor_moves(config):
        value = tree
        for name in move.target:
            value = value[name]
        out[move.source] = np.asarray(value if move.layer is None else value[move.layer])
    return out


def _ours(move, value):
    """A diffusers tensor in our layout."""
    return value if move.perm is None else value.transpose(move.perm)


def test_sharded_source_round_trips_exactly(tmp_path):
    config = MMDiTConfig.tiny()
    tensors = _write_source(tmp_path / "src", config, shards=3)
    convert_transformer(str(tmp_path / "src"), str(tmp_path / "dst"))
    ours = _converted_tree(str(tmp_path / "dst"), config)
    moves = {m.source: m for m in tensor_moves(config)}
    for key, value in tensors.items():
        np.testing.assert_array_equal(ours[key], _ours(moves[key], value), err_msg=key)


def test_bfloat16_storage(tmp_path):
    config = MMDiTConfig.tiny()
    tensors = _write_source(tmp_path / "src", config)
    convert_transformer(str(tmp_path / "src"), str(tmp_path / "dst"), dtype="bfloat16")
    model = unialign_jax.load_transformer(str(tmp_path / "dst"), dtype=jnp.bfloat16)
    kernel = model.context_embedder.kernel[...]
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(kernel), tensors["context_embedder.weight"].T.astype(ml_dtypes.bfloat16))


def test_sd3_to_unialignment_port(tmp_path):
    source = _write_source(tmp_path / "src", SD3)
    report = convert_transformer(str(tmp_path / "src"), str(tmp_path / "dst"),
                                 to_unialignment=True, vocab_size=50)
    target = SD3.as_unialignment(50)
    last = SD3.num_layers - 1
    expected_init = ({k for k in torch_shapes(target) if k not in source}
                     | {f"transformer_blocks.{last}.norm1_context.linear.weight",
                        f"transformer_blocks.{last}.norm1_context.linear.bias"})
    assert set(report["initialised"]) == expected_init
    assert {"image_proj_out.weight", "text_proj_out.weight", "null_image_embd",
            f"transformer_blocks.{last}.ff_context.net.2.weight",
            "siglip_adapter_img.fc.0.weight"} <= expected_init
    dropped = set(report["dropped"])
    assert {"time_text_embed.text_embedder.linear_1.weight", "norm_out.linear.weight",
            "proj_out.weight", f"transformer_blocks.{last}.norm1_context.linear.weight"} <= dropped
    on_disk = json.load(open(tmp_path / "dst" / "conversion.json"))
    assert set(on_disk["initialised"]) == expected_init and set(on_disk["dropped"]) == dropped

    ours = _converted_tree(str(tmp_path / "dst"), target)
    moves = {m.source: m for m in tensor_moves(target)}
    kept = set(torch_shapes(target)) - expected_init
    assert f"transformer_blocks.{last}.attn.to_q.weight" in kept
    for key in kept:
        np.testing.assert_array_equal(ours[key], _ours(moves[key], source[key]), err_msg=key)
    _assert_pytorch_default_init({k: ours[k] for k in expected_init}, ours, SD3.width)
    # the ported model runs every task path
    model = unialign_jax.load_transformer(str(tmp_path / "dst"))
    out = model(jnp.ones((1, 8, 8, 16)), jnp.ones((1,)), jnp.ones((1, 3, SD3.joint_attention_dim)),
                block_depth=2)
    assert out.text_logits.shape == (1, 3, 50) and np.isfinite(np.asarray(out.sample)).all()


# Each pool's law, scaled by its bound: (its std, Var(x²) / std⁴ for the sample std's
# standard error). Null tokens: randn, so N(0, 1); nn.Linear: uniform(±1).
POOL_LAWS = {"null": (1.0, 2.0), "weight": (3 ** -0.5, 0.8), "bias": (3 ** -0.5, 0.8)}
# Sample stds within 5 standard errors of the law's (a false failure about once in 10⁶).
STD_ERRORS = 5


def _assert_pytorch_default_init(fresh: dict, tree: dict, width: int) -> None:
    """The port's fresh tensors are drawn as the release's are, by PyTorch's defaults (the
    release builds SD3JointModelFlexible and loads SD3 weights into it non-strictly):
    nn.Linear weight and bias uniform(±1/√fan_in), null tokens randn / √width. Each tensor,
    scaled by its bound, is pooled; the pool's std must be the law's within 5 standard
    errors of a sample that size, and so must the same pool drawn by PyTorch's own
    nn.Linear and the release's null-token expression (the law is PyTorch's)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    pooled = {"weight": [], "bias": [], "null": []}
    reference = {"weight": [], "bias": [], "null": []}
    for key, value in sorted(fresh.items()):
        if key == "null_image_embd":
            pooled["null"].append(value.ravel() * np.sqrt(width))
            reference["null"].append((torch.randn(value.shape) / width**0.5).numpy().ravel()
                                     * np.sqrt(width))
            continue
        kind = key.rsplit(".", 1)[1]
        fan_in, out = tree[key.rsplit(".", 1)[0] + ".weight"].shape  # ours: (in, out)
        linear = torch.nn.Linear(fan_in, out)
        pooled[kind].append(value.ravel() * np.sqrt(fan_in))
        reference[kind].append(getattr(linear, kind).detach().numpy().ravel() * np.sqrt(fan_in))
    for kind, (std, kurtosis_term) in POOL_LAWS.items():
        ours, theirs = np.concatenate(pooled[kind]), np.concatenate(reference[kind])
        assert len(ours) > 200, kind
        if kind != "null":  # uniform(±1/√fan_in): scaled, uniform(±1)
            assert np.abs(ours).max() <= 1 and np.abs(theirs).max() <= 1, kind
        error = std * np.sqrt(kurtosis_term / (4 * len(ours)))  # std error of a sample std
        for name, sample in (("ours", ours), ("PyTorch's", theirs)):
            assert abs(np.std(sample) - std) <= STD_ERRORS * error, (
                f"{kind}: {name} std {np.std(sample):.4f}, the law's {std:.4f} ± "
                f"{STD_ERRORS * error:.4f}")


def test_port_with_chosen_adapter_widths_through_the_cli(tmp_path):
    from unialign_convert.cli import main
    _write_source(tmp_path / "src", SD3)
    assert main(["transformer", str(tmp_path / "src"), str(tmp_path / "dst"), "--to",
                 "unialignment", "--vocab-size", "50", "--adapter-widths", "12", "20"]) == 0
    model = unialign_jax.load_transformer(str(tmp_path / "dst"))
    assert model.adapter_img.fc_1.kernel.shape == (SD3.width, 12)
    assert model.adapter_text.fc_2.kernel.shape == (12, 20)
    with pytest.raises(ConversionError, match="only applies with --to unialignment"):
        convert_transformer(str(tmp_path / "src"), str(tmp_path / "dst2"), adapter_widths=(4, 4))


def _assert_fails(tmp_path, match, **kwargs):
    dst = tmp_path / "dst"
    with pytest.raises(ConversionError, match=match):
        convert_transformer(str(tmp_path / "src"), str(dst), **kwargs)
    assert not dst.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".dst")], "partial output left"


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    config = MMDiTConfig.tiny()
    tensors = {k: np.zeros(s, np.float32) for k, s in torch_shapes(config).items()}
    del tensors["transformer_blocks.1.attn.to_q.weight"]
    tensors["some.extra.weight"] = np.zeros(3, np.float32)
    _write_source(tmp_path / "src", config, tensors)
    _assert_fails(tmp_path, r"missing tensors: transformer_blocks\.1\.attn\.to_q\.weight"
                            r"(.|\n)*unexpected tensors.*: some\.extra\.weight")


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    config = MMDiTConfig.tiny()
    tensors = {k: np.zeros(s, np.float32) for k, s in torch_shapes(config).items()}
    tensors["context_embedder.weight"] = np.zeros((32, 31), np.float32)
    _write_source(tmp_path / "src", config, tensors)
    _assert_fails(tmp_path, r"shape mismatches: context_embedder\.weight \(32, 31\) "
                            r"\(expected \(32, 32\)\)")


def test_unknown_class(tmp_path):
    _write_source(tmp_path / "src", MMDiTConfig.tiny())
    cfg = json.load(open(tmp_path / "src" / "config.json"))
    cfg["_class_name"] = "FluxTransformer2DModel"
    json.dump(cfg, open(tmp_path / "src" / "config.json", "w"))
    _assert_fails(tmp_path, "unsupported transformer class 'FluxTransformer2DModel'")


@pytest.mark.parametrize("damage", ["truncate", "header", "empty"])
def test_corrupt_safetensors(tmp_path, damage):
    _write_source(tmp_path / "src", MMDiTConfig.tiny())
    path = tmp_path / "src" / WEIGHTS
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) - 1000], "header": data[:8] + b"{not json" +
                      data[17:], "empty": b""}[damage])
    _assert_fails(tmp_path, {"truncate": "truncated", "header": "corrupt safetensors header",
                             "empty": "not a safetensors file"}[damage])


def test_non_empty_destination_needs_force(tmp_path):
    _write_source(tmp_path / "src", MMDiTConfig.tiny())
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--force"):
        convert_transformer(str(tmp_path / "src"), str(tmp_path / "dst"))
    assert (tmp_path / "dst" / "keep.txt").read_text() == "user data"
    convert_transformer(str(tmp_path / "src"), str(tmp_path / "dst"), force=True)
    assert not (tmp_path / "dst" / "keep.txt").exists()
    assert (tmp_path / "dst" / "config.json").exists()


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    from unialign_convert.cli import main
    _write_source(tmp_path / "src", MMDiTConfig.tiny())
    (tmp_path / "src" / "config.json").unlink()
    assert main(["transformer", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


def test_fixture_conversion_is_complete_and_strict(tiny_transformer_dir):
    """The released tiny layout converts strictly: nothing initialised, nothing dropped."""
    report = json.load(open(os.path.join(tiny_transformer_dir, "conversion.json")))
    assert report["initialised"] == [] and report["dropped"] == []
    src = load_file(shared_fixture("unialignment_tiny", WEIGHTS))
    assert report["num_tensors"] == len(src)
