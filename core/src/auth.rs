//! Authentication to a [`Principal`] and topic-level authorization.
//!
//! Every connection authenticates first (username/password or a static bearer token; anonymous
//! only where configured). Passwords are stored as hashes ([`password`]); failed logins are
//! limited per source address and per user ([`login_limit`]). Every publish is checked against the principal's `publish` rules
//! and every subscription against its `subscribe` rules before anything reaches the backbone.
//!
//! Rules are allow lists (`publish`, `subscribe`) and deny lists (`deny_publish`,
//! `deny_subscribe`) of MQTT topic filters; **a deny wins** over any allow, whatever the order
//! (as Mosquitto handles `topic deny` lines before the lines that grant access). A topic is
//! allowed when an allow filter matches it and no deny filter does. A requested subscription is
//! granted when one allow filter covers all of it and no deny filter covers all of it; when a
//! deny filter covers only part of it (`test/#` against a deny of `test/nosubscribe`) it is
//! granted [`SubscribeGrant::Filtered`], and the adapter drops each delivery on a denied topic
//! ([`Authorizer::may_receive`]), as Mosquitto checks read access per message.
//!
//! Filters may contain `{user}` (the principal's name) and `{clientid}` (the MQTT client id,
//! bound with [`Authorizer::for_client`]). A rule with `{clientid}` matches nothing for a
//! principal without a client id (HTTP, WebSocket) or whose client id contains `/`, `+` or `#`
//! (which would change the filter's shape). Wildcards at the first level match no topic starting
//! with `$` ([MQTT-4.7.2-1]), so `#` grants no `$SYS/…`: it must be listed explicitly.

pub mod jwt;
pub mod login_limit;
pub mod password;

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::{Counter, Registry};
use crate::topic::{Topic, TopicError, TopicFilter};
pub use jwt::JwtSpec;
use jwt::JwtVerifier;
use login_limit::LoginLimiter;
pub use login_limit::LoginPolicy;
pub use password::PasswordError;
use password::{HashRefusal, Passwords, Stored};

/// Who is on the other end of a connection, with its compiled ACL. Two principals are equal
/// when they are the same user (or both anonymous), whatever client id their ACL was bound to.
#[derive(Clone)]
pub struct Principal {
    name: Arc<str>,
    anonymous: bool,
    /// A part of the gateway configured by the operator (an AMQP source), not a client: it may
    /// publish and subscribe anywhere.
    internal: bool,
    acl: Arc<Acl>,
    /// The rules of a token user (JWT), whose `{clientid}` rules are bound at MQTT CONNECT:
    /// configured users and the anonymous principal find theirs in the [`Authorizer`].
    token_acl: Option<Arc<AclSpec>>,
    /// The [`Authorizer::generation`] (low 32 bits) it was resolved under: a connection holding
    /// it looks again when that moves. (In the padding: no byte more per connection.)
    generation: u32,
}

impl PartialEq for Principal {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.anonymous == other.anonymous
            && self.internal == other.internal
    }
}

impl Eq for Principal {}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Principal({})", self.name)
    }
}

impl Principal {
    /// A principal for a bridge the operator configured (e.g. an AMQP source): not subject to
    /// the client ACLs.
    pub fn internal(name: impl Into<Arc<str>>) -> Principal {
        Principal {
            name: name.into(),
            anonymous: false,
            internal: true,
            acl: Arc::default(),
            token_acl: None,
            generation: 0,
        }
    }

    /// The same principal with no rights at all: what a connected client is left with when a
    /// config reload removed its user (or anonymous access).
    pub fn without_rights(&self) -> Principal {
        Principal {
            name: self.name.clone(),
            anonymous: self.anonymous,
            internal: false,
            acl: Arc::default(),
            token_acl: None,
            generation: 0,
        }
    }

    /// The [`Authorizer::generation`] (low 32 bits) this principal was resolved under.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    fn stamped(mut self, generation: u32) -> Principal {
        self.generation = generation;
        self
    }

    /// The name as a shared string (a reference count, no copy).
    pub fn shared_name(&self) -> Arc<str> {
        self.name.clone()
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn is_anonymous(&self) -> bool {
        self.anonymous
    }

    /// A part of the gateway (see [`Principal::internal`]), not a client.
    pub(crate) fn is_internal(&self) -> bool {
        self.internal
    }

    #[cfg(test)]
    pub(crate) fn anonymous_for_tests() -> Principal {
        Principal {
            name: Arc::from("anonymous"),
            anonymous: true,
            internal: false,
            acl: Arc::default(),
            token_acl: None,
            generation: 0,
        }
    }
}

/// What a client presented.
#[derive(Clone, Copy)]
pub enum Credentials<'a> {
    None,
    Password {
        username: &'a str,
        password: &'a [u8],
    },
    Token(&'a str),
}

impl fmt::Debug for Credentials<'_> {
    /// Never prints secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::None => f.write_str("None"),
            Credentials::Password { username, .. } => write!(f, "Password({username}, ***)"),
            Credentials::Token(_) => f.write_str("Token(***)"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials, and anonymous access is not enabled (HTTP 401).
    #[error("authentication required")]
    Required,
    /// Unknown user, wrong password or unknown token (HTTP 401 / MQTT "bad user name or password").
    #[error("invalid credentials")]
    Invalid,
    /// Too many failed logins from this address or as this user (HTTP 429 / MQTT 5 0x9F
    /// "connection rate exceeded"); credentials were not checked.
    #[error("too many failed logins; retry in {}s", retry_after.as_secs().max(1))]
    RateLimited { retry_after: Duration },
    /// Too many logins wait for a password hash verification (HTTP 503 / MQTT "server busy").
    #[error("too many logins in progress; retry later")]
    Busy,
    /// A JWT that does not verify, and why (HTTP 401 / MQTT "bad user name or password", the
    /// reason in MQTT 5's reason string).
    #[error("invalid token: {0}")]
    InvalidToken(&'static str),
    /// Authenticated, but not allowed to do this (HTTP 403 / MQTT "not authorized").
    #[error("{principal} may not {action} `{target}`")]
    Forbidden {
        principal: String,
        action: &'static str,
        target: String,
    },
}

/// Publish and subscribe permissions, as filter templates (`{user}`, `{clientid}` allowed):
/// allow lists and deny lists; a deny wins (see the module documentation).
#[derive(Debug, Clone, Default)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    pub deny_publish: Vec<String>,
    pub deny_subscribe: Vec<String>,
    /// MQTT client ids the principal may use must start with one of these (`{user}` allowed);
    /// empty: any client id.
    pub client_id_prefixes: Vec<String>,
}

/// One configured user.
#[derive(Clone)]
pub struct UserSpec {
    pub name: String,
    pub password: Option<String>,
    /// May log in with a verified client certificate that names it.
    pub certificate: bool,
    pub tokens: Vec<String>,
    pub permissions: Permissions,
}

impl fmt::Debug for UserSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserSpec")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What a granted subscription may receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeGrant {
    /// Every topic the filter matches.
    All,
    /// Some topics it matches are denied: each delivery is checked with
    /// [`Authorizer::may_receive`] and those on denied topics are dropped.
    Filtered,
}

/// The template of the client id in ACL filters.
pub const CLIENT_ID_TEMPLATE: &str = "{clientid}";

