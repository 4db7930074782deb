"""The lecture notes' mathematics in plain NumPy: readable, loop-based, float64.

It is cnnkit's oracle (its layers are tested against it) and a learner's reference (`cnnkit math`).
Conventions, as in every framework:
- "cross_correlation" slides the kernel as is: out[i, j] = sum_ab x[i*s + a, j*s + b] * w[a, b].
  This is what PyTorch and Keras compute under the name convolution.
- "convolution" is the textbook operation: the same with the kernel rotated by 180 degrees, so
  full-mode convolution equals np.convolve / scipy.signal.convolve2d.
- Arrays are (N, C, H, W) with kernels (F, C, kh, kw), as in PyTorch; plain 2-D (H, W) arrays with
  (kh, kw) kernels work too (and 1-D for conv1d).
"""
from __future__ import annotations

import math

import numpy as np

# ----------------------------------------------------------------------------- sizes and padding


def output_size(n: int, m: int, p: int = 0, s: int = 1) -> int:
    """o = floor((n + 2p - m) / s) + 1: input length n, kernel m, padding p on each side, stride s."""
    return (n + 2 * p - m) // s + 1


def pad_amounts(n: int, m: int, padding: str | int, stride: int = 1) -> tuple[int, int]:
    """(before, after) zeros for one axis: valid 0, full m - 1, same so that o = ceil(n / s)
    (an odd pixel goes after, TensorFlow's rule), or a number on both sides."""
    if padding == "valid":
        return 0, 0
    if padding == "full":
        return m - 1, m - 1
    if padding == "same":
        total = max((math.ceil(n / stride) - 1) * stride + m - n, 0)
        return total // 2, total - total // 2
    if isinstance(padding, (int, np.integer)) and padding >= 0:
        return int(padding), int(padding)
    raise ValueError(f"padding must be 'valid', 'same', 'full' or a number >= 0, not {padding!r}")


def rot180(w: np.ndarray) -> np.ndarray:
    """Rotate the last two axes by 180 degrees (flip rows and columns)."""
    return w[..., ::-1, ::-1]


# ----------------------------------------------------------------------------- convolution


def _as4d(x: np.ndarray, w: np.ndarray):
    """Lift (H, W) input and (kh, kw) kernel to (1, 1, H, W) and (1, 1, kh, kw)."""
    squeeze = x.ndim == 2
    if squeeze:
        x = x[None, None]
    if w.ndim == 2:
        w = w[None, None]
    if x.ndim != 4 or w.ndim != 4 or x.shape[1] != w.shape[1]:
        raise ValueError(f"input {x.shape} and kernel {w.shape} do not fit: need (N, C, H, W) and (F, C, kh, kw)")
    return x, w, squeeze


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, stride: int = 1,
           padding: str | int = 0, mode: str = "cross_correlation") -> np.ndarray:
    """2-D convolution of x (N, C, H, W) or (H, W) with w (F, C, kh, kw) or (kh, kw): (N, F, oh, ow)."""
    if mode not in ("cross_correlation", "convolution"):
        raise ValueError(f"mode must be 'cross_correlation' or 'convolution', not {mode!r}")
    x, w, squeeze = _as4d(np.asarray(x, dtype=np.float64), np.asarray(w, dtype=np.float64))
    if mode == "convolution":
        w = rot180(w)
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    (pt, pb), (pl, pr) = pad_amounts(h, kh, padding, stride), pad_amounts(wd, kw, padding, stride)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))  # zero padding
    oh, ow = (h + pt + pb - kh) // stride + 1, (wd + pl + pr - kw) // stride + 1
    out = np.zeros((n, f, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]  # (N, C, kh, kw)
            out[:, :, i, j] = np.tensordot(patch, w, axes=([1, 2, 3], [1, 2, 3]))  # sum over C, kh, kw
    if b is not None:
        out += np.asarray(b, dtype=np.float64).reshape(1, -1, 1, 1)
    return out[0, 0] if squeeze and f == 1 else out


def conv1d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, stride: int = 1,
           padding: str | int = 0, mode: str = "cross_correlation") -> np.ndarray:
    """1-D convolution of x (L,) or (N, C, L) with w (m,) or (F, C, m), as conv2d on height-1 images."""
    x, w = np.asarray(x, dtype=np.float64), np.asarray(w, dtype=np.float64)
    if x.ndim == 1 and w.ndim == 1:
        x4, w4 = x[None, None, None], w[None, None, None]
    else:
        x4, w4 = x[:, :, None], w[:, :, None]
    if padding in ("same", "full") or isinstance(padding, (int, np.integer)):
        p = pad_amounts(x4.shape[-1], w4.shape[-1], padding, stride)
        x4 = np.pad(x4, ((0, 0), (0, 0), (0, 0), p))
    out = conv2d(x4, w4, b, stride, 0, mode)[:, :, 0]
    return out[0, 0] if x.ndim == 1 and w.ndim == 1 else out


