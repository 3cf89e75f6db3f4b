//! The streams routes against a real PostgreSQL with ingestion running: 201 with log positions
//! filled, 200 for an idempotent retry, 409 for a wrong expected version naming both, 400 for
//! bad input (storing nothing), 401 without the token, 404 for unknown and deleted streams,
//! reads, listing, every stream from the log by type and tags, truncation and snapshots; and
//! `positions: null` when ingestion is not running.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use weir::Config;
use weir_core::Secret;
use weir_server::Server;

const TOKEN: &str = "test-token-0123456789abcdef";

struct Harness {
    _db: weir_testkit::TestDatabase<'static>,
    pool: PgPool,
    running: Option<weir::Running>,
    router: Router,
    cancel: CancellationToken,
}

impl Harness {
    async fn start(prefix: &str, ingest: bool) -> Harness {
        let db = weir_testkit::shared().database(prefix).unwrap();
        let pool = PgPool::connect(&db.url()).await.unwrap();
        sqlx::raw_sql("create table orders (id int primary key)").execute(&pool).await.unwrap();
        let mut config = Config::default();
        config.database.url = Some(Secret::new(db.url()));
        config.source.slot = db.name().to_string();
        config.source.tables = vec!["orders".into()];
        config.http.token = Some(Secret::new(TOKEN));
        config.http.max_wait = Duration::from_secs(20);
        weir::setup::init(&pool, &config).await.unwrap();
        let (running, wake, cancel) = if ingest {
            let running =
                weir::Weir::builder(config.clone()).pool(pool.clone()).start().await.unwrap();
            let (wake, cancel) = (running.wake(), running.cancel_token());
            (Some(running), wake, cancel)
        } else {
            let cancel = CancellationToken::new();
            let (wake, _task) = weir_log::listen_for_appends(pool.clone(), cancel.clone());
            (None, wake, cancel)
        };
        let server = Server::start(pool.clone(), config, wake, cancel.clone()).await.unwrap();
        let router = server.router();
        Harness { _db: db, pool, running, router, cancel }
    }

