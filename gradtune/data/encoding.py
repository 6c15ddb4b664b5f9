"""How a table's feature columns become the model's inputs, saved with the run so that ``eval``
and ``predict`` apply exactly what training did.

A numeric column is one input; a categorical column is one 0/1 input per category seen in the
training file (sorted names, ``city=Paris``). ``missing: mean`` fills a missing cell with the
training rows' mean of that input (for a category: each indicator's training frequency). A
category that training never saw is an error naming its line: the model has no input for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from gradtune.data.tabular import Table
from gradtune.runtime.errors import GradtuneError


@dataclass
class Encoding:
    features: list[str]  # the table's feature columns, in order
    categories: dict[str, list[str]] = field(default_factory=dict)  # categorical column -> its categories
    fill: dict[str, float] = field(default_factory=dict)  # missing=mean: input name -> training rows' mean
    missing: str = "error"

    @property
    def names(self) -> list[str]:
        """The model's inputs in order: a numeric column's name, ``col=category`` per category."""
        out: list[str] = []
        for f in self.features:
            out += [f"{f}={c}" for c in self.categories[f]] if f in self.categories else [f]
        return out

    @classmethod
    def fit(cls, table: Table, train_rows: np.ndarray, missing: str) -> Encoding:
        """Categories from every row of the file (its vocabulary, not its labels); fill values
        from the training rows only."""
        categories = {}
        for c in table.categorical:
            categories[c] = sorted({v for v in table.columns[c] if v is not None})
        enc = cls(list(table.feature_names), categories, {}, missing)
        if missing == "mean":
            for name, col in enc.inputs(table):
                part = col[train_rows]
                present = part[~np.isnan(part)]
                if not len(present):
                    raise GradtuneError(
                        f"{table.path}: column '{name.split('=')[0]}' has no value in the training rows "
                        f"(missing=mean has nothing to average)"
                    )
                enc.fill[name] = float(present.mean())  # every input: new rows may miss any
        return enc

    def inputs(self, table: Table, release: bool = False) -> Iterator[tuple[str, np.ndarray]]:
        """(input name, (N,) float64) one input at a time, missing cells NaN until filled;
        ``release``: drop each table column once encoded (one column's copy at a time)."""
        for f in self.features:
            col = table.columns[f]
            if f in self.categories:
                yield from self._one_hot(table, f, col)
            else:
                yield f, self._filled(f, col)
            if release:
                del table.columns[f]

    def _filled(self, name: str, col: np.ndarray) -> np.ndarray:
        return np.where(np.isnan(col), self.fill[name], col) if name in self.fill else col

    def _one_hot(self, table: Table, f: str, col: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        cats = self.categories[f]
        known = set(cats)
        unseen = next((i for i, v in enumerate(col) if v is not None and v not in known), None)
        if unseen is not None:
            shown = ", ".join(map(repr, cats[:10])) + (", ..." if len(cats) > 10 else "")
            raise GradtuneError(
                f"{table.path}:{table.lines[unseen]}: column '{f}': category {col[unseen]!r} was not seen "
                f"in training (known: {shown})"
            )
        absent = np.array([v is None for v in col])
        for c in cats:
            name = f"{f}={c}"
            hot = (col == c).astype(np.float64)
            if absent.any():
                hot[absent] = np.nan
            yield name, self._filled(name, hot)

    def to_dict(self) -> dict[str, Any]:
        return {"categories": self.categories, "fill": self.fill, "missing": self.missing}

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> Encoding:
        """The encoding a run saved in summary.json's "job" (plain numeric columns if none)."""
        saved: Optional[dict[str, Any]] = info.get("encoding")
        if not saved:
            return cls(list(info["features"]))
        return cls(list(info["features"]), saved["categories"], saved["fill"], saved["missing"])
