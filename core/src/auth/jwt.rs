//! JSON Web Tokens as credentials: a bearer token on HTTP and WebSocket, the password (or the
//! user name, with no password) on MQTT.
//!
//! Verified with `jsonwebtoken` 9 (ring) against an HS256/384/512 secret, a PEM public key (RSA:
//! RS*/PS*; EC: ES256/ES384; Ed25519: EdDSA) or a JWKS file; each key accepts only the
//! algorithms of its own family, so a token signed "HS256" with an RSA public key as the secret
//! is refused (the family check in `jsonwebtoken::decode`'s `verify_signature`). `exp` is
//! required; `nbf`, `iss` and `aud` are checked (with `leeway`). The key files are checked for
//! changes at most once a second, at a login, and reloaded when their size or modification time
//! changed; a file that no longer parses keeps the keys it had (and says so in the log).
//!
//! The user is a claim (`sub` by default). Publish and subscribe filter lists may come from
//! claims too; they are added to the rules of the configured user of that name, or to
//! `[auth.jwt]`'s own rules for users the config does not list (see [`super::Authorizer`]).
//! A claim is bounded ([`MAX_CLAIM_FILTERS`], [`MAX_FILTER_BYTES`]), and so is the token
//! ([`MAX_TOKEN_BYTES`]): a token is client input.

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::Permissions;
use crate::file_watch::FileWatch;

/// A token longer than this is refused before it is decoded.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Filters one ACL claim may list.
pub const MAX_CLAIM_FILTERS: usize = 64;
/// Bytes of one filter in an ACL claim.
pub const MAX_FILTER_BYTES: usize = 1024;

/// JWT verification as configured (`[auth.jwt]`).
#[derive(Clone, Default)]
pub struct JwtSpec {
    /// HMAC secret (HS256/384/512), at least 32 bytes.
    pub secret: Option<String>,
    /// A PEM public key.
    pub public_key_file: Option<PathBuf>,
    /// A JSON Web Key Set; a token's `kid` picks its key.
    pub jwks_file: Option<PathBuf>,
    /// `iss` must be this, when set.
    pub issuer: Option<String>,
    /// `aud` must contain this, when set (a token with an `aud` is refused when unset).
    pub audience: Option<String>,
    pub leeway: Duration,
    /// The claim naming the user.
    pub user_claim: String,
    /// Claims listing more publish / subscribe filters (`{user}`, `{clientid}` allowed).
    pub publish_claim: String,
    pub subscribe_claim: String,
    /// MQTT: the CONNECT user name must equal the user claim (otherwise it is ignored).
    pub match_mqtt_username: bool,
    /// Rules for token users the config does not list.
    pub permissions: Permissions,
}

