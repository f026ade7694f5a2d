import subprocess
import sys

import pytest

from wan_cfg_schedules import SCHEDULES, applied_step_count
from wan_kernel.errors import InputError
from wan_kernel.interfaces import CfgSchedule
from wan_kernel.plugins import PluginManager

BY_NAME = {cls.name: cls() for cls in SCHEDULES}
SKIP_MODES = ["early", "late", "middle", "early_late", "alternate"]


@pytest.mark.parametrize(
    "name, expected",
    [
        # the seed's table (n=10, ratio 0.6)
        ("early", "SSSSAAAAAA"),
        ("late", "AAAAAASSSS"),
        ("middle", "AAASSSSAAA"),
        ("early_late", "SSAAAAAASS"),
        ("alternate", "SASASAASAS"),
        ("none", "AAAAAAAAAA"),
    ],
)
def test_seed_table(name, expected):
    assert BY_NAME[name].pattern(10, 0.6) == expected


@pytest.mark.parametrize(
    "name, expected",
    [
        # musubi-tuner's outputs for n=10, ratio 0.3
        ("early", "SSSSSSSAAA"),
        ("late", "AAASSSSSSS"),
        ("middle", "ASSSSSSSAA"),
        ("early_late", "SSSAAASSSS"),
        ("alternate", "SSSASSASSS"),
    ],
)
def test_ratio_0_3(name, expected):
    assert BY_NAME[name].pattern(10, 0.3) == expected


@pytest.mark.parametrize(
    "n, ratio, expected",
    [
        (7, 0.5, {"early": "SSSSAAA", "late": "AAASSSS", "middle": "ASSSSAA", "early_late": "SSAAASS"}),
        (20, 0.25, {"early": "S" * 15 + "A" * 5, "late": "A" * 5 + "S" * 15,
                    "middle": "AA" + "S" * 15 + "AAA", "early_late": "S" * 7 + "A" * 5 + "S" * 8}),
        (5, 0.99, {"early": "SAAAA", "late": "AAAAS", "middle": "AASAA", "early_late": "AAAAS"}),
        (1, 0.5, {"early": "S", "late": "S", "middle": "S", "early_late": "S", "alternate": "S"}),
    ],
)
def test_other_sizes_exact(n, ratio, expected):
    for name, pattern in expected.items():
        assert BY_NAME[name].pattern(n, ratio) == pattern, name


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 20, 25, 30, 50, 100])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.29, 0.3, 0.5, 0.6, 0.7, 0.75, 0.9, 0.99])
def test_window_modes_apply_floor_of_product(n, ratio):
    expected = int(n * ratio)
    for name in ("early", "late", "middle", "early_late"):
        pattern = BY_NAME[name].pattern(n, ratio)
        assert len(pattern) == n
        assert pattern.count("A") == expected, (name, pattern)
    # shapes: early ends with the A block, late starts with it, early_late is one centred block,
    # middle is one centred S block (A blocks on both sides, the larger one at the end)
    a = expected
    assert BY_NAME["early"].pattern(n, ratio) == "S" * (n - a) + "A" * a
    assert BY_NAME["late"].pattern(n, ratio) == "A" * a + "S" * (n - a)
    lead = (n - a) // 2
    assert BY_NAME["early_late"].pattern(n, ratio) == "S" * lead + "A" * a + "S" * (n - a - lead)
    assert BY_NAME["middle"].pattern(n, ratio) == "A" * (a // 2) + "S" * (n - a) + "A" * (a - a // 2)


def test_floor_uses_the_float_product():
    # 100 * 0.29 == 28.999999999999996 in floating point: musubi applies 28 steps, so do we
    assert applied_step_count(100, 0.29) == 28
    assert BY_NAME["late"].pattern(100, 0.29).count("A") == 28


@pytest.mark.parametrize("n", [4, 8, 10, 16, 33, 64])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_alternate_with_exact_binary_ratios(n, ratio):
    # ratios exact in binary accumulate without rounding: floor(n * ratio) steps, evenly spread
    pattern = BY_NAME["alternate"].pattern(n, ratio)
    assert pattern.count("A") == int(n * ratio)
    period = round(1 / ratio) if ratio != 0.75 else None
    if period is not None:
        assert all((i + 1) % period == 0 for i, c in enumerate(pattern) if c == "A")


@pytest.mark.parametrize("n", [10, 20, 30, 50])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.6, 0.7, 0.9])
def test_alternate_count_within_rounding(n, ratio):
    # float accumulation may fall one short of floor(n * ratio) (n=10, 0.6 -> 5 as in the seed)
    count = BY_NAME["alternate"].pattern(n, ratio).count("A")
    assert int(n * ratio) - 1 <= count <= int(n * ratio)


@pytest.mark.parametrize("name", SKIP_MODES + ["none"])
def test_ratio_bounds(name):
    schedule = BY_NAME[name]
    assert schedule.pattern(12, 1.0) == "A" * 12
    assert schedule.pattern(12, 0.0) == ("A" * 12 if name == "none" else "S" * 12)
    assert schedule.pattern(12, 0) == schedule.pattern(12, 0.0)
    assert schedule.pattern(12, 1) == "A" * 12


@pytest.mark.parametrize("name", SKIP_MODES + ["none"])
def test_no_ratio_means_all_steps(name):
    # musubi: a skip mode only acts when --cfg_apply_ratio is given
    assert BY_NAME[name].pattern(6, None) == "AAAAAA"


@pytest.mark.parametrize("name", SKIP_MODES + ["none"])
@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan"), "0.5", True])
def test_bad_ratio_is_input_error(name, ratio):
    with pytest.raises(InputError, match="cfg_apply_ratio"):
        BY_NAME[name].applies(0, 10, ratio)


@pytest.mark.parametrize("step, num_steps", [(-1, 10), (10, 10), (0, 0), (0, -3), (1.0, 10), (0, 2.5)])
def test_bad_step_is_input_error(step, num_steps):
    with pytest.raises(InputError):
        BY_NAME["early"].applies(step, num_steps, 0.5)


def test_registration_through_plugin_manager():
    pm = PluginManager()
    assert {"none", "early", "late", "middle", "early_late", "alternate"} <= set(pm.names("cfg_schedule"))
    for name in ("none", "early", "late", "middle", "early_late", "alternate"):
        entry = pm.lookup("cfg_schedule", name)
        assert entry.distribution == "wan-cfg-schedules"
        schedule = pm.get("cfg_schedule", name)
        assert isinstance(schedule, CfgSchedule)
        assert schedule.name == name
    assert pm.get("cfg_schedule", "late").pattern(10, 0.6) == "AAAAAASSSS"


def test_entry_module_imports_no_torch():
    code = "import sys, wan_cfg_schedules; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
