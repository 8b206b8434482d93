"""The GPU workloads are the models they claim to be: checked on CPU in float32, since the
benchmark itself (fp16, CUDA graphs) needs a GPU."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def test_resnet50_has_resnet50s_shape_and_size():
    from workloads import resnet50_module

    module = resnet50_module()
    parameters = sum(p.numel() for p in module.parameters())
    assert 25_400_000 < parameters < 25_700_000  # ResNet-50: 25.56M
    convolutions = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convolutions) == 53  # 1 stem + 16 blocks x 3 + 4 projection shortcuts
    with torch.inference_mode():
        logits = torch.jit.script(module)(torch.randn(2, 3, 224, 224))
    assert logits.shape == (2, 1000)
    assert torch.isfinite(logits).all()
