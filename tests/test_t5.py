"""T5 encoder: parity with transformers' `T5EncoderModel`, conversion, mask embedding, bad input."""

from __future__ import annotations

import copy
import json
import os
import re
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import unialign_jax  # noqa: E402
from conftest import shared_fixture  # noqa: E402
from unialign_convert import cli  # noqa: E402
from unialign_convert.mask_embedding import read_mask_embedding  # noqa: E402
from unialign_convert.safetensors_io import ConversionError  # noqa: E402
from unialign_convert.t5 import convert_t5  # noqa: E402
from unialign_jax.models.t5 import relative_position_buckets  # noqa: E402

PAD_ID, MASK_ID = 1, 99


def random_t5(path, *, d_model=32, num_heads=4, d_kv=12, d_ff=40, num_layers=3, vocab_size=128,
              max_distance=20, shard=True, seed=0):
    """A transformers T5EncoderModel with every weight random (norms too), saved at `path`.

    Linear weights have std 1/sqrt(fan_in) so that activations stay O(1) through the layers.
    """
    torch.manual_seed(seed)
    cfg = transformers.T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
        num_heads=num_heads, relative_attention_num_buckets=32,
        relative_attention_max_distance=max_distance, feed_forward_proj="gated-gelu",
        dropout_rate=0.0)
    model = transformers.T5EncoderModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "shared" in name or "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    model.save_pretrained(path, max_shard_size="40KB" if shard else "10GB")
    return model


def input_ids(batch=2, length=40, vocab=128, seed=0):
    """Random ids with `</s>` padding at the end and the mask id scattered in."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(2, vocab, (batch, length))
    ids[:, rng.randint(0, length, 6)] = MASK_ID
    ids[0, length - 9:] = PAD_ID
    ids[1, length - 2:] = PAD_ID
    return ids


def torch_hidden(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).last_hidden_state.numpy()


@pytest.mark.parametrize("length,buckets,max_distance", [(300, 32, 128), (70, 32, 20), (50, 8, 16)])
def test_relative_position_buckets_match_transformers(length, buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    pos = torch.arange(length)
    ref = T5Attention._relative_position_bucket(pos[None, :] - pos[:, None], True, buckets,
                                                max_distance)
    np.testing.assert_array_equal(relative_position_buckets(length, buckets, max_distance), ref)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A sharded random T5 converted through the CLI."""
    root = tmp_path_factory.mktemp("t5")
    model = random_t5(root / "src")
    assert len(list((root / "src").glob("*.safetensors"))) > 1, "the source should be sharded"
    assert cli.main(["t5", str(root / "src"), str(root / "dst")]) == 0
    return model, root / "dst"


def test_t5_matches_transformers_float32(converted):
    model, dst = converted
    ids = input_ids()
    ref = torch_hidden(model, ids)
    out = np.asarray(unialign_jax.load_t5(str(dst))(jnp.asarray(ids)))
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_t5_bfloat16_compute_is_as_close_as_torch_bfloat16(converted):
    """bf16 parameters and compute: no further from float32 torch than torch's own bf16 run."""
    model, dst = converted
    ids = input_ids(seed=1)
    ref = torch_hidden(model, ids)
    with torch.no_grad():
        torch_bf16 = copy.deepcopy(model).to(torch.bfloat16)(torch.tensor(ids)).last_hidden_state
    torch_err = np.abs(torch_bf16.float().numpy() - ref).max()
    t5 = unialign_jax.load_t5(str(dst), jnp.bfloat16, param_dtype=jnp.bfloat16)
    out = t5(jnp.asarray(ids))
    assert out.dtype == jnp.bfloat16 and t5.blocks.ffn.wo.kernel[...].dtype == jnp.bfloat16
    err = np.abs(np.asarray(out, np.float32) - ref).max()
    assert err <= 1.5 * torch_err, (err, torch_err)


def test_released_mask_embedding_replaces_its_row(tmp_path):
    """Row MASK_ID equals the released vector, every other row is unchanged, and outputs match
    torch's T5 with the same row replaced."""
    released_file = shared_fixture("mask_token_emb.00-of-01.pth")
    released = torch.load(released_file, map_location="cpu", weights_only=True).float().numpy()
    assert released.shape == (4096,)
    model = random_t5(tmp_path / "src", d_model=4096, num_heads=2, d_kv=8, d_ff=8, num_layers=1,
                      shard=False)
    assert cli.main(["t5", str(tmp_path / "src"), str(tmp_path / "dst"),
                     "--mask-embedding", released_file, "--mask-token-id", str(MASK_ID)]) == 0
    t5 = unialign_jax.load_t5(str(tmp_path / "dst"))
    table = np.asarray(t5.embedding[...])
    np.testing.assert_array_equal(table[MASK_ID], released)
    original = model.shared.weight.detach().numpy()
    np.testing.assert_array_equal(np.delete(table, MASK_ID, 0), np.delete(original, MASK_ID, 0))
    with torch.no_grad():
        model.shared.weight[MASK_ID] = torch.from_numpy(released)
    ids = input_ids(length=12)
    ref = torch_hidden(model, ids)
    np.testing.assert_allclose(np.asarray(t5(jnp.asarray(ids))), ref, rtol=0,
                               atol=1e-4 * np.abs(ref).max())
    sidecar = json.loads((tmp_path / "dst" / "conversion.json").read_text())
    assert sidecar["mask_embedding"]["token_id"] == MASK_ID


