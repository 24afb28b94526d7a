"""Per-device multivariate detectors over a device's metrics together (scikit-learn style).

``fit(X)`` learns from rows of normal operation (one column per metric), ``score_samples(X)``
returns one score per row, higher is more anomalous. :class:`PCAT2Q` also says which metrics
drive a score (:meth:`PCAT2Q.contributions`), which the explanations use.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import register


def _as2d(X: np.ndarray) -> np.ndarray:
    arr = np.asarray(X, dtype=float)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D array (rows x metrics), got shape {arr.shape}")
    return arr


@register("pca_t2q")
class PCAT2Q:
    """PCA on standardised metrics; score = T² (inside the model) and Q (outside it).

    Each statistic is divided by its ``quantile`` over the training rows, so a score of 1
    means "as unusual as the top (1 - quantile) of training", and the row score is the
    larger of the two. ``variance`` picks the number of components kept.
    """

    def __init__(self, variance: float = 0.9, quantile: float = 0.99) -> None:
        self.variance = variance
        self.quantile = quantile
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None
        self.components_: np.ndarray | None = None
        self.eigvals_: np.ndarray | None = None
        self.t2_ref_ = 1.0
        self.q_ref_ = 1.0

    def fit(self, X: np.ndarray) -> PCAT2Q:
        X = _as2d(X)
        self.mean_ = X.mean(axis=0)
        sd = X.std(axis=0)
        self.scale_ = np.where(sd > 1e-12, sd, 1.0)
        Z = (X - self.mean_) / self.scale_
        _, s, vt = np.linalg.svd(Z, full_matrices=False)
        ev = s**2 / max(len(Z) - 1, 1)
        frac = np.cumsum(ev) / max(ev.sum(), 1e-12)
        k = int(np.searchsorted(frac, self.variance) + 1)
        k = min(k, len(ev))
        self.components_ = vt[:k]
        self.eigvals_ = np.maximum(ev[:k], 1e-12)
        t2, q = self._stats(X)
        self.t2_ref_ = max(float(np.quantile(t2, self.quantile)), 1e-12)
        self.q_ref_ = max(float(np.quantile(q, self.quantile)), 1e-12)
        return self

    def _check(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if (
            self.mean_ is None
            or self.scale_ is None
            or self.components_ is None
            or self.eigvals_ is None
        ):
            raise RuntimeError("PCAT2Q is not fitted; call fit(X) first")
        return self.mean_, self.scale_, self.components_, self.eigvals_

    def _stats(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, scale, comp, ev = self._check()
        Z = (_as2d(X) - mean) / scale
        T = Z @ comp.T
        t2 = np.sum(T**2 / ev, axis=1)
        resid = Z - T @ comp
        q = np.sum(resid**2, axis=1)
        return t2, q

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        t2, q = self._stats(X)
        return np.maximum(t2 / self.t2_ref_, q / self.q_ref_)

    def contributions(self, x: np.ndarray) -> np.ndarray:
        """Signed distance of each metric from its training mean, in training sigmas."""
        mean, scale, _, _ = self._check()
        return (np.asarray(x, dtype=float) - mean) / scale

    def state_dict(self) -> dict[str, Any]:
        def lst(a: np.ndarray | None) -> list[Any] | None:
            return None if a is None else a.tolist()

        return {
            "variance": self.variance,
            "quantile": self.quantile,
            "mean": lst(self.mean_),
            "scale": lst(self.scale_),
            "components": lst(self.components_),
            "eigvals": lst(self.eigvals_),
            "t2_ref": self.t2_ref_,
            "q_ref": self.q_ref_,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        def arr(v: Any) -> np.ndarray | None:
            return None if v is None else np.asarray(v, dtype=float)

        self.variance, self.quantile = float(state["variance"]), float(state["quantile"])
        self.mean_, self.scale_ = arr(state["mean"]), arr(state["scale"])
        self.components_, self.eigvals_ = arr(state["components"]), arr(state["eigvals"])
        self.t2_ref_, self.q_ref_ = float(state["t2_ref"]), float(state["q_ref"])


@register("isolation_forest")
class IsolationForestDetector:
    """scikit-learn's IsolationForest, scores flipped so higher is more anomalous.

    One call costs milliseconds whatever the batch size, so the engine calls it once per
    batch, never per reading. State is the training rows (refitted on load with the same
    seed), which keeps persistence to plain JSON.
    """

    def __init__(
        self, n_estimators: int = 100, max_samples: int = 256, random_state: int = 0
    ) -> None:
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.random_state = random_state
        self._train: np.ndarray | None = None
        self._model: Any = None

    def fit(self, X: np.ndarray) -> IsolationForestDetector:
        from sklearn.ensemble import IsolationForest

        self._train = _as2d(X)
        self._model = IsolationForest(
            n_estimators=self.n_estimators,
            max_samples=min(self.max_samples, len(self._train)),
            random_state=self.random_state,
        ).fit(self._train)
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        if self._model is None:
            raise RuntimeError("IsolationForestDetector is not fitted; call fit(X) first")
        return -np.asarray(self._model.score_samples(_as2d(X)))

    def state_dict(self) -> dict[str, Any]:
        return {
            "n_estimators": self.n_estimators,
            "max_samples": self.max_samples,
            "random_state": self.random_state,
            "train": None if self._train is None else self._train.tolist(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.n_estimators = int(state["n_estimators"])
        self.max_samples = int(state["max_samples"])
        self.random_state = int(state["random_state"])
        if state["train"] is not None:
            self.fit(np.asarray(state["train"], dtype=float))
