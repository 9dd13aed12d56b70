"""Reports: one HTML page per participant and the group-level scaling report.

Both read what :mod:`bidsenc.derivatives` wrote; the group level never refits.
"""
