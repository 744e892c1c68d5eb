"""The ``vitlens`` logger: the library warns through it, the CLI routes it to stderr."""

from __future__ import annotations

import logging

logger = logging.getLogger("vitlens")
