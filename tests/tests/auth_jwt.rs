//! JSON Web Tokens (issue 22 item 2), against the real binary with keys made by openssl at test
//! time: HS256 bearer tokens on HTTP; RS256 from a PEM public key as the MQTT password
//! (rumqttc 5, mosquitto_pub 3.1.1) with ACL claims; ES256 from a JWKS file on WebSocket,
//! the file replaced while the gateway runs. The failure side: expired, not yet valid, wrongly
//! signed, wrong audience and issuer, alg confusion (HS256 signed with the public key), a user
//! name that is not the token's; and no token in the debug log.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use meshgate_tests::certs::openssl;
use meshgate_tests::{Process, mosquitto_command, spawn_logging_to};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, PubAckReason};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &str = "an-hs256-secret-for-the-tests-0123456789";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

struct Keys {
    dir: PathBuf,
    rsa_private: Vec<u8>,
    rsa_public: PathBuf,
    ec_private: [Vec<u8>; 2],
    jwks: PathBuf,
}

/// An RSA key pair, two EC P-256 key pairs, and a JWKS file holding the first EC key (kid
/// `ec-1`).
fn keys(name: &str) -> Keys {
    let dir = std::env::temp_dir().join(format!("meshgate-jwt-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "rsa.pem",
        ],
        &dir,
    );
    openssl(
        &["pkey", "-in", "rsa.pem", "-pubout", "-out", "rsa.pub.pem"],
        &dir,
    );
    for i in 1..=2 {
        let key = format!("ec-{i}.pem");
        openssl(
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                &key,
            ],
            &dir,
        );
    }
    let keys = Keys {
        rsa_private: std::fs::read(dir.join("rsa.pem")).unwrap(),
        rsa_public: dir.join("rsa.pub.pem"),
        ec_private: [
            std::fs::read(dir.join("ec-1.pem")).unwrap(),
            std::fs::read(dir.join("ec-2.pem")).unwrap(),
        ],
        jwks: dir.join("jwks.json"),
        dir,
    };
    write_jwks(&keys, &[1]);
    keys
}

/// The JWK of EC key `i` (kid `ec-<i>`): x and y from the public key's SPKI DER (its last 64
/// bytes, after the 0x04 point marker).
fn ec_jwk(keys: &Keys, i: usize) -> serde_json::Value {
    let der = openssl(
        &[
            "pkey",
            "-in",
            &format!("ec-{i}.pem"),
            "-pubout",
            "-outform",
            "DER",
        ],
        &keys.dir,
    );
    let point = &der[der.len() - 64..];
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    serde_json::json!({
        "kty": "EC", "crv": "P-256", "kid": format!("ec-{i}"), "use": "sig", "alg": "ES256",
        "x": b64(&point[..32]), "y": b64(&point[32..]),
    })
}

fn write_jwks(keys: &Keys, which: &[usize]) {
    let set =
        serde_json::json!({ "keys": which.iter().map(|i| ec_jwk(keys, *i)).collect::<Vec<_>>() });
    // Written beside it and renamed: the gateway never reads half a file.
    let tmp = keys.dir.join("jwks.json.tmp");
    std::fs::write(&tmp, set.to_string()).unwrap();
    std::fs::rename(&tmp, &keys.jwks).unwrap();
}

