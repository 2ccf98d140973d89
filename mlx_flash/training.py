"""Training a low-rank predictor and choosing its threshold (numpy float32, PAPER.md 1).

Inputs and labels come from `RowFile`s (calibrate.py), read a batch at a time, so memory does not
grow with the number of calibration tokens. numpy, not MLX: MLX's CPU BLAS on Linux is ~100x
slower on matrix-matrix products (DESIGN.md).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

BATCH_TOKENS = 4096  # rows per block when a whole store is swept
TRAIN_BATCH = 1024
TRAIN_EPOCHS = 2
MIN_TRAIN_STEPS = 50
LEARNING_RATE = 5e-3
INIT_SAMPLE = 16384  # rows of the input sample behind the initial projection
# Stored thresholds are float32 probabilities; this logit range keeps them strictly inside (0, 1).
LOGIT_RANGE = (-30.0, 15.0)


class RowFile:
    """Fixed-width rows in a scratch file, read back by range or by index and never mapped, so
    their pages stay out of the process's resident memory. `bits=True` stores bool rows packed."""

    def __init__(self, path: Path, rows: int, width: int, dtype=np.float32, bits: bool = False):
        self.path, self.rows, self.width, self.bits = path, rows, width, bits
        self.dtype = np.dtype(np.uint8 if bits else dtype)
        self.row_bytes = (-(-width // 8) if bits else width) * self.dtype.itemsize
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, rows * self.row_bytes)

    def __len__(self) -> int:
        return self.rows

    def write(self, start: int, values: np.ndarray) -> None:
        data = np.packbits(values, axis=1) if self.bits else values.astype(self.dtype, copy=False)
        os.pwrite(self.fd, np.ascontiguousarray(data).data, start * self.row_bytes)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop)."""
        raw = os.pread(self.fd, (stop - start) * self.row_bytes, start * self.row_bytes)
        return self._decode(np.frombuffer(raw, dtype=self.dtype), stop - start)

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows `idx` (sorted), each run of consecutive rows one read."""
        if not len(idx):
            return self._decode(np.empty(0, self.dtype), 0)
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        first = np.concatenate(([0], breaks))
        last = np.concatenate((breaks, [len(idx)])) - 1
        rb = self.row_bytes
        parts = [os.pread(self.fd, (int(idx[b]) - int(idx[a]) + 1) * rb, int(idx[a]) * rb)
                 for a, b in zip(first.tolist(), last.tolist())]
        return self._decode(np.frombuffer(b"".join(parts), dtype=self.dtype), len(idx))

    def blocks(self, start: int = 0, stop: int | None = None, size: int = BATCH_TOKENS):
        """(first row, rows) for consecutive blocks of [start, stop)."""
        stop = self.rows if stop is None else stop
        for s in range(start, stop, size):
            yield s, self.read(s, min(s + size, stop))

    def _decode(self, flat: np.ndarray, n: int) -> np.ndarray:
        rows = flat.reshape(n, -1)
        return np.unpackbits(rows, axis=1, count=self.width).astype(bool) if self.bits else rows

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def init_params(x: RowFile, n: int, w_in: np.ndarray, b_in: np.ndarray | None,
                rank: int) -> list[np.ndarray]:
    """A, B, bias so that B A x + bias is the best rank-r fit of the pre-activation W_in x + b_in
    over rows [0, n) of x (SVD of W_in Sigma^1/2, Sigma = E[x x^T] on a strided sample)."""
    sample = x.take(np.arange(0, n, max(1, n // INIT_SAMPLE))).astype(np.float64)
    evals, evecs = np.linalg.eigh(sample.T @ sample / len(sample))
    m = w_in @ (evecs * np.sqrt(np.maximum(evals, 0)))  # (ffn, d)
    # top-r left singular vectors of m from the small (d, d) problem: u = m v / s
    s2, v = np.linalg.eigh(m.T @ m)
    top = np.argsort(s2)[::-1][:rank]
    u = (m @ v[:, top]) / np.sqrt(np.maximum(s2[top], 1e-30))  # (ffn, r), orthonormal
    A = u.T @ w_in  # (r, d)
    mean = sample.mean(axis=0)
    bias = w_in @ mean - u @ (A @ mean)  # the projection's error on the mean input
    if b_in is not None:
        bias = bias + b_in
    return [A.astype(np.float32), u.astype(np.float32), bias.astype(np.float32)]


def train(x: RowFile, y: RowFile, n: int, params: list[np.ndarray], positive: float,
          seed: int) -> list[np.ndarray]:
    """Adam on class-balanced BCE over rows [0, n): positives weighted by neg/pos of the layer
    (`positive`: the fraction of positive labels)."""
    if positive in (0.0, 1.0):
        return params
    weight = np.float32((1 - positive) / positive)
    moments = [(np.zeros_like(p), np.zeros_like(p)) for p in params]
    rng = np.random.default_rng(seed)
    batch = min(TRAIN_BATCH, n)
    steps = max(MIN_TRAIN_STEPS, TRAIN_EPOCHS * n // batch)
    order, cursor = rng.permutation(n), 0
    b1, b2, eps = 0.9, 0.999, 1e-8
    for step in range(steps):
        if cursor + batch > n:  # next epoch
            order, cursor = rng.permutation(n), 0
        idx = np.sort(order[cursor : cursor + batch])
        cursor += batch
        xb, yb = x.take(idx), y.take(idx)
        A, B, bias = params
        hb = xb @ A.T  # (b, r)
        p = hb @ B.T  # (b, ffn) logits, then probabilities in place
        p += bias
        np.negative(p, out=p)
        np.exp(p, out=p)
        p += 1
        np.reciprocal(p, out=p)
        # dLoss/dlogit: p for negatives, weight * (p - 1) for positives; mean over tokens
        g = np.where(yb, weight * (p - 1), p)
        g *= np.float32(1 / batch)
        dh = g @ B
        grads = [dh.T @ xb, g.T @ hb, g.sum(axis=0)]
        lr = LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * step / steps))  # cosine to zero
        t = step + 1
        scale = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        for prm, grad, (m1, m2) in zip(params, grads, moments):
            m1 *= b1
            m1 += (1 - b1) * grad
            m2 *= b2
            m2 += (1 - b2) * grad * grad
            prm -= scale * m1 / (np.sqrt(m2) + eps)
    return params


def logits(x: np.ndarray, params: list[np.ndarray]) -> np.ndarray:
    A, B, bias = params
    return (x @ A.T) @ B.T + bias


def pick_threshold(x: RowFile, y: RowFile, start: int, params, target_recall: float,
                   stop: int | None = None) -> float:
    """The largest logit cut with recall >= target_recall on rows [start, stop), as a float32
    probability."""
    pos = np.concatenate([logits(xb, params)[y.read(s, s + len(xb))]
                          for s, xb in x.blocks(start, stop)])
    if not len(pos):
        return 0.5
    miss = int(math.floor((1 - target_recall) * len(pos)))  # positives we may lose
    cut = float(np.partition(pos, miss)[miss])
    cut -= 1e-4 * max(1.0, abs(cut))  # strictly below it (logits > t), float32 rounding included
    cut = min(max(cut, LOGIT_RANGE[0]), LOGIT_RANGE[1])
    return float(np.float32(1 / (1 + math.exp(-cut))))


def logit_cut(threshold: float) -> float:
    return math.log(threshold) - math.log1p(-threshold)


class Metrics:
    """True sparsity, predicted-active fraction, recall and precision, summed block by block."""

    def __init__(self):
        self.true = self.predicted = self.hit = self.total = 0

    def add(self, pred: np.ndarray, truth: np.ndarray) -> None:
        self.true += int(truth.sum())
        self.predicted += int(pred.sum())
        self.hit += int(np.count_nonzero(pred & truth))
        self.total += truth.size

    def row(self) -> dict:
        return {
            "true_sparsity": round(1 - self.true / self.total, 4),
            "predicted_active_fraction": round(self.predicted / self.total, 4),
            "recall": round(self.hit / self.true, 4) if self.true else 1.0,
            "precision": round(self.hit / self.predicted, 4) if self.predicted else 1.0,
        }


def metrics(x: RowFile, y: RowFile, start: int, params, threshold: float,
            stop: int | None = None) -> dict:
    """`Metrics` of the predictor on rows [start, stop)."""
    cut, m = logit_cut(threshold), Metrics()
    for s, xb in x.blocks(start, stop):
        m.add(logits(xb, params) > cut, y.read(s, s + len(xb)))
    return m.row()


class WindowFractions:
    """Mean fraction of neurons loaded fresh per token (active now, in none of the previous k
    tokens) and held after the token (active in any of the last k), over whole sequences
    (S, L, ffn) added block by block; measured after the first k tokens of each sequence."""

    def __init__(self, k: int):
        self.k = k
        self.fresh = self.held = 0.0
        self.fresh_n = self.held_n = 0

    def add(self, mask: np.ndarray) -> None:
        k = self.k
        before, held = np.zeros_like(mask), mask.copy()
        for j in range(1, k + 1):
            before[:, j:] |= mask[:, :-j]
            if j < k:
                held[:, j:] |= mask[:, :-j]
        fresh = (mask & ~before)[:, k:]
        self.fresh += float(fresh.sum())
        self.fresh_n += fresh.size
        self.held += float(held[:, k - 1 :].sum())
        self.held_n += held[:, k - 1 :].size

    def result(self) -> tuple[float, float]:
        return (round(self.fresh / max(self.fresh_n, 1), 4),
                round(self.held / max(self.held_n, 1), 4))
