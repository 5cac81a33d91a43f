//! Authentication to a [`Principal`] and topic-level authorization.
//!
//! Every connection authenticates first (username/password or a static bearer token; anonymous
//! only where configured). Every publish is checked against the principal's `publish` rules
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

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::topic::{Topic, TopicError, TopicFilter};

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
        }
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

    #[cfg(test)]
    pub(crate) fn anonymous_for_tests() -> Principal {
        Principal {
            name: Arc::from("anonymous"),
            anonymous: true,
            internal: false,
            acl: Arc::default(),
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
}

/// One configured user.
#[derive(Clone)]
pub struct UserSpec {
    pub name: String,
    pub password: Option<String>,
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
    /// SHA-256 of the password: compared by digest (see [`Secret`]).
    password: Option<Secret>,
    acl: AclSpec,
}

/// Authenticates clients and checks their topic permissions. Built once from config.
pub struct Authorizer {
    users: HashMap<String, User>,
    /// Token digests to user names: a token is found by its digest, not by comparing it with
    /// every configured one.
    tokens: HashMap<Secret, String>,
    anonymous: Option<(Principal, AclSpec)>,
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorizer")
            .field("users", &self.users.len())
            .field("anonymous", &self.anonymous.is_some())
            .finish()
    }
}

/// The SHA-256 digest of a secret. Secrets are compared as digests, in constant time: neither
/// where they differ nor their lengths show in how long a refusal takes (review F17).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Secret([u8; 32]);

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

/// What a password is compared with when there is none to compare with (an unknown user, a
/// user with only tokens): the same work as for a known user, so timing does not tell whether
/// a user exists (review F17).
static NO_PASSWORD: std::sync::LazyLock<Secret> =
    std::sync::LazyLock::new(|| Secret::of(b"\0meshgate: no password\0"));

impl Authorizer {
    /// Builds the authorizer. `anonymous` is `Some` only where config allows anonymous access.
    pub fn new(users: Vec<UserSpec>, anonymous: Option<Permissions>) -> Result<Self, TopicError> {
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
                },
                password: spec.password.as_deref().map(|p| Secret::of(p.as_bytes())),
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
                    },
                    acl,
                ))
            }
            None => None,
        };
        Ok(Authorizer {
            users: map,
            tokens,
            anonymous,
        })
    }

    /// An authorizer that lets anyone publish and subscribe anywhere (tests, embedded defaults).
    pub fn allow_all() -> Self {
        let all = Permissions {
            publish: vec!["#".into()],
            subscribe: vec!["#".into()],
            ..Permissions::default()
        };
        // "#" is a valid filter.
        Authorizer::new(Vec::new(), Some(all)).unwrap_or_else(|_| Authorizer {
            users: HashMap::new(),
            tokens: HashMap::new(),
            anonymous: None,
        })
    }

    /// `principal` as the MQTT client `client_id`: its rules with `{clientid}` bound (without
    /// this, they match nothing). Once per CONNECT; shares the compiled ACL when the principal
    /// has no such rule.
    pub fn for_client(&self, principal: &Principal, client_id: &str) -> Principal {
        let spec = if principal.internal {
            None
        } else if principal.anonymous {
            self.anonymous.as_ref().map(|(_, a)| a)
        } else {
            self.users.get(principal.name()).map(|u| &u.acl)
        };
        match spec {
            Some(spec) => Principal {
                acl: spec.for_client(client_id),
                ..principal.clone()
            },
            None => principal.clone(),
        }
    }

    /// The configured user `name`, without its credentials: for parts of the gateway that act
    /// as a user (an AMQP source with `user`), so that its ACL applies to them.
    pub fn user(&self, name: &str) -> Option<Principal> {
        self.users.get(name).map(|u| u.principal.clone())
    }

    pub fn anonymous_allowed(&self) -> bool {
        self.anonymous.is_some()
    }

    pub fn authenticate(&self, credentials: Credentials<'_>) -> Result<Principal, AuthError> {
        match credentials {
            Credentials::None => self
                .anonymous
                .as_ref()
                .map(|(p, _)| p.clone())
                .ok_or(AuthError::Required),
            Credentials::Password { username, password } => {
                // Digest and comparison happen whether or not the user exists.
                let presented = Secret::of(password);
                let user = self.users.get(username);
                let expected = user.and_then(|u| u.password).unwrap_or(*NO_PASSWORD);
                match user {
                    Some(u) if u.password.is_some() && expected.matches(&presented) => {
                        Ok(u.principal.clone())
                    }
                    _ => Err(AuthError::Invalid),
                }
            }
            Credentials::Token(token) => {
                let name = self
                    .tokens
                    .get(&Secret::of(token.as_bytes()))
                    .ok_or(AuthError::Invalid)?;
                self.users
                    .get(name)
                    .map(|u| u.principal.clone())
                    .ok_or(AuthError::Invalid)
            }
        }
    }

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
            }],
            None,
        )
        .unwrap()
    }

    #[test]
    fn authenticate() {
        let a = authorizer();
        assert_eq!(a.authenticate(Credentials::None), Err(AuthError::Required));
        let p = a
            .authenticate(Credentials::Password {
                username: "dev1",
                password: b"s3cret",
            })
            .unwrap();
        assert_eq!(p.name(), "dev1");
        assert_eq!(a.authenticate(Credentials::Token("tok-1")).unwrap(), p);
        assert_eq!(
            a.authenticate(Credentials::Password {
                username: "dev1",
                password: b"wrong",
            }),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            a.authenticate(Credentials::Token("nope")),
            Err(AuthError::Invalid)
        );
    }

    #[test]
    fn acl_with_user_template() {
        let a = authorizer();
        let p = a.authenticate(Credentials::Token("tok-1")).unwrap();
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
            }],
            Some(anonymous),
        )
        .unwrap()
    }

    fn dev1(a: &Authorizer) -> Principal {
        a.authenticate(Credentials::Password {
            username: "dev1",
            password: b"pw",
        })
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
        let anon = a.authenticate(Credentials::None).unwrap();
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
        let anon = a.authenticate(Credentials::None).unwrap();
        assert!(a.check_publish(&anon, &topic("y")).is_err());
        assert!(a.check_subscribe(&anon, &filter("y")).is_err());
        assert!(!a.may_receive(&anon, &topic("y")));
    }

    #[test]
    fn dollar_topics_need_an_explicit_grant() {
        let a = with(all_but_nosubscribe(), Permissions::default());
        let anon = a.authenticate(Credentials::None).unwrap();
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
        };
        let a = with(p, Permissions::default());
        let anon = a.authenticate(Credentials::None).unwrap();
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
                };
                let a = Authorizer::new(Vec::new(), Some(p)).unwrap();
                let anon = a.authenticate(Credentials::None).unwrap();
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