# ----------------------------------------------------------------------------- pooling


def _pool(x: np.ndarray, size: int, stride: int | None, reduce) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    squeeze = x.ndim == 2
    if squeeze:
        x = x[None, None]
    stride = stride or size
    n, c, h, w = x.shape
    oh, ow = output_size(h, size, 0, stride), output_size(w, size, 0, stride)
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            window = x[:, :, i * stride:i * stride + size, j * stride:j * stride + size]  # (N, C, size, size)
            out[:, :, i, j] = reduce(window.reshape(n, c, -1))
    return out[0, 0] if squeeze else out


def max_pool(x: np.ndarray, size: int, stride: int | None = None) -> np.ndarray:
    """Largest value of each size x size window (stride defaults to size; smaller strides overlap)."""
    return _pool(x, size, stride, lambda v: v.max(axis=-1))


def avg_pool(x: np.ndarray, size: int, stride: int | None = None) -> np.ndarray:
    """Mean of each window."""
    return _pool(x, size, stride, lambda v: v.mean(axis=-1))


def l2_pool(x: np.ndarray, size: int, stride: int | None = None) -> np.ndarray:
    """Square root of the sum of squares of each window."""
    return _pool(x, size, stride, lambda v: np.sqrt((v ** 2).sum(axis=-1)))


# ----------------------------------------------------------------------------- dense, activations, losses


