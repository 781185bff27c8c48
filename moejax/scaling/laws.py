"""MoE scaling laws and their fits: Krajewski et al. 2024 and Clark et al. 2022.

Two laws of final loss L (nats/token) against model and data size:

* Krajewski et al. 2024, "Scaling Laws for Fine-Grained Mixture of Experts",
  §4 (the joint law in N, D and granularity G):
      L(N, D, G) = c + (g / G**gamma + a) / N**alpha + b / D**beta
  N: active non-embedding parameters, D: training tokens, G: granularity.
* Clark et al. 2022, "Unified Scaling Laws for Routed Language Models", the
  bilinear law in log N and log E with the saturating expert count Ê (§5):
      log L(N, E) = a log N + b log Ê + c log N log Ê + d
      1 / Ê = 1 / (E - 1 + (1 / E_start - 1 / E_max)**-1) + 1 / E_max
  Ê(1) = E_start (a dense model counts as E_start experts) and Ê -> E_max as
  E -> inf, so the gain from more experts saturates. Logs here are natural and
  N is the raw parameter count, so `d` (and the paper's own coefficient values,
  fitted in its units) are not comparable across conventions; a, b, c are.

Both fits minimise residuals of log L (relative errors, as both papers fit), and
give each coefficient a 95% percentile interval from a bootstrap over points.
Results are plain JSON-serializable dicts:
    {"law", "formula", "coefficients": {name: {"value", "ci95": [lo, hi]}},
     "rmse_log", "num_points", "bootstrap": {"requested", "succeeded"}}
"""

import itertools
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from scipy import optimize

KRAJEWSKI = "krajewski"
CLARK = "clark"
KRAJEWSKI_FORMULA = "L = c + (g / G**gamma + a) / N**alpha + b / D**beta"
CLARK_FORMULA = ("log L = a log N + b log Ê + c log N log Ê + d, "
                 "1/Ê = 1/(E - 1 + (1/E_start - 1/E_max)**-1) + 1/E_max")
KRAJEWSKI_PARAMS = ("c", "g", "gamma", "a", "alpha", "b", "beta")
CLARK_PARAMS = ("a", "b", "c", "d", "e_start", "e_max")
# Default saturation constants: the S-BASE values reported by Clark et al. 2022
# (E_start ~ 1.85, E_max ~ 315), quoted from the paper's fit table (not checked
# against the PDF here). Pass e_start=None / e_max=None to fit them instead.
CLARK_E_START = 1.847
CLARK_E_MAX = 314.6

_EXPONENT_MAX = 3.0
_EXPONENT_GRID = (0.05, 0.1, 0.2, 0.35, 0.5, 0.8)
_GAMMA_GRID = (0.1, 0.3, 0.6, 1.0)


def krajewski_loss(coefficients: Mapping[str, float], n_active, tokens, granularity):
  """Krajewski et al. 2024 §4 law L(N, D, G), elementwise over broadcast arrays.

  Args:
    coefficients: c, g, gamma, a, alpha, b, beta.
    n_active: <float>[...] active non-embedding parameters N.
    tokens: <float>[...] training tokens D.
    granularity: <float>[...] granularity G (1 = standard experts).

  Returns:
    <float>[...] loss in nats/token.
  """
  k = coefficients
  n, d, g = (np.asarray(x, np.float64) for x in (n_active, tokens, granularity))
  return (k["c"] + (k["g"] / g**k["gamma"] + k["a"]) / n**k["alpha"]
          + k["b"] / d**k["beta"])


def clark_e_hat(num_experts, e_start: float = CLARK_E_START, e_max: float = CLARK_E_MAX):
  """Saturating expert count Ê of Clark et al. 2022 (§5); Ê(1) = e_start.

  Args:
    num_experts: <float>[...] expert count E >= 1 (1 = dense).
    e_start: Ê of a dense model; 0 < e_start < e_max.
    e_max: the limit of Ê as E -> inf.

  Returns:
    <float>[...] Ê.
  """
  e = np.asarray(num_experts, np.float64)
  offset = 1.0 / (1.0 / e_start - 1.0 / e_max)
  return 1.0 / (1.0 / (e - 1.0 + offset) + 1.0 / e_max)


