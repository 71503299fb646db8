"""The property suite of lla-verify: Hypothesis properties of an LLA implementation
against the float64 and mpmath oracles, within derived error budgets.

Installed as ``lla_verify_properties``; its options, fixtures and profiles come from
the pytest plugin lla_verify.testing.pytest_plugin. From any folder::

    pytest --pyargs lla_verify_properties --lla-impl mypkg:fn -n auto
"""
