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


def test_round_configs_keep_the_block_the_tile_ids_count():
    from lla_triton._common import round_configs
    assert round_configs((128, 64, 8, 3), 0) == (
        (128, 64, 8, 2), (128, 64, 8, 1), (128, 32, 8, 1), (128, 16, 8, 1))
    assert round_configs((32, 128, 8, 2), 1) == ((32, 128, 8, 1), (16, 128, 8, 1))


def test_a_later_round_falls_back_with_its_block_kept():
    from lla_triton._common import fitted_rounds
    _FITTING.clear()
    calls = []

    def launch(cfg):  # the later round's variant fits only with one stage
        calls.append(cfg)
        if cfg[3] > 1:
            raise OutOfResources(f"shared memory: {cfg}")
        return cfg
    launch_round = fitted_rounds("r", ("k",), (128, 64, 8, 3), 0, lambda c, t, a, todo: launch(c), explicit=False)
    assert launch_round(None, None, None) == (128, 64, 8, 1)
    assert all(c[0] == 128 for c in calls)
    calls.clear()
    launch_round(None, None, None)
    assert calls == [(128, 64, 8, 1)], "the round's fitted config is remembered"
    explicit = fitted_rounds("r", ("e",), (128, 64, 8, 3), 0, lambda c, t, a, todo: launch(c), explicit=True)
    with pytest.raises(OutOfResources):
        explicit(None, None, None)
