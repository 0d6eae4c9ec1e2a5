"""Device selection: auto, cpu, cuda[:i]; models and refinement run where they are put."""

import pytest
import torch

from atlasreg import devices as _devices
from atlasreg.devices import release_free_memory, resolve_device
from atlasreg.errors import AtlasregError


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    with pytest.raises(AtlasregError, match="unknown device"):
        resolve_device("gpu please")
    with pytest.raises(AtlasregError):
        resolve_device("mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(AtlasregError, match="CUDA is not available"):
        resolve_device("cuda:0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_index_is_checked():
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(AtlasregError):
        resolve_device(f"cuda:{torch.cuda.device_count()}")



@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_model_prediction_and_refinement_run_on_the_device(device):
    from atlasreg.config import load_config
    from atlasreg.models.registry import build_method

    module = build_method(load_config(None, {
        "data": {"labels": {0: "bg", 1: "fg"}}, "model": {"size": [16, 16], "itn_channels": [4, 8, 8, 8],
                                                           "stn_channels": [4, 4, 8]},
        "refinement": {"iterations": 2}})).eval().to(device)
    images = torch.randn(2, 1, 16, 16, device=device)
    out = module.predict(images)
    refined = module.refine(images, out)
    assert out["itn"].device.type == device
    assert refined["transform"].forward_points().device.type == device
    assert refined["history"].shape == (3, 2)


def test_cli_rejects_an_unavailable_device(tmp_path, capsys):
    from atlasreg.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "c.yaml").write_text("data: {labels: {0: bg, 1: fg}, train: {images: .}}\n")
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _resident_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(_devices._MALLOC_TRIM is None, reason="glibc only (malloc_trim)")
def test_release_free_memory_returns_freed_heap_pages_to_the_system():
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block = 64 * 1024  # under glibc's mmap threshold: from the heap
    blocks = [libc.malloc(block) for _ in range(1600)]  # 100 MiB
    for b in blocks:
        ctypes.memset(b, 1, block)  # resident
    before = _resident_mib()
    for b in blocks[:-1]:  # the last block stays: the freed 100 MiB lie below it, glibc keeps them
        libc.free(b)
    kept = _resident_mib()
    release_free_memory()
    after = _resident_mib()
    libc.free(blocks[-1])
    assert kept > before - 20  # freed but still resident (what grew in long segmentation runs)
    assert after < kept - 80   # handed back
