//! MQTT retained messages in a JetStream key-value bucket (`<stream>_RETAINED`, one value per
//! topic), so that every gateway instance sends the same retained messages to its subscribers.
//!
//! Keys are the topic in unpadded base64url (KV keys allow only `[-/_=.a-zA-Z0-9]`, topics
//! allow anything); values are `{"qos":<n>,"event":<the JSON format>}`. `matching` lists the
//! keys and reads the matching values: a scan, like the in-memory store.

use std::sync::Arc;

use async_nats::jetstream::kv;
use base64::Engine;
use futures_util::StreamExt;
use meshgate_core::backbone::MqttProperties;
use meshgate_core::{
    BackboneError, BoxFuture, Envelope, Origin, RetainedStore, Topic, TopicFilter, json,
};

pub(crate) const B64: base64::engine::GeneralPurpose =
    base64::engine::general_purpose::URL_SAFE_NO_PAD;

pub(crate) struct KvRetained {
    kv: kv::Store,
    bucket: String,
    max_control_line: usize,
    /// The topics that have a retained message, kept by one watcher per instance, so that a
    /// SUBSCRIBE with a wildcard filter finds its matches without listing the bucket.
    index: Arc<KeyIndex>,
    _watcher: AbortOnDrop,
    /// Values `matching` read (tests check it is bounded).
    #[cfg(test)]
    reads: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for KvRetained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KvRetained")
    }
}

fn failed(e: impl std::fmt::Display) -> BackboneError {
    BackboneError::Unavailable(format!("retained messages (JetStream KV): {e}"))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Stored<'a> {
    qos: u8,
    #[serde(borrow)]
    event: &'a serde_json::value::RawValue,
    /// A plain MQTT message ([`Envelope::plain`]); absent in values stored before it existed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    plain: bool,
    /// The MQTT 5 properties forwarded with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mqtt: Option<StoredMqtt>,
}

/// [`MqttProperties`] as stored (correlation data as bytes in a JSON array is what serde
/// gives `Vec<u8>`; retained messages are few and small, so the plain form is kept).
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredMqtt {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    response_topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    correlation_data: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    payload_utf8: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    user_properties: Vec<(String, String)>,
}

impl From<&MqttProperties> for StoredMqtt {
    fn from(m: &MqttProperties) -> StoredMqtt {
        StoredMqtt {
            response_topic: m.response_topic.clone(),
            correlation_data: m.correlation_data.as_ref().map(|c| c.to_vec()),
            payload_utf8: m.payload_utf8,
            expires_at_ms: m.expires_at_ms,
            content_type: m.content_type.clone(),
            user_properties: m.user_properties.clone(),
        }
    }
}

impl From<StoredMqtt> for MqttProperties {
    fn from(m: StoredMqtt) -> MqttProperties {
        MqttProperties {
            response_topic: m.response_topic,
            correlation_data: m.correlation_data.map(bytes::Bytes::from),
            payload_utf8: m.payload_utf8,
            expires_at_ms: m.expires_at_ms,
            content_type: m.content_type,
            user_properties: m.user_properties,
        }
    }
}

/// The topics with a retained message, as the watcher last saw them.
///
/// Why: listing the bucket's keys (async-nats `keys()`) creates a consumer on the server, which
/// it keeps 30 s after the listing; one per SUBSCRIBE made a connect storm of 20,000 devices
/// hold 20,000 consumers at once, about 40 KiB of nats-server memory each (issue 27, measured
/// with nats-server 2.9.10). One watcher per instance costs one consumer, whatever the number of
/// subscriptions.
#[derive(Debug, Default)]
struct KeyIndex {
    topics: std::sync::Mutex<std::collections::BTreeSet<Topic>>,
    /// The watcher has delivered every key the bucket had when it started: the set is whole.
    current: std::sync::atomic::AtomicBool,
}

