"""Configs and the `unialign-train` command line: nested sections, files and names, dotted
overrides with types, clear errors, --help and --print-config listing every key."""

import dataclasses
import os

import numpy as np
import pytest

from unialign_jax import configlib
from unialign_jax.models.mmdit_config import MMDiTConfig
from unialign_jax.training import cli
from unialign_configs import load as load_config, names as shipped_configs
from unialign_jax.runs.config import TrainConfig
from unialign_jax.runs.resolve import resolve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_release_config_has_the_release_hyperparameters():
    cfg = load_config("unialignment_512")
    assert (cfg.run.batch_size, cfg.run.micro_batch_per_device, cfg.run.num_steps) == \
        (384, 4, 80_000)
    o = cfg.optimizer
    assert (o.lr, o.warmup_steps, o.weight_decay, o.b1, o.b2, o.eps) == \
        (3e-5, 2000, 0.01, 0.9, 0.999, 1e-8)
    # The release clips the sum of its 12 micro-batch gradients per GPU at 2.0.
    assert (o.grad_clip_norm, o.gradient_scale) == (2.0, 12.0)
    assert (cfg.data.resolution, cfg.compute.dtype, cfg.compute.param_dtype) == \
        (512, "bfloat16", "float32")
    assert (cfg.run.ckpt_every, cfg.run.log_every, cfg.loss.block_depth) == (5000, 20, 8)
    assert cfg.loss.contrastive_scope == "device" and cfg.models.transformer == MMDiTConfig()


def test_all_configs_load_by_name_and_by_path():
    names = shipped_configs()
    assert {"quickstart", "tiny", "unialignment_512"} <= set(names)
    for name in names:
        assert load_config(name) == load_config(os.path.join(REPO, "configs", f"{name}.py"))
    with pytest.raises(FileNotFoundError, match="no config named 'nope'"):
        load_config("nope")


def test_dotted_overrides_parse_literals_strings_and_sections():
    cfg = configlib.apply_overrides(TrainConfig(), [
        "optimizer.lr=1e-4", "run.num_steps=10", "data.t2i_shards=/data/a",
        "data.edit_shards=('/b', '/c')", "models.transformer.num_layers=2",
        "models.t5={'num_layers': 3, 'd_model': 64}", "compute.remat_policy=none",
        "models.tokenizer=gs://x/tok", "mesh.distributed=True", "optimizer.warmup_steps=0",
        "optimizer.ema_decay=None", "loss.contrastive_scope=global"])
    assert cfg.optimizer.lr == 1e-4 and cfg.run.num_steps == 10
    # The retired keys data.t2i_shards / data.edit_shards set entries of data.tasks.
    assert cfg.data.tasks == {"t2i": ("/data/a",), "edit": ("/b", "/c")}
    assert cfg.models.transformer.num_layers == 2
    assert cfg.models.transformer.num_heads == MMDiTConfig().num_heads   # others kept
    assert (cfg.models.t5.num_layers, cfg.models.t5.d_model) == (3, 64)
    assert cfg.compute.remat_policy == "none" and cfg.models.tokenizer == "gs://x/tok"
    assert cfg.mesh.distributed is True and cfg.optimizer.ema_decay is None
    assert cfg.loss.contrastive_scope == "global"
    assert isinstance(configlib.apply_overrides(TrainConfig(), ["optimizer.lr=1"]).optimizer.lr,
                      float)
    # The original is untouched (frozen sections, copies).
    assert TrainConfig().optimizer.lr == 3e-5


@pytest.mark.parametrize("override, message", [
    ("nope=1", "unknown config key 'nope'"),
    ("lr=1", "did you mean optimizer.lr"),
    ("optimiser.lr=1", "did you mean optimizer.lr"),
    ("optimizer.lrr=1", r"did you mean optimizer\.lr\?"),
    ("data.resolutoin=64", "did you mean data.resolution"),
    ("optimizer.lr", "not key=value"),
    ("run.batch_size=1.5", "expected int"),
    ("optimizer.lr=fast", "expected float"),
    ("run.tensorboard=1", "expected bool"),
    ("loss.contrastive_scope=everywhere", "expected Literal"),
    ("models.transformer.nope=1", "unknown config key"),
])
def test_bad_overrides_fail_clearly(override, message):
    with pytest.raises(ValueError, match=message):
        configlib.apply_overrides(TrainConfig(), [override])


