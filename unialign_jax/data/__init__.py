"""Training data: JSONL corpora → ArrayRecord shards → Grain batches (spec sections 4, 6).

Three rooms, so that the imports show the architecture: `format/` is what the shard
builder and the readers agree on (a shard folder's records and summary, the stored images,
the teacher features and cached latents beside it); `build/` makes shard folders and what
lies beside them (`unialign-data build`, `teacher`, `latents`, `synth`); `read/` turns
them into training batches (`batch_spec.py`: the one description of a batch). `format`
imports neither of the others, which never import each other; `cli.py` drives the
builders.
"""
