"""Device selection: auto, cpu, cuda[:i]; models and refinement run where they are put."""

import pytest
import torch

from atlasreg.devices import resolve_device
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
