//! `type = "http"`: POST the job to the application, signed the Standard Webhooks way (the
//! webhook sink's [`Outbound`]), and turn its answer into what the queue does next.
//!
//! ```text
//! job ─► body = {id, kind, queue, args, attempt, max_attempts, enqueued_at}
//!        webhook-id = <job id>-<attempt>, webhook-timestamp, webhook-signature (with `secret`)
//!        + the entry's `headers`
//!   POST url ─► answer (within the attempt's timeout: the runner's) ─► classify (`outcome`):
//!     Retry-After (seconds or an HTTP date, ≤ 1 h), any status    snooze for it
//!     2xx {"snooze": "30s"}                                       snooze
//!     2xx {"discard": "reason"}                                   discard with the reason
//!     2xx, anything else                                          completed
//!     4xx but 408, 409, 429                                       discard: HTTP 400 from <url>: <body>
//!     5xx, 408, 409, 429, 3xx (never followed)                    retry:   HTTP 500 from <url>: <body>
//!     no answer: refused, reset, closed, not HTTP, timeout        retry with the reason
//! ```
//!
//! A job's liveness while its request is held is its process's heartbeat (`weir.job_processes`),
//! as for any running job: a receiver may take as long as the attempt's timeout allows. When
//! the job is cancelled, or the attempt times out, the request is dropped — the receiver sees
//! its connection close. The same job is POSTed again on a retry with a new `webhook-id`
//! (the attempt differs); within one attempt the id is stable, so a receiver deduplicates by it.
//!
//! Checked at start-up (`build`): the URL, the secret (`whsec_` and base64 of 24 to 64 bytes),
//! the header names and values.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;
use weir_core::WorkerConfig;
use weir_sinks::Secrets;
use weir_sinks::outbound::{self, Answer, Outbound};

use super::{Common, Declared, DeclaredType, job_document, refused};
use crate::Result;
use crate::worker::{ErasedWorker, JobContext, JobError};

/// How much of an answer's body an error quotes.
const EXCERPT_CHARS: usize = 500;
/// The longest connect; the attempt's timeout bounds the rest.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) struct HttpWorker {
    outbound: Outbound,
    common: Common,
}

pub(super) async fn build(entry: &WorkerConfig, common: Common) -> Result<Arc<dyn ErasedWorker>> {
    let url = entry.url.as_deref().unwrap_or_default();
    let connect = common.timeout.map_or(CONNECT_TIMEOUT, |t| t.min(CONNECT_TIMEOUT));
    let mut outbound = Outbound::new(url, connect).map_err(|e| refused(entry, e))?;
    if let Some(secret) = &entry.secret {
        let secrets = Secrets::parse(secret.expose()).map_err(|e| refused(entry, e))?;
        outbound = outbound.signed(secrets);
    }
    for (name, value) in &entry.headers {
        outbound = outbound.header(name, value).map_err(|e| refused(entry, e))?;
    }
    Ok(Arc::new(Declared(HttpWorker { outbound, common })))
}

impl DeclaredType for HttpWorker {
    fn attempt(&self, ctx: JobContext, args: Value) -> BoxFuture<'_, Result<(), JobError>> {
        Box::pin(async move {
            let id = format!("{}-{}", ctx.id().0, ctx.attempt());
            let body = job_document(&ctx, &args).into_bytes();
            let url = self.outbound.url();
            match self.outbound.post(&id, body).await {
                Ok(answer) => outcome(url, answer),
                Err(t) => Err(JobError::retry(format!("POST {url}: {t}"))),
            }
        })
    }

    fn common(&self) -> &Common {
        &self.common
    }
}