def clark_loss(coefficients: Mapping[str, float], n_active, num_experts):
  """Clark et al. 2022 law L(N, E) (natural logs), elementwise.

  Args:
    coefficients: a, b, c, d, e_start, e_max.
    n_active: <float>[...] parameters N (the fit's own convention).
    num_experts: <float>[...] expert count E >= 1.

  Returns:
    <float>[...] loss in nats/token.
  """
  k = coefficients
  log_n = np.log(np.asarray(n_active, np.float64))
  log_e = np.log(clark_e_hat(num_experts, k["e_start"], k["e_max"]))
  return np.exp(k["a"] * log_n + k["b"] * log_e + k["c"] * log_n * log_e + k["d"])


def coefficient_values(fit: Mapping[str, Any]) -> dict[str, float]:
  """{name: value} of a fit dict, the form `krajewski_loss`/`clark_loss` take."""
  return {name: entry["value"] for name, entry in fit["coefficients"].items()}


def _validated(columns: Mapping[str, Any], min_points: int, law: str) -> dict[str, np.ndarray]:
  """Columns as equal-length finite positive float arrays; ValueError otherwise."""
  arrays = {name: np.asarray(values, np.float64).reshape(-1)
            for name, values in columns.items()}
  lengths = {name: a.size for name, a in arrays.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f"{law}: inputs have different lengths {lengths}")
  num_points = next(iter(lengths.values()))
  if num_points < min_points:
    raise ValueError(f"{law}: needs at least {min_points} points to fit, got {num_points}")
  for name, a in arrays.items():
    bad = ~np.isfinite(a) | (a <= 0)
    if bad.any():
      raise ValueError(f"{law}: {name} must be finite and positive; bad values "
                       f"{a[bad][:5].tolist()} at indices {np.flatnonzero(bad)[:5].tolist()}")
  return arrays


def _require_distinct(law: str, **columns: np.ndarray):
  for name, a in columns.items():
    if np.unique(a).size < 2:
      raise ValueError(f"{law}: {name} takes a single value; its exponent cannot be fitted")


def _bootstrap(fit_fn, arrays: Sequence[np.ndarray], point: np.ndarray, bootstrap: int,
               seed: int) -> tuple[list[Optional[list[float]]], int]:
  """Percentile 95% intervals of each parameter, refitting on resampled points."""
  if bootstrap <= 0:
    return [None] * point.size, 0
  rng = np.random.default_rng(seed)
  num_points = arrays[0].size
  samples = []
  for _ in range(bootstrap):
    index = rng.integers(0, num_points, num_points)
    try:
      samples.append(fit_fn([a[index] for a in arrays], point))
    except (ValueError, np.linalg.LinAlgError):
      continue  # a degenerate resample (e.g. one distinct N); skip it
  if not samples:
    return [None] * point.size, 0
  lo, hi = np.percentile(np.stack(samples), [2.5, 97.5], axis=0)
  return [[float(l), float(h)] for l, h in zip(lo, hi)], len(samples)


def _result(law, formula, names, values, intervals, log_residuals, requested, succeeded,
            fixed=(), bounds=None):
  coefficients = {}
  for index, (name, value, ci) in enumerate(zip(names, values, intervals)):
    entry = {"value": float(value), "ci95": ci}
    if name in fixed:
      entry.update(ci95=[float(value), float(value)], fixed=True)
    elif bounds is not None:
      # The optimizer's box; None = unbounded on that side (JSON has no inf).
      entry["bounds"] = [float(b[index]) if np.isfinite(b[index]) else None
                         for b in bounds]
    coefficients[name] = entry
  return {"law": law, "formula": formula, "coefficients": coefficients,
          "rmse_log": float(np.sqrt(np.mean(np.square(log_residuals)))),
          "num_points": int(log_residuals.size),
          "bootstrap": {"requested": int(requested), "succeeded": int(succeeded)}}


