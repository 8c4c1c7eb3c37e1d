"""The pinned result buffers are reused across steps run inside and outside inference mode (CUDA)."""

import pytest
import torch

from worker.engine.host_io import PendingHostCopy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_a_buffer_taken_in_inference_mode_serves_a_copy_outside_it():
    """The engine's steps copy results inside inference mode and a host-side proposer's drafts outside
    it, through the same pool: a buffer first made in inference mode must still take the second copy
    (it was an inference tensor once, and the in-place copy into it raised)."""
    with torch.inference_mode():
        assert PendingHostCopy({"a": torch.arange(4, device="cuda")}).result() == {"a": [0, 1, 2, 3]}
    assert PendingHostCopy({"a": torch.arange(4, device="cuda") + 1}).result() == {"a": [1, 2, 3, 4]}
    with torch.inference_mode():
        assert PendingHostCopy({"a": torch.arange(4, device="cuda") + 2}).result() == {"a": [2, 3, 4, 5]}
