"""`unialign-semgen` against the release's SemGen-Bench/generate_bench_img.py, with a fake
pipeline that records what the sampler is asked for.

The bench file is written in the release's format (semgen_bench.jsonl: image_id 1-based,
image_path an absolute path of the authors', t2i_long, t2i_complex, edit_multi,
edit_complex). The release names outputs by the 0-based line index (`enumerate(file)`),
runs t2i at guidance 7.0 and edits at 9.0, 50 steps, its negative prompt, and feeds (and
saves as `_SRCIMG`) `Image.open(path).resize((512, 512))`: the raw file, squashed, no crop,
no EXIF rotation. Expected values below are the release's literals and calls, not ours.
"""

import hashlib
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from image_files import exif
from unialign_jax.apps import semgen
from unialign_jax.parallel import make_mesh

RELEASE_NEGATIVE = ("low quality, blurry, low resolution, backlit, cartoon, animated, "
                    "deformed, oversaturated, undersaturated, out of frame")
RELEASE_GUIDANCE = {"t2i_long": 7.0, "t2i_complex": 7.0, "edit_multi": 9.0,
                    "edit_complex": 9.0}
TASKS = tuple(RELEASE_GUIDANCE)
AUTHORS_DIR = "/video_hy2/workspace/xinyang.sxy/DualDiff/vlm_benchmark/benchmark/images"


def source_pixels(seed: int, size=(400, 240)) -> np.ndarray:
    """A non-square, non-uniform picture: gradients and a few bright blocks."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1)
    for _ in range(6):
        x0, y0 = rng.integers(0, w - 40), rng.integers(0, h - 40)
        img[y0:y0 + 40, x0:x0 + 40] = rng.integers(0, 256, 3)
    return img.astype(np.uint8)


@pytest.fixture
def bench(tmp_path):
    """Three lines: an RGB JPEG, one whose EXIF says 'rotate 90°' (the release ignores it),
    and a greyscale JPEG, all non-square, stored under the authors' absolute paths."""
    root = tmp_path / "benchmark"
    (root / "images").mkdir(parents=True)
    lines = []
    for image_id in (1, 2, 3):
        img = Image.fromarray(source_pixels(image_id))
        options = {"exif": exif(6)} if image_id == 2 else {}
        (img.convert("L") if image_id == 3 else img).save(
            root / "images" / f"{image_id}.jpg", quality=95, **options)
        lines.append(json.dumps({
            "image_id": image_id, "image_path": f"{AUTHORS_DIR}/{image_id}.jpg",
            **{task: f"{task} prompt of image {image_id}" for task in TASKS}}))
    (root / "semgen_bench.jsonl").write_text("\n".join(lines) + "\n")
    return root


def fake_output(prompt: str) -> Image.Image:
    """What the fake sampler returns for a prompt: a colour only that prompt gets."""
    colour = tuple(hashlib.md5(prompt.encode()).digest()[:3])
    return Image.new("RGB", (512, 512), colour)


class FakePipeline:
    """Records every sampler call; answers each prompt with `fake_output`. Batches as a
    one-device pipeline of batch size 4."""

    batch_size = 4

    def __init__(self):
        self.calls = []
        self.mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])

    def _answer(self, prompts, on_result):
        for i, prompt in enumerate(prompts):
            on_result(i, fake_output(prompt))

    def generate(self, prompts, **kw):
        self.calls.append({"method": "generate", "prompts": list(prompts), **kw})
        self._answer(prompts, kw["on_result"])

    def edit(self, images, prompts, **kw):
        self.calls.append({"method": "edit", "prompts": list(prompts),
                           "sources": [np.asarray(im) for im in images], **kw})
        self._answer(prompts, kw["on_result"])


@pytest.fixture
def fake(monkeypatch):
    pipe = FakePipeline()
    loads = []
    monkeypatch.setattr(semgen, "load_pipeline_from_args",
                        lambda args: loads.append(args.ckpt) or pipe)
    return pipe, loads


def run(bench, out, tmp_path):
    return semgen.main(["--bench", str(bench), "--ckpt", str(tmp_path), "--out", str(out),
                        "--no-progress"])


def release_source(path) -> np.ndarray:
    """The release's `Image.open(img_path).resize((512, 512))`, as RGB values."""
    return np.asarray(Image.open(path).resize((512, 512)).convert("RGB"))


def centre_crop(path) -> np.ndarray:
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = 512 / min(w, h)
    img = img.resize((round(w * s), round(h * s)), Image.BICUBIC)
    left, top = (img.width - 512) // 2, (img.height - 512) // 2
    return np.asarray(img.crop((left, top, left + 512, top + 512)))


