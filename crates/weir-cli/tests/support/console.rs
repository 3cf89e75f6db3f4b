//! What the console's browser tests share: a test database with posts, comments and two SQL
//! operators that fail on demand, `weir run` serving the console on a free port, and a real
//! headless Chromium driven through chromedriver (WebDriver), with screenshots written under
//! `target/tmp/console-screenshots/` for a person to look at.
//!
//! Chromium and chromedriver come from Debian's `chromium` and `chromium-driver` (`.ci/run`
//! installs them), or `WEIR_CHROMIUM` / `WEIR_CHROMEDRIVER`.
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use sqlx::PgPool;
use weir_testkit::TestDatabase;

use crate::support::{Proc, weir};

/// The bearer token of the fixture's `weir run`.
pub(crate) const TOKEN: &str = "console-test-token-0123456789";

/// Tables of the fixture: rows exist before capture starts, like a real database.
const SCHEMA: &str = "
    create table posts (id serial primary key, title text not null, body text not null default '');
    create table comments (id serial primary key, post_id int not null, body text not null);
    create table guard (ok int);
    create table post_titles (id int primary key, title text not null);
    create table comment_log (id int primary key, body text not null);
    insert into posts (title) select 'old ' || g from generate_series(1, 20) g;";

/// `post_titles` halts on a post titled `poison`, `comment_log` parks a comment `bad`, both
/// until a row is in `guard`.
const CONFIG: &str = r#"[source]
tables = ["posts", "comments"]

[jobs]
poll_interval = "100ms"

[consumers.retry]
min_restart_time = "50ms"
max_retries = 1

[[operators]]
name = "post_titles"
entities = ["posts"]
sql = """
insert into post_titles (id, title)
select p.id, p.title from posts p
 where p.id = $1
   and 1 / (case when p.title = 'poison' and not exists (select 1 from guard) then 0 else 1 end) = 1
on conflict (id) do update set title = excluded.title
"""

[[operators]]
name = "comment_log"
entities = ["comments"]
on_exhausted = "park"
sql = """
insert into comment_log (id, body)
select c.id, c.body from comments c
 where c.id = $1
   and 1 / (case when c.body = 'bad' and not exists (select 1 from guard) then 0 else 1 end) = 1
on conflict (id) do update set body = excluded.body
"""

[[periodic]]
name = "nightly_report"
cron = "0 3 * * *"
timezone = "Europe/Paris"
kind = "report"
"#;

/// A database, its weir.toml and the `weir run` serving the console.
pub(crate) struct Console {
    pub(crate) db: TestDatabase<'static>,
    pub(crate) pool: PgPool,
    dir: tempfile::TempDir,
    pub(crate) addr: String,
    run: Option<Proc>,
    runs: usize,
}

impl Console {
    /// The fixture with `weir init` done and `weir run` answering, with [`TOKEN`] configured
    /// when `token` is set.
    pub(crate) async fn start(prefix: &str, token: bool) -> Self {
        let db = weir_testkit::shared().database(prefix).unwrap();
        db.psql(SCHEMA).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("weir.toml"), CONFIG).unwrap();
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let mut init = weir(&db, &["init"]);
        init.arg("--config").arg(dir.path().join("weir.toml"));
        let (ok, out) = crate::support::output(init);
        assert!(ok, "weir init failed: {out}");
        let pool = PgPool::connect(&db.url()).await.unwrap();
        let mut console = Self { db, pool, dir, addr, run: None, runs: 0 };
        console.run(token).await;
        console
    }

    /// The page's address.
    pub(crate) fn url(&self, hash: &str) -> String {
        format!("http://{}/{hash}", self.addr)
    }

    /// Starts `weir run` (with or without the token) and waits until it answers.
    pub(crate) async fn run(&mut self, token: bool) {
        self.runs += 1;
        let log =
            std::fs::File::create(self.dir.path().join(format!("weir-{}.log", self.runs))).unwrap();
        let mut cmd = weir(&self.db, &["run"]);
        cmd.arg("--config")
            .arg(self.dir.path().join("weir.toml"))
            .env("WEIR_HTTP_BIND", &self.addr)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if token {
            cmd.env("WEIR_HTTP_TOKEN", TOKEN);
        } else {
            cmd.env_remove("WEIR_HTTP_TOKEN");
        }
        self.run = Some(Proc(cmd.spawn().unwrap()));
        let addr = self.addr.clone();
        weir_testkit::eventually("weir run answers", Duration::from_secs(30), || {
            let addr = addr.clone();
            async move { std::net::TcpStream::connect(&addr).is_ok() }
        })
        .await;
    }

    /// Kills `weir run` with SIGKILL.
    pub(crate) fn kill(&mut self) {
        if let Some(p) = self.run.take() {
            crate::support::sigkill(&p);
            drop(p);
        }
    }

    /// Every `weir run` log so far, for failure messages.
    pub(crate) fn logs(&self) -> String {
        (1..=self.runs)
            .map(|n| {
                std::fs::read_to_string(self.dir.path().join(format!("weir-{n}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n----\n")
    }

    /// Runs `sql` on the test database.
    pub(crate) async fn sql(&self, sql: &str) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string())).execute(&self.pool).await.unwrap();
    }

    /// The first column of the first row of `sql`, as JSON text.
    pub(crate) async fn scalar(&self, sql: &str) -> Option<String> {
        sqlx::query_scalar::<_, Option<String>>(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

/// chromedriver (in its own process group, killed with Chromium when dropped) and one session.
pub(crate) struct Browser {
    pub(crate) client: Client,
    driver: Driver,
    _profile: tempfile::TempDir,
}

/// chromedriver, leading its process group (Chromium's processes are in it too): the whole
/// group is killed when dropped, whatever the test did.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        // `--`: without it `kill` may read the negative group id as an option.
        let group = format!("-{}", self.0.id());
        assert!(self.0.id() > 1, "no process group to kill");
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.0.wait();
    }
}

fn program(var: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| default.into());
    assert!(
        path.exists(),
        "{} is missing: install Debian's `chromium` and `chromium-driver` (.ci/run does), or set {var}",
        path.display()
    );
    path
}