/// The allow and deny filters of one action, compiled.
#[derive(Debug, Default)]
struct Rules {
    allow: Vec<TopicFilter>,
    deny: Vec<TopicFilter>,
}

impl Rules {
    /// An allow filter matches `topic` and no deny filter does: a scan of two short lists (the
    /// deny list is empty unless configured), once per publish.
    #[inline]
    fn allows(&self, topic: &Topic) -> bool {
        self.allow.iter().any(|f| f.matches(topic)) && !self.deny.iter().any(|f| f.matches(topic))
    }

    fn grant(&self, filter: &TopicFilter) -> Option<SubscribeGrant> {
        if !self.allow.iter().any(|f| f.covers(filter)) {
            return None;
        }
        let mut grant = SubscribeGrant::All;
        for deny in &self.deny {
            if deny.covers(filter) {
                return None;
            }
            if deny.intersects(filter) {
                grant = SubscribeGrant::Filtered;
            }
        }
        Some(grant)
    }
}

/// A principal's compiled ACL.
#[derive(Debug, Default)]
struct Acl {
    publish: Rules,
    subscribe: Rules,
}

/// The filter templates of one action's list that contain `{clientid}` (with `{user}`
/// replaced), compiled once the client id is known.
#[derive(Debug, Default, Clone)]
struct ClientTemplates {
    publish: Vec<String>,
    subscribe: Vec<String>,
    deny_publish: Vec<String>,
    deny_subscribe: Vec<String>,
}

impl ClientTemplates {
    fn is_empty(&self) -> bool {
        self.publish.is_empty()
            && self.subscribe.is_empty()
            && self.deny_publish.is_empty()
            && self.deny_subscribe.is_empty()
    }
}

/// A user's (or the anonymous) ACL as configured: the rules without `{clientid}` compiled, the
/// others kept until [`Authorizer::for_client`].
#[derive(Debug)]
struct AclSpec {
    base: Arc<Acl>,
    templates: ClientTemplates,
    /// `client_id_prefixes` with `{user}` replaced.
    client_id_prefixes: Vec<String>,
}

impl AclSpec {
    fn compile(p: &Permissions, user: &str) -> Result<Self, TopicError> {
        let mut templates = ClientTemplates::default();
        let split = |list: &[String], pending: &mut Vec<String>| {
            let mut filters = Vec::with_capacity(list.len());
            for t in list {
                let t = t.replace("{user}", user);
                if t.contains(CLIENT_ID_TEMPLATE) {
                    // Checked with a client id that keeps the filter's shape.
                    TopicFilter::parse(&t.replace(CLIENT_ID_TEMPLATE, "c"))?;
                    pending.push(t);
                } else {
                    filters.push(TopicFilter::parse(&t)?);
                }
            }
            Ok::<_, TopicError>(filters)
        };
        let acl = Acl {
            publish: Rules {
                allow: split(&p.publish, &mut templates.publish)?,
                deny: split(&p.deny_publish, &mut templates.deny_publish)?,
            },
            subscribe: Rules {
                allow: split(&p.subscribe, &mut templates.subscribe)?,
                deny: split(&p.deny_subscribe, &mut templates.deny_subscribe)?,
            },
        };
        Ok(AclSpec {
            base: Arc::new(acl),
            templates,
            client_id_prefixes: p
                .client_id_prefixes
                .iter()
                .map(|t| t.replace("{user}", user))
                .collect(),
        })
    }

    /// The ACL of a client with id `client_id`: the base rules plus the `{clientid}` ones.
    fn for_client(&self, client_id: &str) -> Arc<Acl> {
        if self.templates.is_empty() {
            return self.base.clone();
        }
        // A client id with `/`, `+` or `#` would change the filter's levels or add wildcards:
        // its `{clientid}` rules match nothing (allow and deny alike).
        let usable = !client_id.is_empty() && !client_id.contains(['/', '+', '#']);
        let with = |base: &[TopicFilter], templates: &[String]| {
            let mut v = base.to_vec();
            if usable {
                v.extend(templates.iter().filter_map(|t| {
                    TopicFilter::parse(&t.replace(CLIENT_ID_TEMPLATE, client_id)).ok()
                }));
            }
            v
        };
        let (b, t) = (&self.base, &self.templates);
        Arc::new(Acl {
            publish: Rules {
                allow: with(&b.publish.allow, &t.publish),
                deny: with(&b.publish.deny, &t.deny_publish),
            },
            subscribe: Rules {
                allow: with(&b.subscribe.allow, &t.subscribe),
                deny: with(&b.subscribe.deny, &t.deny_subscribe),
            },
        })
    }
}

struct User {
    principal: Principal,
    password: Option<Stored>,
    certificate: bool,
    /// As configured: a token user of this name gets them plus its token's (JWT).
    permissions: Permissions,
    acl: AclSpec,
}

/// Why the users and rules given to [`Authorizer::new`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthConfigError {
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error(transparent)]
    Password(#[from] PasswordError),
    #[error("auth.jwt: {0}")]
    Jwt(String),
}

/// `meshgate_auth_failures_total{reason}`: refused logins, by why.
#[derive(Debug, Clone)]
struct AuthMetrics {
    invalid: Counter,
    rate_limited: Counter,
    busy: Counter,
}

impl AuthMetrics {
    fn new(registry: &Registry) -> Self {
        let c = |reason| registry.counter(crate::metrics::AUTH_FAILURES, &[("reason", reason)]);
        AuthMetrics {
            invalid: c("invalid"),
            rate_limited: c("rate_limited"),
            busy: c("busy"),
        }
    }
}

/// Users, tokens, anonymous and certificate rules and JWT keys as one configuration made them:
/// what [`Authorizer`] holds, and replaces as a whole on a config reload.
pub struct AuthRules {
    users: HashMap<String, User>,
    /// Token digests to user names: a token is found by its digest, not by comparing it with
    /// every configured one.
    tokens: HashMap<Secret, String>,
    anonymous: Option<(Principal, AclSpec)>,
    passwords: Passwords,
    limiter: LoginLimiter,
    metrics: AuthMetrics,
    jwt: Option<JwtVerifier>,
    /// Rules of certificate users the config does not list.
    certificate_rules: Permissions,
}

impl fmt::Debug for AuthRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthRules")
            .field("users", &self.users.len())
            .field("anonymous", &self.anonymous.is_some())
            .finish()
    }
}

/// The SHA-256 digest of a secret. Secrets are compared as digests, in constant time: neither
/// where they differ nor their lengths show in how long a refusal takes (review F17).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Secret([u8; 32]);

impl Secret {
    fn of(secret: &[u8]) -> Secret {
        use sha2::Digest;
        Secret(sha2::Sha256::digest(secret).into())
    }

    fn matches(&self, other: &Secret) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
    }
}

