import os
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Tiny blocks make every tile boundary, partial tile and diagonal-crossing tile appear at the
# small sizes the tests use; "default" uses the backend's own tile shape.
BLOCKS = ["default", "5,7"]


@pytest.fixture(params=BLOCKS)
def torch_blocks(request, monkeypatch):
    if request.param == "default":
        monkeypatch.delenv("FASTCL_TORCH_BLOCK", raising=False)
    else:
        monkeypatch.setenv("FASTCL_TORCH_BLOCK", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed(request):
    # different random inputs in every test, reproducible from the test id; FASTCL_TEST_SEED
    # draws a new set for the whole run
    base = int(os.environ.get("FASTCL_TEST_SEED", "0"))
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) ^ base)