impl KeyIndex {
    fn topics(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<Topic>> {
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_current(&self) -> bool {
        self.current.load(std::sync::atomic::Ordering::Acquire)
    }

    fn set_current(&self, current: bool) {
        self.current
            .store(current, std::sync::atomic::Ordering::Release);
    }

    /// The keys of the topics `filter` matches, if the set is whole.
    fn matching(&self, filter: &TopicFilter) -> Option<Vec<String>> {
        if !self.is_current() {
            return None;
        }
        Some(
            self.topics()
                .iter()
                .filter(|t| filter.matches(t))
                .map(|t| B64.encode(t.as_str()))
                .collect(),
        )
    }
}

/// Aborts the watcher task with the store.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The topic of a retained-message key (`None`: not one of ours).
fn topic_of_key(key: &str) -> Option<Topic> {
    B64.decode(key)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|t| Topic::from_mqtt(&t).ok())
}

/// Keeps `index` up to date with the bucket: the last value of every key, then every change.
/// When the watch fails or ends (NATS reconnecting), the set is marked not whole (a SUBSCRIBE
/// waits up to 2 s for it, then lists the bucket) and a new watch starts over after a pause.
async fn watch_keys(kv: kv::Store, index: Arc<KeyIndex>) {
    let mut backoff = meshgate_core::backoff::Backoff::new(
        std::time::Duration::from_millis(200),
        std::time::Duration::from_secs(5),
    );
    loop {
        index.set_current(false);
        match kv.watch_with_history(">").await {
            Ok(mut watch) => {
                // Not cleared: the watch's history brings every key again, with its removal
                // if it was purged meanwhile; clearing here also wiped what this instance had
                // just written (its own `set` inserts at once) and made a SUBSCRIBE miss it.
                // An empty bucket delivers nothing: whole at once (a key put since comes
                // through the watch all the same).
                if kv.status().await.is_ok_and(|s| s.values() == 0) {
                    index.set_current(true);
                }
                while let Some(Ok(entry)) = watch.next().await {
                    backoff.reset();
                    if let Some(topic) = topic_of_key(&entry.key) {
                        let mut topics = index.topics();
                        if entry.operation == kv::Operation::Put {
                            topics.insert(topic);
                        } else {
                            topics.remove(&topic);
                        }
                    }
                    if entry.seen_current {
                        index.set_current(true);
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "jetstream: cannot watch the retained-message keys; SUBSCRIBEs list the bucket meanwhile")
            }
        }
        index.set_current(false);
        tokio::time::sleep(backoff.next_pause()).await;
    }
}

impl KvRetained {
    /// The watcher's keys matching `filter`, once its set is whole, waiting at most 2 s.
    async fn wait_for_index(&self, filter: &TopicFilter) -> Option<Vec<String>> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            if let Some(keys) = self.index.matching(filter) {
                return Some(keys);
            }
        }
        None
    }

    /// Creates (or opens) the bucket, bounded by `backbone.jetstream.retained_max_bytes` and
    /// `kv_max_value_size`.
    pub(crate) async fn open(
        js: &async_nats::jetstream::Context,
        config: &meshgate_config::JetStreamConfig,
        max_control_line: usize,
    ) -> Result<KvRetained, BucketError> {
        let bucket = format!("{}_RETAINED", config.stream);
        let limits = BucketLimits {
            max_bytes: config.retained_max_bytes,
            max_value_size: config.kv_max_value_size,
        };
        let kv = open_bucket(js, &bucket, config.replicas, limits).await?;
        let index = Arc::new(KeyIndex::default());
        let watcher = tokio::spawn(watch_keys(kv.clone(), index.clone())).abort_handle();
        Ok(KvRetained {
            kv,
            bucket,
            max_control_line,
            index,
            _watcher: AbortOnDrop(watcher),
            #[cfg(test)]
            reads: Default::default(),
        })
    }
}

