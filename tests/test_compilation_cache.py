"""The persistent compilation cache every CLI sets up (`unialign_jax.compilation_cache`):
where it goes (flags, environment, default), that it is on by default and writes compiled
programs there, and that every command line offers the flags."""

import argparse
import os
import subprocess
import sys

import pytest

from unialign_jax import compilation_cache as cc

ENV_KEYS = (cc.ENV_VAR, cc.JAX_ENV_VAR, "XDG_CACHE_HOME")


@pytest.fixture
def clean_env(monkeypatch):
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_the_folder_follows_flags_then_environment_then_default(clean_env, tmp_path):
    home = os.path.expanduser("~")
    assert cc.cache_dir() == os.path.join(home, ".cache", "unialign_jax", "jax")
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cc.cache_dir() == str(tmp_path / "xdg" / "unialign_jax" / "jax")
    clean_env.setenv(cc.JAX_ENV_VAR, str(tmp_path / "jax"))
    assert cc.cache_dir() == str(tmp_path / "jax")
    clean_env.setenv(cc.ENV_VAR, str(tmp_path / "ours"))
    assert cc.cache_dir() == str(tmp_path / "ours")
    assert cc.cache_dir(str(tmp_path / "flag")) == str(tmp_path / "flag")
    assert cc.cache_dir(str(tmp_path / "flag"), disabled=True) is None
    clean_env.setenv(cc.ENV_VAR, "OFF")
    assert cc.cache_dir() is None


SCRIPT = """
import argparse, sys
from unialign_jax import compilation_cache
parser = argparse.ArgumentParser()
compilation_cache.add_arguments(parser)
folder = compilation_cache.setup_from_args(parser.parse_args(sys.argv[1:]))
import jax
jax.jit(lambda x: x * 2 + 1)(jax.numpy.ones(3)).block_until_ready()
print(folder)
"""


def run_script(args, env):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *args], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_on_by_default_and_off_with_the_flag(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    # the entry is tiny and compiles fast: JAX's own variable lowers the threshold to 0
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_PLATFORMS="cpu",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    default = tmp_path / "xdg" / "unialign_jax" / "jax"
    assert run_script([], env) == str(default)
    assert os.listdir(default)
    assert run_script(["--compilation-cache", str(tmp_path / "mine")], env) == str(
        tmp_path / "mine")
    assert os.listdir(tmp_path / "mine")
    before = sorted(os.listdir(default))
    assert run_script(["--no-compilation-cache"], dict(env, **{cc.ENV_VAR: str(default)})) \
        == "None"
    assert sorted(os.listdir(default)) == before


@pytest.mark.parametrize("module", ["unialign_jax.training.cli", "unialign_jax.sampling.cli",
                                    "unialign_jax.apps.quickstart", "unialign_jax.apps.semgen",
                                    "unialign_convert.cli"])
def test_every_command_line_has_the_flags(module):
    import importlib

    parser = importlib.import_module(module).build_parser()
    parsers = [parser] + [p for action in parser._actions
                          if isinstance(action, argparse._SubParsersAction)
                          for p in action.choices.values()]
    leaves = [p for p in parsers if not any(isinstance(a, argparse._SubParsersAction)
                                            for a in p._actions)]
    for p in leaves:
        flags = {f for action in p._actions for f in action.option_strings}
        assert {"--compilation-cache", "--no-compilation-cache"} <= flags, p.prog


def test_a_test_run_keeps_its_cache_out_of_the_home_folder_one_per_worker():
    """conftest: the command lines these tests run in-process write to a cache of this
    test process (one per pytest-xdist worker), not to ~/.cache."""
    import tempfile

    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    folder = cc.cache_dir()
    assert os.path.dirname(folder) == os.path.abspath(tempfile.gettempdir())
    assert os.path.basename(folder).startswith(f"unialign_jax_test_cache_{worker}_")
