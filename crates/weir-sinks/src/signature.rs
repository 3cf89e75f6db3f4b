//! Standard Webhooks signatures: what the webhook sink (and `weir webhooks verify`) signs and
//! checks.
//!
//! ```text
//! secret    whsec_<base64 of 24 to 64 random bytes>       (several, space-separated, in a rotation)
//! signed    "<webhook-id>.<webhook-timestamp>.<body>"
//! header    webhook-signature: v1,<base64 HMAC-SHA256(secret, signed)> [v1,<...> for each secret]
//! ```
//!
//! A receiver recomputes the HMAC with its secret over the exact bytes it received and accepts
//! the request when any `v1,` signature equals it (compared in constant time) and the
//! timestamp is recent (five minutes either way, against replays).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{KeyInit, Mac};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The prefix of a secret's text.
pub const PREFIX: &str = "whsec_";
/// Fewest bytes a secret may have.
pub const MIN_SECRET_BYTES: usize = 24;
/// Most bytes a secret may have.
pub const MAX_SECRET_BYTES: usize = 64;
/// How far a timestamp may be from now for [`Secrets::verify`] (Standard Webhooks' tolerance).
pub const TOLERANCE_SECONDS: i64 = 300;

/// One or more signing secrets (several during a rotation). Never printed: `Debug` shows how
/// many there are, not what they are.
#[derive(Clone)]
pub struct Secrets(Vec<Vec<u8>>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({} redacted)", self.0.len())
    }
}

impl Secrets {
    /// Parses `whsec_…` secrets separated by spaces (or commas). The message says which one is
    /// wrong and how (never its value).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys = Vec::new();
        for (i, part) in text.split(|c: char| c.is_whitespace() || c == ',').enumerate() {
            if part.is_empty() {
                continue;
            }
            let n = i + 1;
            let b64 = part.strip_prefix(PREFIX).ok_or_else(|| {
                format!(
                    "secret {n} does not start with `{PREFIX}`; a secret is `{PREFIX}` and the \
                     base64 of 24 to 64 random bytes (`weir webhooks secret` makes one)"
                )
            })?;
            let key = STANDARD
                .decode(b64)
                .map_err(|_| format!("secret {n}: the part after `{PREFIX}` is not base64"))?;
            if key.len() < MIN_SECRET_BYTES || key.len() > MAX_SECRET_BYTES {
                return Err(format!(
                    "secret {n} is {} bytes; use {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} \
                     random bytes (`weir webhooks secret` makes one of 32)",
                    key.len()
                ));
            }
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(format!(
                "no secret; write `{PREFIX}` and the base64 of 24 to 64 random bytes \
                 (`weir webhooks secret` makes one)"
            ));
        }
        Ok(Self(keys))
    }

    /// The secrets in the environment variable `name`; the message names the variable.
    pub fn from_env(name: &str) -> Result<Self, String> {
        let text = std::env::var(name).map_err(|_| {
            format!(
                "the environment variable {name} (the webhook's secret_env) is not set in this \
                 process; set it to a `{PREFIX}…` secret (`weir webhooks secret` makes one)"
            )
        })?;
        Self::parse(&text).map_err(|e| format!("{name}: {e}"))
    }

    /// A new random secret, as text (`whsec_` and 32 random bytes in base64).
    pub fn generate() -> String {
        let bytes: [u8; 32] = rand::random();
        format!("{PREFIX}{}", STANDARD.encode(bytes))
    }

    /// How many secrets sign each request.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none (never, for parsed secrets).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `webhook-signature` header: one `v1,<base64>` per secret, separated by spaces.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        self.0
            .iter()
            .map(|key| format!("v1,{}", STANDARD.encode(mac(key, id, timestamp, body))))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Checks a request as a receiver does: a `v1` signature in `header` made with one of the
    /// secrets over `id.timestamp.body`, and `timestamp` within [`TOLERANCE_SECONDS`] of `now`.
    /// Returns which secret (from 1) matched.
    pub fn verify(
        &self,
        id: &str,
        timestamp: i64,
        body: &[u8],
        header: &str,
        now: i64,
    ) -> Result<usize, VerifyError> {
        if (now - timestamp).abs() > TOLERANCE_SECONDS {
            return Err(VerifyError::Timestamp { timestamp, now });
        }
        let given: Vec<Vec<u8>> = header
            .split_whitespace()
            .filter_map(|s| s.strip_prefix("v1,"))
            .filter_map(|b64| STANDARD.decode(b64).ok())
            .collect();
        if given.is_empty() {
            return Err(VerifyError::NoSignature);
        }
        for (i, key) in self.0.iter().enumerate() {
            let mut m = HmacSha256::new_from_slice(key).expect("any key length");
            m.update(signed_content(id, timestamp, body).as_slice());
            let expected = m.finalize().into_bytes();
            if given.iter().any(|g| constant_time_eq(g, &expected)) {
                return Ok(i + 1);
            }
        }
        Err(VerifyError::Mismatch)
    }
}

