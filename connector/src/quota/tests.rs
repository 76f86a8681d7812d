use super::*;
use sluice_policy::document::Quotas;

fn charge(queries: u64, rows: Option<u64>) -> QuotaCharge {
    QuotaCharge {
        key: "Org".into(),
        quotas: Quotas {
            queries_per_day: Some(queries),
            rows_per_day: rows,
        },
    }
}

fn store(dir: &tempfile::TempDir) -> Arc<QuotaStore> {
    Arc::new(QuotaStore::open(&dir.path().join("ledger.sqlite"), None).unwrap())
}

fn refused_rule(result: Result<QuotaHold, QuotaError>) -> String {
    match result {
        Err(QuotaError::Exceeded(denial)) => denial.rule,
        other => panic!("expected a quota refusal, got {other:?}"),
    }
}

#[test]
fn concurrent_holds_never_exceed_the_limit_and_settled_queries_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    let store = Arc::new(QuotaStore::open(&path, None).unwrap());
    let now = SystemTime::now();
    let holds: Vec<QuotaHold> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                s.spawn(move || {
                    (0..50)
                        .filter_map(|_| store.hold(&charge(100, None), now).ok())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(holds.len(), 100);
    assert_eq!(store.held("Org", now), 100);
    for hold in holds {
        hold.settle(&charge(100, None)).unwrap();
    }
    assert_eq!(store.held("Org", now), 0);
    drop(store);
    let reopened = Arc::new(QuotaStore::open(&path, None).unwrap());
    assert_eq!(reopened.used("Org", now).unwrap().queries, 100);
    let rule = refused_rule(reopened.hold(&charge(100, None), now));
    assert_eq!(rule, "quotas.queries_per_day");
}

#[test]
fn a_dropped_hold_gives_its_query_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    let now = SystemTime::now();
    let quota = charge(2, None);
    let first = store.hold(&quota, now).unwrap();
    let second = store.hold(&quota, now).unwrap();
    refused_rule(store.hold(&quota, now));
    drop(first);
    assert_eq!(store.held("Org", now), 1);
    let third = store.hold(&quota, now).unwrap();
    second.settle(&quota).unwrap();
    drop(third);
    assert_eq!(store.used("Org", now).unwrap().queries, 1);
    assert_eq!(store.held("Org", now), 0);
}

#[test]
fn settling_checks_the_stored_count_again() {
    // Two stores on one database: two processes on one state directory.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    let one = Arc::new(QuotaStore::open(&path, None).unwrap());
    let other = Arc::new(QuotaStore::open(&path, None).unwrap());
    let now = SystemTime::now();
    let quota = charge(1, None);
    let mine = one.hold(&quota, now).unwrap();
    let theirs = other.hold(&quota, now).unwrap();
    theirs.settle(&quota).unwrap();
    match mine.settle(&quota) {
        Err(QuotaError::Exceeded(denial)) => assert_eq!(denial.rule, "quotas.queries_per_day"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(one.used("Org", now).unwrap().queries, 1);
    assert_eq!(one.held("Org", now), 0);
}

#[test]
fn rows_are_taken_as_sent_and_never_past_the_day() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    let store = Arc::new(QuotaStore::open(&path, None).unwrap());
    let now = SystemTime::now();
    let quota = charge(1000, Some(100));
    // Two streams at once: both admitted, rows granted as they go.
    let a = store.hold(&quota, now).unwrap();
    let b = store.hold(&quota, now).unwrap();
    a.settle(&quota).unwrap();
    b.settle(&quota).unwrap();
    assert_eq!(store.take_rows(&quota, 60, now).unwrap(), 60);
    assert_eq!(store.take_rows(&quota, 60, now).unwrap(), 40);
    assert_eq!(store.take_rows(&quota, 1, now).unwrap(), 0);
    assert_eq!(refused_rule(store.hold(&quota, now)), "quotas.rows_per_day");
    // Many threads taking rows: exactly the day's allowance in all.
    let quota = charge(1000, Some(10_000));
    let tomorrow = now + std::time::Duration::from_secs(86_400);
    let taken: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (store, quota) = (store.clone(), quota.clone());
                s.spawn(move || {
                    (0..500)
                        .map(|_| store.take_rows(&quota, 7, tomorrow).unwrap())
                        .sum::<u64>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(taken, 10_000);
    // What was taken is in the database.
    drop(store);
    let reopened = QuotaStore::open(&path, None).unwrap();
    assert_eq!(reopened.take_rows(&quota, 5, tomorrow).unwrap(), 0);
}

#[test]
fn a_legacy_usage_file_is_carried_over_once() {
    let dir = tempfile::tempdir().unwrap();
    let legacy = dir.path().join("quota.json");
    let today = day(SystemTime::now());
    std::fs::write(
        &legacy,
        format!(r#"{{"day": {today}, "usage": {{"Org": {{"queries": 3, "rows": 40}}}}}}"#),
    )
    .unwrap();
    let path = dir.path().join("ledger.sqlite");
    let store = QuotaStore::open(&path, Some(&legacy)).unwrap();
    let used = store.used("Org", SystemTime::now()).unwrap();
    assert_eq!(
        used,
        Usage {
            queries: 3,
            rows: 40
        }
    );
    assert!(!legacy.exists());
    drop(store);
    let reopened = QuotaStore::open(&path, Some(&legacy)).unwrap();
    assert_eq!(reopened.used("Org", SystemTime::now()).unwrap().queries, 3);
}

#[test]
fn a_corrupt_legacy_file_is_an_error_not_a_fresh_allowance() {
    let dir = tempfile::tempdir().unwrap();
    let legacy = dir.path().join("quota.json");
    std::fs::write(&legacy, b"{not json").unwrap();
    let err = QuotaStore::open(&dir.path().join("l.sqlite"), Some(&legacy))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("corrupt"), "{err}");
    assert!(legacy.exists());
}
