"""Library log messages that tell an echoatt user nothing, silenced by content (everything else still shows)."""

from __future__ import annotations

import logging


class Silence(logging.Filter):
    """Drops records whose message contains any of `texts`."""

    def __init__(self, texts: tuple[str, ...]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.texts)


def silence(logger: str, *texts: str) -> None:
    """Silence messages containing `texts` on `logger` (a filter on the logger itself: it sees its own records)."""
    target = logging.getLogger(logger)
    if not any(isinstance(f, Silence) and f.texts == texts for f in target.filters):
        target.addFilter(Silence(texts))