def test_mask_embedding_formats_agree(tmp_path):
    from safetensors.numpy import save_file

    vector = np.random.RandomState(0).randn(16).astype(np.float32)
    torch.save(torch.from_numpy(vector).to(torch.bfloat16), tmp_path / "v.pth")
    save_file({"mask_token_emb": vector}, str(tmp_path / "v.safetensors"))
    np.save(tmp_path / "v.npy", vector)
    bf16 = torch.from_numpy(vector).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(read_mask_embedding(str(tmp_path / "v.pth"), 16), bf16)
    for name in ("v.safetensors", "v.npy"):
        np.testing.assert_array_equal(read_mask_embedding(str(tmp_path / name), 16), vector)


def test_parameters_carry_logical_axes_and_load_sharded(converted):
    """Every parameter is annotated (stacked ones with 'layers' first) and the loader places
    arrays with `parallel.rules.module_shardings`."""
    from flax import nnx

    from unialign_jax.parallel.mesh import make_mesh
    from unialign_jax.parallel.rules import module_shardings

    _, dst = converted
    t5 = unialign_jax.load_t5(str(dst), shardings=module_shardings(make_mesh()))
    for path, var in nnx.to_flat_state(nnx.state(t5, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.get_value().ndim, path
        assert isinstance(var.get_value().sharding, jax.sharding.NamedSharding), path
    assert t5.blocks.attention.q.kernel.get_metadata()["out_sharding"] == (
        "layers", "embed", "heads")
    assert t5.blocks.ffn.wo.kernel.get_metadata()["out_sharding"] == ("layers", "mlp", "embed")
    assert t5.embedding.get_metadata()["out_sharding"] == ("vocab", "embed")


def test_checkpoint_not_matching_its_config_is_refused(tmp_path):
    from unialign_jax.checkpoints.io import CheckpointError

    random_t5(tmp_path / "src", num_layers=1, shard=False)
    convert_t5(str(tmp_path / "src"), str(tmp_path / "dst"))
    meta = json.loads((tmp_path / "dst" / "config.json").read_text())
    meta["config"]["d_ff"] = 44
    (tmp_path / "dst" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"blocks/ffn/wi_0/kernel stored \(1, 32, 40\), "
                                              r"expected \(1, 32, 44\)"):
        unialign_jax.load_t5(str(tmp_path / "dst"))


def test_mask_token_id_defaults_to_extra_id_0():
    assert cli.build_parser().parse_args(["t5", "a", "b"]).mask_token_id == 32099


def test_pth_mask_embedding_without_torch_says_so(tmp_path, monkeypatch):
    path = tmp_path / "mask.pth"
    torch.save(torch.ones(8), path)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ConversionError, match="needs PyTorch"):
        read_mask_embedding(str(path), 8)


def test_mask_embedding_of_wrong_width_is_refused(tmp_path):
    random_t5(tmp_path / "src", num_layers=1, shard=False)
    np.save(tmp_path / "mask.npy", np.zeros(31, np.float32))
    with pytest.raises(ConversionError, match=r"shape \(31,\), expected \(32,\)"):
        convert_t5(str(tmp_path / "src"), str(tmp_path / "dst"),
                   mask_embedding=str(tmp_path / "mask.npy"))
    assert not (tmp_path / "dst").exists()


def _rewrite_weights(src, edit):
    """Re-saves `src/model.safetensors` with `edit(dict)` applied."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, src / "model.safetensors")


def _edit_config(src, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


BAD_SOURCES = {
    "missing_tensor": (
        lambda src: _rewrite_weights(
            src, lambda t: t.pop("encoder.block.1.layer.1.DenseReluDense.wo.weight")),
        r"missing tensors: encoder\.block\.1\.layer\.1\.DenseReluDense\.wo\.weight"),
    "wrong_shape": (
        lambda src: _edit_config(src, d_ff=48),
        r"shape mismatches: encoder\.block\.0\.layer\.1\.DenseReluDense\.wi_0\.weight "
        r"\(40, 32\) \(expected \(48, 32\)\)"),
    "extra_layer": (lambda src: _edit_config(src, num_layers=1),
                    r"unexpected tensors.*encoder\.block\.1\."),
    "wrong_class": (lambda src: _edit_config(src, architectures=["T5ForConditionalGeneration"]),
                    "expected a T5EncoderModel"),
    "not_v1_1": (lambda src: _edit_config(src, feed_forward_proj="relu"),
                 "not T5 v1.1's 'gated-gelu'"),
    "truncated": (lambda src: os.truncate(src / "model.safetensors",
                                          os.path.getsize(src / "model.safetensors") - 64),
                  "truncated"),
    "no_config": (lambda src: os.remove(src / "config.json"), "no config.json"),
}


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_bad_source_is_refused_and_nothing_is_written(tmp_path, capsys, case):
    damage, message = BAD_SOURCES[case]
    random_t5(tmp_path / "src", num_layers=2, shard=False)
    damage(tmp_path / "src")
    assert cli.main(["t5", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert os.listdir(tmp_path) == ["src"], "nothing may be left at or beside DST"
