"""`unialign-sample` end to end on a tiny pipeline: files, sidecars, resuming, and bad items
reported and skipped while the rest is written."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from test_sampling_pipeline import tiny_components
from unialign_jax.sampling import cli
from unialign_jax.sampling import unialign_pipeline as cli_pipeline
from unialign_jax.checkpoints.pipeline_folder import RELEASE_NEGATIVE_PROMPT
from unialign_jax.sampling.unialign_pipeline import UniAlignPipeline

FAST = ["--steps", "2", "--batch-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    return UniAlignPipeline(tiny_components(tmp_path_factory.mktemp("tok")), batch_size=2,
                            progress=False)


@pytest.fixture
def loads(monkeypatch, tiny_pipe):
    """Replaces checkpoint loading (and the reading of what it was trained with) by the
    tiny pipeline; records the loads."""
    calls = []

    def load(args):
        calls.append(args.ckpt)
        tiny_pipe.batch_size = args.batch_size
        return tiny_pipe

    monkeypatch.setattr(cli, "load_pipeline_from_args", load)
    monkeypatch.setattr(cli, "trained_with_of", lambda args: tiny_pipe.trained_with)
    return calls


def save_picture(path, seed=0, size=(72, 48)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


def test_t2i_writes_pngs_and_sidecars_and_resumes(tmp_path, loads, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n\na blue ball\n")
    out = tmp_path / "out"
    argv = ["t2i", "--ckpt", str(tmp_path), "--prompt", "a cat", "--prompts-file",
            str(prompts), "--height", "64", "--width", "48", "--seed", "5", "--out", str(out),
            *FAST]
    assert cli.main(argv) == 0
    assert "3 written, 0 already done" in capsys.readouterr().out
    side = json.loads((out / "00002.json").read_text())
    assert side == {"task": "t2i", "index": 2, "prompt": "a blue ball", "seed": 7,
                    "images": [], "steps": 2, "checkpoint": str(tmp_path), "dtype": "float32",
                    "attention": "auto", "text_length": 256, "height": 64, "width": 48,
                    "guidance": 7.0,
                    "negative_prompt": RELEASE_NEGATIVE_PROMPT}
    assert Image.open(out / "00000.png").size == (48, 64)
    assert not [f for f in os.listdir(out) if f.startswith(".")], "no temporary files left"

    stamp = os.path.getmtime(out / "00001.png")
    assert cli.main(argv) == 0
    assert "0 written, 3 already done" in capsys.readouterr().out
    assert os.path.getmtime(out / "00001.png") == stamp
    assert len(loads) == 1, "nothing to do: the checkpoint is not even loaded"

    os.remove(out / "00001.json")  # an interrupted item: PNG without sidecar is redone
    assert cli.main(argv) == 0
    assert "1 written, 2 already done" in capsys.readouterr().out


def test_edit_skips_the_bad_image_and_writes_the_rest(tmp_path, loads, capsys):
    good = save_picture(tmp_path / "good.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG truncated")
    out = tmp_path / "out"
    argv = ["edit", "--ckpt", str(tmp_path), "--image", good, "--image", str(broken),
            "--image", str(tmp_path / "missing.png"), "--prompt", "make it blue",
            "--resolution", "64", "--out", str(out), *FAST]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert "skipping item 1: cannot decode image" in captured.err
    assert "skipping item 2: cannot read image" in captured.err
    assert "1 written, 0 already done, 2 skipped as bad" in captured.out
    assert Image.open(out / "00000.png").size == (64, 64)
    assert json.loads((out / "00000.json").read_text())["images"] == [good]
    assert not (out / "00001.png").exists() and not (out / "00002.png").exists()


def test_compose_and_jsonl_items_with_relative_paths(tmp_path, loads, capsys):
    (tmp_path / "imgs").mkdir()
    for i in range(4):
        save_picture(tmp_path / "imgs" / f"{i}.png", seed=i)
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "put them together", "images": ["imgs/0.png", "imgs/1.png"], "seed": 42},
        {"prompt": "too many", "images": [f"imgs/{i}.png" for i in range(4)]},
    ]) + "\n")
    out = tmp_path / "out"
    assert cli.main(["compose", "--ckpt", str(tmp_path), "--prompts-file", str(items),
                     "--resolution", "64", "--out", str(out), *FAST]) == 1
    assert "skipping item 1: 4 condition images; the model takes at most 3" \
        in capsys.readouterr().err
    side = json.loads((out / "00000.json").read_text())
    assert side["seed"] == 42
    assert side["images"] == [str(tmp_path / "imgs" / "0.png"), str(tmp_path / "imgs" / "1.png")]


def test_caption_prints_and_gathers_captions(tmp_path, loads, capsys):
    images = [save_picture(tmp_path / f"{i}.png", seed=i) for i in range(2)]
    out = tmp_path / "out"
    argv = ["caption", "--ckpt", str(tmp_path), "--image", images[0], "--image", images[1],
            "--resolution", "64", "--length", "8", "--steps", "3", "--out", str(out),
            "--batch-size", "2", "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    records = [json.loads(l) for l in (out / "captions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1]
    assert [r["image"] for r in records] == images
    for r in records:
        assert f"[{r['index']}] {r['caption']}" in printed


@pytest.mark.parametrize("argv, message", [
    (["t2i", "--height", "100"], "height must be a positive multiple of 16"),
    (["t2i"], "nothing to do"),
    (["edit", "--prompt", "x"], "needs both --image and --prompt"),
    (["t2i", "--prompt", "a", "--steps", "0"], "--steps must be at least 1"),
])
def test_bad_arguments_exit_before_loading_anything(tmp_path, loads, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv[:1], "--ckpt", str(tmp_path), "--out", str(tmp_path / "o"), *argv[1:]])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert loads == []


# The release's defaults (modules/pipeline.py): text_to_image_sampling_loop 28 steps,
# image_editing_sampling_loop (editing and, in infer.py, perception) and
# image_composing_sampling_loop 50, guidance 7.0 for all; captions as infer.py runs them.
RELEASE_STEPS = {"t2i": 28, "edit": 50, "perceive": 50, "compose": 50, "caption": 32}


def test_each_task_defaults_to_the_releases_steps_in_the_cli_and_the_pipeline(
        tmp_path, tiny_pipe, monkeypatch):
    parser = cli.build_parser()
    for task, steps in RELEASE_STEPS.items():
        args = parser.parse_args([task, "--ckpt", "c", "--out", "o"])
        assert args.steps == steps, task
        assert task == "caption" or args.guidance == 7.0

    used = []  # (steps, guidance) reaching the samplers when each task runs by default

    class Sampled(Exception):
        pass

    def caption_sampler(*args, num_steps, **kwargs):
        used.append((num_steps, None))
        raise Sampled

    monkeypatch.setattr(tiny_pipe, "_diffuse", lambda *a: used.append(a[5:7]) or [])
    monkeypatch.setattr(cli_pipeline, "sample_caption", caption_sampler)
    image = Image.open(save_picture(tmp_path / "p.png", size=(64, 64)))
    tiny_pipe.generate("a cat", height=64, width=64)
    tiny_pipe.edit([image], "x", resolution=64)
    tiny_pipe.perceive([image], "x", resolution=64)
    tiny_pipe.compose([[image]], "x", resolution=64)
    with pytest.raises(Sampled):
        tiny_pipe.caption([image], resolution=64, length=8)
    assert used == [(RELEASE_STEPS[t], None if t == "caption" else 7.0)
                    for t in ("t2i", "edit", "perceive", "compose", "caption")]


def test_real_converted_checkpoint_end_to_end(tmp_path, capsys):
    """No stand-in: `unialign-convert pipeline` output loaded by the CLI itself."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from test_convert_pipeline import build_unialignment_folder, convert

    build_unialignment_folder(tmp_path / "src")
    np.save(tmp_path / "mask.npy", np.random.RandomState(6).randn(64).astype(np.float32))
    convert(tmp_path / "src", tmp_path / "ckpt", tmp_path / "mask.npy")
    capsys.readouterr()
    out = tmp_path / "out"
    assert cli.main(["t2i", "--ckpt", str(tmp_path / "ckpt"), "--prompt", "a cat",
                     "--height", "64", "--width", "64", "--out", str(out), *FAST]) == 0
    assert "1 written" in capsys.readouterr().out
    assert Image.open(out / "00000.png").size == (64, 64)
