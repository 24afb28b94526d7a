"""Per-device multivariate detectors over a device's metrics together (scikit-learn style).

``fit(X)`` learns from rows of normal operation (one column per metric), ``score_samples(X)``
returns one score per row, higher is more anomalous. :class:`PCAT2Q` also says which metrics
drive a score (:meth:`PCAT2Q.contributions`), which the explanations use.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable, Sequence
from typing import Any, TypedDict

import numpy as np

from .base import register


def _standardise(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, scale, standardised rows) of training rows; a constant column keeps scale 1."""
    X = _as2d(X)
    mean = X.mean(axis=0)
    sd = X.std(axis=0)
    scale = np.where(sd > 1e-12, sd, 1.0)
    return mean, scale, (X - mean) / scale


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
        self.mean_, self.scale_, Z = _standardise(X)
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


# Candidate lags for the slow model, in rows: a factor-sqrt(2) grid from 60 to 960 rows
# (10 min to 2 h 40 min at one row per 10 s), so any first-order lag in that range is
# matched within about 20 %.
# The slow model predicts each metric from at most this many others (forward selection), so
# fitting and state stay small on a device with dozens of metrics.
MAX_REGRESSORS = 4
# A square joins a metric's regressors only if it cuts the held-out error by this share (a
# value, by any cut), and only in a model of at least SQUARE_MIN_ROWS rows (a day at 10 s,
# after the averages settle): with the share alone squares entered 9 of 240 straight-line
# metrics' models at 16 h by chance (the simulator's motors and pumps), with both none in
# 720 fits; on its pumps by the affinity laws (``--curves``) about half of the metrics'.
SQUARE_GAIN = 0.3
SQUARE_MIN_ROWS = 8640
# Spikes are measured against the mean fast residual of the rows just before them.
LOCAL_ROWS = 30
# The short averaging window of the slow residual, and how much higher its bar is.
SHORT_ROWS = 30
SHORT_BAR = 1.6
LAG_GRID = tuple(round(60 * 2 ** (k / 2)) for k in range(9))
# An expected value is quoted against the metric's average over this many rows (5 minutes
# at 10 s): long enough that its noise (0.18 of a reading's) keeps the difference's sign.
QUOTE_SPAN = 30
# The latest healthy rows over which the residuals' spread with a metric's virtual value
# standing in is measured (a day at 10 s), the first time that metric is distrusted.
DISTRUST_PROBE_ROWS = 8640
# A metric is not named for a fault when its expected value moved over the long averaging
# window further than its smoothed value ever moved over as many training rows (times
# IMPLAUSIBLE_MOVE), and more than ALONE_MOVE times as far as the device's median metric's
# did, in the same terms (``attribute``).
IMPLAUSIBLE_MOVE = 1.0
ALONE_MOVE = 2.0


class Bar(TypedDict, total=False):
    """What widened a scored row's bars beyond the residuals' spread (``explained``'s
    keywords): the prediction's variance and, with ``extrapolation_penalty``, the damping."""

    var: np.ndarray
    damp: np.ndarray