impl std::fmt::Debug for JwtSpec {
    /// Never prints the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSpec")
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .field("public_key_file", &self.public_key_file)
            .field("jwks_file", &self.jwks_file)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

/// One key and the algorithms it verifies.
struct Key {
    kid: Option<String>,
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

/// The keys of the secret, the PEM file and the JWKS file.
#[derive(Default)]
struct Keys {
    keys: Vec<Key>,
}

fn family_algorithms(params: &AlgorithmParameters) -> Vec<Algorithm> {
    use Algorithm::*;
    match params {
        AlgorithmParameters::RSA(_) => vec![RS256, RS384, RS512, PS256, PS384, PS512],
        AlgorithmParameters::EllipticCurve(_) => vec![ES256, ES384],
        AlgorithmParameters::OctetKeyPair(_) => vec![EdDSA],
        AlgorithmParameters::OctetKey(_) => vec![HS256, HS384, HS512],
    }
}

/// One of `DecodingKey`'s PEM constructors.
type PemParser = fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>;

/// The key of a PEM file: RSA, EC or Ed25519, tried in that order.
fn pem_key(pem: &[u8]) -> Result<Key, String> {
    use Algorithm::*;
    let tries: [(PemParser, Vec<Algorithm>); 3] = [
        (
            DecodingKey::from_rsa_pem,
            vec![RS256, RS384, RS512, PS256, PS384, PS512],
        ),
        (DecodingKey::from_ec_pem, vec![ES256, ES384]),
        (DecodingKey::from_ed_pem, vec![EdDSA]),
    ];
    for (parse, algorithms) in tries {
        if let Ok(key) = parse(pem) {
            return Ok(Key {
                kid: None,
                key,
                algorithms,
            });
        }
    }
    Err("not a PEM public key (RSA, EC P-256/P-384 or Ed25519)".into())
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
}

/// Reads the configured keys; what is wrong with them otherwise (the config check and start
/// report it with the key's name).
fn load(spec: &JwtSpec) -> Result<Keys, String> {
    let mut keys = Vec::new();
    if let Some(secret) = &spec.secret {
        keys.push(Key {
            kid: None,
            key: DecodingKey::from_secret(secret.as_bytes()),
            algorithms: vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
        });
    }
    if let Some(path) = &spec.public_key_file {
        let pem = read(path, "public key file")?;
        keys.push(pem_key(&pem).map_err(|e| format!("{}: {e}", path.display()))?);
    }
    if let Some(path) = &spec.jwks_file {
        let text = read(path, "JWKS file")?;
        let set: JwkSet = serde_json::from_slice(&text)
            .map_err(|e| format!("{}: not a JSON Web Key Set: {e}", path.display()))?;
        for (i, jwk) in set.keys.iter().enumerate() {
            let key = DecodingKey::from_jwk(jwk)
                .map_err(|e| format!("{}: key {i}: {e}", path.display()))?;
            keys.push(Key {
                kid: jwk.common.key_id.clone(),
                key,
                algorithms: family_algorithms(&jwk.algorithm),
            });
        }
    }
    if keys.is_empty() {
        return Err("no key: set auth.jwt.secret, public_key_file or jwks_file".into());
    }
    Ok(Keys { keys })
}

/// Whether `spec`'s keys load; what is wrong otherwise.
pub fn check(spec: &JwtSpec) -> Result<(), String> {
    load(spec).map(|_| ())
}

/// Whether a presented secret is shaped like a JWT (three base64url parts, the first a JSON
/// object): only those are verified as one.
pub fn looks_like_jwt(s: &str) -> bool {
    s.starts_with("eyJ")
        && s.bytes().filter(|b| *b == b'.').count() == 2
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Claims {
    pub user: String,
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// Verifies tokens; reloads its key files when they change.
pub(super) struct JwtVerifier {
    spec: JwtSpec,
    keys: RwLock<std::sync::Arc<Keys>>,
    watch: FileWatch,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    pub(super) fn new(spec: JwtSpec) -> Result<Self, String> {
        let keys = load(&spec)?;
        let watch = FileWatch::new(Self::files(&spec).map(Path::to_path_buf));
        Ok(JwtVerifier {
            spec,
            keys: RwLock::new(std::sync::Arc::new(keys)),
            watch,
        })
    }

    pub(super) fn spec(&self) -> &JwtSpec {
        &self.spec
    }

    fn files(spec: &JwtSpec) -> impl Iterator<Item = &Path> {
        spec.public_key_file
            .iter()
            .chain(spec.jwks_file.iter())
            .map(PathBuf::as_path)
    }

    /// Reloads the keys when a file changed since the last look (at most once a second).
    fn reload_if_changed(&self) {
        if !self.watch.changed() {
            return;
        }
        match load(&self.spec) {
            Ok(keys) => {
                if let Ok(mut k) = self.keys.write() {
                    *k = std::sync::Arc::new(keys);
                }
                tracing::info!("auth.jwt: key files changed; keys reloaded");
            }
            Err(e) => {
                // Keep the old keys; try again once the file changes again.
                tracing::warn!(
                    "auth.jwt: key files changed but cannot be used ({e}); keeping the previous keys"
                );
            }
        }
    }

    /// The claims of a valid token; why it is refused otherwise (no secret in the text).
    pub(super) fn verify(&self, token: &str) -> Result<Claims, &'static str> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err("the token is longer than 8 KiB");
        }
        self.reload_if_changed();
        let header = jsonwebtoken::decode_header(token).map_err(|_| "the token is malformed")?;
        let keys = self.keys.read().map(|k| k.clone()).map_err(|_| "no keys")?;
        let candidates: Vec<&Key> = match &header.kid {
            Some(kid) if keys.keys.iter().any(|k| k.kid.as_deref() == Some(kid)) => keys
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .collect(),
            _ => keys
                .keys
                .iter()
                .filter(|k| k.algorithms.contains(&header.alg))
                .collect(),
        };
        if candidates.is_empty() {
            return Err("no configured key verifies the token's algorithm");
        }
        let mut refusal = "the token's signature does not verify";
        for key in candidates {
            let validation = self.validation(key);
            match jsonwebtoken::decode::<serde_json::Value>(token, &key.key, &validation) {
                Ok(data) => return self.claims(&data.claims),
                // Another key may match (several keys of one family without kids).
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => {}
                Err(e) => refusal = describe(e.kind()),
            }
        }
        Err(refusal)
    }

    fn validation(&self, key: &Key) -> Validation {
        let mut v = Validation::new(key.algorithms[0]);
        v.algorithms = key.algorithms.clone();
        v.leeway = self.spec.leeway.as_secs();
        v.validate_exp = true;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp"]);
        match &self.spec.audience {
            Some(aud) => v.set_audience(&[aud]),
            // A token meant for some audience is not meant for a gateway that has none.
            None => v.validate_aud = true,
        }
        if let Some(iss) = &self.spec.issuer {
            v.set_issuer(&[iss]);
        }
        v
    }

    fn claims(&self, claims: &serde_json::Value) -> Result<Claims, &'static str> {
        let user = claims
            .get(&self.spec.user_claim)
            .and_then(|v| v.as_str())
            .ok_or("the token has no user claim (auth.jwt.user_claim)")?;
        if user.is_empty()
            || user.len() > 256
            // `{` / `}`: a name such as `{clientid}` would become a template in `{user}` rules.
            || user.contains(['/', '+', '#', '{', '}'])
            || user.contains(char::is_whitespace)
            || user.contains(char::is_control)
        {
            return Err("the token's user claim is not a usable user name");
        }
        Ok(Claims {
            user: user.to_owned(),
            publish: filters(claims.get(&self.spec.publish_claim))?,
            subscribe: filters(claims.get(&self.spec.subscribe_claim))?,
        })
    }
}

/// An ACL claim: absent, or a list of at most [`MAX_CLAIM_FILTERS`] strings.
fn filters(claim: Option<&serde_json::Value>) -> Result<Vec<String>, &'static str> {
    let Some(claim) = claim else {
        return Ok(Vec::new());
    };
    let list = claim
        .as_array()
        .ok_or("an ACL claim of the token is not a list of topic filters")?;
    if list.len() > MAX_CLAIM_FILTERS {
        return Err("an ACL claim of the token lists more than 64 filters");
    }
    list.iter()
        .map(|f| match f.as_str() {
            Some(s) if s.len() <= MAX_FILTER_BYTES => Ok(s.to_owned()),
            _ => Err("an ACL claim of the token holds something other than a topic filter"),
        })
        .collect()
}