/// Whether requests on `key` fit in the server's `max_control_line`; a longer protocol line
/// makes nats-server close the connection, which the whole backbone shares. The longest is a
/// direct get: `HPUB $JS.API.DIRECT.GET.KV_<bucket>.$KV.<bucket>.<key> <reply inbox> <sizes>`.
pub(crate) fn key_fits(bucket: &str, key: &str, max_control_line: usize) -> bool {
    // The verb, `$JS.API.DIRECT.GET.KV_` and `.$KV.`, async-nats' reply inbox (`_INBOX.` and
    // two 22-character NUIDs), two sizes and CRLF: about 110 bytes.
    const OVERHEAD: usize = 160;
    key.len() + 2 * bucket.len() + OVERHEAD <= max_control_line
}

/// What a KV bucket may hold on the server: without a bound, retained messages or session
/// records fill nats-server's disk (review F6). Past `max_bytes` a put is refused (discard
/// policy `new`: what is stored stays), and so is a value over `max_value_size`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BucketLimits {
    pub(crate) max_bytes: u64,
    pub(crate) max_value_size: usize,
}

/// Why a KV bucket could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BucketError {
    #[error("bucket {bucket}: {source}")]
    Stream {
        bucket: String,
        #[source]
        source: async_nats::jetstream::context::CreateStreamError,
    },
    #[error("bucket {bucket}: {source}")]
    Open {
        bucket: String,
        #[source]
        source: async_nats::jetstream::context::KeyValueError,
    },
}

/// Creates (or opens, updating its limits) a KV bucket. Its stream is created here rather than with
/// `create_key_value`, whose reply parsing fails against nats-server 2.9 (seen in the test);
/// this is the layout a KV bucket has (ADR-8): one message per key, rollups, no deletes,
/// direct gets.
pub(crate) async fn open_bucket(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    replicas: usize,
    limits: BucketLimits,
) -> Result<kv::Store, BucketError> {
    let config = async_nats::jetstream::stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        discard: async_nats::jetstream::stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: replicas,
        storage: async_nats::jetstream::stream::StorageType::File,
        max_bytes: i64::try_from(limits.max_bytes).unwrap_or(i64::MAX),
        // A KV value is one message: its data, the key's subject and headers; config caps the
        // value size at i32::MAX.
        max_message_size: i32::try_from(limits.max_value_size).unwrap_or(i32::MAX),
        ..Default::default()
    };
    js.create_or_update_stream(config)
        .await
        .map_err(|source| BucketError::Stream {
            bucket: bucket.to_owned(),
            source,
        })?;
    js.get_key_value(bucket)
        .await
        .map_err(|source| BucketError::Open {
            bucket: bucket.to_owned(),
            source,
        })
}

impl RetainedStore for KvRetained {
    fn set<'a>(&'a self, envelope: &'a Envelope) -> BoxFuture<'a, Result<(), BackboneError>> {
        Box::pin(async move {
            let json = envelope.json();
            let text = String::from_utf8(json.to_vec())
                .map_err(|e| BackboneError::Rejected(e.to_string()))?;
            let event = serde_json::value::RawValue::from_string(text)
                .map_err(|e| BackboneError::Rejected(e.to_string()))?;
            let value = serde_json::to_vec(&Stored {
                qos: envelope.qos,
                event: &event,
                plain: envelope.plain,
                mqtt: envelope.mqtt.as_deref().map(StoredMqtt::from),
            })
            .map_err(|e| BackboneError::Rejected(e.to_string()))?;
            let key = B64.encode(envelope.topic.as_str());
            if !key_fits(&self.bucket, &key, self.max_control_line) {
                return Err(BackboneError::TopicTooLong(format!(
                    "a retained message's topic of {} bytes is too long for the JetStream \
                     retained-message bucket: its key's protocol line would be over the {} \
                     bytes nats-server accepts (max_control_line; backbone.nats.max_control_line)",
                    envelope.topic.as_str().len(),
                    self.max_control_line
                )));
            }
            let refused = match self.kv.put(key.as_str(), value.into()).await.map_err(|e| {
                // The bucket's bounds (JetStream API errors 10077 "maximum bytes exceeded",
                // 10054 "message size exceeds maximum allowed"): a refusal of this message,
                // not a failure of the store.
                let text = e.to_string();
                if text.contains("10077") || text.contains("maximum bytes exceeded") {
                    BackboneError::Rejected(
                        "the retained-message bucket is full (backbone.jetstream.retained_max_bytes)"
                            .to_owned(),
                    )
                } else if text.contains("10054") || text.contains("message size exceeds") {
                    BackboneError::Rejected(
                        "the retained message is larger than backbone.jetstream.kv_max_value_size"
                            .to_owned(),
                    )
                } else {
                    failed(e)
                }
            }) {
                Ok(_) => {
                    // Seen by this instance's next SUBSCRIBE at once, before the watcher has it.
                    self.index.topics().insert(envelope.topic.clone());
                    return Ok(());
                }
                Err(BackboneError::Rejected(why)) => why,
                Err(e) => return Err(e),
            };
            // Refused: the topic's earlier retained message, if it has one, is no longer its
            // last and must not be sent to new subscribers as if it were ([MQTT-3.3.1-5]); it
            // is purged. The purge marker is smaller than the stored value, so nats-server
            // takes it even in a full bucket (a message replacing the subject's last one frees
            // that one's bytes). Read only on a refusal, to purge only keys that exist.
            if let Ok(Some(entry)) = self.kv.entry(key.as_str()).await
                && entry.operation == kv::Operation::Put
                && let Err(e) = self.kv.purge(key.as_str()).await
            {
                return Err(failed(format!(
                    "a retained message was refused ({refused}) and the topic's earlier one \
                     could not be removed: {e}"
                )));
            }
            Err(BackboneError::Rejected(refused))
        })
    }

