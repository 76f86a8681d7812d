use super::*;
use chrono::TimeZone;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

const HUNDREDTH: i64 = 10_000_000;
const ONE: i64 = 1_000_000_000;
const MICRO_DELTA: i64 = 1_000_000_000_000;

fn at(year: i32, month: u32, day: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(year, month, day, 12, 0, 0).unwrap()
}

fn account(period: Period, limit_epsilon: i64) -> Account {
    Account {
        organization: "acme".into(),
        dataset: "patients".into(),
        period,
        limit_epsilon,
        limit_delta: 10 * MICRO_DELTA,
    }
}

fn eps(epsilon: i64) -> Charge {
    Charge {
        epsilon,
        ..Charge::default()
    }
}

fn rho(rho: i64) -> Charge {
    Charge {
        rho,
        ..Charge::default()
    }
}

fn temp_ledger() -> (tempfile::TempDir, Ledger) {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&dir.path().join("ledger.db")).unwrap();
    (dir, ledger)
}

#[test]
fn units_are_exact_and_round_up() {
    assert_eq!(epsilon_units(0.01).unwrap(), 10_000_000);
    assert_eq!(epsilon_units(1.0).unwrap(), 1_000_000_000);
    assert_eq!(epsilon_units(0.1 + 0.2).unwrap(), 300_000_000);
    assert_eq!(epsilon_units(0.0).unwrap(), 0);
    assert_eq!(epsilon_units(1.000_000_000_1).unwrap(), 1_000_000_001);
    assert_eq!(epsilon_units(1.5e-9).unwrap(), 2);
    assert_eq!(
        epsilon_units(1e-15).unwrap(),
        1,
        "a positive charge is never free"
    );
    assert_eq!(epsilon_limit_units(1.000_000_000_9).unwrap(), 1_000_000_000);
    assert_eq!(delta_units(1e-5).unwrap(), 10_000_000_000_000);
    assert_eq!(delta_units(1e-9).unwrap(), 1_000_000_000);
    assert_eq!(
        (0..100).map(|_| epsilon_units(0.01).unwrap()).sum::<i64>(),
        epsilon_units(1.0).unwrap()
    );
    assert_eq!(epsilon_from_units(10_000_000), 0.01);
    assert_eq!(delta_from_units(10_000_000_000_000), 1e-5);
    for bad in [f64::NAN, f64::INFINITY, -0.1, 1e20] {
        assert!(
            matches!(epsilon_units(bad), Err(LedgerError::InvalidAmount { .. })),
            "{bad}"
        );
    }
}

#[test]
fn n_day_spend_does_not_carry_into_the_next_window() {
    let (_dir, ledger) = temp_ledger();
    let acct = account(Period::Days(30), ONE);
    let last_day = at(2026, 12, 2);
    let next_first_day = at(2026, 12, 3);
    // The whole budget on the first day of one window...
    ledger.reserve(&acct, eps(ONE), at(2026, 11, 3)).unwrap();
    let balance = ledger.balance(&acct, last_day).unwrap();
    assert_eq!(
        (balance.period_key.as_str(), balance.spent_epsilon),
        ("2026-11-03..2026-12-02", ONE)
    );
    assert!(matches!(
        ledger.reserve(&acct, eps(1), last_day),
        Err(LedgerError::Exhausted { ref period_key, .. }) if period_key == "2026-11-03..2026-12-02"
    ));
    // ...and again on the first day of the next: fixed windows, not rolling.
    let next = ledger.reserve(&acct, eps(ONE), next_first_day).unwrap();
    assert_eq!(next.period_key, "2026-12-03..2027-01-01");
    assert_eq!(next.remaining.remaining_epsilon(), 0);
    assert_eq!(ledger.balance(&acct, last_day).unwrap().spent_epsilon, ONE);

    // balances() lists the window current at the given time only.
    let monthly = account(Period::Month, ONE);
    ledger.reserve(&monthly, eps(HUNDREDTH), last_day).unwrap();
    let current = |t| {
        ledger
            .balances(Some("acme"), t)
            .unwrap()
            .into_iter()
            .map(|b| (b.period_key, b.spent_epsilon))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        current(last_day),
        [
            ("2026-11-03..2026-12-02".to_string(), ONE),
            ("2026-12".to_string(), HUNDREDTH)
        ]
    );
    assert_eq!(
        current(at(2027, 1, 1)),
        [("2026-12-03..2027-01-01".to_string(), ONE)]
    );
    assert!(current(at(2027, 1, 2)).is_empty());
    ledger.verify().unwrap();
}

