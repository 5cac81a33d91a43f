//! Persistent MQTT sessions on JetStream, shared by every gateway instance: the records in a KV
//! bucket `<stream>_SESSIONS` (key = client id in unpadded base64url), the queued messages in
//! the sessions' durable consumers (see `JetStreamBackbone::subscribe`), and release requests
//! between instances as NATS request/reply on `_MESHGATE.<stream>.release.<instance>`.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use base64::Engine;
use futures_util::StreamExt;
use meshgate_core::{BackboneError, BoxFuture, ReleaseRequest, SessionStore, TopicFilter};

use std::sync::Arc;

use super::consumer::durable_consumer;
use super::cursors::{Cursors, cursor_key};
use super::retained::{B64, BucketError, BucketLimits, key_fits, open_bucket};

pub(crate) struct KvSessions {
    kv: kv::Store,
    js: jetstream::Context,
    client: async_nats::Client,
    stream: String,
    prefix: String,
    instance: String,
    bucket: String,
    max_control_line: usize,
    /// The instance feed's cursors (decision 0080), when subscriptions use it: a durable
    /// subscription is its cursor, not consumers.
    cursors: Option<Arc<Cursors>>,
}

impl std::fmt::Debug for KvSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KvSessions")
    }
}

fn failed(e: impl std::fmt::Display) -> BackboneError {
    BackboneError::Unavailable(format!("MQTT sessions (JetStream KV): {e}"))
}

impl KvSessions {
    /// Refuses at once while the management connection is down: async-nats would hold the
    /// request until its timeout (5 s), and an MQTT connection saving its session on the way
    /// out at shutdown waited that long for a NATS that was gone (issue 19 item 4).
    fn reachable(&self) -> Result<(), BackboneError> {
        if self.client.connection_state() == async_nats::connection::State::Connected {
            Ok(())
        } else {
            Err(failed("NATS is not connected"))
        }
    }

    pub(crate) async fn open(
        client: &async_nats::Client,
        js: &jetstream::Context,
        config: &meshgate_config::JetStreamConfig,
        prefix: &str,
        instance: &str,
        max_control_line: usize,
        cursors: Option<Arc<Cursors>>,
    ) -> Result<KvSessions, BucketError> {
        let stream = &config.stream;
        let bucket = format!("{stream}_SESSIONS");
        // Bounded by `backbone.jetstream.sessions_max_bytes` and `kv_max_value_size`.
        let limits = BucketLimits {
            max_bytes: config.sessions_max_bytes,
            max_value_size: config.kv_max_value_size,
        };
        let kv = open_bucket(js, &bucket, config.replicas, limits).await?;
        Ok(KvSessions {
            kv,
            js: js.clone(),
            client: client.clone(),
            stream: stream.to_owned(),
            prefix: prefix.to_owned(),
            instance: instance.to_owned(),
            bucket,
            max_control_line,
            cursors,
        })
    }

    /// The key of `client_id`'s record, refused when its requests would not fit the server's
    /// `max_control_line` (nats-server would close the connection).
    fn key(&self, client_id: &str) -> Result<String, BackboneError> {
        let key = B64.encode(client_id);
        if key_fits(&self.bucket, &key, self.max_control_line) {
            return Ok(key);
        }
        Err(BackboneError::Rejected(format!(
            "a client id of {} bytes is too long for the JetStream session store: its key's \
             protocol line would be over the {} bytes nats-server accepts (max_control_line; \
             backbone.nats.max_control_line)",
            client_id.len(),
            self.max_control_line
        )))
    }

    /// The subject on which `instance` takes release requests (instance names may hold any
    /// character; subject tokens may not).
    fn release_subject(&self, instance: &str) -> String {
        format!(
            "_MESHGATE.{}.release.{}",
            self.stream,
            B64.encode(instance.as_bytes())
        )
    }
}

