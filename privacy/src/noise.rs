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
//! * **Bounds.** A bound chosen from the data ([`release_bound`]) is an
//!   exponential mechanism too: OpenDP's noisy max over quantile scores we
//!   compute, one value per unit, plus a data-independent preference for
//!   smaller candidates (OpenDP's quantile picks uniformly among the
//!   candidates above the data, a bound of 10^9 as often as a tight one).
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
        make_noisy_max, make_private_quantile,
    },
    measures::{Approximate, MaxDivergence, ZeroConcentratedDivergence},
    metrics::{
        AbsoluteDistance, L1Distance, L01InfDistance, L2Distance, L02InfDistance, LInfDistance,
        SymmetricDistance,
    },
    traits::{InfMul, InfSqrt},
};
use sluice_policy::dp::grid_positions::{below_and_above, count_positions};

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
    /// ρ charged by OpenDP's zCDP map, for releases calibrated in ρ
    /// ([`release_integers_zcdp`], [`select_partitions_zcdp`]); 0 otherwise.
    pub rho: f64,
}

impl ReleaseInfo {
    /// A pure-DP choice among candidates (a quantile, a bound): no δ, no
    /// confidence interval, `scale` in rank units.
    fn selection(mechanism: &'static str, scale: f64, epsilon: f64) -> Self {
        Self {
            mechanism,
            scale,
            epsilon,
            delta: 0.0,
            ci95_half_width: 0.0,
            threshold: None,
            rho: 0.0,
        }
    }
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

/// Adds discrete Gaussian noise calibrated to `rho`-zCDP (for budgets that
/// compose in zCDP): σ = L2 / √(2ρ), the inverse of OpenDP's map, nudged up
/// by ulps if rounding makes the map charge more. Adding or removing one
/// unit changes at most `max_groups` entries by at most `sensitivity`.
pub fn release_integers_zcdp(
    values: &[i64],
    sensitivity: u64,
    max_groups: u64,
    rho: f64,
) -> Result<(Vec<i64>, ReleaseInfo)> {
    check_rho(rho)?;
    check_contribution_bounds(sensitivity, max_groups)?;
    let l2 = l2_sensitivity(sensitivity, max_groups)?;
    let scale = fit_gaussian_rho_scale(l2, rho)?;
    let meas = gaussian_zcdp_measurement(scale)?;
    let spent = meas.map(&l2)?;
    check_spent_rho(spent, rho)?;
    let noisy = meas.invoke(&values.to_vec())?;
    let info = ReleaseInfo {
        mechanism: "discrete_gaussian",
        scale,
        epsilon: 0.0,
        delta: 0.0,
        ci95_half_width: gaussian_ci95(scale)?,
        threshold: None,
        rho: spent,
    };
    Ok((noisy, info))
}

/// [`select_partitions`] with discrete Gaussian noise calibrated to
/// `rho`-zCDP, keeping only keys whose noisy count reaches the smallest
/// threshold whose δ is at most `delta`: (ρ, δ)-approximate zCDP.
pub fn select_partitions_zcdp(
    counts: Vec<(String, i64)>,
    sensitivity: u64,
    max_groups: u64,
    rho: f64,
    delta: f64,
) -> Result<(Vec<(String, i64)>, ReleaseInfo)> {
    check_rho(rho)?;
    check_delta(delta, true)?;
    let (l0, linf) = selection_bounds(sensitivity, max_groups)?;
    let l2 = l2_sensitivity(sensitivity, max_groups)?;
    let d_in = (l0, l2, linf as f64);
    let input = count_map(&counts)?;
    let scale = fit_gaussian_rho_scale(l2, rho)?;
    let threshold = smallest_threshold(linf, |t| {
        Ok(gaussian_threshold_zcdp(scale, t)?.map(&d_in)?.1 <= delta)
    })?;
    let meas = gaussian_threshold_zcdp(scale, threshold)?;
    let (spent_rho, spent_delta) = meas.map(&d_in)?;
    check_spent_rho(spent_rho, rho)?;
    check_spent(0.0, 0.0, spent_delta, delta)?;
    let noisy = meas.invoke(&input)?;
    let info = ReleaseInfo {
        mechanism: "gaussian_threshold",
        scale,
        epsilon: 0.0,
        delta: spent_delta,
        ci95_half_width: gaussian_ci95(scale)?,
        threshold: Some(threshold),
        rho: spent_rho,
    };
    Ok((kept_in_order(counts, &noisy), info))
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
    let (l0, linf) = selection_bounds(sensitivity, max_groups)?;
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
    Ok((kept_in_order(counts, &noisy), info))
}

/// The L0 and L∞ bounds of a selection, in the types OpenDP's threshold
/// measurements take.
fn selection_bounds(sensitivity: u64, max_groups: u64) -> Result<(u32, i64)> {
    check_contribution_bounds(sensitivity, max_groups)?;
    let l0 = u32::try_from(max_groups)
        .map_err(|_| invalid(format!("max_groups {max_groups} exceeds u32::MAX")))?;
    let linf = i64::try_from(sensitivity)
        .map_err(|_| invalid(format!("sensitivity {sensitivity} exceeds i64::MAX")))?;
    Ok((l0, linf))
}

/// The kept keys with their noisy counts, in the caller's order (a
/// HashMap's order is arbitrary).
fn kept_in_order(counts: Vec<(String, i64)>, noisy: &HashMap<String, i64>) -> Vec<(String, i64)> {
    counts
        .into_iter()
        .filter_map(|(k, _)| noisy.get(&k).map(|&v| (k, v)))
        .collect()
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
    Ok((
        out,
        ReleaseInfo::selection("private_quantile", scale, spent),
    ))
}

/// Denominator of a bound's quantile level: scores are integers in units
/// of 1/10,000 of a value's rank.
const BOUND_ALPHA_DENOMINATOR: u64 = 10_000;
/// How many noise scales each step up the candidate grid costs a bound.
const BOUND_STEP_SCALES: f64 = 2.0;

/// Private `alpha`-quantile of `values` (one per privacy unit: adding or
/// removing a unit adds or removes one value) among `candidates`, for a
/// bound that tightly covers the data.
///
/// Each candidate `c` scores `|(1 - α)·#(x < c) - α·#(x > c)|` (in units
/// of 1/10,000; one unit moves it by at most `max(α, 1 - α)`) plus two
/// noise scales per grid step above the smallest candidate
/// ([`BOUND_STEP_SCALES`]). That term does not depend on the data, so it
/// changes neither the sensitivity nor the privacy; it breaks the tie
/// between the candidates above every value (which all score `(1 - α)·n`)
/// in favour of the smallest (e^-2 less likely per step up), and moves an
/// interior choice down by about two noise scales of rank. OpenDP's noisy
/// max picks the lowest noisy score and charges its own privacy map. NaN
/// values are dropped (a per-unit filter).
pub fn release_bound(
    values: Vec<f64>,
    candidates: &[f64],
    alpha: f64,
    epsilon: f64,
) -> Result<(f64, ReleaseInfo)> {
    BoundMechanism::new(candidates, alpha, epsilon)?.release(values)
}

/// [`release_bound`]'s mechanism, calibrated once for any number of draws.
pub struct BoundMechanism {
    candidates: Vec<f64>,
    /// α and 1 - α in units of 1/[`BOUND_ALPHA_DENOMINATOR`].
    above: u64,
    below: u64,
    /// The data-independent score added per grid step.
    step: u64,
    measurement: BoundChoice,
    info: ReleaseInfo,
}

impl BoundMechanism {
    pub fn new(candidates: &[f64], alpha: f64, epsilon: f64) -> Result<Self> {
        check_epsilon(epsilon)?;
        if !(0.0..=1.0).contains(&alpha) {
            return Err(invalid(format!("alpha {alpha} must be within [0, 1]")));
        }
        let candidates = clean_candidates(candidates)?;
        let den = BOUND_ALPHA_DENOMINATOR;
        let above = (alpha * den as f64).round() as u64;
        let d_in = above.max(den - above);
        let guess = 2.0 * d_in as f64 / epsilon;
        let scale = calibrate_scale(guess, epsilon, |s| Ok(bound_measurement(s)?.map(&d_in)?))?;
        let measurement = bound_measurement(scale)?;
        let spent = measurement.map(&d_in)?;
        check_spent(spent, epsilon, 0.0, 0.0)?;
        Ok(Self {
            candidates,
            above,
            below: den - above,
            step: (BOUND_STEP_SCALES * scale).ceil() as u64,
            measurement,
            info: ReleaseInfo::selection("private_bound", scale, spent),
        })
    }