# ----------------------------------------------------------------- Krajewski ---


def _krajewski_log_residuals(x, n, d, g, loss):
  pred = krajewski_loss(dict(zip(KRAJEWSKI_PARAMS, x)), n, d, g)
  return np.log(np.maximum(pred, 1e-12)) - np.log(loss)


def _krajewski_bounds(loss):
  # c (irreducible loss) lies below every observed loss; g, a, b >= 0.
  lower = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
  upper = np.array([loss.min(), np.inf, _EXPONENT_MAX, np.inf, _EXPONENT_MAX, np.inf,
                    _EXPONENT_MAX])
  return lower, upper


def _krajewski_refine(x0, n, d, g, loss):
  lower, upper = _krajewski_bounds(loss)
  x0 = np.clip(x0, lower, upper)
  result = optimize.least_squares(_krajewski_log_residuals, x0, bounds=(lower, upper),
                                  args=(n, d, g, loss), x_scale="jac", method="trf",
                                  max_nfev=2000)
  return result.x, float(np.sum(result.fun**2))


def _krajewski_starts(n, d, g, loss, restarts: int) -> list[np.ndarray]:
  """Starts from a grid over the exponents, each with its linear part solved.

  For fixed (alpha, beta, gamma) the law is linear and non-negative in
  (c, g, a, b); NNLS on rows divided by L (relative errors, like the log fit)
  gives those, and the `restarts` best grid points seed the nonlinear fit.
  """
  scored = []
  for alpha, beta, gamma in itertools.product(_EXPONENT_GRID, _EXPONENT_GRID, _GAMMA_GRID):
    design = np.stack([np.ones_like(n), g**-gamma * n**-alpha, n**-alpha, d**-beta], 1)
    linear, residual = optimize.nnls(design / loss[:, None], np.ones_like(loss))
    c, g_coef, a, b = linear
    scored.append((residual, np.array([c, g_coef, gamma, a, alpha, b, beta])))
  scored.sort(key=lambda item: item[0])
  return [x for _, x in scored[:restarts]]


def fit_krajewski(n_active, tokens, granularity, loss, *, bootstrap: int = 200,
                  seed: int = 0, restarts: int = 8) -> dict[str, Any]:
  """Fits Krajewski et al. 2024 L(N, D, G) by least squares on log L.

  The law is non-convex in its exponents, so the fit starts from the `restarts`
  best points of an exponent grid (see `_krajewski_starts`) and keeps the best
  trust-region fit; bootstrap refits start from that optimum.

  Args:
    n_active: <float>[P] active non-embedding parameters N of P runs.
    tokens: <float>[P] training tokens D.
    granularity: <float>[P] granularity G.
    loss: <float>[P] final loss (nats/token).
    bootstrap: resamples for the 95% intervals (0: intervals are None).
    seed: seed of the bootstrap resampling.
    restarts: nonlinear fits started from the grid.

  Returns:
    The fit dict (module docstring) with coefficients c, g, gamma, a, alpha, b, beta.

  Raises:
    ValueError: fewer than 8 points, non-positive or non-finite inputs, or a
      single distinct value of N, D or G.
  """
  arrays = _validated({"n_active": n_active, "tokens": tokens, "granularity": granularity,
                       "loss": loss}, len(KRAJEWSKI_PARAMS) + 1, KRAJEWSKI)
  n, d, g, l = arrays.values()
  _require_distinct(KRAJEWSKI, n_active=n, tokens=d, granularity=g)
  fits = [_krajewski_refine(x0, n, d, g, l) for x0 in _krajewski_starts(n, d, g, l, restarts)]
  best = min(fits, key=lambda fit: fit[1])[0]

  def refit(sample, x0):
    return _krajewski_refine(x0, *sample)[0]

  intervals, succeeded = _bootstrap(refit, [n, d, g, l], best, bootstrap, seed)
  return _result(KRAJEWSKI, KRAJEWSKI_FORMULA, KRAJEWSKI_PARAMS, best, intervals,
                 _krajewski_log_residuals(best, n, d, g, l), bootstrap, succeeded,
                 bounds=_krajewski_bounds(l))