def test_outputs_named_by_line_index_with_the_release_settings(bench, fake, tmp_path):
    pipe, loads = fake
    out = tmp_path / "out"
    assert run(bench, out, tmp_path) == 0
    rows = [json.loads(line) for line in (bench / "semgen_bench.jsonl").read_text().split("\n")
            if line]
    fullset = out / "fullset"

    expected = {"settings.json", "failures.jsonl"}
    for task in TASKS:
        for key in range(len(rows)):
            expected.add(f"{task}/{key}.png")
            if task.startswith("edit"):
                expected.add(f"{task}/{key}_SRCIMG.png")
    found = {os.path.relpath(os.path.join(d, f), fullset)
             for d, _, names in os.walk(fullset) for f in names}
    assert found == expected

    # Each file holds the output of its own line's prompt: key k is line k (0-based).
    for task in TASKS:
        for key, row in enumerate(rows):
            got = np.asarray(Image.open(fullset / task / f"{key}.png"))
            np.testing.assert_array_equal(got, np.asarray(fake_output(row[task])),
                                          err_msg=f"{task}/{key}.png")

    by_task = {}
    for call in pipe.calls:
        task = next(t for t in TASKS if call["prompts"][0].startswith(t + " "))
        by_task.setdefault(task, []).append(call)
    assert sorted(by_task) == sorted(TASKS)
    for task, calls in by_task.items():
        assert [p for c in calls for p in c["prompts"]] == [row[task] for row in rows]
        for call in calls:
            assert call["method"] == ("edit" if task.startswith("edit") else "generate")
            assert call["guidance_scale"] == RELEASE_GUIDANCE[task]
            assert call["num_steps"] == 50
            assert call["negative_prompt"] == RELEASE_NEGATIVE
            size = ({"resolution": 512} if call["method"] == "edit"
                    else {"height": 512, "width": 512})
            assert {k: call[k] for k in size} == size
    assert loads == [str(tmp_path)]

    # The edit source: squashed as the release does it, fed to the model and saved.
    for task in ("edit_multi", "edit_complex"):
        sources = [s for c in by_task[task] for s in c["sources"]]
        for key, row in enumerate(rows):
            path = bench / "images" / f"{row['image_id']}.jpg"
            want = release_source(path)
            saved = np.asarray(Image.open(fullset / task / f"{key}_SRCIMG.png").convert("RGB"))
            np.testing.assert_array_equal(saved, want, err_msg=f"{task}/{key}_SRCIMG.png")
            np.testing.assert_array_equal(sources[key], want)
            assert np.abs(saved.astype(int) - centre_crop(path)).mean() > 10

    settings = json.loads((fullset / "settings.json").read_text())
    assert settings["steps"] == 50 and settings["resolution"] == 512
    assert settings["guidance"] == RELEASE_GUIDANCE
    assert settings["negative_prompt"] == RELEASE_NEGATIVE
    assert "0-based line index" in settings["file_names"]
    assert "no crop" in settings["edit_source"]
    assert settings["exif_orientation"] == "keep"
    assert settings["release_script"] == "SemGen-Bench/generate_bench_img.py"


def test_rerun_skips_finished_files_and_redoes_only_missing_ones(bench, fake, tmp_path):
    pipe, loads = fake
    out = tmp_path / "out"
    assert run(bench, out, tmp_path) == 0
    fullset = out / "fullset"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in fullset.rglob("*")
              if p.is_file()}
    pipe.calls.clear()
    assert run(bench, out, tmp_path) == 0
    assert pipe.calls == [] and len(loads) == 1  # nothing to do: no model loaded
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in fullset.rglob("*")
            if p.is_file()} == before

    redo = fullset / "edit_multi" / "1.png"
    redo.unlink()
    assert run(bench, out, tmp_path) == 0
    # Only line 1 of edit_multi runs (padded with copies of itself to the run's batch shape).
    assert [(c["method"], set(c["prompts"])) for c in pipe.calls] == [
        ("edit", {"edit_multi prompt of image 2"})]
    redone = {redo, redo.with_name("1_SRCIMG.png")}  # rewritten, the same bytes
    assert all(p.read_bytes() == before[p][0] for p in redone)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in fullset.rglob("*")
            if p.is_file() and p not in redone} == \
        {p: v for p, v in before.items() if p not in redone}


def test_help_shows_every_release_setting(capsys):
    with pytest.raises(SystemExit) as exit_:
        semgen.main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--steps STEPS Euler steps (default 50, the release's)",
                  "guidance of t2i_long / t2i_complex (default 7.0, the release's)",
                  "guidance of edit_multi / edit_complex (default 9.0, the release's)",
                  "(default 512, the release's)", RELEASE_NEGATIVE,
                  "0-based line index", "_SRCIMG", "no crop"):
        assert shown in text, shown
