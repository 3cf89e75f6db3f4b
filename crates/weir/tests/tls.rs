//! TLS to PostgreSQL: a private cluster with `ssl = on` and a certificate authority made by the
//! test (`openssl`). `sslmode=require` and `sslmode=verify-full` with `sslrootcert` work for
//! weir's pool, its appender and the replication connection (checked on the server in
//! `pg_stat_ssl`); a certificate from another authority is refused, by the pool and by the
//! replication connection, with an error that says so — and ingestion stops on it rather than
//! retrying.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use weir::Config;
use weir_core::Secret;
use weir_testkit::proxy::{Mode, Proxy};
use weir_testkit::{Cluster, Options, eventually};

/// Makes a CA (`<name>-ca.crt`) in `dir`, and, signed by it, a certificate for `127.0.0.1`
/// and `localhost` (`<name>.crt`, `<name>.key`).
fn authority(dir: &Path, name: &str) {
    let sh = format!(
        "set -e; cd '{dir}'
         openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj '/CN={name} test CA' \
           -keyout {name}-ca.key -out {name}-ca.crt 2>/dev/null
         openssl req -newkey rsa:2048 -nodes -subj '/CN=127.0.0.1' \
           -keyout {name}.key -out {name}.csr 2>/dev/null
         printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\nbasicConstraints=CA:FALSE\\n' > {name}.ext
         openssl x509 -req -in {name}.csr -CA {name}-ca.crt -CAkey {name}-ca.key -CAcreateserial \
           -days 2 -extfile {name}.ext -out {name}.crt 2>/dev/null",
        dir = dir.display()
    );
    let status = Command::new("sh").arg("-c").arg(&sh).status().expect("sh runs");
    assert!(status.success(), "openssl could not make the test certificates");
}

/// A cluster serving TLS with a certificate of the `server` authority; also makes an `other`
/// authority, whose CA did not sign it.
fn tls_cluster() -> (Cluster, std::path::PathBuf) {
    let cluster = Cluster::start_temp(Options { fsync: false, settings: vec![] }).unwrap();
    let dir = cluster.data_dir().parent().unwrap().join("tls");
    std::fs::create_dir_all(&dir).unwrap();
    authority(&dir, "server");
    authority(&dir, "other");
    // PostgreSQL reads the key only if its user owns it and no one else may read it.
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "chmod 600 '{d}/server.key' && (id -u postgres >/dev/null 2>&1 && [ \"$(id -u)\" = 0 ] \
             && chown -R postgres:postgres '{d}' || true)",
            d = dir.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    for setting in [
        format!("ssl_cert_file = '{}/server.crt'", dir.display()),
        format!("ssl_key_file = '{}/server.key'", dir.display()),
        "ssl = on".to_string(),
    ] {
        cluster.psql("postgres", &format!("alter system set {setting}")).unwrap();
    }
    cluster.psql("postgres", "select pg_reload_conf()").unwrap();
    (cluster, dir)
}

fn config(url: &str, slot: &str) -> Config {
    let mut config = Config::default();
    config.database.url = Some(Secret::new(url));
    config.source.slot = slot.to_string();
    config
}

