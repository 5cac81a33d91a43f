//! MQTT 5 clients (rumqttc) for the end-to-end tests: connect and wait for the CONNACK, wait
//! for a SUBACK. One copy, used by the transparency, `$SYS` and conformance tests.

use rumqttc::v5::mqttbytes::v5::{Packet, SubAck};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};

/// Connects with `options` and returns once the CONNACK arrived (panics on a connection
/// error: the gateway must accept the client).
pub async fn connect(options: MqttOptions) -> (AsyncClient, EventLoop) {
    let (c, mut el) = AsyncClient::new(options, 100);
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => return (c, el),
            Ok(_) => {}
            Err(e) => panic!("the MQTT 5 client did not connect: {e:?}"),
        }
    }
}

/// `connect` as client `id` to the gateway's MQTT listener on loopback `port`.
pub async fn connect_to(port: u16, id: &str) -> (AsyncClient, EventLoop) {
    connect(MqttOptions::new(id, "127.0.0.1", port)).await
}

/// Polls `el` until the next SUBACK, and returns it.
pub async fn suback(el: &mut EventLoop) -> SubAck {
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Packet::SubAck(s))) => return s,
            Ok(_) => {}
            Err(e) => panic!("no SUBACK: {e:?}"),
        }
    }
}