fn claims(sub: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut c = serde_json::json!({
        "sub": sub, "exp": now() + 300, "iss": "https://idp.test", "aud": "meshgate",
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn hs256(c: &serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        c,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn rs256(keys: &Keys, c: &serde_json::Value) -> String {
    let key = EncodingKey::from_rsa_pem(&keys.rsa_private).unwrap();
    encode(&Header::new(Algorithm::RS256), c, &key).unwrap()
}

fn es256(keys: &Keys, i: usize, c: &serde_json::Value) -> String {
    let key = EncodingKey::from_ec_pem(&keys.ec_private[i - 1]).unwrap();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(format!("ec-{i}"));
    encode(&header, c, &key).unwrap()
}

/// The gateway with JWTs on, logging at debug level into `<dir>/meshgate.log`.
fn gateway(keys: &Keys, mqtt_username: &str) -> Process {
    let config = keys.dir.join("meshgate.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[log]
level = "debug"
[http]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[mqtt]
enabled = true
listen = "127.0.0.1:0"
[auth]
max_failed_logins = 0
[auth.anonymous]
enabled = false
[auth.jwt]
enabled = true
secret = "{SECRET}"
public_key_file = "{}"
jwks_file = "{}"
issuer = "https://idp.test"
audience = "meshgate"
leeway = "2s"
mqtt_username = "{mqtt_username}"
subscribe = ["public/#"]
"#,
            keys.rsa_public.display(),
            keys.jwks.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(keys.dir.join("meshgate.log")).unwrap();
    spawn_logging_to(&["-c", config.to_str().unwrap()], &[], log)
}

/// POST one event with `Authorization: Bearer <token>`: the status and the problem detail.
async fn post(web: SocketAddr, topic: &str, token: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(format!("http://{web}/events/{topic}"))
        .bearer_auth(token)
        .header("ce-specversion", "1.0")
        .header("ce-id", "1")
        .header("ce-source", "/jwt-test")
        .header("ce-type", "t")
        .header("content-type", "text/plain")
        .body("1")
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn mqtt5(
    addr: SocketAddr,
    id: &str,
    user: &str,
    token: &str,
) -> Result<(AsyncClient, EventLoop), ConnectReturnCode> {
    let mut o = MqttOptions::new(id, "127.0.0.1", addr.port());
    o.set_credentials(user, token);
    let (client, mut el) = AsyncClient::new(o, 10);
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    return if ack.code == ConnectReturnCode::Success {
                        Ok(())
                    } else {
                        Err(ack.code)
                    };
                }
                Ok(_) => continue,
                Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => return Err(code),
                Err(e) => panic!("MQTT connection failed: {e}"),
            }
        }
    })
    .await
    .expect("a CONNACK within 10 s")
    .map(|()| (client, el))
}

/// The reason of the PUBACK of one QoS 1 publish to `topic`.
async fn puback(client: &AsyncClient, el: &mut EventLoop, topic: &str) -> PubAckReason {
    client
        .publish(topic, QoS::AtLeastOnce, false, "1")
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Event::Incoming(Packet::PubAck(ack)) = el.poll().await.unwrap() {
                return ack.reason;
            }
        }
    })
    .await
    .expect("a PUBACK within 5 s")
}

/// The HTTP status of a WebSocket handshake with `?access_token=`.
async fn ws_status(web: SocketAddr, token: &str) -> u16 {
    let url = format!("ws://{web}/ws?subscribe=public%2F%23&access_token={token}");
    let mut req = url.as_str().into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "cloudevents.json".parse().unwrap(),
    );
    match tokio_tungstenite::connect_async(req).await {
        Ok((_, response)) => response.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
        Err(e) => panic!("WebSocket handshake failed: {e}"),
    }
}