# --------------------------------------------------------------------- Clark ---


def _clark_linear(n, e, loss, e_start, e_max):
  """Ordinary least squares of log L on [log N, log Ê, log N log Ê, 1]."""
  log_n, log_e = np.log(n), np.log(clark_e_hat(e, e_start, e_max))
  design = np.stack([log_n, log_e, log_n * log_e, np.ones_like(log_n)], 1)
  if np.linalg.matrix_rank(design) < design.shape[1]:
    raise ValueError(f"{CLARK}: design matrix is rank deficient (too few distinct N or E)")
  coef, *_ = np.linalg.lstsq(design, np.log(loss), rcond=None)
  return coef, design @ coef - np.log(loss)


def _clark_fit(n, e, loss, e_start, e_max, x0=None):
  """All six parameters; E_start/E_max fitted (variable projection) where None."""
  free = [e_start is None, e_max is None]
  if not any(free):
    return np.concatenate([_clark_linear(n, e, loss, e_start, e_max)[0], [e_start, e_max]])

  # Free saturation constants in log space: log E_start and log(E_max - E_start),
  # which keeps 0 < E_start < E_max; the linear part is solved exactly inside.
  def unpack(z):
    z = iter(z)
    start = np.exp(next(z)) if free[0] else e_start
    top = start + np.exp(next(z)) if free[1] else e_max
    return start, top

  def residuals(z):
    return _clark_linear(n, e, loss, *unpack(z))[1]

  if x0 is not None:
    starts = [(x0[4], x0[5])]
  elif free[1]:
    start = CLARK_E_START if free[0] else e_start
    starts = [(start, start + top) for top in (16.0, 64.0, CLARK_E_MAX, 2e3)]
  else:
    starts = [(min(CLARK_E_START, e_max / 2), e_max)]
  # log E_start < log E_max where E_max is fixed; log(E_max - E_start) < 14.
  start_upper = 10.0 if free[1] else np.log(e_max) - 1e-6
  lower = np.array([-5.0] * free[0] + [-5.0] * free[1])
  upper = np.array([start_upper] * free[0] + [14.0] * free[1])
  best = None
  for start, top in starts:
    z0 = [np.log(start)] * free[0] + [np.log(max(top - start, 1e-3))] * free[1]
    bounds = (lower, upper)
    result = optimize.least_squares(residuals, np.clip(z0, *bounds), bounds=bounds)
    if best is None or result.cost < best.cost:
      best = result
  start, top = unpack(best.x)
  return np.concatenate([_clark_linear(n, e, loss, start, top)[0], [start, top]])


