"""The SQL emitted for the warehouse dialects, kept as golden files and parsed back by sqlglot.

Golden files catch unintended changes; they cannot prove the SQL right on engines the tests do
not run (DuckDB and PostgreSQL are executed in ``test_equivalence.py``). Regenerate after an
intended change with ``WAYMARK_UPDATE_GOLDEN=1 ./dev test tests/segmentation/test_golden.py``
and review the diff.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlglot

from tests.segmentation.test_equivalence import SCHEMA
from waymark.segmentation.compile.sql import EXECUTED_DIALECTS, WAREHOUSE_DIALECTS, to_sql
from waymark.segmentation.lang.parser import parse

GOLDEN = Path(__file__).parents[1] / "fixtures" / "audiences"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

#: Typical audiences, one of each kind of condition.
CASES = {
    "attributes": 'country in ("DE", "AT") and plan != "free" and email ends with "@example.com"',
    "recent_buyers": "count(purchase within last 30 days) >= 3 and lifetime_value > 100",
    "big_spenders": "sum(purchase.revenue within last 90 days) >= 500",
    "absence": "product_view within last 7 days and not purchase within last 7 days",
    "abandoned_cart": "cart_add within last 2 days then not purchase within 1 hour",
    "funnel": "product_view then cart_add then purchase within 2 days",
    "last_purchase": 'last(purchase where revenue > 20).category = "shoes"',
    "birthday_consent": "birthday in next 7 days and consent(email, marketing) = opted_in",
    "signup": "signup_at within last 30 days and not (vip = true)",
}


@pytest.mark.parametrize("dialect", [*EXECUTED_DIALECTS, *WAREHOUSE_DIALECTS])
@pytest.mark.parametrize("case", sorted(CASES))
def test_sql_matches_the_golden_file(case: str, dialect: str) -> None:
    expr = parse(CASES[case], SCHEMA)
    sql = to_sql(expr, workspace_id="ws-1", now=NOW, dialect=dialect, pretty=True) + "\n"
    sqlglot.parse_one(sql, read=dialect)  # every dialect's text reads back
    path = GOLDEN / f"{case}.{dialect}.sql"
    if os.environ.get("WAYMARK_UPDATE_GOLDEN") == "1":
        path.write_text(sql, encoding="utf-8")
    assert path.exists(), f"no golden file {path.name}; set WAYMARK_UPDATE_GOLDEN=1 to write it"
    assert sql == path.read_text(encoding="utf-8"), f"{path.name} changed"