/// Why a signature did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The timestamp is too old or too far ahead.
    #[error(
        "webhook-timestamp {timestamp} is {}s from now; more than {TOLERANCE_SECONDS}s is refused (a replay, or a clock off)",
        (now - timestamp).abs()
    )]
    Timestamp {
        /// The request's.
        timestamp: i64,
        /// The receiver's clock.
        now: i64,
    },
    /// The header holds no `v1,` signature.
    #[error("webhook-signature holds no `v1,<base64>` signature")]
    NoSignature,
    /// No signature matches any secret.
    #[error(
        "no signature matches the secret: the body, id or timestamp differ from what was signed, or the secret is another"
    )]
    Mismatch,
}

fn signed_content(id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let mut content = Vec::with_capacity(id.len() + 24 + body.len());
    content.extend_from_slice(id.as_bytes());
    content.push(b'.');
    content.extend_from_slice(timestamp.to_string().as_bytes());
    content.push(b'.');
    content.extend_from_slice(body);
    content
}

fn mac(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let mut m = HmacSha256::new_from_slice(key).expect("any key length");
    m.update(&signed_content(id, timestamp, body));
    m.finalize().into_bytes().to_vec()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example of the Standard Webhooks specification.
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TS: i64 = 1614265330;
    const SPEC_BODY: &str = r#"{"test": 2432232314}"#;
    const SPEC_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn signs_as_the_specification_does() {
        let s = Secrets::parse(SPEC_SECRET).unwrap();
        assert_eq!(s.sign(SPEC_ID, SPEC_TS, SPEC_BODY.as_bytes()), SPEC_SIGNATURE);
        assert_eq!(
            s.verify(SPEC_ID, SPEC_TS, SPEC_BODY.as_bytes(), SPEC_SIGNATURE, SPEC_TS),
            Ok(1)
        );
    }

    #[test]
    fn a_rotation_signs_with_every_secret_and_verifies_with_either() {
        let old = Secrets::generate();
        let new = Secrets::generate();
        let both = Secrets::parse(&format!("{new} {old}")).unwrap();
        let header = both.sign("id", 100, b"{}");
        assert_eq!(header.split(' ').count(), 2);
        assert_eq!(Secrets::parse(&old).unwrap().verify("id", 100, b"{}", &header, 100), Ok(1));
        assert_eq!(both.verify("id", 100, b"{}", &header, 100), Ok(1));
        let other = Secrets::parse(&Secrets::generate()).unwrap();
        assert_eq!(other.verify("id", 100, b"{}", &header, 100), Err(VerifyError::Mismatch));
        assert_eq!(
            Secrets::parse(&old).unwrap().verify("id", 100, b"{ }", &header, 100),
            Err(VerifyError::Mismatch)
        );
        assert!(matches!(
            both.verify("id", 100, b"{}", &header, 100 + TOLERANCE_SECONDS + 1),
            Err(VerifyError::Timestamp { .. })
        ));
    }

    #[test]
    fn bad_secrets_are_named_not_shown() {
        let e = Secrets::parse("hunter2").unwrap_err();
        assert!(e.contains("does not start with `whsec_`") && !e.contains("hunter2"), "{e}");
        let short = format!("whsec_{}", STANDARD.encode([7u8; 16]));
        assert!(Secrets::parse(&short).unwrap_err().contains("16 bytes"));
        assert!(Secrets::parse("whsec_***").unwrap_err().contains("not base64"));
        assert!(Secrets::parse("  ").is_err());
        let s = Secrets::parse(&Secrets::generate()).unwrap();
        assert_eq!(format!("{s:?}"), "Secrets(1 redacted)");
    }
}