fn describe(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "the token has expired",
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)",
        ErrorKind::InvalidAudience => "the token's audience (aud) is not this gateway's",
        ErrorKind::InvalidIssuer => "the token's issuer (iss) is not accepted",
        ErrorKind::InvalidSignature => "the token's signature does not verify",
        ErrorKind::InvalidAlgorithm => "the token's algorithm does not fit its key",
        ErrorKind::MissingRequiredClaim(_) => "the token has no expiry (exp)",
        _ => "the token is malformed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn spec() -> JwtSpec {
        JwtSpec {
            secret: Some(SECRET.into()),
            issuer: Some("https://issuer.example".into()),
            audience: Some("meshgate".into()),
            leeway: Duration::from_secs(5),
            user_claim: "sub".into(),
            publish_claim: "publish".into(),
            subscribe_claim: "subscribe".into(),
            ..JwtSpec::default()
        }
    }

    fn token(claims: serde_json::Value) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn good() -> serde_json::Value {
        serde_json::json!({
            "sub": "dev-7", "exp": now() + 60, "iss": "https://issuer.example", "aud": "meshgate",
            "publish": ["devices/{user}/#"], "subscribe": ["commands/dev-7/#"],
        })
    }

    #[test]
    fn a_valid_token_gives_its_user_and_filters() {
        let v = JwtVerifier::new(spec()).unwrap();
        let t = token(good());
        assert!(looks_like_jwt(&t));
        assert_eq!(
            v.verify(&t).unwrap(),
            Claims {
                user: "dev-7".into(),
                publish: vec!["devices/{user}/#".into()],
                subscribe: vec!["commands/dev-7/#".into()],
            }
        );
    }

    #[test]
    fn each_failure_says_why() {
        let v = JwtVerifier::new(spec()).unwrap();
        let with = |k: &str, val: serde_json::Value| {
            let mut c = good();
            c[k] = val;
            v.verify(&token(c)).unwrap_err()
        };
        assert_eq!(with("exp", (now() - 60).into()), "the token has expired");
        assert_eq!(
            with("nbf", (now() + 600).into()),
            "the token is not valid yet (nbf)"
        );
        assert!(with("aud", "other".into()).contains("audience"));
        assert!(with("iss", "https://evil.example".into()).contains("issuer"));
        assert!(with("sub", "a/b".into()).contains("user name"));
        assert!(with("sub", "{clientid}".into()).contains("user name"));
        assert!(with("publish", "devices/#".into()).contains("not a list"));
        let many: Vec<String> = (0..65).map(|i| format!("t/{i}")).collect();
        assert!(with("publish", many.into()).contains("64"));
        let mut c = good();
        c.as_object_mut().unwrap().remove("exp");
        assert_eq!(
            v.verify(&token(c)).unwrap_err(),
            "the token has no expiry (exp)"
        );
        let forged = encode(
            &Header::default(),
            &good(),
            &EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes"),
        )
        .unwrap();
        assert_eq!(
            v.verify(&forged).unwrap_err(),
            "the token's signature does not verify"
        );
        assert_eq!(v.verify("eyJ.x.y").unwrap_err(), "the token is malformed");
        assert!(v.verify(&"a".repeat(9000)).unwrap_err().contains("8 KiB"));
    }

    #[test]
    fn a_token_for_some_audience_is_refused_when_none_is_configured() {
        let v = JwtVerifier::new(JwtSpec {
            audience: None,
            ..spec()
        })
        .unwrap();
        assert!(v.verify(&token(good())).unwrap_err().contains("audience"));
        let mut c = good();
        c.as_object_mut().unwrap().remove("aud");
        assert!(v.verify(&token(c)).is_ok());
    }

    #[test]
    fn keys_must_load() {
        let e = check(&JwtSpec {
            public_key_file: Some("/nonexistent/key.pem".into()),
            ..JwtSpec::default()
        })
        .unwrap_err();
        assert!(e.contains("/nonexistent/key.pem"), "{e}");
        assert!(check(&JwtSpec::default()).unwrap_err().contains("no key"));
    }

    /// Tokens are client input. Each input is either a token as it comes (any bytes), or —
    /// with a NUL byte in it — a header and a claims document that are encoded and *signed with
    /// the configured secret*, so that hostile claims reach the claim checks past the
    /// signature. Never a panic; a verified token's user is a usable name.
    #[test]
    fn fuzz_jwt() {
        let seeds: [&[u8]; 4] = [
            b"{\"alg\":\"HS256\",\"typ\":\"JWT\"}\0{\"sub\":\"u\",\"exp\":99999999999,\"iss\":\"https://issuer.example\",\"aud\":\"meshgate\",\"publish\":[\"a/#\"]}",
            b"{\"alg\":\"HS256\",\"kid\":\"k\"}\0{\"sub\":7,\"exp\":\"soon\",\"aud\":[\"meshgate\",\"x\"],\"subscribe\":[1,null]}",
            b"{\"alg\":\"RS256\"}\0{\"sub\":\"u\",\"exp\":1e300,\"nbf\":-1}",
            b"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",
        ];
        let v = JwtVerifier::new(spec()).unwrap();
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        meshgate_fuzz::run(
            "jwt",
            meshgate_fuzz::bytes("jwt", &seeds, 512),
            |b| Some(b.to_vec()),
            |bytes| {
                use base64::Engine;
                let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
                let token = match bytes.iter().position(|b| *b == 0) {
                    None => String::from_utf8_lossy(&bytes).into_owned(),
                    Some(nul) => {
                        let message = format!("{}.{}", b64(&bytes[..nul]), b64(&bytes[nul + 1..]));
                        let signature =
                            jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256)
                                .map_err(|e| e.to_string())?;
                        format!("{message}.{signature}")
                    }
                };
                let _ = looks_like_jwt(&token);
                if let Ok(claims) = v.verify(&token)
                    && (claims.user.is_empty() || claims.user.contains(['/', '+', '#']))
                {
                    return Err(format!("user {:?}", claims.user));
                }
                Ok(())
            },
        );
    }

    #[test]
    fn only_jwt_shaped_secrets_are_treated_as_tokens() {
        assert!(!looks_like_jwt("a-static-token"));
        assert!(!looks_like_jwt("eyJ.only-two"));
        assert!(!looks_like_jwt("eyJ.a.b c"));
        assert!(looks_like_jwt("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.sig-_"));
    }
}
