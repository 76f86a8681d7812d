//! Tickets → `TicketSigner::verify` (DoGet: decode the signed envelope,
//! check the HMAC tag, decode the claims, check version, expiry and holder)
//! and `PendingQueries::redeem` (the lookup a verified ticket leads to).
//!
//! The HMAC key is generated inside the signer and never leaves it, so raw
//! fuzz bytes stop at the tag check (mode 0): that is all an attacker
//! reaches. To fuzz what lies behind it too, mode 1 decodes the fuzz bytes
//! with the same `Claims` decoder `verify` runs after the tag check, signs
//! what decoded, and verifies that ticket (expiry, version and holder
//! checks; redeem with its query-id parsing). Mode 2 signs the decoded
//! claims and flips one byte of the signed ticket, which must be refused.
//!
//! Input: byte 0 = mode (bits 0–1) and holder (bits 2–4: the claims'
//! principal, or a demo principal); the rest = ticket or claims bytes.

#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sluice::query::ticket::{Claims, PendingQueries, TicketSigner, holder_id};
use sluice_policy::Principal;

fn signer() -> &'static TicketSigner {
    static SIGNER: OnceLock<TicketSigner> = OnceLock::new();
    SIGNER.get_or_init(TicketSigner::generate)
}

fn pending() -> &'static PendingQueries {
    static PENDING: OnceLock<PendingQueries> = OnceLock::new();
    PENDING.get_or_init(|| PendingQueries::new(sluice_fuzz::demo().config.limits.tickets))
}

/// A fixed "now", so that a reproducer replays the same way.
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_780_000_000)
}

/// Tickets and claims as the connector issues them (`tests/fuzz.sh --seeds`).
fn write_seeds() {
    let Some(dir) = sluice_fuzz::seed_dir() else {
        return;
    };
    let planning = sluice_fuzz::principal(0);
    let claims = Claims {
        version: 1,
        query_id: vec![7; 16],
        principal_id: holder_id(&planning),
        expires_at_ms: 4_102_444_800_000,
        plan_hash: vec![1; 32],
        policy_version: "sha256:3d8cee433636de27".into(),
        reservation: String::new(),
    };
    let relayed = Claims {
        principal_id: holder_id(&sluice_fuzz::principal(5)),
        reservation: "res-0123456789abcdef".into(),
        ..claims.clone()
    };
    let expired = Claims {
        expires_at_ms: 1_000,
        ..claims.clone()
    };
    let future_version = Claims {
        version: 2,
        ..claims.clone()
    };
    let short_id = Claims {
        query_id: vec![7; 15],
        ..claims.clone()
    };
    let write = |selector: u8, bytes: &[u8]| {
        sluice_fuzz::write_seed(&dir, &sluice_fuzz::with_selector(selector, bytes))
    };
    write(0, &signer().sign(&claims));
    write(5 << 2, &signer().sign(&relayed));
    for c in [&claims, &relayed, &expired, &future_version, &short_id] {
        write(1, &c.encode_to_vec());
    }
    write(1 | 5 << 2, &relayed.encode_to_vec());
    write(1 | 2 << 2, &claims.encode_to_vec());
    write(2, &claims.encode_to_vec());
}

fuzz_target!(init: write_seeds(), |data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let pending = pending();
    let holder = |claims: Option<&Claims>| match (selector >> 2) & 7 {
        0 | 1 => match claims {
            Some(c) => Principal::new(c.principal_id.clone()),
            None => sluice_fuzz::principal(0),
        },
        n => sluice_fuzz::principal(n),
    };
    match selector & 3 {
        0 | 3 => {
            if let Ok(claims) = signer().verify(bytes, &holder(None), now()) {
                panic!("a ticket the fuzzer made up verified: {claims:?}");
            }
        }
        mode => {
            let Ok(claims) = Claims::decode(bytes) else {
                return;
            };
            let mut ticket = signer().sign(&claims);
            let holder = holder(Some(&claims));
            if mode == 2 {
                let i = usize::from(bytes.first().copied().unwrap_or(0)) % ticket.len();
                ticket[i] ^= 0x01;
                if let Ok(verified) = signer().verify(&ticket, &holder, now()) {
                    // A flip inside a varint's padding cannot decode to
                    // other claims; anything else must be refused.
                    assert_eq!(verified, claims, "an altered ticket verified as other claims");
                }
                return;
            }
            match signer().verify(&ticket, &holder, now()) {
                Ok(verified) => {
                    assert_eq!(verified, claims, "verify changed the claims");
                    assert_eq!(verified.principal_id, holder_id(&holder));
                    assert!(pending.redeem(&verified).is_err(), "nothing was issued");
                }
                Err(e) => {
                    let _ = e.to_string();
                }
            }
        }
    }
});