impl Browser {
    /// A headless Chromium, 1280×1000.
    pub(crate) async fn start() -> Self {
        Self::start_sized(1280, 1000).await
    }

    /// A headless Chromium with this window.
    pub(crate) async fn start_sized(width: u32, height: u32) -> Self {
        let chromium = program("WEIR_CHROMIUM", "/usr/bin/chromium");
        let chromedriver = program("WEIR_CHROMEDRIVER", "/usr/bin/chromedriver");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        let profile = tempfile::tempdir().unwrap();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-extensions",
                    format!("--user-data-dir={}", profile.path().display()),
                    format!("--window-size={width},{height}"),
                ],
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector).capabilities(caps.clone()).connect(&url).await {
                Ok(c) => break c,
                Err(e) => {
                    assert!(Instant::now() < deadline, "chromedriver did not start Chromium: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        Self { client, driver: Driver(driver), _profile: profile }
    }

    /// Loads `url` afresh (a reload even when only the `#…` part differs).
    pub(crate) async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
        self.client.refresh().await.unwrap();
    }

    /// The first element matching `css`, waited for (at most `timeout`; looked for every 20 ms,
    /// so a test can time how soon something shows).
    pub(crate) async fn wait_for(&self, css: &str, timeout: Duration) -> Element {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(el) = self.client.find(Locator::Css(css)).await {
                return el;
            }
            assert!(Instant::now() < deadline, "no element `{css}` within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until at least `n` elements match `css` (counted in the page).
    pub(crate) async fn wait_count(&self, css: &str, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let script = "return document.querySelectorAll(arguments[0]).length;";
        loop {
            let found = self.client.execute(script, vec![json!(css)]).await.unwrap();
            let found = found.as_u64().unwrap_or(0) as usize;
            if found >= n {
                return;
            }
            if Instant::now() >= deadline {
                let page = self
                    .eval("return [document.querySelector('main').innerText.slice(0, 2000), window.weirErrors];")
                    .await;
                panic!("{found} of {n} `{css}` after {timeout:?}; the page: {page}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the text of `css` contains `text`; returns it.
    pub(crate) async fn wait_text(&self, css: &str, text: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            if let Ok(el) = self.client.find(Locator::Css(css)).await
                && let Ok(t) = el.text().await
            {
                if t.contains(text) {
                    return t;
                }
                last = t;
            }
            assert!(
                Instant::now() < deadline,
                "`{css}` did not say {text:?} within {timeout:?}; it says {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until nothing matches `css`.
    pub(crate) async fn wait_gone(&self, css: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.client.find_all(Locator::Css(css)).await.unwrap().is_empty() {
            assert!(Instant::now() < deadline, "`{css}` is still there after {timeout:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Clicks the first element matching `css` (waited for, at most 10 s; found again when the
    /// page redrew it between finding and clicking).
    pub(crate) async fn click(&self, css: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let el = self.wait_for(css, Duration::from_secs(10)).await;
            match el.click().await {
                Ok(()) => return,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("clicking `{css}`: {e}"),
            }
        }
    }

    /// Clicks `css`, then accepts the confirmation it asks for.
    pub(crate) async fn click_confirm(&self, css: &str) {
        self.click(css).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.client.accept_alert().await.is_err() {
            assert!(Instant::now() < deadline, "`{css}` asked for no confirmation");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Types the token into the login field and signs in (the page reloads).
    pub(crate) async fn sign_in(&self, token: &str) {
        let field = self.wait_for("#token", Duration::from_secs(10)).await;
        field.send_keys(token).await.unwrap();
        self.click(".login button[type=submit]").await;
        self.wait_text("[data-testid=access]", "Signed in", Duration::from_secs(10)).await;
    }

    /// Evaluates `script` (a function body) in the page.
    pub(crate) async fn eval(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap()
    }

    /// Asserts the page had no uncaught error or rejection (`window.weirErrors`).
    pub(crate) async fn assert_no_errors(&self) {
        let errors = self.eval("return window.weirErrors;").await;
        assert_eq!(errors, json!([]), "the page had errors");
    }

    /// Writes a screenshot to `target/tmp/console-screenshots/<name>.png`.
    pub(crate) async fn screenshot(&self, name: &str) {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    /// Ends the session (Chromium exits), then chromedriver.
    pub(crate) async fn close(self) {
        let Browser { client, driver, _profile } = self;
        // `close` waits for every clone of the client: this is the only one.
        let _ = tokio::time::timeout(Duration::from_secs(10), client.close()).await;
        drop(driver);
    }
}
