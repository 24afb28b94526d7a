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


@register("virtual_sensor")
class VirtualSensorResidual:
    """Each metric predicted from the device's *other* metrics ("virtual sensors").

    Features for metric j: the other metrics now and their exponential moving averages
    over ``spans`` rows (so a temperature that follows load through a thermal lag is
    still predictable). One ridge regression per metric, fitted on time-ordered rows of
    normal operation. ``residuals(X)`` returns, per row and metric, the residual in robust
    training sigmas, both as is and averaged over the last ``smooth`` rows; the stream
    state (moving averages, recent residuals) carries over between calls, so rows must
    arrive in time order. A fault in one metric shows up in that metric's own residual,
    which is what the explanation names.
    """

    def __init__(
        self,
        spans: tuple[int, ...] = (30, 120),
        smooth: int = 60,
        ridge: float = 1e-3,
        holdout: float = 0.0,
        extrapolation_penalty: float = 0.0,
    ) -> None:
        self.holdout = holdout
        self.extrapolation_penalty = extrapolation_penalty
        self.lo_: np.ndarray | None = None
        self.hi_: np.ndarray | None = None
        self.spans = tuple(spans)
        self.smooth = smooth
        self.ridge = ridge
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None
        self.coef_: np.ndarray | None = None  # metrics x (features + 1)
        self.sig_: np.ndarray | None = None
        self.sig_smooth_: np.ndarray | None = None
        self._ema: np.ndarray | None = None
        self._recent: np.ndarray | None = None  # last smooth-1 raw residuals

    def _features(self, Z: np.ndarray, ema: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        n, m = Z.shape
        alphas = np.array([2.0 / (s + 1.0) for s in self.spans])
        cur = Z[0].repeat(len(alphas)).reshape(m, -1).T.copy() if ema is None else ema.copy()
        E = np.empty((n, len(alphas), m))
        for i in range(n):
            cur += alphas[:, None] * (Z[i] - cur)
            E[i] = cur
        return np.concatenate([Z[:, None, :], E], axis=1), cur  # n x (1+spans) x m

    def _predict(self, F: np.ndarray) -> np.ndarray:
        assert self.coef_ is not None
        n, _, m = F.shape
        pred = np.empty((n, m))
        for j in range(m):
            others = np.delete(F, j, axis=2).reshape(n, -1)
            pred[:, j] = others @ self.coef_[j, :-1] + self.coef_[j, -1]
        return pred

    def fit(self, X: np.ndarray) -> VirtualSensorResidual:
        X = _as2d(X)
        self.mean_ = X.mean(axis=0)
        sd = X.std(axis=0)
        self.scale_ = np.where(sd > 1e-12, sd, 1.0)
        Z = (X - self.mean_) / self.scale_
        F, ema = self._features(Z, None)
        n, _, m = F.shape
        burn = min(max(self.spans), n // 4)  # let the moving averages settle first
        self.coef_ = self._solve(F, Z, burn, n)
        R = (Z - self._predict(F))[burn:]
        sig, sig_smooth = self._sigmas(R)
        if self.holdout > 0.0:
            # In-sample residuals flatter a model: it has partly fitted the slow wander of
            # its own training rows. Fit on the first rows, measure on the held-out tail,
            # and keep the wider of the two spreads (then refit on everything).
            cut = int(n * (1.0 - self.holdout))
            if cut - burn > 50 * m and n - cut > 2 * self.smooth:
                full = self.coef_
                self.coef_ = self._solve(F, Z, burn, cut)
                R_out = (Z - self._predict(F))[cut:]
                o_sig, o_smooth = self._sigmas(R_out)
                sig, sig_smooth = np.maximum(sig, o_sig), np.maximum(sig_smooth, o_smooth)
                self.coef_ = full
        self.sig_, self.sig_smooth_ = sig, sig_smooth
        self._ema = ema
        self.lo_ = Z.min(axis=0)
        self.hi_ = Z.max(axis=0)
        self._recent = R[-(self.smooth - 1) :] if self.smooth > 1 else np.zeros((0, m))
        return self

    def _solve(self, F: np.ndarray, Z: np.ndarray, lo: int, hi: int) -> np.ndarray:
        n, _, m = F.shape
        coef = []
        for j in range(m):
            A = np.delete(F, j, axis=2).reshape(n, -1)[lo:hi]
            y = Z[lo:hi, j]
            A1 = np.hstack([A, np.ones((len(A), 1))])
            reg = self.ridge * len(A) * np.eye(A1.shape[1])
            reg[-1, -1] = 0.0
            coef.append(np.linalg.solve(A1.T @ A1 + reg, A1.T @ y))
        return np.asarray(coef)

    def _sigmas(self, R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = max(1, min(self.smooth, len(R) // 4))
        c = np.cumsum(np.vstack([np.zeros(R.shape[1]), R]), axis=0)
        return _tail_aware_sd(R), _tail_aware_sd((c[w:] - c[:-w]) / w)

    def residuals(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(instantaneous z, smoothed z), each rows x metrics; advances the stream state."""
        if (
            self.coef_ is None
            or self.mean_ is None
            or self.scale_ is None
            or self.sig_ is None
            or self.sig_smooth_ is None
            or self._recent is None
        ):
            raise RuntimeError("VirtualSensorResidual is not fitted; call fit(X) first")
        Z = (_as2d(X) - self.mean_) / self.scale_
        F, self._ema = self._features(Z, self._ema)
        R = Z - self._predict(F)
        allr = np.vstack([self._recent, R])
        k = len(R)
        c = np.cumsum(np.vstack([np.zeros(R.shape[1]), allr]), axis=0)
        ends = np.arange(len(allr) - k + 1, len(allr) + 1)
        starts = np.maximum(ends - self.smooth, 0)
        M = (c[ends] - c[starts]) / (ends - starts)[:, None]
        self._recent = allr[-(self.smooth - 1) :] if self.smooth > 1 else allr[:0]
        zi, zs = R / self.sig_, M / self.sig_smooth_
        if self.extrapolation_penalty > 0.0 and self.lo_ is not None and self.hi_ is not None:
            # Outside the range of its training rows the model extrapolates and its error
            # grows; how far the *other* metrics are outside that range scales the bar.
            ema_now = F[:, 1:, :].mean(axis=1)
            excess = np.maximum(ema_now - self.hi_, 0.0) + np.maximum(self.lo_ - ema_now, 0.0)
            m = excess.shape[1]
            others = (excess.sum(axis=1, keepdims=True) - excess) / max(m - 1, 1)
            damp = 1.0 + self.extrapolation_penalty * others
            zi, zs = zi / damp, zs / damp
        return zi, zs

    def expected(self, x: np.ndarray, z_inst: np.ndarray) -> np.ndarray:
        """What each metric "should" read given the others: value minus its residual."""
        assert self.scale_ is not None and self.sig_ is not None
        return np.asarray(x, dtype=float) - z_inst * self.sig_ * self.scale_

    def leak_matrix(self) -> np.ndarray:
        """Column j: how a steady offset of 1 (standardised) in metric j shows up in every
        metric's residual, once the moving averages have caught up."""
        assert self.coef_ is not None
        m = self.coef_.shape[0]
        n_feat = 1 + len(self.spans)
        L = np.eye(m)
        for k in range(m):
            per_other = self.coef_[k, :-1].reshape(n_feat, m - 1).sum(axis=0)
            others = [j for j in range(m) if j != k]
            for idx, j in enumerate(others):
                L[k, j] = -per_other[idx]
        return L

    def attribute(self, z: np.ndarray, smooth: bool = True) -> int:
        """The metric whose own fault best explains the residual vector ``z`` (in sigmas),
        accounting for how a fault in one metric leaks into the predictions of the others
        (reconstruction-based contribution)."""
        assert self.sig_ is not None and self.sig_smooth_ is not None
        sig = self.sig_smooth_ if smooth else self.sig_
        Ln = self.leak_matrix() / sig[:, None]
        num = (Ln.T @ z) ** 2
        den = np.maximum(np.sum(Ln**2, axis=0), 1e-12)
        return int(np.argmax(num / den))

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        _, smooth = self.residuals(X)
        return np.max(np.abs(smooth), axis=1)

    def state_dict(self) -> dict[str, Any]:
        def lst(a: np.ndarray | None) -> list[Any] | None:
            return None if a is None else a.tolist()

        return {
            "holdout": self.holdout,
            "extrapolation_penalty": self.extrapolation_penalty,
            "lo": lst(self.lo_),
            "hi": lst(self.hi_),
            "spans": list(self.spans),
            "smooth": self.smooth,
            "ridge": self.ridge,
            "mean": lst(self.mean_),
            "scale": lst(self.scale_),
            "coef": lst(self.coef_),
            "sig": lst(self.sig_),
            "sig_smooth": lst(self.sig_smooth_),
            "ema": lst(self._ema),
            "recent": lst(self._recent),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        def arr(v: Any) -> np.ndarray | None:
            return None if v is None else np.asarray(v, dtype=float)

        self.holdout = float(state.get("holdout", 0.0))
        self.extrapolation_penalty = float(state.get("extrapolation_penalty", 0.0))
        self.lo_, self.hi_ = arr(state.get("lo")), arr(state.get("hi"))
        self.spans = tuple(int(s) for s in state["spans"])
        self.smooth, self.ridge = int(state["smooth"]), float(state["ridge"])
        self.mean_, self.scale_, self.coef_ = (
            arr(state["mean"]),
            arr(state["scale"]),
            arr(state["coef"]),
        )
        self.sig_, self.sig_smooth_ = arr(state["sig"]), arr(state["sig_smooth"])
        self._ema, self._recent = arr(state["ema"]), arr(state["recent"])


def _robust_sd(R: np.ndarray) -> np.ndarray:
    med = np.median(R, axis=0)
    return np.maximum(1.4826 * np.median(np.abs(R - med), axis=0), 1e-9)


def _tail_aware_sd(R: np.ndarray) -> np.ndarray:
    """Robust sigma, widened where the training residuals have heavier tails than a
    Gaussian (their 99.9 % quantile of |z| beyond 3.29), so a metric whose model is
    rougher gets a proportionally higher bar instead of more false alarms."""
    sd = _robust_sd(R)
    med = np.median(R, axis=0)
    q = np.quantile(np.abs(R - med) / sd, 0.999, axis=0)
    return sd * np.maximum(1.0, q / 3.29)