/// What the receiver's answer means for the job: the one place that decides.
fn outcome(url: &str, answer: Answer) -> Result<(), JobError> {
    if let Some(after) = answer.retry_after {
        return Err(JobError::snooze(after));
    }
    let status = answer.status;
    let body = answer.body.unwrap_or_default();
    if status.is_success() {
        return match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(o)) if o.contains_key("snooze") => {
                match o["snooze"].as_str().and_then(|s| weir_core::parse_duration(s).ok()) {
                    Some(after) => Err(JobError::snooze(after)),
                    None => Err(JobError::retry(format!(
                        "HTTP {} from {url} asks to snooze for {}, which is not a \
                         duration; answer {{\"snooze\": \"30s\"}} (ms, s, m, h, d)",
                        status.as_u16(),
                        o["snooze"]
                    ))),
                }
            }
            Ok(Value::Object(o)) if o.contains_key("discard") => {
                let reason = match &o["discard"] {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                Err(JobError::discard(format!("{url} discarded the job: {reason}")))
            }
            _ => Ok(()),
        };
    }
    let excerpt = outbound::excerpt(&body, EXCERPT_CHARS);
    let mut error = format!("HTTP {} from {url}", status.as_u16());
    if !excerpt.is_empty() {
        error = format!("{error}: {excerpt}");
    }
    if status.is_redirection() {
        let to = answer.location.unwrap_or_else(|| "(no Location header)".into());
        error = format!(
            "{error} (a redirect to {to}; not followed: the signed job goes only to `url`)"
        );
    }
    let busy = matches!(status.as_u16(), 408 | 409 | 429);
    if status.is_client_error() && !busy {
        Err(JobError::discard(error))
    } else {
        Err(JobError::retry(error))
    }
}

#[cfg(test)]
mod tests {
    use weir_sinks::outbound::StatusCode;

    use super::*;
    use crate::worker::JobErrorKind;

    fn answer(status: u16, retry_after: Option<u64>, body: &str) -> Answer {
        Answer {
            status: StatusCode::from_u16(status).unwrap(),
            retry_after: retry_after.map(Duration::from_secs),
            location: Some("/elsewhere".into()),
            body: Some(body.to_string().into()),
        }
    }

    /// What `outcome` decides, as text: `ok`, `snooze 1s`, `discard: …`, `retry: …`.
    fn decide(status: u16, retry_after: Option<u64>, body: &str) -> String {
        match outcome("http://app/jobs", answer(status, retry_after, body)) {
            Ok(()) => "ok".into(),
            Err(e) => match e.kind {
                JobErrorKind::Snooze(d) => format!("snooze {d:?}"),
                JobErrorKind::Discard(e) => format!("discard: {e}"),
                JobErrorKind::Retry { error, after: None } => format!("retry: {error}"),
                JobErrorKind::Retry { after: Some(_), .. } => unreachable!("no fixed retry"),
            },
        }
    }

    #[test]
    fn each_answer_has_one_meaning() {
        assert_eq!(decide(200, None, "done"), "ok");
        assert_eq!(decide(204, None, ""), "ok");
        assert_eq!(decide(200, None, r#"{"status": "sent"}"#), "ok");
        assert_eq!(decide(200, None, r#"{"snooze": "30s"}"#), "snooze 30s");
        assert_eq!(decide(202, Some(5), ""), "snooze 5s", "Retry-After on a 2xx");
        assert_eq!(decide(429, Some(2), ""), "snooze 2s");
        assert_eq!(decide(503, Some(2), "busy"), "snooze 2s");
        assert_eq!(decide(400, Some(2), "later"), "snooze 2s", "on any answer");
        assert_eq!(
            decide(200, None, r#"{"discard": {"why": "gone"}}"#),
            r#"discard: http://app/jobs discarded the job: {"why":"gone"}"#
        );
        assert!(
            decide(200, None, r#"{"snooze": "soon"}"#)
                .starts_with("retry: HTTP 200 from http://app/jobs asks to snooze for \"soon\""),
            "{}",
            decide(200, None, r#"{"snooze": "soon"}"#)
        );
        assert_eq!(
            decide(404, None, "no such\n route"),
            "discard: HTTP 404 from http://app/jobs: no such route"
        );
        assert_eq!(decide(422, None, ""), "discard: HTTP 422 from http://app/jobs");
        for busy in [408, 409, 429, 500, 502, 503] {
            assert_eq!(
                decide(busy, None, "x"),
                format!("retry: HTTP {busy} from http://app/jobs: x")
            );
        }
        assert_eq!(
            decide(302, None, ""),
            "retry: HTTP 302 from http://app/jobs (a redirect to /elsewhere; not followed: the \
             signed job goes only to `url`)"
        );
        let long = "x".repeat(2000);
        let e = decide(500, None, &long);
        assert_eq!(e.chars().filter(|c| *c == 'x').count(), EXCERPT_CHARS, "{e}");
    }
}
