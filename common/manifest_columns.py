"""Columns a site exported without values: an error when entirely empty, a warning when mostly empty.

An entirely empty clinical column usually means the export dropped it (a renamed field, a filter,
a join that missed): the model would still train, on a missing-value indicator that is always on,
and the site would look fine while contributing nothing for that feature. A modality that is empty
in *every* one of its columns is different: the site simply lacks it (modality-aware aggregation
leaves it out), so that is only a warning, as a missing image column is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

#: A column with more than this share of its rows empty is reported as a warning.
MOSTLY_EMPTY = 0.5
_LISTED = 10


def column_fill_problems(blank: pd.DataFrame, modalities: Mapping[str, Sequence[str]],
                         file: str, may_be_absent: frozenset[str] = frozenset()
                         ) -> tuple[list[tuple[str, str]], list[str]]:
    """(errors as ``(column, message)``, warnings) for the columns of each modality.

    ``blank`` is a boolean frame (rows x columns): True where the cell holds no value. Columns in
    ``may_be_absent`` (declared so in the schema) are only a warning when entirely empty.
    """
    rows = len(blank)
    errors: list[tuple[str, str]] = []
    warnings: list[str] = []
    if rows == 0:
        return errors, warnings
    for modality, columns in modalities.items():
        if not columns:
            continue
        empty_share = blank[list(columns)].mean()
        if bool((empty_share == 1.0).all()):
            warnings.append(f"{file}: every {modality} column is empty: no case at this site has {modality} data")
            continue
        for column in columns:
            if empty_share[column] == 1.0 and column in may_be_absent:
                warnings.append(f"{file}: column {column!r} is empty in all {rows} rows; the schema allows a site "
                                "without it (may_be_absent), so the model treats it as missing here")
            elif empty_share[column] == 1.0:
                errors.append((column, f"no value in any of the {rows} rows; expected {modality} values (check the "
                                       f"export), or ask the coordinator to drop {column!r} from the schema"))
        mostly = [c for c in columns if MOSTLY_EMPTY < empty_share[c] < 1.0]
        if mostly:
            shown = ", ".join(f"{c!r} {empty_share[c]:.0%}" for c in mostly[:_LISTED])
            more = f" and {len(mostly) - _LISTED} more" if len(mostly) > _LISTED else ""
            warnings.append(f"{file}: {modality} column(s) mostly empty ({shown}{more} of {rows} rows): "
                            "check the export; the model treats those cells as missing")
    return errors, warnings
