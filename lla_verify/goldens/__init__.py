"""Stored oracle outputs for named cases: the catalog (catalog.py), the files and their
manifest (store.py), regeneration and drift checks (regen.py), and an implementation
compared against them (compare.py)."""