impl AuthRules {
    /// Builds the rules. `anonymous` is `Some` only where config allows anonymous access.
    pub fn new(
        users: Vec<UserSpec>,
        anonymous: Option<Permissions>,
    ) -> Result<Self, AuthConfigError> {
        let mut map = HashMap::new();
        let mut tokens = HashMap::new();
        for spec in users {
            for token in &spec.tokens {
                tokens.insert(Secret::of(token.as_bytes()), spec.name.clone());
            }
            let acl = AclSpec::compile(&spec.permissions, &spec.name)?;
            let user = User {
                principal: Principal {
                    name: Arc::from(spec.name.as_str()),
                    anonymous: false,
                    internal: false,
                    acl: acl.base.clone(),
                    token_acl: None,
                    generation: 0,
                },
                password: spec
                    .password
                    .as_deref()
                    .map(|p| Stored::parse(&spec.name, p))
                    .transpose()?,
                permissions: spec.permissions.clone(),
                certificate: spec.certificate,
                acl,
            };
            map.insert(spec.name, user);
        }
        let anonymous = match anonymous {
            Some(p) => {
                let acl = AclSpec::compile(&p, "anonymous")?;
                Some((
                    Principal {
                        name: Arc::from("anonymous"),
                        anonymous: true,
                        internal: false,
                        acl: acl.base.clone(),
                        token_acl: None,
                        generation: 0,
                    },
                    acl,
                ))
            }
            None => None,
        };
        let passwords = Passwords::new(map.values().filter_map(|u: &User| match &u.password {
            Some(Stored::Hash(h)) => Some(&**h),
            _ => None,
        }));
        Ok(AuthRules {
            users: map,
            tokens,
            anonymous,
            passwords,
            limiter: LoginLimiter::new(LoginPolicy::default()),
            metrics: AuthMetrics::new(&Registry::new()),
            jwt: None,
            certificate_rules: Permissions::default(),
        })
    }

    /// The rules of clients whose verified certificate names a user that is not configured.
    pub fn with_certificate_rules(mut self, rules: Permissions) -> Result<Self, AuthConfigError> {
        AclSpec::compile(&rules, "u")?;
        self.certificate_rules = rules;
        Ok(self)
    }

    /// The principal of a client whose certificate the listener's client CA verified, named
    /// `name` by it: the configured user of that name when it allows certificate logins
    /// (refused when it does not), else a user with the certificate rules.
    pub fn certificate_login(&self, name: &str) -> Result<Principal, AuthError> {
        if name.is_empty()
            || name.len() > 256
            // `{` / `}`: a name such as `{clientid}` would become a template in `{user}` rules.
            || name.contains(['/', '+', '#', '{', '}'])
            || name.contains(char::is_whitespace)
            || name.contains(char::is_control)
        {
            return Err(AuthError::InvalidToken(
                "the client certificate's name is not a usable user name",
            ));
        }
        if let Some(user) = self.users.get(name) {
            return if user.certificate {
                Ok(user.principal.clone())
            } else {
                Err(AuthError::InvalidToken(
                    "the client certificate names a user that may not log in by certificate",
                ))
            };
        }
        let acl = AclSpec::compile(&self.certificate_rules, name).map_err(|_| {
            AuthError::InvalidToken("the certificate rules do not compile for this name")
        })?;
        Ok(Principal {
            name: Arc::from(name),
            anonymous: false,
            internal: false,
            acl: acl.base.clone(),
            token_acl: Some(Arc::new(acl)),
            generation: 0,
        })
    }

    /// Accepts JSON Web Tokens as `spec` says (see [`jwt`]).
    pub fn with_jwt(mut self, spec: JwtSpec) -> Result<Self, AuthConfigError> {
        // The base rules must compile, as a configured user's must.
        AclSpec::compile(&spec.permissions, "u")?;
        self.jwt = Some(JwtVerifier::new(spec).map_err(AuthConfigError::Jwt)?);
        Ok(self)
    }

    /// The failed-login limits (default: [`LoginPolicy::default`]).
    pub fn with_login_policy(mut self, policy: LoginPolicy) -> Self {
        self.limiter = LoginLimiter::new(policy);
        self
    }

    /// Counts refused logins in `registry` (`meshgate_auth_failures_total{reason}`).
    pub fn with_metrics(mut self, registry: &Registry) -> Self {
        self.metrics = AuthMetrics::new(registry);
        self
    }

    /// An authorizer that lets anyone publish and subscribe anywhere (tests, embedded defaults).
    pub fn allow_all() -> Self {
        let all = Permissions {
            publish: vec!["#".into()],
            subscribe: vec!["#".into()],
            ..Permissions::default()
        };
        // "#" is a valid filter.
        AuthRules::new(Vec::new(), Some(all)).unwrap_or_else(|_| AuthRules {
            users: HashMap::new(),
            tokens: HashMap::new(),
            anonymous: None,
            passwords: Passwords::new(std::iter::empty()),
            limiter: LoginLimiter::new(LoginPolicy::default()),
            metrics: AuthMetrics::new(&Registry::new()),
            jwt: None,
            certificate_rules: Permissions::default(),
        })
    }

    /// `principal` as the MQTT client `client_id`: its rules with `{clientid}` bound (without
    /// this, they match nothing). Once per CONNECT; shares the compiled ACL when the principal
    /// has no such rule.
    pub fn for_client(&self, principal: &Principal, client_id: &str) -> Principal {
        match self.spec_of(principal) {
            Some(spec) => Principal {
                acl: spec.for_client(client_id),
                ..principal.clone()
            },
            None => principal.clone(),
        }
    }

    /// The rules of `principal` as configured (a configured user's, the anonymous ones, a token
    /// user's); none for internal principals.
    fn spec_of<'a>(&'a self, principal: &'a Principal) -> Option<&'a AclSpec> {
        if principal.internal {
            None
        } else if let Some(token_acl) = &principal.token_acl {
            Some(token_acl)
        } else if principal.anonymous {
            self.anonymous.as_ref().map(|(_, a)| a)
        } else {
            self.users.get(principal.name()).map(|u| &u.acl)
        }
    }

    /// Whether `principal` may use the MQTT client id `client_id`: it starts with one of the
    /// principal's `client_id_prefixes`, or there are none (review F4's per-user prefixes).
    pub fn client_id_allowed(&self, principal: &Principal, client_id: &str) -> bool {
        self.spec_of(principal).is_none_or(|spec| {
            spec.client_id_prefixes.is_empty()
                || spec
                    .client_id_prefixes
                    .iter()
                    .any(|p| client_id.starts_with(p.as_str()))
        })
    }

    /// The prefix a client id assigned to `principal` must start with (its first one).
    pub fn client_id_prefix(&self, principal: &Principal) -> Option<String> {
        self.spec_of(principal)
            .and_then(|s| s.client_id_prefixes.first())
            .cloned()
    }

    /// The configured user `name`, without its credentials: for parts of the gateway that act
    /// as a user (an AMQP source with `user`), so that its ACL applies to them.
    pub fn user(&self, name: &str) -> Option<Principal> {
        self.users.get(name).map(|u| u.principal.clone())
    }

    pub fn anonymous_allowed(&self) -> bool {
        self.anonymous.is_some()
    }

