//! Sign-in links and browser sessions, held in memory.
//!
//! A link is minted over mTLS for the caller's own principal
//! (`ConsoleService.CreateLoginLink`), lives minutes and works once. Using
//! it (or signing in with a client certificate) starts a session: a random
//! id in an `HttpOnly; Secure; SameSite=Strict` cookie, and a CSRF token
//! every state-changing form carries. Only SHA-256 digests of links and
//! session ids are kept, so a memory dump names no usable secret. A restart
//! ends every session and link.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};

use crate::identity::Caller;

/// The session cookie. `__Host-` makes browsers insist on Secure, Path=/
/// and no Domain, so no other host or path can set or shadow it.
pub const COOKIE: &str = "__Host-sluice-session";

/// Unused links kept at once, and per principal: minting more is refused
/// until some expire.
const MAX_LINKS: usize = 1024;
const MAX_LINKS_PER_PRINCIPAL: usize = 16;
/// Sessions kept at once: beyond it, sign-ins are refused (never someone
/// else's session ended to make room).
const MAX_SESSIONS: usize = 4096;
/// Sessions of one principal: its next sign-in ends its own least
/// recently used one.
const MAX_SESSIONS_PER_PRINCIPAL: usize = 16;

/// Why a sign-in link cannot be minted.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("a sign-in link lives at most {max_s} s; ask for less (or 0 for the default)")]
    TooLong { max_s: u64 },
    #[error(
        "{principal} has {MAX_LINKS_PER_PRINCIPAL} unused sign-in links; use one or wait until they expire"
    )]
    TooManyForPrincipal { principal: String },
    #[error("the console holds {MAX_LINKS} unused sign-in links; try again when some expire")]
    TooMany,
}

/// Why a session cannot start.
#[derive(Debug, thiserror::Error)]
#[error(
    "the console holds {MAX_SESSIONS} sessions, its most; try again when some end (they end after console.session_idle unused)"
)]
pub struct SessionsFull;

/// How long links and sessions live.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    /// A link's default and maximum lifetime.
    pub link: Duration,
    pub session: Duration,
    pub idle: Duration,
}

/// A signed-in browser.
#[derive(Clone)]
pub struct Session {
    pub caller: Arc<Caller>,
    /// Every state-changing form carries it; a request without it is
    /// refused.
    pub csrf: String,
    started: Instant,
    last_seen: Instant,
}

struct Link {
    caller: Arc<Caller>,
    expires: Instant,
}

type Digest = [u8; 32];

/// Links and sessions.
pub struct Sessions {
    lifetimes: Lifetimes,
    links: Mutex<HashMap<Digest, Link>>,
    sessions: Mutex<HashMap<Digest, Session>>,
}

