//! Authentication to a [`Principal`] and topic-level authorization.
//!
//! Every connection authenticates first (username/password or a static bearer token; anonymous
//! only where configured). Every publish is checked against the principal's `publish` filters
//! and every subscription against its `subscribe` filters before anything reaches the backbone.
//! Filters may contain `{user}`, replaced by the principal's name.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::topic::{Topic, TopicError, TopicFilter};

/// Who is on the other end of a connection.
#[derive(Clone, PartialEq, Eq)]
pub struct Principal {
    name: Arc<str>,
    anonymous: bool,
    /// A part of the gateway configured by the operator (an AMQP source), not a client: it may
    /// publish and subscribe anywhere.
    internal: bool,
}

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
        }
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

/// Publish and subscribe permissions, as filter templates (`{user}` allowed).
#[derive(Debug, Clone, Default)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
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

#[derive(Debug)]
struct CompiledPermissions {
    publish: Vec<TopicFilter>,
    subscribe: Vec<TopicFilter>,
}

impl CompiledPermissions {
    fn compile(p: &Permissions, user: &str) -> Result<Self, TopicError> {
        let compile = |list: &[String]| {
            list.iter()
                .map(|t| TopicFilter::from_template(t, user))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(CompiledPermissions {
            publish: compile(&p.publish)?,
            subscribe: compile(&p.subscribe)?,
        })
    }
}

struct User {
    principal: Principal,
    password: Option<String>,
    permissions: CompiledPermissions,
}

/// Authenticates clients and checks their topic permissions. Built once from config.
pub struct Authorizer {
    users: HashMap<String, User>,
    tokens: HashMap<String, String>,
    anonymous: Option<(Principal, CompiledPermissions)>,
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorizer")
            .field("users", &self.users.len())
            .field("anonymous", &self.anonymous.is_some())
            .finish()
    }
}

/// Compares secrets in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Authorizer {
    /// Builds the authorizer. `anonymous` is `Some` only where config allows anonymous access.
    pub fn new(users: Vec<UserSpec>, anonymous: Option<Permissions>) -> Result<Self, TopicError> {
        let mut map = HashMap::new();
        let mut tokens = HashMap::new();
        for spec in users {
            for token in &spec.tokens {
                tokens.insert(token.clone(), spec.name.clone());
            }
            let user = User {
                principal: Principal {
                    name: Arc::from(spec.name.as_str()),
                    anonymous: false,
                    internal: false,
                },
                password: spec.password,
                permissions: CompiledPermissions::compile(&spec.permissions, &spec.name)?,
            };
            map.insert(spec.name, user);
        }
        let anonymous = match anonymous {
            Some(p) => Some((
                Principal {
                    name: Arc::from("anonymous"),
                    anonymous: true,
                    internal: false,
                },
                CompiledPermissions::compile(&p, "anonymous")?,
            )),
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
        };
        // "#" is a valid filter.
        Authorizer::new(Vec::new(), Some(all)).unwrap_or_else(|_| Authorizer {
            users: HashMap::new(),
            tokens: HashMap::new(),
            anonymous: None,
        })
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
                let user = self.users.get(username).ok_or(AuthError::Invalid)?;
                match &user.password {
                    Some(expected) if constant_time_eq(expected.as_bytes(), password) => {
                        Ok(user.principal.clone())
                    }
                    _ => Err(AuthError::Invalid),
                }
            }
            Credentials::Token(token) => {
                let name = self
                    .tokens
                    .iter()
                    .find(|(t, _)| constant_time_eq(t.as_bytes(), token.as_bytes()))
                    .map(|(_, n)| n)
                    .ok_or(AuthError::Invalid)?;
                self.users
                    .get(name)
                    .map(|u| u.principal.clone())
                    .ok_or(AuthError::Invalid)
            }
        }
    }

    fn permissions(&self, principal: &Principal) -> Option<&CompiledPermissions> {
        if principal.anonymous {
            self.anonymous.as_ref().map(|(_, p)| p)
        } else {
            self.users.get(principal.name()).map(|u| &u.permissions)
        }
    }

    pub fn check_publish(&self, principal: &Principal, topic: &Topic) -> Result<(), AuthError> {
        let allowed = principal.internal
            || self
                .permissions(principal)
                .is_some_and(|p| p.publish.iter().any(|f| f.matches(topic)));
        if allowed {
            Ok(())
        } else {
            Err(AuthError::Forbidden {
                principal: principal.name().to_owned(),
                action: "publish to",
                target: topic.to_string(),
            })
        }
    }

    pub fn check_subscribe(
        &self,
        principal: &Principal,
        filter: &TopicFilter,
    ) -> Result<(), AuthError> {
        let allowed = principal.internal
            || self
                .permissions(principal)
                .is_some_and(|p| p.subscribe.iter().any(|f| f.covers(filter)));
        if allowed {
            Ok(())
        } else {
            Err(AuthError::Forbidden {
                principal: principal.name().to_owned(),
                action: "subscribe to",
                target: filter.to_string(),
            })
        }
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
}
