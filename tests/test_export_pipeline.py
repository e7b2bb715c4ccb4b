"""`unialign-convert export-pipeline`: a converted pipeline → the release's folder layout →
converted again equals the original, every array bit for bit; each exported component loads
into its PyTorch class with no missing or unexpected key."""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from test_convert_pipeline import build_unialignment_folder  # noqa: E402
from test_export_transformer import load_torch  # noqa: E402
from unialign_convert import cli  # noqa: E402
from unialign_convert.torch_unialignment import SD3JointModelFlexible  # noqa: E402
from unialign_jax.checkpoints.pipeline_folder import load_components  # noqa: E402
from unialign_jax.files import PRODUCED_BY  # noqa: E402


def assert_no_loading_problems(info):
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"}
    assert not problems and not info.get("error_msgs"), info


def test_exported_pipeline_reimports_equal(tmp_path):
    build_unialignment_folder(tmp_path / "src")
    # a learned mask row that the PyTorch T5 folder did not have: it must travel too
    np.save(tmp_path / "mask.npy", np.random.RandomState(6).randn(64).astype(np.float32))
    first, exported, second = tmp_path / "first", tmp_path / "exported", tmp_path / "second"
    assert cli.main(["pipeline", str(tmp_path / "src"), str(first),
                     "--mask-embedding", str(tmp_path / "mask.npy")]) == 0
    assert cli.main(["export-pipeline", str(first), str(exported),
                     "--max-shard-size", "200KB"]) == 0

    assert sorted(os.listdir(exported)) == ["model_index.json", PRODUCED_BY, "scheduler",
                                            "text_encoder", "tokenizer", "transformer", "vae"]
    assert json.loads((exported / "model_index.json").read_text())["_class_name"] == \
        "UniAlignmentPipeline"
    transformer = load_torch(exported / "transformer", "unialignment")
    same = SD3JointModelFlexible.from_pretrained(str(exported), subfolder="transformer")
    for key, value in transformer.state_dict().items():
        torch.testing.assert_close(same.state_dict()[key], value, rtol=0, atol=0, msg=key)
    _, info = transformers.T5EncoderModel.from_pretrained(str(exported / "text_encoder"),
                                                          output_loading_info=True)
    assert_no_loading_problems(info)
    _, info = diffusers.AutoencoderKL.from_pretrained(str(exported / "vae"),
                                                      output_loading_info=True)
    assert_no_loading_problems(info)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(
        str(exported / "scheduler"))
    assert scheduler.config.shift == 3.0 and scheduler.config.num_train_timesteps == 1000

    assert cli.main(["pipeline", str(exported), str(second)]) == 0
    a, b = load_components(str(first)), load_components(str(second))
    for part in ("transformer", "t5", "vae"):
        left = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(getattr(a, part))))
        right = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(getattr(b, part))))
        assert [p for p, _ in left] == [p for p, _ in right]
        for (path, x), (_, y) in zip(left, right):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{part}{path}")
    assert a.scheduler == b.scheduler and a.mask_token_id == b.mask_token_id
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    assert a.tokenizer.pad_token == b.tokenizer.pad_token
    assert a.transformer.config == b.transformer.config and a.t5.config == b.t5.config
    assert a.vae.config == b.vae.config


def test_work_dir_is_refused_with_the_way_forward(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text('{"models": {}, "compute": {}, "run": {}}')
    assert cli.main(["export-pipeline", str(tmp_path / "run"), str(tmp_path / "dst")]) == 2
    assert "unialign-convert from-run" in capsys.readouterr().err
    assert cli.main(["export-pipeline", str(tmp_path), str(tmp_path / "dst")]) == 2
    assert "pipeline.json" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()
