//! Zero-concentrated differential privacy (zCDP) for budgets with
//! `accounting: zcdp`.
//!
//! A query under such a budget costs ρ instead of (ε, δ), and the ρ of
//! successive queries add up (Bun & Steinke 2016, Lemma 2.3). ρ-zCDP implies
//! (ρ + 2·√(ρ·ln(1/δ)), δ)-DP for every δ > 0 (their Proposition 1.3): the
//! ledger converts the summed ρ with that bound, so k queries of ρ each cost
//! about √k times one query's ε instead of k times. Both directions use the
//! same closed form, so a query that asks for ε at δ is charged exactly the ρ
//! whose conversion is that ε, and the noise is calibrated to that ρ.

/// The largest ρ whose conversion at `delta` is at most `epsilon`:
/// `(√(ln(1/δ) + ε) − √ln(1/δ))²`, written without the cancellation.
/// `epsilon` must be positive and `delta` in (0, 1).
pub fn rho_for_epsilon(epsilon: f64, delta: f64) -> f64 {
    let log_term = (1.0 / delta).ln();
    let root = epsilon / ((log_term + epsilon).sqrt() + log_term.sqrt());
    // Rounding can push the square a few ulps above the exact inverse: step
    // down until the conversion fits, so that the query never costs more
    // than the ε it asked for.
    let mut rho = root * root;
    while rho > 0.0 && epsilon_for_rho(rho, delta) > epsilon {
        rho = rho.next_down();
    }
    rho
}

/// The ε that `rho`-zCDP guarantees at `delta`: `ρ + 2·√(ρ·ln(1/δ))`.
/// Infinite when `delta` is 0 (zCDP gives no pure ε-DP guarantee).
pub fn epsilon_for_rho(rho: f64, delta: f64) -> f64 {
    if rho <= 0.0 {
        return 0.0;
    }
    if delta <= 0.0 {
        return f64::INFINITY;
    }
    // δ ≥ 1 promises nothing; the bound then degenerates to ρ.
    rho + 2.0 * (rho * (1.0 / delta).ln().max(0.0)).sqrt()
}

/// The ε each of `releases` pure ε-DP mechanisms may use when together they
/// are paid `rho`: an ε-DP mechanism is ε²/2-zCDP (Bun & Steinke,
/// Proposition 1.4), so `releases · ε²/2 ≤ ρ` for ε = √(2ρ / releases),
/// stepped down by ulps where rounding would put the product above ρ.
pub fn pure_epsilon(rho: f64, releases: u64) -> f64 {
    let releases = releases.max(1) as f64;
    let mut epsilon = (2.0 * rho / releases).sqrt();
    while epsilon > 0.0 && releases * epsilon * epsilon / 2.0 > rho {
        epsilon = epsilon.next_down();
    }
    epsilon
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_conversions_are_inverse_and_never_overcharge() {
        for epsilon in [1e-6, 0.01, 0.1, 0.5, 1.0, 3.0, 10.0] {
            for delta in [1e-12, 1e-7, 1e-5, 5e-4] {
                let rho = rho_for_epsilon(epsilon, delta);
                let back = epsilon_for_rho(rho, delta);
                assert!(back <= epsilon, "ε {epsilon} δ {delta}: {back}");
                assert!(
                    back > epsilon * (1.0 - 1e-9),
                    "ε {epsilon} δ {delta}: {back}"
                );
            }
        }
    }

    #[test]
    fn composing_in_rho_beats_adding_epsilons() {
        // 100 queries of ε 0.1 at δ 1e-7: 10 ε when the ε add up, well
        // under 2 ε when their ρ do (converted at a budget δ of 1e-6).
        let rho = rho_for_epsilon(0.1, 1e-7);
        let total = epsilon_for_rho(100.0 * rho, 1e-6);
        assert!(total < 2.0, "{total}");
        // One query alone is never cheaper in zCDP than its own ε.
        assert!(epsilon_for_rho(rho, 1e-7) <= 0.1);
    }

    #[test]
    fn pure_mechanisms_paid_in_rho_never_exceed_it() {
        let mut rho = 1e-9;
        while rho < 10.0 {
            for releases in [1, 2, 3, 7, 10, 50, 1 << 16] {
                let epsilon = pure_epsilon(rho, releases);
                let cost = releases as f64 * epsilon * epsilon / 2.0;
                assert!(cost <= rho, "ρ {rho} over {releases}: {cost}");
                assert!(
                    cost > rho * (1.0 - 1e-12),
                    "ρ {rho} over {releases}: {cost}"
                );
            }
            rho *= 1.37;
        }
    }

    #[test]
    fn no_delta_no_guarantee() {
        assert_eq!(epsilon_for_rho(0.5, 0.0), f64::INFINITY);
        assert_eq!(epsilon_for_rho(0.0, 0.0), 0.0);
    }
}
