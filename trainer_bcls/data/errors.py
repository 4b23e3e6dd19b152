"""Errors and counted skips for bad input data.

Every loader check ends in one of two ways: an :class:`InvalidDataError` whose message names the file, row or column
at fault, or (``skip_invalid=True``) a skip that is counted per reason by a :class:`SkipReport` and logged once as a
warning with the count and the first few examples. No check ever falls back to a silently wrong label.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict


class InvalidDataError(ValueError):
    """Bad input data (missing/corrupt image, empty caption, duplicate id, ...); the message names where."""


class SkipReport:
    """Counts skipped items per reason and logs a summary.

    ``report.skip(reason, where)`` records one skip; ``report.log(logger, what)`` emits one warning per reason,
    e.g. ``"load_karpathy: skipped 2 x missing image file (first: images/a.jpg; images/b.jpg)"``.
    """

    max_examples = 5

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)

    def skip(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < self.max_examples:
            self.examples[reason].append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def handle(self, skip_invalid: bool, reason: str, message: str, where: str) -> None:
        """Raise ``InvalidDataError(message)`` unless ``skip_invalid``, in which case count the skip."""
        if not skip_invalid:
            raise InvalidDataError(message)
        self.skip(reason, where)

    def log(self, logger: logging.Logger, what: str) -> None:
        for reason, count in self.counts.items():
            examples = "; ".join(self.examples[reason])
            more = ", ..." if count > len(self.examples[reason]) else ""
            logger.warning("%s: skipped %d x %s (%s%s)", what, count, reason, examples, more)

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)
