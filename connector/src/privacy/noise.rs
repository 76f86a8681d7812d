//! Differential-privacy noise for Sluice, built only on OpenDP measurements.
//!
//! Every random draw in this module comes from an OpenDP measurement (discrete
//! Laplace, discrete Gaussian, their thresholded variants, and the private
//! quantile). Every privacy cost we report is read back from that measurement's
//! own privacy map, never computed by hand, so the numbers a caller logs are the
//! numbers OpenDP can vouch for.
//!
//! # Accounting
//!
//! Inputs are integer statistics in fixed-point units (a count, or a sum scaled
//! to an integer). The caller describes how much one *privacy unit* (a person,
//! an account, ...) can move them:
//!
//! * `sensitivity`: the most one unit can change a single group's statistic.
//! * `max_groups`: the most groups one unit can appear in.
//!
//! From these two numbers:
//!
//! * **Laplace (pure ε-DP).** The L1 distance between neighbouring outputs is at
//!   most `L1 = max_groups * sensitivity`. Discrete Laplace noise with scale
//!   `L1 / ε` costs exactly ε ([`laplace_epsilon`]).
//! * **Gaussian (zCDP, reported as (ε, δ)).** The L2 distance is at most
//!   `L2 = sqrt(max_groups) * sensitivity` (rounded *up* in floating point so it
//!   is never understated). Discrete Gaussian noise with scale σ costs
//!   `ρ = L2² / (2σ²)` in zero-concentrated DP ([`gaussian_rho`]); OpenDP's
//!   zCDP → approximate-DP conversion, fixed at the caller's δ, turns that into an
//!   ε ([`gaussian_epsilon`]). We search for the smallest σ whose ε fits.
//! * **Partition selection.** Keys themselves are private, so a key is only
//!   released when its noisy count clears a threshold. The input distance is
//!   the triple `(L0, Lp, L∞) = (max_groups, L1 or L2, sensitivity)`. The noise
//!   accounts for ε exactly as above; the threshold accounts for δ (the chance
//!   that a key held by one unit alone survives). For Gaussian noise δ is split
//!   in half between the threshold and the zCDP → (ε, δ) conversion.
//! * **Quantiles.** One unit adds or removes at most `max_rows` values of a
//!   group, which is the symmetric distance handed to OpenDP's exponential
//!   mechanism over the declared candidates. The caller divides ε across
//!   groups before calling.
//!
//! OpenDP rounds privacy maps conservatively (up), so a scale computed in
//! closed form can be charged a hair more than the requested ε; every scale is
//! therefore checked against the map and nudged up until the charge fits.
//!
//! OpenDP measurements are not `Send`; everything here is synchronous and
//! builds its measurements on the calling thread.

use std::collections::HashMap;

use opendp::{
    accuracy::{
        discrete_gaussian_scale_to_accuracy, discrete_laplacian_scale_to_accuracy,
        gaussian_scale_to_accuracy,
    },
    combinators::{make_fix_delta, make_zCDP_to_approxDP},
    core::Measurement,
    domains::{AtomDomain, MapDomain, VectorDomain},
    measurements::{
        make_gaussian, make_gaussian_threshold, make_laplace, make_laplace_threshold,
        make_private_quantile,
    },
    measures::{Approximate, MaxDivergence, ZeroConcentratedDivergence},
    metrics::{
        AbsoluteDistance, L1Distance, L01InfDistance, L2Distance, L02InfDistance, SymmetricDistance,
    },
    traits::{InfMul, InfSqrt},
};

/// Which noise distribution to add.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoiseFamily {
    /// Discrete Laplace: pure ε-DP, heavier tails.
    Laplace,
    /// Discrete Gaussian: zCDP converted to (ε, δ), lighter tails; needs δ > 0.
    Gaussian,
}

/// What one noisy release cost and how noisy it is.
#[derive(Debug, Clone, PartialEq)]
pub struct ReleaseInfo {
    /// Mechanism name: `discrete_laplace`, `discrete_gaussian`,
    /// `laplace_threshold`, `gaussian_threshold` or `private_quantile`.
    pub mechanism: &'static str,
    /// Noise scale in the integer units of the input (for the quantile: in
    /// rank units, i.e. the scale of the exponential mechanism per row).
    pub scale: f64,
    /// ε actually charged by OpenDP's privacy map (never above the request).
    pub epsilon: f64,
    /// δ actually charged: 0 for plain Laplace noise, the map's δ for the
    /// Laplace threshold, and the requested δ for Gaussian mechanisms (OpenDP
    /// fixes δ there and reports the ε that goes with it).
    pub delta: f64,
    /// Half-width `a` with `P(|noise| < a) >= 95%`, from `opendp::accuracy`;
    /// 0 where it does not apply (quantiles).
    pub ci95_half_width: f64,
    /// Partition selection only: a key is kept when its noisy count is `>=` this.
    pub threshold: Option<i64>,
}

/// Why a release was refused. Messages never contain data values or keys.
#[derive(Debug, thiserror::Error)]
pub enum NoiseError {
    /// ε must be a finite number greater than zero.
    #[error("invalid epsilon {0}: must be finite and greater than 0")]
    InvalidEpsilon(f64),
    /// δ out of range for the chosen mechanism.
    #[error("invalid delta {delta}: {reason}")]
    InvalidDelta {
        /// The rejected δ.
        delta: f64,
        /// What the mechanism needs instead.
        reason: &'static str,
    },
    /// Any other bad argument (bounds, alpha, candidates, overflow).
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    /// No noise scale or threshold met the budget within the search range.
    #[error("could not calibrate {0}")]
    Calibration(String),
    /// OpenDP refused to build, map or run a measurement.
    #[error("OpenDP error: {0}")]
    OpenDp(String),
}

impl From<opendp::error::Error> for NoiseError {
    fn from(e: opendp::error::Error) -> Self {
        // OpenDP's Display only shows the variant; the message holds the detail.
        let detail = e.message.as_deref().unwrap_or("no detail");
        NoiseError::OpenDp(format!("{}: {}", e.variant, detail))
    }
}

type Result<T> = std::result::Result<T, NoiseError>;

/// Integer statistics vector, the input domain for plain noise.
type IntVec = VectorDomain<AtomDomain<i64>>;
/// Key → count map, the input domain for partition selection.
type CountMap = MapDomain<AtomDomain<String>, AtomDomain<i64>>;
/// Discrete Laplace over integer vectors, pure ε-DP.
type LaplaceVec = Measurement<IntVec, L1Distance<i64>, MaxDivergence, Vec<i64>>;
/// Discrete Gaussian over integer vectors, ρ-zCDP.
type GaussianVec = Measurement<IntVec, L2Distance<f64>, ZeroConcentratedDivergence, Vec<i64>>;
/// Discrete Gaussian over integers, already converted to (ε, δ) at a fixed δ.
type FixedGaussian = Measurement<IntVec, L2Distance<f64>, Approximate<MaxDivergence>, Vec<i64>>;
/// Thresholded discrete Laplace over key → count maps, (ε, δ)-DP.
type LaplaceThreshold = Measurement<
    CountMap,
    L01InfDistance<AbsoluteDistance<i64>>,
    Approximate<MaxDivergence>,
    HashMap<String, i64>,