#[test]
fn budget_of_ten_allows_exactly_twenty_half_epsilon_charges_per_30_days() {
    let (_dir, ledger) = temp_ledger();
    let acct = account(Period::Days(30), 10 * ONE);
    let half = eps(epsilon_units(0.5).unwrap());
    // Spread over the window 2026-11-03..2026-12-02, the last on its last day.
    let days: Vec<_> = (0..21)
        .map(|i| at(2026, 11, 3) + TimeDelta::days((i * 29 / 20).min(29)))
        .collect();
    let mut ok = 0;
    for t in &days {
        match ledger.reserve(&acct, half, *t) {
            Ok(reservation) => {
                assert_eq!(reservation.period_key, "2026-11-03..2026-12-02");
                ok += 1;
            }
            Err(LedgerError::Exhausted { .. }) => {}
            Err(err) => panic!("unexpected error: {err}"),
        }
    }
    assert_eq!(ok, 20);
    let balance = ledger.balance(&acct, at(2026, 12, 2)).unwrap();
    assert_eq!((balance.spent_epsilon, balance.queries), (10 * ONE, 20));
    // The next window has its own 10 ε.
    for _ in 0..20 {
        ledger.reserve(&acct, half, at(2026, 12, 3)).unwrap();
    }
    assert!(ledger.reserve(&acct, half, at(2027, 1, 1)).is_err());
    ledger.verify().unwrap();
}

#[test]
fn invalid_n_day_windows_are_refused() {
    let (_dir, ledger) = temp_ledger();
    for n in [0, MAX_WINDOW_DAYS + 1] {
        let acct = account(Period::Days(n), ONE);
        let err = ledger.reserve(&acct, eps(1), at(2026, 11, 29)).unwrap_err();
        assert!(matches!(err, LedgerError::InvalidPeriod { .. }), "{err:?}");
        assert!(ledger.balance(&acct, at(2026, 11, 29)).is_err());
    }
    // The database refuses them too, and any other name.
    let conn = ledger.lock();
    let insert = |period: &str| {
        conn.execute(
                "INSERT INTO accounts (organization, dataset, period_key, period, limit_epsilon, limit_delta, updated_at)
                 VALUES ('x', 'y', ?1, ?1, 0, 0, 'now')",
                [period],
            )
    };
    for bad in [
        "0d", "3661d", "9999d", "030d", "30x", "30 days", "d", "week",
    ] {
        assert!(insert(bad).is_err(), "{bad}");
    }
    for good in ["1d", "30d", "3660d", "day", "month", "year", "total"] {
        insert(good).unwrap();
    }
    assert!(SCHEMA.contains(&format!("<= {MAX_WINDOW_DAYS})")));
    assert!(MIGRATE_V1_TO_V2.contains(&format!("<= {MAX_WINDOW_DAYS})")));
}

/// The version 1 schema exactly as version 1 builds created it.
const SCHEMA_V1: &str = "
CREATE TABLE schema_version (
    version INTEGER NOT NULL
);
CREATE TABLE accounts (
    organization      TEXT    NOT NULL,
    dataset           TEXT    NOT NULL,
    period_key        TEXT    NOT NULL,
    period            TEXT    NOT NULL CHECK (period IN ('day', 'month', 'year', 'total')),
    limit_epsilon     INTEGER NOT NULL CHECK (limit_epsilon >= 0),
    limit_delta       INTEGER NOT NULL CHECK (limit_delta >= 0),
    committed_epsilon INTEGER NOT NULL DEFAULT 0 CHECK (committed_epsilon >= 0),
    committed_delta   INTEGER NOT NULL DEFAULT 0 CHECK (committed_delta >= 0),
    reserved_epsilon  INTEGER NOT NULL DEFAULT 0 CHECK (reserved_epsilon >= 0),
    reserved_delta    INTEGER NOT NULL DEFAULT 0 CHECK (reserved_delta >= 0),
    queries           INTEGER NOT NULL DEFAULT 0 CHECK (queries >= 0),
    updated_at        TEXT    NOT NULL,
    PRIMARY KEY (organization, dataset, period_key)
);
CREATE TABLE reservations (
    id           TEXT    PRIMARY KEY,
    organization TEXT    NOT NULL,
    dataset      TEXT    NOT NULL,
    period_key   TEXT    NOT NULL,
    epsilon      INTEGER NOT NULL CHECK (epsilon >= 0),
    delta        INTEGER NOT NULL CHECK (delta >= 0),
    state        TEXT    NOT NULL CHECK (state IN ('reserved', 'started', 'committed', 'refunded')),
    created_at   TEXT    NOT NULL,
    updated_at   TEXT    NOT NULL,
    expires_at   TEXT    NOT NULL,
    FOREIGN KEY (organization, dataset, period_key)
        REFERENCES accounts (organization, dataset, period_key)
);
CREATE INDEX reservations_by_expiry ON reservations (state, expires_at);
CREATE INDEX reservations_by_account ON reservations (organization, dataset, period_key);
CREATE TABLE answer_cache (
    organization TEXT NOT NULL,
    cache_key    TEXT NOT NULL,
    period_key   TEXT NOT NULL,
    answer       BLOB NOT NULL,
    created_at   TEXT NOT NULL,
    PRIMARY KEY (organization, cache_key, period_key)
);
INSERT INTO schema_version (version) VALUES (1);
";

