//! MQTT 3.1.1 clients (rumqttc) for the end-to-end tests: subscribe and wait for the SUBACK.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};

/// Subscribes to `filter` at QoS 1 and polls `el` until the SUBACK (panics after 10 s or on a
/// connection error). Other packets polled meanwhile are dropped.
pub async fn subscribe(client: &AsyncClient, el: &mut EventLoop, filter: &str) {
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .unwrap_or_else(|e| panic!("SUBSCRIBE {filter}: {e}"));
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("no SUBACK for {filter}: {e:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no SUBACK for {filter} within 10 s"));
}