    /// Authenticates a client connecting from `from` (its address, where there is one).
    ///
    /// Refused without checking anything while `from` or the named user has too many recent
    /// failures ([`AuthError::RateLimited`]). A password login is answered no sooner than one
    /// hash verification takes, whether the user exists or not (see [`password`]).
    pub async fn authenticate(
        &self,
        credentials: Credentials<'_>,
        from: Option<IpAddr>,
    ) -> Result<Principal, AuthError> {
        let started = Instant::now();
        // Counted by the name presented, configured or not (the answers must not tell which
        // names exist); a JWT's MQTT user name is free text and not counted.
        let user_name = match credentials {
            Credentials::Password { username, password } if !self.is_jwt(password) => {
                Some(username)
            }
            _ => None,
        };
        if !matches!(credentials, Credentials::None)
            && let Err(retry_after) = self.limiter.begin(from, user_name)
        {
            self.metrics.rate_limited.inc();
            return Err(AuthError::RateLimited { retry_after });
        }
        let result = match credentials {
            Credentials::None => {
                return self
                    .anonymous
                    .as_ref()
                    .map(|(p, _)| p.clone())
                    .ok_or(AuthError::Required);
            }
            Credentials::Password { username, password } if self.is_jwt(password) => {
                let token = std::str::from_utf8(password).unwrap_or_default();
                self.jwt_login(token, Some(username))
            }
            Credentials::Token(token) if self.is_jwt(token.as_bytes()) => {
                match self.token_user(token) {
                    Some(p) => Ok(p),
                    None => self.jwt_login(token, None),
                }
            }
            Credentials::Password { username, password } => {
                let result = self.check_password(username, password).await;
                // Known or unknown, right or wrong: no answer before the floor.
                let floor = self.passwords.floor();
                if let Some(rest) = floor.checked_sub(started.elapsed())
                    && !rest.is_zero()
                {
                    tokio::time::sleep(rest).await;
                }
                result
            }
            Credentials::Token(token) => self.token_user(token).ok_or(AuthError::Invalid),
        };
        // The attempt was counted as a failure when it began.
        match &result {
            Ok(_) => self.limiter.succeeded(from, user_name),
            Err(AuthError::Invalid | AuthError::InvalidToken(_)) => self.metrics.invalid.inc(),
            Err(AuthError::Busy) => {
                self.metrics.busy.inc();
                self.limiter.undo(from, user_name);
            }
            Err(_) => self.limiter.undo(from, user_name),
        }
        result
    }

    /// The configured user of a static token.
    fn token_user(&self, token: &str) -> Option<Principal> {
        self.tokens
            .get(&Secret::of(token.as_bytes()))
            .and_then(|name| self.users.get(name))
            .map(|u| u.principal.clone())
    }

    /// Whether a presented secret is to be verified as a JWT: JWTs are accepted and it has
    /// the shape of one.
    fn is_jwt(&self, secret: &[u8]) -> bool {
        self.jwt.is_some() && std::str::from_utf8(secret).is_ok_and(jwt::looks_like_jwt)
    }

    /// A token user: the configured user of the token's name (or `[auth.jwt]`'s rules) with
    /// the token's filter claims added. `mqtt_username`: the CONNECT user name, which must be
    /// the token's user when `auth.jwt.mqtt_username = "claim"`.
    fn jwt_login(&self, token: &str, mqtt_username: Option<&str>) -> Result<Principal, AuthError> {
        let Some(verifier) = &self.jwt else {
            return Err(AuthError::Invalid);
        };
        let claims = verifier.verify(token).map_err(AuthError::InvalidToken)?;
        if verifier.spec().match_mqtt_username
            && mqtt_username.is_some_and(|u| !u.is_empty() && u != claims.user)
        {
            return Err(AuthError::InvalidToken(
                "the MQTT user name is not the token's user",
            ));
        }
        let mut permissions = match self.users.get(&claims.user) {
            Some(u) => u.permissions.clone(),
            None => verifier.spec().permissions.clone(),
        };
        permissions.publish.extend(claims.publish);
        permissions.subscribe.extend(claims.subscribe);
        let acl = AclSpec::compile(&permissions, &claims.user).map_err(|_| {
            AuthError::InvalidToken("an ACL claim of the token holds an invalid topic filter")
        })?;
        Ok(Principal {
            name: Arc::from(claims.user.as_str()),
            anonymous: false,
            internal: false,
            acl: acl.base.clone(),
            token_acl: Some(Arc::new(acl)),
            generation: 0,
        })
    }

    async fn check_password(
        &self,
        username: &str,
        password: &[u8],
    ) -> Result<Principal, AuthError> {
        let Some(user) = self.users.get(username) else {
            return Err(AuthError::Invalid);
        };
        let Some(stored) = &user.password else {
            return Err(AuthError::Invalid);
        };
        match self
            .passwords
            .check(&user.principal.name, stored, password)
            .await
        {
            Ok(true) => Ok(user.principal.clone()),
            Ok(false) => Err(AuthError::Invalid),
            Err(HashRefusal::Busy) => Err(AuthError::Busy),
        }
    }
}

/// Authenticates clients and checks their topic permissions: the [`AuthRules`] built from config,
/// replaced as a whole by [`Authorizer::reload`] (a config reload). Each replacement moves
/// [`Authorizer::generation`] on, which connections compare to re-resolve their principal
/// ([`Authorizer::refresh`]) and re-check what they hold.
pub struct Authorizer {
    current: std::sync::RwLock<Arc<AuthRules>>,
    generation: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorizer")
            .field("rules", &*self.rules())
            .field("generation", &self.generation())
            .finish()
    }
}