>;
/// Thresholded discrete Gaussian over key → count maps, (ρ, δ)-approximate zCDP.
type GaussianThreshold = Measurement<
    CountMap,
    L02InfDistance<AbsoluteDistance<f64>>,
    Approximate<ZeroConcentratedDivergence>,
    HashMap<String, i64>,
>;
/// Private quantile over f64 values at symmetric distance, pure ε-DP.
type Quantile = Measurement<VectorDomain<AtomDomain<f64>>, SymmetricDistance, MaxDivergence, f64>;
/// The d_in of the thresholded mechanisms: (L0, Lp, L∞).
type LaplaceThresholdDin = (u32, i64, i64);
/// As above with an L2 distance, which is usually irrational.
type GaussianThresholdDin = (u32, f64, f64);

/// Confidence level of [`ReleaseInfo::ci95_half_width`].
const CI_ALPHA: f64 = 0.05;
/// Above this σ the exact discrete-Gaussian accuracy (a sum over ~40σ terms)
/// is slow and can overflow OpenDP's `i32` loop counter; the continuous
/// Gaussian accuracy agrees with it to well under one unit there.
const EXACT_DG_ACCURACY_MAX_SCALE: f64 = 1_000.0;
/// Relative precision of the scale search; far finer than anyone reports ε.
const SCALE_REL_TOL: f64 = 1e-10;
/// Cap on doubling/halving steps while bracketing a scale or threshold.
const MAX_BRACKET_STEPS: usize = 256;
/// Cap on interpolation steps once a scale is bracketed.
const MAX_REFINE_STEPS: usize = 200;
/// How many one-ulp nudges a closed-form Laplace scale may need.
const MAX_ULP_NUDGES: usize = 16;

// ---------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------

/// Adds noise to a vector of per-group integer statistics (fixed-point units).
///
/// Adding or removing one privacy unit changes at most `max_groups` entries,
/// each by at most `sensitivity`. Laplace adds discrete Laplace noise with
/// scale `max_groups * sensitivity / ε`; Gaussian adds discrete Gaussian noise
/// with the smallest σ whose zCDP cost converts to at most ε at `delta`
/// (`delta` must be in (0, 1) for Gaussian; Laplace spends no δ but still
/// rejects one outside [0, 1), since that signals a caller bug).
/// Outputs saturate at the `i64` range.
pub fn release_integers(
    values: &[i64],
    sensitivity: u64,
    max_groups: u64,
    family: NoiseFamily,
    epsilon: f64,
    delta: f64,
) -> Result<(Vec<i64>, ReleaseInfo)> {
    check_epsilon(epsilon)?;
    check_contribution_bounds(sensitivity, max_groups)?;
    match family {
        NoiseFamily::Laplace => {
            check_delta(delta, false)?;
            let l1 = l1_sensitivity(sensitivity, max_groups)?;
            release_laplace(values, l1, epsilon)
        }
        NoiseFamily::Gaussian => {
            check_delta(delta, true)?;
            let l2 = l2_sensitivity(sensitivity, max_groups)?;
            release_gaussian(values, l2, epsilon, delta)
        }
    }
}

/// Private partition selection over per-key row counts.
///
/// Each unit contributes to at most `max_groups` keys and at most
/// `sensitivity` to each. Adds discrete Laplace (or Gaussian) noise to every
/// count and keeps only keys whose noisy count reaches the threshold, which
/// is the smallest one whose privacy map fits `(epsilon, delta)`. Returns the
/// kept keys, in input order, with their noisy counts; the threshold is in
/// [`ReleaseInfo::threshold`]. Duplicate keys are rejected.
pub fn select_partitions(
    counts: Vec<(String, i64)>,
    sensitivity: u64,
    max_groups: u64,
    family: NoiseFamily,
    epsilon: f64,
    delta: f64,
) -> Result<(Vec<(String, i64)>, ReleaseInfo)> {
    check_epsilon(epsilon)?;
    check_delta(delta, true)?;
    check_contribution_bounds(sensitivity, max_groups)?;
    let l0 = u32::try_from(max_groups)
        .map_err(|_| invalid(format!("max_groups {max_groups} exceeds u32::MAX")))?;
    let linf = i64::try_from(sensitivity)
        .map_err(|_| invalid(format!("sensitivity {sensitivity} exceeds i64::MAX")))?;
    let input = count_map(&counts)?;
    let (noisy, info) = match family {
        NoiseFamily::Laplace => {
            let l1 = l1_sensitivity(sensitivity, max_groups)?;
            laplace_threshold_release(&input, (l0, l1, linf), epsilon, delta)?
        }
        NoiseFamily::Gaussian => {
            let l2 = l2_sensitivity(sensitivity, max_groups)?;
            gaussian_threshold_release(&input, (l0, l2, linf as f64), epsilon, delta)?
        }
    };
    // Keep the caller's order; HashMap order is arbitrary.
    let kept = counts
        .into_iter()
        .filter_map(|(k, _)| noisy.get(&k).map(|&v| (k, v)))
        .collect();
    Ok((kept, info))
}

/// Private `alpha`-quantile of one group's values over declared candidates.
///
/// `max_rows` is how many values one unit can add or remove in this group
/// (the symmetric-distance d_in); `epsilon` is this group's share, already
/// divided by the caller. NaN values are dropped (a per-row filter, so it
/// cannot increase the distance and leaks nothing through an error).
/// Candidates must be non-empty and free of NaN; they are sorted and
/// de-duplicated. The result is always one of the candidates.
pub fn release_quantile(
    values: Vec<f64>,
    candidates: &[f64],
    alpha: f64,
    max_rows: u64,
    epsilon: f64,
) -> Result<(f64, ReleaseInfo)> {
    check_epsilon(epsilon)?;
    if !(0.0..=1.0).contains(&alpha) {
        return Err(invalid(format!("alpha {alpha} must be within [0, 1]")));
    }
    let candidates = clean_candidates(candidates)?;
    let d_in = u32::try_from(max_rows)
        .ok()
        .filter(|&d| d > 0)
        .ok_or_else(|| invalid(format!("max_rows {max_rows} must be in 1..=u32::MAX")))?;
    // The exponential mechanism's ε is about 2 * d_in * max(α, 1-α) / scale;
    // the search below only uses this as a starting point.
    let guess = 2.0 * f64::from(d_in) * alpha.max(1.0 - alpha) / epsilon;
    let scale = calibrate_scale(guess, epsilon, |s| {
        Ok(quantile_measurement(&candidates, alpha, s)?.map(&d_in)?)
    })?;
    let meas = quantile_measurement(&candidates, alpha, scale)?;
    let spent = meas.map(&d_in)?;
    check_spent(spent, epsilon, 0.0, 0.0)?;
    let finite: Vec<f64> = values.into_iter().filter(|v| !v.is_nan()).collect();
    let out = meas.invoke(&finite)?;
    let info = ReleaseInfo {
        mechanism: "private_quantile",
        scale,
        epsilon: spent,
        delta: 0.0,
        ci95_half_width: 0.0,
        threshold: None,
    };
    Ok((out, info))
}