    async fn call(&self, method: Method, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method.clone()).uri(uri);
        if method != Method::GET {
            req = req.header("authorization", format!("Bearer {TOKEN}"));
        }
        let req = match body {
            Some(b) => {
                req.header("content-type", "application/json").body(Body::from(b.to_string()))
            }
            None => req.body(Body::empty()),
        }
        .unwrap();
        let response = self.router.clone().oneshot(req).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, value)
    }

    async fn stored(&self) -> i64 {
        sqlx::query_scalar("select count(*) from weir.stream_events")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(r) = self.running.take() {
            r.wait().await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_read_and_manage_streams_over_http() {
    let h = Harness::start("http_streams", true).await;
    let id = uuid::Uuid::new_v4();
    let body = json!({
        "expected_version": "no_stream",
        "events": [
            {"id": id, "type": "placed", "data": {"total": 3}, "metadata": {"user": "ann"}, "tags": ["orders", "eu"]},
            {"type": "paid", "data": {"by": "card"}, "tags": ["orders"]}
        ]
    });
    let (status, appended) = h.call(Method::POST, "/v1/streams/order-1", Some(body.clone())).await;
    assert_eq!(status, StatusCode::CREATED, "{appended}");
    assert_eq!(appended["stream"], json!("order-1"));
    assert_eq!(appended["versions"], json!([1, 2]));
    assert_eq!(appended["ids"][0], json!(id.to_string()));
    assert_eq!(appended["duplicate"], json!(false));
    let positions = appended["positions"].as_array().expect("positions filled while ingesting");
    assert_eq!(positions.len(), 2);
    let (p1, p2) = (positions[0].as_i64().unwrap(), positions[1].as_i64().unwrap());
    assert!(p1 < p2, "{positions:?}");
    let logged: Value = sqlx::query_scalar("select key from weir.events where position = $1")
        .bind(p2)
        .fetch_one(&h.pool)
        .await
        .unwrap();
    assert_eq!(logged, json!({"stream": "order-1", "version": 2}));

    // The same request again, as a client retrying after a lost answer: 200, nothing stored.
    let second_id = appended["ids"][1].clone();
    let mut retry = body.clone();
    retry["events"][1]["id"] = second_id;
    let (status, again) = h.call(Method::POST, "/v1/streams/order-1", Some(retry)).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(
        (again["versions"].clone(), again["duplicate"].clone()),
        (json!([1, 2]), json!(true))
    );
    assert_eq!(h.stored().await, 2);

    // A wrong expected version: 409 naming both.
    let (status, err) = h
        .call(
            Method::POST,
            "/v1/streams/order-1",
            Some(json!({"expected_version": 1, "events": [{"type": "x", "data": {}}]})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(err["error"], json!("wrong_expected_version"));
    assert_eq!(err["message"], json!("stream `order-1` is at 2, but the append expected 1"));
    let (status, ok) = h
        .call(
            Method::POST,
            "/v1/streams/order-1",
            Some(json!({"expected_version": 2, "events": [{"type": "shipped", "data": {}}]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{ok}");
    assert_eq!(ok["versions"], json!([3]));

    // Bad input: 400, nothing stored.
    for (body, code, says) in [
        (json!({"expected_version": "any", "events": []}), "bad_request", "events is empty"),
        (json!({"events": [{"type": "", "data": 1}]}), "bad_request", "needs a type"),
        (json!({"events": [{"type": "t", "data": 1, "metadata": 7}]}), "bad_request", "metadata"),
        (json!({"events": [{"data": 1}]}), "malformed_json", "type"),
        (json!({"events": [{"type": "t"}]}), "malformed_json", "data"),
        (
            json!({"expected_version": "maybe", "events": [{"type": "t", "data": 1}]}),
            "malformed_json",
            "expected",
        ),
        (
            json!({"expected_version": true, "events": [{"type": "t", "data": 1}]}),
            "malformed_json",
            "expected",
        ),
    ] {
        let (status, err) = h.call(Method::POST, "/v1/streams/order-2", Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {err}");
        assert_eq!(err["error"], json!(code), "{body}: {err}");
        assert!(err["message"].as_str().unwrap().contains(says), "{body}: {err}");
    }
    let (status, err) = h
        .call(
            Method::POST,
            "/v1/streams/order-2",
            Some(json!({"events": [{"id": id, "type": "t", "data": 1}]})),
        )
        .await;
    assert_eq!((status, err["error"].clone()), (StatusCode::CONFLICT, json!("event_id_conflict")));
    assert_eq!(h.stored().await, 3);
    // Without the token.
    let req = Request::post("/v1/streams/order-2")
        .header("content-type", "application/json")
        .body(Body::from(json!({"events": [{"type": "t", "data": 1}]}).to_string()))
        .unwrap();
    assert_eq!(h.router.clone().oneshot(req).await.unwrap().status(), StatusCode::UNAUTHORIZED);

    // Reads.
    let (status, read) = h.call(Method::GET, "/v1/streams/order-1", None).await;
    assert_eq!(status, StatusCode::OK);
    let versions: Vec<i64> =
        read["events"].as_array().unwrap().iter().map(|e| e["version"].as_i64().unwrap()).collect();
    assert_eq!(versions, vec![1, 2, 3]);
    assert_eq!(read["events"][0]["type"], json!("placed"));
    assert_eq!(read["events"][0]["metadata"], json!({"user": "ann"}));
    assert_eq!(read["events"][0]["tags"], json!(["orders", "eu"]));
    let (_, back) =
        h.call(Method::GET, "/v1/streams/order-1?direction=backward&limit=2", None).await;
    assert_eq!(back["events"][0]["version"], json!(3));
    assert_eq!(back["events"][1]["version"], json!(2));
    let (_, from) = h.call(Method::GET, "/v1/streams/order-1?from=2&limit=1", None).await;
    assert_eq!(from["events"].as_array().unwrap().len(), 1);
    assert_eq!(from["events"][0]["version"], json!(2));
    let (status, err) = h.call(Method::GET, "/v1/streams/nope", None).await;
    assert_eq!((status, err["error"].clone()), (StatusCode::NOT_FOUND, json!("unknown_stream")));
    let (status, _) = h.call(Method::GET, "/v1/streams/order-1?direction=sideways", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = h.call(Method::GET, "/v1/streams/order-1?limit=0", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Every stream from the log, by type and tags.
    h.call(
        Method::POST,
        "/v1/streams/order-9",
        Some(json!({"events": [{"type": "placed", "data": {}, "tags": ["us"]}]})),
    )
    .await;
    weir_testkit::eventually("four appends logged", Duration::from_secs(20), || async {
        let (_, all) = h.call(Method::GET, "/v1/stream-events", None).await;
        all.as_array().unwrap().len() == 4
    })
    .await;
    let (_, placed) = h.call(Method::GET, "/v1/stream-events?type=placed", None).await;
    let streams: Vec<&str> =
        placed.as_array().unwrap().iter().map(|e| e["stream"].as_str().unwrap()).collect();
    assert_eq!(streams, vec!["order-1", "order-9"]);
    assert_eq!(placed[0]["position"], json!(p1));
    let (_, any) = h.call(Method::GET, "/v1/stream-events?tags=eu,us", None).await;
    assert_eq!(any.as_array().unwrap().len(), 2);
    let (_, all) =
        h.call(Method::GET, "/v1/stream-events?tags=eu,orders&tags_match=all", None).await;
    assert_eq!(all.as_array().unwrap().len(), 1);
    let (_, after) =
        h.call(Method::GET, &format!("/v1/stream-events?after={p1}&limit=1"), None).await;
    assert_eq!(after[0]["type"], json!("paid"));

    // Listing.
    let (_, list) = h.call(Method::GET, "/v1/streams?prefix=order-", None).await;
    let names: Vec<&str> =
        list.as_array().unwrap().iter().map(|s| s["stream"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["order-1", "order-9"]);
    assert_eq!(list[0]["version"], json!(3));

    // Snapshots, truncation, deletion.
    let (status, err) = h.call(Method::GET, "/v1/streams/order-1/snapshot", None).await;
    assert_eq!((status, err["error"].clone()), (StatusCode::NOT_FOUND, json!("no_snapshot")));
    let (status, saved) = h
        .call(
            Method::PUT,
            "/v1/streams/order-1/snapshot",
            Some(json!({"version": 2, "data": {"paid": true}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{saved}");
    let (_, snap) = h.call(Method::GET, "/v1/streams/order-1/snapshot", None).await;
    assert_eq!((snap["version"].clone(), snap["data"].clone()), (json!(2), json!({"paid": true})));
    let (status, _) = h
        .call(Method::PUT, "/v1/streams/order-1/snapshot", Some(json!({"version": 9, "data": {}})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, info) =
        h.call(Method::POST, "/v1/streams/order-1/truncate", Some(json!({"before": 3}))).await;
    assert_eq!((status, info["truncate_before"].clone()), (StatusCode::OK, json!(3)));
    let (_, read) = h.call(Method::GET, "/v1/streams/order-1", None).await;
    assert_eq!(read["events"].as_array().unwrap().len(), 1);
    let (status, _) =
        h.call(Method::POST, "/v1/streams/order-1/truncate", Some(json!({"before": 99}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, info) = h.call(Method::DELETE, "/v1/streams/order-1", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(info["deleted_at"].is_string());
    let (status, _) = h.call(Method::GET, "/v1/streams/order-1", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = h.call(Method::DELETE, "/v1/streams/order-1", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Every route is in the OpenAPI document.
    let (_, doc) = h.call(Method::GET, "/v1/openapi.json", None).await;
    for (path, method) in [
        ("/v1/streams/{stream}", "post"),
        ("/v1/streams/{stream}", "get"),
        ("/v1/streams/{stream}", "delete"),
        ("/v1/streams", "get"),
        ("/v1/stream-events", "get"),
        ("/v1/streams/{stream}/truncate", "post"),
        ("/v1/streams/{stream}/snapshot", "put"),
        ("/v1/streams/{stream}/snapshot", "get"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "{method} {path} missing from OpenAPI");
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_are_null_when_ingestion_does_not_run() {
    let h = Harness::start("http_no_ingest", false).await;
    let (status, appended) = h
        .call(Method::POST, "/v1/streams/s", Some(json!({"events": [{"type": "t", "data": 1}]})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{appended}");
    assert_eq!(appended["versions"], json!([1]));
    assert_eq!(appended["positions"], Value::Null);
    assert_eq!(h.stored().await, 1, "committed even without positions");
    h.stop().await;
}

/// Found by the contract test (weir-cli `tests/contract.rs`): a NUL character PostgreSQL cannot
/// store is the client's mistake, a 400 naming it, not a 500; a body that is a JSON array is
/// refused (serde would read a struct from an array of its fields); and the document says what
/// these routes answer, in shapes a validator checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstorable_values_and_array_bodies_are_refused_as_documented() {
    let h = Harness::start("http_contract", false).await;
    let nul = json!({"events": [{"type": "t", "data": {"text": "a\u{0}b"}}]});
    let (status, body) = h.call(Method::POST, "/v1/streams/s", Some(nul)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "unstorable_value", "{body}");
    assert_eq!(h.stored().await, 0);
    let (status, _) = h
        .call(Method::POST, "/v1/streams/s", Some(json!({"events": [{"type": "t", "data": [1]}]})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "an array is a payload like any other");
    let (status, body) = h
        .call(Method::PUT, "/v1/streams/s/snapshot", Some(json!({"version": 1, "data": "\u{0}"})))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("unstorable_value"))
    );
    let (status, body) = h.call(Method::POST, "/v1/streams/s/truncate", Some(json!([1]))).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("malformed_json")));
    let (status, body) =
        h.call(Method::POST, "/v1/consumers/nobody/parked/retry", Some(json!([]))).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("malformed_json")));

    let (_, doc) = h.call(Method::GET, "/v1/openapi.json", None).await;
    let schemas = &doc["components"]["schemas"];
    assert_eq!(
        schemas["Subscription"]["properties"]["selector"]["type"],
        json!(["string", "object"])
    );
    assert!(schemas["Subscription"]["properties"]["start_from"]["anyOf"].is_array());
    assert!(schemas["RecordedEvent"]["properties"]["data"]["type"].is_array());
    let retry = &doc["paths"]["/v1/consumers/{name}/parked/retry"]["post"];
    assert_ne!(retry["requestBody"]["required"], json!(true), "the body may be omitted");
    let cancel = &doc["paths"]["/v1/jobs/{id}/cancel"]["post"];
    assert!(cancel["responses"]["400"].is_object(), "an id that is not a number is a 400");
    let live = &doc["paths"]["/v1/overview/live"]["get"]["responses"]["200"]["content"];
    assert_eq!(live["text/event-stream"]["schema"]["$ref"], "#/components/schemas/SseEvent");
    let limit = doc["paths"]["/v1/log"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "limit")
        .unwrap()
        .clone();
    assert_eq!(
        (limit["schema"]["minimum"].as_i64(), limit["schema"]["maximum"].as_i64()),
        (Some(1), Some(1000))
    );
    h.stop().await;
}

/// JSON Schema's `integer` admits `2.0`: the API reads whole floats where its document says
/// `integer`, refuses `2.5`, and leaves payloads' numbers as written.
#[tokio::test]
async fn whole_floats_are_integers_where_the_document_says_integer() {
    let h = Harness::start("http_whole_floats", false).await;
    let append = |expected: serde_json::Value, amount: serde_json::Value| json!({"expected_version": expected, "events": [{"type": "t", "data": {"amount": amount}}]});
    let (status, body) =
        h.call(Method::POST, "/v1/streams/w", Some(append(json!(0.0), json!(2.0)))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) =
        h.call(Method::POST, "/v1/streams/w", Some(append(json!(1e0), json!(3)))).await;
    assert_eq!((status, body["versions"].clone()), (StatusCode::CREATED, json!([2])), "{body}");
    let (status, body) =
        h.call(Method::POST, "/v1/streams/w", Some(append(json!(2.5), json!(4)))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["message"].as_str().unwrap_or_default().contains("2.5"), "{body}");
    // The payload kept `2.0` as written.
    let (_, read) = h.call(Method::GET, "/v1/streams/w", None).await;
    assert_eq!(read["events"][0]["data"].to_string(), r#"{"amount":2.0}"#, "{read}");
    // Query parameters read the same way: `limit=1.0` is 1, `limit=1.5` is refused.
    let (status, read) =
        h.call(Method::GET, "/v1/streams/w?limit=1.0&direction=backward", None).await;
    assert_eq!(status, StatusCode::OK, "{read}");
    let versions: Vec<i64> =
        read["events"].as_array().unwrap().iter().map(|e| e["version"].as_i64().unwrap()).collect();
    assert_eq!(versions, [2]);
    let (status, read) = h.call(Method::GET, "/v1/streams/w?limit=1.5", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{read}");
    assert!(read["message"].as_str().unwrap_or_default().contains("limit"), "{read}");
    let (status, _) = h.call(Method::GET, "/v1/streams/w?from=1e0&direction=sideways", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "an unknown direction is still refused");
    let (status, body) =
        h.call(Method::POST, "/v1/streams/w/truncate", Some(json!({"before": 2.0}))).await;
    assert_eq!((status, body["truncate_before"].clone()), (StatusCode::OK, json!(2)), "{body}");
    let (status, body) =
        h.call(Method::POST, "/v1/streams/w/truncate", Some(json!({"before": 1.5}))).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("malformed_json")));
    h.stop().await;
}
