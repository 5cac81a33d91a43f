//! A config reload while the client is connected (`gateway/src/reload.rs`): when the
//! authorizer's generation moved, the session's principal is resolved again under the new
//! rules (a user removed keeps no rights) and every subscription is checked again. Those no
//! longer granted stop delivering at once and are removed at the next packet the client sends
//! (ending their backbone subscription, and a persistent session's durable one); the others
//! take their new grant (a deny rule inside the filter makes deliveries checked one by one).
//! MQTT has no packet that tells a client a subscription ended: it is logged and counted
//! (`meshgate_errors_total{kind="unauthorized"}`).

use meshgate_core::SubscribeGrant;
use meshgate_core::metrics::ErrorKind;

use super::Session;

impl Session {
    /// Resolves the principal and the grants again if the rules changed since the last time.
    /// One atomic load otherwise.
    pub(super) fn reauthorize(&mut self) {
        let authorizer = &self.shared.ctx.authorizer;
        if authorizer.is_current(&self.principal) {
            return;
        }
        let principal = authorizer
            .refresh(&self.principal, Some(&self.client_id))
            .unwrap_or_else(|| authorizer.without_rights(&self.principal));
        for s in &mut self.subscriptions {
            match authorizer.check_subscribe(&principal, &s.filter) {
                Ok(grant) => s.filtered = grant == SubscribeGrant::Filtered,
                Err(_) => s.revoked = true,
            }
        }
        self.principal = principal;
    }

    /// Removes the subscriptions [`Session::reauthorize`] revoked.
    pub(super) async fn finish_revocations(&mut self) {
        let (revoked, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.subscriptions)
            .into_iter()
            .partition(|s| s.revoked);
        self.subscriptions = kept;
        self.list_subscriptions();
        for s in &revoked {
            self.shared.subscriptions.dec();
            self.shared.metrics.error(ErrorKind::Unauthorized);
            tracing::info!(
                client_id = self.client_id,
                filter = s.key,
                "mqtt: subscription removed: the reloaded configuration no longer grants it"
            );
            self.forget_durable(s).await;
        }
        drop(revoked);
        self.save_stored().await;
    }
}