/// ε that OpenDP charges for discrete Laplace noise of `scale` on integer
/// vectors at L1 distance `d_in_l1` (OpenDP: `d_in / scale`, rounded up).
pub fn laplace_epsilon(scale: f64, d_in_l1: i64) -> Result<f64> {
    Ok(laplace_measurement(scale)?.map(&d_in_l1)?)
}

/// ρ (zCDP) that OpenDP charges for discrete Gaussian noise of `scale` on
/// integer vectors at L2 distance `d_in_l2` (OpenDP: `d_in² / (2σ²)`).
/// The L2 distance is an `f64` because it is usually an irrational
/// `sqrt(max_groups) * sensitivity`.
pub fn gaussian_rho(scale: f64, d_in_l2: f64) -> Result<f64> {
    Ok(gaussian_zcdp_measurement(scale)?.map(&d_in_l2)?)
}

/// ε that OpenDP charges for discrete Gaussian noise of `scale` at L2 distance
/// `d_in_l2` once its zCDP cost is converted to (ε, `delta`)-DP.
pub fn gaussian_epsilon(scale: f64, d_in_l2: f64, delta: f64) -> Result<f64> {
    Ok(gaussian_fixed_measurement(scale, delta)?.map(&d_in_l2)?.0)
}

// ---------------------------------------------------------------------------
// Plain noise
// ---------------------------------------------------------------------------

fn release_laplace(values: &[i64], l1: i64, epsilon: f64) -> Result<(Vec<i64>, ReleaseInfo)> {
    let scale = fit_laplace_scale(l1, epsilon)?;
    let meas = laplace_measurement(scale)?;
    let spent = meas.map(&l1)?;
    check_spent(spent, epsilon, 0.0, 0.0)?;
    let noisy = meas.invoke(&values.to_vec())?;
    let info = ReleaseInfo {
        mechanism: "discrete_laplace",
        scale,
        epsilon: spent,
        delta: 0.0,
        ci95_half_width: laplace_ci95(scale)?,
        threshold: None,
    };
    Ok((noisy, info))
}

fn release_gaussian(
    values: &[i64],
    l2: f64,
    epsilon: f64,
    delta: f64,
) -> Result<(Vec<i64>, ReleaseInfo)> {
    let scale = fit_gaussian_scale(l2, epsilon, delta)?;
    let meas = gaussian_fixed_measurement(scale, delta)?;
    let (spent_eps, spent_delta) = meas.map(&l2)?;
    check_spent(spent_eps, epsilon, spent_delta, delta)?;
    let noisy = meas.invoke(&values.to_vec())?;
    let info = ReleaseInfo {
        mechanism: "discrete_gaussian",
        scale,
        epsilon: spent_eps,
        delta: spent_delta,
        ci95_half_width: gaussian_ci95(scale)?,
        threshold: None,
    };
    Ok((noisy, info))
}

fn laplace_measurement(scale: f64) -> Result<LaplaceVec> {
    Ok(make_laplace(
        VectorDomain::new(AtomDomain::<i64>::default()),
        L1Distance::<i64>::default(),
        scale,
        None,
    )?)
}

fn gaussian_zcdp_measurement(scale: f64) -> Result<GaussianVec> {
    Ok(make_gaussian(
        VectorDomain::new(AtomDomain::<i64>::default()),
        L2Distance::<f64>::default(),
        scale,
        None,
    )?)
}

/// Discrete Gaussian chained through OpenDP's zCDP → (ε, δ) conversion with δ
/// fixed, so its map returns a plain `(ε, δ)` pair.
fn gaussian_fixed_measurement(scale: f64, delta: f64) -> Result<FixedGaussian> {
    let approx = make_zCDP_to_approxDP(gaussian_zcdp_measurement(scale)?)?;
    Ok(make_fix_delta(&approx, delta)?)
}

/// `l1 / ε`, nudged up by ulps if OpenDP's rounded-up map charges more than ε.
fn fit_laplace_scale(l1: i64, epsilon: f64) -> Result<f64> {
    let mut scale = l1 as f64 / epsilon;
    for _ in 0..MAX_ULP_NUDGES {
        if laplace_epsilon(scale, l1)? <= epsilon {
            return Ok(scale);
        }
        scale = scale.next_up();
    }
    // Only reachable if the closed form is badly off; fall back to search.
    calibrate_scale(scale, epsilon, |s| laplace_epsilon(s, l1))
}

/// Smallest σ (to [`SCALE_REL_TOL`]) whose converted ε at `delta` fits.
fn fit_gaussian_scale(l2: f64, epsilon: f64, delta: f64) -> Result<f64> {
    calibrate_scale(classic_gaussian_guess(l2, epsilon, delta), epsilon, |s| {
        gaussian_epsilon(s, l2, delta)
    })
}

/// σ from the textbook bound `ε = ρ + 2·sqrt(ρ·ln(1/δ))`. OpenDP's conversion
/// is tighter, so this σ is feasible and the search only has to shrink it.
fn classic_gaussian_guess(l2: f64, epsilon: f64, delta: f64) -> f64 {
    let ln_inv_delta = -delta.ln();
    let sqrt_rho = (ln_inv_delta + epsilon).sqrt() - ln_inv_delta.sqrt();
    l2 / (2.0_f64.sqrt() * sqrt_rho)
}

// ---------------------------------------------------------------------------
// Partition selection
// ---------------------------------------------------------------------------

fn laplace_threshold_release(
    input: &HashMap<String, i64>,
    d_in: LaplaceThresholdDin,
    epsilon: f64,
    delta: f64,
) -> Result<(HashMap<String, i64>, ReleaseInfo)> {
    let (_, l1, linf) = d_in;
    // The threshold map charges the plain Laplace ε on min(L1, L0·L∞) = L1.
    let scale = fit_laplace_scale(l1, epsilon)?;
    let threshold = smallest_threshold(linf, |t| {
        Ok(laplace_threshold_measurement(scale, t)?.map(&d_in)?.1 <= delta)
    })?;
    let meas = laplace_threshold_measurement(scale, threshold)?;
    let (spent_eps, spent_delta) = meas.map(&d_in)?;
    check_spent(spent_eps, epsilon, spent_delta, delta)?;
    let info = ReleaseInfo {
        mechanism: "laplace_threshold",
        scale,
        epsilon: spent_eps,
        delta: spent_delta,
        ci95_half_width: laplace_ci95(scale)?,
        threshold: Some(threshold),
    };
    Ok((meas.invoke(input)?, info))
}

/// Gaussian partition selection. δ is split in half: one half pays for the
/// zCDP → (ε, δ) conversion of the noise, the other for the threshold.
fn gaussian_threshold_release(
    input: &HashMap<String, i64>,
    d_in: GaussianThresholdDin,
    epsilon: f64,
    delta: f64,
) -> Result<(HashMap<String, i64>, ReleaseInfo)> {
    let (_, l2, linf) = d_in;
    let half_delta = delta / 2.0;
    let scale = fit_gaussian_scale(l2, epsilon, half_delta)?;
    let threshold = smallest_threshold(linf as i64, |t| {
        Ok(gaussian_threshold_zcdp(scale, t)?.map(&d_in)?.1 <= half_delta)
    })?;
    // Final (ε, δ) straight from OpenDP: the conversion gets δ minus the
    // threshold's share, which is at least δ/2, so ε cannot exceed the target.
    let approx = make_zCDP_to_approxDP(gaussian_threshold_zcdp(scale, threshold)?)?;
    let meas = make_fix_delta(&approx, delta)?;
    let (spent_eps, spent_delta) = meas.map(&d_in)?;
    check_spent(spent_eps, epsilon, spent_delta, delta)?;
    let info = ReleaseInfo {
        mechanism: "gaussian_threshold",
        scale,
        epsilon: spent_eps,
        delta: spent_delta,
        ci95_half_width: gaussian_ci95(scale)?,
        threshold: Some(threshold),
    };
    Ok((meas.invoke(input)?, info))
}

