"""Registration through the plugin manager, availability, ``wan plugins``, torch-free import."""

import json
import subprocess
import sys

import pytest
from wan_quant_fp8 import Fp8FastQuantizer, Fp8Quantizer, Fp8ScaledQuantizer, Fp8T5Quantizer

from wan_kernel.plugins import PluginManager


def test_registered_names_and_targets():
    pm = PluginManager()
    assert {"fp8", "fp8_scaled", "fp8_fast", "fp8_t5"} <= set(pm.names("quantization"))
    expected = {
        "fp8": Fp8Quantizer,
        "fp8_scaled": Fp8ScaledQuantizer,
        "fp8_fast": Fp8FastQuantizer,
        "fp8_t5": Fp8T5Quantizer,
    }
    for name, cls in expected.items():
        impl = pm.lookup("quantization", name).impl
        assert isinstance(impl, cls) and impl.name == name
        assert impl.supported_targets == (("t5",) if name == "fp8_t5" else ("dit",))
    assert isinstance(pm.get("quantization", "fp8_scaled"), Fp8ScaledQuantizer)


def test_availability_on_this_machine():
    import torch

    assert Fp8Quantizer().availability().ok and Fp8ScaledQuantizer().availability().ok
    assert Fp8T5Quantizer().availability().ok
    fast = Fp8FastQuantizer().availability()
    if not torch.cuda.is_available():
        assert not fast.ok and "CUDA" in fast.reason and "8.9" in fast.reason
    elif torch.cuda.get_device_capability() < (8, 9):
        assert not fast.ok and "fp8_scaled" in fast.reason
    else:
        assert fast.ok


def test_wan_plugins_lists_the_modes_with_availability():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from wan_cli.main import main; sys.argv=['wan','plugins','--json']; main()",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    listed = {i["name"]: i for i in json.loads(result.stdout)["concerns"]["quantization"]}
    for name in ("fp8", "fp8_scaled", "fp8_fast", "fp8_t5"):
        assert listed[name]["distribution"] == "wan-quant-fp8"
    assert listed["fp8_scaled"]["available"] is True
    assert listed["fp8_fast"]["available"] is Fp8FastQuantizer().availability().ok
    if not listed["fp8_fast"]["available"]:
        assert listed["fp8_fast"]["reason"]


def test_entry_module_does_not_import_torch():
    code = "import sys, wan_quant_fp8; wan_quant_fp8.Fp8ScaledQuantizer(); print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_lazy_helpers_resolve():
    import wan_quant_fp8

    assert callable(wan_quant_fp8.save_quantized) and callable(wan_quant_fp8.quantize_model)
    with pytest.raises(AttributeError, match="not_a_helper"):
        wan_quant_fp8.__getattr__("not_a_helper")