impl From<AuthRules> for Authorizer {
    fn from(rules: AuthRules) -> Authorizer {
        Authorizer {
            current: std::sync::RwLock::new(Arc::new(rules)),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Authorizer {
    /// See [`AuthRules::new`].
    pub fn new(
        users: Vec<UserSpec>,
        anonymous: Option<Permissions>,
    ) -> Result<Self, AuthConfigError> {
        AuthRules::new(users, anonymous).map(Authorizer::from)
    }

    /// The rules, for building on them (only while nobody else holds them: they are handed
    /// out for the length of a call).
    fn into_rules(self) -> AuthRules {
        let current = self.current.into_inner().unwrap_or_else(|e| e.into_inner());
        Arc::try_unwrap(current)
            .expect("an authorizer's rules are built on before anything else reads them")
    }

    /// See [`AuthRules::with_certificate_rules`].
    pub fn with_certificate_rules(self, rules: Permissions) -> Result<Self, AuthConfigError> {
        self.into_rules()
            .with_certificate_rules(rules)
            .map(Authorizer::from)
    }

    /// See [`AuthRules::with_jwt`].
    pub fn with_jwt(self, spec: JwtSpec) -> Result<Self, AuthConfigError> {
        self.into_rules().with_jwt(spec).map(Authorizer::from)
    }

    /// See [`AuthRules::with_login_policy`].
    pub fn with_login_policy(self, policy: LoginPolicy) -> Self {
        self.into_rules().with_login_policy(policy).into()
    }

    /// See [`AuthRules::with_metrics`].
    pub fn with_metrics(self, registry: &Registry) -> Self {
        self.into_rules().with_metrics(registry).into()
    }

    /// See [`AuthRules::allow_all`].
    pub fn allow_all() -> Self {
        AuthRules::allow_all().into()
    }

    /// The rules in force.
    pub fn rules(&self) -> Arc<AuthRules> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many times the rules were replaced.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Puts `next`'s rules in force (a config reload): logins from now on use them, and
    /// connections see the generation move. Failed-login counts start again.
    pub fn reload(&self, next: Authorizer) {
        let rules = Arc::new(next.into_rules());
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = rules;
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// `principal` under the rules in force (after a reload), as the MQTT client `client_id`
    /// where there is one: a configured user's or the anonymous rules as they are now; `None`
    /// when that user is gone or anonymous access is off. Token and certificate users keep the
    /// rules they logged in with (the token's claims are not kept), and internal principals
    /// are not subject to the rules.
    pub fn refresh(&self, principal: &Principal, client_id: Option<&str>) -> Option<Principal> {
        let generation = self.generation32();
        if principal.internal || principal.token_acl.is_some() {
            return Some(principal.clone().stamped(generation));
        }
        let rules = self.rules();
        let base = if principal.anonymous {
            rules.anonymous.as_ref().map(|(p, _)| p.clone())?
        } else {
            rules
                .users
                .get(principal.name())
                .map(|u| u.principal.clone())?
        };
        let now = match client_id {
            Some(id) => rules.for_client(&base, id),
            None => base,
        };
        Some(now.stamped(generation))
    }

    /// The generation as principals keep it.
    fn generation32(&self) -> u32 {
        // (Truncated: equality is all that is asked of it.)
        self.generation() as u32
    }

    /// `principal` with no rights, as of the rules in force (its user is gone).
    pub fn without_rights(&self, principal: &Principal) -> Principal {
        principal.without_rights().stamped(self.generation32())
    }

    /// Whether `principal` was resolved under the rules in force (one atomic load).
    pub fn is_current(&self, principal: &Principal) -> bool {
        principal.generation == self.generation32()
    }

    /// See [`AuthRules::certificate_login`].
    pub fn certificate_login(&self, name: &str) -> Result<Principal, AuthError> {
        let generation = self.generation32();
        self.rules()
            .certificate_login(name)
            .map(|p| p.stamped(generation))
    }

    /// See [`AuthRules::for_client`].
    pub fn for_client(&self, principal: &Principal, client_id: &str) -> Principal {
        // (Keeps the principal's generation: its rules are those it was resolved under.)
        self.rules().for_client(principal, client_id)
    }

    /// See [`AuthRules::client_id_allowed`].
    pub fn client_id_allowed(&self, principal: &Principal, client_id: &str) -> bool {
        self.rules().client_id_allowed(principal, client_id)
    }

    /// See [`AuthRules::client_id_prefix`].
    pub fn client_id_prefix(&self, principal: &Principal) -> Option<String> {
        self.rules().client_id_prefix(principal)
    }

    /// See [`AuthRules::user`].
    pub fn user(&self, name: &str) -> Option<Principal> {
        let generation = self.generation32();
        self.rules().user(name).map(|p| p.stamped(generation))
    }

    pub fn anonymous_allowed(&self) -> bool {
        self.rules().anonymous_allowed()
    }

    /// See [`AuthRules::authenticate`].
    pub async fn authenticate(
        &self,
        credentials: Credentials<'_>,
        from: Option<IpAddr>,
    ) -> Result<Principal, AuthError> {
        let generation = self.generation32();
        let rules = self.rules();
        rules
            .authenticate(credentials, from)
            .await
            .map(|p| p.stamped(generation))
    }

    /// Whether `principal` may publish to `topic`: its own rules, as resolved at login or by
    /// [`Authorizer::refresh`] (no lock).
    pub fn check_publish(&self, principal: &Principal, topic: &Topic) -> Result<(), AuthError> {
        if principal.internal || principal.acl.publish.allows(topic) {
            Ok(())
        } else {
            Err(AuthError::Forbidden {
                principal: principal.name().to_owned(),
                action: "publish to",
                target: topic.to_string(),
            })
        }
    }

    /// Whether `principal` may subscribe to `filter`, and whether what it receives on it must
    /// then be checked delivery by delivery ([`SubscribeGrant::Filtered`]).
    pub fn check_subscribe(
        &self,
        principal: &Principal,
        filter: &TopicFilter,
    ) -> Result<SubscribeGrant, AuthError> {
        if principal.internal {
            return Ok(SubscribeGrant::All);
        }
        principal
            .acl
            .subscribe
            .grant(filter)
            .ok_or_else(|| AuthError::Forbidden {
                principal: principal.name().to_owned(),
                action: "subscribe to",
                target: filter.to_string(),
            })
    }

    /// Whether `principal` may receive a message on `topic` (its subscribe rules), for the
    /// deliveries of a [`SubscribeGrant::Filtered`] subscription.
    pub fn may_receive(&self, principal: &Principal, topic: &Topic) -> bool {
        principal.internal || principal.acl.subscribe.allows(topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`Authorizer::authenticate`] from no address, on a runtime of its own.
    fn login(a: &Authorizer, credentials: Credentials<'_>) -> Result<Principal, AuthError> {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime")
            .block_on(a.authenticate(credentials, None))
    }

    fn authorizer() -> Authorizer {
        Authorizer::new(
            vec![UserSpec {
                name: "dev1".into(),
                password: Some("s3cret".into()),
                tokens: vec!["tok-1".into()],
                permissions: Permissions {
                    publish: vec!["devices/{user}/#".into()],
                    subscribe: vec!["commands/{user}/+".into()],
                    ..Permissions::default()
                },
                certificate: false,
            }],
            None,
        )
        .unwrap()
    }

    #[test]
    fn authenticate() {
        let a = authorizer();
        assert_eq!(login(&a, Credentials::None), Err(AuthError::Required));
        let p = login(
            &a,
            Credentials::Password {
                username: "dev1",
                password: b"s3cret",
            },
        )
        .unwrap();
        assert_eq!(p.name(), "dev1");
        assert_eq!(login(&a, Credentials::Token("tok-1")).unwrap(), p);
        assert_eq!(
            login(
                &a,
                Credentials::Password {
                    username: "dev1",
                    password: b"wrong",
                }
            ),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            login(&a, Credentials::Token("nope")),
            Err(AuthError::Invalid)
        );
    }

    /// A reload puts new rules in force for logins, and [`Authorizer::refresh`] gives a
    /// connected principal its rules as they are now (or none, its user gone).
    #[test]
    fn a_reload_changes_logins_and_refreshes_connected_principals() {
        let a = authorizer();
        let p = login(&a, Credentials::Token("tok-1")).unwrap();
        let commands = TopicFilter::parse("commands/dev1/+").unwrap();
        assert!(a.check_subscribe(&p, &commands).is_ok());
        assert_eq!(a.generation(), 0);
        let narrower = Authorizer::new(
            vec![UserSpec {
                name: "dev1".into(),
                password: Some("n3w".into()),
                tokens: vec![],
                permissions: Permissions {
                    publish: vec!["devices/{user}/#".into()],
                    subscribe: vec!["commands/{user}/a".into()],
                    ..Permissions::default()
                },
                certificate: false,
            }],
            None,
        )
        .unwrap();
        a.reload(narrower);
        assert_eq!(a.generation(), 1);
        // The old token and password are refused, the new password accepted.
        assert_eq!(
            login(&a, Credentials::Token("tok-1")),
            Err(AuthError::Invalid)
        );
        let new = Credentials::Password {
            username: "dev1",
            password: b"n3w",
        };
        assert_eq!(login(&a, new).unwrap().name(), "dev1");
        // The principal logged in before keeps its rules until refreshed.
        assert!(a.check_subscribe(&p, &commands).is_ok());
        let now = a.refresh(&p, Some("c1")).unwrap();
        assert!(a.check_subscribe(&now, &commands).is_err());
        let only_a = TopicFilter::parse("commands/dev1/a").unwrap();
        assert!(a.check_subscribe(&now, &only_a).is_ok());
        // A user removed: nothing to refresh to; nor for anonymous when it is turned off.
        a.reload(Authorizer::new(Vec::new(), None).unwrap());
        assert!(a.refresh(&p, None).is_none());
        assert!(a.refresh(&Principal::anonymous_for_tests(), None).is_none());
        assert!(a.refresh(&Principal::internal("bridge"), None).is_some());
        let none = p.without_rights();
        assert!(a.check_subscribe(&none, &only_a).is_err());
        let topic = Topic::from_mqtt("devices/dev1/x").unwrap();
        assert!(a.check_publish(&p, &topic).is_ok());
        assert!(a.check_publish(&none, &topic).is_err());
    }

    fn one_user(password: &str) -> Authorizer {
        Authorizer::new(
            vec![UserSpec {
                name: "dev1".into(),
                password: Some(password.into()),
                tokens: vec!["tok-dev1-0001".into()],
                permissions: Permissions::default(),
                certificate: false,
            }],
            None,
        )
        .unwrap()
    }

    fn as_dev1(password: &[u8]) -> Credentials<'_> {
        Credentials::Password {
            username: "dev1",
            password,
        }
    }

    #[tokio::test]
    async fn failed_logins_lock_the_address_and_the_user_until_the_window_ends() {
        let registry = Registry::new();
        let a = one_user("pw")
            .with_login_policy(LoginPolicy {
                max_failures: 3,
                window: Duration::from_millis(300),
            })
            .with_metrics(&registry);
        let (ip1, ip2, ip3): (IpAddr, IpAddr, IpAddr) = (
            "192.0.2.1".parse().unwrap(),
            "192.0.2.2".parse().unwrap(),
            "192.0.2.3".parse().unwrap(),
        );
        for _ in 0..3 {
            let r = a.authenticate(as_dev1(b"guess"), Some(ip1)).await;
            assert_eq!(r, Err(AuthError::Invalid));
        }
        // The right password no longer gets in: not from that address, not as that user.
        for ip in [ip1, ip2] {
            let r = a.authenticate(as_dev1(b"pw"), Some(ip)).await;
            assert!(matches!(r, Err(AuthError::RateLimited { .. })), "{r:?}");
        }
        // A token from the locked address is refused too; from another address it works.
        let r = a
            .authenticate(Credentials::Token("tok-dev1-0001"), Some(ip1))
            .await;
        assert!(matches!(r, Err(AuthError::RateLimited { .. })), "{r:?}");
        let r = a
            .authenticate(Credentials::Token("tok-dev1-0001"), Some(ip3))
            .await;
        assert!(r.is_ok(), "{r:?}");
        tokio::time::sleep(Duration::from_millis(320)).await;
        assert!(a.authenticate(as_dev1(b"pw"), Some(ip1)).await.is_ok());
        let text = registry.render();
        assert!(
            text.contains(r#"meshgate_auth_failures_total{reason="invalid"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"meshgate_auth_failures_total{reason="rate_limited"} 3"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn unknown_user_names_are_counted_like_known_ones() {
        let a = one_user("pw").with_login_policy(LoginPolicy {
            max_failures: 2,
            window: Duration::from_secs(60),
        });
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        for name in ["nobody-1", "nobody-2"] {
            let c = Credentials::Password {
                username: name,
                password: b"x",
            };
            assert_eq!(a.authenticate(c, Some(ip)).await, Err(AuthError::Invalid));
        }
        let r = a.authenticate(as_dev1(b"pw"), Some(ip)).await;
        assert!(matches!(r, Err(AuthError::RateLimited { .. })), "{r:?}");
        let other: IpAddr = "192.0.2.10".parse().unwrap();
        assert!(a.authenticate(as_dev1(b"pw"), Some(other)).await.is_ok());
    }

    #[tokio::test]
    async fn an_unknown_user_is_answered_no_sooner_than_a_known_one() {
        // The default Argon2id cost, as `meshgate passwd` writes it.
        let hash = password::hash_password(b"pw", 19_456, 2).unwrap();
        let a = one_user(&hash).with_login_policy(LoginPolicy {
            max_failures: 0,
            window: Duration::from_secs(60),
        });
        let floor = a.rules().passwords.floor();
        assert!(floor > Duration::ZERO);
        let timed = |c: Credentials<'static>| {
            let a = &a;
            async move {
                let t = Instant::now();
                let r = a.authenticate(c, None).await;
                (r, t.elapsed())
            }
        };
        let unknown = Credentials::Password {
            username: "nobody",
            password: b"pw",
        };
        let (r, took) = timed(unknown).await;
        assert_eq!(r, Err(AuthError::Invalid));
        assert!(
            took >= floor,
            "unknown user answered in {took:?} < {floor:?}"
        );
        let (r, _) = timed(as_dev1(b"pw")).await;
        assert!(r.is_ok());
        // Known now (decided by digest), still answered no sooner.
        let (r, took) = timed(as_dev1(b"wrong")).await;
        assert_eq!(r, Err(AuthError::Invalid));
        assert!(
            took >= floor,
            "cached refusal answered in {took:?} < {floor:?}"
        );
    }

    mod tokens {
        use super::*;
        use jsonwebtoken::{EncodingKey, Header, encode};

        const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

        fn jwt_authorizer(match_mqtt_username: bool) -> Authorizer {
            Authorizer::new(
                vec![UserSpec {
                    name: "dev1".into(),
                    password: None,
                    tokens: vec!["static-token-1".into()],
                    permissions: Permissions {
                        publish: vec!["devices/{user}/#".into()],
                        deny_publish: vec!["devices/{user}/config".into()],
                        ..Permissions::default()
                    },
                    certificate: false,
                }],
                None,
            )
            .unwrap()
            .with_jwt(JwtSpec {
                secret: Some(SECRET.into()),
                leeway: Duration::from_secs(5),
                user_claim: "sub".into(),
                publish_claim: "publish".into(),
                subscribe_claim: "subscribe".into(),
                match_mqtt_username,
                permissions: Permissions {
                    subscribe: vec!["public/#".into()],
                    ..Permissions::default()
                },
                ..JwtSpec::default()
            })
            .unwrap()
        }

        fn token(sub: &str, publish: &[&str]) -> String {
            let exp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                + 60;
            let claims = serde_json::json!({ "sub": sub, "exp": exp, "publish": publish });
            encode(
                &Header::default(),
                &claims,
                &EncodingKey::from_secret(SECRET.as_bytes()),
            )
            .unwrap()
        }

        #[tokio::test]
        async fn a_configured_user_gets_its_rules_plus_the_claims() {
            let a = jwt_authorizer(false);
            let t = token("dev1", &["extra/{user}/x"]);
            let p = a.authenticate(Credentials::Token(&t), None).await.unwrap();
            assert_eq!(p, a.user("dev1").unwrap(), "the same principal as the user");
            assert!(a.check_publish(&p, &topic("devices/dev1/t")).is_ok());
            assert!(a.check_publish(&p, &topic("extra/dev1/x")).is_ok());
            assert!(
                a.check_publish(&p, &topic("devices/dev1/config")).is_err(),
                "the config's deny still wins"
            );
            // Static tokens keep working beside JWTs.
            let q = a
                .authenticate(Credentials::Token("static-token-1"), None)
                .await
                .unwrap();
            assert_eq!(q.name(), "dev1");
        }

        #[tokio::test]
        async fn an_unlisted_user_gets_the_jwt_rules_and_client_id_templates_bind() {
            let a = jwt_authorizer(false);
            let t = token("sensor-9", &["telemetry/{clientid}/#"]);
            let login = Credentials::Password {
                username: "whatever",
                password: t.as_bytes(),
            };
            let p = a.authenticate(login, None).await.unwrap();
            assert_eq!(p.name(), "sensor-9");
            assert!(a.check_subscribe(&p, &filter("public/#")).is_ok());
            assert!(a.check_publish(&p, &topic("telemetry/c-1/t")).is_err());
            let bound = a.for_client(&p, "c-1");
            assert!(a.check_publish(&bound, &topic("telemetry/c-1/t")).is_ok());
            assert!(a.check_publish(&bound, &topic("telemetry/c-2/t")).is_err());
        }

        #[tokio::test]
        async fn the_mqtt_user_name_must_match_when_configured() {
            let a = jwt_authorizer(true);
            let t = token("sensor-9", &[]);
            let as_user = |username| Credentials::Password {
                username,
                password: t.as_bytes(),
            };
            assert!(a.authenticate(as_user("sensor-9"), None).await.is_ok());
            assert!(a.authenticate(as_user(""), None).await.is_ok());
            assert_eq!(
                a.authenticate(as_user("dev1"), None).await,
                Err(AuthError::InvalidToken(
                    "the MQTT user name is not the token's user"
                ))
            );
        }

        #[tokio::test]
        async fn a_bad_filter_in_a_claim_is_an_invalid_token() {
            let a = jwt_authorizer(false);
            let t = token("sensor-9", &["a/#/b"]);
            let r = a.authenticate(Credentials::Token(&t), None).await;
            assert!(matches!(r, Err(AuthError::InvalidToken(_))), "{r:?}");
        }
    }

    #[test]
    fn a_malformed_hash_is_refused_naming_the_user() {
        let e = Authorizer::new(
            vec![UserSpec {
                name: "dev1".into(),
                password: Some("$argon2id$v=19$broken".into()),
                tokens: Vec::new(),
                permissions: Permissions::default(),
                certificate: false,
            }],
            None,
        )
        .expect_err("refused");
        assert!(e.to_string().contains("user `dev1`"), "{e}");
    }

    #[test]
    fn acl_with_user_template() {
        let a = authorizer();
        let p = login(&a, Credentials::Token("tok-1")).unwrap();
        let topic = |s| Topic::from_mqtt(s).unwrap();
        let filter = |s| TopicFilter::parse(s).unwrap();
        assert!(a.check_publish(&p, &topic("devices/dev1/temp")).is_ok());
        assert!(a.check_publish(&p, &topic("devices/dev2/temp")).is_err());
        assert!(
            a.check_subscribe(&p, &filter("commands/dev1/reboot"))
                .is_ok()
        );
        assert!(a.check_subscribe(&p, &filter("commands/dev1/#")).is_err());
        assert!(a.check_subscribe(&p, &filter("#")).is_err());
    }

    fn topic(s: &str) -> Topic {
        Topic::from_mqtt(s).unwrap()
    }
    fn filter(s: &str) -> TopicFilter {
        TopicFilter::parse(s).unwrap()
    }
    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    /// An authorizer with anonymous access under `anonymous` and one user `dev1` (password
    /// `pw`) under `user`.
    fn with(anonymous: Permissions, user: Permissions) -> Authorizer {
        Authorizer::new(
            vec![UserSpec {
                name: "dev1".into(),
                password: Some("pw".into()),
                tokens: Vec::new(),
                permissions: user,
                certificate: false,
            }],
            Some(anonymous),
        )
        .unwrap()
    }

    fn dev1(a: &Authorizer) -> Principal {
        login(
            a,
            Credentials::Password {
                username: "dev1",
                password: b"pw",
            },
        )
        .unwrap()
    }

    /// "Everything except subscribing to `test/nosubscribe`" (the Paho interoperability
    /// suite's `test_subscribe_failure`).
    fn all_but_nosubscribe() -> Permissions {
        Permissions {
            publish: strings(&["#"]),
            subscribe: strings(&["#"]),
            deny_subscribe: strings(&["test/nosubscribe"]),
            ..Permissions::default()
        }
    }

    #[test]
    fn everything_except_subscribing_to_one_topic() {
        let a = with(all_but_nosubscribe(), Permissions::default());
        let anon = login(&a, Credentials::None).unwrap();
        assert!(
            a.check_subscribe(&anon, &filter("test/nosubscribe"))
                .is_err()
        );
        assert_eq!(
            a.check_subscribe(&anon, &filter("test/other")),
            Ok(SubscribeGrant::All)
        );
        // Overlapping filters are granted, their deliveries filtered (as Mosquitto does).
        for f in ["test/#", "+/+", "#", "test/+"] {
            assert_eq!(
                a.check_subscribe(&anon, &filter(f)),
                Ok(SubscribeGrant::Filtered),
                "{f}"
            );
        }
        assert!(!a.may_receive(&anon, &topic("test/nosubscribe")));
        assert!(a.may_receive(&anon, &topic("test/other")));
        // Publishing to it stays allowed: deny_subscribe is about subscribing only.
        assert!(a.check_publish(&anon, &topic("test/nosubscribe")).is_ok());
        // The user has no rules at all.
        let u = dev1(&a);
        assert!(a.check_publish(&u, &topic("test/other")).is_err());
        assert!(a.check_subscribe(&u, &filter("test/other")).is_err());
    }

    #[test]
    fn deny_wins_whatever_the_order() {
        let p = Permissions {
            publish: strings(&["a/#", "a/b/c"]),
            deny_publish: strings(&["a/b/#"]),
            subscribe: strings(&["a/b/c", "a/#"]),
            deny_subscribe: strings(&["a/+/c"]),
            client_id_prefixes: Vec::new(),
        };
        let a = with(Permissions::default(), p);
        let u = dev1(&a);
        // `a/b/c` is allowed twice over, and denied once: denied.
        assert!(a.check_publish(&u, &topic("a/b/c")).is_err());
        assert!(
            a.check_publish(&u, &topic("a/b")).is_err(),
            "a/b/# matches a/b"
        );
        assert!(a.check_publish(&u, &topic("a/x")).is_ok());
        assert!(a.check_subscribe(&u, &filter("a/b/c")).is_err());
        assert!(a.check_subscribe(&u, &filter("a/+/c")).is_err());
        assert_eq!(
            a.check_subscribe(&u, &filter("a/x/d")),
            Ok(SubscribeGrant::All)
        );
        assert_eq!(
            a.check_subscribe(&u, &filter("a/x/+")),
            Ok(SubscribeGrant::Filtered)
        );
    }

    #[test]
    fn a_deny_is_no_grant() {
        // A deny list alone allows nothing.
        let p = Permissions {
            deny_publish: strings(&["x"]),
            deny_subscribe: strings(&["x"]),
            ..Permissions::default()
        };
        let a = with(p, Permissions::default());
        let anon = login(&a, Credentials::None).unwrap();
        assert!(a.check_publish(&anon, &topic("y")).is_err());
        assert!(a.check_subscribe(&anon, &filter("y")).is_err());
        assert!(!a.may_receive(&anon, &topic("y")));
    }

    #[test]
    fn dollar_topics_need_an_explicit_grant() {
        let a = with(all_but_nosubscribe(), Permissions::default());
        let anon = login(&a, Credentials::None).unwrap();
        assert!(a.check_publish(&anon, &topic("$SYS/x")).is_err());
        assert!(a.check_subscribe(&anon, &filter("$SYS/#")).is_err());
        assert!(
            a.check_subscribe(&anon, &filter("$SYS/broker/load"))
                .is_err()
        );
        let p = Permissions {
            publish: strings(&["#", "$SYS/#"]),
            subscribe: strings(&["#", "$SYS/#"]),
            // `#` denies no `$…` topic either.
            deny_subscribe: strings(&["#"]),
            deny_publish: strings(&["+/x"]),
            client_id_prefixes: Vec::new(),
        };
        let a = with(p, Permissions::default());
        let anon = login(&a, Credentials::None).unwrap();
        assert!(a.check_publish(&anon, &topic("$SYS/x")).is_ok());
        assert!(a.check_publish(&anon, &topic("a/x")).is_err());
        assert_eq!(
            a.check_subscribe(&anon, &filter("$SYS/#")),
            Ok(SubscribeGrant::All)
        );
        assert!(a.check_subscribe(&anon, &filter("a")).is_err());
    }

    #[test]
    fn client_id_template() {
        let p = Permissions {
            publish: strings(&["devices/{clientid}/#", "users/{user}/#"]),
            subscribe: strings(&["devices/#"]),
            deny_subscribe: strings(&["devices/{clientid}/secret"]),
            ..Permissions::default()
        };
        let a = with(Permissions::default(), p);
        let u = dev1(&a);
        // Without a client id (HTTP, WebSocket) `{clientid}` rules match nothing.
        assert!(a.check_publish(&u, &topic("devices/d7/t")).is_err());
        assert!(a.check_publish(&u, &topic("devices/{clientid}/t")).is_err());
        assert!(a.check_publish(&u, &topic("users/dev1/t")).is_ok());
        assert_eq!(
            a.check_subscribe(&u, &filter("devices/d7/secret")),
            Ok(SubscribeGrant::All)
        );
        let d7 = a.for_client(&u, "d7");
        assert_eq!(d7, u, "the same principal");
        assert!(a.check_publish(&d7, &topic("devices/d7/t")).is_ok());
        assert!(a.check_publish(&d7, &topic("devices/d7")).is_ok());
        assert!(a.check_publish(&d7, &topic("devices/d8/t")).is_err());
        assert!(a.check_publish(&d7, &topic("users/dev1/t")).is_ok());
        assert!(
            a.check_subscribe(&d7, &filter("devices/d7/secret"))
                .is_err()
        );
        assert_eq!(
            a.check_subscribe(&d7, &filter("devices/d8/secret")),
            Ok(SubscribeGrant::All)
        );
        assert_eq!(
            a.check_subscribe(&d7, &filter("devices/+/secret")),
            Ok(SubscribeGrant::Filtered)
        );
        assert!(!a.may_receive(&d7, &topic("devices/d7/secret")));
        // Client ids that would change the filter's shape bind nothing.
        for id in ["a/b", "+", "#", "x+y", ""] {
            let p = a.for_client(&u, id);
            assert!(
                a.check_publish(&p, &topic("devices/a/b/t")).is_err(),
                "{id}"
            );
        }
        // Bound again to another id, the first one's rules are gone.
        let d8 = a.for_client(&d7, "d8");
        assert!(a.check_publish(&d8, &topic("devices/d7/t")).is_err());
        assert!(a.check_publish(&d8, &topic("devices/d8/t")).is_ok());
    }

    #[test]
    fn internal_principals_are_not_subject_to_acls() {
        let a = with(Permissions::default(), Permissions::default());
        let p = Principal::internal("amqp-source:x");
        assert!(a.check_publish(&p, &topic("$SYS/x")).is_ok());
        assert_eq!(a.check_subscribe(&p, &filter("#")), Ok(SubscribeGrant::All));
        assert!(a.may_receive(&p, &topic("a")));
        assert!(a.check_publish(&a.for_client(&p, "c"), &topic("a")).is_ok());
    }

    #[test]
    fn bad_filters_are_refused() {
        for bad in ["a/#/b", "a/{clientid}#", "{user}+"] {
            let p = Permissions {
                deny_subscribe: strings(&[bad]),
                ..Permissions::default()
            };
            assert!(Authorizer::new(Vec::new(), Some(p)).is_err(), "{bad}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Every topic of up to 3 levels over a few names.
        fn topics() -> Vec<Topic> {
            let names = ["a", "b", "$s", "z"];
            let mut all = vec![String::new()];
            let mut out = Vec::new();
            for depth in 0..3 {
                all = all
                    .iter()
                    .flat_map(|p| {
                        names.iter().map(move |n| {
                            if depth == 0 {
                                (*n).to_owned()
                            } else {
                                format!("{p}/{n}")
                            }
                        })
                    })
                    .collect();
                out.extend(all.iter().map(|t| topic(t)));
            }
            out
        }

        fn filter_text() -> impl Strategy<Value = String> {
            proptest::collection::vec(prop_oneof!["a", "b", "\\$s", "\\+", "#"], 1..4)
                .prop_filter("bad wildcard", |l| TopicFilter::parse(&l.join("/")).is_ok())
                .prop_map(|l| l.join("/"))
        }

        fn list() -> impl Strategy<Value = Vec<String>> {
            proptest::collection::vec(filter_text(), 0..4)
        }

        proptest! {
            /// A granted subscription never delivers a denied topic: with `All`, every topic
            /// it matches is allowed; with `Filtered`, `may_receive` lets exactly the allowed
            /// ones through. A publish is allowed exactly when an allow matches and no deny.
            #[test]
            fn grants_never_leak_a_denied_topic(
                allow in list(),
                deny in list(),
                requested in filter_text(),
            ) {
                let p = Permissions {
                    publish: allow.clone(),
                    subscribe: allow.clone(),
                    deny_publish: deny.clone(),
                    deny_subscribe: deny.clone(),
                    client_id_prefixes: Vec::new(),
                };
                let a = Authorizer::new(Vec::new(), Some(p)).unwrap();
                let anon = login(&a, Credentials::None).unwrap();
                let matches_any = |list: &[String], t: &Topic| {
                    list.iter().any(|f| filter(f).matches(t))
                };
                let requested = filter(&requested);
                let grant = a.check_subscribe(&anon, &requested);
                for t in topics() {
                    let allowed = matches_any(&allow, &t) && !matches_any(&deny, &t);
                    prop_assert_eq!(a.check_publish(&anon, &t).is_ok(), allowed);
                    prop_assert_eq!(a.may_receive(&anon, &t), allowed);
                    if requested.matches(&t) && grant == Ok(SubscribeGrant::All) {
                        prop_assert!(allowed, "{} granted in full, {} is denied", requested, t);
                    }
                }
                // Refused only when no allow covers the filter or a deny covers all of it.
                if grant.is_err() {
                    let covered = allow.iter().any(|f| filter(f).covers(&requested));
                    let denied = deny.iter().any(|f| filter(f).covers(&requested));
                    prop_assert!(!covered || denied);
                }
            }
        }
    }
}