fn laplace_threshold_measurement(scale: f64, threshold: i64) -> Result<LaplaceThreshold> {
    Ok(make_laplace_threshold(
        count_map_domain(),
        L01InfDistance::<AbsoluteDistance<i64>>::default(),
        scale,
        threshold,
        None,
    )?)
}

fn gaussian_threshold_zcdp(scale: f64, threshold: i64) -> Result<GaussianThreshold> {
    Ok(make_gaussian_threshold(
        count_map_domain(),
        L02InfDistance::<AbsoluteDistance<f64>>::default(),
        scale,
        threshold,
        None,
    )?)
}

fn count_map_domain() -> CountMap {
    MapDomain::new(
        AtomDomain::<String>::default(),
        AtomDomain::<i64>::default(),
    )
}

/// Builds the key → count map, refusing duplicates (a caller bug that would
/// otherwise silently drop a count). The key is not echoed: it is data.
fn count_map(counts: &[(String, i64)]) -> Result<HashMap<String, i64>> {
    let mut map = HashMap::with_capacity(counts.len());
    for (k, v) in counts {
        if map.insert(k.clone(), *v).is_some() {
            return Err(invalid("duplicate partition key in counts".into()));
        }
    }
    Ok(map)
}

/// Smallest integer threshold `>= start` for which `fits` holds, assuming
/// `fits` is monotone (a higher threshold only lowers δ). OpenDP requires
/// the threshold to be at least the L∞ sensitivity, hence `start`.
fn smallest_threshold(start: i64, fits: impl Fn(i64) -> Result<bool>) -> Result<i64> {
    if fits(start)? {
        return Ok(start);
    }
    let (mut lo, mut step) = (start, 1_i64);
    let mut hi = None;
    for _ in 0..MAX_BRACKET_STEPS {
        let Some(candidate) = start.checked_add(step) else {
            break;
        };
        if fits(candidate)? {
            hi = Some(candidate);
            break;
        }
        lo = candidate;
        step = step.saturating_mul(2);
    }
    let mut hi = hi.ok_or_else(|| NoiseError::Calibration("partition threshold".into()))?;
    // Invariant: !fits(lo) && fits(hi).
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid)? {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}

// ---------------------------------------------------------------------------
// Quantile
// ---------------------------------------------------------------------------

fn quantile_measurement(candidates: &[f64], alpha: f64, scale: f64) -> Result<Quantile> {
    Ok(make_private_quantile(
        VectorDomain::new(AtomDomain::<f64>::new_non_nan()),
        SymmetricDistance,
        MaxDivergence,
        candidates.to_vec(),
        alpha,
        scale,
    )?)
}

/// Sorted, de-duplicated candidates; OpenDP wants them strictly increasing.
fn clean_candidates(candidates: &[f64]) -> Result<Vec<f64>> {
    if candidates.is_empty() {
        return Err(invalid("quantile candidates must be non-empty".into()));
    }
    if candidates.iter().any(|c| c.is_nan()) {
        return Err(invalid("quantile candidates must not contain NaN".into()));
    }
    let mut sorted = candidates.to_vec();
    sorted.sort_by(f64::total_cmp);
    // total_cmp orders -0.0 before 0.0; OpenDP compares them as equal.
    sorted.dedup_by(|a, b| a == b);
    Ok(sorted)
}

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

/// A candidate noise scale and how far its privacy cost exceeds the target
/// (`excess <= 0` means it fits).
#[derive(Clone, Copy)]
struct Probe {
    scale: f64,
    excess: f64,
}

/// Smallest scale (to [`SCALE_REL_TOL`]) whose privacy `cost` is at most
/// `target`. `cost` must be non-increasing in the scale, as every OpenDP
/// noise map is. Returns a scale that `cost` has been checked on.
///
/// Each Gaussian cost evaluation runs OpenDP's zCDP → (ε, δ) search (~16 ms in
/// a debug build), so instead of plain bisection this uses the Illinois
/// variant of regula falsi in `1/scale`, where costs are close to linear
/// (exactly so for Laplace): a handful of evaluations instead of ~35.
fn calibrate_scale(guess: f64, target: f64, cost: impl Fn(f64) -> Result<f64>) -> Result<f64> {
    if !(guess.is_finite() && guess > 0.0) {
        return Err(NoiseError::Calibration(format!(
            "noise scale from guess {guess}"
        )));
    }
    let probe = |scale: f64| {
        cost(scale).map(|c| Probe {
            scale,
            excess: c - target,
        })
    };
    let (mut lo, mut hi) = bracket_scale(guess, &probe)?;
    // Invariant: lo does not fit, hi fits. `last_fit` records which end the
    // previous step replaced (true: hi).
    let mut last_fit: Option<bool> = None;
    for _ in 0..MAX_REFINE_STEPS {
        // An exact hit (common for closed-form maps) is already optimal.
        if hi.excess == 0.0 || hi.scale - lo.scale <= hi.scale * SCALE_REL_TOL {
            break;
        }
        let p = probe(interpolate(lo, hi))?;
        let fits = p.excess <= 0.0;
        if fits {
            hi = p;
        } else {
            lo = p;
        }
        // Illinois step: when the same end is replaced twice in a row, halve
        // the stale end's weight so the secant stops creeping from one side.
        if last_fit == Some(fits) {
            if fits {
                lo.excess /= 2.0;
            } else {
                hi.excess /= 2.0;
            }
        }
        last_fit = Some(fits);
    }
    Ok(hi.scale)
}

/// Root of the secant through the two probes in `1/scale`, or the midpoint
/// when the secant is degenerate (e.g. an infinite cost) or leaves the bracket.
fn interpolate(lo: Probe, hi: Probe) -> f64 {
    let (x_lo, x_hi) = (lo.scale.recip(), hi.scale.recip());
    let x = x_hi - hi.excess * (x_hi - x_lo) / (hi.excess - lo.excess);
    let scale = x.recip();
    if scale.is_finite() && scale > lo.scale && scale < hi.scale {
        scale
    } else {
        lo.scale + (hi.scale - lo.scale) / 2.0
    }
}

/// Finds probes `(lo, hi)` where `lo` does not fit and `hi` fits, by halving
/// or doubling from the guess.
fn bracket_scale(guess: f64, probe: &impl Fn(f64) -> Result<Probe>) -> Result<(Probe, Probe)> {
    let first = probe(guess)?;
    let shrinking = first.excess <= 0.0;
    let mut edge = first;
    for _ in 0..MAX_BRACKET_STEPS {
        let next = if shrinking {
            edge.scale / 2.0
        } else {
            edge.scale * 2.0
        };
        if !next.is_finite() || next <= 0.0 {
            break;
        }
        let p = probe(next)?;
        match (shrinking, p.excess <= 0.0) {
            (true, false) => return Ok((p, edge)),
            (false, true) => return Ok((edge, p)),
            _ => edge = p,
        }
    }
    Err(NoiseError::Calibration(
        "noise scale: no bracket found".into(),
    ))
}

