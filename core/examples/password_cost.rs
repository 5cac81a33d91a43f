//! What a password login costs: one Argon2id verification at several costs (`meshgate
//! passwd`'s default first), and a returning user's login decided by the keyed digest.
//!
//! `cargo run --release -p meshgate-core --example password_cost`

#![allow(clippy::unwrap_used, clippy::print_stdout)] // a benchmark program

use std::time::{Duration, Instant};

use meshgate_core::auth::password::hash_password;
use meshgate_core::auth::{Authorizer, Credentials, LoginPolicy, Permissions, UserSpec};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// An authorizer with one user, `u`, whose stored password is `password`.
fn one_user(password: &str) -> Authorizer {
    Authorizer::new(
        vec![UserSpec {
            name: "u".into(),
            password: Some(password.into()),
            tokens: Vec::new(),
            permissions: Permissions::default(),
            certificate: false,
        }],
        None,
    )
    .unwrap()
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("| Argon2id cost | first login (hash verified) | returning user (digest) |");
    println!("|---|---:|---:|");
    let login = || Credentials::Password {
        username: "u",
        password: b"pw",
    };
    for (m, t) in [(19_456, 2), (65_536, 3), (8_192, 1)] {
        let hash = hash_password(b"pw", m, t).unwrap();
        let a = one_user(&hash).with_login_policy(LoginPolicy {
            max_failures: 0,
            window: Duration::from_secs(1),
        });
        // A new authorizer per sample, so that each first login verifies the hash.
        let first: Vec<Duration> = (0..7)
            .map(|_| {
                let fresh = one_user(&hash);
                let t = Instant::now();
                runtime.block_on(fresh.authenticate(login(), None)).unwrap();
                t.elapsed()
            })
            .collect();
        runtime.block_on(a.authenticate(login(), None)).unwrap();
        let again: Vec<Duration> = (0..7)
            .map(|_| {
                let t = Instant::now();
                runtime.block_on(a.authenticate(login(), None)).unwrap();
                t.elapsed()
            })
            .collect();
        println!(
            "| m={m} KiB, t={t} | {:.1} ms | {:.1} ms (floor) |",
            median(first).as_secs_f64() * 1e3,
            median(again).as_secs_f64() * 1e3
        );
    }
    // CPU per returning login without the floor: the digest and comparison only.
    let plain = one_user("pw");
    let n = 100_000;
    let t = Instant::now();
    for _ in 0..n {
        runtime.block_on(plain.authenticate(login(), None)).unwrap();
    }
    println!(
        "\ndigest comparison (no hash, no floor): {:.2} µs per login",
        t.elapsed().as_secs_f64() * 1e6 / f64::from(n)
    );
}