def test_the_task_mix_is_one_mapping_whatever_its_spelling():
    """t2i, edit and compose enter `data.tasks` / `data.task_weights` alike; the old keys
    and the tuple of weights are the same mapping; the cycle takes the tasks in a fixed
    order; a config.json from before `data.tasks` still loads."""
    mapping = configlib.apply_overrides(TrainConfig(), [
        "data.tasks={'compose': '/c', 'edit': ['/e'], 't2i': ('/t1', '/t2')}",
        "data.task_weights={'t2i': 3, 'compose': 2}"])
    assert mapping.data.trained() == [("t2i", ("/t1", "/t2"), 3.0), ("edit", ("/e",), 1.0),
                                      ("compose", ("/c",), 2.0)]
    old = configlib.apply_overrides(TrainConfig(), [
        "data.t2i_shards=('/t1', '/t2')", "data.edit_shards=/e", "data.task_weights=(3, 1)"])
    assert old.data.trained() == [("t2i", ("/t1", "/t2"), 3.0), ("edit", ("/e",), 1.0)]
    dropped = configlib.apply_overrides(mapping, ["data.edit_shards=()"])
    assert [task for task, _, _ in dropped.data.trained()] == ["t2i", "compose"]
    assert TrainConfig().data.trained() == []  # and validate() says "no training data"
    saved = mapping.to_dict()
    assert set(saved["data"]) >= {"tasks", "task_weights"} and "t2i_shards" not in saved["data"]
    assert TrainConfig.from_dict(saved) == mapping
    legacy = dict(saved, data={**{k: v for k, v in saved["data"].items() if k != "tasks"},
                               "t2i_shards": ["/t1", "/t2"], "edit_shards": ["/e"],
                               "task_weights": [3.0, 1.0]})
    assert TrainConfig.from_dict(legacy).data == old.data
    with pytest.raises(ValueError, match="more weights than the 3 tasks"):
        configlib.apply_overrides(TrainConfig(), ["data.task_weights=(1, 1, 1, 1)"])
    bad = configlib.apply_overrides(mapping, ["data.tasks={'video': '/v', 't2i': '/t'}",
                                              "data.task_weights={'t2i': 0}"])
    problems = " ".join(bad.data.problems())
    assert "unknown tasks ['video']" in problems and "to positive numbers" in problems


def test_config_json_round_trip():
    cfg = configlib.apply_overrides(load_config("quickstart"),
                                    ["data.t2i_shards=('/a',)", "models.tokenizer=/t"])
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_validate_reports_every_problem():
    cfg = dataclasses.replace(TrainConfig(), run=dataclasses.replace(TrainConfig().run,
                                                                    batch_size=0),
                              loss=dataclasses.replace(TrainConfig().loss, null_prompt_prob=2.0),
                              data=dataclasses.replace(TrainConfig().data, task_weights=(1, 0)),
                              optimizer=dataclasses.replace(TrainConfig().optimizer,
                                                            cosine_end_step=10))
    with pytest.raises(ValueError) as err:
        cfg.validate()
    text = str(err.value)
    for part in ("run.batch_size", "loss.null_prompt_prob", "no training data", "tokenizer",
                 "data.task_weights must map tasks of ['t2i', 'edit', 'compose'] to positive",
                 "optimizer.cosine_end_step (10) must be 0 (no decay), -1 (the last step) or a "
                 "step after the warmup"):
        assert part in text


def test_a_contrastive_loss_without_negatives_is_refused():
    """One row per device micro-batch leaves the per-device contrastive loss 0 (its
    log-softmax over one pair); the config says so, unless the loss is global or off."""
    import jax.numpy as jnp

    from unialign_jax.diffusion.alignment_losses import contrastive_loss

    rows = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3, 8)), jnp.float32)
    assert float(contrastive_loss(rows, -rows, groups=4)) == 0.0   # four groups of one
    base = dataclasses.replace(TrainConfig(), models=dataclasses.replace(
        TrainConfig().models, tokenizer="/t"), data=dataclasses.replace(
        TrainConfig().data, tasks={"t2i": ("/a",)}))

    def with_(micro, **loss):
        return dataclasses.replace(
            base, run=dataclasses.replace(base.run, micro_batch_per_device=micro),
            loss=dataclasses.replace(base.loss, **loss))

    with pytest.raises(ValueError, match="leaves no negatives"):
        with_(1).validate()
    with_(2).validate()
    with_(1, contrastive_scope="global").validate()
    with_(1, contrastive_weight=0.0).validate()


def test_cosine_end_minus_one_is_the_runs_last_step():
    base = TrainConfig()
    cfg = dataclasses.replace(
        base, optimizer=dataclasses.replace(base.optimizer, warmup_steps=10, cosine_end_step=-1),
        run=dataclasses.replace(base.run, num_steps=1234))
    assert resolve(cfg).optimizer.cosine_end_step == 1234
    # a run that ends within the warmup (a smoke run) has nothing left to decay
    short = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, num_steps=10))
    assert resolve(short).optimizer.cosine_end_step == 0


def test_cli_errors_and_help(capsys, tmp_path):
    assert cli.main(["--config", str(tmp_path / "missing.py"), "--workdir",
                     str(tmp_path)]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert cli.main(["--config", "quickstart", "--workdir", str(tmp_path)]) == 2
    assert "no training data" in capsys.readouterr().err
    assert not os.listdir(tmp_path)  # nothing written before the config is valid
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "key=value" in out and "143" in out
    for key, _ in configlib.iter_keys(TrainConfig):   # every key, with its type
        assert f"  {key}: " in out, key
    assert "run.micro_batch_per_device: int = 4" in out


def test_print_config(capsys, tmp_path):
    assert cli.main(["--config", "tiny", "--workdir", str(tmp_path), "optimizer.lr=0.5",
                     "--print-config"]) == 0
    assert "optimizer.lr: float = 0.5" in capsys.readouterr().out
