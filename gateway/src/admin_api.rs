//! The admin API of live state, on the admin listener (docs/admin-api.md): connections (list,
//! inspect, close), MQTT persistent sessions and retained messages (list, delete), AMQP links,
//! the backbone's subscriptions.
//! Every request needs `Authorization: Bearer <admin.api_token>`, as `/triggers` does; errors
//! are `application/problem+json`. Listings are paged: `?limit=` (at most 1000) and the
//! previous page's `next` as `?after=`.

use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use meshgate_core::connections::{Connections, MAX_PAGE, Query as ConnectionQuery};
use meshgate_core::{Backbone, BackboneSubscription};
use serde::Deserialize;
use std::sync::Arc;

use crate::triggers_api::{problem, refusal_for};

/// Page length when `?limit=` is not given.
const DEFAULT_PAGE: usize = 100;

/// What the routes read.
#[derive(Clone)]
pub struct AdminApi {
    pub connections: Connections,
    pub backbone: Arc<dyn Backbone>,
    #[cfg(feature = "mqtt")]
    pub mqtt: Option<meshgate_mqtt::admin::MqttAdmin>,
    #[cfg(feature = "amqp")]
    pub amqp: Option<meshgate_amqp::AmqpStatus>,
    pub token: Option<String>,
}

impl std::fmt::Debug for AdminApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminApi")
            .field("connections", &self.connections)
            .field("backbone", &self.backbone.name())
            .field("token", &self.token.as_ref().map(|_| "<secret>"))
            .finish_non_exhaustive()
    }
}

pub fn router(api: AdminApi) -> Router {
    let router = Router::new()
        .route("/connections", get(list_connections))
        .route(
            "/connections/{id}",
            get(show_connection).delete(close_connection),
        )
        .route("/amqp/links", get(amqp_links))
        .route("/backbone/subscriptions", get(backbone_subscriptions));
    #[cfg(feature = "mqtt")]
    let router = mqtt_routes::routes(router);
    // One token check for every route, before any extractor reads the request.
    router
        .route_layer(axum::middleware::from_fn_with_state(
            api.token.clone(),
            require_token,
        ))
        .with_state(api)
}

/// Refuses a request without `Authorization: Bearer <admin.api_token>` (see
/// [`refusal_for`]).
async fn require_token(
    State(token): State<Option<String>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(r) = refusal_for(token.as_deref(), request.headers()) {
        return r;
    }
    next.run(request).await
}

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_string(body) {
        Ok(text) => (status, [(header::CONTENT_TYPE, "application/json")], text).into_response(),
        Err(e) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot encode the answer: {e}"),
            None,
        ),
    }
}

fn bad_query(e: &QueryRejection) -> Response {
    problem(
        StatusCode::BAD_REQUEST,
        &format!("bad query string: {}", e.body_text()),
        None,
    )
}

/// A path segment that does not decode (e.g. `%FF`): said as a problem, after the token check.
fn bad_path(e: &PathRejection) -> Response {
    problem(
        StatusCode::BAD_REQUEST,
        &format!("bad path: {}", e.body_text()),
        None,
    )
}

/// A list endpoint's query and its page size (`limit`), or the problem to answer.
fn paged<Q>(
    query: Result<Query<Q>, QueryRejection>,
    limit: impl FnOnce(&Q) -> Option<usize>,
) -> Result<(Q, usize), Box<Response>> {
    let Query(q) = query.map_err(|e| Box::new(bad_query(&e)))?;
    let n = page_limit(limit(&q))?;
    Ok((q, n))
}

fn page_limit(limit: Option<usize>) -> Result<usize, Box<Response>> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(n) => Err(Box::new(problem(
            StatusCode::BAD_REQUEST,
            &format!("limit={n}: a page holds 1 to {MAX_PAGE} items"),
            None,
        ))),
    }
}

#[derive(Debug, Deserialize)]
struct ConnectionsQuery {
    protocol: Option<String>,
    user: Option<String>,
    client_id: Option<String>,
    after: Option<u64>,
    limit: Option<usize>,
}

async fn list_connections(
    State(api): State<AdminApi>,
    query: Result<Query<ConnectionsQuery>, QueryRejection>,
) -> Response {
    let (q, limit) = match paged(query, |q| q.limit) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let page = api.connections.list(&ConnectionQuery {
        protocol: q.protocol,
        user: q.user,
        client_id: q.client_id,
        after: q.after.unwrap_or(0),
        limit,
    });
    json(StatusCode::OK, &page)
}

fn connection_id(id: &str) -> Result<u64, Box<Response>> {
    id.parse().map_err(|_| {
        Box::new(problem(
            StatusCode::BAD_REQUEST,
            &format!("`{id}` is not a connection id (a number, as GET /connections lists them)"),
            None,
        ))
    })
}

async fn show_connection(
    State(api): State<AdminApi>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let Path(id) = match id {
        Ok(p) => p,
        Err(e) => return bad_path(&e),
    };
    let id = match connection_id(&id) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    match api.connections.get(id) {
        Some(c) => json(StatusCode::OK, &c),
        None => problem(
            StatusCode::NOT_FOUND,
            &format!("no connection {id} (closed, or never was)"),
            None,
        ),
    }
}