/// Discrete Laplace 95% half-width (closed form in OpenDP).
fn laplace_ci95(scale: f64) -> Result<f64> {
    Ok(discrete_laplacian_scale_to_accuracy(scale, CI_ALPHA)?)
}

/// Discrete Gaussian 95% half-width; see [`EXACT_DG_ACCURACY_MAX_SCALE`].
fn gaussian_ci95(scale: f64) -> Result<f64> {
    if scale <= EXACT_DG_ACCURACY_MAX_SCALE {
        Ok(discrete_gaussian_scale_to_accuracy(scale, CI_ALPHA)?)
    } else {
        Ok(gaussian_scale_to_accuracy(scale, CI_ALPHA)?)
    }
}

/// Defence in depth: refuse to release if OpenDP's final map exceeds the budget.
fn check_spent(eps: f64, eps_max: f64, delta: f64, delta_max: f64) -> Result<()> {
    if eps <= eps_max && delta <= delta_max {
        Ok(())
    } else {
        Err(NoiseError::Calibration(format!(
            "budget: charged (ε={eps}, δ={delta}) exceeds (ε={eps_max}, δ={delta_max})"
        )))
    }
}

fn check_epsilon(epsilon: f64) -> Result<()> {
    if epsilon.is_finite() && epsilon > 0.0 {
        Ok(())
    } else {
        Err(NoiseError::InvalidEpsilon(epsilon))
    }
}

/// δ must lie in [0, 1), or in (0, 1) when the mechanism needs some δ.
fn check_delta(delta: f64, positive: bool) -> Result<()> {
    let reason = if positive {
        "must be in (0, 1) for this mechanism"
    } else {
        "must be in [0, 1)"
    };
    let low_ok = if positive { delta > 0.0 } else { delta >= 0.0 };
    if low_ok && delta < 1.0 {
        Ok(())
    } else {
        Err(NoiseError::InvalidDelta { delta, reason })
    }
}

fn check_contribution_bounds(sensitivity: u64, max_groups: u64) -> Result<()> {
    // Zero bounds mean "no unit can change anything", which is never true of
    // real data and would make every scale search degenerate.
    if sensitivity == 0 || max_groups == 0 {
        return Err(invalid(format!(
            "sensitivity ({sensitivity}) and max_groups ({max_groups}) must be at least 1"
        )));
    }
    Ok(())
}

/// `max_groups * sensitivity`, exactly, as OpenDP's `i64` L1 distance.
fn l1_sensitivity(sensitivity: u64, max_groups: u64) -> Result<i64> {
    max_groups
        .checked_mul(sensitivity)
        .and_then(|l1| i64::try_from(l1).ok())
        .ok_or_else(|| invalid("max_groups * sensitivity overflows i64".into()))
}

/// `sqrt(max_groups) * sensitivity`, rounded up at each step so the L2
/// distance handed to OpenDP is never smaller than the true one.
fn l2_sensitivity(sensitivity: u64, max_groups: u64) -> Result<f64> {
    // u64 → f64 can round down above 2^53; reject rather than understate.
    let exact = |x: u64| {
        let f = x as f64;
        (f as u64 == x && f < 2f64.powi(53))
            .then_some(f)
            .ok_or_else(|| invalid(format!("{x} is too large to represent exactly")))
    };
    let root = exact(max_groups)?.inf_sqrt()?;
    Ok(root.inf_mul(&exact(sensitivity)?)?)
}

fn invalid(msg: String) -> NoiseError {
    NoiseError::InvalidParameter(msg)
}

#[cfg(test)]
mod tests {
    //! Every assertion here either holds exactly or fails with a probability
    //! bounded (by the stated math) below 1e-6 per test run; there are no
    //! retries. Where a bound is used, the test computes it from the returned
    //! scale/threshold and asserts the bound first, so a parameter change that
    //! weakens it fails loudly instead of making the test flaky.

    use super::*;

    // ---- statistics helpers -------------------------------------------------

    /// Sample size for the goodness-of-fit tests.
    const KS_N: usize = 100_000;
    /// Per-test false-alarm rate of the KS check.
    const KS_ALPHA: f64 = 1e-6;

    /// DKW/Massart: `P(sup |F_n - F| > t) <= 2 exp(-2 n t²)` for *any* F,
    /// discrete included, so this critical value has false-alarm rate <= α.
    fn ks_critical(n: usize, alpha: f64) -> f64 {
        ((2.0 / alpha).ln() / (2.0 * n as f64)).sqrt()
    }

    /// `sup_x |F_n(x) - F(x)|` for integer samples and an integer-supported
    /// CDF, checked at every integer in the sample range and at the left
    /// limit of each (which for integer support is the value one below).
    fn ks_statistic(samples: &[i64], cdf: impl Fn(i64) -> f64) -> f64 {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let n = sorted.len() as f64;
        let (lo, hi) = (sorted[0] - 1, sorted[sorted.len() - 1]);
        let ecdf = |k: i64| sorted.partition_point(|&x| x <= k) as f64 / n;
        (lo..=hi)
            .map(|k| {
                let at = (ecdf(k) - cdf(k)).abs();
                let left = (ecdf(k - 1) - cdf(k - 1)).abs();
                at.max(left)
            })
            .fold(0.0, f64::max)
    }

    /// Largest gap between two CDFs over a range: how far apart the null and
    /// an alternative are, i.e. how much room the power check has.
    fn cdf_separation(a: impl Fn(i64) -> f64, b: impl Fn(i64) -> f64, range: i64) -> f64 {
        (-range..=range)
            .map(|k| (a(k) - b(k)).abs())
            .fold(0.0, f64::max)
    }

    /// `P(X >= m)` for discrete Laplace, `P(X=k) ∝ exp(-|k|/s)`, m >= 1:
    /// `sum_{k>=m} (1-t)/(1+t) t^k = t^m / (1+t)` with `t = exp(-1/s)`.
    fn laplace_upper_tail(m: i64, scale: f64) -> f64 {
        assert!(m >= 1);
        (-(m as f64) / scale).exp() / (1.0 + (-1.0 / scale).exp())
    }

    /// Exact discrete Laplace CDF `P(X <= k)`, using the tail form on both
    /// sides so neither side loses precision to cancellation.
    fn laplace_cdf(k: i64, scale: f64) -> f64 {
        if k < 0 {
            laplace_upper_tail(-k, scale)
        } else {
            1.0 - laplace_upper_tail(k + 1, scale)
        }
    }

    /// Discrete Gaussian `P(X=k) ∝ exp(-k²/(2σ²))`, tabulated on `[-r, r]`
    /// with `r = 40σ` (mass beyond is below e^-800, i.e. 0 in f64).
    struct DiscreteGaussian {
        radius: i64,
        pmf: Vec<f64>,
        cdf: Vec<f64>,
    }