/// Ingests from `url` until one insert is logged, and checks on the server that every weir
/// connection and the walsender use TLS.
async fn ingests_over_tls(cluster: &Cluster, db: &str, url: &str) {
    cluster.psql("postgres", &format!("create database {db}")).unwrap();
    let config = config(url, db);
    let pool = weir::db::connect(&config).await.unwrap();
    let ssl: bool = sqlx::query_scalar("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(ssl, "the pool's connection is not encrypted");
    sqlx::raw_sql("create table t (id int primary key, body text)").execute(&pool).await.unwrap();
    weir::setup::init(&pool, &config).await.unwrap();
    let cancel = CancellationToken::new();
    let ingest = {
        let (config, pool, cancel) = (config.clone(), pool.clone(), cancel.clone());
        tokio::spawn(async move {
            weir::ingest::run(&config, &pool, &weir::ProcessId::generate(), cancel).await
        })
    };
    sqlx::query("insert into t values (1)").execute(&pool).await.unwrap();
    eventually("the insert in the log", Duration::from_secs(30), || async {
        assert!(!ingest.is_finished(), "ingestion stopped early");
        sqlx::query_scalar::<_, i64>("select count(*) from weir.events where entity = 't'")
            .fetch_one(&pool)
            .await
            .unwrap()
            == 1
    })
    .await;
    // A row far larger than a TLS record and libpq's buffer is read whole at once (the
    // transport looks into OpenSSL's buffer before it waits for the socket again).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let committed = std::time::Instant::now();
    sqlx::query("insert into t select 2, string_agg(md5(random()::text), '') from generate_series(1, 10000)")
        .execute(&pool)
        .await
        .unwrap();
    eventually("the large row in the log", Duration::from_secs(30), || async {
        sqlx::query_scalar::<_, i64>("select count(*) from weir.events where entity = 't'")
            .fetch_one(&pool)
            .await
            .unwrap()
            == 2
    })
    .await;
    let took = committed.elapsed();
    assert!(took < Duration::from_secs(3), "a large row took {took:?} to reach the log over TLS");
    let (walsenders, plain): (i64, i64) = sqlx::query_as(
        "select count(*), count(*) filter (where not s.ssl)
         from pg_stat_replication r join pg_stat_ssl s using (pid)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((walsenders, plain), (1, 0), "the replication connection is not encrypted");
    let plain: i64 = sqlx::query_scalar(
        "select count(*) from pg_stat_activity a join pg_stat_ssl s using (pid)
         where a.datname = $1 and a.backend_type = 'client backend' and not s.ssl",
    )
    .bind(db)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(plain, 0, "a connection of weir's is not encrypted");
    cancel.cancel();
    ingest.await.unwrap().unwrap();
    drop_slot(&pool, db).await;
    pool.close().await;
}

/// Drops the slot `name` if there is one, once its walsender has gone.
async fn drop_slot(pool: &PgPool, name: &str) {
    eventually("the slot released", Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, i64>(
            "select count(*) from pg_replication_slots where slot_name = $1 and active",
        )
        .bind(name)
        .fetch_one(pool)
        .await
        .unwrap()
            == 0
    })
    .await;
    sqlx::query(
        "select pg_drop_replication_slot(slot_name) from pg_replication_slots
         where slot_name = $1",
    )
    .bind(name)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_works_for_the_pool_and_the_replication_connection_and_a_wrong_ca_is_refused() {
    let (cluster, dir) = tls_cluster();
    let base = |db: &str| format!("postgres://postgres@127.0.0.1:{}/{db}", cluster.port());

    // Through a proxy that delivers the server's bytes in bursts: a large message is in the
    // socket whole before weir reads it.
    let proxy = Proxy::start(cluster.port(), Mode::Burst(Duration::from_millis(30))).await.unwrap();
    let required = proxy.url(&format!("{}?sslmode=require", base("required")));
    ingests_over_tls(&cluster, "required", &required).await;
    let ca = dir.join("server-ca.crt");
    ingests_over_tls(
        &cluster,
        "verified",
        &format!("{}?sslmode=verify-full&sslrootcert={}", base("verified"), ca.display()),
    )
    .await;

    // A CA that did not sign the server's certificate: refused, saying why.
    let wrong = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        base("postgres"),
        dir.join("other-ca.crt").display()
    );
    let err = weir::db::connect(&config(&wrong, "unused")).await.unwrap_err();
    let said = err.to_string();
    let chain: Vec<String> =
        std::iter::successors(Some(&err as &dyn std::error::Error), |e| e.source())
            .map(|e| format!("{e} [{e:?}]"))
            .collect();
    assert!(said.contains("certificate was refused") && said.contains("sslrootcert"), "{chain:?}");
    assert!(chain.join(": ").to_lowercase().contains("certificate"), "{chain:?}");
    // `weir doctor` says the same, with the driver's words and the fix.
    let checks = weir::doctor::diagnose(&config(&wrong, "unused")).await;
    let connection = &checks[0];
    assert_eq!(connection.name, "connection");
    assert!(connection.detail.contains("UnknownIssuer"), "{}", connection.detail);
    assert!(connection.fix.as_deref().is_some_and(|f| f.contains("sslrootcert")), "{connection:?}");

    // The replication connection with that CA (the pool fine): ingestion stops with the
    // reason, rather than retrying a certificate that will never verify.
    cluster.psql("postgres", "create database wrong").unwrap();
    let good = format!("{}?sslmode=verify-full&sslrootcert={}", base("wrong"), ca.display());
    let pool = weir::db::connect(&config(&good, "wrong")).await.unwrap();
    sqlx::raw_sql("create table t (id int primary key, body text)").execute(&pool).await.unwrap();
    weir::setup::init(&pool, &config(&good, "wrong")).await.unwrap();
    let wrong = good.replace("server-ca.crt", "other-ca.crt");
    let stopped = tokio::time::timeout(
        Duration::from_secs(30),
        weir::ingest::run(
            &config(&wrong, "wrong"),
            &pool,
            &weir::ProcessId::generate(),
            CancellationToken::new(),
        ),
    )
    .await
    .expect("ingestion gave up on the certificate within 30 s");
    let err = stopped.unwrap_err();
    let chain: Vec<String> =
        std::iter::successors(Some(&err as &dyn std::error::Error), |e| e.source())
            .map(ToString::to_string)
            .collect();
    assert!(chain.join(": ").to_lowercase().contains("certificate"), "{chain:?}");

    // The replication connection alone (libpq's TLS): a certificate error, not a lost
    // connection to retry.
    let Err(refused) = weir_source::stream::ReplicationStream::start(
        &weir::db::replication_conninfo(&config(&wrong, "wrong")),
        weir_source::stream::StreamOptions {
            slot: "wrong".into(),
            publication: "weir".into(),
            protocol_version: 2,
        },
        weir_core::Lsn(0),
    )
    .await
    else {
        panic!("the replication connection accepted a certificate of another CA");
    };
    assert!(
        matches!(refused, weir_source::Error::Tls(_)) && !refused.is_transient(),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("sslrootcert"), "{refused}");
    drop_slot(&pool, "wrong").await;
    pool.close().await;

    // The server does not require TLS, so `sslmode=disable` still connects — in plain text.
    let pool = PgPool::connect(&format!("{}?sslmode=disable", base("postgres"))).await.unwrap();
    let ssl: bool = sqlx::query_scalar("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(!ssl);
}