async fn close_connection(
    State(api): State<AdminApi>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let Path(id) = match id {
        Ok(p) => p,
        Err(e) => return bad_path(&e),
    };
    let id = match connection_id(&id) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    if api.connections.close(id) {
        // Closing takes the connection's next turn (an MQTT 5 DISCONNECT or a close frame
        // after what is already queued).
        json(
            StatusCode::ACCEPTED,
            &serde_json::json!({ "id": id, "closing": true }),
        )
    } else {
        problem(
            StatusCode::NOT_FOUND,
            &format!("no connection {id} (closed, or never was)"),
            None,
        )
    }
}

/// Persistent sessions and retained messages: the MQTT broker's.
#[cfg(feature = "mqtt")]
mod mqtt_routes {
    use super::*;

    pub(super) fn routes(router: Router<AdminApi>) -> Router<AdminApi> {
        router
            .route(
                "/sessions",
                get(list_sessions).delete(delete_session_by_query),
            )
            .route(
                "/sessions/{client_id}",
                axum::routing::delete(delete_session),
            )
            .route(
                "/retained",
                get(list_retained).delete(delete_retained_by_query),
            )
            .route("/retained/{*topic}", axum::routing::delete(delete_retained))
    }

    fn mqtt(api: &AdminApi) -> Result<&meshgate_mqtt::admin::MqttAdmin, Box<Response>> {
        api.mqtt.as_ref().ok_or_else(|| {
            Box::new(problem(
                StatusCode::NOT_FOUND,
                "the MQTT broker is off (mqtt.enabled = false): it has no sessions or retained messages",
                None,
            ))
        })
    }

    #[derive(Debug, Deserialize)]
    struct SessionsQuery {
        after: Option<String>,
        limit: Option<usize>,
    }

    async fn list_sessions(
        State(api): State<AdminApi>,
        query: Result<Query<SessionsQuery>, QueryRejection>,
    ) -> Response {
        let (q, limit) = match paged(query, |q| q.limit) {
            Ok(x) => x,
            Err(r) => return *r,
        };
        match mqtt(&api) {
            Ok(m) => json(
                StatusCode::OK,
                &m.sessions(q.after.as_deref().unwrap_or(""), limit),
            ),
            Err(r) => *r,
        }
    }

    #[derive(Debug, Deserialize)]
    struct ClientIdQuery {
        client_id: String,
    }

    /// `DELETE /sessions?client_id=` (any client id, `.` and `..` included, which a path
    /// segment cannot carry through URL normalisation).
    async fn delete_session_by_query(
        State(api): State<AdminApi>,
        query: Result<Query<ClientIdQuery>, QueryRejection>,
    ) -> Response {
        match query {
            Ok(Query(q)) => delete_session(State(api), Ok(Path(q.client_id))).await,
            Err(e) => bad_query(&e),
        }
    }

    async fn delete_session(
        State(api): State<AdminApi>,
        client_id: Result<Path<String>, PathRejection>,
    ) -> Response {
        let Path(client_id) = match client_id {
            Ok(p) => p,
            Err(e) => return bad_path(&e),
        };
        match mqtt(&api) {
            Ok(m) => {
                use meshgate_mqtt::admin::DeleteError;
                match m.delete_session(&client_id).await {
                    Ok(true) => StatusCode::NO_CONTENT.into_response(),
                    Ok(false) => problem(
                        StatusCode::NOT_FOUND,
                        &format!("no persistent session of client `{client_id}`"),
                        None,
                    ),
                    Err(e @ (DeleteError::Connected(..) | DeleteError::Claimed(_))) => {
                        problem(StatusCode::CONFLICT, &e.to_string(), None)
                    }
                    Err(e @ DeleteError::Unavailable) => {
                        problem(StatusCode::SERVICE_UNAVAILABLE, &e.to_string(), None)
                    }
                }
            }
            Err(r) => *r,
        }
    }

    #[derive(Debug, Deserialize)]
    struct RetainedQuery {
        /// An MQTT topic filter; `#` (everything) when absent.
        filter: Option<String>,
        limit: Option<usize>,
    }

    async fn list_retained(
        State(api): State<AdminApi>,
        query: Result<Query<RetainedQuery>, QueryRejection>,
    ) -> Response {
        let (q, limit) = match paged(query, |q| q.limit) {
            Ok(x) => x,
            Err(r) => return *r,
        };
        let filter = match meshgate_core::TopicFilter::parse(q.filter.as_deref().unwrap_or("#")) {
            Ok(f) => f,
            Err(e) => {
                return problem(StatusCode::BAD_REQUEST, &format!("filter: {e}"), None);
            }
        };
        match mqtt(&api) {
            Ok(m) => json(StatusCode::OK, &m.retained(&filter, limit).await),
            Err(r) => *r,
        }
    }

    #[derive(Debug, Deserialize)]
    struct TopicQuery {
        topic: String,
    }

