"""`unialign-convert transformer CKPT --config FILE`: training checkpoints written the way the
release's `train.py` writes them (from the PyTorch stand-in of its model) convert to the
model they were written from; the step is recorded; bad folders fail clearly."""

from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from safetensors.torch import save_file  # noqa: E402

from test_convert_transformer import SD3, _converted_tree, _ours  # noqa: E402
from torch_unialignment import UniAlignmentStandIn  # noqa: E402
from unialign_convert import cli  # noqa: E402
from unialign_convert.export import transformer_config  # noqa: E402
from unialign_convert.transformer_keys import tensor_moves  # noqa: E402
from unialign_jax.models.mmdit import MMDiTConfig  # noqa: E402

CONFIG = MMDiTConfig.tiny()
WEIGHTS = "consolidated.00-of-01.safetensors"


def stand_in(config: dict, seed: int, **extra) -> dict[str, torch.Tensor]:
    """The state dict of a random stand-in of `SD3JointModelFlexible` built from a diffusers
    config, as train.py builds it (`SD3JointModelFlexible(vocab, **config)`)."""
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    model = UniAlignmentStandIn(**kwargs, **extra)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model.state_dict()


def write_step(run, step: int, state: dict, finished: bool = True) -> str:
    """A step folder as train.py's save block writes it under --results_dir: the full state
    dict (FSDP FULL_STATE_DICT: unprefixed keys, float32) with its step in the metadata,
    the optimizer / scheduler / args pickles, then resume_step.txt."""
    folder = os.path.join(run, "checkpoints", f"{step:07d}")
    os.makedirs(folder)
    save_file(state, os.path.join(folder, WEIGHTS),
              metadata={"step": str(step), "format": "FSDP-sharded"})
    if not finished:  # killed while saving: the later files never came
        return folder
    params = [torch.nn.Parameter(v.clone()) for v in list(state.values())[:2]]
    opt = torch.optim.AdamW(params)
    torch.save(opt.state_dict(), os.path.join(folder, "optimizer.00000-of-00001.pth"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    torch.save(scheduler.state_dict(), os.path.join(folder, "scheduler.pth"))
    torch.save(argparse.Namespace(precision="bf16"), os.path.join(folder, "model_args.pth"))
    with open(os.path.join(folder, "resume_step.txt"), "w") as f:
        print(step, file=f)
    return folder


def assert_converted(dst, config: MMDiTConfig, state: dict) -> None:
    ours = _converted_tree(str(dst), config)
    moves = {m.source: m for m in tensor_moves(config)}
    assert set(ours) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(ours[key], _ours(moves[key], value.numpy()), err_msg=key)


def report(dst) -> dict:
    return json.loads((dst / "conversion.json").read_text())


@pytest.fixture(scope="module")
def release_run(tmp_path_factory):
    """A results dir with steps 1 and 5001 finished and 10001 killed mid-save; the config
    file is the UniAlignment transformer's config.json."""
    root = tmp_path_factory.mktemp("release")
    config_file = root / "config.json"
    config_file.write_text(json.dumps(transformer_config(CONFIG)))
    states = {step: stand_in(transformer_config(CONFIG), seed=step) for step in (1, 5001)}
    run = root / "results"
    for step, state in states.items():
        write_step(str(run), step, state)
    write_step(str(run), 10001, stand_in(transformer_config(CONFIG), seed=3), finished=False)
    return run, config_file, states


def test_newest_finished_step_of_a_run_converts_exactly(tmp_path, release_run):
    run, config_file, states = release_run
    assert cli.main(["transformer", str(run), str(tmp_path / "dst"),
                     "--config", str(config_file)]) == 0
    assert_converted(tmp_path / "dst", CONFIG, states[5001])
    got = report(tmp_path / "dst")
    assert got["step"] == 5001 and got["checkpoint"].endswith("checkpoints/0005001")
    assert got["config"] == str(config_file) and got["initialised"] == got["dropped"] == []
    produced = json.loads((tmp_path / "dst" / "produced_by.json").read_text())
    assert set(produced["inputs"]) == {"src", "config"}


@pytest.mark.parametrize("how", ["step_option", "step_folder"])
def test_a_chosen_step_converts_exactly(tmp_path, release_run, how):
    run, config_file, states = release_run
    src, extra = ((run / "checkpoints", ["--step", "1"]) if how == "step_option"
                  else (run / "checkpoints" / "0000001", []))
    assert cli.main(["transformer", str(src), str(tmp_path / "dst"),
                     "--config", str(config_file), *extra]) == 0
    assert_converted(tmp_path / "dst", CONFIG, states[1])
    assert report(tmp_path / "dst")["step"] == 1


def test_sd3_config_with_the_tokenizer_length(tmp_path):
    """train.py's own case: SD3-medium's config.json plus len(tokenizer) as vocab_size."""
    sd3_config = transformer_config(SD3)
    (tmp_path / "sd3.json").write_text(json.dumps(sd3_config))
    state = stand_in(sd3_config, seed=7, vocab_size=50, adapter_hidden_dim=12, teacher_dim=20)
    write_step(str(tmp_path / "run"), 2, state)
    args = ["transformer", str(tmp_path / "run"), str(tmp_path / "dst"),
            "--config", str(tmp_path / "sd3.json")]
    assert cli.main(args + ["--vocab-size", "50", "--adapter-widths", "12", "20"]) == 0
    assert_converted(tmp_path / "dst", SD3.as_unialignment(50, (12, 20)), state)
    assert report(tmp_path / "dst")["step"] == 2


def _drop(folder, name):
    os.remove(os.path.join(folder, name))


def _rename(folder, old, new):
    os.rename(os.path.join(folder, old), os.path.join(folder, new))


def _prefix(folder, prefix):
    from safetensors.torch import load_file

    path = os.path.join(folder, WEIGHTS)
    save_file({prefix + k: v for k, v in load_file(path).items()}, path)


CFG = ["--config", "{tmp}/config.json"]
BAD = {  # (damage to a finished step folder of step 2, arguments, expected error)
    "no_config": (None, [], "stores no configuration: pass --config FILE"),
    "missing_config_file": (None, ["--config", "{tmp}/nowhere.json"],
                            "nowhere.json: no such file"),
    "no_weights": (lambda f: _drop(f, WEIGHTS), CFG, r"no consolidated\.00-of-01\.safetensors"),
    "model_parallel": (lambda f: _rename(f, WEIGHTS, "consolidated.00-of-02.safetensors"), CFG,
                       "model-parallel checkpoint"),
    "prefixed_keys": (lambda f: _prefix(f, "module."), CFG,
                      r"missing tensors: (.|\n)*unexpected tensors.*: module\."),
    "no_such_step": (None, CFG + ["--step", "3"], r"no checkpoint of step 3; steps present: \[2\]"),
    "sd3_without_vocab": (None, ["--config", "{tmp}/sd3.json"], "pass --vocab-size"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoints_fail_clearly_and_write_nothing(tmp_path, capsys, case):
    damage, args, message = BAD[case]
    (tmp_path / "config.json").write_text(json.dumps(transformer_config(CONFIG)))
    (tmp_path / "sd3.json").write_text(json.dumps(transformer_config(SD3)))
    folder = write_step(str(tmp_path / "run"), 2, stand_in(transformer_config(CONFIG), seed=0))
    if damage:
        damage(folder)
    args = [a.format(tmp=tmp_path) for a in args]
    assert cli.main(["transformer", str(tmp_path / "run"), str(tmp_path / "dst"), *args]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "run", "sd3.json"]


def test_a_run_with_no_finished_step_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(transformer_config(CONFIG)))
    write_step(str(tmp_path / "run"), 2, stand_in(transformer_config(CONFIG), seed=0),
               finished=False)
    assert cli.main(["transformer", str(tmp_path / "run"), str(tmp_path / "dst"),
                     "--config", str(tmp_path / "config.json")]) == 2
    assert "no finished checkpoint" in capsys.readouterr().err