    impl DiscreteGaussian {
        fn new(sigma: f64) -> Self {
            let radius = (40.0 * sigma).ceil() as i64 + 1;
            let weights: Vec<f64> = (-radius..=radius)
                .map(|k| (-((k * k) as f64) / (2.0 * sigma * sigma)).exp())
                .collect();
            let total: f64 = weights.iter().sum();
            let pmf: Vec<f64> = weights.iter().map(|w| w / total).collect();
            let cdf = pmf
                .iter()
                .scan(0.0, |acc, p| {
                    *acc += p;
                    Some(*acc)
                })
                .collect();
            DiscreteGaussian { radius, pmf, cdf }
        }

        fn cdf(&self, k: i64) -> f64 {
            if k < -self.radius {
                0.0
            } else if k >= self.radius {
                1.0
            } else {
                self.cdf[(k + self.radius) as usize]
            }
        }

        /// `P(X >= m)`, summed directly so tiny tails keep their precision.
        fn upper_tail(&self, m: i64) -> f64 {
            let start = (m + self.radius).clamp(0, self.pmf.len() as i64) as usize;
            self.pmf[start..].iter().sum()
        }
    }

    fn assert_rel_close(got: f64, want: f64, rel: f64) {
        assert!(
            (got - want).abs() <= rel * want.abs(),
            "got {got}, want {want} (rel tol {rel})"
        );
    }

    // ---- 1. privacy maps and budget checks ------------------------------------

    #[test]
    fn laplace_map_is_d_in_over_scale() {
        for (scale, d_in) in [(1.0, 1), (10.0, 3), (0.3, 7), (123.456, 1000), (1e-3, 5)] {
            let eps = laplace_epsilon(scale, d_in).unwrap();
            let exact = d_in as f64 / scale;
            assert_rel_close(eps, exact, 1e-9);
            // OpenDP rounds the exact rational up, never down.
            assert!(eps >= exact, "{eps} < {exact}");
        }
        assert_eq!(laplace_epsilon(2.0, 0).unwrap(), 0.0);
        assert!(laplace_epsilon(2.0, -1).is_err());
    }

    #[test]
    fn gaussian_map_is_d_in_squared_over_two_sigma_squared() {
        for (sigma, d_in) in [(1.0, 1.0), (9.5, 2.0), (3.0, 2f64.sqrt()), (0.25, 7.5)] {
            let rho = gaussian_rho(sigma, d_in).unwrap();
            assert_rel_close(rho, d_in * d_in / (2.0 * sigma * sigma), 1e-9);
        }
    }

    #[test]
    fn gaussian_epsilon_matches_zcdp_conversion_bounds() {
        // ρ-zCDP implies (ρ + 2·sqrt(ρ ln(1/δ)), δ)-DP; OpenDP's conversion is
        // at least that tight, and can't beat ε >= ρ.
        let (sigma, d_in, delta) = (4.0, 1.0, 1e-6);
        let rho = gaussian_rho(sigma, d_in).unwrap();
        let eps = gaussian_epsilon(sigma, d_in, delta).unwrap();
        let classic = rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt();
        assert!(
            eps <= classic && eps >= rho,
            "ρ={rho} ε={eps} classic={classic}"
        );
    }

    /// (sensitivity, max_groups, ε, δ) shapes exercised by the budget tests.
    const BUDGETS: [(u64, u64, f64, f64); 5] = [
        (1, 1, 1.0, 1e-6),
        (1, 3, 0.1, 1e-9),
        (1000, 1, 0.5, 1e-5),
        (7, 4, 2.0, 1e-7),
        (1, 10, 0.01, 1e-8),
    ];

    #[test]
    fn laplace_release_spends_what_the_map_says() {
        for (sens, groups, eps, _) in BUDGETS {
            let (_, info) =
                release_integers(&[0, 0], sens, groups, NoiseFamily::Laplace, eps, 0.0).unwrap();
            let l1 = (sens * groups) as i64;
            assert_eq!(info.mechanism, "discrete_laplace");
            assert!(
                info.epsilon <= eps && info.epsilon >= 0.99 * eps,
                "{info:?}"
            );
            assert_eq!(info.delta, 0.0);
            assert_rel_close(info.scale, l1 as f64 / eps, 1e-12);
            assert_eq!(info.epsilon, laplace_epsilon(info.scale, l1).unwrap());
        }
    }

    #[test]
    fn gaussian_release_spends_what_the_map_says() {
        for (sens, groups, eps, delta) in BUDGETS {
            let (_, info) =
                release_integers(&[0], sens, groups, NoiseFamily::Gaussian, eps, delta).unwrap();
            let l2 = l2_sensitivity(sens, groups).unwrap();
            assert_eq!(info.mechanism, "discrete_gaussian");
            assert!(
                info.epsilon <= eps && info.epsilon >= 0.99 * eps,
                "{info:?}"
            );
            assert_eq!(info.delta, delta);
            assert_eq!(
                info.epsilon,
                gaussian_epsilon(info.scale, l2, delta).unwrap()
            );
            // The scale is the smallest that fits: 1e-6 less noise would not.
            let tighter = gaussian_epsilon(info.scale * (1.0 - 1e-6), l2, delta).unwrap();
            assert!(tighter > eps, "scale {} is not tight", info.scale);
        }
    }

    #[test]
    fn calibration_finds_the_smallest_fitting_scale() {
        // cost = a/s + b/s², non-linear in 1/s; the root is closed-form.
        let (a, b, target): (f64, f64, f64) = (3.0, 5.0, 0.7);
        let root = (a + (a * a + 4.0 * b * target).sqrt()) / (2.0 * target);
        let cost = |s: f64| Ok(a / s + b / (s * s));
        // Start from both sides of the root, near and far.
        for guess in [root * 1e-3, root * 0.9, root, root * 1.1, root * 1e3] {
            let calls = std::cell::Cell::new(0);
            let counted = |s: f64| {
                calls.set(calls.get() + 1);
                cost(s)
            };
            let s = calibrate_scale(guess, target, counted).unwrap();
            assert!(cost(s).unwrap() <= target, "guess {guess}: {s} overspends");
            assert_rel_close(s, root, 1e-9);
            // ~10 bracketing steps for a 1000x-off guess, then a few secants.
            assert!(
                calls.get() <= 25,
                "guess {guess}: {} evaluations",
                calls.get()
            );
        }
        assert!(calibrate_scale(f64::NAN, target, cost).is_err());
        assert!(calibrate_scale(0.0, target, cost).is_err());
    }

    #[test]
    fn l2_sensitivity_never_understates() {
        assert_eq!(l2_sensitivity(5, 1).unwrap(), 5.0);
        assert_eq!(l2_sensitivity(3, 4).unwrap(), 6.0);
        for groups in [2_u64, 3, 5, 10, 1000] {
            let l2 = l2_sensitivity(1, groups).unwrap();
            assert!(l2 * l2 >= groups as f64 && l2 <= (groups as f64).sqrt() * (1.0 + 1e-15));
        }
    }

    #[test]
    fn noise_shifts_values_rather_than_replacing_them() {
        // Scale 1e-6: P(any of 3 draws is non-zero) <= 3·2·exp(-1e6) = 0.
        let values = [1_000_000, -5, 0];
        let (noisy, _) = release_integers(&values, 1, 1, NoiseFamily::Laplace, 1e6, 0.0).unwrap();
        assert_eq!(noisy, values);
    }

