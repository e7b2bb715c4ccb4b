"""Computes the alignment teacher's features with Qwen2.5-VL (transformers, PyTorch).

Spec section 2: the image feature is the vision tower's output tokens (after the patch
merger, `out_hidden_size` wide) for the clean target image, averaged; the text feature
is the LLM's input-embedding rows of the tokenised caption, averaged. The target image
is the one stored in the shards (already resized and cropped); Qwen's own image
processor then prepares it exactly as it would for the VLM. PyTorch is needed only here.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from tqdm import tqdm

from unialign_jax.data import images as image_ops
from unialign_jax.data.records import decode_record
from unialign_jax.data.source import read_summary, record_files
from unialign_jax.data.teacher import TeacherWriter


class QwenTeacher:
    """A local Qwen2.5-VL folder (weights, image processor, tokenizer), loaded offline."""

    def __init__(self, path: str, device: str = "cpu", dtype: str = "float32"):
        import torch
        from transformers import (AutoImageProcessor, AutoTokenizer,
                                  Qwen2_5_VLForConditionalGeneration)

        self.torch, self.device, self.name = torch, device, path
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, local_files_only=True, dtype=getattr(torch, dtype)).to(device).eval()
        self.image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.dim = self.model.config.vision_config.out_hidden_size
        text_dim = self.model.get_input_embeddings().embedding_dim
        if text_dim != self.dim:
            raise ValueError(f"{path}: vision output {self.dim} != text embeddings {text_dim}")

    def image_features(self, pixels: list[np.ndarray]) -> np.ndarray:
        """(N, dim) mean of the merged vision tokens of each uint8 (H, W, 3) image."""
        inputs = self.image_processor(images=[Image.fromarray(p) for p in pixels],
                                      return_tensors="pt")
        with self.torch.no_grad():
            tokens = self.model.get_image_features(
                inputs["pixel_values"].to(self.device),
                inputs["image_grid_thw"].to(self.device)).pooler_output
        return np.stack([t.float().mean(0).cpu().numpy() for t in tokens])

    def text_features(self, texts: list[str]) -> np.ndarray:
        """(N, dim) mean of the input-embedding rows of each text's tokens."""
        table = self.model.get_input_embeddings()
        rows = []
        with self.torch.no_grad():
            for text in texts:
                ids = self.tokenizer(text, return_tensors="pt")["input_ids"].to(self.device)
                rows.append(table(ids)[0].float().mean(0).cpu().numpy())
        return np.stack(rows)


def precompute(shard_dir: str, teacher, batch_size: int = 16, force: bool = False) -> dict:
    """Fills `shard_dir/teacher/` with `teacher`'s features of every record, resumably."""
    import grain

    summary = read_summary(shard_dir)
    writer = TeacherWriter(shard_dir, summary["shards"], teacher.dim, teacher.name, force)
    records = grain.sources.ArrayRecordDataSource(record_files(shard_dir, summary))
    with tqdm(total=writer.records, initial=writer.done, unit="record", desc="teacher") as bar:
        while writer.done < writer.records:
            batch = range(writer.done, min(writer.done + batch_size, writer.records))
            targets, captions = [], []
            for i in batch:
                fields, blobs = decode_record(records[i])
                targets.append(image_ops.decode_stored(blobs[-1], summary["image_format"],
                                                       summary["resolution"]))
                captions.append(fields["caption"])
            writer.append(teacher.image_features(targets), teacher.text_features(captions))
            bar.update(len(batch))
    writer.finish()
    return {"records": writer.records, "dim": teacher.dim, "model": teacher.name}
