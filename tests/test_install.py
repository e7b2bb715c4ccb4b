"""A non-editable install works from anywhere: a fresh virtualenv gets `pip install .` (the
dependencies come from the environment running the tests), then, from an unrelated folder, every console
script answers --help and a short quickstart runs end to end on the installed copy."""

import os
import subprocess
import sysconfig
import venv

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("unialign-quickstart", "unialign-train", "unialign-convert", "unialign-data",
           "unialign-sample", "unialign-semgen")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    # The dependencies are those of the interpreter running the tests, whether it is a
    # virtualenv or not: its site directories go on the new one's path. (`system_site_packages`
    # would give the base installation's instead, which in a fresh virtualenv has none of them.)
    # Their .pth files are not read, so this environment's editable install stays out of sight.
    site_dir = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip()
    outer = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    with open(os.path.join(site_dir, "outer_environment.pth"), "w") as f:
        f.write("\n".join(outer) + "\n")
    # ensurepip brings its own (old) setuptools, which would shadow this environment's.
    subprocess.run([python, "-m", "pip", "uninstall", "--quiet", "--yes", "setuptools"],
                   capture_output=True, timeout=300)
    proc = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps",
                           "--no-build-isolation", "--no-index", REPO],
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH="")
    return {"bin": env_dir / "bin", "python": python, "cwd": elsewhere, "env": env}


def _run(installed, *command, timeout=600):
    return subprocess.run(list(command), capture_output=True, text=True, timeout=timeout,
                          cwd=installed["cwd"], env=installed["env"])


def test_the_installed_copy_is_used_not_the_checkout(installed):
    proc = _run(installed, installed["python"], "-c",
                "import unialign_jax, unialign_convert, unialign_configs; "
                "print(unialign_jax.__file__, unialign_convert.__file__, "
                "unialign_configs.names())")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert REPO not in proc.stdout and "site-packages" in proc.stdout, proc.stdout
    assert "quickstart" in proc.stdout
    # Nothing is installed under a generic top-level name.
    proc = _run(installed, installed["python"], "-c", "import convert")
    assert proc.returncode != 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_console_script_answers_help(installed, script):
    proc = _run(installed, str(installed["bin"] / script), "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout


def test_a_short_quickstart_runs_on_the_installed_copy(installed):
    work = installed["cwd"] / "qs"
    proc = _run(installed, str(installed["bin"] / "unialign-quickstart"), "--workdir", str(work),
                "--samples", "40", "--vae-steps", "3", "--eval-samples", "4",
                "--sample-steps", "2", "--caption-steps", "2", "run.num_steps=2",
                "run.batch_size=8", "run.micro_batch_per_device=8", "run.log_every=1",
                timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for name in ("report.json", "loss_curves.png", "samples.png", "captions.txt"):
        assert (work / "report" / name).exists(), name
