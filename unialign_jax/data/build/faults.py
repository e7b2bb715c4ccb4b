"""Skipped samples: why each one was skipped, how many, and when too many is an error.

Real corpora hold corrupt and missing images and malformed lines (spec section 6). A run
skips each such sample, counts it by reason and logs the first few with their line, so one
bad file never stops a run — and fails loudly when the skipped fraction passes a threshold,
so a broken corpus (wrong image root, dead server) never passes silently.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

from unialign_jax import images

log = logging.getLogger(__name__)

REASONS = {
    "bad_json": "the line is not a JSON object",
    "missing_field": "a required field is missing, empty or of the wrong type",
    "wrong_image_count": "the number of images does not fit the corpus kind",
    "missing_image": "the image file does not exist or cannot be read",
    **images.REASONS,
    "url_timeout": "the download timed out on every try",
    "url_error": "the server answered with an error or could not be reached",
    "url_too_large": "the download is larger than the byte cap (--max-download-mib)",
    "url_too_slow": "the download did not finish within its deadline (--url-deadline)",
}
MAX_EXAMPLES = 10
DEFAULT_MAX_SKIP_FRACTION = 0.05


class SkipSample(images.ImageError):
    """Raised for one sample that must be skipped; `reason` is a key of `REASONS`. An image
    that cannot be used (`images.ImageError`) is the same kind of fault, with a narrower
    set of reasons: builders catch the base class."""

    REASONS = REASONS


class TooManySkipped(RuntimeError):
    """The skipped fraction of a run passed its threshold."""


@dataclasses.dataclass
class SkipLog:
    """Counts of skipped samples by reason plus the first few, each with its `file:line`."""

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list = dataclasses.field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, where: str, fault: SkipSample) -> None:
        self.counts[fault.reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"where": where, "reason": fault.reason, "detail": fault.detail})

    def merge(self, other: "SkipLog") -> None:
        self.counts.update(other.counts)
        self.examples.extend(other.examples[:MAX_EXAMPLES - len(self.examples)])

    def to_json(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "examples": self.examples}

    @classmethod
    def from_json(cls, obj: dict) -> "SkipLog":
        return cls(collections.Counter(obj["counts"]), list(obj["examples"]))


class FaultLogger:
    """Logs the first `limit` faults of a run as they are found, then stays quiet."""

    def __init__(self, limit: int = MAX_EXAMPLES):
        self.remaining = limit

    def __call__(self, examples: list) -> None:
        for ex in examples[:self.remaining]:
            log.warning("skipped %s: %s: %s", ex["where"], ex["reason"], ex["detail"])
        self.remaining = max(0, self.remaining - len(examples))


def check_skipped_fraction(skipped: SkipLog, total: int, max_fraction: float, what: str) -> None:
    """Raises `TooManySkipped` when more than `max_fraction` of `total` samples were skipped."""
    if total and skipped.total / total > max_fraction:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.counts.items()))
        raise TooManySkipped(
            f"{what}: {skipped.total} of {total} samples skipped ({skipped.total / total:.1%}), "
            f"more than the allowed {max_fraction:.1%} ({reasons})")