    /// One draw over `values` (one per unit; NaN dropped).
    pub fn release(&self, values: Vec<f64>) -> Result<(f64, ReleaseInfo)> {
        let mut counts = vec![0u64; 2 * self.candidates.len() + 1];
        count_positions(&self.candidates, &mut counts, values);
        self.release_counts(&counts)
    }

    /// One draw over values already counted per position on the candidate
    /// grid (`sluice_policy::dp::grid_positions`: `2m + 1` counts for `m`
    /// candidates).
    pub fn release_counts(&self, counts: &[u64]) -> Result<(f64, ReleaseInfo)> {
        if counts.len() != 2 * self.candidates.len() + 1 {
            return Err(invalid(format!(
                "{} position counts for {} candidates",
                counts.len(),
                self.candidates.len()
            )));
        }
        let scores: Vec<u64> = below_and_above(counts)
            .into_iter()
            .enumerate()
            .map(|(i, (lt, gt))| {
                let score = self
                    .below
                    .saturating_mul(lt)
                    .abs_diff(self.above.saturating_mul(gt));
                score.saturating_add(self.step.saturating_mul(i as u64))
            })
            .collect();
        let index = self.measurement.invoke(&scores)?;
        Ok((self.candidates[index], self.info.clone()))
    }
}

type BoundChoice =
    Measurement<VectorDomain<AtomDomain<u64>>, LInfDistance<u64>, MaxDivergence, usize>;

/// Report-noisy-min over integer scores (OpenDP's noisy max, negated).
fn bound_measurement(scale: f64) -> Result<BoundChoice> {
    Ok(make_noisy_max(
        VectorDomain::new(AtomDomain::<u64>::default()),
        LInfDistance::default(),
        MaxDivergence,
        scale,
        true,
    )?)
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
        rho: 0.0,
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
        rho: 0.0,
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

/// σ = `l2 / √(2ρ)`, nudged up by ulps until OpenDP's zCDP map (which
/// rounds up) charges at most `rho`.
fn fit_gaussian_rho_scale(l2: f64, rho: f64) -> Result<f64> {
    let mut scale = l2 / (2.0 * rho).sqrt();
    for _ in 0..MAX_ULP_NUDGES {
        if gaussian_rho(scale, l2)? <= rho {
            return Ok(scale);
        }
        scale = scale.next_up();
    }
    calibrate_scale(scale, rho, |s| gaussian_rho(s, l2))
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
        rho: 0.0,
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
        rho: 0.0,
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

fn check_spent_rho(rho: f64, rho_max: f64) -> Result<()> {
    if rho <= rho_max {
        Ok(())
    } else {
        Err(NoiseError::Calibration(format!(
            "budget: charged ρ={rho} exceeds ρ={rho_max}"
        )))
    }
}

fn check_rho(rho: f64) -> Result<()> {
    if rho.is_finite() && rho > 0.0 {
        Ok(())
    } else {
        Err(NoiseError::InvalidParameter(format!(
            "rho {rho} must be finite and greater than 0"
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
mod tests;