impl Sessions {
    pub fn new(lifetimes: Lifetimes) -> Self {
        Self {
            lifetimes,
            links: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// A one-time sign-in token for `caller`, and when it expires.
    /// `ttl` zero means the default; more than the default is refused.
    pub fn mint_link(
        &self,
        caller: Arc<Caller>,
        ttl: Duration,
    ) -> Result<(String, SystemTime), LinkError> {
        let max = self.lifetimes.link;
        let ttl = match ttl {
            Duration::ZERO => max,
            ttl if ttl > max => {
                return Err(LinkError::TooLong {
                    max_s: max.as_secs(),
                });
            }
            ttl => ttl,
        };
        let mut links = self.links.lock().expect("links lock");
        let now = Instant::now();
        links.retain(|_, link| link.expires > now);
        let principal = &caller.principal.id;
        let theirs = links
            .values()
            .filter(|l| &l.caller.principal.id == principal)
            .count();
        if theirs >= MAX_LINKS_PER_PRINCIPAL {
            return Err(LinkError::TooManyForPrincipal {
                principal: principal.clone(),
            });
        }
        if links.len() >= MAX_LINKS {
            return Err(LinkError::TooMany);
        }
        let token = random_token();
        links.insert(
            digest_of(&token),
            Link {
                caller,
                expires: now + ttl,
            },
        );
        Ok((token, SystemTime::now() + ttl))
    }

    /// Whom a link would sign in, without using it (the confirmation page:
    /// a link preview or prefetch must not spend it).
    pub fn peek_link(&self, token: &str) -> Option<Arc<Caller>> {
        let links = self.links.lock().expect("links lock");
        links
            .get(&digest_of(token))
            .filter(|link| link.expires > Instant::now())
            .map(|link| link.caller.clone())
    }

    /// Spends a link: whom it signs in, or `None` when it is unknown,
    /// expired or already used (one answer for all three).
    pub fn take_link(&self, token: &str) -> Option<Arc<Caller>> {
        let link = self
            .links
            .lock()
            .expect("links lock")
            .remove(&digest_of(token))?;
        (link.expires > Instant::now()).then_some(link.caller)
    }

    /// A new session for `caller` (a link spent, or a client certificate):
    /// its cookie value and the session. The principal's own least
    /// recently used session ends when it has too many; when the console is
    /// full, the sign-in is refused.
    pub fn start(&self, caller: Arc<Caller>) -> Result<(String, Session), SessionsFull> {
        let id = random_token();
        let now = Instant::now();
        let session = Session {
            caller,
            csrf: random_token(),
            started: now,
            last_seen: now,
        };
        let mut sessions = self.sessions.lock().expect("sessions lock");
        self.drop_stale(&mut sessions, now);
        let principal = &session.caller.principal.id;
        let theirs: Vec<(&Digest, &Session)> = sessions
            .iter()
            .filter(|(_, s)| &s.caller.principal.id == principal)
            .collect();
        if theirs.len() >= MAX_SESSIONS_PER_PRINCIPAL {
            let oldest = theirs
                .iter()
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(k, _)| **k);
            if let Some(oldest) = oldest {
                sessions.remove(&oldest);
            }
        } else if sessions.len() >= MAX_SESSIONS {
            return Err(SessionsFull);
        }
        sessions.insert(digest_of(&id), session.clone());
        Ok((id, session))
    }

    /// The live session a cookie names, now marked used.
    pub fn get(&self, id: &str) -> Option<Session> {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let now = Instant::now();
        let key = digest_of(id);
        let session = sessions.get_mut(&key)?;
        if !self.is_live(session, now) {
            sessions.remove(&key);
            return None;
        }
        session.last_seen = now;
        Some(session.clone())
    }

    /// Signs out.
    pub fn end(&self, id: &str) {
        self.sessions
            .lock()
            .expect("sessions lock")
            .remove(&digest_of(id));
    }

    /// Within both lifetimes, and the certificate it rests on has not
    /// expired: a session never outlives the credential that started it.
    fn is_live(&self, session: &Session, now: Instant) -> bool {
        let unix_now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(i64::MAX);
        now.duration_since(session.started) < self.lifetimes.session
            && now.duration_since(session.last_seen) < self.lifetimes.idle
            && unix_now < session.caller.not_after
    }

    fn drop_stale(&self, sessions: &mut HashMap<Digest, Session>, now: Instant) {
        sessions.retain(|_, s| self.is_live(s, now));
    }
}

/// Whether a submitted CSRF token is the session's, in constant time.
pub fn csrf_matches(session: &Session, submitted: Option<&str>) -> bool {
    submitted.is_some_and(|given| same_bytes(given.as_bytes(), session.csrf.as_bytes()))
}

/// Equality that reads every byte whatever differs, so the time taken
/// does not tell how much of a guess was right (the length is public).
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 256 random bits, URL-safe.
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random number generator failed");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn digest_of(token: &str) -> Digest {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, token.as_bytes()).as_ref());
    out
}

/// The session id in a request's `Cookie` headers, if any.
pub fn cookie_value(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_string())
}

