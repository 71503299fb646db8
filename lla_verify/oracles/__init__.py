"""References an implementation is measured against: the float64 oracle with its
per-query details (float64.py), the dense same-precision computation (dense.py) and the
mpmath oracle with certified bounds (mp.py)."""
