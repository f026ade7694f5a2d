import importlib.metadata

import pytest

from wan_kernel import machine


def test_installed_torch_version_reads_the_distribution(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.13.0+cpu")
    assert machine.installed_torch_version() == (2, 13)

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert machine.installed_torch_version() is None


@pytest.mark.parametrize("visible", ["", "-1"])
def test_hidden_gpus_count_as_none(monkeypatch, visible):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert machine.gpu_driver_present() is False


def test_driver_files_decide(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(machine, "GPU_DEVICE_FILES", (str(tmp_path / "nvidiactl"),))
    assert machine.gpu_driver_present() is False
    (tmp_path / "nvidiactl").write_text("")
    assert machine.gpu_driver_present() is True


def test_no_driver_means_torch_sees_no_cuda():
    torch = pytest.importorskip("torch")
    if not machine.gpu_driver_present():
        assert not torch.cuda.is_available()
