"""The README's route from an export to PyTorch, run as written: its command lines and Python
blocks are read out of README.md and run in a folder laid out as they expect — a
quickstart-sized training run (the quickstart's model configuration, two steps on the
synthetic corpus) at runs/quickstart/train, a random SD3 transformer at
sd3-medium/transformer — and what PyTorch computes is checked against our forward."""

import os
import re
import shlex

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import unialign_jax  # noqa: E402
from conftest import REPO  # noqa: E402
from test_from_run import shared_cache  # noqa: E402
from test_lora_diffusers import SD3, randomise  # noqa: E402
from test_train_resume import _command, _env  # noqa: E402
from test_train_resume import corpus  # noqa: E402, F401
from unialign_convert import cli  # noqa: E402

README = os.path.join(REPO, "README.md")
RTOL = 1e-4  # max |ours - torch| / max |torch|, float32


def readme_blocks(language: str) -> list[str]:
    text = open(README, encoding="utf-8").read()
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def readme_python(needle: str) -> str:
    """The README's one Python block containing `needle`."""
    found = [b for b in readme_blocks("python") if needle in b]
    assert len(found) == 1, f"README.md has {len(found)} Python blocks with {needle!r}"
    return found[0]


def readme_command(start: str) -> list[str]:
    """argv of the README's one shell line starting with `start` (its comment dropped)."""
    found = [line for b in readme_blocks("bash") for line in b.splitlines()
             if line.startswith(start)]
    assert len(found) == 1, f"README.md has {len(found)} shell lines starting {start!r}"
    return shlex.split(found[0], comments=True)


def run_readme_command(start: str) -> None:
    argv = readme_command(start)
    assert argv[0] == "unialign-convert", argv
    assert cli.main(argv[1:]) == 0, argv


@pytest.fixture(scope="module")
def quickstart_run(corpus, tmp_path_factory):  # noqa: F811
    """A folder holding runs/quickstart/train: the quickstart's configuration trained two
    steps on the test corpus (16 px, no teacher features)."""
    import subprocess

    corpus = shared_cache(corpus, tmp_path_factory)
    root = tmp_path_factory.mktemp("user")
    command = _command(corpus, root / "runs" / "quickstart" / "train", "data.resolution=16",
                       "loss.allow_missing_teacher=True", "run.num_steps=2", "run.ckpt_every=2",
                       "run.batch_size=4", "run.micro_batch_per_device=4")
    command[command.index("tiny")] = "quickstart"
    proc = subprocess.run(command, env=_env(corpus), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def test_the_readme_runs_a_quickstart_export_in_pytorch(quickstart_run, monkeypatch):
    monkeypatch.chdir(quickstart_run)
    run_readme_command("unialign-convert export runs/quickstart/train exported/transformer")
    user = {}
    exec(readme_python('SD3JointModelFlexible.from_pretrained("exported/transformer")'), user)

    ours = unialign_jax.load_pipeline("runs/quickstart/train", progress=False)
    ours = ours.components.transformer
    assert ours.config.num_null_tokens != 8 and ours.config.adapter_hidden_dim != 2048
    assert user["transformer"].config.num_null_tokens == ours.config.num_null_tokens
    out = ours(jnp.asarray(user["latents"].numpy().transpose(0, 2, 3, 1)),
               jnp.asarray(user["timestep"].numpy()), jnp.asarray(user["text_states"].numpy()))
    for mine, theirs in ((np.asarray(out.sample).transpose(0, 3, 1, 2), user["velocity"]),
                         (np.asarray(out.text_logits), user["text_logits"])):
        theirs = theirs.numpy()
        assert mine.shape == theirs.shape
        assert np.abs(mine - theirs).max() / np.abs(theirs).max() <= RTOL


def test_the_readme_runs_an_sd3_export_in_pytorch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    original = randomise(diffusers.SD3Transformer2DModel(**SD3))
    original.save_pretrained("sd3-medium/transformer")
    run_readme_command("unialign-convert transformer sd3-medium/transformer converted/sd3")
    run_readme_command("unialign-convert export converted/sd3 exported/sd3_transformer")
    user = {}
    exec(readme_python('SD3Transformer2DModel.from_pretrained("exported/sd3_transformer")'),
         user)
    state = user["transformer"].state_dict()
    assert state.keys() == original.state_dict().keys()
    for key, value in original.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
