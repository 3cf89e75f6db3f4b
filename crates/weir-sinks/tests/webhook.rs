//! The webhook delivery against a real HTTP receiver on a local port (weir-testkit's
//! `receiver`): what is sent (body, headers, a signature that verifies), and what each kind of
//! answer — or no answer — makes of the delivery.
//!
//! The action an error asks of the engine (retry, retry after, stop) is private to
//! weir-consumer; these tests read it from `OperatorError`'s `Debug`, and the engine-level
//! tests (crates/weir-cli/tests/sinks_webhook.rs) check what the engine does with it.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weir_consumer::OperatorError;
use weir_core::Event;
use weir_sinks::webhook::Webhook;
use weir_sinks::{Delivery, Secrets, WebhookSink, envelope};
use weir_testkit::receiver::{Answer, Exchange, Receiver};

const WAIT: Duration = Duration::from_secs(10);

fn event(position: i64) -> Event {
    serde_json::from_value(json!({
        "position": position,
        "lsn": "0/16B3748",
        "xid": 700 + position,
        "commit_ts": chrono::Utc::now(),
        "kind": "insert",
        "entity": "orders",
        "source": {"db": "shop", "schema": "public", "table": "orders", "columns": {"id": "int4"}},
        "key": {"id": position},
        "new_record": {"id": position, "note": "naïve \"quoted\" ✓"},
    }))
    .unwrap()
}

fn events(positions: std::ops::RangeInclusive<i64>) -> Vec<Event> {
    positions.map(event).collect()
}

/// A webhook of subscription `orders` to `url` with a fresh secret (returned for verifying).
fn webhook(url: &str, adjust: impl FnOnce(&mut WebhookSink)) -> (Webhook, Secrets) {
    let mut sink = WebhookSink::new(url, "UNUSED_IN_THESE_TESTS");
    adjust(&mut sink);
    let secrets = Secrets::parse(&Secrets::generate()).unwrap();
    (Webhook::with_secrets("orders", &sink, secrets.clone()).unwrap(), secrets)
}

async fn deliver(hook: &Webhook, events: &[Event]) -> Result<(), OperatorError> {
    let refs: Vec<&Event> = events.iter().collect();
    hook.deliver(&refs).await
}

fn body(x: &Exchange) -> Value {
    serde_json::from_slice(&x.request.body).unwrap()
}

#[tokio::test]
async fn each_event_is_posted_alone_in_order_signed_over_the_exact_body() {
    let rx = Receiver::always(Answer::ok()).await;
    let (hook, secrets) = webhook(&rx.url("/hooks?k=1"), |_| {});
    let evs = events(1..=3);
    deliver(&hook, &evs).await.unwrap();

    let got = rx.exchanges();
    assert_eq!(got.len(), 3, "one request per event");
    let now = chrono::Utc::now().timestamp();
    for (x, ev) in got.iter().zip(&evs) {
        let r = &x.request;
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/hooks?k=1"));
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("user-agent"), Some(concat!("weir/", env!("CARGO_PKG_VERSION"))));
        let id = r.header("webhook-id").unwrap();
        assert_eq!(id, format!("orders:{}", ev.position));
        let ts: i64 = r.header("webhook-timestamp").unwrap().parse().unwrap();
        assert!((now - ts).abs() <= 5, "timestamp {ts} is now ({now})");
        let sig = r.header("webhook-signature").unwrap();
        assert_eq!(secrets.verify(id, ts, &r.body, sig, now), Ok(1));
        // Another body, or another id, does not verify.
        assert!(secrets.verify(id, ts, b"{}", sig, now).is_err());
        assert!(secrets.verify("orders:999", ts, &r.body, sig, now).is_err());
        assert_eq!(body(x), envelope("orders", ev));
    }
}

#[tokio::test]
async fn a_batch_is_one_request_per_chunk_with_its_events() {
    let rx = Receiver::always(Answer::status(204)).await;
    let (hook, secrets) = webhook(&rx.url("/b"), |s| s.batch_size = 2);
    let evs = events(1..=5);
    deliver(&hook, &evs).await.unwrap();

    let got = rx.exchanges();
    let ids: Vec<_> = got.iter().map(|x| x.request.header("webhook-id").unwrap()).collect();
    assert_eq!(ids, ["orders:1-2", "orders:3-4", "orders:5-5"]);
    for (x, chunk) in got.iter().zip(evs.chunks(2)) {
        let want: Vec<Value> = chunk.iter().map(|e| envelope("orders", e)).collect();
        assert_eq!(body(x), json!({"subscription": "orders", "events": want}));
        let r = &x.request;
        let ts = r.header("webhook-timestamp").unwrap().parse().unwrap();
        let sig = r.header("webhook-signature").unwrap();
        assert_eq!(secrets.verify(r.header("webhook-id").unwrap(), ts, &r.body, sig, ts), Ok(1));
    }
}