    fn clear<'a>(&'a self, topic: &'a Topic) -> BoxFuture<'a, Result<(), BackboneError>> {
        Box::pin(async move {
            let key = B64.encode(topic.as_str());
            if !key_fits(&self.bucket, &key, self.max_control_line) {
                // Never stored (`set` refuses such keys): nothing to clear.
                return Ok(());
            }
            self.kv.purge(key).await.map_err(failed)
        })
    }

    fn matching<'a>(
        &'a self,
        filter: &'a TopicFilter,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFuture<'a, Result<(Vec<Envelope>, u64), BackboneError>> {
        Box::pin(async move {
            // A filter without wildcards is one topic: one key to read. Otherwise the watcher's
            // set, or, while it is not whole (start, reconnect), a listing of the bucket.
            let keys: Vec<String> = if !filter.has_wildcards() {
                let key = B64.encode(filter.as_str());
                if key_fits(&self.bucket, &key, self.max_control_line) {
                    vec![key]
                } else {
                    Vec::new()
                }
            } else if let Some(keys) = self.index.matching(filter) {
                keys
            } else if let Some(keys) = self.wait_for_index(filter).await {
                // Listing makes a consumer per SUBSCRIBE: worth a short wait for the watcher
                // (at start, and after a NATS reconnect, it delivers the keys within moments).
                keys
            } else {
                let mut listed = self.kv.keys().await.map_err(failed)?;
                let mut keys = Vec::new();
                while let Some(key) = listed.next().await {
                    keys.push(key.map_err(failed)?);
                }
                keys
            };
            let mut out = Vec::new();
            // Matches past `limit` or `max_bytes` are counted from the key listing, never read.
            let mut beyond = 0u64;
            // What is left of `max_bytes`; `None` once a value read did not fit. A value's size
            // is known only once it is read (up to `kv_max_value_size`), so the one that does
            // not fit is the last read.
            let mut bytes_left = Some(max_bytes);
            for key in keys {
                let Some(topic) = topic_of_key(&key) else {
                    continue;
                };
                if !filter.matches(&topic) {
                    continue;
                }
                let Some(left) = bytes_left.filter(|_| out.len() < limit) else {
                    beyond += 1;
                    continue;
                };
                #[cfg(test)]
                self.reads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(value) = self.kv.get(key.as_str()).await.map_err(failed)? else {
                    continue;
                };
                let Ok(stored) = serde_json::from_slice::<Stored<'_>>(&value) else {
                    continue;
                };
                let size = topic.as_str().len() + stored.event.get().len();
                if size > left {
                    bytes_left = None;
                    beyond += 1;
                    continue;
                }
                bytes_left = Some(left - size);
                let Ok(event) = json::decode(stored.event.get().as_bytes()) else {
                    continue;
                };
                let origin = Origin {
                    instance: Arc::from(""),
                    connection: 0,
                };
                let mut envelope = Envelope::new(topic, Arc::new(event), origin)
                    .with_qos(stored.qos)
                    .with_retain(true)
                    .with_plain(stored.plain);
                if let Some(m) = stored.mqtt {
                    envelope = envelope.with_mqtt(m.into());
                }
                out.push(envelope);
            }
            Ok((out, beyond))
        })
    }
}

