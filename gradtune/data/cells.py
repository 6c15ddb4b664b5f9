"""What a table cell is: a number, a missing value, or neither (shared by both table readers)."""

from __future__ import annotations

import math
from typing import Any

# The largest |value| a numeric cell may hold. Standardisation and the squared losses square
# values (and sum the squares over rows): past sqrt(float64 max) ~ 1.3e154 those overflow to inf,
# and a least-squares solve on the resulting NaN trips an internal assert in torch. 1e150 leaves
# room for sums of squared deviations over millions of rows. No real measurement comes close.
MAX_ABS = 1e150
# Cells that mean "no value" when ``missing`` is drop or mean (after stripping blanks): the
# empty cell and the spellings spreadsheets and pandas write. JSON null and Parquet null are missing too.
MISSING = ("", "NA", "N/A", "NaN", "nan", "null", "NULL", "None")


def is_missing(value: Any) -> bool:
    """An empty cell, a MISSING spelling, JSON / Parquet null or a float NaN."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip() in MISSING


def is_number(value: Any) -> bool:
    if isinstance(value, bool) or value is None:
        return False
    try:
        float(value)
        return True
    except (TypeError, ValueError, OverflowError):
        return False
