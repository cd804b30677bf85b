"""The matchers' fast embeddings (distill/embedding.py) compute what a plain ``net.embed`` computes."""

from __future__ import annotations

import pytest
import torch

from dpdistill import models
from dpdistill.distill import embedding
from dpdistill.errors import SpecError


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


def test_keeping_or_checkpointing_chunk_activations_gives_the_same_bits(monkeypatch) -> None:
    # run_chunked picks whichever of the two is faster on the machine, so they must not differ in any bit:
    # otherwise a run's result would depend on a timing.
    net = embedding.prepare(_net("instance", seed=5))
    x = torch.randn(70, 1, 28, 28)
    results = {}
    checkpointed = []  # chunks run through activation checkpointing, per policy: the two paths really differ
    real_checkpoint = embedding.checkpoint

    def counting_checkpoint(*args, **kwargs):
        checkpointed.append(policy)
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(embedding, "checkpoint", counting_checkpoint)
    for policy in ("always", "never"):
        monkeypatch.setenv(embedding.CHECKPOINT_ENV, policy)
        for name, run in (("embed", embedding.embed), ("logits", embedding.logits)):
            xg = x.clone().requires_grad_(True)
            out = run(net, xg, 16)
            (out.square() * torch.linspace(-1, 1, out.shape[1])).sum().backward()
            results[policy, name] = (out.detach(), xg.grad)
    assert checkpointed.count("always") == 2 * 5 and checkpointed.count("never") == 0  # 5 chunks of 70, twice
    for name in ("embed", "logits"):
        assert torch.equal(results["always", name][0], results["never", name][0])
        assert torch.equal(results["always", name][1], results["never", name][1])


def test_checkpoint_choice_is_measured_once_per_shape_and_draws_no_caller_randomness(monkeypatch) -> None:
    monkeypatch.delenv(embedding.CHECKPOINT_ENV, raising=False)
    monkeypatch.setattr(embedding, "_CHOICES", {})
    measured = []
    real_measure = embedding._measure_checkpoint

    def counting(fn, x, chunk):  # the real measurement, counted
        measured.append(tuple(x.shape))
        return real_measure(fn, x, chunk)

    monkeypatch.setattr(embedding, "_measure_checkpoint", counting)
    net = embedding.prepare(_net("instance", seed=6))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    for _ in range(3):
        embedding.embed(net, torch.zeros(40, 1, 28, 28, requires_grad=True), 16).sum().backward()
    assert torch.equal(torch.get_rng_state(), state)  # the probe comes from its own generator
    assert measured == [(40, 1, 28, 28)]
    grads = [None if p.grad is None else p.grad.clone() for p in net.parameters()]
    embedding.embed(net, torch.zeros(50, 1, 28, 28, requires_grad=True), 16)  # another batch shape: measured
    assert measured == [(40, 1, 28, 28), (50, 1, 28, 28)]
    # The measurement differentiates the probe only: the parameters' accumulated gradients are untouched.
    for p, g in zip(net.parameters(), grads, strict=True):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    monkeypatch.setenv(embedding.CHECKPOINT_ENV, "sometimes")
    with pytest.raises(SpecError, match=embedding.CHECKPOINT_ENV):
        embedding.checkpoint_pays(net.embed, net, torch.zeros(60, 1, 28, 28), 16)
    monkeypatch.delenv(embedding.CHECKPOINT_ENV)
    # Past the memory cap it checkpoints without measuring; the cap is in bytes, so larger images reach it
    # with fewer of them (width 16 here: 45 images of 28x28 ~ 9 MB, 45 of 56x56 ~ 36 MB).
    monkeypatch.setattr(embedding, "KEEP_ACTIVATIONS_MAX_BYTES", 20 << 20)
    assert embedding.checkpoint_pays(net.embed, net, torch.zeros(45, 1, 56, 56), 16)
    assert measured == [(40, 1, 28, 28), (50, 1, 28, 28)]  # nothing measured for the capped batch


def test_bfloat16_real_side_rounds_the_convolutions_only_and_returns_float32() -> None:
    net = embedding.prepare(_net("instance", seed=7))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(70, 1, 28, 28)
    exact = embedding.embed_no_grad(net, x, chunk=32)
    parts = embedding.embed_chunks(net, x, chunk=32, precision="bfloat16")
    assert [p.dtype for p in parts] == [torch.float32] * 3  # clipping and noise downstream stay float32
    low = torch.cat(parts)
    # Rounded (so bf16 really ran), but the features stay close: ~0.1-1 % relative per record.
    assert not torch.equal(low, exact)
    rel = (low - exact).norm(dim=1) / exact.norm(dim=1)
    assert float(rel.max()) < 0.03
    assert float((low.mean(0) - exact.mean(0)).norm() / exact.mean(0).norm()) < 0.01
    # The caller's network is untouched; only the copy's convolutions are replaced.
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    copy = embedding.low_precision(net)
    assert not any(type(m) is torch.nn.Conv2d for m in copy.modules() if m not in
                   [c.conv for c in copy.modules() if hasattr(c, "conv")])
    assert embedding.mixes_records(embedding.low_precision(embedding.prepare(_net("batch")).train()))
    with pytest.raises(ValueError, match="precision"):
        embedding.embed_chunks(net, x, precision="float16")  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [0, 3])
def test_an_unknown_precision_is_refused_even_for_an_empty_batch(n: int) -> None:
    with pytest.raises(ValueError, match="unknown precision"):
        embedding.embed_chunks(_net("instance"), torch.zeros(n, 1, 28, 28), precision="float16")  # type: ignore[arg-type]
