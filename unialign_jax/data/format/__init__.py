"""What the shard builder and its readers share: the on-disk layout of a shard folder and of
the per-record arrays stored beside it, each with its reader. Imports no builder and no
pipeline, so a format change shows as a change here."""
