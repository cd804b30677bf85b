"""The matchers' fast embeddings (distill/embedding.py) compute what a plain ``net.embed`` computes."""

from __future__ import annotations

import torch

from dpdistill import models
from dpdistill.distill import embedding


def _net(norm: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.get("convnet", channels=1, num_classes=10, image_size=28, width=16, norm=norm)


def test_chunked_channels_last_embedding_equals_plain_embedding() -> None:
    plain = _net("instance")
    fast = embedding.prepare(_net("instance"))
    x = torch.randn(70, 1, 28, 28)  # not a multiple of the chunk: the last chunk is short
    with torch.no_grad():
        want = plain.embed(x)
    got = embedding.embed_no_grad(fast, x, chunk=32)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert [len(f) for f in embedding.embed_chunks(fast, x, chunk=32)] == [32, 32, 6]
    # The differentiable path gives the same features and a gradient for the input.
    xg = x.clone().requires_grad_(True)
    out = embedding.embed(fast, xg)
    torch.testing.assert_close(out.detach(), want, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_batch_norm_in_training_mode_is_embedded_in_one_pass() -> None:
    # Batch statistics mix the records: chunking would change every feature. The one-pass result must equal
    # the plain forward on the whole batch (it would not if the 50 images were split into chunks of 16).
    net = embedding.prepare(_net("batch")).train()
    assert embedding.mixes_records(net)
    x = torch.randn(50, 1, 28, 28)
    with torch.no_grad():
        want = net.embed(x)
        chunked = torch.cat([net.embed(part) for part in x.split(16)])
    assert not torch.allclose(chunked, want, atol=1e-3)  # the premise: chunking would differ here
    got = embedding.embed_no_grad(net, x, chunk=16)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert len(embedding.embed_chunks(net, x, chunk=16)) == 1
    # In eval mode (running statistics) records are independent again.
    assert not embedding.mixes_records(net.eval())


def test_prepare_puts_conv_weights_in_channels_last() -> None:
    net = embedding.prepare(_net("instance"))
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_checkpointed_chunks_give_the_plain_gradient() -> None:
    # The synthetic side runs chunk by chunk with activation checkpointing: the loss and the images' gradient
    # must be those of one plain forward (a chunk dropped, doubled or recomputed differently would change both).
    plain = _net("instance", seed=3)
    fast = embedding.prepare(_net("instance", seed=3))
    x = torch.randn(45, 1, 28, 28)
    weights = torch.randn(45, 1)
    grads = []
    for net, run in ((plain, lambda n, v: n.embed(v)), (fast, lambda n, v: embedding.embed(n, v, chunk=16)),
                     (plain, lambda n, v: n(v)), (fast, lambda n, v: embedding.logits(n, v, chunk=16))):
        xg = x.clone().requires_grad_(True)
        out = run(net, xg)
        (out.square() * weights).sum().backward()
        grads.append(xg.grad)
    scale = float(grads[0].abs().max())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-4 * scale)
    torch.testing.assert_close(grads[3], grads[2], rtol=1e-3, atol=1e-4 * float(grads[2].abs().max()))