    fn assert_bad_epsilon<T: std::fmt::Debug>(r: Result<T>) {
        let err = r.unwrap_err();
        assert!(matches!(err, NoiseError::InvalidEpsilon(_)), "{err:?}");
        assert!(err.to_string().contains("epsilon"), "{err}");
    }

    #[test]
    fn bad_epsilon_is_rejected_everywhere() {
        let counts = || vec![("a".to_string(), 10)];
        for eps in [0.0, -0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            for family in [NoiseFamily::Laplace, NoiseFamily::Gaussian] {
                assert_bad_epsilon(release_integers(&[1], 1, 1, family, eps, 1e-6));
                assert_bad_epsilon(select_partitions(counts(), 1, 1, family, eps, 1e-6));
            }
            assert_bad_epsilon(release_quantile(vec![1.0], &[0.0, 1.0], 0.5, 1, eps));
        }
    }

    #[test]
    fn bad_delta_is_rejected() {
        let gauss = |d| release_integers(&[1], 1, 1, NoiseFamily::Gaussian, 1.0, d);
        for delta in [0.0, -1e-9, 1.0, 2.0, f64::NAN, f64::INFINITY] {
            let err = gauss(delta).unwrap_err();
            assert!(matches!(err, NoiseError::InvalidDelta { .. }), "{err:?}");
            assert!(err.to_string().contains("delta"), "{err}");
            let thr = select_partitions(vec![], 1, 1, NoiseFamily::Laplace, 1.0, delta);
            assert!(matches!(thr, Err(NoiseError::InvalidDelta { .. })));
        }
        // Laplace accepts δ = 0 but still rejects nonsense.
        assert!(release_integers(&[1], 1, 1, NoiseFamily::Laplace, 1.0, 0.0).is_ok());
        let nan = release_integers(&[1], 1, 1, NoiseFamily::Laplace, 1.0, f64::NAN);
        assert!(matches!(nan, Err(NoiseError::InvalidDelta { .. })));
    }

    #[test]
    fn bad_contribution_bounds_are_rejected() {
        let release = |s, g| release_integers(&[1], s, g, NoiseFamily::Laplace, 1.0, 0.0);
        assert!(matches!(
            release(0, 1),
            Err(NoiseError::InvalidParameter(_))
        ));
        assert!(matches!(
            release(1, 0),
            Err(NoiseError::InvalidParameter(_))
        ));
        assert!(matches!(
            release(u64::MAX, 2),
            Err(NoiseError::InvalidParameter(_))
        ));
        let too_many_groups = select_partitions(
            vec![],
            1,
            u64::from(u32::MAX) + 1,
            NoiseFamily::Laplace,
            1.0,
            1e-6,
        );
        assert!(matches!(
            too_many_groups,
            Err(NoiseError::InvalidParameter(_))
        ));
    }

    #[test]
    fn threshold_maps_fit_the_budget_and_are_minimal() {
        for (sens, groups, eps, delta) in BUDGETS {
            for family in [NoiseFamily::Laplace, NoiseFamily::Gaussian] {
                let (_, info) =
                    select_partitions(vec![], sens, groups, family, eps, delta).unwrap();
                let t = info.threshold.unwrap();
                assert!(info.epsilon <= eps && info.delta <= delta, "{info:?}");
                assert!(t >= sens as i64, "{info:?}");
                if family == NoiseFamily::Laplace {
                    // One below the chosen threshold must overspend δ.
                    let d_in = (groups as u32, (sens * groups) as i64, sens as i64);
                    let m = laplace_threshold_measurement(info.scale, t - 1);
                    let over = m.and_then(|m| Ok(m.map(&d_in)?.1));
                    assert!(t == sens as i64 || over.unwrap() > delta, "{info:?}");
                }
            }
        }
    }

    // ---- 2. Kolmogorov–Smirnov goodness of fit -----------------------------

    /// Asserts the sample fits the CDF built by `cdf_for(scale)` and that
    /// the same sample is rejected at 0.7× and 1.3× the scale. If the null
    /// check passes (probability >= 1 - α), the triangle inequality gives
    /// `D_alt >= separation - D_null > 2·crit - crit`, so the power checks add
    /// no false-alarm rate of their own; the separation is asserted first.
    fn check_fit<C: Fn(i64) -> f64>(samples: &[i64], scale: f64, cdf_for: impl Fn(f64) -> C) {
        let crit = ks_critical(samples.len(), KS_ALPHA);
        assert!((crit - 0.0085).abs() < 1e-4, "critical D {crit}");
        let null = cdf_for(scale);
        let d_null = ks_statistic(samples, &null);
        assert!(
            d_null < crit,
            "D = {d_null} >= {crit} at the wired scale {scale}"
        );
        for factor in [0.7, 1.3] {
            let alt = cdf_for(scale * factor);
            let room = cdf_separation(&null, &alt, (60.0 * scale) as i64);
            assert!(
                room > 2.0 * crit,
                "test design: separation {room} too small"
            );
            let d_alt = ks_statistic(samples, &alt);
            assert!(d_alt > crit, "D = {d_alt} did not reject scale ×{factor}");
        }
    }

    #[test]
    fn discrete_laplace_noise_fits_its_distribution() {
        let (samples, info) =
            release_integers(&vec![0; KS_N], 1, 1, NoiseFamily::Laplace, 0.1, 0.0).unwrap();
        assert_eq!(info.scale, 10.0);
        check_fit(&samples, info.scale, |s| move |k| laplace_cdf(k, s));
    }

    #[test]
    fn discrete_gaussian_noise_fits_its_distribution() {
        let (samples, info) =
            release_integers(&vec![0; KS_N], 2, 1, NoiseFamily::Gaussian, 1.0, 1e-6).unwrap();
        assert!(info.scale > 5.0 && info.scale < 20.0, "{info:?}");
        check_fit(&samples, info.scale, |s| {
            let table = DiscreteGaussian::new(s);
            move |k| table.cdf(k)
        });
    }

    #[test]
    fn ci95_half_widths_cover_95_percent() {
        // Deterministic: checked against the exact distributions, no sampling.
        for scale in [0.5, 3.0, 10.0, 250.0] {
            let a = laplace_ci95(scale).unwrap();
            let outside = |m: i64| 2.0 * laplace_upper_tail(m, scale);
            assert!(
                outside(a.ceil() as i64) <= CI_ALPHA,
                "laplace s={scale} a={a}"
            );
            if a >= 3.0 {
                assert!(
                    outside(a.floor() as i64 - 1) > CI_ALPHA,
                    "laplace s={scale} loose"
                );
            }
        }
        for sigma in [0.5, 3.0, 9.0, 250.0] {
            let a = gaussian_ci95(sigma).unwrap();
            let dg = DiscreteGaussian::new(sigma);
            let outside = |m: i64| 2.0 * dg.upper_tail(m);
            assert!(
                outside(a.ceil() as i64) <= CI_ALPHA,
                "gauss σ={sigma} a={a}"
            );
            assert!(
                outside(a.floor() as i64 - 1) > CI_ALPHA,
                "gauss σ={sigma} loose"
            );
        }
        // Large σ switches to the continuous formula: 1.96σ.
        assert_rel_close(gaussian_ci95(1e6).unwrap(), 1.959_963_985e6, 1e-6);
    }

