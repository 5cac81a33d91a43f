//! ACL check speed on the publish path: nanoseconds per `Authorizer::check_publish` (the one
//! check every publish makes) for typical rule sets.
//!
//! ```text
//! cargo run --release -p meshgate-core --example acl_bench [-- <milliseconds per case>]
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use meshgate_core::Topic;
use meshgate_core::auth::{Authorizer, Permissions, UserSpec};

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn main() {
    let millis: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(500);
    // (what, allow list, deny list, topic)
    let cases: &[(&str, &[&str], &[&str], &str)] = &[
        ("allow # (the default)", &["#"], &[], "plant/line/7/temp"),
        (
            "5 allows, last one matches",
            &["a/#", "b/+", "c/d/#", "users/{user}/#", "plant/#"],
            &[],
            "plant/line/7/temp",
        ),
        (
            "allow #, 3 denies, none matches",
            &["#"],
            &["test/nosubscribe", "secret/#", "+/+/+/config"],
            "plant/line/7/temp",
        ),
        (
            "allow #, refused by a deny",
            &["#"],
            &["plant/#"],
            "plant/line/7/temp",
        ),
    ];
    println!("{:<36} {:>10}", "case", "ns/check");
    for (what, allow, deny, topic) in cases {
        // 100 other users, as a deployment with many devices has.
        let mut users: Vec<UserSpec> = (0..100)
            .map(|i| UserSpec {
                name: format!("device-{i}"),
                password: Some("pw".into()),
                tokens: Vec::new(),
                permissions: Permissions::default(),
                certificate: false,
            })
            .collect();
        let mut permissions = Permissions {
            publish: strings(allow),
            ..Permissions::default()
        };
        set_deny(&mut permissions, deny);
        users.push(UserSpec {
            name: "bench".into(),
            password: Some("pw".into()),
            tokens: Vec::new(),
            permissions,
            certificate: false,
        });
        let a = Authorizer::new(users, None).expect("valid rules");
        let p = a.user("bench").expect("the user");
        let topic = Topic::from_mqtt(topic).expect("a topic");
        let expected = deny.is_empty() || !what.contains("refused");
        assert_eq!(a.check_publish(&p, &topic).is_ok(), expected, "{what}");
        let deadline = Instant::now() + Duration::from_millis(millis);
        let (mut n, started) = (0u64, Instant::now());
        while Instant::now() < deadline {
            for _ in 0..1000 {
                black_box(a.check_publish(black_box(&p), black_box(&topic)).is_ok());
            }
            n += 1000;
        }
        let ns = started.elapsed().as_nanos() as f64 / n as f64;
        println!("{what:<36} {ns:>10.1}");
    }
}

fn set_deny(p: &mut Permissions, deny: &[&str]) {
    p.deny_publish = strings(deny);
}