/// Against the nats-server on 127.0.0.1:4222 (with JetStream), each test in a bucket of its own.
#[cfg(test)]
mod tests {
    use super::*;

    async fn bucket(
        max_bytes: u64,
        max_value_size: usize,
    ) -> (KvRetained, async_nats::jetstream::Context) {
        let client = async_nats::connect("127.0.0.1:4222")
            .await
            .expect("these tests need nats-server with JetStream on 127.0.0.1:4222");
        let js = async_nats::jetstream::new(client);
        let mut config = meshgate_config::Config::default().backbone.jetstream;
        config.stream = format!("RT{}", meshgate_core::wrap::new_id().replace('-', ""));
        config.retained_max_bytes = max_bytes;
        config.kv_max_value_size = max_value_size;
        let store = KvRetained::open(&js, &config, 4096).await.unwrap();
        (store, js)
    }

    async fn drop_bucket(store: KvRetained, js: async_nats::jetstream::Context) {
        let _ = js.delete_stream(format!("KV_{}", store.bucket)).await;
    }

    fn envelope(topic: &str, size: usize) -> Envelope {
        let w = meshgate_core::wrap::Wrapper::new("/t", "t").unwrap();
        let event = w
            .wrap(bytes::Bytes::from(vec![b'a'; size]), None, None)
            .unwrap();
        let origin = Origin {
            instance: Arc::from("i"),
            connection: 1,
        };
        Envelope::new(Topic::from_mqtt(topic).unwrap(), Arc::new(event), origin)
    }

    async fn topics(store: &KvRetained, filter: &str) -> Vec<String> {
        let f = TopicFilter::parse(filter).unwrap();
        let (v, _) = store.matching(&f, 100, usize::MAX).await.unwrap();
        let mut t: Vec<String> = v.iter().map(|e| e.topic.as_str().to_owned()).collect();
        t.sort();
        t
    }

    /// A retained message the bucket refuses (full, or over the value size) for a topic that
    /// has one removes the old one ([MQTT-3.3.1-5]: a new subscriber must not get stale state).
    #[tokio::test]
    async fn a_refused_replacement_purges_the_stale_message() {
        let (store, js) = bucket(32 * 1024, 16 * 1024).await;
        store.set(&envelope("s/1", 8000)).await.unwrap();
        store.set(&envelope("s/2", 8000)).await.unwrap();
        assert_eq!(topics(&store, "s/#").await, ["s/1", "s/2"]);
        // Over the value size: refused, and s/1's earlier message is gone.
        let r = store.set(&envelope("s/1", 20_000)).await;
        assert!(matches!(r, Err(BackboneError::Rejected(_))), "{r:?}");
        assert_eq!(topics(&store, "s/#").await, ["s/2"]);
        // Fill the bucket; a bigger replacement of a kept topic is refused and purges it.
        let mut kept = Vec::new();
        for i in 3..10 {
            let t = format!("s/{i}");
            if store.set(&envelope(&t, 8000)).await.is_ok() {
                kept.push(t);
            }
        }
        assert!(kept.len() < 7, "the bucket never filled: {kept:?}");
        let victim = kept.pop().unwrap();
        let r = store.set(&envelope(&victim, 12_000)).await;
        assert!(matches!(r, Err(BackboneError::Rejected(_))), "{r:?}");
        assert!(!topics(&store, "s/#").await.contains(&victim));
        // A refused message for a topic without one stores nothing (no purge marker).
        let r = store.set(&envelope("s/new", 20_000)).await;
        assert!(matches!(r, Err(BackboneError::Rejected(_))), "{r:?}");
        let entry = store.kv.entry(B64.encode("s/new")).await.unwrap();
        assert!(entry.is_none(), "{entry:?}");
        drop_bucket(store, js).await;
    }