def dense(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """y = x W^T + b for x (N, d_in) and W (d_out, d_in), as nn.Linear stores it."""
    y = np.asarray(x, dtype=np.float64) @ np.asarray(w, dtype=np.float64).T
    return y + b if b is not None else y


def relu(z):
    return np.maximum(z, 0.0)


def relu_prime(z):
    return (np.asarray(z) > 0).astype(np.float64)  # 0 at z = 0, as PyTorch takes it


def sigmoid(z):
    z = np.asarray(z, dtype=np.float64)
    return np.where(z >= 0, 1 / (1 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1 + np.exp(-np.abs(z))))


def sigmoid_prime(z):
    s = sigmoid(z)
    return s * (1 - s)


def tanh(z):
    return np.tanh(z)


def tanh_prime(z):
    return 1 - np.tanh(z) ** 2


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """exp(z) / sum exp(z), computed after subtracting the max (same result, no overflow)."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=axis, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=axis, keepdims=True))


def binary_cross_entropy(p, y) -> float:
    """Mean of -[y log p + (1 - y) log(1 - p)] over probabilities p."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))


def binary_cross_entropy_with_logits(z, y) -> float:
    """The same from logits z, stably: max(z, 0) - z y + log(1 + exp(-|z|))."""
    z, y = np.asarray(z, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def _one_hot(y, k: int) -> np.ndarray:
    y = np.asarray(y)
    return y.astype(np.float64) if y.ndim == 2 else np.eye(k)[y]


def categorical_cross_entropy(p, y) -> float:
    """Mean of -sum_k y_k log p_k over probabilities p (N, K); y are class indices or one-hot."""
    p = np.atleast_2d(np.asarray(p, dtype=np.float64))
    return float(np.mean(-(_one_hot(np.atleast_1d(y), p.shape[1]) * np.log(p)).sum(axis=1)))


def categorical_cross_entropy_with_logits(z, y) -> float:
    """The same from logits z (N, K), through log-softmax."""
    z = np.atleast_2d(np.asarray(z, dtype=np.float64))
    return float(np.mean(-(_one_hot(np.atleast_1d(y), z.shape[1]) * log_softmax(z)).sum(axis=1)))


def categorical_cross_entropy_with_logits_backward(z, y) -> np.ndarray:
    """dC/dz = (softmax(z) - y) / N for the mean loss."""
    z = np.atleast_2d(np.asarray(z, dtype=np.float64))
    return (softmax(z) - _one_hot(np.atleast_1d(y), z.shape[1])) / z.shape[0]


# ----------------------------------------------------------------------------- backward passes


def dense_backward(x: np.ndarray, w: np.ndarray, delta: np.ndarray):
    """(dC/dx, dC/dW, dC/db) for y = x W^T + b, given delta = dC/dy (N, d_out)."""
    return delta @ w, delta.T @ x, delta.sum(axis=0)


def dilate(delta: np.ndarray, stride: int) -> np.ndarray:
    """Insert stride - 1 zeros between the rows and columns of (N, F, oh, ow): a strided layer's
    gradient is a stride-1 layer's gradient with zeros where no output was computed."""
    if stride == 1:
        return delta
    n, f, oh, ow = delta.shape
    out = np.zeros((n, f, (oh - 1) * stride + 1, (ow - 1) * stride + 1))
    out[:, :, ::stride, ::stride] = delta
    return out


def conv2d_backward(x: np.ndarray, w: np.ndarray, delta: np.ndarray, stride: int = 1, padding: str | int = 0):
    """(dC/dx, dC/dw, dC/db) of the cross-correlation layer z = conv2d(x, w, b, stride, padding).

    With delta = dC/dz, written as the notes derive it (stride 1; a stride dilates delta first):
      dC/dw = a ⊛ delta             the input cross-correlated with delta ("δ ⊛ rot180(a)" in the
                                    notes' convolution convention: the same numbers)
      dC/dx = full(delta) ⊛ rot180(w)  delta zero-padded by k - 1, cross-correlated with the
                                    rotated kernel: the notes' δ⁽ˡ⁺¹⁾ ⊛ rot180(w⁽ˡ⁺¹⁾); the layer
                                    below multiplies it by f'(z⁽ˡ⁾)
      dC/db = sum of delta over the batch and positions
    """
    x, w, squeeze = _as4d(np.asarray(x, dtype=np.float64), np.asarray(w, dtype=np.float64))
    delta = np.asarray(delta, dtype=np.float64)
    if delta.ndim == 2:
        delta = delta[None, None]
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    (pt, pb), (pl, pr) = pad_amounts(h, kh, padding, stride), pad_amounts(wd, kw, padding, stride)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    d = dilate(delta, stride)  # (N, F, dh, dw)
    dh, dw_ = d.shape[2:]
    # dC/dw[f, c] = sum_n xp[n, c] ⊛ d[n, f]: a cross-correlation with the batch as the summed channel
    xs = xp[:, :, :dh + kh - 1, :dw_ + kw - 1]  # rows past the last window never reached the output
    dw = conv2d(xs.transpose(1, 0, 2, 3), d.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)  # (F, C, kh, kw)
    # dC/dxp = full(d) ⊛ rot180(w), summed over filters: channels in, filters out swapped
    dxs = conv2d(d, rot180(w).transpose(1, 0, 2, 3), padding="full")  # (N, C, dh + kh - 1, dw + kw - 1)
    dxp = np.zeros_like(xp)
    dxp[:, :, :dxs.shape[2], :dxs.shape[3]] = dxs
    dx = dxp[:, :, pt:pt + h, pl:pl + wd]
    db = delta.sum(axis=(0, 2, 3))
    if squeeze:
        return dx[0, 0], dw[0, 0] if f == 1 else dw, db
    return dx, dw, db


def _pool_backward(x: np.ndarray, delta: np.ndarray, size: int, stride: int | None, local_grad) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    delta = np.asarray(delta, dtype=np.float64)
    squeeze = x.ndim == 2
    if squeeze:
        x, delta = x[None, None], delta[None, None]
    stride = stride or size
    dx = np.zeros_like(x)
    for i in range(delta.shape[2]):
        for j in range(delta.shape[3]):
            window = x[:, :, i * stride:i * stride + size, j * stride:j * stride + size]  # (N, C, size, size)
            # overlapping windows add their contributions
            dx[:, :, i * stride:i * stride + size, j * stride:j * stride + size] += \
                local_grad(window) * delta[:, :, i:i + 1, j:j + 1]
    return dx[0, 0] if squeeze else dx


def max_pool_backward(x, delta, size: int, stride: int | None = None) -> np.ndarray:
    """The gradient flows to the (first) largest value of each window only."""
    def grad(win):
        n, c = win.shape[:2]
        flat = win.reshape(n, c, -1)
        mask = np.zeros_like(flat)
        np.put_along_axis(mask, flat.argmax(axis=-1)[..., None], 1.0, axis=-1)
        return mask.reshape(win.shape)
    return _pool_backward(x, delta, size, stride, grad)


def avg_pool_backward(x, delta, size: int, stride: int | None = None) -> np.ndarray:
    """Each value of a window gets 1 / size² of its gradient."""
    return _pool_backward(x, delta, size, stride, lambda win: np.full_like(win, 1.0 / (size * size)))


def l2_pool_backward(x, delta, size: int, stride: int | None = None) -> np.ndarray:
    """d sqrt(sum x²) / dx = x / sqrt(sum x²) (0 for an all-zero window)."""
    def grad(win):
        norm = np.sqrt((win ** 2).sum(axis=(2, 3), keepdims=True))
        return np.divide(win, norm, out=np.zeros_like(win), where=norm > 0)
    return _pool_backward(x, delta, size, stride, grad)


def sgd_step(params: list[np.ndarray], grads: list[np.ndarray], lr: float) -> list[np.ndarray]:
    """Gradient descent: θ ← θ - η ∂C/∂θ, for each parameter."""
    return [p - lr * g for p, g in zip(params, grads)]
