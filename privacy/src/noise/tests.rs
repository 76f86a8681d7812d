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
            let (_, info) = select_partitions(vec![], sens, groups, family, eps, delta).unwrap();
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

#[test]
fn zcdp_release_spends_at_most_its_rho() {
    for rho in [1e-7, 1.3e-4, 0.013, 0.5, 2.0] {
        for (sensitivity, max_groups) in [(1, 1), (5, 3), (100, 10), (1 << 16, 1 << 16)] {
            let (noisy, info) =
                release_integers_zcdp(&[10, 20, 30], sensitivity, max_groups, rho).unwrap();
            assert_eq!(noisy.len(), 3);
            let l2 = l2_sensitivity(sensitivity, max_groups).unwrap();
            assert!(info.rho <= rho, "ρ {rho}: charged {}", info.rho);
            assert!(
                info.rho > rho * (1.0 - 1e-9),
                "ρ {rho}: charged {}",
                info.rho
            );
            assert_eq!(info.rho, gaussian_rho(info.scale, l2).unwrap());
            assert_eq!((info.epsilon, info.delta), (0.0, 0.0));
        }
    }
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(release_integers_zcdp(&[1], 1, 1, bad).is_err(), "{bad}");
    }
}

#[test]
fn zcdp_selection_spends_its_rho_and_at_most_its_delta() {
    let counts: Vec<(String, i64)> = (0..50).map(|i| (format!("k{i}"), i * 10)).collect();
    let rho = 0.01;
    let (kept, info) = select_partitions_zcdp(counts, 5, 3, rho, 1e-8).unwrap();
    assert!(
        info.rho <= rho && info.rho > rho * (1.0 - 1e-9),
        "{}",
        info.rho
    );
    assert!(info.delta <= 1e-8, "{}", info.delta);
    let threshold = info.threshold.unwrap();
    assert!(kept.iter().all(|(_, v)| *v >= threshold));
    // A lower δ needs a higher threshold.
    let (_, stricter) = select_partitions_zcdp(vec![("a".into(), 1)], 5, 3, rho, 1e-12).unwrap();
    assert!(stricter.threshold.unwrap() > threshold);
}

/// A bound over uniform values in [0.5, 5.35] at the 0.969-quantile (5.2):
/// the best candidate is 6, and every candidate above it scores the same.
/// Each step up the grid is e^-2 less likely, so a choice of 12 or more has
/// probability about e^-4 ≈ 0.02 and one above 100 (nine steps) about
/// e^-18. Over 200 draws, more than 20 of the first (mean 4) or any of the
/// second happen with probability below 1e-6 each.
#[test]
fn a_bound_prefers_the_tightest_candidate_that_covers_the_data() {
    let candidates = sluice_policy::dp::auto::magnitude_candidates();
    let values: Vec<f64> = (0..60_000)
        .map(|i| 0.5 + 4.85 * f64::from(i) / 60_000.0)
        .collect();
    let (mut loose, mut far) = (0, 0);
    for _ in 0..200 {
        let (chosen, info) = release_bound(values.clone(), &candidates, 0.969, 0.0102).unwrap();
        assert!(info.epsilon <= 0.0102, "{}", info.epsilon);
        assert!(chosen >= 4.0, "{chosen}: below the data's 0.969-quantile");
        loose += usize::from(chosen >= 12.0);
        far += usize::from(chosen > 100.0);
    }
    assert!(loose <= 20, "{loose} of 200 draws chose 12 or more");
    assert_eq!(far, 0, "{far} of 200 draws chose above 100");
}

/// The bound's ε is what OpenDP's noisy max charges at the score's
/// sensitivity, `max(α, 1 - α)` in units of 1/10,000, and no more.
#[test]
fn a_bound_spends_what_the_map_says() {
    for (alpha, epsilon) in [(0.5, 1.0), (0.9, 0.01), (0.99, 0.3)] {
        let (_, info) =
            release_bound(vec![1.0, 2.0], &[0.0, 1.0, 2.0, 4.0], alpha, epsilon).unwrap();
        assert!(
            info.epsilon <= epsilon,
            "{alpha} {epsilon}: {}",
            info.epsilon
        );
        assert!(
            info.epsilon > epsilon * 0.999,
            "{alpha} {epsilon}: {}",
            info.epsilon
        );
        let d_in = ((alpha * 10_000.0_f64).round() as u64)
            .max(10_000 - (alpha * 10_000.0_f64).round() as u64);
        assert_eq!(
            bound_measurement(info.scale).unwrap().map(&d_in).unwrap(),
            info.epsilon
        );
    }
}
