"""Training configs as plain Python: each module's `get_config()` returns a `TrainConfig`.

Installed as `unialign_configs`, so `unialign-train --config NAME` finds them by name from
any working directory (a path to a `.py` file works too).
"""
