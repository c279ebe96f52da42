"""Comparing two peak tables of the phase model (tests import it like ``foreign_series``)."""

import numpy as np


def same_tables(one, two, rtol: float = 0.0, rows: bool = False) -> None:
    """The two tables' arrays equal bit for bit (``rtol`` 0), or their numbers to ``rtol`` and
    everything else equal: the peak values and the phase arrays, and with ``rows`` the rows'
    present, success, redchi and message too."""
    def same(a, b, key):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype == object or not rtol or a.dtype.kind not in "fc":
            assert (a.tobytes() == b.tobytes()) if a.dtype != object else np.array_equal(a, b), key
        else:
            np.testing.assert_allclose(a, b, rtol=rtol, atol=0, equal_nan=True, err_msg=key)
    for key in one.values:
        same(one.values[key], two.values[key], key)
    for key, got in one.phase.items():
        same(got, two.phase[key], key)
    if rows:
        assert one.phase.keys() == two.phase.keys()
        for key in ("present", "success", "redchi", "message"):
            same(getattr(one, key), getattr(two, key), key)
