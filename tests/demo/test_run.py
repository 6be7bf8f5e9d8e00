"""The README's demo, end to end on the embedded default (small)."""

from __future__ import annotations

import io
import re
from pathlib import Path

from rich.console import Console

from waymark.demo.run import run_demo


def test_the_demo_runs_streams_audiences_and_delivers_messages(tmp_path: Path) -> None:
    out = io.StringIO()
    run_demo(tmp_path, profiles=300, console=Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    assert "8. Audiences, live as events stream in" in text
    live = text[text.index("8. Audiences, live") : text.index("9. Messages")]
    # the second purchase makes the new shopper a big spender, visible within seconds
    row = next(line for line in live.splitlines() if "purchase 120" in line)
    assert "big spenders" in row and re.search(r"\b\d+\s*│\s*$", row), row
    moved = next(line for line in live.splitlines() if "moved to DE" in line)
    assert "german big spenders" in moved, moved
    messages = text[text.index("9. Messages") : text.index("10. Privacy")]
    assert "did you mean" in messages  # the template typo
    sent = re.search(r"│ sent\s+│\s+(\d+)", messages)
    assert sent and int(sent.group(1)) > 0, messages
    assert "5 duplicates, nothing sent twice" in messages
    assert f"the development sink received {sent.group(1)} emails" in messages
    assert "302 to https://shop.example.com/shoes" in messages
    assert "message.clicked" in messages and "message.unsubscribed" in messages
    assert "no_consent: the profile opted out of email marketing" in messages
    assert "delete: done; lookup afterwards -> 404" in text