/// A version 1 ledger with spend, as a version 1 build would leave it:
/// acme/patients in 2026-11 has 0.3 ε committed and 0.2 ε reserved
/// (one refunded reservation besides), plus a total account and a
/// cached answer.
fn write_v1_ledger(path: &Path, extra_sql: &str) {
    let conn = Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.execute_batch(SCHEMA_V1).unwrap();
    conn.execute_batch(
            "INSERT INTO accounts VALUES ('acme', 'patients', '2026-11', 'month', 1000000000, 10000000000000,
                 300000000, 0, 200000000, 1000000000000, 2, '2026-11-20T10:00:00.000000Z');
             INSERT INTO accounts VALUES ('acme', 'visits', 'total', 'total', 5000000000, 0,
                 10000000, 0, 0, 0, 1, '2026-11-20T10:00:00.000000Z');
             INSERT INTO reservations VALUES
                 ('r-committed', 'acme', 'patients', '2026-11', 300000000, 0, 'committed',
                  '2026-11-20T10:00:00.000000Z', '2026-11-20T10:00:01.000000Z', '2026-11-20T10:15:00.000000Z'),
                 ('r-started', 'acme', 'patients', '2026-11', 200000000, 1000000000000, 'started',
                  '2026-11-20T10:00:00.000000Z', '2026-11-20T10:00:01.000000Z', '2026-11-20T10:15:00.000000Z'),
                 ('r-refunded', 'acme', 'patients', '2026-11', 400000000, 0, 'refunded',
                  '2026-11-20T10:00:00.000000Z', '2026-11-20T10:00:01.000000Z', '2026-11-20T10:15:00.000000Z'),
                 ('r-total', 'acme', 'visits', 'total', 10000000, 0, 'committed',
                  '2026-11-20T10:00:00.000000Z', '2026-11-20T10:00:01.000000Z', '2026-11-20T10:15:00.000000Z');
             INSERT INTO answer_cache VALUES ('acme', 'q1', '2026-11', X'0102', '2026-11-20T10:00:01.000000Z');",
        )
        .unwrap();
    conn.execute_batch(extra_sql).unwrap();
}

/// The schema as SQLite reports it, with the quotes a rename adds removed.
fn schema_of(conn: &Connection) -> Vec<(String, String, Option<String>)> {
    let mut stmt = conn
        .prepare("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")
        .unwrap();
    stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .unwrap()
        .map(|row| {
            let (kind, name, sql): (String, String, Option<String>) = row.unwrap();
            (
                kind,
                name,
                sql.map(|s| s.replace("\"accounts\"", "accounts")),
            )
        })
        .collect()
}

#[test]
fn version_1_ledger_is_migrated_keeping_its_spend() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    write_v1_ledger(&path, "");

    let ledger = Ledger::open(&path).unwrap();
    let monthly = account(Period::Month, ONE);
    let november = at(2026, 11, 29);
    let balance = ledger.balance(&monthly, november).unwrap();
    assert_eq!(
        (
            balance.spent_epsilon,
            balance.reserved_epsilon,
            balance.spent_delta,
            balance.queries
        ),
        (500_000_000, 200_000_000, MICRO_DELTA, 2)
    );
    let lifetime = Account {
        dataset: "visits".into(),
        ..account(Period::Total, 5 * ONE)
    };
    assert_eq!(
        ledger.balance(&lifetime, november).unwrap().spent_epsilon,
        HUNDREDTH
    );
    assert_eq!(
        ledger.reservation("r-refunded").unwrap().unwrap().state,
        State::Refunded
    );
    assert_eq!(
        ledger
            .cache_get("acme", "q1", "2026-11")
            .unwrap()
            .as_deref(),
        Some(&[1u8, 2][..])
    );
    ledger.verify().unwrap();
    // The old spend still limits: 0.5 ε of 1.0 remain.
    assert!(matches!(
        ledger.reserve(&monthly, eps(600_000_000), november),
        Err(LedgerError::Exhausted {
            remaining_epsilon: 500_000_000,
            ..
        })
    ));
    // The reservation still in flight can be committed after the upgrade.
    ledger.commit("r-started").unwrap();
    // An N-day window can be charged now.
    let window = ledger
        .reserve(&account(Period::Days(30), ONE), eps(HUNDREDTH), november)
        .unwrap();
    assert_eq!(window.period_key, "2026-11-03..2026-12-02");
    ledger.verify().unwrap();
    let foreign_keys: i64 = ledger
        .lock()
        .query_row("PRAGMA foreign_keys", [], |row| row.get(0))
        .unwrap();
    assert_eq!(
        foreign_keys, 1,
        "foreign keys are back on after the upgrade"
    );
    drop(ledger);

    // Upgraded, the file looks exactly like a new version 2 ledger, and
    // opening it again changes nothing.
    let fresh = dir.path().join("fresh.db");
    drop(Ledger::open(&fresh).unwrap());
    let migrated = Connection::open(&path).unwrap();
    let version: i64 = migrated
        .query_row("SELECT version FROM schema_version", [], |row| row.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    assert_eq!(
        schema_of(&migrated),
        schema_of(&Connection::open(&fresh).unwrap())
    );
    let reopened = Ledger::open(&path).unwrap();
    assert_eq!(
        reopened.balance(&monthly, november).unwrap().spent_epsilon,
        500_000_000
    );
    reopened.verify().unwrap();
}

