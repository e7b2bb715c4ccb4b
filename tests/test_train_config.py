"""Configs and the `unialign-train` command line: files, overrides, clear errors, --help."""

import os

import pytest

from unialign_jax.training import cli
from unialign_jax.training.config import TrainConfig, apply_overrides, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_release_config_has_the_release_hyperparameters():
    cfg = load_config(os.path.join(REPO, "configs", "unialignment_512.py"))
    assert (cfg.batch_size, cfg.micro_batch_per_device, cfg.num_steps) == (384, 4, 80_000)
    assert (cfg.lr, cfg.warmup_steps, cfg.weight_decay) == (3e-5, 2000, 0.01)
    assert (cfg.b1, cfg.b2, cfg.eps, cfg.grad_clip_norm, cfg.ema_decay) == \
        (0.9, 0.999, 1e-8, 2.0, 0.9995)
    assert (cfg.resolution, cfg.dtype, cfg.param_dtype) == (512, "bfloat16", "float32")
    assert (cfg.ckpt_every, cfg.log_every, cfg.block_depth) == (5000, 20, 8)


def test_all_configs_load():
    for name in os.listdir(os.path.join(REPO, "configs")):
        if name.endswith(".py"):
            assert isinstance(load_config(os.path.join(REPO, "configs", name)), TrainConfig)


def test_overrides_parse_literals_and_strings():
    cfg = apply_overrides(TrainConfig(), [
        "lr=1e-4", "num_steps=10", "t2i_shards=/data/a", "edit_shards=('/b', '/c')",
        "transformer={'num_layers': 2}", "remat_policy=None", "tokenizer=gs://x/tok",
        "distributed=True", "warmup_steps=0"])
    assert cfg.lr == 1e-4 and cfg.num_steps == 10 and cfg.warmup_steps == 0
    assert cfg.t2i_shards == ("/data/a",) and cfg.edit_shards == ("/b", "/c")
    assert cfg.transformer == {"num_layers": 2} and cfg.remat_policy is None
    assert cfg.tokenizer == "gs://x/tok" and cfg.distributed is True
    assert isinstance(apply_overrides(TrainConfig(), ["lr=1"]).lr, float)


@pytest.mark.parametrize("override, message", [
    ("nope=1", "unknown config key"),
    ("lr", "not key=value"),
    ("batch_size=1.5", "expected int"),
    ("lr=fast", "expected float"),
    ("tensorboard=1", "expected bool"),
])
def test_bad_overrides_fail_clearly(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(TrainConfig(), [override])


def test_validate_reports_every_problem():
    cfg = TrainConfig(batch_size=0, null_prompt_prob=2.0)
    with pytest.raises(ValueError) as err:
        cfg.validate()
    text = str(err.value)
    for part in ("batch_size", "null_prompt_prob", "no training data", "tokenizer"):
        assert part in text


def test_cli_errors_and_help(capsys, tmp_path):
    assert cli.main(["--config", str(tmp_path / "missing.py"), "--workdir",
                     str(tmp_path)]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert cli.main(["--config", os.path.join(REPO, "configs", "quickstart.py"),
                     "--workdir", str(tmp_path)]) == 2
    assert "no training data" in capsys.readouterr().err
    assert not os.listdir(tmp_path)  # nothing written before the config is valid
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "key=value" in out and "micro_batch_per_device" in out and "143" in out


def test_print_config(capsys, tmp_path):
    assert cli.main(["--config", os.path.join(REPO, "configs", "tiny.py"), "--workdir",
                     str(tmp_path), "lr=0.5", "--print-config"]) == 0
    assert "lr = 0.5" in capsys.readouterr().out