#[tokio::test]
async fn a_500_fails_the_delivery_then_a_200_delivers_it() {
    let rx = Receiver::always(Answer::status(500).body("database\n  down")).await;
    let url = rx.url("/h");
    let (hook, _) = webhook(&url, |_| {});
    let evs = events(1..=3);
    let e = deliver(&hook, &evs).await.unwrap_err();
    assert_eq!(rx.exchanges().len(), 1, "the first failure stops the delivery");
    let text = e.to_string();
    assert!(text.contains(&url) && text.contains("500 Internal Server Error"), "{text}");
    assert!(text.contains(": database down"), "a short excerpt of the body: {text}");
    assert!(format!("{e:?}").contains("Retry { after: None }"), "{e:?}");

    rx.script(|_| Answer::ok());
    deliver(&hook, &evs).await.unwrap();
    let ids: Vec<_> =
        rx.exchanges().iter().map(|x| x.request.header("webhook-id").unwrap().to_owned()).collect();
    assert_eq!(ids, ["orders:1", "orders:1", "orders:2", "orders:3"], "the same id again");
}

#[tokio::test]
async fn retry_after_asks_for_that_wait() {
    let rx = Receiver::always(Answer::status(503).header("retry-after", "7")).await;
    let (hook, _) = webhook(&rx.url("/h"), |_| {});
    let e = deliver(&hook, &events(1..=1)).await.unwrap_err();
    assert!(format!("{e:?}").contains("Retry { after: Some(7s) }"), "{e:?}");
    assert!(e.to_string().contains("503 Service Unavailable (Retry-After: 7s)"), "{e}");

    // An HTTP date, on a 429; an absurd wait is capped at an hour.
    let later = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(90));
    rx.script(move |_| Answer::status(429).header("retry-after", &later));
    let e = deliver(&hook, &events(1..=1)).await.unwrap_err();
    assert!(e.to_string().contains("answered 429 Too Many Requests (Retry-After: "), "{e}");
    let after = format!("{e:?}");
    assert!(after.contains("after: Some(8") || after.contains("after: Some(9"), "{after}");
    rx.script(|_| Answer::status(429).header("retry-after", "999999"));
    let e = deliver(&hook, &events(1..=1)).await.unwrap_err();
    assert!(format!("{e:?}").contains("after: Some(3600s)"), "{e:?}");
}

#[tokio::test]
async fn gone_stops_the_subscription_with_the_reason() {
    let rx = Receiver::always(Answer::status(410)).await;
    let url = rx.url("/h");
    let (hook, _) = webhook(&url, |_| {});
    let e = deliver(&hook, &events(1..=2)).await.unwrap_err();
    assert_eq!(rx.exchanges().len(), 1);
    assert!(format!("{e:?}").contains("action: Stop"), "{e:?}");
    let text = e.to_string();
    assert!(text.contains(&format!("webhook {url} answered 410 Gone")), "{text}");
    assert!(text.contains("start the subscription again"), "{text}");
}

