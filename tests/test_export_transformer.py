"""`unialign-convert export`: diffusers folder → ours → diffusers folder, loaded by the PyTorch
classes with no missing or unexpected key and every tensor bit-identical (both layouts,
sharded and not); the release's layout at full size; a transformer trained here runs the
same in PyTorch."""

import json
import os
import stat

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from flax import nnx  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import unialign_jax  # noqa: E402
from conftest import shared_fixture  # noqa: E402
from test_convert_transformer import SD3, _write_source  # noqa: E402
from test_from_run import shared_cache  # noqa: E402
from test_train_resume import _train as train  # noqa: E402
from test_train_resume import corpus  # noqa: E402, F401
from unialign_convert import cli  # noqa: E402
from unialign_convert.export import export_tensors  # noqa: E402
from unialign_convert.torch_unialignment import SD3JointModelFlexible  # noqa: E402
from unialign_convert.transformer import convert_transformer  # noqa: E402
from unialign_convert.transformer_keys import abstract_params  # noqa: E402
from unialign_jax.files import PRODUCED_BY  # noqa: E402
from unialign_jax.models.mmdit import MMDiTConfig  # noqa: E402

WEIGHTS = "diffusion_pytorch_model"
RTOL = 1e-4  # max |ours - torch| / max |torch|, float32
CLASSES = {"sd3": diffusers.SD3Transformer2DModel, "unialignment": SD3JointModelFlexible}


def load_torch(folder, layout):
    """The PyTorch model of an exported folder; refuses any missing / unexpected / mis-shaped
    key (diffusers' own loading report)."""
    model, info = CLASSES[layout].from_pretrained(str(folder), output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [], info
    assert info["mismatched_keys"] == [] and info["error_msgs"] == [], info
    return model.eval()


def stored_tensors(folder):
    """Every tensor of a (sharded or single-file) safetensors folder."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


@pytest.mark.parametrize("layout", ["sd3", "unialignment"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single_file", "sharded"])
def test_round_trip_is_bit_identical(tmp_path, layout, sharded):
    config = SD3 if layout == "sd3" else MMDiTConfig.tiny()
    source = _write_source(tmp_path / "src", config, shards=3 if sharded else 1)
    convert_transformer(str(tmp_path / "src"), str(tmp_path / "ours"))
    size = ["--max-shard-size", "40KB"] if sharded else []
    assert cli.main(["export", str(tmp_path / "ours"), str(tmp_path / "dst"), *size]) == 0

    names = sorted(os.listdir(tmp_path / "dst"))
    if sharded:
        index = json.loads((tmp_path / "dst" / f"{WEIGHTS}.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and set(shards) < set(names)
        assert set(index["weight_map"]) == set(source)
        assert index["metadata"]["total_size"] == sum(v.nbytes for v in source.values())
        for name in shards:
            assert os.path.getsize(tmp_path / "dst" / name) < 40_000 + 4096
    else:
        assert names == ["config.json", f"{WEIGHTS}.safetensors", PRODUCED_BY]
    written = stored_tensors(tmp_path / "dst")
    assert set(written) == set(source)
    state = load_torch(tmp_path / "dst", layout).state_dict()
    for key, value in source.items():
        assert written[key].dtype == np.float32
        np.testing.assert_array_equal(written[key], value, err_msg=key)
        np.testing.assert_array_equal(state[key].numpy(), value, err_msg=key)


def test_bfloat16_export_rounds_each_tensor_once(tmp_path):
    source = _write_source(tmp_path / "src", MMDiTConfig.tiny())
    convert_transformer(str(tmp_path / "src"), str(tmp_path / "ours"))
    assert cli.main(["export", str(tmp_path / "ours"), str(tmp_path / "dst"),
                     "--dtype", "bfloat16"]) == 0
    written = stored_tensors(tmp_path / "dst")
    for key, value in source.items():
        assert written[key].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(written[key], value.astype(ml_dtypes.bfloat16))


def test_release_fixture_exports_to_itself_and_pytorch_reproduces_the_release(
        tmp_path, tiny_transformer_dir):
    """The released-layout fixture, imported and exported, is the same file content; the
    PyTorch class loaded from it gives the release's stored outputs."""
    fixture = os.path.dirname(shared_fixture("unialignment_tiny", "config.json"))
    assert cli.main(["export", tiny_transformer_dir, str(tmp_path / "dst")]) == 0
    original = load_file(os.path.join(fixture, f"{WEIGHTS}.safetensors"))
    written = stored_tensors(tmp_path / "dst")
    assert set(written) == set(original)
    for key, value in original.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert config == json.loads(open(os.path.join(fixture, "config.json")).read())

    ref = load_file(os.path.join(fixture, "reference_io.safetensors"))
    batch = ref["gen.sample"].shape[0]
    model = load_torch(tmp_path / "dst", "unialignment")
    with torch.no_grad():
        sample, logits, *_ = model(
            torch.from_numpy(ref["latents"]),
            encoder_hidden_states=torch.from_numpy(ref["context"][:batch]),
            timestep=torch.from_numpy(ref["timestep"][:batch]))
    for ours, expected in ((sample, ref["gen.sample"]), (logits, ref["gen.text_logits"])):
        err = np.abs(ours.numpy() - expected).max() / np.abs(expected).max()
        assert err <= RTOL, err


def test_full_size_layout_is_the_releases():
    """The exporter's tensor list for the released configuration (shapes only, nothing
    allocated) is the release's state dict: same keys, same shapes."""
    full = json.load(open(shared_fixture("unialignment_full_shapes.json")))
    config = MMDiTConfig.from_diffusers({**full["config"], "_class_name": "SD3JointModelFlexible"})
    tensors = export_tensors("transformer", config, abstract_params(config))
    assert {t.key: list(t.shape) for t in tensors} == full["shapes"]
    assert sum(int(np.prod(t.shape)) for t in tensors) == full["num_params"]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):  # noqa: F811
    workdir = tmp_path_factory.mktemp("trained") / "train"
    train(shared_cache(corpus, tmp_path_factory), workdir, "run.num_steps=2",
          "run.ckpt_every=2")
    return str(workdir)


