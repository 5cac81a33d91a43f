//! A real HTTP subscriber for trigger tests: an axum server on a free loopback port that
//! records every request it gets and answers each from a script (status, headers, body, and
//! how long to hang first); once the script is used up it answers 200 with no body.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};

/// One request as the subscriber saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    /// The request's path.
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
    /// Wait this long before answering (a hanging subscriber).
    pub hang: Duration,
    /// Send the status and headers at once, the body this much later.
    pub slow_body: Duration,
}

impl Answer {
    pub fn status(status: u16) -> Answer {
        Answer {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
            hang: Duration::ZERO,
            slow_body: Duration::ZERO,
        }
    }

    pub fn slow_body(mut self, d: Duration) -> Answer {
        self.slow_body = d;
        self
    }

    pub fn header(mut self, name: &'static str, value: &str) -> Answer {
        self.headers.push((name, value.to_owned()));
        self
    }

    pub fn body(mut self, body: &str) -> Answer {
        self.body = Bytes::from(body.to_owned());
        self
    }

    pub fn hang(mut self, d: Duration) -> Answer {
        self.hang = d;
        self
    }
}

#[derive(Debug, Default)]
struct State {
    seen: Vec<Seen>,
    script: VecDeque<Answer>,
    /// Answers to `OPTIONS` (the webhook handshake), scripted apart from the POSTs.
    options: VecDeque<Answer>,
}

/// The running subscriber; it stops when dropped.
#[derive(Debug)]
pub struct Sink {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sink {
    pub async fn start() -> Sink {
        let state = Arc::new(Mutex::new(State::default()));
        let s = state.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
                let s = s.clone();
                async move { answer(&s, method, uri.path().to_owned(), headers, body).await }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the test subscriber");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Sink { addr, state, task }
    }

    /// The URL of `path` on this subscriber.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Answers the next POSTs with `answers`, in order.
    pub fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .script
            .extend(answers);
    }

    /// Answers the next `OPTIONS` requests with `answers`, in order.
    pub fn script_options(&self, answers: impl IntoIterator<Item = Answer>) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .options
            .extend(answers);
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen
            .clone()
    }

    /// The POSTs so far.
    pub fn posts(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == Method::POST)
            .collect()
    }

    /// Waits until `n` POSTs arrived (panics after `within`).
    pub async fn wait_posts(&self, n: usize, within: Duration) -> Vec<Seen> {
        let d = crate::Deadline::after(within);
        loop {
            let posts = self.posts();
            if posts.len() >= n {
                return posts;
            }
            assert!(
                !d.passed(),
                "the subscriber got {} POSTs within {within:?}, expected {n}",
                posts.len()
            );
            d.pause().await;
        }
    }
}

async fn answer(
    state: &Mutex<State>,
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let next = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        s.seen.push(Seen {
            method: method.clone(),
            path,
            headers,
            body,
            at: Instant::now(),
        });
        if method == Method::OPTIONS {
            s.options.pop_front()
        } else {
            s.script.pop_front()
        }
    };
    let a = next.unwrap_or_else(|| Answer::status(200));
    if !a.hang.is_zero() {
        tokio::time::sleep(a.hang).await;
    }
    let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::OK);
    let mut r = if a.slow_body.is_zero() {
        (status, a.body).into_response()
    } else {
        let (wait, body) = (a.slow_body, a.body);
        let stream = futures_util::stream::once(async move {
            tokio::time::sleep(wait).await;
            Ok::<_, std::convert::Infallible>(body)
        });
        (status, axum::body::Body::from_stream(stream)).into_response()
    };
    for (name, value) in a.headers {
        if let Ok(v) = value.parse() {
            r.headers_mut().insert(name, v);
        }
    }
    r
}