#[test]
fn failed_migration_leaves_the_version_1_file_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    // A reservation without its account: the upgrade must not hide it.
    write_v1_ledger(
            &path,
            "PRAGMA foreign_keys = OFF;
             INSERT INTO reservations VALUES ('r-orphan', 'acme', 'ghost', '2026-11', 1, 0, 'committed',
                 '2026-11-20T10:00:00.000000Z', '2026-11-20T10:00:01.000000Z', '2026-11-20T10:15:00.000000Z');",
        );
    let err = Ledger::open(&path).unwrap_err();
    assert!(matches!(err, LedgerError::Inconsistent { .. }), "{err:?}");
    let conn = Connection::open(&path).unwrap();
    let version: i64 = conn
        .query_row("SELECT version FROM schema_version", [], |row| row.get(0))
        .unwrap();
    assert_eq!(version, 1);
    let accounts: i64 = conn
        .query_row("SELECT count(*) FROM accounts", [], |row| row.get(0))
        .unwrap();
    assert_eq!(accounts, 2);
    let leftovers: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = 'accounts_v2'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(leftovers, 0);
}

/// Makes 1,000 reservations of 0.01 ε against 1.0 ε from `threads`
/// threads; `handle` gives each thread its ledger. Returns (ok, exhausted).
fn hammer(threads: usize, handle: impl Fn() -> Arc<Ledger> + Sync) -> (usize, usize) {
    let next = AtomicUsize::new(0);
    let acct = account(Period::Month, ONE);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let ledger = handle();
                    let (mut ok, mut exhausted) = (0, 0);
                    while next.fetch_add(1, Ordering::Relaxed) < 1_000 {
                        match ledger.reserve(&acct, eps(HUNDREDTH), at(2026, 11, 29)) {
                            Ok(_) => ok += 1,
                            Err(LedgerError::Exhausted { .. }) => exhausted += 1,
                            Err(err) => panic!("unexpected error: {err}"),
                        }
                    }
                    (ok, exhausted)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().unwrap())
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
    })
}

fn assert_exactly_one_epsilon_spent(ledger: &Ledger, (ok, exhausted): (usize, usize)) {
    assert_eq!((ok, exhausted), (100, 900));
    let balance = ledger
        .balance(&account(Period::Month, ONE), at(2026, 11, 1))
        .unwrap();
    assert_eq!(balance.spent_epsilon, 1_000_000_000);
    assert_eq!(balance.remaining_epsilon(), 0);
    assert_eq!(balance.queries, 100);
    ledger.verify().unwrap();
}

#[test]
fn concurrent_reservations_on_shared_handle_never_overspend() {
    let (_dir, ledger) = temp_ledger();
    let ledger = Arc::new(ledger);
    let counts = hammer(16, || Arc::clone(&ledger));
    assert_exactly_one_epsilon_spent(&ledger, counts);
}

#[test]
fn concurrent_reservations_on_independent_handles_never_overspend() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    // Each thread opens its own connection, as separate processes would,
    // and they race to create the file and schema too.
    let counts = hammer(8, || Arc::new(Ledger::open(&path).unwrap()));
    assert_exactly_one_epsilon_spent(&Ledger::open(&path).unwrap(), counts);
}

#[test]
fn refund_commit_start_and_expiry_follow_the_life_cycle() {
    let (_dir, ledger) = temp_ledger();
    let acct = account(Period::Month, ONE);
    let t = at(2026, 11, 29);
    let spent = || ledger.balance(&acct, t).unwrap().spent_epsilon;
    let charge = Charge {
        epsilon: 300_000_000,
        delta: MICRO_DELTA,
        rho: 0,
    };
    let a = ledger.reserve(&acct, charge, t).unwrap();
    let b = ledger.reserve(&acct, charge, t).unwrap();
    assert_eq!(b.remaining.remaining_epsilon(), 400_000_000);
    assert_eq!(spent(), 600_000_000);

    assert!(ledger.refund(&a.id).unwrap());
    assert_eq!(spent(), 300_000_000);
    assert!(
        !ledger.refund(&a.id).unwrap(),
        "second refund gives nothing back"
    );
    assert!(matches!(
        ledger.commit(&a.id),
        Err(LedgerError::Refunded { .. })
    ));
    assert!(
        !ledger.start(&a.id).unwrap(),
        "a refunded ticket cannot start"
    );

    assert!(ledger.start(&b.id).unwrap());
    assert!(!ledger.start(&b.id).unwrap(), "start is single-use");
    ledger.commit(&b.id).unwrap();
    ledger.commit(&b.id).unwrap();
    let after_commit = ledger.balance(&acct, t).unwrap();
    assert_eq!(
        (after_commit.spent_epsilon, after_commit.reserved_epsilon),
        (300_000_000, 0)
    );
    assert_eq!(
        (after_commit.spent_delta, after_commit.queries),
        (MICRO_DELTA, 1)
    );
    assert!(!ledger.refund(&b.id).unwrap(), "committed spend is final");
    assert_eq!(ledger.balance(&acct, t).unwrap(), after_commit);

    assert!(matches!(
        ledger.commit("nope"),
        Err(LedgerError::UnknownReservation { .. })
    ));
    assert!(!ledger.refund("nope").unwrap());
    assert!(!ledger.start("nope").unwrap());
    ledger.verify().unwrap();
}

