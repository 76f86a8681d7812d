//! The one grammar of budget periods, shared by the policy compiler (which
//! reads `budget.period`) and the privacy ledger (which keys accounts by
//! the period's window).
//!
//! A policy writes `day`, `month`, `year`, `total`, or an N-day window as
//! `30d`, `30days`, `30 days` (`1 day` too). The canonical form, stored in
//! the ledger and shown in the catalog, is `day`, `month`, `year`, `total`
//! or `30d`.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, NaiveDate, NaiveTime, TimeDelta, Utc};

/// The longest N-day window a budget may use (about ten years).
pub const MAX_WINDOW_DAYS: u32 = 3660;

/// The window a budget limit applies to. All windows are in UTC and fixed
/// (calendar days, months and years, or N-day blocks anchored at the
/// epoch), never rolling: spend in one window does not count in the next,
/// so a consumer may spend a whole budget at the end of one window and a
/// whole budget again at the start of the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    Day,
    Month,
    Year,
    Total,
    /// Consecutive windows of N whole UTC days, anchored at 1970-01-01: the
    /// window of a day is `floor(days since 1970-01-01 / N)`, so windows
    /// never overlap, every day is in exactly one, and they do not move
    /// with the first charge. N is 1 to [`MAX_WINDOW_DAYS`].
    Days(u32),
}

/// A text that is not a budget period.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeriodError {
    #[error(
        "`{0}` is out of range: a window of N days (`30d`, `30 days`) needs N from 1 to {MAX_WINDOW_DAYS}"
    )]
    OutOfRange(String),
    #[error(
        "`{0}` is not a period; use day, month, year, total, or a window of N days written `30d` or `30 days` (N from 1 to {MAX_WINDOW_DAYS})"
    )]
    Unknown(String),
}

impl FromStr for Period {
    type Err = PeriodError;

    fn from_str(text: &str) -> Result<Self, PeriodError> {
        match text {
            "day" => return Ok(Self::Day),
            "month" => return Ok(Self::Month),
            "year" => return Ok(Self::Year),
            "total" => return Ok(Self::Total),
            _ => {}
        }
        match window_days(text) {
            Some(n) if (1..=u64::from(MAX_WINDOW_DAYS)).contains(&n) => Ok(Self::Days(n as u32)),
            Some(_) => Err(PeriodError::OutOfRange(text.to_string())),
            None => Err(PeriodError::Unknown(text.to_string())),
        }
    }
}

impl Period {
    /// The canonical name: `day`, `month`, `year`, `total`, or `30d` for a
    /// 30-day window. It parses back to the same period.
    pub fn as_str(&self) -> std::borrow::Cow<'static, str> {
        match self {
            Self::Day => "day".into(),
            Self::Month => "month".into(),
            Self::Year => "year".into(),
            Self::Total => "total".into(),
            Self::Days(n) => format!("{n}d").into(),
        }
    }

    /// Whether the period can be used: an N-day window needs N from 1 to
    /// [`MAX_WINDOW_DAYS`] (the variant is public, so it can be built with
    /// any N).
    pub fn is_valid(&self) -> bool {
        match self {
            Self::Days(n) => (1..=MAX_WINDOW_DAYS).contains(n),
            _ => true,
        }
    }

    /// The key of the window containing `at` (UTC): `2026-11-29`, `2026-11`,
    /// `2026`, `total`, or for N-day windows the first and last day of the
    /// window, both inclusive, joined by `..`: `2026-11-03..2026-12-02` for
    /// the 30-day window that holds 2026-11-29. An N-day key names its
    /// length, so keys of different periods never collide.
    pub fn key(&self, at: DateTime<Utc>) -> String {
        match self {
            Self::Day => at.format("%Y-%m-%d").to_string(),
            Self::Month => at.format("%Y-%m").to_string(),
            Self::Year => at.format("%Y").to_string(),
            Self::Total => "total".to_string(),
            Self::Days(n) => {
                let (first, last) = day_window(*n, at.date_naive());
                format!("{}..{}", first.format("%Y-%m-%d"), last.format("%Y-%m-%d"))
            }
        }
    }

    /// When the window containing `at` ends and the budget starts afresh:
    /// 00:00 UTC of the next day, of the first day of the next month or
    /// year, or of the first day of the next N-day window. `None` for
    /// `total`, which never resets (and at the end of representable time).
    pub fn resets_at(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let today = at.date_naive();
        let next = match self {
            Self::Total => return None,
            Self::Day => today.succ_opt()?,
            Self::Month => {
                let (year, month) = match today.month() {
                    12 => (today.year().checked_add(1)?, 1),
                    month => (today.year(), month + 1),
                };
                NaiveDate::from_ymd_opt(year, month, 1)?
            }
            Self::Year => NaiveDate::from_ymd_opt(today.year().checked_add(1)?, 1, 1)?,
            Self::Days(n) => day_window(*n, today).1.succ_opt()?,
        };
        Some(next.and_time(NaiveTime::MIN).and_utc())
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str())
    }
}

/// N of `Nd`, `Ndays`, `N days` or `N day`, if `text` has that shape (plain
/// decimal digits, no sign); u64::MAX when N does not fit in a u64.
fn window_days(text: &str) -> Option<u64> {
    let digits = [" days", "days", " day", "day", "d"]
        .into_iter()
        .find_map(|unit| text.strip_suffix(unit))?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(digits.parse().unwrap_or(u64::MAX))
}

/// The first and last day (inclusive) of the `n`-day window holding `day`:
/// window `floor(days since 1970-01-01 / n)`. `n` of 0 is treated as 1 so
/// that this never divides by zero; the ledger refuses it anyway.
fn day_window(n: u32, day: NaiveDate) -> (NaiveDate, NaiveDate) {
    let n = i64::from(n.max(1));
    let since_epoch = (day - DateTime::UNIX_EPOCH.date_naive()).num_days();
    let offset = since_epoch.rem_euclid(n);
    // Both ends stay within chrono's range except within n days of it.
    let first = day
        .checked_sub_signed(TimeDelta::days(offset))
        .unwrap_or(NaiveDate::MIN);
    let last = first
        .checked_add_signed(TimeDelta::days(n - 1))
        .unwrap_or(NaiveDate::MAX);
    (first, last)
}