/// The `Set-Cookie` value that starts a session.
pub fn set_cookie(id: &str) -> String {
    format!("{COOKIE}={id}; Path=/; Secure; HttpOnly; SameSite=Strict")
}

/// The `Set-Cookie` value that ends one.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_policy::Principal;

    fn caller(id: &str) -> Arc<Caller> {
        Arc::new(Caller {
            principal: Principal::new(id),
            certificate_sha256: String::new(),
            not_after: i64::MAX,
        })
    }

    fn sessions() -> Sessions {
        Sessions::new(Lifetimes {
            link: Duration::from_secs(60),
            session: Duration::from_secs(3600),
            idle: Duration::from_secs(600),
        })
    }

    #[test]
    fn a_link_works_once() {
        let s = sessions();
        let (token, _) = s.mint_link(caller("a"), Duration::ZERO).unwrap();
        assert_eq!(s.peek_link(&token).unwrap().principal.id, "a");
        let (id, session) = s.start(s.take_link(&token).unwrap()).unwrap();
        assert_eq!(session.caller.principal.id, "a");
        assert!(s.take_link(&token).is_none());
        assert!(s.peek_link(&token).is_none());
        assert_eq!(s.get(&id).unwrap().csrf, session.csrf);
        s.end(&id);
        assert!(s.get(&id).is_none());
    }

    #[test]
    fn an_expired_link_is_refused_and_long_ones_are_not_minted() {
        let s = sessions();
        let (token, _) = s.mint_link(caller("a"), Duration::from_millis(1)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(s.peek_link(&token).is_none());
        assert!(s.take_link(&token).is_none());
        assert!(matches!(
            s.mint_link(caller("a"), Duration::from_secs(61)),
            Err(LinkError::TooLong { max_s: 60 })
        ));
    }

    #[test]
    fn one_principal_cannot_hoard_links() {
        let s = sessions();
        for _ in 0..MAX_LINKS_PER_PRINCIPAL {
            s.mint_link(caller("a"), Duration::ZERO).unwrap();
        }
        assert!(matches!(
            s.mint_link(caller("a"), Duration::ZERO),
            Err(LinkError::TooManyForPrincipal { .. })
        ));
        s.mint_link(caller("b"), Duration::ZERO).unwrap();
    }

    #[test]
    fn a_session_ends_with_its_certificate() {
        let s = sessions();
        let expired = Arc::new(Caller {
            principal: Principal::new("a"),
            certificate_sha256: String::new(),
            not_after: 1,
        });
        let (id, _) = s.start(expired).unwrap();
        assert!(s.get(&id).is_none());
    }

    #[test]
    fn one_principal_cannot_push_out_the_others() {
        let s = sessions();
        let (admin, _) = s.start(caller("admin")).unwrap();
        let mut first = None;
        for _ in 0..MAX_SESSIONS + 10 {
            let (id, _) = s.start(caller("a")).unwrap();
            first.get_or_insert(id);
        }
        assert!(s.get(&admin).is_some());
        assert!(s.get(first.as_deref().unwrap()).is_none());
        let theirs = s.sessions.lock().unwrap().len();
        assert_eq!(theirs, MAX_SESSIONS_PER_PRINCIPAL + 1);
    }

    #[test]
    fn csrf_must_match_exactly() {
        let s = sessions();
        let (_, session) = s.start(caller("a")).unwrap();
        assert!(csrf_matches(&session, Some(&session.csrf.clone())));
        assert!(!csrf_matches(&session, None));
        assert!(!csrf_matches(&session, Some("")));
        assert!(!csrf_matches(&session, Some(&session.csrf[1..])));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(
            axum::http::header::COOKIE,
            format!("other=1; {COOKIE}=abc; x=2").parse().unwrap(),
        );
        assert_eq!(cookie_value(&headers).as_deref(), Some("abc"));
    }
}
