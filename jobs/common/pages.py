"""What the HTML pages (preview, gallery, anonymize's) share: text shown safely, image file names."""

from __future__ import annotations

import html
import os
import re

from jobs.common.redaction import redact_text


def shown(text: str) -> str:
    """text for a page: credentials masked (a path or URL may carry them), HTML escaped."""
    return html.escape(redact_text(str(text)))


def file_stem(path: str, limit: int = 60) -> str:
    """A file-name-safe stem of path's last part, for the images a page links to."""
    stem = os.path.splitext(path.rstrip("/").rsplit("/", 1)[-1])[0]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:limit] or "image"