    /// Wildcard filters are matched against the watcher's set of topics, exact ones read their
    /// one key: however many SUBSCRIBEs, the bucket has one consumer (the watcher's), where
    /// listing its keys made one per SUBSCRIBE. Another writer's changes reach the set.
    #[tokio::test]
    async fn subscribes_find_retained_messages_without_a_consumer_each() {
        let (store, js) = bucket(1 << 20, 64 * 1024).await;
        for t in ["w/1", "w/2", "x/1"] {
            store.set(&envelope(t, 10)).await.unwrap();
        }
        // Seen at once by this instance (its own writes).
        assert_eq!(topics(&store, "w/+").await, ["w/1", "w/2"]);
        // Another writer (another instance) puts a key: the watcher brings it.
        let other = js.get_key_value(store.bucket.clone()).await.unwrap();
        let value = store.kv.get(B64.encode("x/1")).await.unwrap().unwrap();
        other.put(B64.encode("w/3"), value).await.unwrap();
        let d = std::time::Instant::now();
        while topics(&store, "w/#").await.len() < 3 {
            assert!(
                d.elapsed() < std::time::Duration::from_secs(5),
                "the watcher did not see w/3"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(store.index.is_current());
        for _ in 0..20 {
            assert_eq!(topics(&store, "x/1").await, ["x/1"]);
            assert_eq!(topics(&store, "#").await.len(), 4);
        }
        store
            .clear(&Topic::from_mqtt("w/1").unwrap())
            .await
            .unwrap();
        assert_eq!(topics(&store, "w/+").await, ["w/2", "w/3"]);
        let mut stream = js.get_stream(format!("KV_{}", store.bucket)).await.unwrap();
        let consumers = stream.info().await.unwrap().state.consumer_count;
        assert_eq!(consumers, 1, "the watcher's only");
        drop_bucket(store, js).await;
    }

    /// One SUBSCRIBE's retained messages are bounded in bytes as they are read: past the
    /// budget no more values are read from the bucket (each may be `kv_max_value_size`).
    #[tokio::test]
    async fn matching_stops_reading_once_the_byte_budget_is_spent() {
        use std::sync::atomic::Ordering::Relaxed;
        let (store, js) = bucket(4 * 1024 * 1024, 64 * 1024).await;
        for i in 0..20 {
            store
                .set(&envelope(&format!("m/{i:02}"), 10_000))
                .await
                .unwrap();
        }
        let one = {
            let e = envelope("m/00", 10_000);
            e.topic.as_str().len() + e.json().len()
        };
        let f = TopicFilter::parse("m/#").unwrap();
        // Room for three and a half.
        let (v, beyond) = store.matching(&f, 1000, 3 * one + one / 2).await.unwrap();
        assert_eq!((v.len(), beyond), (3, 17));
        // The three returned and the fourth, which did not fit; the other 16 never read.
        assert_eq!(store.reads.load(Relaxed), 4);
        // The count limit still applies, and nothing is read past it.
        store.reads.store(0, Relaxed);
        let (v, beyond) = store.matching(&f, 2, usize::MAX).await.unwrap();
        assert_eq!((v.len(), beyond), (2, 18));
        assert_eq!(store.reads.load(Relaxed), 2);
        // A budget smaller than one message: one read, none returned, all counted.
        store.reads.store(0, Relaxed);
        let (v, beyond) = store.matching(&f, 1000, one - 1).await.unwrap();
        assert_eq!((v.len(), beyond), (0, 20));
        assert_eq!(store.reads.load(Relaxed), 1);
        drop_bucket(store, js).await;
    }
}
