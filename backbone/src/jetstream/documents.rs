//! The triggers of the admin API, shared by every instance (issue 21 item 1): one KV bucket,
//! `<stream>_TRIGGERS`, a key per trigger name, the trigger's JSON document as the value. Each
//! instance watches it (one consumer per instance) and runs what it holds.

use futures_util::StreamExt;
use meshgate_core::backbone::DocumentChanges;
use meshgate_core::{BackboneError, BoxFuture, SharedDocuments};

use async_nats::jetstream::kv;

/// The bucket of trigger documents.
#[derive(Debug, Clone)]
pub(crate) struct KvDocuments {
    kv: kv::Store,
}

impl KvDocuments {
    pub(crate) fn new(kv: kv::Store) -> Self {
        KvDocuments { kv }
    }
}

fn unavailable(e: impl std::fmt::Display) -> BackboneError {
    BackboneError::Unavailable(e.to_string())
}

impl SharedDocuments for KvDocuments {
    fn put<'a>(
        &'a self,
        name: &'a str,
        document: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), BackboneError>> {
        Box::pin(async move {
            self.kv
                .put(name, document.into())
                .await
                .map(|_| ())
                .map_err(unavailable)
        })
    }

    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), BackboneError>> {
        Box::pin(async move { self.kv.delete(name).await.map_err(unavailable) })
    }

    fn watch(&self) -> BoxFuture<'_, Result<DocumentChanges, BackboneError>> {
        Box::pin(async move {
            let watch = self.kv.watch_with_history(">").await.map_err(unavailable)?;
            let changes = watch
                .take_while(|e| std::future::ready(e.is_ok()))
                .filter_map(|e| {
                    std::future::ready(e.ok().map(|entry| {
                        let doc =
                            (entry.operation == kv::Operation::Put).then(|| entry.value.to_vec());
                        (entry.key, doc)
                    }))
                });
            Ok(changes.boxed())
        })
    }
}