@register("virtual_sensor")
class VirtualSensorResidual:
    """Each metric predicted from the device's *other* metrics ("virtual sensors").

    Two regressions per metric, each fitted on time-ordered rows of normal operation:

    * **fast**: the other metrics now and their exponential moving averages over ``spans``
      rows; its residual, row by row, catches spikes (``z_inst``).
    * **slow**: every metric first smoothed by an EMA over ``slow_span`` rows, target
      included, then the target predicted from the others' smoothed values and one lagged
      copy of them (an EMA whose span is identified per metric from ``lag_grid`` on
      held-out rows, so a temperature that follows load through a thermal lag is
      predicted with the right lag). Smoothing the regressors keeps their noise from
      shrinking the fitted gains (errors-in-variables attenuation), which otherwise shows
      up as a bias wherever the load leaves the range it was trained on. Its residual,
      averaged over ``smooth`` rows and divided by the spread of that average on the
      ``holdout`` share of training rows (out of sample, so honest about model error),
      catches drifts and level shifts (``z_smooth``).

    ``residuals(X)`` returns both per row and metric; the stream state carries over between
    calls, so rows must arrive in time order. A fault in one metric shows up in that
    metric's own residual, which is what the explanation names.

    ``residuals(X, distrust)``: the listed metrics (under an open incident) no longer feed
    the predictions of the others; their virtual values (the fast model's prediction from
    the others) stand in, so a second fault shows in the others' residuals as on a healthy
    device. Their own residuals still come from their readings. ``stand_in`` rewrites the
    inputs' recent past the same way when a metric is first distrusted, since the faulty
    values read before the incident opened are still in the lagged averages.
    """

    def __init__(
        self,
        spans: tuple[int, ...] = (30, 120),
        smooth: int = 60,
        ridge: float = 1e-3,
        holdout: float = 0.3,
        extrapolation_penalty: float = 0.0,
        slow_span: int = 60,
        lag_grid: tuple[int, ...] = LAG_GRID,
        slow_ridge: float = 1e-5,
    ) -> None:
        self.spans = tuple(spans)
        self.smooth = smooth
        self.ridge = ridge
        self.holdout = holdout
        self.extrapolation_penalty = extrapolation_penalty
        self.slow_span = slow_span
        self.lag_grid = tuple(lag_grid)
        self.slow_ridge = slow_ridge
        self.lo_: np.ndarray | None = None
        self.hi_: np.ndarray | None = None
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None
        self.coef_: np.ndarray | None = None  # fast: metrics x (features + 1)
        self.sig_: np.ndarray | None = None
        self.lags_: list[int] = []  # slow: identified lag span per metric (0 = none)
        # metrics x (3 * metrics + 1): on [S, lagged S, S squared, 1] (``_design``)
        self.slow_coef_: np.ndarray | None = None
        self.sig_smooth_: np.ndarray | None = None
        self.sig_short_: np.ndarray | None = None
        self._ema: np.ndarray | None = None
        self._s: np.ndarray | None = None  # smoothed metrics, last row
        # ... as the predictions see it, where a distrusted metric's virtual value stands in
        self._s_in: np.ndarray | None = None
        self._lagged: dict[int, np.ndarray] = {}  # lag span -> its EMA of the smoothed row
        self._recent: np.ndarray | None = None  # last smooth-1 slow residuals
        self._recent_fast: np.ndarray | None = None  # last LOCAL_ROWS fast residuals
        self._recent_pred: np.ndarray | None = None  # last smooth slow predictions
        # Per metric: the largest change of its smoothed value over ``smooth`` training rows.
        self.move_: np.ndarray | None = None
        # per metric: the columns of [S, lagged S, 1] it uses, and their coefficients' covariance
        self.slow_idx_: list[list[int]] = []
        self.slow_cov_: list[np.ndarray] = []
        # A model too young to choose squares (``_curve``): per metric, its regression with
        # its regressors' squares added (metrics x (3 * metrics + 1), as ``slow_coef_``) and
        # the share of the line's misfit that curve explains; None where no metric's does.
        self.curve_coef_: np.ndarray | None = None
        self.curve_weight_: np.ndarray | None = None
        self.fixed_: list[int] = []  # metrics constant in the training rows: not judged
        # Per distrusted metric c (measured when first distrusted): how many times wider
        # each metric's residual (fast, smoothed) spreads while c's virtual value stands in.
        self._wide: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        # What the slow model expected each metric to read in the rows ``residuals``
        # scored last, in the metrics' units: what an explanation quotes (not saved).
        self.expected_: np.ndarray | None = None
        # ... and how far that expectation moved over the ``smooth`` rows up to each of
        # them, in multiples of ``move_`` (NaN until that many rows were predicted).
        self.moved_: np.ndarray | None = None
        # The short averaging window's statistic alone over those rows (in sigmas of its
        # own spread): what the last SHORT_ROWS rows say, without the long window's past.
        self.short_z_: np.ndarray | None = None
        # ... and the variance of the slow model's prediction at each of them, which both
        # windows' bars include (``residuals``) and an attribution reads a leak against.
        self.var_: np.ndarray | None = None
        # ... and the factor each bar was widened by beyond the training range
        # (``extrapolation_penalty``; None when it is off).
        self.damp_: np.ndarray | None = None

    # --- fast model --------------------------------------------------------------------
    def _features(self, Z: np.ndarray, ema: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        n, m = Z.shape
        cur = np.tile(Z[0], (len(self.spans), 1)) if ema is None else ema
        F = np.empty((n, 1 + len(self.spans), m))
        F[:, 0, :] = Z
        nxt = np.empty_like(cur)
        for k, span in enumerate(self.spans):
            F[:, 1 + k, :], nxt[k] = _ema(Z, span, cur[k])
        return F, nxt  # n x (1+spans) x m

    def _predict(self, F: np.ndarray) -> np.ndarray:
        """Every metric's prediction from the others' features, in one matrix product
        (each metric's own features weigh zero): a device's cost per row grows with the
        square of its metrics, not with a copy of its features per metric."""
        assert self.coef_ is not None
        n, p, m = F.shape
        return F.reshape(n, p * m) @ self._gains() + self.coef_[:, -1]

    def _gains(self) -> np.ndarray:
        """The fast model's gains as a (features x metrics) x metrics matrix, feature-major:
        column j holds metric j's coefficients on the others' features, zeros on its own."""
        assert self.coef_ is not None
        m = self.coef_.shape[0]
        p = 1 + len(self.spans)
        W = np.zeros((p * m, m))
        W[_others(p, m), np.arange(m)[:, None]] = self.coef_[:, :-1]
        return W

    def _solve(self, F: np.ndarray, Z: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """Each metric's ridge regression on the others' features, solved from one set of
        cross-products of all features (each metric's system is that set without its own
        rows and columns): one pass over the rows instead of one per metric, which made a
        week of an 80-metric device a minute's fit."""
        _, p, m = F.shape
        A = F[lo:hi].reshape(hi - lo, p * m)
        G = np.empty((p * m + 1, p * m + 1))
        G[:-1, :-1] = A.T @ A
        G[:-1, -1] = G[-1, :-1] = A.sum(axis=0)
        G[-1, -1] = hi - lo
        B = np.vstack([A.T @ Z[lo:hi], Z[lo:hi].sum(axis=0)])
        keep = np.hstack([_others(p, m), np.full((m, 1), p * m)])
        reg = _penalty(hi - lo, keep.shape[1], self.ridge)
        return np.stack(
            [np.linalg.solve(G[np.ix_(k, k)] + reg, B[k, j]) for j, k in enumerate(keep)]
        )

    # --- slow model --------------------------------------------------------------------
    @staticmethod
    def _slow_design(S: np.ndarray, L: np.ndarray | None, items: list[int]) -> np.ndarray:
        """The columns of regressor ``items`` (``_columns``), without the intercept."""
        lin, sq = _split(items, S.shape[1])
        parts = [S[:, lin]] + ([] if L is None else [L[:, lin]]) + [S[:, sq] ** 2]
        return np.hstack(parts)

    def _select(
        self,
        grams: dict[int, tuple[np.ndarray, np.ndarray]],
        j: int,
        rows: tuple[int, int],
        base: float,
        squares: bool = False,
    ) -> tuple[float, int, list[int]]:
        """Forward selection of (lag, regressors) for metric ``j`` by held-out error: a
        regressor that follows load with another lag only helps inside the training range.
        ``grams``: per lag span, the cross-products of [S, lagged S, S squared, 1] over the
        training and the held-out rows (``rows``: how many of each), as :func:`_grams`
        makes them;
        ``base``: the held-out error of predicting ``j`` by its training mean;
        ``squares``: the others' squares are candidates too (``SQUARE_GAIN``).

        Every trial is solved from the cross-products, not from the rows themselves: the
        same fits, but a week of rows costs what a day did."""
        best: tuple[float, int, list[int]] | None = None
        m = (len(grams[0][0]) - 1) // 3
        others = [k for k in range(m) if k != j]
        _, n_te = rows
        for span in grams:
            G_tr, G_te = grams[span]
            chosen: list[int] = []
            err_now = base
            while len(chosen) < min(len(others) * (1 + squares), MAX_REGRESSORS):
                # every candidate added to the chosen ones, solved together: the others'
                # values, then their squares (a batch each, as their column counts differ)
                best_of = []
                for square in (False, True)[: 1 + squares]:
                    cand = [m * square + k for k in others if m * square + k not in chosen]
                    if cand:
                        sse = self._trial(G_tr, G_te, j, chosen, cand, span)
                        k = int(np.argmin(sse))  # the first of equals: the lowest metric
                        err = float(sse[k]) / n_te
                        if err < err_now * (1.0 - SQUARE_GAIN if square else 1.0):
                            best_of.append((err, cand[k]))
                if not best_of:
                    break
                err_now, pick = min(best_of)
                chosen.append(pick)
            if chosen and (best is None or err_now < best[0]):
                best = (err_now, span, sorted(chosen))
        if best is None:  # nothing predicts it: fall back to the first others, no lag
            return 0.0, 0, others[:MAX_REGRESSORS]
        return best

    def _trial(
        self,
        G_tr: np.ndarray,
        G_te: np.ndarray,
        j: int,
        chosen: list[int],
        cand: list[int],
        span: int,
    ) -> np.ndarray:
        """Held-out squared error of predicting ``j`` from ``chosen`` plus each of ``cand``
        (regressor items of one kind), every fit solved from the cross-products."""
        m = (len(G_tr) - 1) // 3
        idx = np.array([[*_columns([*chosen, k], m, span), 3 * m] for k in cand], dtype=int)
        reg = _penalty(int(G_tr[-1, -1]), idx.shape[1], self.slow_ridge)
        systems = G_tr[idx[:, :, None], idx[:, None, :]] + reg
        c = np.linalg.solve(systems, G_tr[idx, j][..., None])[..., 0]
        quad = np.einsum("ki,kil,kl->k", c, G_te[idx[:, :, None], idx[:, None, :]], c)
        sse: np.ndarray = G_te[j, j] - 2.0 * np.einsum("ki,ki->k", c, G_te[idx, j]) + quad
        return sse

    def _slow_fit(self, Z: np.ndarray, burn: int) -> np.ndarray:
        """Identify each metric's lag and regressors, fit the slow regressions, return
        their in-sample residuals."""
        n, m = Z.shape
        S, s_last = _ema(Z, self.slow_span, Z[0])
        cut = burn + int((n - burn) * (1.0 - self.holdout))
        # 50 training rows per metric, or per coefficient of a metric's regression (its
        # regressors, their lagged copies and the intercept) if fewer: 50 per metric
        # alone kept a 60-metric device's first models (12 hours of rows) from choosing
        # on held-out rows at all.
        coefs = 2 * MAX_REGRESSORS + 1
        held_out = (
            self.holdout > 0.0 and n - cut > 2 * self.smooth and cut - burn > 50 * min(m, coefs)
        )
        if held_out:
            # One lagged copy of the rows at a time (its cross-products kept, the copy
            # not): nine copies of a week of a 200-metric device's rows would be 0.9 GB.
            grams = {}
            plain = _grams(S, None, burn, cut)
            for span in (0, *self.lag_grid):
                L = _ema(S, span, S[0])[0] if span else None
                grams[span] = _grams(S, L, burn, cut, plain) if span else plain
            rows = (cut - burn, n - cut)
            base = np.mean((S[cut:] - S[burn:cut].mean(axis=0)) ** 2, axis=0)
        else:
            # Too few rows to choose on held-out ones: the regressors are chosen by their
            # fit in sample, without a lag (any four others, as before, could leave a
            # metric predicted from four it has nothing to do with).
            G = _grams(S, None, burn, n)[0]
            grams, rows = {0: (G, G)}, (n - burn, n - burn)
            base = np.var(S[burn:], axis=0)
        # Squares only where held-out rows can tell a curve from a line (SQUARE_MIN_ROWS).
        squares = held_out and n - burn >= SQUARE_MIN_ROWS
        chosen = [self._select(grams, j, rows, float(base[j]), squares)[1:] for j in range(m)]
        coef = np.zeros((m, 3 * m + 1))
        cov: list[np.ndarray] = [np.empty(0)] * m
        used: list[list[int]] = [[] for _ in range(m)]
        lags = [span for span, _ in chosen]
        R_in = np.empty((n - burn, m))
        curve, weight = np.zeros((m, 3 * m + 1)), np.zeros(m)
        R_out = np.empty((n - cut, m)) if held_out else None
        self._lagged = {}
        for span in sorted(set(lags)):
            L = None
            if span:
                L, self._lagged[span] = _ema(S, span, S[0])
            for j in (j for j in range(m) if lags[j] == span):
                cols = chosen[j][1]
                A = self._slow_design(S, L, cols)
                if R_out is not None:
                    c = _ridge(A[burn:cut], S[burn:cut, j], self.slow_ridge)
                    R_out[:, j] = S[cut:, j] - _apply(A[cut:], c)
                c = _ridge(A[burn:], S[burn:, j], self.slow_ridge)
                R_in[:, j] = S[burn:, j] - _apply(A[burn:], c)
                if not squares:
                    curve[j], weight[j] = self._curve(S, L, (span, burn), j, cols, R_in[:, j])
                used[j] = [*_columns(cols, m, span), 3 * m]
                coef[j, used[j]] = c
                cov[j] = _coef_cov(A[burn:], R_in[:, j], self.slow_ridge, self.smooth)
        self.lags_, self.slow_coef_ = lags, coef
        self.slow_idx_, self.slow_cov_ = used, cov
        self.curve_coef_, self.curve_weight_ = (curve, weight) if weight.any() else (None, None)
        self._s = s_last
        gap = self.smooth
        self.move_ = (
            np.abs(S[burn + gap :] - S[burn:-gap]).max(axis=0) if n - burn > gap else np.zeros(m)
        )
        self._recent_pred = (S[burn:] - R_in)[-gap:]
        self.sig_smooth_, self.sig_short_ = (
            self._spread(R_in, R_out, w) for w in (self.smooth, self._short())
        )
        return R_in

    def _curve(
        self,
        S: np.ndarray,
        L: np.ndarray | None,
        at: tuple[int, int],
        j: int,
        items: list[int],
        r_in: np.ndarray,
    ) -> tuple[np.ndarray, float]:
        """The doubt of a model too young to choose squares (``SQUARE_MIN_ROWS``): metric
        ``j``'s regression on ``items`` refitted with their squares added, as a row of
        ``curve_coef_``, and the share of the line's in-sample misfit (``r_in``) that
        curve explains (0: none; the row is then zeros). ``at``: the lag span and the
        burn-in rows.

        Half a day of a machine's loads cannot tell a curve from a line by held-out rows
        (which squares entered on straight-line machines by chance), but where the line
        misses a curve its bar should say so: the scoring widens it by the two fits'
        difference at each row, times that share. On the simulator's straight-line
        machines the share is 0.00-0.10 (the bars as before); on its pumps by the
        affinity laws up to 0.8, and most of their first day's false anomalies came where
        the line and the curve part (``--curves``: 31 to 20 on seeds 300-302)."""
        span, burn = at
        m = S.shape[1]
        lin, _ = _split(items, m)
        row = np.zeros(3 * m + 1)
        e_line = float(np.mean(r_in**2))
        if not lin or e_line <= 0.0:
            return row, 0.0
        both = [*lin, *(m + k for k in lin)]
        A = self._slow_design(S, L, both)
        c = _ridge(A[burn:], S[burn:, j], self.slow_ridge)
        share = 1.0 - float(np.mean((S[burn:, j] - _apply(A[burn:], c)) ** 2)) / e_line
        if share <= 0.0:
            return row, 0.0
        row[[*_columns(both, m, span), 3 * m]] = c
        return row, share

    def _short(self) -> int:
        return max(1, min(SHORT_ROWS, self.smooth))

    @staticmethod
    def _spread(R_in: np.ndarray, R_out: np.ndarray | None, w: int) -> np.ndarray:
        """Spread of the ``w``-row average of the residual, in and out of sample."""
        sig = _tail_aware_sd(_moving_mean(R_in, w))
        if R_out is not None:
            sig = np.maximum(sig, _tail_aware_sd(_moving_mean(R_out, w)))
        return sig

    def _virtual(self, Z: np.ndarray, cols: list[int]) -> np.ndarray:
        """``Z`` with ``cols`` replaced by the fast model's prediction of them from the
        other metrics (which a metric's own column never enters). Two distrusted metrics
        do not read each other's readings: each is held at its latest virtual value (the
        shortest average of it as an input) while the other is predicted."""
        assert self._ema is not None
        held = Z.copy()
        held[:, cols] = self._ema[int(np.argmin(self.spans)), cols]
        F, _ = self._features(held, self._ema)
        out = Z.copy()
        out[:, cols] = self._predict(F)[:, cols]
        return out

    def _slow_residuals(
        self, Z: np.ndarray, Z_in: np.ndarray | None = None, level: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Residuals of the slow model and the variance of its predictions, made from
        ``Z_in`` where given (its distrusted metrics' virtual values); ``level``: each
        row's recent level of every metric, which ``expected_`` quotes against."""
        assert self.slow_coef_ is not None
        assert self._s is not None
        before = self._s if self._s_in is None else self._s_in
        S, self._s = _ema(Z, self.slow_span, self._s)
        S_in = S
        self._s_in = None
        if Z_in is not None:
            S_in, self._s_in = _ema(Z_in, self.slow_span, before)
        L = {}
        for span, last in self._lagged.items():
            L[span], self._lagged[span] = _ema(S_in, span, last)
        pred, var = self._slow_predict(S_in, L)
        self._track_moves(pred)
        assert self.mean_ is not None and self.scale_ is not None
        # The prediction is of the metric's 10-minute average; the reading's own noise
        # around its recent level is added back, so a reading minus its expected value is
        # that level's residual: it keeps its sign (a lone reading's noise would not: a
        # 1-sigma drift's reading fell on the wrong side) and, the level being a 5-minute
        # average (QUOTE_SPAN), follows an offset within minutes (the 10-minute one quoted
        # a 2 A offset as 1.2 A at the incident's rising edge).
        recent = S if level is None else level
        self.expected_ = self.mean_ + self.scale_ * (pred + Z - recent)
        return S - pred, var

    def _track_moves(self, pred: np.ndarray) -> None:
        """``moved_`` for the rows of ``pred`` (the slow model's predictions, in time
        order), against the predictions ``smooth`` rows before each."""
        w, m = self.smooth, pred.shape[1]
        kept = self._recent_pred if self._recent_pred is not None else pred[:0]
        pad = np.full((max(w - len(kept), 0), m), np.nan)
        allp = np.vstack([pad, kept[-w:], pred])
        move = self.move_ if self.move_ is not None else np.full(m, np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            self.moved_ = np.abs(allp[w:] - allp[: len(pred)]) / move
        self._recent_pred = allp[-w:][~np.isnan(allp[-w:]).any(axis=1)]

    def _level(self, F: np.ndarray) -> np.ndarray | None:
        """Each row's recent level of every metric for the expected values quoted: the
        fast model's moving average of QUOTE_SPAN rows (or the shortest longer one, if
        shorter than the slow model's smoothing), else None (that smoothing itself)."""
        spans = [k for k, span in enumerate(self.spans) if QUOTE_SPAN <= span < self.slow_span]
        if not spans:
            return None
        k = min(spans, key=lambda i: self.spans[i])
        return F[:, 1 + k, :]

    def _slow_predict(
        self, S: np.ndarray, L: dict[int, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The slow model's predictions from the smoothed rows ``S`` and their lagged
        copies ``L`` (per lag span), and the variance of each."""
        assert self.slow_coef_ is not None
        pred = np.empty_like(S)
        var = np.empty_like(S)
        design = {span: _design(S, L[span] if span else None) for span in set(self.lags_)}
        for j, span in enumerate(self.lags_):
            D = design[span]
            pred[:, j] = D @ self.slow_coef_[j]
            Dj = D[:, self.slow_idx_[j]]
            var[:, j] = np.einsum("ni,ij,nj->n", Dj, self.slow_cov_[j], Dj)
        if self.curve_weight_ is not None:
            for span in set(self.lags_):
                doubted = [
                    j for j, s in enumerate(self.lags_) if s == span and self.curve_weight_[j] > 0.0
                ]
                if doubted:
                    gap = self._curve_gap(design[span], S, L.get(span), doubted)
                    var[:, doubted] += self.curve_weight_[doubted] * gap**2
        return pred, var

    def _curve_gap(
        self, D: np.ndarray, S: np.ndarray, L: np.ndarray | None, metrics: list[int]
    ) -> np.ndarray:
        """The ``metrics``' curves minus their lines at the smoothed rows ``S`` (and their
        lagged copy ``L``; ``D``, their design), a column each: the young model's doubt
        (``_curve``).

        Within the training rows' range it is read as fitted: the line misses a curve
        mostly *between* the loads it saw. Beyond it, it goes on from the range's edge
        along its slope there, not its square: a curve fitted on half a day's loads parts
        from the line by its square far beyond them, and read so, a straight-line pump's
        first stop (its loads at zero) hid the stop's incident from the widened bar and
        the restart was reported. Held at the edge instead, most of a curved machine's
        first-day false anomalies came where its loads went a little beyond the range
        (26 of 34 on ``--curves --seeds 300-305``, 2 % of it or more)."""
        assert self.curve_coef_ is not None and self.slow_coef_ is not None
        # Both rows are zero outside the columns they use: one product for all of them.
        diff = self.curve_coef_[metrics] - self.slow_coef_[metrics]
        gap: np.ndarray = D @ diff.T
        lo, hi = self.lo_, self.hi_
        if lo is None or hi is None:
            return gap
        S_in = np.clip(S, lo, hi)
        L_in = None if L is None else np.clip(L, lo, hi)
        out = S - S_in
        L_out = None if L is None or L_in is None else L - L_in
        if not out.any() and (L_out is None or not L_out.any()):
            return gap  # the usual case: no second design
        m = S.shape[1]
        gap = _design(S_in, L_in) @ diff.T
        # The slope at the edge: a square's is twice its coefficient times the edge.
        gap += out @ diff[:, :m].T + 2.0 * (out * S_in) @ diff[:, 2 * m : 3 * m].T
        if L_out is not None:
            gap += L_out @ diff[:, m : 2 * m].T
        return gap

    # --- public ------------------------------------------------------------------------
    def fit(self, X: np.ndarray) -> VirtualSensorResidual:
        self.mean_, self.scale_, Z = _standardise(X)
        F, ema = self._features(Z, None)
        n = len(Z)
        # let the moving averages settle first
        burn = min(max((*self.spans, self.slow_span)), n // 4)
        self.coef_ = self._solve(F, Z, burn, n)
        R_fast = (Z - self._predict(F))[burn:]
        del F  # three copies of the rows: not held while the slow model is fitted
        self.sig_ = _tail_aware_sd(_local(R_fast, None))
        self._recent_fast = R_fast[-LOCAL_ROWS:].copy()
        del R_fast
        self._ema = ema
        R = self._slow_fit(Z, burn)
        self.lo_ = Z.min(axis=0)
        self.hi_ = Z.max(axis=0)
        self._recent = R[-(self.smooth - 1) :] if self.smooth > 1 else R[:0]
        # A residual finer than a metric's resolution (a quantised temperature, a count) is
        # not measured: its spread is at least that of rounding to the resolution. Without
        # it a metric that held one value most of the time had a spread of ~0 and its next
        # step was millions of sigma. A metric that never moved in training has no
        # resolution and nothing to learn from: it is not judged until a retraining sees
        # it move (a setpoint, a configured limit; its stuck check still runs).
        quantum = _resolution(_as2d(X)) / self.scale_
        self.fixed_ = [int(j) for j in np.flatnonzero(quantum == 0.0)]
        floor = np.where(quantum > 0.0, quantum / np.sqrt(12.0), 1.0)
        for name in ("sig_", "sig_smooth_", "sig_short_"):
            setattr(self, name, np.maximum(getattr(self, name), floor))
        self._wide = {}
        return self

    def measure_distrust(self, X: np.ndarray, cols: Sequence[int]) -> None:
        """Measure, for each of ``cols`` not yet measured, how much wider every metric's
        residuals spread with its virtual value standing in, over ``X`` (recent healthy
        rows, oldest first; the latest DISTRUST_PROBE_ROWS are used). A virtual value is a
        prediction, and its error reaches every metric predicted from it, by as much as
        that metric leans on it: a simulated motor's bearing temperature, which follows
        the current, spread 1.4 to 2.6 times as wide with the current distrusted; its
        vibration no wider. Measured on demand (two passes over the rows for a metric's
        first incident), not at every retraining (one per metric: +6 s of CPU every 4 h
        for a 20-metric device)."""
        new = self.unmeasured(cols)
        if not new:
            return
        m = len(self.mean_) if self.mean_ is not None else 0
        X = X[-DISTRUST_PROBE_ROWS:]
        burn = min(self.memory_rows(), len(X) // 2)
        if m < 2 or len(X) - burn < 10 * self.smooth:
            for c in new:  # too few rows to tell: no wider
                self._wide[c] = (np.ones(m), np.ones(m))
            return
        base_i, base_s = self._probe(X, [], burn)
        for c in new:
            sd_i, sd_s = self._probe(X, [c], burn)
            self._wide[c] = (
                np.maximum(sd_i / np.maximum(base_i, 1e-12), 1.0),
                np.maximum(sd_s / np.maximum(base_s, 1e-12), 1.0),
            )

    def unmeasured(self, cols: Iterable[int]) -> list[int]:
        """Those of ``cols`` whose stand-in's spread ``measure_distrust`` has not measured
        since the last fit."""
        return [c for c in cols if c not in self._wide]

    def _probe(
        self, X: np.ndarray, distrust: list[int], burn: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The spread (fast, smoothed) of the residuals over ``X`` after ``burn`` rows,
        scored from a fresh stream state with ``distrust`` standing in."""
        _, zi, zs = self.replay(X, distrust)
        return _tail_aware_sd(zi[burn:]), _tail_aware_sd(zs[burn:])

    def replay(
        self, X: np.ndarray, distrust: Sequence[int] = ()
    ) -> tuple[VirtualSensorResidual, np.ndarray, np.ndarray]:
        """A copy of the model run over ``X`` (rows oldest first, ``memory_rows`` of them
        to forget its start) from a fresh stream state, with ``distrust`` standing in:
        what the stream would say now had it read ``X`` so. The copy (its ``short_z_``,
        ``expected_``) and the residuals (instantaneous, smoothed) over ``X``; the model's
        own stream state is untouched."""
        probe = copy.copy(self)
        assert self.mean_ is not None and self.scale_ is not None
        z0 = (X[0] - self.mean_) / self.scale_
        m = len(z0)
        probe._ema, probe._s, probe._s_in = np.tile(z0, (len(self.spans), 1)), z0.copy(), None
        probe._lagged = {span: z0.copy() for span in self._lagged}
        probe._recent = np.zeros((max(self.smooth - 1, 0), m))
        probe._recent_fast = np.zeros((LOCAL_ROWS, m))
        probe._recent_pred = None
        zi, zs = probe.residuals(X, distrust)
        return probe, zi, zs

    def adopt(self, probe: VirtualSensorResidual) -> None:
        """Take a ``replay``'s stream state as this model's own: its averages and recent
        residuals made of the readings, not of stand-ins that may have drifted from them
        (once no metric is distrusted any more)."""
        self._ema, self._s, self._s_in = probe._ema, probe._s, probe._s_in
        self._lagged = probe._lagged
        self._recent, self._recent_fast = probe._recent, probe._recent_fast
        self._recent_pred = probe._recent_pred

    def distrust_spread(self, distrust: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Per metric: how many times wider its residuals (fast, smoothed) spread with the
        ``distrust`` metrics' virtual values standing in (the widest of theirs, as
        ``measure_distrust`` found; 1 for one not measured)."""
        assert self.coef_ is not None
        m = self.coef_.shape[0]
        fast, smooth = np.ones(m), np.ones(m)
        for c in distrust:
            if c in self._wide:
                fast = np.maximum(fast, self._wide[c][0])
                smooth = np.maximum(smooth, self._wide[c][1])
        return fast, smooth

    def residuals(
        self, X: np.ndarray, distrust: Sequence[int] = ()
    ) -> tuple[np.ndarray, np.ndarray]:
        """(instantaneous z, smoothed z), each rows x metrics; advances the stream state.
        The ``distrust`` metrics' virtual values stand in for them as the others' inputs."""
        if (
            self.coef_ is None
            or self.mean_ is None
            or self.scale_ is None
            or self.sig_ is None
            or self.sig_smooth_ is None
            or self.sig_short_ is None
            or self._recent is None
            or self._recent_fast is None
        ):
            raise RuntimeError("VirtualSensorResidual is not fitted; call fit(X) first")
        Z = (_as2d(X) - self.mean_) / self.scale_
        Z_in = self._virtual(Z, list(distrust)) if distrust else Z
        F, self._ema = self._features(Z_in, self._ema)
        R_fast = Z - self._predict(F)
        zi = _local(R_fast, self._recent_fast) / self.sig_
        self._recent_fast = np.vstack([self._recent_fast, R_fast])[-LOCAL_ROWS:]
        R, var = self._slow_residuals(Z, Z_in if distrust else None, self._level(F))
        self.var_ = var
        self.damp_ = None
        allr = np.vstack([self._recent, R])
        k = len(R)
        c = np.cumsum(np.vstack([np.zeros(R.shape[1]), allr]), axis=0)
        ends = np.arange(len(allr) - k + 1, len(allr) + 1)
        self._recent = allr[-(self.smooth - 1) :] if self.smooth > 1 else allr[:0]
        # The bar: the spread of the averaged residual in (held-out) training, widened by
        # how uncertain the prediction itself is at this operating point. Two averaging
        # windows: the long one finds small offsets, the short one large offsets sooner
        # (held to a higher bar, SHORT_BAR times the long one's).
        zs = np.zeros_like(R)
        short = zs
        for w, sig, weight in (
            (self.smooth, self.sig_smooth_, 1.0),
            (self._short(), self.sig_short_, 1.0 / SHORT_BAR),
        ):
            starts = np.maximum(ends - w, 0)
            M = (c[ends] - c[starts]) / (ends - starts)[:, None]
            z = M / np.sqrt(sig**2 + var)
            if weight != 1.0:
                short = z
            zs = np.where(np.abs(weight * z) > np.abs(zs), weight * z, zs)
        if self.extrapolation_penalty > 0.0 and self.lo_ is not None and self.hi_ is not None:
            # Outside the range of its training rows the model extrapolates and its error
            # grows; how far the *other* metrics are outside that range scales the bar.
            ema_now = F[:, 1:, :].mean(axis=1)
            excess = np.maximum(ema_now - self.hi_, 0.0) + np.maximum(self.lo_ - ema_now, 0.0)
            m = excess.shape[1]
            others = (excess.sum(axis=1, keepdims=True) - excess) / max(m - 1, 1)
            damp = 1.0 + self.extrapolation_penalty * others
            zi, zs, short = zi / damp, zs / damp, short / damp
            self.damp_ = damp
        if self.fixed_:
            zi[:, self.fixed_] = 0.0
            zs[:, self.fixed_] = 0.0
            short[:, self.fixed_] = 0.0
        self.short_z_ = short
        return zi, zs

    def training_range(self) -> tuple[np.ndarray, np.ndarray]:
        """Per metric, the lowest and the highest value of the training rows."""
        if self.mean_ is None or self.scale_ is None or self.lo_ is None or self.hi_ is None:
            raise RuntimeError("VirtualSensorResidual is not fitted; call fit(X) first")
        return self.mean_ + self.scale_ * self.lo_, self.mean_ + self.scale_ * self.hi_

    def expected(self, x: np.ndarray, z: np.ndarray, smooth: bool = False) -> np.ndarray:
        """What each metric "should" read given the others: value minus its residual
        (the instantaneous one, or with ``smooth`` the average over the last rows, which
        is a fraction of an offset until it has lasted that long: ``expected_`` says
        what the slow model expected of each row scored)."""
        assert self.scale_ is not None and self.sig_ is not None
        sig = self.sig_smooth_ if smooth and self.sig_smooth_ is not None else self.sig_
        return np.asarray(x, dtype=float) - z * sig * self.scale_

    def leak_matrix(
        self, smooth: bool = False, distrust: Sequence[int] = (), settled: bool = False
    ) -> np.ndarray:
        """Column j: how an offset of 1 (standardised) in metric j shows up in every metric's
        residual: a new offset in the smoothed model's (``smooth``; as it shows when an
        incident opens), a one-row spike in the fast model's. With ``distrust``, an offset
        also leaks through the virtual values that stand in for those metrics. ``settled``:
        an offset that has lasted longer than the lags (hours after a restart), which the
        lagged inputs and every average have taken in, with every metric read as it reads
        (a ``replay``: no ``distrust``)."""
        assert self.coef_ is not None and self.slow_coef_ is not None
        m = self.coef_.shape[0]
        L = np.eye(m)
        if settled:
            if distrust:
                raise ValueError("a settled offset is judged with every metric trusted")
            # Its lagged copies have taken the offset in too.
            return L - (self._value_gain() + self.slow_coef_[:, m : 2 * m]) * (1 - L)
        if smooth:
            # At the rising edge, tens of rows into a fault, the lagged inputs (EMAs of
            # 60 to 960 rows) have hardly moved: the fault leaks through the others'
            # current values only. With the steady-state gains (lagged ones included) a
            # 2 A offset of a motor's current was named as the vibration (lag 960 rows),
            # which those gains expected to be pulled down far more than it yet was.
            gain = self._value_gain() * (1 - np.eye(m))
            if distrust:
                d = list(distrust)
                virtual = self._virtual_gain()
                virtual[np.ix_(d, d)] = 0.0  # each held while the other is predicted
                via = gain[:, d] @ virtual[d, :]  # through the stand-ins' predictions
                gain = gain.copy()
                gain[:, d] = 0.0
                gain += via
            return L - gain
        # A single-row spike reaches an EMA feature only with its weight 2 / (span + 1).
        return L - self._fast_gain([1.0] + [2.0 / (s + 1.0) for s in self.spans])

    def _value_gain(self) -> np.ndarray:
        """The slow model's gains on the others' smoothed values (row: the metric
        predicted), a square's taken as its slope at the device's current operating
        point (the latest smoothed row)."""
        assert self.slow_coef_ is not None
        m = self.slow_coef_.shape[0]
        gain = self.slow_coef_[:, :m].copy()
        if self._s is not None:
            gain += 2.0 * self.slow_coef_[:, 2 * m : 3 * m] * self._s[None, :]
        return gain

    def _virtual_gain(self) -> np.ndarray:
        """Row c: how a virtual value of metric c follows an offset of each other metric
        that has lasted a while (the fast model's gains on its current value and on the
        averages of up to 30 rows, which have taken the offset in by the time a gate
        opens, tens of rows into it)."""
        return self._fast_gain([1.0] + [1.0 if s <= 30 else 0.0 for s in self.spans])

    def _fast_gain(self, weights: list[float]) -> np.ndarray:
        """Row c: how the fast model's prediction of metric c moves with each other
        metric, its gains on that metric's current value and averages (the features, in
        order) weighted by how much of an offset each feature has taken in."""
        W = self._gains()
        m = W.shape[1]
        W = W.reshape(len(weights), m, m)  # feature, other metric, metric c
        return (np.asarray(weights)[:, None, None] * W).sum(axis=0).T

    def stand_in(self, X: np.ndarray, cols: Sequence[int]) -> None:
        """The state as if the virtual values of ``cols`` had stood in for them over
        ``X``, the recent rows up to the current one (long enough for the longest average
        to forget what came before: ``memory_rows``): their inputs' averages, and the
        other metrics' recent residuals that the smoothed residual still averages. Over
        that past each of ``cols`` is predicted from the others' readings, theirs too."""
        if (
            self.mean_ is None
            or self.scale_ is None
            or self._ema is None
            or self._s is None
            or self._recent is None
            or self._recent_fast is None
        ):
            raise RuntimeError("VirtualSensorResidual is not fitted; call fit(X) first")
        cols = list(cols)
        rest = [j for j in range(len(self._s)) if j not in cols]
        Z = (_as2d(X) - self.mean_) / self.scale_
        F, _ = self._features(Z, None)
        Z_in = Z.copy()
        Z_in[:, cols] = self._predict(F)[:, cols]
        F_in, ema = self._features(Z_in, None)
        self._ema[:, cols] = ema[:, cols]
        _replace_tail(self._recent_fast, (Z - self._predict(F_in))[:, rest], rest)
        S, _ = _ema(Z, self.slow_span, Z[0])
        S_in, s_last = _ema(Z_in, self.slow_span, Z_in[0])
        if self._s_in is None:
            self._s_in = self._s.copy()
        self._s_in[cols] = s_last[cols]
        L = {}
        for span, lagged in self._lagged.items():
            L[span], last = _ema(S_in, span, S_in[0])
            lagged[cols] = last[cols]
        pred, _ = self._slow_predict(S_in, L)
        _replace_tail(self._recent, (S - pred)[:, rest], rest)
        if self._recent_pred is not None:
            _replace_tail(self._recent_pred, pred[:, rest], rest)

    def memory_rows(self) -> int:
        """Rows after which the longest moving average has all but forgotten a value (its
        weight under 0.3 %)."""
        return 3 * max((*self.spans, *self.lags_, self.slow_span))

    def attribute(self, z: np.ndarray, **how: Any) -> int:
        """The metric whose own fault best explains ``z``: the largest of ``explained``
        (``how``: its keywords)."""
        return int(np.argmax(self.explained(z, **how)))

    def explained(
        self,
        z: np.ndarray,
        smooth: bool = True,
        among: Sequence[int] | None = None,
        distrust: Sequence[int] = (),
        led: Sequence[int] = (),
        settled: bool = False,
        short: bool = False,
        var: np.ndarray | None = None,
        damp: np.ndarray | None = None,
    ) -> np.ndarray:
        """Per metric (of ``among``, default all; -1 for one ruled out), how much of the
        residual vector ``z`` (in sigmas; the share in its squared sigmas) a fault of that
        metric alone explains, accounting for how a fault in one metric leaks
        into the predictions of the others (reconstruction-based contribution), through
        the ``distrust`` metrics' virtual values too. ``settled``: for an offset that has
        lasted hours (``leak_matrix``); ``short``: ``z`` is the short window's statistic.
        ``var``: the prediction's variance at z's row (a row of ``var_``), which z's own
        bar includes, so a leak is read against the same bar. Against the spread alone,
        a young model's doubt of a curved metric's line (its bar widened, its z shrunk)
        made that metric's share look small: of a curved motor's vibration and the
        bearing temperature read from it, the temperature was named for the vibration's
        fault (``bench/detection_restart.py --curves``: 13 of 24 faults named right, 18
        with the bar). ``damp``: the factor z's bar was widened by beyond the training
        range (a row of ``damp_``), likewise. ``bar(row)`` gives both for a row scored.

        ``led`` (``led_by_others`` of a row of ``moved_``) are ruled out, unless every
        candidate is: metrics whose expected value moved faster than the metric itself
        ever did in training while the device's other metrics' did not. Were that metric
        at fault, the others would be sound, and its expected value, read from them, its
        true value: one moving that fast, when the device's operating point is not, says
        the fault is in the metrics it is read from. Residuals alone
        cannot tell two temperatures heating together from the third one they are read
        against falling: a motor's overheating was named on its ambient temperature, whose
        expected value had moved 1.3-6.4 times its largest 10-minute change in training.
        A load swing as fast as any in training moves every metric's expected value so:
        a pump's pressure drift, under one, at 1.15 (the median metric at 1.01)."""
        assert self.sig_ is not None and self.sig_smooth_ is not None
        sig = self.sig_smooth_ if smooth else self.sig_
        if short and self.sig_short_ is not None:
            sig = self.sig_short_
        if var is not None and smooth:
            sig = np.sqrt(sig**2 + var)
        if damp is not None:
            sig = sig * damp
        through = distrust if smooth and not settled else ()
        Ln = self.leak_matrix(smooth, through, settled) / sig[:, None]
        num = (Ln.T @ z) ** 2
        fit = num / np.maximum(np.sum(Ln**2, axis=0), 1e-12)
        if among is not None:
            fit = np.where(np.isin(np.arange(len(fit)), list(among)), fit, -1.0)
        if led:
            plausible = fit.copy()
            plausible[list(led)] = -1.0
            if plausible.max() >= 0.0:
                fit = plausible
        return fit

    def bar(self, row: int) -> Bar:
        """What widened the bars of ``row`` of the rows ``residuals`` scored last, as
        ``explained``'s keywords (``var``, and ``damp`` when the penalty is on)."""
        out: Bar = {}
        if self.var_ is not None:
            out["var"] = self.var_[row]
        if self.damp_ is not None:
            out["damp"] = self.damp_[row]
        return out

    def curved(self, doubt: float) -> bool:
        """Whether the model takes its machine to be on curves: a metric's regression
        uses a square, or (too young to choose squares) a curve explains at least
        ``doubt`` of a metric's line misfit (``curve_weight_``)."""
        m = len(self.lags_)
        if any(2 * m <= c < 3 * m for idx in self.slow_idx_ for c in idx):
            return True
        weight = self.curve_weight_
        return self.curve_coef_ is not None and weight is not None and weight.max() >= doubt

    @staticmethod
    def led_by_others(moved: np.ndarray) -> list[int]:
        """The metrics (``moved``: a row of ``moved_``) whose expected value moved faster
        than the metric ever did (IMPLAUSIBLE_MOVE) while the device's median metric's did
        not (ALONE_MOVE): led by the metrics they are read from (``attribute``). NaN: not
        known yet, or a metric that never moved in training (not judged)."""
        if np.all(np.isnan(moved)):
            return []
        bar = max(IMPLAUSIBLE_MOVE, ALONE_MOVE * float(np.nanmedian(moved)))
        return [int(j) for j in np.flatnonzero(moved > bar)]

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        _, smooth = self.residuals(X)
        return np.max(np.abs(smooth), axis=1)

    def state_dict(self) -> dict[str, Any]:
        def lst(a: np.ndarray | None) -> list[Any] | None:
            return None if a is None else a.tolist()

        return {
            "spans": list(self.spans),
            "smooth": self.smooth,
            "ridge": self.ridge,
            "holdout": self.holdout,
            "extrapolation_penalty": self.extrapolation_penalty,
            "slow_span": self.slow_span,
            "lag_grid": list(self.lag_grid),
            "slow_ridge": self.slow_ridge,
            "lo": lst(self.lo_),
            "hi": lst(self.hi_),
            "mean": lst(self.mean_),
            "scale": lst(self.scale_),
            "coef": lst(self.coef_),
            "sig": lst(self.sig_),
            "lags": list(self.lags_),
            "slow_coef": lst(self.slow_coef_),
            "slow_idx": self.slow_idx_,
            "slow_cov": [c.tolist() for c in self.slow_cov_],
            "curve_coef": lst(self.curve_coef_),
            "curve_weight": lst(self.curve_weight_),
            "sig_smooth": lst(self.sig_smooth_),
            "sig_short": lst(self.sig_short_),
            "ema": lst(self._ema),
            "s": lst(self._s),
            "s_in": lst(self._s_in),
            "lagged": {str(k): v.tolist() for k, v in self._lagged.items()},
            "recent": lst(self._recent),
            "recent_fast": lst(self._recent_fast),
            "recent_pred": lst(self._recent_pred),
            "move": lst(self.move_),
            "fixed": self.fixed_,
            "wide": {str(c): [f.tolist(), w.tolist()] for c, (f, w) in self._wide.items()},
        }

    def load_state(self, state: dict[str, Any]) -> None:
        def arr(v: Any) -> np.ndarray | None:
            return None if v is None else np.asarray(v, dtype=float)

        self.spans = tuple(int(s) for s in state["spans"])
        self.smooth, self.ridge = int(state["smooth"]), float(state["ridge"])
        self.holdout = float(state["holdout"])
        self.extrapolation_penalty = float(state["extrapolation_penalty"])
        self.slow_span = int(state["slow_span"])
        self.lag_grid = tuple(int(s) for s in state["lag_grid"])
        self.slow_ridge = float(state["slow_ridge"])
        self.lo_, self.hi_ = arr(state["lo"]), arr(state["hi"])
        self.mean_, self.scale_ = arr(state["mean"]), arr(state["scale"])
        self.coef_, self.sig_ = arr(state["coef"]), arr(state["sig"])
        self.lags_ = [int(s) for s in state["lags"]]
        self.slow_coef_, self.sig_smooth_ = arr(state["slow_coef"]), arr(state["sig_smooth"])
        self.slow_idx_ = [[int(i) for i in idx] for idx in state["slow_idx"]]
        m = len(self.lags_)
        if self.slow_coef_ is not None and self.slow_coef_.shape[1] == 2 * m + 1:
            # saved before the squares: none used, the intercept moves past their columns
            c = self.slow_coef_
            self.slow_coef_ = np.hstack([c[:, :-1], np.zeros((m, m)), c[:, -1:]])
            self.slow_idx_ = [[3 * m if i == 2 * m else i for i in idx] for idx in self.slow_idx_]
        self.slow_cov_ = [np.asarray(c, dtype=float) for c in state["slow_cov"]]
        # saved before the curve's doubt: the bar as it was then
        self.curve_coef_ = arr(state.get("curve_coef"))
        self.curve_weight_ = arr(state.get("curve_weight"))
        self.sig_short_ = arr(state["sig_short"])
        self._ema, self._s = arr(state["ema"]), arr(state["s"])
        self._s_in = arr(state.get("s_in"))  # saved before a second incident was possible
        self._lagged = {int(k): np.asarray(v, dtype=float) for k, v in state["lagged"].items()}
        self._recent = arr(state["recent"])
        self._recent_fast = arr(state["recent_fast"])
        # Saved before expected values' moves were tracked: not checked until a retraining.
        self._recent_pred = arr(state.get("recent_pred"))
        self.move_ = arr(state.get("move"))
        self.fixed_ = [int(j) for j in state.get("fixed", ())]
        self._wide = {
            int(c): (np.asarray(f, dtype=float), np.asarray(w, dtype=float))
            for c, (f, w) in state.get("wide", {}).items()  # saved before: measured anew
        }


@functools.lru_cache(maxsize=32)
def _others(p: int, m: int) -> np.ndarray:
    """Row j: the columns of a fast model's features (``p`` per metric, feature-major)
    that metric j is predicted from, in its coefficients' order: everything but its own.
    Cached (every batch scored asks for it); read only."""
    metric = np.arange(m)
    other = np.nonzero(metric[None, :] != metric[:, None])[1].reshape(m, m - 1)
    out = (np.arange(p)[None, :, None] * m + other[:, None, :]).reshape(m, p * (m - 1))
    out.flags.writeable = False
    return out


def _local(R: np.ndarray, before: np.ndarray | None) -> np.ndarray:
    """Each row minus the mean of the LOCAL_ROWS rows before it: what is left is a sudden
    excursion, not the slow model error that the smoothed residual already watches."""
    head = before if before is not None else R[:0]
    allr = np.vstack([head, R])
    c = np.cumsum(np.vstack([np.zeros(R.shape[1]), allr]), axis=0)
    idx = np.arange(len(head), len(allr))
    if before is None:
        idx = idx[1:]
    starts = np.maximum(idx - LOCAL_ROWS, 0)
    base = (c[idx] - c[starts]) / np.maximum(idx - starts, 1)[:, None]
    return allr[idx] - base


def _ema(X: np.ndarray, span: int, init: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exponential moving average down the rows, starting from ``init``; returns the
    averaged rows and the last one (the state for the next call)."""
    from scipy.signal import lfilter

    a = 2.0 / (span + 1.0)
    if len(X) == 0:
        return X.copy(), np.asarray(init, dtype=float).copy()
    zi = ((1.0 - a) * np.asarray(init, dtype=float))[None, :]
    Y, _ = lfilter([a], [1.0, a - 1.0], X, axis=0, zi=zi)
    return Y, Y[-1].copy()


def _replace_tail(kept: np.ndarray, new: np.ndarray, cols: list[int]) -> None:
    """Overwrite the last rows of ``kept``'s columns ``cols`` with the last of ``new``."""
    k = min(len(kept), len(new))
    if k:
        kept[-k:, cols] = new[-k:]


def _columns(items: list[int], m: int, span: int) -> list[int]:
    """The columns of :func:`_design` that regressor ``items`` use: item k < m is metric
    k's smoothed value (and its lagged copy, with a lag), item m + k its square."""
    lin, sq = _split(items, m)
    lag = [m + k for k in lin] if span else []
    return [*lin, *lag, *(2 * m + k for k in sq)]


def _split(items: list[int], m: int) -> tuple[list[int], list[int]]:
    """Regressor ``items`` as the metrics whose values and whose squares they use."""
    return [k for k in items if k < m], [k - m for k in items if k >= m]


def _design(S: np.ndarray, L: np.ndarray | None) -> np.ndarray:
    """The slow model's design for one lag span: [S, its lagged copy (zeros without a
    lag), S squared, 1]; a metric's coefficients index into its columns (``slow_idx_``).
    The squares let a metric follow a curve of another (a pump's pressure goes with the
    square of its flow, its power with the cube): a straight line's residual spreads with
    the curve it misses, and a 2-sigma shift of a simulated pump's pressure, 4-13 sigma
    there and named on its flow, was 10-23 sigma and named right with them."""
    lag = np.zeros_like(S) if L is None else L
    return np.hstack([S, lag, S**2, np.ones((len(S), 1))])


def _grams(
    S: np.ndarray,
    L: np.ndarray | None,
    burn: int,
    cut: int,
    plain: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cross-products of :func:`_design` over the training rows ``burn:cut`` and the
    held-out rows ``cut:``. ``plain``: those without a lag (``L`` None), whose blocks
    without the lagged copy are the same for every lag span."""
    m = S.shape[1]
    a, b, c = slice(0, m), slice(m, 2 * m), slice(2 * m, 3 * m)  # S, lagged S, squares

    def gram(lo: int, hi: int, known: np.ndarray | None) -> np.ndarray:
        s = S[lo:hi]
        if known is not None:
            G = known.copy()
        else:  # block by block: no copy of the design
            G = np.zeros((3 * m + 1, 3 * m + 1))
            q = s * s
            G[a, a] = s.T @ s
            G[a, -1] = G[-1, a] = s.sum(axis=0)
            G[a, c] = s.T @ q
            G[c, a] = G[a, c].T
            G[c, c] = q.T @ q
            G[c, -1] = G[-1, c] = q.sum(axis=0)
            G[-1, -1] = hi - lo
        if L is not None:
            lag = L[lo:hi]
            G[a, b] = s.T @ lag
            G[b, a] = G[a, b].T
            G[b, b] = lag.T @ lag
            G[b, -1] = G[-1, b] = lag.sum(axis=0)
            G[b, c] = lag.T @ (s * s)
            G[c, b] = G[b, c].T
        return G

    known = plain or (None, None)
    return gram(burn, cut, known[0]), gram(cut, len(S), known[1])


def _ridge(A: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """Ridge regression with an unpenalised intercept (last coefficient)."""
    A1 = np.hstack([A, np.ones((len(A), 1))])
    return np.linalg.solve(A1.T @ A1 + _penalty(len(A1), A1.shape[1], ridge), A1.T @ y)


def _penalty(rows: int, cols: int, ridge: float) -> np.ndarray:
    """The ridge term for ``rows`` rows of ``cols`` columns, the last an intercept."""
    reg = ridge * rows * np.eye(cols)
    reg[-1, -1] = 0.0
    return reg


def _coef_cov(A: np.ndarray, r: np.ndarray, ridge: float, block: int) -> np.ndarray:
    """Covariance of fitted coefficients when the residuals are autocorrelated (a sandwich
    over blocks of ``block`` rows, as in batch means). Twelve hours of training data hold
    only a few load changes, so the gains are uncertain, and a prediction far from the
    training range is uncertain in proportion: that is what this measures."""
    A1 = np.hstack([A, np.ones((len(A), 1))])
    bread = np.linalg.inv(A1.T @ A1 + _penalty(len(A1), A1.shape[1], ridge))
    meat = np.zeros_like(bread)
    for lo in range(0, len(A1) - block + 1, block):
        g = A1[lo : lo + block].T @ r[lo : lo + block]
        meat += np.outer(g, g)
    return bread @ meat @ bread


def _apply(A: np.ndarray, coef: np.ndarray) -> np.ndarray:
    return A @ coef[:-1] + coef[-1]


def _moving_mean(R: np.ndarray, w: int) -> np.ndarray:
    w = max(1, min(w, len(R) // 4))
    c = np.cumsum(np.vstack([np.zeros(R.shape[1]), R]), axis=0)
    return (c[w:] - c[:-w]) / w


def _resolution(X: np.ndarray) -> np.ndarray:
    """Per column: the smallest step between two of its distinct values (0: constant)."""
    out = np.zeros(X.shape[1])
    for j in range(X.shape[1]):
        steps = np.diff(np.unique(X[:, j]))
        if len(steps):
            out[j] = float(steps.min())
    return out


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
