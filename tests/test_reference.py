"""The NumPy reference against PyTorch (forward and autograd, float64, 1e-10), SciPy/NumPy
convolution, and the lecture notes' worked examples. cnnkit's own layers against the reference."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnkit import reference as R
from cnnkit.models.layers import Conv, Pool, resolve_padding

TOL = 1e-10
PROPS = settings(max_examples=60, deadline=None)


@st.composite
def conv_case(draw):
    """Random shapes, strides, paddings and channel counts that give at least one output."""
    n, c, f = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = draw(st.integers(1, 3))
    padding = draw(st.integers(0, 3))
    h = draw(st.integers(max(1, kh - 2 * padding), 9))
    w = draw(st.integers(max(1, kw - 2 * padding), 9))
    seed = draw(st.integers(0, 2**31 - 1))
    return n, c, f, h, w, kh, kw, stride, padding, seed


def tensors(*arrays):
    return [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays]


@PROPS
@given(conv_case())
def test_conv2d_forward_and_backward_equal_torch(case):
    n, c, f, h, w, kh, kw, stride, padding, seed = case
    rng = np.random.default_rng(seed)
    x, k, b = rng.normal(size=(n, c, h, w)), rng.normal(size=(f, c, kh, kw)), rng.normal(size=f)
    xt, kt, bt = tensors(x, k, b)
    z = F.conv2d(xt, kt, bt, stride=stride, padding=padding)
    np.testing.assert_allclose(R.conv2d(x, k, b, stride, padding), z.detach().numpy(), atol=TOL, rtol=0)
    delta = rng.normal(size=z.shape)
    z.backward(torch.tensor(delta))
    dx, dk, db = R.conv2d_backward(x, k, delta, stride, padding)
    for ours, t in ((dx, xt), (dk, kt), (db, bt)):
        np.testing.assert_allclose(ours, t.grad.numpy(), atol=TOL, rtol=0)


@PROPS
@given(conv_case())
def test_convolution_mode_is_cross_correlation_with_rotated_kernel(case):
    n, c, f, h, w, kh, kw, stride, padding, seed = case
    rng = np.random.default_rng(seed)
    x, k = rng.normal(size=(n, c, h, w)), rng.normal(size=(f, c, kh, kw))
    z = F.conv2d(torch.tensor(x), torch.tensor(R.rot180(k).copy()), stride=stride, padding=padding)
    np.testing.assert_allclose(R.conv2d(x, k, None, stride, padding, mode="convolution"), z.numpy(), atol=TOL, rtol=0)


@PROPS
@given(st.integers(1, 12), st.integers(1, 5), st.integers(1, 3), st.integers(0, 2), st.integers(1, 3),
       st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_conv1d_equals_torch(length, m, stride, padding, c, f, seed):
    if length + 2 * padding < m:
        return
    rng = np.random.default_rng(seed)
    x, k, b = rng.normal(size=(2, c, length)), rng.normal(size=(f, c, m)), rng.normal(size=f)
    z = F.conv1d(torch.tensor(x), torch.tensor(k), torch.tensor(b), stride=stride, padding=padding)
    np.testing.assert_allclose(R.conv1d(x, k, b, stride, padding), z.numpy(), atol=TOL, rtol=0)


def test_convolution_matches_numpy_and_scipy_in_every_mode():
    rng = np.random.default_rng(1)
    x1, w1 = rng.normal(size=10), rng.normal(size=3)
    np.testing.assert_allclose(R.conv1d(x1, w1, padding="full", mode="convolution"), np.convolve(x1, w1, "full"),
                               atol=TOL)
    np.testing.assert_allclose(R.conv1d(x1, w1, mode="convolution"), np.convolve(x1, w1, "valid"), atol=TOL)
    np.testing.assert_allclose(R.conv1d(x1, w1), np.correlate(x1, w1, "valid"), atol=TOL)
    x, w = rng.normal(size=(7, 6)), rng.normal(size=(3, 3))
    for mode in ("full", "valid", "same"):
        np.testing.assert_allclose(R.conv2d(x, w, padding=mode, mode="convolution"),
                                   scipy.signal.convolve2d(x, w, mode), atol=TOL)
        np.testing.assert_allclose(R.conv2d(x, w, padding=mode), scipy.signal.correlate2d(x, w, mode), atol=TOL)


@st.composite
def pool_case(draw):
    size = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 3))
    h, w = draw(st.integers(size, 8)), draw(st.integers(size, 8))
    return draw(st.integers(1, 2)), draw(st.integers(1, 3)), h, w, size, stride, draw(st.integers(0, 2**31 - 1))


@PROPS
@given(pool_case())
def test_pooling_forward_and_backward_equal_torch(case):
    n, c, h, w, size, stride, seed = case
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, c, h, w))  # continuous values: no ties for max pooling
    torch_pools = {
        "max": (R.max_pool, R.max_pool_backward, lambda t: F.max_pool2d(t, size, stride)),
        "avg": (R.avg_pool, R.avg_pool_backward, lambda t: F.avg_pool2d(t, size, stride)),
        "l2": (R.l2_pool, R.l2_pool_backward, lambda t: F.lp_pool2d(t, 2, size, stride)),
    }
    for name, (fwd, bwd, torch_fn) in torch_pools.items():
        (xt,) = tensors(x)
        y = torch_fn(xt)
        np.testing.assert_allclose(fwd(x, size, stride), y.detach().numpy(), atol=TOL, rtol=0, err_msg=name)
        delta = rng.normal(size=y.shape)
        y.backward(torch.tensor(delta))
        np.testing.assert_allclose(bwd(x, delta, size, stride), xt.grad.numpy(), atol=TOL, rtol=0, err_msg=name)


def test_dense_activations_and_losses_equal_torch():
    rng = np.random.default_rng(2)
    x, w, b = rng.normal(size=(4, 5)), rng.normal(size=(3, 5)), rng.normal(size=3)
    xt, wt, bt = tensors(x, w, b)
    y = F.linear(xt, wt, bt)
    np.testing.assert_allclose(R.dense(x, w, b), y.detach().numpy(), atol=TOL)
    delta = rng.normal(size=y.shape)
    y.backward(torch.tensor(delta))
    for ours, t in zip(R.dense_backward(x, w, delta), (xt, wt, bt)):
        np.testing.assert_allclose(ours, t.grad.numpy(), atol=TOL)
    z = rng.normal(size=(6, 4)) * 3
    for f, fp, tf in ((R.relu, R.relu_prime, torch.relu), (R.sigmoid, R.sigmoid_prime, torch.sigmoid),
                      (R.tanh, R.tanh_prime, torch.tanh)):
        (zt,) = tensors(z)
        out = tf(zt)
        out.sum().backward()
        np.testing.assert_allclose(f(z), out.detach().numpy(), atol=TOL)
        np.testing.assert_allclose(fp(z), zt.grad.numpy(), atol=TOL)
    labels = rng.integers(0, 4, size=6)
    (zt,) = tensors(z)
    loss = F.cross_entropy(zt, torch.tensor(labels))
    loss.backward()
    assert R.categorical_cross_entropy_with_logits(z, labels) == pytest.approx(loss.item(), abs=TOL)
    assert R.categorical_cross_entropy(R.softmax(z), labels) == pytest.approx(loss.item(), abs=TOL)
    np.testing.assert_allclose(R.categorical_cross_entropy_with_logits_backward(z, labels), zt.grad.numpy(), atol=TOL)
    t = rng.integers(0, 2, size=(6, 4)).astype(float)
    bce = F.binary_cross_entropy_with_logits(torch.tensor(z), torch.tensor(t)).item()
    assert R.binary_cross_entropy_with_logits(z, t) == pytest.approx(bce, abs=TOL)
    assert R.binary_cross_entropy(R.sigmoid(z), t) == pytest.approx(bce, abs=1e-9)


# ----------------------------------------------------------------------------- the notes' worked examples


def test_output_size_examples():
    assert R.output_size(10, 5, 2, 1) == 10
    assert R.output_size(10, 3, 2, 2) == 6


@pytest.mark.parametrize("n,k", [(5, 3), (28, 5), (7, 4), (32, 3)])
def test_padding_table(n, k):
    x, w = np.ones(n), np.ones(k)
    assert len(R.conv1d(x, w, padding="valid")) == n - k + 1
    assert len(R.conv1d(x, w, padding="same")) == n
    assert len(R.conv1d(x, w, padding="full")) == n + k - 1


# The notes show two different 6x6 images that max-pool to the same 3x3 map. Their exact matrices
# were not available to us, so these are built to the same end: X2 holds each window's maximum at a
# different position than X1, with different other values.
MAXPOOLED = np.array([[255, 125, 170], [255, 150, 150], [70, 200, 95]])
X1 = np.array([[255, 12, 125, 40, 170, 3],
               [30, 90, 60, 110, 80, 20],
               [255, 0, 15, 150, 150, 150],
               [100, 200, 120, 4, 2, 1],
               [70, 9, 200, 33, 95, 94],
               [5, 6, 7, 199, 50, 10]])
X2 = np.array([[1, 2, 3, 125, 0, 0],
               [4, 255, 124, 5, 1, 170],
               [9, 8, 7, 6, 150, 1],
               [255, 7, 150, 149, 3, 2],
               [0, 70, 22, 11, 95, 13],
               [69, 1, 0, 200, 14, 90]])


def test_two_images_max_pool_to_the_same_map():
    assert not np.array_equal(X1, X2)
    np.testing.assert_array_equal(R.max_pool(X1, 2), MAXPOOLED)
    np.testing.assert_array_equal(R.max_pool(X2, 2), MAXPOOLED)


def test_cross_entropy_examples():
    assert R.binary_cross_entropy(R.sigmoid(0.8), 1) == pytest.approx(0.3711, abs=5e-5)
    assert R.binary_cross_entropy_with_logits(0.8, 1) == pytest.approx(0.3711, abs=5e-5)
    assert R.categorical_cross_entropy(R.softmax([1.5, 0.8, 2.1]), 2) == pytest.approx(0.5996, abs=5e-5)
    assert R.categorical_cross_entropy_with_logits([1.5, 0.8, 2.1], 2) == pytest.approx(0.5996, abs=5e-5)


# ----------------------------------------------------------------------------- cnnkit's layers against the reference


@PROPS
@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 4), st.integers(1, 3),
       st.sampled_from(["same", "full", "valid", 1]), st.integers(0, 2**31 - 1))
def test_cnnkit_conv_padding_modes_equal_reference(h, w, k, stride, padding, seed):
    ph, pw = resolve_padding(padding, k, stride, h), resolve_padding(padding, k, stride, w)
    if h + sum(ph) < k or w + sum(pw) < k:
        return
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 2, h, w))
    layer = Conv(2, 3, k, stride, ph, pw, "none").double()
    ours = layer(torch.tensor(x)).detach().numpy()
    ref = R.conv2d(x, layer.conv.weight.detach().numpy(), layer.conv.bias.detach().numpy(), stride, padding)
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
    if padding == "same":
        assert ours.shape[2:] == (-(-h // stride), -(-w // stride))


@PROPS
@given(pool_case())
def test_cnnkit_l2_pool_equals_reference(case):
    n, c, h, w, size, stride, seed = case
    x = np.random.default_rng(seed).normal(size=(n, c, h, w))
    xt = torch.tensor(x, requires_grad=True)
    y = Pool("l2", size, stride, (0, 0), (0, 0))(xt)
    np.testing.assert_allclose(y.detach().numpy(), R.l2_pool(x, size, stride), atol=TOL, rtol=0)
    delta = np.random.default_rng(seed + 1).normal(size=y.shape)
    y.backward(torch.tensor(delta))
    np.testing.assert_allclose(xt.grad.numpy(), R.l2_pool_backward(x, delta, size, stride), atol=TOL, rtol=0)


# ----------------------------------------------------------------------------- training by hand against autograd


def test_reference_backprop_and_sgd_follow_torch_training_curve():
    """conv 3x3 (2 filters) -> relu -> maxpool 2 -> flatten -> dense 3, trained with the reference's
    backward passes and sgd_step, against the same network under torch.autograd and torch.optim.SGD."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 1, 8, 8)), np.array([0, 1, 2, 1])
    params = [rng.normal(size=(2, 1, 3, 3)) * 0.5, np.zeros(2), rng.normal(size=(3, 18)) * 0.3, np.zeros(3)]
    tparams = [torch.tensor(p, requires_grad=True) for p in params]
    opt = torch.optim.SGD(tparams, lr=0.1)
    ours, theirs = [], []
    for _ in range(8):
        w1, b1, w2, b2 = params
        z1 = R.conv2d(x, w1, b1)  # (4, 2, 6, 6)
        a1 = R.relu(z1)
        p1 = R.max_pool(a1, 2)  # (4, 2, 3, 3)
        flat = p1.reshape(4, -1)  # (4, 18)
        logits = R.dense(flat, w2, b2)  # (4, 3)
        ours.append(R.categorical_cross_entropy_with_logits(logits, y))
        d_logits = R.categorical_cross_entropy_with_logits_backward(logits, y)
        d_flat, dw2, db2 = R.dense_backward(flat, w2, d_logits)
        d_a1 = R.max_pool_backward(a1, d_flat.reshape(p1.shape), 2)
        d_z1 = d_a1 * R.relu_prime(z1)  # δ⁽ˡ⁾ = f'(z⁽ˡ⁾) ⊙ (...)
        _, dw1, db1 = R.conv2d_backward(x, w1, d_z1)
        params = R.sgd_step(params, [dw1, db1, dw2, db2], lr=0.1)

        tw1, tb1, tw2, tb2 = tparams
        out = F.linear(F.max_pool2d(F.relu(F.conv2d(torch.tensor(x), tw1, tb1)), 2).flatten(1), tw2, tb2)
        loss = F.cross_entropy(out, torch.tensor(y))
        theirs.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    np.testing.assert_allclose(ours, theirs, atol=1e-8, rtol=0)
    assert ours[-1] < ours[0]  # it really trained