fn assert_not_logged(keys: &Keys, tokens: &[&str]) {
    let log = std::fs::read_to_string(keys.dir.join("meshgate.log")).unwrap();
    assert!(!log.is_empty(), "a log (at debug level) was written");
    for t in tokens {
        // A JWT's signature part is enough to tell it leaked.
        let signature = t.rsplit('.').next().unwrap();
        assert!(!log.contains(signature), "a token is in the log");
    }
    assert!(!log.contains(SECRET), "the secret is in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_bearer_tokens_on_http_and_every_refusal_says_why() {
    let keys = keys("hs");
    let gw = gateway(&keys, "any");
    let web = gw.web.unwrap();
    let good = hs256(&claims(
        "web-1",
        serde_json::json!({ "publish": ["devices/{user}/#"] }),
    ));
    assert_eq!(post(web, "devices/web-1/t", &good).await.0, 202);
    let (status, body) = post(web, "devices/web-2/t", &good).await;
    assert_eq!(status, 403, "outside the token's publish claim: {body}");

    let cases: Vec<(&str, String)> = vec![
        (
            "expired",
            hs256(&claims("web-1", serde_json::json!({ "exp": now() - 60 }))),
        ),
        (
            "not valid yet",
            hs256(&claims("web-1", serde_json::json!({ "nbf": now() + 600 }))),
        ),
        (
            "audience",
            hs256(&claims(
                "web-1",
                serde_json::json!({ "aud": "another-service" }),
            )),
        ),
        (
            "issuer",
            hs256(&claims(
                "web-1",
                serde_json::json!({ "iss": "https://evil.test" }),
            )),
        ),
        (
            "signature",
            encode(
                &Header::new(Algorithm::HS256),
                &claims("web-1", serde_json::json!({})),
                &EncodingKey::from_secret(b"not-the-secret-but-just-as-long-012345678"),
            )
            .unwrap(),
        ),
        (
            // Alg confusion: HS256 keyed with the RSA public key the gateway trusts.
            "signature",
            encode(
                &Header::new(Algorithm::HS256),
                &claims("web-1", serde_json::json!({})),
                &EncodingKey::from_secret(&std::fs::read(&keys.rsa_public).unwrap()),
            )
            .unwrap(),
        ),
    ];
    for (why, token) in &cases {
        let (status, body) = post(web, "devices/web-1/t", token).await;
        assert_eq!(status, 401, "{why}: {body}");
        assert!(body.contains(why), "{why}: {body}");
    }
    let mut all: Vec<&str> = cases.iter().map(|(_, t)| t.as_str()).collect();
    all.push(&good);
    drop(gw);
    assert_not_logged(&keys, &all);
    std::fs::remove_dir_all(&keys.dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_tokens_as_mqtt_passwords_with_acl_claims() {
    let keys = keys("rs");
    let gw = gateway(&keys, "claim");
    let mqtt = gw.mqtt.unwrap();
    let token = rs256(
        &keys,
        &claims(
            "sensor-1",
            serde_json::json!({ "publish": ["devices/{clientid}/#"], "subscribe": ["commands/{user}/#"] }),
        ),
    );
    let (client, mut el) = mqtt5(mqtt, "s1-client", "sensor-1", &token).await.unwrap();
    assert_eq!(
        puback(&client, &mut el, "devices/s1-client/temp").await,
        PubAckReason::Success
    );
    assert_eq!(
        puback(&client, &mut el, "devices/other-client/temp").await,
        PubAckReason::NotAuthorized
    );
    // mqtt_username = "claim": another user name with the same token is refused.
    assert_eq!(
        mqtt5(mqtt, "s1-b", "sensor-2", &token).await.err(),
        Some(ConnectReturnCode::BadUserNamePassword)
    );
    // An expired RS256 token.
    let expired = rs256(
        &keys,
        &claims("sensor-1", serde_json::json!({ "exp": now() - 60 })),
    );
    assert_eq!(
        mqtt5(mqtt, "s1-c", "sensor-1", &expired).await.err(),
        Some(ConnectReturnCode::BadUserNamePassword)
    );
    // A 3.1.1 client with the token as its password.
    let out = mosquitto_command("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &mqtt.port().to_string(),
            "-V",
            "mqttv311",
        ])
        .args(["-i", "s1-mosq", "-u", "sensor-1", "-P", &token])
        .args(["-t", "devices/s1-mosq/t", "-m", "1", "-q", "1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(gw);
    assert_not_logged(&keys, &[&token, &expired]);
    std::fs::remove_dir_all(&keys.dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_tokens_from_a_jwks_file_that_is_replaced_while_running() {
    let keys = keys("es");
    let gw = gateway(&keys, "any");
    let web = gw.web.unwrap();
    let first = es256(&keys, 1, &claims("browser-1", serde_json::json!({})));
    let second = es256(&keys, 2, &claims("browser-1", serde_json::json!({})));
    assert_eq!(ws_status(web, &first).await, 101);
    assert_eq!(
        ws_status(web, &second).await,
        401,
        "ec-2 is not in the JWKS yet"
    );

    // Key rotation: the file now holds only ec-2. Within a few seconds the gateway follows.
    write_jwks(&keys, &[2]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ws_status(web, &second).await != 101 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new JWKS was not loaded in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        ws_status(web, &first).await,
        401,
        "the removed key no longer verifies"
    );

    // A broken file keeps the keys the gateway has.
    std::fs::write(&keys.jwks, "{ not json").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(ws_status(web, &second).await, 101);
    drop(gw);
    let log = std::fs::read_to_string(keys.dir.join("meshgate.log")).unwrap();
    assert!(log.contains("keys reloaded"), "the reload is logged");
    assert!(
        log.contains("keeping the previous keys"),
        "the broken file is reported"
    );
    assert_not_logged(&keys, &[&first, &second]);
    std::fs::remove_dir_all(&keys.dir).ok();
}
