"""JSON answers encoded with orjson (datetimes, non-string keys, fast)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import Response


class JSONAnswer(Response):
    """A JSON response rendered by orjson."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)