    /// `DELETE /retained?topic=` (any topic, `.` and `..` levels included).
    async fn delete_retained_by_query(
        State(api): State<AdminApi>,
        query: Result<Query<TopicQuery>, QueryRejection>,
    ) -> Response {
        match query {
            Ok(Query(q)) => delete_retained(State(api), Ok(Path(q.topic))).await,
            Err(e) => bad_query(&e),
        }
    }

    async fn delete_retained(
        State(api): State<AdminApi>,
        topic: Result<Path<String>, PathRejection>,
    ) -> Response {
        let Path(topic) = match topic {
            Ok(p) => p,
            Err(e) => return bad_path(&e),
        };
        let topic = match meshgate_core::Topic::from_mqtt(&topic) {
            Ok(t) => t,
            Err(e) => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    &format!("`{topic}` is not a topic: {e}"),
                    None,
                );
            }
        };
        match mqtt(&api) {
            Ok(m) => match m.clear_retained(&topic).await {
                Ok(true) => StatusCode::NO_CONTENT.into_response(),
                Ok(false) => problem(
                    StatusCode::NOT_FOUND,
                    &format!("no retained message on `{}`", topic.as_str()),
                    None,
                ),
                Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, &e.to_string(), None),
            },
            Err(r) => *r,
        }
    }
}

#[cfg_attr(
    not(feature = "amqp"),
    expect(
        unused_variables,
        reason = "the AMQP bridge's state, when it is built in"
    )
)]
async fn amqp_links(State(api): State<AdminApi>) -> Response {
    #[cfg(feature = "amqp")]
    if let Some(amqp) = &api.amqp {
        return json(
            StatusCode::OK,
            &serde_json::json!({ "items": amqp.link_states() }),
        );
    }
    problem(
        StatusCode::NOT_FOUND,
        "the AMQP bridge is off (amqp.enabled = false)",
        None,
    )
}

#[derive(Debug, Deserialize)]
struct BackboneQuery {
    after: Option<String>,
    limit: Option<usize>,
}

/// One page of `GET /backbone/subscriptions`.
#[derive(Debug, serde::Serialize)]
struct BackbonePage {
    backbone: &'static str,
    items: Vec<BackboneSubscription>,
    /// The cursor of the next page, when there are more.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
    /// How many more there are after this page.
    more: usize,
}

/// A subscription's place in the listing (filter, group, kind), as a cursor: its JSON array in
/// hex, opaque and safe in a query string whatever the filter and group hold.
fn backbone_cursor(s: &BackboneSubscription) -> String {
    let (filter, group, kind) = s.sort_key();
    let json = serde_json::json!([filter, group, kind]).to_string();
    json.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The (filter, group, kind) a [`backbone_cursor`] holds.
fn read_backbone_cursor(cursor: &str) -> Option<(String, Option<String>, String)> {
    if !cursor.len().is_multiple_of(2) || !cursor.is_ascii() {
        return None;
    }
    let bytes = (0..cursor.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&cursor[i..i + 2], 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    serde_json::from_slice(&bytes).ok()
}

/// `GET /backbone/subscriptions`: this instance's subscriptions as the backbone holds them, by
/// filter, group and kind, paged.
async fn backbone_subscriptions(
    State(api): State<AdminApi>,
    query: Result<Query<BackboneQuery>, QueryRejection>,
) -> Response {
    let (q, limit) = match paged(query, |q| q.limit) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let after = match q.after.as_deref().map(read_backbone_cursor) {
        None => None,
        Some(Some(after)) => Some(after),
        Some(None) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "after: not a cursor of this listing (give the previous page's `next`)",
                None,
            );
        }
    };
    let mut items = api.backbone.subscriptions();
    items.sort_unstable_by(|a, b| a.sort_key().cmp(&b.sort_key()));
    if let Some((filter, group, kind)) = &after {
        let after = (filter.as_str(), group.as_deref(), kind.as_str());
        items.retain(|s| s.sort_key() > after);
    }
    let more = items.len().saturating_sub(limit);
    items.truncate(limit);
    let next = (more > 0)
        .then(|| items.last().map(backbone_cursor))
        .flatten();
    json(
        StatusCode::OK,
        &BackbonePage {
            backbone: api.backbone.name(),
            items,
            next,
            more,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backbone_cursors_read_back() {
        let mut s = BackboneSubscription::new("a/#", Some("g \"x\" é".to_owned()), "nats");
        let cursor = backbone_cursor(&s);
        assert!(cursor.bytes().all(|b| b.is_ascii_hexdigit()), "{cursor}");
        assert_eq!(
            read_backbone_cursor(&cursor),
            Some((
                "a/#".to_owned(),
                Some("g \"x\" é".to_owned()),
                "nats".to_owned()
            ))
        );
        s.group = None;
        assert_eq!(
            read_backbone_cursor(&backbone_cursor(&s)),
            Some(("a/#".to_owned(), None, "nats".to_owned()))
        );
        for bad in ["", "x", "5b", "zz", "5b22612f23225d", "éé"] {
            assert_eq!(read_backbone_cursor(bad), None, "{bad}");
        }
    }
}