def fit_clark(n_active, num_experts, loss, *, e_start: Optional[float] = CLARK_E_START,
              e_max: Optional[float] = CLARK_E_MAX, bootstrap: int = 200,
              seed: int = 0) -> dict[str, Any]:
  """Fits Clark et al. 2022 log L(N, E) by least squares on log L.

  With E_start and E_max fixed (the default, at the paper's S-BASE values) the
  law is linear in (a, b, c, d); either set to None is fitted too, by nonlinear
  least squares over it with the linear part solved exactly. A fitted E_max is
  capped at E_start + e**14 (~1.2e6): an interval reaching the cap means the
  expert counts in the data do not reach saturation, so E_max is not identified.

  Args:
    n_active: <float>[P] parameters N of P runs.
    num_experts: <float>[P] expert counts E >= 1 (1 = dense).
    loss: <float>[P] final loss (nats/token).
    e_start: fixed E_start, or None to fit it.
    e_max: fixed E_max, or None to fit it.
    bootstrap: resamples for the 95% intervals (0: intervals are None).
    seed: seed of the bootstrap resampling.

  Returns:
    The fit dict (module docstring) with coefficients a, b, c, d, e_start, e_max;
    the fixed ones carry "fixed": True and a zero-width interval.

  Raises:
    ValueError: too few points, non-positive inputs, E < 1, e_max <= e_start,
      or a single distinct value of N or E.
  """
  num_free = 4 + (e_start is None) + (e_max is None)
  arrays = _validated({"n_active": n_active, "num_experts": num_experts, "loss": loss},
                      num_free + 1, CLARK)
  n, e, l = arrays.values()
  if (e < 1).any():
    raise ValueError(f"{CLARK}: num_experts must be >= 1 (1 = dense), got {e.min()}")
  if e_start is not None and e_max is not None and not 0 < e_start < e_max:
    raise ValueError(f"{CLARK}: need 0 < e_start < e_max, got {e_start}, {e_max}")
  _require_distinct(CLARK, n_active=n, num_experts=e)
  best = _clark_fit(n, e, l, e_start, e_max)

  def refit(sample, x0):
    return _clark_fit(*sample, e_start, e_max, x0=x0)

  intervals, succeeded = _bootstrap(refit, [n, e, l], best, bootstrap, seed)
  coefficients = dict(zip(CLARK_PARAMS, best))
  residuals = np.log(clark_loss(coefficients, n, e)) - np.log(l)
  fixed = [name for name, value in (("e_start", e_start), ("e_max", e_max)) if value is not None]
  # The optimizer's box (see _clark_fit): log E_start in [-5, 10] (or below
  # log E_max) and log(E_max - E_start) in [-5, 14].
  start_upper = np.exp(10.0) if e_max is None else e_max
  lower = [-np.inf] * 4 + [np.exp(-5.0), best[4] + np.exp(-5.0)]
  upper = [np.inf] * 4 + [start_upper, best[4] + np.exp(14.0)]
  return _result(CLARK, CLARK_FORMULA, CLARK_PARAMS, best, intervals, residuals, bootstrap,
                 succeeded, fixed=fixed, bounds=(lower, upper))


# ----------------------------------------------------------------- diagnosis ---

# An interval whose ends differ by this factor or more "spans orders of magnitude".
WIDE_INTERVAL_RATIO = 100.0


def diagnose(fit: Mapping[str, Any], entropy_floor: Optional[float] = None
             ) -> list[dict[str, str]]:
  """What a reader of a fit should not trust, as [{kind, coefficient, message}].

  kinds:
    at_bound             a fitted coefficient sits on a bound of the optimizer
                         (exponents are capped at 3, c at the smallest loss,
                         the rest at 0): the data do not pin it down;
    wide_interval        its 95% bootstrap interval spans orders of magnitude
                         (ends differ by WIDE_INTERVAL_RATIO or more, or one
                         end is 0);
    sign_undetermined    a signed coefficient's interval contains 0 (Clark);
    below_entropy_floor  Krajewski's irreducible loss c is below the entropy
                         of the data, which no model can beat;
    no_interval          no bootstrap resample could be refitted.
  """
  found = []

  def add(kind, name, message):
    found.append({"kind": kind, "coefficient": name, "message": message})

  for name, entry in fit["coefficients"].items():
    if entry.get("fixed"):
      continue
    value = entry["value"]
    for side, bound in zip(("lower", "upper"), entry.get("bounds") or ()):
      if bound is not None and abs(value - bound) <= 1e-6 * max(1.0, abs(bound)):
        add("at_bound", name, f"{name} = {value:.3g} sits at its {side} bound {bound:.3g}: "
            f"the data do not determine it")
    ci = entry.get("ci95")
    if ci is None:
      add("no_interval", name, f"{name} has no bootstrap interval")
      continue
    lo, hi = ci
    if lo < 0 < hi:
      add("sign_undetermined", name, f"{name}'s 95% interval [{lo:.3g}, {hi:.3g}] contains "
          f"0: not even its sign is determined")
    elif min(abs(lo), abs(hi)) == 0 or max(abs(lo), abs(hi)) / min(abs(lo), abs(hi)) >= \
        WIDE_INTERVAL_RATIO:
      ratio = (np.inf if min(abs(lo), abs(hi)) == 0
               else max(abs(lo), abs(hi)) / min(abs(lo), abs(hi)))
      span = "unbounded" if not np.isfinite(ratio) else f"{np.log10(ratio):.0f}"
      add("wide_interval", name, f"{name}'s 95% interval [{lo:.3g}, {hi:.3g}] spans {span} "
          f"orders of magnitude")
  irreducible = {KRAJEWSKI: "c", GRANULARITY_TERM: "l_inf"}.get(fit["law"])
  if (entropy_floor is not None and irreducible is not None
      and fit["coefficients"][irreducible]["value"] < entropy_floor):
    add("below_entropy_floor", irreducible, f"irreducible loss {irreducible} = "
        f"{fit['coefficients'][irreducible]['value']:.3g} is below the data's entropy floor "
        f"{entropy_floor:.3g} nats, which no model can beat: it is not identified")
  if (fit["bootstrap"]["requested"] and
      fit["bootstrap"]["succeeded"] < 0.5 * fit["bootstrap"]["requested"]):
    add("no_interval", "", f"only {fit['bootstrap']['succeeded']} of "
        f"{fit['bootstrap']['requested']} bootstrap refits succeeded")
  return found


