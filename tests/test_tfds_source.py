"""TFDS datasets as training sources: a tiny image–caption dataset prepared here in the
ArrayRecord format (no network, no TensorFlow), read through `tfds:` corpus entries into
the same records as shard folders, and trained on by name with `unialign-train`."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from test_nonsquare_inputs import reference, striped  # noqa: E402
from test_train_resume import _command, _env  # noqa: E402
from unialign_jax.data.format.records import decode_record  # noqa: E402
from unialign_jax.data.read.grain_pipeline import PipelineConfig, training_iterator  # noqa: E402
from unialign_jax.data.read.tfds_source import TfdsSource, parse_spec  # noqa: E402
from unialign_jax.text.tokenizer import tokenize, train_tiny_tokenizer  # noqa: E402

NAME = "unialign_tiny_captions"
COUNT = 12
RES = 16


def caption(i):
    return f"a {['red', 'green', 'blue'][i % 3]} square number {i}"


def png(i):
    buffer = io.BytesIO()
    striped(24 + 2 * i, 20, seed=i).save(buffer, format="PNG")  # non-square, varied sizes
    return buffer.getvalue()


class UnialignTinyCaptions(tfds.core.GeneratorBasedBuilder):
    """Images given as encoded bytes: TFDS encodes arrays with TensorFlow, bytes without."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "photo": tfds.features.Image(shape=(None, None, 3)),
            "text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(COUNT):
            yield i, {"photo": io.BytesIO(png(i)), "text": caption(i)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    UnialignTinyCaptions(data_dir=str(root), file_format="array_record").download_and_prepare()
    return str(root)


def entry(data_dir, **keys):
    query = "&".join(f"{k}={v}" for k, v in {"image": "photo", "caption": "text",
                                              "data_dir": data_dir, **keys}.items())
    return f"tfds:{NAME}?{query}"


def test_examples_become_shard_records(data_dir):
    source = TfdsSource([entry(data_dir)], "t2i", RES)
    assert len(source) == COUNT and source.image_format == "raw" and not source.has_teacher
    seen = set()
    for index in range(COUNT):
        fields, blobs = decode_record(source[index]["record"])
        i = int(fields["caption"].rsplit(" ", 1)[1])  # TFDS stores examples shuffled
        seen.add(i)
        assert fields["caption"] == fields["instruction"] == caption(i)
        expected = reference(Image.open(io.BytesIO(png(i))).convert("RGB"), (RES, RES), "crop")
        pixels = np.frombuffer(bytes(blobs[0]), np.uint8).reshape(RES, RES, 3)
        np.testing.assert_allclose(pixels / 127.5 - 1, expected, atol=1e-9)
        assert source.where(index) == f"example {index} of tfds:{NAME}/train (index {index})"
    assert seen == set(range(COUNT))


def test_grain_batches_from_a_tfds_corpus(data_dir, tmp_path):
    tok = train_tiny_tokenizer([caption(i) for i in range(COUNT)] * 5, tmp_path / "tok",
                               vocab_size=40)
    cfg = PipelineConfig(batch_size=4, tokenizer=str(tmp_path / "tok"), max_length=12,
                         seed=3, resolution=RES, process_index=0, process_count=1)
    batches = [next(it) for it in [training_iterator({"t2i": [entry(data_dir)]}, cfg)]
               for _ in range(3)]
    indices = np.concatenate([b["index"] for b in batches])
    assert sorted(indices) == list(range(COUNT))  # one epoch, shuffled, nothing twice
    source = TfdsSource([entry(data_dir)], "t2i", RES)
    for batch in batches:
        assert batch["target"].shape == (4, RES, RES, 3)
        for row, index in enumerate(batch["index"]):
            fields, blobs = decode_record(source[int(index)]["record"])
            np.testing.assert_array_equal(batch["caption_ids"][row],
                                          tokenize(tok, [fields["caption"]], 12)[0])
            pixels = np.frombuffer(bytes(blobs[0]), np.uint8).reshape(RES, RES, 3)
            np.testing.assert_allclose(batch["target"][row], pixels / 127.5 - 1, atol=1e-6)


def test_no_tensorflow_is_imported(data_dir):
    code = ("import sys; from unialign_jax.data.read.tfds_source import TfdsSource; "
            f"s = TfdsSource([{entry(data_dir)!r}], 't2i', {RES}); s[0]; "
            "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("spec, message", [
    ("image=picture", r"no feature \{'image': 'picture'\}; the dataset has \['photo', 'text'\]"),
    ("split=validation", r"no split 'validation'; the dataset has \['train'\]"),
    ("colour=red", r"unknown: \['colour'\]"),
    ("image=text", "feature 'text' \\(image\\) is not an Image"),
])
def test_bad_entries_name_the_problem(data_dir, spec, message):
    key, value = spec.split("=")
    with pytest.raises(ValueError, match=message):
        TfdsSource([entry(data_dir, **{key: value})], "t2i", RES)


def test_edit_corpus_needs_its_source_and_instruction(data_dir, tmp_path):
    with pytest.raises(ValueError, match="names its source image and instruction"):
        TfdsSource([entry(data_dir)], "edit", RES)
    with pytest.raises(ValueError, match="no prepared TFDS dataset 'not_there'"):
        TfdsSource([f"tfds:not_there?data_dir={tmp_path}"], "t2i", RES)
    assert parse_spec("tfds:x/cfg:1.0.0?split=train[:50%]").split == "train[:50%]"


def test_training_from_a_tfds_dataset_by_name(data_dir, tmp_path):
    """`unialign-train` on the TFDS dataset alone: no shard folder, no edit corpus."""
    root = tmp_path / "corpus"
    train_tiny_tokenizer([caption(i) for i in range(COUNT)] * 5, root / "tokenizer",
                         vocab_size=40)
    corpus = {"root": root, "cache": str(tmp_path.parent / "tfds_train_jax_cache")}
    command = _command(corpus, tmp_path / "run", "run.num_steps=2",  # later keys win
                       f"data.t2i_shards=('{entry(data_dir)}',)", "data.edit_shards=()")
    proc = subprocess.run(command, env=_env(corpus), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss_image"]) and np.isfinite(r["loss_caption"]) for r in rows)
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "2")
