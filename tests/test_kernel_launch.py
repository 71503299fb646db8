"""launch_fitting: a default tile config that overflows shared memory falls back to a
smaller one (fp32 operands at D = 64 did on the H100), an explicit one never does."""

import pytest

from lla_triton._common import SMALLER_CONFIGS, _FITTING, launch_fitting


class OutOfResources(Exception):  # matched by name, as Triton's own may move between versions
    pass


def _launcher(max_block_m, calls):
    def launch(cfg):
        calls.append(cfg)
        if cfg[0] > max_block_m:
            raise OutOfResources(f"shared memory: {cfg}")
        return cfg
    return launch


def test_falls_back_to_the_first_smaller_config_that_fits_and_remembers_it():
    _FITTING.clear()
    calls = []
    got = launch_fitting("t", "k", (128, 64, 8, 3), _launcher(32, calls), explicit=False)
    assert got == (32, 64, 4, 2) == SMALLER_CONFIGS[1]
    assert calls == [(128, 64, 8, 3), (64, 64, 4, 2), (32, 64, 4, 2)]
    calls.clear()
    launch_fitting("t", "k", (128, 64, 8, 3), _launcher(32, calls), explicit=False)
    assert calls == [(32, 64, 4, 2)], "the config that fitted is tried first next time"


def test_explicit_configs_and_other_errors_propagate():
    _FITTING.clear()
    with pytest.raises(OutOfResources):
        launch_fitting("t", "e", (128, 64, 8, 3), _launcher(32, []), explicit=True)

    def broken(cfg):
        raise ValueError("a real bug")
    with pytest.raises(ValueError, match="a real bug"):
        launch_fitting("t", "v", (64, 64, 4, 2), broken, explicit=False)
    with pytest.raises(OutOfResources):
        launch_fitting("t", "none", (64, 64, 4, 2), _launcher(8, []), explicit=False)