# ------------------------------------------------- one-axis granularity term ---

GRANULARITY_TERM = "granularity_term"
GRANULARITY_TERM_FORMULA = "L = l_inf + g / G**gamma  (fixed N and D)"
GRANULARITY_TERM_PARAMS = ("l_inf", "g", "gamma")


def granularity_term_loss(coefficients: Mapping[str, float], granularity):
  """l_inf + g / G**gamma: Krajewski et al. 2024's law at one N and D, where
  (g / G**gamma + a) / N**alpha + b / D**beta + c collapses to this form."""
  k = coefficients
  return k["l_inf"] + k["g"] / np.asarray(granularity, np.float64)**k["gamma"]


def _granularity_bounds(loss):
  return np.array([0.0, 0.0, 0.0]), np.array([loss.min(), np.inf, _EXPONENT_MAX])


def _granularity_fit(g, loss, x0=None):
  lower, upper = _granularity_bounds(loss)

  def residuals(x):
    pred = granularity_term_loss(dict(zip(GRANULARITY_TERM_PARAMS, x)), g)
    return np.log(np.maximum(pred, 1e-12)) - np.log(loss)

  starts = [x0] if x0 is not None else [
      np.array([loss.min() * f, (loss.max() - loss.min() * f) + 1e-3, gamma])
      for f in (0.5, 0.9) for gamma in (0.3, 1.0)]
  best = None
  for start in starts:
    result = optimize.least_squares(residuals, np.clip(start, lower, upper),
                                    bounds=(lower, upper), method="trf")
    if best is None or result.cost < best.cost:
      best = result
  return best.x, residuals(best.x)


def fit_granularity_term(granularity, loss, *, bootstrap: int = 200, seed: int = 0
                         ) -> dict[str, Any]:
  """Fits L(G) = l_inf + g / G**gamma on log L (runs at one model size and budget).

  Returns the fit dict of this module (law "granularity_term"); `diagnose` applies.
  Raises ValueError for fewer than 4 points or fewer than 3 distinct G.
  """
  arrays = _validated({"granularity": granularity, "loss": loss}, 4, GRANULARITY_TERM)
  g, l = arrays.values()
  if np.unique(g).size < 3:
    raise ValueError(f"{GRANULARITY_TERM}: needs at least 3 distinct granularities to fit "
                     f"3 coefficients, got {np.unique(g).tolist()}")
  best, residuals = _granularity_fit(g, l)

  def refit(sample, x0):
    if np.unique(sample[0]).size < 3:
      raise ValueError("degenerate resample")
    return _granularity_fit(*sample, x0=x0)[0]

  intervals, succeeded = _bootstrap(refit, [g, l], best, bootstrap, seed)
  return _result(GRANULARITY_TERM, GRANULARITY_TERM_FORMULA, GRANULARITY_TERM_PARAMS, best,
                 intervals, residuals, bootstrap, succeeded, bounds=_granularity_bounds(l))
