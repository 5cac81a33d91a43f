//! Stored passwords: PHC strings (Argon2id, Argon2i/d; bcrypt for migration) or, where the
//! operator allows it for development, plaintext held as a SHA-256 digest.
//!
//! A hash is verified on the blocking thread pool (Argon2id at the default cost is ~10–40 ms of
//! one core), at most one verification per core at a time, with a bounded queue in front: a
//! reconnect storm or a password-guessing loop cannot take the async workers or grow without
//! bound. Once a user's password has been verified, a keyed digest of it is kept in memory
//! ([`Verified`]): the next login of that user — right or wrong — is decided by comparing
//! digests, without another hash. Every password login answers no sooner than one hash
//! verification takes ([`Passwords::floor`]), so how long a refusal takes does not tell whether
//! the user exists or has logged in before (review F17). See decision 0091.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use tokio::sync::Semaphore;

use super::Secret;

/// A stored password that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordError {
    #[error("the password of user `{0}` is {1}")]
    BadHash(String, String),
}

/// How a password is stored.
#[derive(Clone)]
pub(super) enum Stored {
    /// The SHA-256 of a plaintext password (development only; config refuses it otherwise).
    Plain(Secret),
    /// A PHC string (Argon2) or a bcrypt hash, checked when it was configured.
    Hash(Arc<str>),
}

impl Stored {
    /// A configured password: a hash when it looks like one (`$argon2…$`, `$2a$`/`$2b$`/`$2y$`),
    /// which must then parse; anything else is plaintext.
    pub(super) fn parse(user: &str, value: &str) -> Result<Stored, PasswordError> {
        if !is_hash(value) {
            return Ok(Stored::Plain(Secret::of(value.as_bytes())));
        }
        check_hash(value).map_err(|why| PasswordError::BadHash(user.to_owned(), why))?;
        Ok(Stored::Hash(Arc::from(value)))
    }
}

/// Whether `value`, a hash by [`is_hash`], is one meshgate can verify; what is wrong with it
/// otherwise (a config error names the key).
pub fn check_hash(value: &str) -> Result<(), String> {
    let explain = |why: String| {
        format!(
            "not a password hash meshgate can verify: {why} (expected a PHC string such as `$argon2id$v=19$m=19456,t=2,p=1$…` from `meshgate passwd`, or a bcrypt hash `$2b$…`)"
        )
    };
    if is_bcrypt(value) {
        value
            .parse::<bcrypt::HashParts>()
            .map_err(|e| explain(e.to_string()))?;
    } else {
        let hash = PasswordHash::new(value).map_err(|e| explain(e.to_string()))?;
        argon2::Algorithm::try_from(hash.algorithm).map_err(|e| explain(e.to_string()))?;
        argon2::Params::try_from(&hash).map_err(|e| explain(e.to_string()))?;
        if hash.hash.is_none() {
            return Err(explain("it has no hash part".into()));
        }
    }
    Ok(())
}

/// Whether a configured password is a hash (and so must parse as one) rather than plaintext.
pub fn is_hash(value: &str) -> bool {
    value.starts_with("$argon2") || is_bcrypt(value)
}

fn is_bcrypt(value: &str) -> bool {
    ["$2a$", "$2b$", "$2x$", "$2y$"]
        .iter()
        .any(|p| value.starts_with(p))
}

/// The part of a hash that sets its cost: the algorithm and parameters, without the salt and
/// digest (`$argon2id$v=19$m=19456,t=2,p=1`, `$2b$12`).
fn cost_of(hash: &str) -> &str {
    let keep = if is_bcrypt(hash) { 2 } else { 3 };
    match hash.match_indices('$').nth(keep) {
        Some((i, _)) => &hash[..i],
        None => hash,
    }
}

