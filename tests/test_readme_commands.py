"""The README's commands for the quickstart's model run as written.

A reduced quickstart (same model size and config, a few steps) fills `runs/quickstart` in a
scratch folder; then every line of the README's bash blocks marked `# on the quickstart's
model` runs there through a shell, as a user would type it, and must exit 0. What they
make is checked: outputs at the size the model was trained at, the negative prompt it
knows, the PyTorch module's output equal to ours, the notebook on the quickstart's pipeline.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "# on the quickstart's model"
# The reduced quickstart: the shipped config, a few steps (what a test can afford).
QUICK = ("--samples", "40", "--vae-steps", "3", "--eval-samples", "4", "--sample-steps", "2",
         "--caption-steps", "2", "run.num_steps=2", "run.batch_size=8",
         "run.micro_batch_per_device=8", "run.log_every=1")


def readme_blocks(marker: str = MARKER) -> list[list[str]]:
    """The command lines of every ```bash block of the README whose first line is `marker`
    (continuation backslashes joined, comments and blank lines dropped)."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        if not body.startswith(marker):
            continue
        joined = body.replace("\\\n", " ")
        lines = [line.split("  #")[0].strip() for line in joined.splitlines()]
        blocks.append([line for line in lines if line and not line.startswith("#")])
    return blocks


def _env():
    bin_dir = os.path.dirname(sys.executable)
    return dict(os.environ, JAX_PLATFORMS="cpu", PATH=bin_dir + os.pathsep + os.environ["PATH"],
                UNIALIGN_NOTEBOOK_STEPS="2")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A folder laid out as the repository is for a user (notebooks/ beside runs/), with
    the reduced quickstart run in runs/quickstart."""
    root = tmp_path_factory.mktemp("user")
    shutil.copytree(os.path.join(REPO, "notebooks"), root / "notebooks")
    proc = subprocess.run([sys.executable, "-m", "unialign_jax.apps.quickstart", "--workdir",
                           "runs/quickstart", *QUICK], cwd=root, env=_env(),
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return root


def test_the_readme_marks_the_quickstart_commands():
    lines = [line for block in readme_blocks() for line in block]
    for command in ("unialign-sample t2i", "unialign-sample edit", "unialign-sample caption",
                    "unialign-train --config quickstart", "jupyter execute notebooks/sampling.ipynb"):
        assert any(line.startswith(command) for line in lines), command


def test_ci_runs_the_readme_set_up_and_test_commands():
    """`.ci/run` installs as the README's first set-up line does and ends with exactly its
    test command (the line after `# run the tests`), so CI runs what a newcomer runs."""
    setup = readme_blocks("# install and run the quickstart")[0]
    install, test = setup[0].split(" && ")[0], setup[1]
    with open(os.path.join(REPO, ".ci", "run")) as f:
        ci = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert ci[-1] == test, (ci[-1], test)
    assert f"python -m {install}" in [line.replace(" --quiet", "") for line in ci], ci


def test_the_readme_commands_run_as_written(checkout):
    for block in readme_blocks():
        for line in block:
            if line.startswith("jupyter execute"):
                # The same run, keeping the executed notebook to read what it printed.
                line += " --output sampling_executed"
            proc = subprocess.run(line, shell=True, cwd=checkout, env=_env(),
                                  capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, (line, (proc.stdout + proc.stderr)[-4000:])

    # The notebook found the quickstart's pipeline (from notebooks/): no random stand-in.
    executed = json.loads((checkout / "notebooks" / "sampling_executed.ipynb").read_text())
    printed = "".join("".join(out.get("text", "")) for cell in executed["cells"]
                      for out in cell.get("outputs", []))
    pipeline = os.path.abspath(checkout / "runs" / "quickstart" / "pipeline")
    assert f"pipeline folder: {pipeline}" in printed and "RANDOM" not in printed, printed[:2000]

    trained = json.loads((checkout / "runs/quickstart/pipeline/pipeline.json").read_text())
    side = trained["resolution"]
    assert trained["negative_prompt"] == " "  # the null prompt the run dropped to
    t2i = checkout / "out" / "t2i"
    assert Image.open(t2i / "00000.png").size == (side, side)
    sidecar = json.loads((t2i / "00000.json").read_text())
    assert (sidecar["height"], sidecar["width"], sidecar["negative_prompt"]) == (side, side, " ")
    edit = json.loads((checkout / "out" / "edit" / "00000.json").read_text())
    assert (edit["resolution"], edit["negative_prompt"]) == (side, " ")
    assert Image.open(checkout / "out" / "edit" / "00000.png").size == (side, side)
    captions = (checkout / "out" / "caption" / "captions.jsonl").read_text().splitlines()
    assert len(captions) == 1 and isinstance(json.loads(captions[0])["caption"], str)


def test_rerunning_the_quickstart_keeps_its_report(checkout):
    """A finished quickstart rerun with the same settings changes nothing (its report kept
    the training's final losses and the first run's timings); other settings run again."""
    report = checkout / "runs" / "quickstart" / "report" / "report.json"
    before = report.read_bytes()
    rows = [json.loads(line) for line in
            (checkout / "runs" / "quickstart" / "train" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    assert json.loads(before)["final_losses"] == {k: v for k, v in last.items()
                                                  if k.startswith("loss")}
    proc = subprocess.run([sys.executable, "-m", "unialign_jax.apps.quickstart", "--workdir",
                           "runs/quickstart", *QUICK], cwd=checkout, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "already done with these settings" in proc.stdout
    assert report.read_bytes() == before
