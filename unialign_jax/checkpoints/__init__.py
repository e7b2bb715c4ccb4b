"""Converted checkpoint folders: reading and writing them (Orbax parameters + JSON), nothing
that runs a model."""