#[test]
fn expire_unstarted_refunds_only_expired_unstarted_tickets() {
    let (_dir, ledger) = temp_ledger();
    let acct = account(Period::Month, ONE);
    let t = at(2026, 11, 29);
    let short = TimeDelta::minutes(1);
    let expiring = ledger
        .reserve_with_ttl(&acct, eps(HUNDREDTH), t, short)
        .unwrap();
    let running = ledger
        .reserve_with_ttl(&acct, eps(HUNDREDTH), t, short)
        .unwrap();
    let fresh = ledger
        .reserve_with_ttl(&acct, eps(HUNDREDTH), t, TimeDelta::hours(1))
        .unwrap();
    assert!(ledger.start(&running.id).unwrap());

    assert_eq!(
        ledger.expire_unstarted(t + TimeDelta::seconds(30)).unwrap(),
        0
    );
    assert_eq!(
        ledger.expire_unstarted(t + TimeDelta::minutes(2)).unwrap(),
        1
    );
    assert_eq!(
        ledger.expire_unstarted(t + TimeDelta::minutes(2)).unwrap(),
        0
    );

    let state = |id: &str| ledger.reservation(id).unwrap().unwrap().state;
    assert_eq!(state(&expiring.id), State::Refunded);
    assert_eq!(state(&running.id), State::Started);
    assert_eq!(state(&fresh.id), State::Reserved);
    assert!(!ledger.start(&expiring.id).unwrap());
    assert_eq!(
        ledger.balance(&acct, t).unwrap().spent_epsilon,
        2 * HUNDREDTH
    );
    ledger.verify().unwrap();
}

#[test]
fn spend_survives_reopen_and_periods_roll_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let monthly = account(Period::Month, 500_000_000);
    let november = at(2026, 11, 30);
    let december = at(2026, 12, 1);
    {
        let ledger = Ledger::open(&path).unwrap();
        ledger
            .reserve(&monthly, eps(500_000_000), november)
            .unwrap();
    }
    let ledger = Ledger::open(&path).unwrap();
    assert_eq!(
        ledger.balance(&monthly, november).unwrap().spent_epsilon,
        500_000_000
    );
    assert!(matches!(
        ledger.reserve(&monthly, eps(1), november),
        Err(LedgerError::Exhausted { .. })
    ));
    assert_eq!(ledger.balance(&monthly, december).unwrap().spent_epsilon, 0);
    let in_december = ledger
        .reserve(&monthly, eps(500_000_000), december)
        .unwrap();
    assert_eq!(in_december.period_key, "2026-12");

    let lifetime = account(Period::Total, ONE);
    ledger.reserve(&lifetime, eps(HUNDREDTH), november).unwrap();
    assert_eq!(
        ledger
            .balance(&lifetime, at(2030, 1, 1))
            .unwrap()
            .spent_epsilon,
        HUNDREDTH
    );

    let now = ledger.balances(None, december).unwrap();
    let keys: Vec<_> = now.iter().map(|b| b.period_key.as_str()).collect();
    assert_eq!(keys, ["2026-12", "total"]);
    assert!(
        ledger
            .balances(Some("other-org"), december)
            .unwrap()
            .is_empty()
    );
    assert_eq!(ledger.balances(Some("acme"), november).unwrap().len(), 2);
}

#[test]
fn exhausted_error_names_the_remaining_budget() {
    let (_dir, ledger) = temp_ledger();
    let acct = account(Period::Month, ONE);
    ledger
        .reserve(&acct, eps(750_000_000), at(2026, 11, 29))
        .unwrap();
    let err = ledger
        .reserve(&acct, eps(500_000_000), at(2026, 11, 29))
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("acme on patients (2026-11): 0.25 ε and 0.00001 δ remain"),
        "{message}"
    );
    assert!(message.contains("needs 0.5 ε and 0 δ"), "{message}");
    assert!(matches!(
        err,
        LedgerError::Exhausted {
            remaining_epsilon: 250_000_000,
            ..
        }
    ));

    let too_much_delta = Charge {
        epsilon: 1,
        delta: 11 * MICRO_DELTA,
        rho: 0,
    };
    let err = ledger
        .reserve(&acct, too_much_delta, at(2026, 11, 29))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("needs 0.000000001 ε and 0.000011 δ"),
        "{err}"
    );
}