#[tokio::test]
async fn a_client_error_is_a_refusal_still_retried() {
    let rx = Receiver::always(Answer::status(422).body(r#"{"error":"unknown order"}"#)).await;
    let (hook, _) = webhook(&rx.url("/h"), |_| {});
    let e = deliver(&hook, &events(1..=1)).await.unwrap_err();
    let text = e.to_string();
    assert!(text.contains("refused the event: it answered 422 Unprocessable Entity"), "{text}");
    assert!(text.contains("unknown order"), "{text}");
    assert!(format!("{e:?}").contains("Retry { after: None }"), "{e:?}");
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let elsewhere = Receiver::always(Answer::ok()).await;
    let target = elsewhere.url("/moved");
    let rx = Receiver::always(Answer::status(308).header("location", &target)).await;
    let (hook, _) = webhook(&rx.url("/h"), |_| {});
    let e = deliver(&hook, &events(1..=1)).await.unwrap_err();
    let text = e.to_string();
    assert!(text.contains(&format!("308 Permanent Redirect, a redirect to {target}")), "{text}");
    assert!(text.contains("configure the final URL"), "{text}");
    assert!(format!("{e:?}").contains("Retry {"), "{e:?}");
    assert_eq!(elsewhere.exchanges().len(), 0, "the signed body went nowhere else");
}

#[tokio::test]
async fn a_hanging_receiver_times_out_after_the_sinks_timeout() {
    let rx = Receiver::always(Answer::Hang(Duration::from_secs(20))).await;
    let (hook, _) = webhook(&rx.url("/h"), |s| s.timeout = Duration::from_millis(400));
    let started = Instant::now();
    let e = deliver(&hook, &events(1..=1)).await.unwrap_err();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(400) && took < Duration::from_secs(3), "{took:?}");
    assert!(e.to_string().contains("did not answer within 400ms"), "{e}");
    assert!(format!("{e:?}").contains("Retry { after: None }"), "{e:?}");
    assert_eq!(rx.exchanges().len(), 1);
}

#[tokio::test]
async fn a_closed_connection_or_an_unreachable_port_is_retried_naming_the_url() {
    let rx = Receiver::always(Answer::Close).await;
    let (hook, _) = webhook(&rx.url("/h"), |_| {});
    let e = deliver(&hook, &events(1..=1)).await.unwrap_err();
    assert!(e.to_string().contains("closed the connection without answering"), "{e}");

    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/h");
    let (hook, _) = webhook(&url, |_| {});
    let e = deliver(&hook, &events(1..=1)).await.unwrap_err();
    let text = e.to_string();
    assert!(text.contains(&url) && text.contains("refused"), "{text}");
    assert!(format!("{e:?}").contains("Retry { after: None }"), "{e:?}");

    // A name that does not resolve.
    let (hook, _) = webhook("http://weir-no-such-host.invalid/h", |_| {});
    let e = deliver(&hook, &events(1..=1)).await.unwrap_err();
    assert!(e.to_string().contains("weir-no-such-host.invalid"), "{e}");
}

#[tokio::test]
async fn connections_are_reused_across_deliveries() {
    let rx = Receiver::always(Answer::ok()).await;
    let (hook, _) = webhook(&rx.url("/h"), |_| {});
    for p in 1..=5 {
        deliver(&hook, &events(p..=p)).await.unwrap();
    }
    let got = rx.wait_for("five requests", WAIT, |x| x.len() == 5).await;
    let peers: std::collections::HashSet<_> = got.iter().map(|x| x.request.peer).collect();
    assert_eq!(peers.len(), 1, "one kept-alive connection: {peers:?}");
}

#[test]
fn secrets_come_from_the_environment_and_are_never_shown() {
    let sink = WebhookSink::new("http://127.0.0.1:9/h", "WEIR_TEST_SURELY_UNSET_SECRET");
    let e = Webhook::new("orders", &sink).unwrap_err();
    assert!(e.contains("WEIR_TEST_SURELY_UNSET_SECRET") && e.contains("is not set"), "{e}");
    let ftp = WebhookSink::new("ftp://example.com/h", "S");
    let secrets = Secrets::parse(&Secrets::generate()).unwrap();
    assert!(Webhook::with_secrets("orders", &ftp, secrets.clone()).unwrap_err().contains("ftp"));
    let ok = Webhook::with_secrets("orders", &WebhookSink::new("http://x/h", "S"), secrets);
    let shown = format!("{:?}", ok.unwrap());
    assert!(shown.contains("Secrets(1 redacted)"), "{shown}");
}

#[tokio::test]
async fn https_goes_through_tls_and_a_failed_handshake_is_retried() {
    // A plain-HTTP receiver behind an https:// URL: the TLS handshake (rustls, ring) fails.
    let rx = Receiver::always(Answer::ok()).await;
    let url = format!("https://{}/h", rx.addr());
    let (hook, _) = webhook(&url, |s| s.timeout = Duration::from_secs(5));
    let e = deliver(&hook, &events(1..=1)).await.unwrap_err();
    let text = e.to_string();
    assert!(text.contains(&url) && text.contains("the TLS handshake failed"), "{text}");
    assert!(format!("{e:?}").contains("Retry { after: None }"), "{e:?}");
    assert!(rx.exchanges().is_empty(), "no request was read as HTTP");
}