impl SessionStore for KvSessions {
    fn load<'a>(
        &'a self,
        client_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<meshgate_core::backbone::StoredRecord>, BackboneError>> {
        Box::pin(async move {
            self.reachable()?;
            // A client id too long for a key has nothing stored (`save` refuses it), and
            // a clean-session client with such an id needs nothing stored.
            let Ok(key) = self.key(client_id) else {
                return Ok(None);
            };
            let entry = self.kv.entry(key).await.map_err(failed)?;
            // A purged or deleted key is a tombstone: no record.
            Ok(entry
                .filter(|e| e.operation == kv::Operation::Put && !e.value.is_empty())
                .map(|e| (e.value.to_vec(), e.revision)))
        })
    }

    fn save<'a>(
        &'a self,
        client_id: &'a str,
        record: Vec<u8>,
        revision: Option<u64>,
    ) -> BoxFuture<'a, Result<Option<u64>, BackboneError>> {
        Box::pin(async move {
            self.reachable()?;
            let key = self.key(client_id)?;
            // A record saved on the way out (or when letting the session go to another
            // instance) comes after the positions of the subscriptions that just ended, so
            // that the next holder reads where this one stood.
            if let Some(cursors) = &self.cursors {
                cursors.settled().await;
            }
            match revision {
                // `create` also succeeds over a tombstone.
                None => match self.kv.create(&key, record.into()).await {
                    Ok(r) => Ok(Some(r)),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
                    Err(e) => Err(failed(e)),
                },
                Some(rev) => match self.kv.update(&key, record.into(), rev).await {
                    Ok(r) => Ok(Some(r)),
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
                    Err(e) => Err(failed(e)),
                },
            }
        })
    }

    fn remove<'a>(
        &'a self,
        client_id: &'a str,
        revision: u64,
    ) -> BoxFuture<'a, Result<(), BackboneError>> {
        Box::pin(async move {
            self.reachable()?;
            self.kv
                .purge_expect_revision(self.key(client_id)?, Some(revision))
                .await
                .map_err(failed)
        })
    }

    fn delete_durable<'a>(
        &'a self,
        name: &'a str,
        filter: &'a TopicFilter,
    ) -> BoxFuture<'a, Result<(), BackboneError>> {
        Box::pin(async move {
            self.reachable()?;
            if let Some(cursors) = &self.cursors {
                return cursors.delete(&cursor_key(name)).await;
            }
            let stream = self.js.get_stream(&self.stream).await.map_err(failed)?;
            for subject in filter.to_nats_subjects(&self.prefix) {
                let consumer = durable_consumer(name, &subject);
                // Not found: the server removed it already (inactive past its ttl).
                let _ = stream.delete_consumer(&consumer).await;
            }
            Ok(())
        })
    }

    fn release<'a>(
        &'a self,
        instance: &'a str,
        client_id: &'a str,
        within: Duration,
    ) -> BoxFuture<'a, Result<(), BackboneError>> {
        Box::pin(async move {
            self.reachable()?;
            let request = async_nats::Request::new()
                .payload(bytes::Bytes::copy_from_slice(client_id.as_bytes()))
                .timeout(Some(within));
            match self
                .client
                .send_request(self.release_subject(instance), request)
                .await
            {
                Ok(_) => Ok(()),
                // That instance is gone: nobody holds the session.
                Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
                Err(e) => Err(failed(format!("instance {instance} did not release: {e}"))),
            }
        })
    }

    fn release_requests(
        &self,
    ) -> BoxFuture<
        '_,
        Result<futures_util::stream::BoxStream<'static, ReleaseRequest>, BackboneError>,
    > {
        Box::pin(async move {
            let subscriber = self
                .client
                .subscribe(self.release_subject(&self.instance))
                .await
                .map_err(failed)?;
            let client = self.client.clone();
            let requests = subscriber.filter_map(move |m| {
                let client = client.clone();
                let request = String::from_utf8(m.payload.to_vec()).ok().zip(m.reply).map(
                    |(client_id, reply)| {
                        let answer = move || {
                            tokio::spawn(async move {
                                let _ = client.publish(reply, bytes::Bytes::new()).await;
                            });
                        };
                        ReleaseRequest::new(client_id, Box::new(answer))
                    },
                );
                futures_util::future::ready(request)
            });
            Ok(requests.boxed())
        })
    }
}