def test_trained_transformer_runs_the_same_in_pytorch(trained, tmp_path):
    dst = tmp_path / "exported"
    assert cli.main(["export", trained, str(dst), "--max-shard-size", "100KB"]) == 0
    assert os.path.exists(dst / f"{WEIGHTS}.safetensors.index.json")
    torch_model = load_torch(dst, "unialignment")
    ours = unialign_jax.load_pipeline(trained, progress=False).components.transformer

    # back through our importer: the run's EMA weights, bit for bit
    assert cli.main(["transformer", str(dst), str(tmp_path / "back")]) == 0
    back = unialign_jax.load_transformer(str(tmp_path / "back"))
    a, b = (jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(m)))
            for m in (ours, back))
    for (path, x), (other, y) in zip(a, b, strict=True):
        assert path == other
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))

    cfg = ours.config
    rng = np.random.default_rng(0)
    side = cfg.sample_size
    latents = rng.standard_normal((2, cfg.in_channels, side, side), dtype=np.float32)
    context = rng.standard_normal((2, 8, cfg.joint_attention_dim), dtype=np.float32)
    timestep = np.array([981.0, 12.5], np.float32)
    with torch.no_grad():
        sample, logits, *_ = torch_model(torch.from_numpy(latents),
                                         encoder_hidden_states=torch.from_numpy(context),
                                         timestep=torch.from_numpy(timestep))
    out = ours(jnp.asarray(latents.transpose(0, 2, 3, 1)), jnp.asarray(timestep),
               jnp.asarray(context))
    for mine, expected in ((np.asarray(out.sample).transpose(0, 3, 1, 2), sample.numpy()),
                           (np.asarray(out.text_logits), logits.numpy())):
        err = np.abs(mine - expected).max() / np.abs(expected).max()
        assert err <= RTOL, err


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exported_folder_has_the_permissions_mkdir_gives(tmp_path, tiny_transformer_dir,
                                                        umask):
    """Not the 0o700 of a temporary folder: what `mkdir` makes under the user's umask."""
    previous = os.umask(umask)
    try:
        assert cli.main(["export", tiny_transformer_dir, str(tmp_path / "dst")]) == 0
        os.mkdir(tmp_path / "by_mkdir")
    finally:
        os.umask(previous)
    mode = lambda path: stat.S_IMODE(os.stat(path).st_mode)  # noqa: E731
    assert mode(tmp_path / "dst") == mode(tmp_path / "by_mkdir") == 0o777 & ~umask
    for name in os.listdir(tmp_path / "dst"):
        assert mode(tmp_path / "dst" / name) == 0o666 & ~umask, name


def test_bad_requests_fail_clearly_and_write_nothing(tmp_path, capsys, tiny_transformer_dir):
    assert cli.main(["export", str(tmp_path / "missing"), str(tmp_path / "dst")]) == 2
    assert "checkpoint folder not found" in capsys.readouterr().err
    assert cli.main(["export", tiny_transformer_dir, str(tmp_path / "dst"), "--raw"]) == 2
    assert "not a training work dir" in capsys.readouterr().err
    assert cli.main(["export", tiny_transformer_dir, str(tmp_path / "dst"),
                     "--max-shard-size", "lots"]) == 2
    assert "not a size: 'lots'" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == []
