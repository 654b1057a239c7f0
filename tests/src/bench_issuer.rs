//! A JWT issuer for the benchmarks: an ES256 key made with `ring`, its JWKS served on loopback
//! over plain HTTP (mcpd trusts `http` issuers on loopback only), and access tokens signed with
//! it by `jsonwebtoken`. The end-to-end tests use a real OpenID provider instead
//! (`tests/py/oidc`); a benchmark measures mcpd's validation once the keys are cached, where
//! the provider plays no part.

use std::io::{Read, Write};
use std::net::TcpListener;

use anyhow::Context;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};

/// The key id of the issuer's one key.
const KID: &str = "bench";

pub struct BenchIssuer {
    /// `http://127.0.0.1:PORT`: the `iss` of its tokens.
    pub issuer: String,
    /// Where its JWKS is.
    pub jwks_url: String,
    key: EncodingKey,
}

impl BenchIssuer {
    /// Makes a key and serves its JWKS until the process ends.
    pub fn start() -> anyhow::Result<BenchIssuer> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| anyhow::anyhow!("generating an ES256 key"))?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|_| anyhow::anyhow!("reading the ES256 key"))?;
        // An uncompressed P-256 point: 0x04, then X and Y of 32 bytes each.
        let point = pair.public_key().as_ref();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = json!({ "keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": KID,
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        }]})
        .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the JWKS server")?;
        let port = listener.local_addr()?.port();
        std::thread::spawn(move || serve(listener, jwks));
        Ok(BenchIssuer {
            issuer: format!("http://127.0.0.1:{port}"),
            jwks_url: format!("http://127.0.0.1:{port}/jwks"),
            key: EncodingKey::from_ec_der(pkcs8.as_ref()),
        })
    }

    /// An access token with `claims` (its `iss` is set here).
    pub fn token(&self, mut claims: Value) -> anyhow::Result<String> {
        claims["iss"] = json!(self.issuer);
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(KID.into());
        header.typ = Some("at+jwt".into());
        jsonwebtoken::encode(&header, &claims, &self.key).context("signing a token")
    }
}

/// Answers every request with the JWKS (one request per connection).
fn serve(listener: TcpListener, jwks: String) {
    for stream in listener.incoming().flatten() {
        let mut stream = stream;
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf);
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{jwks}",
            jwks.len()
        );
    }
}