#[test]
fn bad_paths_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/such/dir/ledger.db");
    let err = Ledger::open(&missing).unwrap_err();
    assert!(matches!(err, LedgerError::Open { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );

    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, b"definitely not sqlite\n".repeat(300)).unwrap();
    let err = Ledger::open(&garbage).unwrap_err();
    assert!(matches!(err, LedgerError::Corrupt { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&garbage.display().to_string()),
        "{err}"
    );

    let foreign = dir.path().join("foreign.db");
    Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE users (name TEXT)")
        .unwrap();
    assert!(matches!(
        Ledger::open(&foreign),
        Err(LedgerError::NotALedger { .. })
    ));

    let newer = dir.path().join("newer.db");
    drop(Ledger::open(&newer).unwrap());
    Connection::open(&newer)
        .unwrap()
        .execute_batch("UPDATE schema_version SET version = 99")
        .unwrap();
    assert!(matches!(
        Ledger::open(&newer),
        Err(LedgerError::UnsupportedSchema { found: 99, .. })
    ));
}

#[test]
fn answer_cache_keeps_the_first_answer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    {
        let ledger = Ledger::open(&path).unwrap();
        assert_eq!(ledger.cache_get("acme", "q1", "2026-11").unwrap(), None);
        assert_eq!(
            ledger.cache_put("acme", "q1", "2026-11", b"first").unwrap(),
            b"first"
        );
        assert_eq!(
            ledger
                .cache_put("acme", "q1", "2026-11", b"second")
                .unwrap(),
            b"first"
        );
    }
    let ledger = Ledger::open(&path).unwrap();
    assert_eq!(
        ledger
            .cache_get("acme", "q1", "2026-11")
            .unwrap()
            .as_deref(),
        Some(&b"first"[..])
    );
    assert_eq!(ledger.cache_get("acme", "q1", "2026-12").unwrap(), None);
    assert_eq!(ledger.cache_get("globex", "q1", "2026-11").unwrap(), None);
}

const CRASH_CHILD_ENV: &str = "SLUICE_LEDGER_CRASH_CHILD_DB";
const CRASH_LINE: &str = "RESERVED ";
const CRASH_CHARGE: i64 = 1_000_000;

fn crash_account() -> Account {
    account(Period::Total, 1_000_000 * ONE)
}

/// Not a test on its own: when the crash test re-runs this binary with
/// the env var set, this reserves in a loop until it is killed. The loop
/// is bounded so that an orphaned child stops by itself.
#[test]
fn crash_child() {
    let Ok(db) = std::env::var(CRASH_CHILD_ENV) else {
        return;
    };
    let ledger = Ledger::open(Path::new(&db)).unwrap();
    for seq in 0..20_000 {
        let reservation = ledger
            .reserve(&crash_account(), eps(CRASH_CHARGE), Utc::now())
            .unwrap();
        // Stdout is line-buffered: the id reaches the pipe right here,
        // strictly after reserve() returned.
        println!("{CRASH_LINE}{}", reservation.id);
        if seq % 2 == 0 {
            ledger.start(&reservation.id).unwrap();
            ledger.commit(&reservation.id).unwrap();
        }
    }
}

/// The test name of `crash_child`, wherever this module is mounted.
fn crash_child_name() -> String {
    let module = module_path!();
    let in_crate = module.split_once("::").map_or(module, |(_, rest)| rest);
    format!("{in_crate}::crash_child")
}

/// Runs the child until it has printed `kill_after` ids, SIGKILLs it and
/// returns every id it printed.
fn run_and_kill_child(db: &Path, kill_after: usize, delay: Duration) -> Vec<String> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            &crash_child_name(),
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_CHILD_ENV, db)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let id_of = |line: std::io::Result<String>| {
        {
            // The harness prints `test ... ` on the same line as the first id.
            let line = line.unwrap();
            line.split_once(CRASH_LINE).map(|(_, id)| id.to_string())
        }
    };
    let mut ids = Vec::new();
    for line in lines.by_ref() {
        ids.extend(id_of(line));
        if ids.len() >= kill_after {
            break;
        }
    }
    std::thread::sleep(delay);
    child.kill().unwrap(); // SIGKILL on unix: no destructors, no flush.
    // Ids still in the pipe were printed after reserve() returned too.
    ids.extend(lines.filter_map(id_of));
    child.wait().unwrap();
    ids
}

#[test]
fn killed_process_never_loses_a_returned_reservation() {
    for (round, kill_after) in [3usize, 17, 42, 88].into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("ledger.db");
        let delay = Duration::from_micros(700 * round as u64);
        let ids = run_and_kill_child(&db, kill_after, delay);
        assert!(
            ids.len() >= kill_after,
            "child stopped early after {} ids",
            ids.len()
        );
        assert!(ids.len() < 20_000, "child finished before it was killed");

        let ledger = Ledger::open(&db).unwrap();
        for id in &ids {
            let record = ledger
                .reservation(id)
                .unwrap()
                .unwrap_or_else(|| panic!("{id} lost"));
            assert_ne!(record.state, State::Refunded, "{id}");
        }
        let spent = ledger
            .balance(&crash_account(), Utc::now())
            .unwrap()
            .spent_epsilon;
        assert!(
            spent >= ids.len() as i64 * CRASH_CHARGE,
            "round {round}: spent {spent} for {} ids",
            ids.len()
        );
        ledger.verify().unwrap();
    }
}

