//! The one grammar of budget periods (`sluice_policy::dp::Period`): what a
//! policy may write, its canonical form, and the windows it keys.

use chrono::{NaiveDate, TimeDelta, TimeZone, Utc};
use sluice_policy::dp::{MAX_WINDOW_DAYS, Period};

fn at(y: i32, m: u32, d: u32) -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, 12, 0, 0).unwrap()
}

#[test]
fn period_keys_and_names() {
    let t = Utc.with_ymd_and_hms(2026, 11, 29, 23, 59, 59).unwrap();
    assert_eq!(Period::Day.key(t), "2026-11-29");
    assert_eq!(Period::Month.key(t), "2026-11");
    assert_eq!(Period::Year.key(t), "2026");
    assert_eq!(Period::Total.key(t), "total");
    assert_eq!(Period::Days(30).key(t), "2026-11-03..2026-12-02");
    assert_eq!(Period::Days(7).key(t), "2026-11-26..2026-12-02");
    assert_eq!(Period::Days(1).key(t), "2026-11-29..2026-11-29");
    // One grammar, exactly as a policy writes it: no aliases, no case
    // folding, no surrounding spaces.
    for text in ["weekly", "Monthly", " month", "daily", "lifetime"] {
        assert!(text.parse::<Period>().is_err(), "{text:?}");
    }
    let all = [
        Period::Day,
        Period::Month,
        Period::Year,
        Period::Total,
        Period::Days(1),
        Period::Days(30),
        Period::Days(MAX_WINDOW_DAYS),
    ];
    for period in all {
        assert_eq!(period.as_str().parse::<Period>(), Ok(period));
        assert_eq!(period.to_string(), period.as_str());
    }
    assert_eq!(Period::Days(30).as_str(), "30d");
}

#[test]
fn n_day_periods_parse_in_several_spellings_within_range() {
    for (text, days) in [
        ("30d", 30),
        ("30 days", 30),
        ("30days", 30),
        ("1d", 1),
        ("1 day", 1),
        ("7 days", 7),
        ("3660d", 3660),
    ] {
        assert_eq!(text.parse::<Period>(), Ok(Period::Days(days)), "{text:?}");
    }
    for text in [
        "0d",
        "-3d",
        "+3d",
        "3661d",
        "30x",
        "d",
        "days",
        "3 0d",
        "30 d ays",
        "1.5d",
        "30dd",
        "99999999999d",
        "30",
        " 30D ",
        "7 Days",
    ] {
        assert!(text.parse::<Period>().is_err(), "{text:?}");
    }
    assert!(Period::Days(30).is_valid());
    assert!(!Period::Days(0).is_valid());
    assert!(!Period::Days(MAX_WINDOW_DAYS + 1).is_valid());
}

#[test]
fn n_day_windows_are_fixed_blocks_anchored_at_the_epoch() {
    let day = |y, m, d| Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap();
    let thirty = Period::Days(30);
    // Window 0 starts on 1970-01-01; the day before is the last of window -1.
    assert_eq!(thirty.key(day(1970, 1, 1)), "1970-01-01..1970-01-30");
    assert_eq!(thirty.key(day(1969, 12, 31)), "1969-12-02..1969-12-31");
    // 2026-11-03 is day 20,760 = 692 × 30.
    let first = day(2026, 11, 3);
    let last = Utc.with_ymd_and_hms(2026, 12, 2, 23, 59, 59).unwrap();
    let window = "2026-11-03..2026-12-02";
    assert_eq!(thirty.key(first), window);
    assert_eq!(thirty.key(at(2026, 11, 17)), window);
    assert_eq!(thirty.key(last), window);
    assert_eq!(
        thirty.key(first - TimeDelta::seconds(1)),
        "2026-10-04..2026-11-02"
    );
    assert_eq!(
        thirty.key(last + TimeDelta::seconds(1)),
        "2026-12-03..2027-01-01"
    );
    // Every day of a long stretch is in exactly one window of N days,
    // and the windows are consecutive.
    for n in [1, 2, 7, 30, 365, MAX_WINDOW_DAYS] {
        let period = Period::Days(n);
        let mut previous = period.key(day(1999, 1, 1));
        let mut length = 1;
        for offset in 1..3 * i64::from(n.min(400)) {
            let t = day(1999, 1, 1) + TimeDelta::days(offset);
            let key = period.key(t);
            let (a, b) = key.split_once("..").unwrap();
            assert!(a <= &t.format("%Y-%m-%d").to_string()[..] && *b >= *a);
            if key == previous {
                length += 1;
            } else {
                let (_, previous_last) = previous.split_once("..").unwrap();
                let next_first = NaiveDate::parse_from_str(previous_last, "%Y-%m-%d")
                    .unwrap()
                    .succ_opt()
                    .unwrap();
                assert_eq!(a, next_first.format("%Y-%m-%d").to_string(), "n = {n}");
                previous = key;
                length = 1;
            }
            assert!(length <= n, "n = {n}: a window longer than {n} days");
        }
    }
}

#[test]
fn reset_is_the_start_of_the_next_window() {
    let t = Utc.with_ymd_and_hms(2026, 12, 31, 18, 30, 0).unwrap();
    let midnight = |y, m, d| Some(Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap());
    assert_eq!(Period::Day.resets_at(t), midnight(2027, 1, 1));
    assert_eq!(Period::Month.resets_at(t), midnight(2027, 1, 1));
    assert_eq!(
        Period::Month.resets_at(at(2026, 2, 14)),
        midnight(2026, 3, 1)
    );
    assert_eq!(
        Period::Year.resets_at(at(2026, 2, 14)),
        midnight(2027, 1, 1)
    );
    assert_eq!(Period::Total.resets_at(t), None);
    assert_eq!(
        Period::Days(30).resets_at(at(2026, 11, 29)),
        midnight(2026, 12, 3)
    );
    assert_eq!(
        Period::Days(30).resets_at(Utc.with_ymd_and_hms(2026, 12, 2, 23, 59, 59).unwrap()),
        midnight(2026, 12, 3)
    );
    assert_eq!(
        Period::Days(30).resets_at(midnight(2026, 12, 3).unwrap()),
        midnight(2027, 1, 2)
    );
    // The reset is the first instant of the next key.
    let reset = Period::Days(7).resets_at(t).unwrap();
    assert_ne!(
        Period::Days(7).key(reset - TimeDelta::microseconds(1)),
        Period::Days(7).key(reset)
    );
    assert_eq!(
        Period::Days(7).key(reset - TimeDelta::microseconds(1)),
        Period::Days(7).key(t)
    );
}
