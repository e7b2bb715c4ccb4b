"""Teacher features: a tiny random Qwen2.5-VL (built here, with its real image processor and a
tiny byte-level BPE Qwen2 tokenizer, all offline) run over built shards; resume; the
pipeline yields the stored rows by record index."""

import json
import os

import numpy as np
import pytest

from unialign_jax.data.build import synth
from unialign_jax.data.build.shards import BuildOptions, build
from unialign_jax.data.build.teacher_precompute import TeacherWriter
from unialign_jax.data.format.records import decode_record
from unialign_jax.data.format.stored_images import decode_stored
from unialign_jax.data.format.teacher_features import teacher_dir
from unialign_jax.data.read.grain_pipeline import PipelineConfig, training_iterator
from unialign_jax.text.tokenizer import train_tiny_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

N = 7
DIM = 32


def _tiny_qwen(folder, texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(hidden_size=DIM, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=300,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=DIM, fullatt_block_indexes=[1], window_size=56),
        image_token_id=290, video_token_id=291, vision_start_token_id=292,
        vision_end_token_id=293)
    torch.manual_seed(0)
    transformers.Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(folder)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"]))
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    transformers.Qwen2Tokenizer(vocab=bpe.get_vocab(), merges=merges).save_pretrained(folder)
    transformers.Qwen2VLImageProcessorPil().save_pretrained(folder)  # Qwen's defaults


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    synth.generate(str(root / "synth"), N, seed=1, size=32)
    shards = str(root / "shards")
    build([str(root / "synth" / "t2i_train.jsonl")], shards,
          BuildOptions(kind="t2i", resolution=32, records_per_shard=3))
    _tiny_qwen(str(root / "qwen"), synth.corpus_texts())
    return root, shards


def _direct_features(model_dir, shards):
    """The spec's features, computed here from the model's parts, record by record."""
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    from array_record.python.array_record_module import ArrayRecordReader

    image_rows, text_rows = [], []
    for name in sorted(f for f in os.listdir(shards) if f.endswith(".array_record")):
        reader = ArrayRecordReader(os.path.join(shards, name))
        for record in reader.read_all():
            fields, blobs = decode_record(record)
            inputs = processor(images=[decode_stored(blobs[-1], "png", 32)], return_tensors="pt")
            with torch.no_grad():
                tokens = model.model.visual(inputs["pixel_values"],
                                            grid_thw=inputs["image_grid_thw"]).pooler_output
                ids = torch.tensor([tokenizer.encode(fields["caption"])])
                words = model.model.language_model.embed_tokens(ids)[0]
            image_rows.append(tokens.mean(0).numpy())
            text_rows.append(words.mean(0).numpy())
        reader.close()
    return np.stack(image_rows), np.stack(text_rows)


class _Crashing:
    """Wraps a teacher and fails on its second batch, like a preempted job."""

    def __init__(self, teacher):
        self.teacher, self.calls = teacher, 0
        self.dim, self.name, self.text_features = teacher.dim, teacher.name, teacher.text_features

    def image_features(self, pixels):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("preempted")
        return self.teacher.image_features(pixels)


def test_precomputed_features_match_the_spec_and_resume(setup):
    from unialign_jax.data.build.teacher_precompute import precompute
    from unialign_jax.data.build.teacher_qwen import QwenTeacher

    root, shards = setup
    teacher = QwenTeacher(str(root / "qwen"), pooling="clean")
    with pytest.raises(RuntimeError, match="preempted"):
        precompute(shards, _Crashing(teacher), batch_size=3)
    assert not os.path.exists(teacher_dir(shards))
    with open(os.path.join(shards, ".teacher.partial", "progress.json")) as f:
        assert json.load(f)["done"] == 3  # the first batch is kept for the rerun
    assert precompute(shards, teacher, batch_size=3) == {"records": N, "dim": DIM,
                                                         "model": str(root / "qwen")}
    image, text = _direct_features(str(root / "qwen"), shards)
    stored = {k: np.load(os.path.join(teacher_dir(shards), f"{k}.npy")) for k in ("image", "text")}
    assert stored["image"].shape == (N, DIM) and stored["image"].dtype == np.float16
    np.testing.assert_allclose(stored["image"], image, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(stored["text"], text, rtol=2e-3, atol=2e-3)
    with pytest.raises(FileExistsError):
        precompute(shards, teacher)


def test_release_text_pooling_pads_the_batch_together_and_averages_the_pads(setup):
    """The release: processor(text=captions_of_the_batch, padding=True), embedding rows
    averaged over every position, pads included."""
    from unialign_jax.data.build.teacher_qwen import QwenTeacher

    root, _ = setup
    texts = ["a red square", "make the cyan circle yellow", "a green triangle"]
    teacher = QwenTeacher(str(root / "qwen"), pooling="release")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(root / "qwen"))
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    assert (inputs["attention_mask"] == 0).any(), "the texts must need padding"
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(root / "qwen")).eval()
    with torch.no_grad():
        want = model.get_input_embeddings()(inputs["input_ids"]).mean(1).numpy()
    np.testing.assert_allclose(teacher.text_features(texts), want, rtol=1e-5, atol=1e-6)
    clean = QwenTeacher(str(root / "qwen"), pooling="clean").text_features(texts)
    assert np.abs(clean - want).max() > 1e-3


def test_pipeline_yields_teacher_rows_by_record_index(tmp_path):
    synth.generate(str(tmp_path / "synth"), 5, seed=2, size=16)
    shards = str(tmp_path / "shards")
    summary = build([str(tmp_path / "synth" / "t2i_train.jsonl")], shards,
                    BuildOptions(kind="t2i", resolution=16, records_per_shard=2))
    writer = TeacherWriter(shards, summary["shards"], dim=4, model="fake")
    rows = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
    writer.append(rows, -rows)
    writer.finish()
    tok = str(tmp_path / "tok")
    train_tiny_tokenizer(synth.corpus_texts(), tok, vocab_size=60)
    cfg = PipelineConfig(batch_size=5, tokenizer=tok, max_length=8, process_index=0,
                         process_count=1, num_epochs=1, seed=4)
    (batch,) = list(training_iterator({"t2i": [shards]}, cfg))
    np.testing.assert_array_equal(batch["teacher_image"], rows[batch["index"]])
    np.testing.assert_array_equal(batch["teacher_text"], -rows[batch["index"]])
    assert batch["teacher_image"].dtype == np.float32

    os.rename(os.path.join(shards, "summary.json"), os.path.join(shards, "s.json"))
    with open(os.path.join(shards, "s.json")) as f:
        stale = json.load(f)
    stale["shards"][-1]["file"] = "rebuilt.array_record"
    with open(os.path.join(shards, "summary.json"), "w") as f:
        json.dump(stale, f)
    with pytest.raises(ValueError, match="computed for another build"):
        training_iterator({"t2i": [shards]}, cfg)
