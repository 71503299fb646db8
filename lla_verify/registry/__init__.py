"""What is tested: the case families and their parameters (cases.py), the records of
the implementations under test (impls.py) and the precision arithmetic (precision.py)."""
