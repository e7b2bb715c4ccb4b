"""Training data: JSONL corpora → ArrayRecord shards → Grain batches (spec sections 4, 6).

`jsonl` parses the release's corpus formats, `shards` preprocesses them into ArrayRecord
shards (`unialign-data build`), `pipeline` turns shard folders into alternating training
batches, `teacher` stores the alignment teacher's features, `synth` writes a synthetic
corpus for the quickstart (`unialign-data synth`).
"""