    // ---- 3. partition selection --------------------------------------------

    /// Upper tail `P(Z >= m)` of the noise a given release used.
    fn tail(info: &ReleaseInfo, m: i64) -> f64 {
        match info.mechanism {
            "laplace_threshold" => laplace_upper_tail(m, info.scale),
            "gaussian_threshold" => DiscreteGaussian::new(info.scale).upper_tail(m),
            other => panic!("unexpected mechanism {other}"),
        }
    }

    #[test]
    fn partition_selection_keeps_big_drops_tiny_and_invents_nothing() {
        const HUGE: i64 = 1_000_000;
        for family in [NoiseFamily::Laplace, NoiseFamily::Gaussian] {
            let mut counts = vec![("huge".to_string(), HUGE)];
            counts.extend((0..5).map(|i| (format!("one-{i}"), 1)));
            let (kept, info) = select_partitions(counts, 1, 1, family, 1.0, 1e-11).unwrap();
            let t = info.threshold.unwrap();
            // "huge" is lost iff HUGE + Z < t, i.e. Z <= -(HUGE - t) - 1.
            let p_lose_huge = tail(&info, HUGE - t + 1);
            // A count of 1 survives iff 1 + Z >= t; union bound over 5 keys.
            let p_keep_a_one = 5.0 * tail(&info, t - 1);
            assert!(p_lose_huge < 1e-12 && p_keep_a_one < 1e-9, "{info:?}");
            assert_eq!(kept.len(), 1, "{kept:?} {info:?}");
            assert_eq!(kept[0].0, "huge");
            assert!(kept[0].1 >= t);
        }
    }

    #[test]
    fn partition_selection_output_is_a_subset_in_input_order() {
        // Keys with count 0 are simply absent from the input, so they can
        // never be output: everything returned must come from the input.
        let counts: Vec<(String, i64)> = (0..200).map(|i| (format!("k{i:03}"), i * 5)).collect();
        for family in [NoiseFamily::Laplace, NoiseFamily::Gaussian] {
            let (kept, info) = select_partitions(counts.clone(), 2, 3, family, 1.0, 1e-6).unwrap();
            let t = info.threshold.unwrap();
            let mut input = counts.iter().map(|(k, _)| k);
            for (k, v) in &kept {
                assert!(input.any(|i| i == k), "{k} not in input or out of order");
                assert!(*v >= t, "kept {k} with {v} < threshold {t}");
            }
        }
        let (kept, _) = select_partitions(vec![], 1, 1, NoiseFamily::Laplace, 1.0, 1e-6).unwrap();
        assert!(kept.is_empty());
    }

    #[test]
    fn duplicate_keys_are_rejected_without_echoing_them() {
        let counts = vec![("secret".to_string(), 1), ("secret".to_string(), 2)];
        let err = select_partitions(counts, 1, 1, NoiseFamily::Laplace, 1.0, 1e-6).unwrap_err();
        assert!(matches!(err, NoiseError::InvalidParameter(_)));
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    // ---- 4. quantiles --------------------------------------------------------

    /// Rank-unit score OpenDP minimises: `|(1-α)·#(x<c) - α·#(x>c)|`.
    fn quantile_score(values: &[f64], c: f64, alpha: f64) -> f64 {
        let lt = values.iter().filter(|&&v| v < c).count() as f64;
        let gt = values.iter().filter(|&&v| v > c).count() as f64;
        ((1.0 - alpha) * lt - alpha * gt).abs()
    }

    /// Union bound on picking any candidate outside `band`: with exponential
    /// noise of scale `s` (rank units) a candidate whose score is worse than
    /// the best by `g` wins with probability at most `exp(-g/s)`.
    fn outside_band_bound(
        values: &[f64],
        cands: &[f64],
        alpha: f64,
        scale: f64,
        band: (f64, f64),
    ) -> f64 {
        let best = cands
            .iter()
            .map(|&c| quantile_score(values, c, alpha))
            .fold(f64::INFINITY, f64::min);
        cands
            .iter()
            .filter(|&&c| c < band.0 || c > band.1)
            .map(|&c| (-(quantile_score(values, c, alpha) - best) / scale).exp())
            .sum()
    }

    #[test]
    fn quantile_is_always_a_candidate_and_within_budget() {
        let cands = [-3.0, 0.0, 2.5, 7.0, 100.0];
        for i in 0..200_u32 {
            let values: Vec<f64> = (0..50)
                .map(|j| f64::from((i * 7 + j * 13) % 111) - 5.0)
                .collect();
            let alpha = f64::from(i % 11) / 10.0;
            let (q, info) = release_quantile(values, &cands, alpha, 2, 0.1).unwrap();
            assert!(cands.contains(&q), "{q} is not a candidate");
            assert!(info.epsilon <= 0.1 && info.epsilon >= 0.099, "{info:?}");
        }
    }

    #[test]
    fn median_of_one_to_a_thousand_lands_near_500() {
        let values: Vec<f64> = (1..=1000).map(f64::from).collect();
        let cands: Vec<f64> = (0..=100).map(|i| f64::from(i) * 10.0).collect();
        let band = (450.0, 550.0);
        let (q, info) = release_quantile(values.clone(), &cands, 0.5, 1, 1.0).unwrap();
        // Worst outsider is 50+ ranks worse than 500; with scale ~1 the bound
        // is ~100·e^-59 ≈ 1e-24.
        let bound = outside_band_bound(&values, &cands, 0.5, info.scale, band);
        assert!(bound < 1e-20, "failure bound {bound}, {info:?}");
        assert!((band.0..=band.1).contains(&q), "median {q}");
    }

    #[test]
    fn concentrated_values_pick_their_candidate() {
        let mut values = vec![42.0; 1000];
        values.extend([f64::NAN, f64::NAN]); // dropped, not an error
        let cands = [1000.0, 0.0, 42.0, 100.0, 42.0]; // unsorted, duplicated
        let (q, info) = release_quantile(values.clone(), &cands, 0.5, 3, 1.0).unwrap();
        let finite: Vec<f64> = values.into_iter().filter(|v| !v.is_nan()).collect();
        // Every other candidate is 500 ranks worse: bound ~ 3·e^-(500/scale).
        let bound = outside_band_bound(
            &finite,
            &[0.0, 42.0, 100.0, 1000.0],
            0.5,
            info.scale,
            (42.0, 42.0),
        );
        assert!(bound < 1e-20, "failure bound {bound}, {info:?}");
        assert_eq!(q, 42.0);
    }

    #[test]
    fn bad_quantile_arguments_are_rejected() {
        let q = |cands: &[f64], alpha, rows| release_quantile(vec![1.0], cands, alpha, rows, 1.0);
        for r in [
            q(&[], 0.5, 1),
            q(&[0.0, f64::NAN], 0.5, 1),
            q(&[0.0], -0.1, 1),
            q(&[0.0], 1.1, 1),
            q(&[0.0], f64::NAN, 1),
            q(&[0.0], 0.5, 0),
            q(&[0.0], 0.5, u64::MAX),
        ] {
            assert!(matches!(r, Err(NoiseError::InvalidParameter(_))), "{r:?}");
        }
    }
}
