//! NATS NKey authentication of meshgate's own client: a `.creds` file (a user JWT and its NKey
//! seed, as `nsc` writes it) or an NKey seed file. At CONNECT the server's `INFO` `nonce` is
//! signed with the seed (`nkeys`, the crate async-nats uses); CONNECT carries the signature and
//! the JWT (creds) or the public key (seed). The files are read at each connection, so a
//! replaced file is used from the next reconnect on.

use std::path::Path;

use base64::Engine;

/// The identity in a creds or seed file.
pub(crate) struct NkeyIdentity {
    /// The user JWT of a creds file.
    pub jwt: Option<String>,
    pub key: nkeys::KeyPair,
}

impl std::fmt::Debug for NkeyIdentity {
    /// Never prints the seed or the JWT.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NkeyIdentity")
            .field("public_key", &self.key.public_key())
            .finish_non_exhaustive()
    }
}

/// The blocks of a creds file: the content line after each `-----BEGIN <NAME>-----` line, with
/// its name. Lines outside blocks (the file's explanations) are ignored.
fn blocks(text: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some(name) = line
            .strip_prefix("-----BEGIN ")
            .map(|n| n.trim_end_matches('-'))
        else {
            continue;
        };
        if let Some(content) = lines.find(|l| !l.is_empty()) {
            out.push((name, content));
        }
    }
    out
}

/// A creds file's JWT and seed, or (a file without blocks) an NKey seed alone; why it cannot
/// be used otherwise (never quoting it).
pub(crate) fn parse(text: &str) -> Result<NkeyIdentity, &'static str> {
    let found = blocks(text);
    let (jwt, seed) = if found.is_empty() {
        let seed = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("//"))
            .ok_or("the file holds no NKey seed")?;
        (None, seed)
    } else {
        let jwt = found
            .iter()
            .find(|(name, _)| name.contains("JWT"))
            .map(|(_, c)| (*c).to_owned())
            .ok_or("a creds file without a JWT block")?;
        let seed = found
            .iter()
            .find(|(name, _)| name.contains("SEED"))
            .map(|(_, c)| *c)
            .ok_or("a creds file without an NKEY SEED block")?;
        (Some(jwt), seed)
    };
    if !seed.starts_with('S') {
        return Err("not an NKey seed (seeds start with `S`)");
    }
    let key = nkeys::KeyPair::from_seed(seed).map_err(|_| "not a valid NKey seed")?;
    Ok(NkeyIdentity { jwt, key })
}

/// Reads and parses `path` (config key `key` in errors).
pub(crate) fn load(path: &Path, key: &str) -> Result<NkeyIdentity, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {key} {}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("{key} {}: {e}", path.display()))
}

impl NkeyIdentity {
    /// The CONNECT fields for the server's `nonce`: `sig`, and `jwt` or `nkey`.
    pub(crate) fn sign(&self, nonce: &str, connect: &mut serde_json::Value) -> Result<(), String> {
        let sig = self
            .key
            .sign(nonce.as_bytes())
            .map_err(|e| format!("cannot sign the server's nonce: {e}"))?;
        connect["sig"] = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(sig)
            .into();
        match &self.jwt {
            Some(jwt) => connect["jwt"] = jwt.as_str().into(),
            None => connect["nkey"] = self.key.public_key().into(),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(jwt: &str, seed: &str) -> String {
        format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n************************* IMPORTANT *************************\nNKEY Seed printed below can be used to sign and prove identity.\n\n-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n*************************************************************\n"
        )
    }

    #[test]
    fn creds_and_seed_files_parse_and_sign_the_nonce() {
        let user = nkeys::KeyPair::new_user();
        let seed = user.seed().unwrap();
        let id = parse(&creds("eyJhbGciOiJlZDI1NTE5In0.e30.sig", &seed)).unwrap();
        assert_eq!(id.jwt.as_deref(), Some("eyJhbGciOiJlZDI1NTE5In0.e30.sig"));
        assert_eq!(id.key.public_key(), user.public_key());
        let mut connect = serde_json::json!({});
        id.sign("a-nonce", &mut connect).unwrap();
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(connect["sig"].as_str().unwrap())
            .unwrap();
        assert!(user.verify(b"a-nonce", &sig).is_ok());
        assert!(connect.get("nkey").is_none());

        let id = parse(&format!("{seed}\n")).unwrap();
        let mut connect = serde_json::json!({});
        id.sign("n", &mut connect).unwrap();
        assert_eq!(connect["nkey"], user.public_key());
        assert!(!format!("{id:?}").contains(&seed), "Debug hides the seed");
    }

    #[test]
    fn unusable_files_say_why_without_quoting_them() {
        for (text, says) in [
            ("", "no NKey seed"),
            ("UABC\n", "seeds start with `S`"),
            (
                "SUAXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX\n",
                "not a valid NKey seed",
            ),
            ("-----BEGIN USER NKEY SEED-----\nSUA\n", "without a JWT"),
            (
                "-----BEGIN NATS USER JWT-----\neyJ\n",
                "without an NKEY SEED",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    /// Creds files are the operator's, but a parser that panics on a truncated or garbled one
    /// would take the gateway down at a reconnect: any bytes are refused or parsed.
    #[test]
    fn fuzz_nats_creds() {
        let user = nkeys::KeyPair::new_user();
        let good = creds("eyJ.e30.x", &user.seed().unwrap());
        let seeds: [&[u8]; 2] = [
            good.as_bytes(),
            b"SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3VY\n",
        ];
        meshgate_fuzz::run(
            "nats_creds",
            meshgate_fuzz::bytes("nats_creds", &seeds, 512),
            |b| Some(b.to_vec()),
            |bytes| {
                if let Ok(id) = parse(&String::from_utf8_lossy(&bytes)) {
                    let mut connect = serde_json::json!({});
                    id.sign("nonce", &mut connect)?;
                }
                Ok(())
            },
        );
    }
}
