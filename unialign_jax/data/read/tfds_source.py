"""Prepared TFDS datasets (ArrayRecord format) as training sources, without TensorFlow.

A corpus entry of `data.t2i_shards` / `data.edit_shards` may name a TFDS dataset instead
of a shard folder:

    tfds:NAME[:VERSION][?split=train&image=image&caption=caption&data_dir=DIR]
    tfds:NAME?image=edited&source=original&instruction=edit_prompt&caption=caption  (edit)

`image` (target image), `caption` and, for editing, `source` (the input image) and
`instruction` name the dataset's features (defaults in `TfdsSpec`; the instruction of a
text-to-image example is its caption). The dataset must have been prepared locally in the
ArrayRecord file format (`download_and_prepare(file_format="array_record")`); it is opened
with `tfds.data_source`, a random-access source that Grain shuffles, shards over hosts and
checkpoints like the shard folders. Image features are read as their stored bytes and
decoded by the project's one decoder (`unialign_jax.images`), then resized and centre-
cropped to the run's resolution as `unialign-data build` does, so a TFDS example becomes
the same record a shard holds. TFDS datasets carry no teacher features: train them with
`loss.align_weight=0` or `loss.allow_missing_teacher=True`.

TensorFlow is never imported: reading ArrayRecord data sources works without it (checked
by tests/test_tfds_source.py in a process without TensorFlow).
"""

from __future__ import annotations

import bisect
import dataclasses
import urllib.parse
from typing import Sequence

import numpy as np

from unialign_jax import images
from unialign_jax.data.format.records import encode_record
from unialign_jax.data.read.shard_source import CorruptRecord

PREFIX = "tfds:"
IMAGE_FORMAT = "raw"  # records are handed on as decoded, resized pixels


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """One `tfds:` corpus entry: the dataset, its split and which features to read."""

    name: str
    split: str = "train"
    data_dir: str | None = None     # None: TFDS's default ($TFDS_DATA_DIR, ~/tensorflow_datasets)
    image: str = "image"            # the target image
    caption: str = "caption"
    instruction: str | None = None  # None: the caption (text-to-image)
    source: str | None = None       # the edit's input image

    def __str__(self) -> str:
        return f"{PREFIX}{self.name}/{self.split}"


def is_tfds(entry: str) -> bool:
    return str(entry).startswith(PREFIX)


def parse_spec(entry: str) -> TfdsSpec:
    """`tfds:NAME?key=value&...` → TfdsSpec; unknown keys are refused by name."""
    if not is_tfds(entry):
        raise ValueError(f"{entry!r} is not a {PREFIX} entry")
    url = urllib.parse.urlsplit(str(entry)[len(PREFIX):])
    name = url.path
    options = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
    fields = {f.name for f in dataclasses.fields(TfdsSpec)} - {"name"}
    unknown = sorted(set(options) - fields)
    if not name or unknown:
        raise ValueError(f"{entry!r}: expected tfds:NAME[?key=value&...] with keys from "
                         f"{sorted(fields)}" + (f"; unknown: {unknown}" if unknown else ""))
    return TfdsSpec(name=name, **options)


def _open(spec: TfdsSpec, task: str):
    """(random-access source, number of examples) of one prepared dataset, its features
    checked against the spec."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(spec.name, data_dir=spec.data_dir)
        info = builder.info
    except Exception as e:  # TFDS raises its own DatasetNotFoundError and registry errors
        raise ValueError(f"{spec}: no prepared TFDS dataset {spec.name!r} in "
                         f"{spec.data_dir or 'the default TFDS data dir'} ({e})") from None
    if str(info.file_format) not in ("array_record", "FileFormat.ARRAY_RECORD"):
        raise ValueError(f"{spec}: stored as {info.file_format}, not ArrayRecord; prepare it "
                         "with download_and_prepare(file_format='array_record')")
    if spec.split not in info.splits:
        raise ValueError(f"{spec}: no split {spec.split!r}; the dataset has "
                         f"{sorted(info.splits)}")
    wanted = {"image": spec.image, "caption": spec.caption}
    if task == "edit":
        if spec.source is None or spec.instruction is None:
            raise ValueError(f"{spec}: an editing corpus names its source image and "
                             "instruction features (…&source=KEY&instruction=KEY)")
        wanted.update(source=spec.source, instruction=spec.instruction)
    elif spec.source is not None:
        raise ValueError(f"{spec}: a text-to-image corpus has no source image")
    features = info.features
    missing = {role: key for role, key in wanted.items() if key not in features}
    if missing:
        raise ValueError(f"{spec}: no feature {missing}; the dataset has {sorted(features)}")
    for role in ("image", "source"):
        if role in wanted and not isinstance(features[wanted[role]], tfds.features.Image):
            raise ValueError(f"{spec}: feature {wanted[role]!r} ({role}) is not an Image")
    skip = {wanted[role]: tfds.decode.SkipDecoding() for role in ("image", "source")
            if role in wanted}
    source = tfds.data_source(spec.name, split=spec.split, data_dir=spec.data_dir,
                              download=False, decoders=skip)
    return source, info.splits[spec.split].num_examples


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsSource:
    """Examples of one or more prepared TFDS datasets as shard records (a Grain source):
    same interface as `shard_source.ShardSource`."""

    image_format = IMAGE_FORMAT
    teachers = None
    has_teacher = False

    def __init__(self, entries: Sequence[str], task: str, resolution: int | None):
        if resolution is None:
            raise ValueError("a TFDS corpus needs the run's resolution (data.resolution)")
        self.kind, self.resolution, self.num_sources = task, resolution, 1
        self.specs = [parse_spec(e) for e in entries]
        opened = [_open(spec, task) for spec in self.specs]
        self._sources = [source for source, _ in opened]
        self._starts = list(np.cumsum([0] + [n for _, n in opened]))
        if not len(self):
            raise ValueError(f"no examples in {[str(s) for s in self.specs]}")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        part = bisect.bisect_right(self._starts, index) - 1
        return part, index - int(self._starts[part])

    def where(self, index: int) -> str:
        part, local = self._locate(index)
        return f"example {local} of {self.specs[part]} (index {index})"

    def _pixels(self, data: bytes, name: str) -> bytes:
        """Stored image bytes → decoded, resized and centre-cropped uint8 pixels."""
        try:
            image = images.decode_image(data, name).image
        except images.ImageError as e:
            raise CorruptRecord(f"{name}: {e}") from None
        return np.asarray(images.resize_and_center_crop(image, self.resolution),
                          np.uint8).tobytes()

    def __getitem__(self, index: int) -> dict:
        part, local = self._locate(int(index))
        spec, where = self.specs[part], self.where(int(index))
        example = self._sources[part][local]
        caption = _text(example[spec.caption])
        fields = {"caption": caption, "where": where,
                  "instruction": _text(example[spec.instruction]) if spec.instruction
                  else caption}
        blobs = [self._pixels(example[spec.source], f"{where} {spec.source}")] \
            if spec.source else []
        blobs.append(self._pixels(example[spec.image], f"{where} {spec.image}"))
        return {"index": int(index), "record": encode_record(fields, blobs)}


def open_source(entries: Sequence[str], task: str, resolution: int | None):
    """A `TfdsSource` when every entry names a TFDS dataset; None when none does."""
    flags = [is_tfds(e) for e in entries]
    if any(flags) and not all(flags):
        raise ValueError(f"{list(entries)}: a task's corpus is either TFDS datasets or shard "
                         "folders, not both")
    return TfdsSource(entries, task, resolution) if entries and all(flags) else None
