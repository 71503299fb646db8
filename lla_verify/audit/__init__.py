"""The release audit: a plan of cells over the case registry (plan.py), each run and
judged by the budget (cell.py), swept into one report (run.py, report.py), compared
against a baseline (baseline.py) and merged from slices (merge.py)."""