/// A page of the ledger overwritten on disk: refused when opened, with
/// what to do, and the file left as it was (never replaced by an empty
/// ledger, which would reset every budget).
#[test]
fn a_damaged_ledger_is_refused_at_open_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    let ledger = Ledger::open(&path).unwrap();
    let acct = account(Period::Month, ONE);
    let r = ledger
        .reserve(&acct, eps(HUNDREDTH), at(2026, 11, 29))
        .unwrap();
    ledger.commit(&r.id).unwrap();
    drop(ledger);
    let root: i64 = Connection::open(&path)
        .unwrap()
        .query_row(
            "SELECT rootpage FROM sqlite_master WHERE name = 'accounts'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let page = 4096 * (root as usize - 1);
    bytes[page..page + 64].fill(0xa5);
    std::fs::write(&path, &bytes).unwrap();
    let err = Ledger::open(&path).unwrap_err();
    assert!(
        matches!(
            err,
            LedgerError::Corrupt { .. } | LedgerError::Damaged { .. }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("restore it from a backup"), "{text}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "the file is untouched"
    );
}

/// ρ of one query of ε 0.1 at δ 1e-7, in pico-units.
fn rho_of_tenth() -> i64 {
    rho_units(zcdp::rho_for_epsilon(0.1, 1e-7)).unwrap()
}

#[test]
fn zcdp_charges_compose_exactly_and_convert_at_half_the_delta_limit() {
    let (_dir, ledger) = temp_ledger();
    // 1 ε and 10 µδ: ρ converts at 5 µδ.
    let acct = account(Period::Month, ONE);
    let t = at(2026, 11, 29);
    let per_query = rho_of_tenth();
    let mut admitted = 0_i64;
    let refusal = loop {
        match ledger.reserve(&acct, rho(per_query), t) {
            Ok(reservation) => {
                admitted += 1;
                ledger.commit(&reservation.id).unwrap();
            }
            Err(err) => break err,
        }
        assert!(admitted < 10_000, "the budget never ran out");
    };
    let balance = ledger.balance(&acct, t).unwrap();
    // The stored spend is the exact integer sum of the charges ...
    assert_eq!(balance.spent_rho, admitted * per_query);
    assert_eq!((balance.spent_epsilon, balance.spent_delta), (0, 0));
    // ... and the check is the conversion of that sum, at the boundary:
    let conversion_delta = 5 * MICRO_DELTA;
    let converted = |queries: i64| zcdp_epsilon_units(queries * per_query, conversion_delta);
    assert_eq!(balance.total_epsilon(), converted(admitted));
    assert!(converted(admitted) <= ONE);
    assert!(converted(admitted + 1) > ONE);
    assert_eq!(balance.total_delta(), conversion_delta);
    // Ten such queries would use up 1 ε under basic accounting.
    assert!(admitted > 100, "only {admitted} queries of ε 0.1 fit");
    match refusal {
        LedgerError::Exhausted {
            remaining_epsilon,
            needed_epsilon,
            remaining_delta,
            needed_delta,
            ..
        } => {
            assert_eq!(remaining_epsilon, ONE - converted(admitted));
            assert_eq!(
                needed_epsilon,
                converted(admitted + 1) - converted(admitted)
            );
            assert_eq!(remaining_delta, 5 * MICRO_DELTA);
            assert_eq!(needed_delta, 0, "the conversion's δ is already counted");
        }
        other => panic!("expected exhaustion, got {other:?}"),
    }
    ledger.verify().unwrap();
}

#[test]
fn zcdp_reservations_refund_and_commit_their_rho() {
    let (_dir, ledger) = temp_ledger();
    let acct = account(Period::Month, ONE);
    let t = at(2026, 11, 29);
    let charge = Charge {
        epsilon: 0,
        delta: MICRO_DELTA,
        rho: 12_345_678,
    };
    let a = ledger.reserve(&acct, charge, t).unwrap();
    let b = ledger.reserve(&acct, charge, t).unwrap();
    assert_eq!(b.remaining.spent_rho, 2 * 12_345_678);
    assert_eq!(b.remaining.reserved_rho, 2 * 12_345_678);
    // The selections' δ and the conversion's δ both count.
    assert_eq!(b.remaining.total_delta(), 2 * MICRO_DELTA + 5 * MICRO_DELTA);
    assert!(ledger.refund(&a.id).unwrap());
    ledger.commit(&b.id).unwrap();
    let balance = ledger.balance(&acct, t).unwrap();
    assert_eq!((balance.spent_rho, balance.reserved_rho), (12_345_678, 0));
    assert_eq!(balance.queries, 1);
    assert_eq!(ledger.reservation(&b.id).unwrap().unwrap().rho, 12_345_678);
    ledger.verify().unwrap();
}

#[test]
fn a_period_keeps_the_accounting_it_was_opened_with() {
    let (_dir, ledger) = temp_ledger();
    let acct = account(Period::Month, ONE);
    let (november, december) = (at(2026, 11, 29), at(2026, 12, 1));
    let basic = ledger.reserve(&acct, eps(HUNDREDTH), november).unwrap();
    // The policy now says zcdp: not in this period.
    let err = ledger
        .reserve(&acct, rho(rho_of_tenth()), november)
        .unwrap_err();
    match &err {
        LedgerError::AccountingChanged {
            opened,
            asked,
            period_key,
            ..
        } => assert_eq!(
            (*opened, *asked, period_key.as_str()),
            ("basic", "zcdp", "2026-11")
        ),
        other => panic!("expected AccountingChanged, got {other:?}"),
    }
    assert!(
        err.to_string().contains("takes effect in the next period"),
        "{err}"
    );
    // Nothing was charged by the refusal.
    assert_eq!(ledger.balance(&acct, november).unwrap().spent_rho, 0);
    // A refunded basic charge released nothing: the period is open again,
    // and the first ρ makes it a zCDP period.
    assert!(ledger.refund(&basic.id).unwrap());
    ledger
        .reserve(&acct, rho(rho_of_tenth()), november)
        .unwrap();
    assert!(matches!(
        ledger.reserve(&acct, eps(HUNDREDTH), november),
        Err(LedgerError::AccountingChanged {
            opened: "zcdp",
            asked: "basic",
            ..
        })
    ));
    // The next period opens with whatever comes first.
    ledger.reserve(&acct, eps(HUNDREDTH), december).unwrap();
    // A δ-only charge (a zero ε or ρ) fits either.
    ledger
        .reserve(
            &acct,
            Charge {
                delta: 1,
                ..Charge::default()
            },
            november,
        )
        .unwrap();
    ledger.verify().unwrap();
}

#[test]
fn zcdp_charges_need_a_delta_limit() {
    let (_dir, ledger) = temp_ledger();
    let acct = Account {
        limit_delta: 0,
        ..account(Period::Month, ONE)
    };
    let err = ledger.reserve(&acct, rho(1), at(2026, 11, 29)).unwrap_err();
    assert!(matches!(err, LedgerError::Exhausted { .. }), "{err:?}");
    // Basic charges are unaffected.
    ledger.reserve(&acct, eps(1), at(2026, 11, 29)).unwrap();
}

#[test]
fn rho_units_round_up() {
    // Rounded up, plus one pico-unit for the floating point behind ρ.
    assert_eq!(rho_units(1e-6).unwrap(), 1_000_001);
    assert_eq!(
        rho_units(1e-15).unwrap(),
        2,
        "a positive charge is never free"
    );
    for bad in [f64::NAN, f64::INFINITY, -1e-9, 1e10] {
        assert!(rho_units(bad).is_err(), "{bad}");
    }
    assert_eq!(rho_units(0.0).unwrap(), 0);
    assert_eq!(rho_from_units(1_500_000), 1.5e-6);
    assert_eq!(
        (0..1000).map(|_| rho_units(1e-6).unwrap()).sum::<i64>(),
        1000 * 1_000_001,
        "the stored sum is exactly the sum of the charges"
    );
    assert_eq!(zcdp_epsilon_units(0, 0), 0);
    assert_eq!(zcdp_epsilon_units(1, 0), i64::MAX);
}

#[test]
fn version_2_ledger_gains_the_rho_columns_keeping_its_spend() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2.db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn.execute_batch(
            "INSERT INTO schema_version (version) VALUES (2);
             INSERT INTO accounts VALUES ('acme', 'patients', '2026-11', 'month', 1000000000, 10000000000000,
                 300000000, 0, 0, 0, 1, '2026-11-20T10:00:00.000000Z');
             INSERT INTO reservations VALUES
                 ('r-committed', 'acme', 'patients', '2026-11', 300000000, 0, 'committed',
                  '2026-11-20T10:00:00.000000Z', '2026-11-20T10:00:01.000000Z', '2026-11-20T10:15:00.000000Z');",
        )
        .unwrap();
    }
    let ledger = Ledger::open(&path).unwrap();
    let monthly = account(Period::Month, ONE);
    let november = at(2026, 11, 29);
    let balance = ledger.balance(&monthly, november).unwrap();
    assert_eq!((balance.spent_epsilon, balance.spent_rho), (300_000_000, 0));
    assert_eq!(ledger.reservation("r-committed").unwrap().unwrap().rho, 0);
    // The migrated period was opened under basic accounting; the next one
    // may take ρ.
    ledger.reserve(&monthly, eps(HUNDREDTH), november).unwrap();
    ledger
        .reserve(&monthly, rho(rho_of_tenth()), at(2026, 12, 1))
        .unwrap();
    ledger.verify().unwrap();
    drop(ledger);
    let fresh = dir.path().join("fresh.db");
    drop(Ledger::open(&fresh).unwrap());
    assert_eq!(
        schema_of(&Connection::open(&path).unwrap()),
        schema_of(&Connection::open(&fresh).unwrap())
    );
}