/// Verifies `password` against a hash: CPU-bound, run on the blocking pool.
fn verify_hash(hash: &str, password: &[u8]) -> bool {
    if is_bcrypt(hash) {
        return bcrypt::verify(password, hash).unwrap_or(false);
    }
    match PasswordHash::new(hash) {
        Ok(parsed) => argon2::Argon2::default()
            .verify_password(password, &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// A new Argon2id PHC string for `password` with a random salt: what `meshgate passwd`
/// prints. `m_cost` in KiB, `t_cost` iterations, one lane (OWASP's minimum for Argon2id is
/// m=19456, t=2, p=1, the default).
pub fn hash_password(password: &[u8], m_cost: u32, t_cost: u32) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
    let params = argon2::Params::new(m_cost, t_cost, 1, None).map_err(|e| e.to_string())?;
    let argon2 = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::generate(&mut OsRng);
    argon2
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Why a hash verification did not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HashRefusal {
    /// More logins wait for a hash verification than [`Passwords::max_waiting`].
    Busy,
}

/// The users' verified passwords, as digests under a key drawn at start (never written out):
/// what decides a returning user's login without hashing again.
#[derive(Default)]
struct Verified(Mutex<HashMap<Arc<str>, Secret>>);

/// The password side of an [`super::Authorizer`]: hash verification with its bounds, the cache
/// of verified passwords and the answer-time floor.
pub(super) struct Passwords {
    key: [u8; 32],
    verified: Verified,
    /// One permit per verification that may run at once (the cores).
    hashing: Arc<Semaphore>,
    waiting: std::sync::atomic::AtomicUsize,
    max_waiting: usize,
    /// No password login is answered sooner (see the module documentation); zero when no
    /// configured password is a hash.
    floor: Duration,
}

impl fmt::Debug for Passwords {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Passwords")
            .field("floor", &self.floor)
            .finish_non_exhaustive()
    }
}

/// Logins that may wait for a hash verification at once; past it a login is refused as busy
/// (MQTT "server busy", HTTP 503), which clients retry with their backoff.
pub const MAX_WAITING_HASH_VERIFICATIONS: usize = 256;

impl Passwords {
    /// `hashes`: the configured hashes; one of them is verified (against a wrong password) to
    /// measure the answer-time floor on this machine.
    pub(super) fn new<'a>(hashes: impl Iterator<Item = &'a str>) -> Passwords {
        use argon2::password_hash::rand_core::{OsRng, RngCore};
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        // One verification per distinct algorithm and cost (the hash without its salt and
        // digest); the slowest sets the floor.
        let mut costs: HashMap<&str, &str> = HashMap::new();
        for h in hashes {
            costs.entry(cost_of(h)).or_insert(h);
        }
        let floor = costs
            .values()
            .map(|h| {
                let start = Instant::now();
                verify_hash(h, b"\0meshgate: measuring the verification time\0");
                start.elapsed().min(Duration::from_millis(500))
            })
            .max()
            .unwrap_or_default();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Passwords {
            key,
            verified: Verified::default(),
            hashing: Arc::new(Semaphore::new(cores)),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            max_waiting: MAX_WAITING_HASH_VERIFICATIONS,
            floor,
        }
    }

    pub(super) fn floor(&self) -> Duration {
        self.floor
    }

    fn keyed(&self, password: &[u8]) -> Secret {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(self.key);
        h.update(password);
        Secret(h.finalize().into())
    }

    /// Whether `password` is `user`'s, whose stored password is `stored`. A hash is verified
    /// at most once per user and password (then the keyed digest decides).
    pub(super) async fn check(
        &self,
        user: &Arc<str>,
        stored: &Stored,
        password: &[u8],
    ) -> Result<bool, HashRefusal> {
        let hash = match stored {
            Stored::Plain(secret) => return Ok(secret.matches(&Secret::of(password))),
            Stored::Hash(hash) => hash.clone(),
        };
        let presented = self.keyed(password);
        let known = self
            .verified
            .0
            .lock()
            .ok()
            .and_then(|m| m.get(user).copied());
        if let Some(known) = known {
            return Ok(known.matches(&presented));
        }
        let ok = self.verify_bounded(hash, password.to_vec()).await?;
        if ok && let Ok(mut m) = self.verified.0.lock() {
            m.insert(user.clone(), presented);
        }
        Ok(ok)
    }

    /// One hash verification on the blocking pool, after a permit; refused when too many wait.
    async fn verify_bounded(&self, hash: Arc<str>, password: Vec<u8>) -> Result<bool, HashRefusal> {
        use std::sync::atomic::Ordering::Relaxed;
        /// Gives the waiting slot back however the wait ends, also when the login is dropped
        /// while it waits (an MQTT connect timeout).
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Relaxed);
            }
        }
        if self.waiting.fetch_add(1, Relaxed) >= self.max_waiting {
            self.waiting.fetch_sub(1, Relaxed);
            return Err(HashRefusal::Busy);
        }
        let waiting = Waiting(&self.waiting);
        let permit = self.hashing.clone().acquire_owned().await;
        drop(waiting);
        let Ok(permit) = permit else {
            return Err(HashRefusal::Busy);
        };
        let joined = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            verify_hash(&hash, &password)
        })
        .await;
        Ok(joined.unwrap_or(false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Argon2id at the smallest cost: the tests check behaviour, not strength.
    fn cheap(password: &str) -> String {
        hash_password(password.as_bytes(), 8, 1).unwrap()
    }

    #[test]
    fn hashes_are_recognised_and_checked_when_configured() {
        assert!(matches!(
            Stored::parse("u", "hunter2"),
            Ok(Stored::Plain(_))
        ));
        assert!(matches!(
            Stored::parse("u", &cheap("pw")),
            Ok(Stored::Hash(_))
        ));
        let bcrypt = bcrypt::hash("pw", 4).unwrap();
        assert!(matches!(Stored::parse("u", &bcrypt), Ok(Stored::Hash(_))));
        for bad in [
            "$argon2id$v=19$m=19456",
            "$argon2id$v=19$m=1,t=1,p=1$c2FsdHNhbHQ$aGFzaA",
            "$argon2x$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
            "$2b$99$notabcrypthash",
        ] {
            let e = Stored::parse("u", bad)
                .err()
                .unwrap_or_else(|| panic!("{bad}"));
            assert!(e.to_string().contains("meshgate passwd"), "{e}");
        }
    }

    #[tokio::test]
    async fn a_hash_is_verified_once_then_decided_by_digest() {
        let hash = cheap("right");
        let stored = Stored::parse("u", &hash).unwrap();
        let p = Passwords::new(std::iter::once(hash.as_str()));
        let user: Arc<str> = Arc::from("u");
        assert_eq!(p.check(&user, &stored, b"wrong").await, Ok(false));
        assert!(
            p.verified.0.lock().unwrap().is_empty(),
            "a failure caches nothing"
        );
        assert_eq!(p.check(&user, &stored, b"right").await, Ok(true));
        assert_eq!(p.verified.0.lock().unwrap().len(), 1);
        assert_eq!(p.check(&user, &stored, b"right").await, Ok(true));
        assert_eq!(p.check(&user, &stored, b"wrong").await, Ok(false));
    }

    #[tokio::test]
    async fn bcrypt_hashes_verify_for_migration() {
        let hash = bcrypt::hash("legacy", 4).unwrap();
        let stored = Stored::parse("u", &hash).unwrap();
        let p = Passwords::new(std::iter::once(hash.as_str()));
        let user: Arc<str> = Arc::from("u");
        assert_eq!(p.check(&user, &stored, b"nope").await, Ok(false));
        assert_eq!(p.check(&user, &stored, b"legacy").await, Ok(true));
    }

    #[tokio::test]
    async fn too_many_waiting_verifications_are_refused_as_busy() {
        let hash = cheap("pw");
        let stored = Stored::parse("u", &hash).unwrap();
        let mut p = Passwords::new(std::iter::once(hash.as_str()));
        p.max_waiting = 0;
        let user: Arc<str> = Arc::from("u");
        assert_eq!(p.check(&user, &stored, b"pw").await, Err(HashRefusal::Busy));
    }

    #[test]
    fn the_floor_is_set_by_the_slowest_cost_whatever_the_hash_lengths() {
        let fast = hash_password(b"a-much-longer-password-string", 8, 1).unwrap();
        let slow = hash_password(b"pw", 19456, 2).unwrap();
        assert_eq!(cost_of(&slow), "$argon2id$v=19$m=19456,t=2,p=1");
        assert_eq!(cost_of("$2b$12$abcdefghijklmnopqrstuv"), "$2b$12");
        let only_slow = Passwords::new(std::iter::once(slow.as_str())).floor();
        let both = Passwords::new([fast.as_str(), slow.as_str()].into_iter()).floor();
        assert!(both * 2 >= only_slow, "{both:?} against {only_slow:?}");
    }

    #[test]
    fn the_floor_is_measured_only_when_a_hash_is_configured() {
        assert_eq!(Passwords::new(std::iter::empty()).floor(), Duration::ZERO);
        let hash = hash_password(b"pw", 19456, 2).unwrap();
        assert!(Passwords::new(std::iter::once(hash.as_str())).floor() > Duration::ZERO);
    }
}
