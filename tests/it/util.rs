//! Shared helpers: the services from the environment (failing loudly when
//! absent), unique names, topic creation, the `streamscore` binary as a child
//! process, producing, reading topics, Redis and metrics.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::TopicPartitionList;

/// A required service address from the environment; panics (fails the
/// test) with instructions when it is missing. Tests never skip.
pub fn service(var: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{var} is not set: integration tests need a real Kafka-protocol broker and redis-server. \
             Run them with scripts/test.sh, which installs and starts both."
        ),
    }
}

thread_local! {
    /// A broker of this test's own (set by [`use_own_broker`]).
    static OWN_BROKER: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// The broker of this test: the shared one, or the test thread's own.
pub fn brokers() -> String {
    OWN_BROKER
        .with(|b| b.borrow().clone())
        .unwrap_or_else(|| service("STREAMSCORE_TEST_BROKERS"))
}

/// Makes every helper called from this thread (TestEnv, producers,
/// readers) use `brokers` instead of the shared broker.
pub fn use_own_broker(brokers: &str) {
    OWN_BROKER.with(|b| *b.borrow_mut() = Some(brokers.to_string()));
}

/// A tansu broker of the test's own, on the durable sqlite engine, so it
/// can be killed and restarted with its data.
pub struct OwnBroker {
    pub dir: tempfile::TempDir,
    pub port: u16,
    storage: &'static str,
    child: Option<Child>,
}

impl OwnBroker {
    pub fn start() -> OwnBroker {
        // A path relative to the working directory: tansu 0.6 puts the
        // working directory before absolute ones too.
        OwnBroker::start_on("sqlite://tansu.db")
    }

    /// A broker on tansu's memory engine: its records go when the test
    /// ends, instead of staying in the shared broker's memory for the rest
    /// of the suite (a flood of millions). Data does not survive
    /// [`OwnBroker::restart`].
    pub fn start_in_memory() -> OwnBroker {
        OwnBroker::start_on("memory://tansu/")
    }

    fn start_on(storage: &'static str) -> OwnBroker {
        let mut b = OwnBroker {
            dir: tempfile::tempdir().expect("tempdir"),
            port: free_port(),
            storage,
            child: None,
        };
        b.restart();
        b
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the broker (again) on the same port and data.
    pub fn restart(&mut self) {
        let bin = service("STREAMSCORE_TEST_TANSU_BIN");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tansu.log"))
            .expect("tansu log");
        let child = Command::new(bin)
            .current_dir(self.dir.path())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", self.storage])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tansu (STREAMSCORE_TEST_TANSU_BIN)");
        self.child = Some(child);
        let port = self.port;
        wait_for(Duration::from_secs(30), "the own broker to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
    }

    /// SIGKILL: no clean shutdown.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn redis_url() -> String {
    service("STREAMSCORE_TEST_REDIS")
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Held by the tests that load the machine the most (the key flood) and by
/// those whose exactness depends on the broker's group protocol under load
/// (rebalance, scale_out), so they never run beside each other. Seen in a
/// CI run with the 3 M key flood beside `scale_out`: tansu handed two
/// partitions to a joining instance 1.6 s before their old owner was told
/// to revoke them (it heartbeated late on the starved machine), and both
/// scored the same 437 events — Kafka's coordinator waits for every member
/// to rejoin before assigning; tansu 0.6 did not here.
pub fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A name unique to this test run and call.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    format!("{prefix}-{}-{t}-{n}", std::process::id())
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_streamscore"))
}

/// The optimised build of the binary (`cargo build --release`, path in
/// STREAMSCORE_TEST_RELEASE_BIN; scripts/test.sh builds it), for the tests
/// that push millions of events through: a debug build scores ~3,000/s.
pub fn release_bin() -> PathBuf {
    let p = PathBuf::from(service("STREAMSCORE_TEST_RELEASE_BIN"));
    assert!(
        p.is_file(),
        "STREAMSCORE_TEST_RELEASE_BIN={} is not a file: build it with cargo build --release --bin streamscore",
        p.display()
    );
    p
}

/// `n` distinct free loopback ports (bound at once, then released: ports
/// picked one after another can repeat, and two instances on one port is
/// one instance dead at start).
pub fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
        .collect();
    ls.iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// One isolated environment on the shared broker and Redis: its own topic
/// prefix, group, Redis key prefix and config file.
pub struct TestEnv {
    pub prefix: String,
    pub group: String,
    pub redis_prefix: String,
    pub http_port: u16,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl TestEnv {
    /// Creates the environment and its topics (explicitly, through
    /// `streamscore topics apply`). `extra` is appended to the config file.
    pub fn new(name: &str, extra: &str) -> TestEnv {
        Self::build(name, extra, true)
    }

    /// An environment whose instances use dynamic group membership (they
    /// leave the group on a graceful stop, so their partitions move).
    pub fn dynamic(name: &str) -> TestEnv {
        Self::build(name, "", false)
    }

    /// A dynamic-membership environment whose topics all have `partitions`
    /// partitions (`topics apply --file` with the shipped definitions
    /// changed only in that).
    pub fn dynamic_with_partitions(name: &str, extra: &str, partitions: i32) -> TestEnv {
        Self::build_with(name, extra, false, Some(partitions))
    }

    fn build(name: &str, extra: &str, static_membership: bool) -> TestEnv {
        Self::build_with(name, extra, static_membership, None)
    }

    fn build_with(
        name: &str,
        extra: &str,
        static_membership: bool,
        partitions: Option<i32>,
    ) -> TestEnv {
        let prefix = format!("{}.", unique(name));
        let dir = tempfile::tempdir().expect("tempdir");
        let http_port = free_port();
        let env = TestEnv {
            group: format!("{prefix}group"),
            redis_prefix: prefix.clone(),
            http_port,
            config_path: dir.path().join("streamscore.toml"),
            prefix,
            dir,
        };
        env.write_config(extra, static_membership);
        let mut apply = env.command(&["topics", "apply"]);
        if let Some(n) = partitions {
            let path = env.dir.path().join("topics.toml");
            let text = streamscore::topics::BUILTIN
                .replace("\npartitions = 4\n", &format!("\npartitions = {n}\n"));
            assert!(text.contains(&format!("partitions = {n}")));
            std::fs::write(&path, text).expect("write topics file");
            apply.arg("--file").arg(&path);
        }
        let out = apply.output().expect("run topics apply");
        assert!(
            out.status.success(),
            "topics apply failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        env
    }

    fn write_config(&self, extra: &str, static_membership: bool) {
        let instance = if static_membership {
            format!("instance_id = \"{}instance-1\"", self.prefix)
        } else {
            String::new()
        };
        let models = root().join("models");
        let text = format!(
            r#"[kafka]
brokers = "{brokers}"
group_id = "{group}"
topic_prefix = "{prefix}"
{instance}

[processing]
commit_interval = "200ms"
shutdown_deadline = "20s"

[windows]
eviction_interval = "1s"

[model]
path = "{onnx}"
signature = "{sig}"

[redis]
url = "{redis}"
key_prefix = "{rprefix}"
score_ttl = "1h"

[http]
bind = "127.0.0.1:{port}"

# tansu 0.6 has no Kafka transactions (EndTxn unsupported).
[recs]
topic_transactions = false
{extra}
"#,
            brokers = brokers(),
            group = self.group,
            prefix = self.prefix,
            onnx = models.join("fraud.onnx").display(),
            sig = models.join("fraud.json").display(),
            redis = redis_url(),
            rprefix = self.redis_prefix,
            port = self.http_port,
        );
        std::fs::write(&self.config_path, text).expect("write config");
    }

    pub fn topic(&self, logical: &str) -> String {
        format!("{}{logical}", self.prefix)
    }

    /// `streamscore --config <this env> ARGS…`
    pub fn command(&self, args: &[&str]) -> Command {
        self.command_of(&bin(), args)
    }

    /// [`TestEnv::command`] of another build of the binary.
    pub fn command_of(&self, bin: &std::path::Path, args: &[&str]) -> Command {
        let mut c = Command::new(bin);
        c.arg("--config").arg(&self.config_path).args(args);
        c.env("RUST_LOG", "info,rdkafka=warn");
        c
    }

    /// Starts `streamscore run`, its log in the env's folder.
    pub fn spawn_run(&self, tag: &str) -> RunningProcess {
        self.spawn_run_on(tag, self.http_port)
    }

    /// Starts another `streamscore run` of this environment, serving its
    /// metrics on `http_port`.
    pub fn spawn_run_on(&self, tag: &str, http_port: u16) -> RunningProcess {
        self.spawn_run_with(tag, http_port, &[])
    }

    /// Starts `streamscore run` with extra environment (config overrides).
    pub fn spawn_run_with(
        &self,
        tag: &str,
        http_port: u16,
        vars: &[(&str, &str)],
    ) -> RunningProcess {
        self.spawn_run_of(&bin(), tag, http_port, vars)
    }

    /// [`TestEnv::spawn_run_with`] of another build of the binary.
    pub fn spawn_run_of(
        &self,
        bin: &std::path::Path,
        tag: &str,
        http_port: u16,
        vars: &[(&str, &str)],
    ) -> RunningProcess {
        let log = self.dir.path().join(format!("run-{tag}.log"));
        let f = std::fs::File::create(&log).expect("log file");
        let child = self
            .command_of(bin, &["run"])
            .env("STREAMSCORE__HTTP__BIND", format!("127.0.0.1:{http_port}"))
            .envs(vars.iter().copied())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("spawn streamscore run");
        RunningProcess { child, log }
    }

    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.http_port)
    }
}

/// A child `streamscore run`.
pub struct RunningProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl RunningProcess {
    /// The log so far (lossy: one invalid byte must not hide the rest).
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// SIGTERM, then wait for the exit (bounded).
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "streamscore run did not exit within {within:?} of SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RunningProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `check` until it returns Some, or fails after `within` with `what`.
pub fn wait_for<T>(within: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

/// Produces keyed payloads and waits for every ack.
pub fn produce_all(topic: &str, records: &[(String, Vec<u8>)]) {
    let p = producer();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut futs = Vec::with_capacity(records.len());
        for (k, v) in records {
            loop {
                match p.send_result(FutureRecord::to(topic).key(k).payload(v)) {
                    Ok(f) => {
                        futs.push(f);
                        break;
                    }
                    Err((e, _)) => {
                        let _ = e;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }
        for f in futs {
            f.await.expect("delivery not cancelled").expect("delivered");
        }
    });
    p.flush(Duration::from_secs(10)).expect("flush");
}

/// One message read back.
#[derive(Debug, Clone)]
pub struct Record {
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub partition: i32,
    pub offset: i64,
}

/// A reader of every partition of `topic` from the beginning, without a
/// group commit.
fn topic_reader(topic: &str) -> BaseConsumer {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .set("fetch.queue.backoff.ms", "100")
        .create()
        .expect("consumer");
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Offset(0))
                .expect("tpl");
        }
    }
    c.assign(&tpl).expect("assign");
    c
}

/// Reads every partition of `topic` from the beginning, without a group
/// commit, until `done(records)` says so or `within` passes (then fails,
/// showing `context()`).
/// After `done`, keeps reading until nothing new arrives for `settle`, so
/// duplicates that are on their way are seen too.
/// A record delivered twice (same partition and offset) is kept once.
pub fn read_topic(
    topic: &str,
    within: Duration,
    settle: Duration,
    mut done: impl FnMut(&[Record]) -> bool,
    context: impl Fn() -> String,
) -> Vec<Record> {
    let c = topic_reader(topic);
    let mut seen: HashSet<(i32, i64)> = HashSet::new();
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    let mut satisfied_at: Option<Instant> = None;
    let mut last_check = Instant::now();
    loop {
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                if !seen.insert((m.partition(), m.offset())) {
                    continue;
                }
                out.push(Record {
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    payload: m.payload().unwrap_or_default().to_vec(),
                    partition: m.partition(),
                    offset: m.offset(),
                });
                if satisfied_at.is_some() {
                    satisfied_at = Some(Instant::now());
                }
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
        // `done` may be O(records) and slow: ask it after at least 200 ms of
        // reading since it last answered, never per message.
        if satisfied_at.is_none() && last_check.elapsed() >= Duration::from_millis(200) {
            if done(&out) {
                satisfied_at = Some(Instant::now());
            }
            last_check = Instant::now();
        }
        if let Some(t) = satisfied_at {
            if t.elapsed() >= settle {
                return out;
            }
        }
        if Instant::now() >= deadline {
            let mut per: HashMap<i32, (usize, i64)> = HashMap::new();
            for (p, o) in &seen {
                let e = per.entry(*p).or_insert((0, -1));
                e.0 += 1;
                e.1 = e.1.max(*o);
            }
            let mut per: Vec<_> = per.into_iter().collect();
            per.sort_unstable();
            panic!(
                "timed out reading {topic}: {} records so far (per partition: (count, max offset) {per:?}); {}",
                out.len(),
                context()
            );
        }
    }
}

/// Distinct keys of a record list, with their counts.
/// How many times each `txn_id` appears in fraud-score records (the key;
/// a test checks key and payload agree).
pub fn txn_counts(records: &[Record]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in records {
        *m.entry(r.key.clone().unwrap_or_default()).or_insert(0) += 1;
    }
    m
}

/// Fetches the metrics text (None while the server is not up).
pub fn scrape(url: &str) -> Option<String> {
    let addr = url.trim_start_matches("http://");
    let (host, path) = addr.split_once('/').unwrap_or((addr, ""));
    let mut s = std::net::TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    std::io::Read::read_to_string(&mut s, &mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    let status = head.lines().next()?;
    status.contains(" 200 ").then(|| body.to_string())
}

/// One HTTP/1.1 request on a fresh connection: (status, body). None
/// while nothing listens.
pub fn http(port: u16, method: &str, path: &str, body: Option<&[u8]>) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let body = body.unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).ok()?;
    // The server may answer (413) before reading a large body: a failed
    // write is not an error as long as the answer can be read.
    let _ = s.write_all(body);
    let mut buf = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status: u16 = head.lines().next()?.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// The value of one sample line `name{labels} value` (labels exact, or none).
pub fn metric(text: &str, name_with_labels: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name_with_labels).then(|| v.parse().ok())?
    })
}

/// Sum of every sample of a metric family (all label sets).
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            let base = k.split('{').next()?;
            (base == name).then(|| v.parse::<f64>().ok())?
        })
        .sum()
}

/// TTLs of `{prefix}fraud:txn:{id}` for every id (-2: missing).
pub fn score_key_ttls(url: &str, prefix: &str, ids: &[String]) -> Option<Vec<i64>> {
    let mut con = redis::Client::open(url).ok()?.get_connection().ok()?;
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.cmd("TTL").arg(format!("{prefix}fraud:txn:{id}"));
    }
    pipe.query(&mut con).ok()
}

/// Waits until Redis holds `fraud:txn:{id}` for every id (the Redis writer
/// follows the fraud-scores topic) and returns their TTLs.
pub fn wait_redis_scores(
    url: &str,
    prefix: &str,
    ids: &[String],
    within: Duration,
    context: impl Fn() -> String,
) -> Vec<i64> {
    let mut missing = ids.len();
    let deadline = Instant::now() + within;
    loop {
        if let Some(ttls) = score_key_ttls(url, prefix, ids) {
            missing = ttls.iter().filter(|t| **t == -2).count();
            if missing == 0 {
                return ttls;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} fraud:txn keys still missing in Redis at {url} after {within:?}; {}",
            ids.len(),
            context()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn redis_conn() -> redis::Connection {
    redis::Client::open(redis_url())
        .expect("redis url")
        .get_connection()
        .unwrap_or_else(|e| panic!("cannot connect to redis-server at {}: {e}", redis_url()))
}

/// A JSON Schema validator for `schemas/<name>.json`.
pub fn schema(name: &str) -> jsonschema::Validator {
    let path = root().join("schemas").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).expect("schema is JSON");
    jsonschema::validator_for(&v)
        .unwrap_or_else(|e| panic!("{}: invalid schema: {e}", path.display()))
}

/// Schema errors of one instance (empty when valid).
pub fn schema_errors(v: &jsonschema::Validator, instance: &serde_json::Value) -> Vec<String> {
    v.iter_errors(instance).map(|e| e.to_string()).collect()
}

/// The version the shipped model's signature declares.
pub fn model_version() -> String {
    let sig: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("models/fraud.json")).expect("models/fraud.json"),
    )
    .expect("signature is JSON");
    sig["version"].as_str().expect("version").to_string()
}

/// Transactions as keyed records (key: user id), ready to produce.
pub fn keyed_records(txns: &[streamscore::events::Transaction]) -> Vec<(String, Vec<u8>)> {
    txns.iter()
        .map(|t| (t.user_id.clone(), serde_json::to_vec(t).expect("serialise")))
        .collect()
}

/// Interactions as keyed records (key: user id), ready to produce.
pub fn interaction_records(events: &[streamscore::events::Interaction]) -> Vec<(String, Vec<u8>)> {
    events
        .iter()
        .map(|e| (e.user_id.clone(), serde_json::to_vec(e).expect("serialise")))
        .collect()
}

/// Produces `records` to `topic` in chunks of `chunk` with a 100 ms pause
/// between chunks, on a thread: a stream that keeps flowing while the test
/// stops and starts processors.
pub fn spawn_feeder(
    topic: String,
    records: Vec<(String, Vec<u8>)>,
    chunk: usize,
) -> std::thread::JoinHandle<()> {
    spawn_feeder_every(topic, records, chunk, Duration::from_millis(100))
}

/// [`spawn_feeder`] with `pause` between chunks.
pub fn spawn_feeder_every(
    topic: String,
    records: Vec<(String, Vec<u8>)>,
    chunk: usize,
    pause: Duration,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for c in records.chunks(chunk) {
            produce_all(&topic, c);
            std::thread::sleep(pause);
        }
    })
}

/// Features 0..15 are the event's and its user's; merchant features (15..)
/// depend on how partitions interleave (see the scale-out issue).
pub const USER_FEATURES: usize = 15;

/// What an uninterrupted single run computes for each txn id, with the
/// same window code and the default window config the tests use.
pub fn reference_features(txns: &[streamscore::events::Transaction]) -> HashMap<String, Vec<f32>> {
    use streamscore::config::WindowConfig;
    use streamscore::features::{FeatureEngine, WindowSpec};
    let engine = FeatureEngine::new(WindowSpec::from(&WindowConfig::default()));
    txns.iter()
        .map(|t| (t.txn_id.clone(), engine.process(t, true).0.to_vec()))
        .collect()
}

/// Every user/event feature value of every score record that differs from
/// the reference, described.
pub fn user_feature_mismatches(scores: &[Record], want: &HashMap<String, Vec<f32>>) -> Vec<String> {
    let mut out = Vec::new();
    for r in scores {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).expect("score JSON");
        let id = v["txn_id"].as_str().expect("txn_id");
        let Some(expect) = want.get(id) else {
            out.push(format!("{id}: not produced by the test"));
            continue;
        };
        for (i, name) in streamscore::features::FEATURE_NAMES
            .iter()
            .enumerate()
            .take(USER_FEATURES)
        {
            let got = v["features"][name].as_f64().expect("feature") as f32;
            if got != expect[i] {
                out.push(format!(
                    "{id} {name}: got {got}, uninterrupted {}",
                    expect[i]
                ));
            }
        }
    }
    out
}

/// `n` generated transactions (1 % fraud) whose event times end about now,
/// `gap_ms` apart on average: a stream a test feeds while processors run.
pub fn live_txns(
    seed: u64,
    n: usize,
    users: usize,
    merchants: usize,
    gap_ms: f64,
) -> Vec<streamscore::events::Transaction> {
    live_txn_stream(seed, n, users, merchants, gap_ms).collect()
}

/// [`live_txns`], generated as they are taken (for streams too large to
/// hold at once).
pub fn live_txn_stream(
    seed: u64,
    n: usize,
    users: usize,
    merchants: usize,
    gap_ms: f64,
) -> impl Iterator<Item = streamscore::events::Transaction> {
    use streamscore::generate::{GenOptions, TxnGenerator};
    TxnGenerator::new(GenOptions {
        seed,
        users,
        merchants,
        fraud_rate: 0.01,
        mean_gap_ms: gap_ms,
        start_ms: streamscore::now_ms() - (n as f64 * gap_ms) as i64,
    })
    .take(n)
}

/// Waits until the `streamscore run` serving `metrics_url` has scored at
/// least `at_least` events.
pub fn wait_scored(metrics_url: &str, at_least: f64, what: &str) {
    wait_for(Duration::from_secs(120), what, || {
        let t = scrape(metrics_url)?;
        (metric(&t, "streamscore_events_scored_total")? >= at_least).then_some(())
    });
}

/// A client of the env's consumer group that never joins it: for offset
/// fetches and commits only.
fn group_client(env: &TestEnv) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", &env.group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer")
}

/// Waits until the env's consumer group has committed every partition of
/// its `logical` topic up to the high watermark (an offset fetch by a
/// client outside the group: it does not join or disturb it).
pub fn wait_committed(env: &TestEnv, logical: &str) {
    let topic = env.topic(logical);
    let c = group_client(env);
    let md = c
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .expect("metadata");
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    wait_for(Duration::from_secs(60), "the group's commits", || {
        let mut tpl = TopicPartitionList::new();
        for p in &parts {
            tpl.add_partition(&topic, *p);
        }
        let committed = c.committed_offsets(tpl, Duration::from_secs(10)).ok()?;
        parts
            .iter()
            .all(|p| {
                let high = c
                    .fetch_watermarks(&topic, *p, Duration::from_secs(10))
                    .map(|(_, h)| h)
                    .unwrap_or(i64::MAX);
                let done = committed
                    .find_partition(&topic, *p)
                    .and_then(|e| match e.offset() {
                        rdkafka::Offset::Offset(o) => Some(o),
                        _ => None,
                    })
                    .unwrap_or(0);
                done >= high
            })
            .then_some(())
    });
}

/// Every record of the env's `fraud-scores` topic once `n` distinct txn ids
/// are there (then a 3 s settle, so late duplicates are seen too).
pub fn read_all_scores(env: &TestEnv, n: usize, context: impl Fn() -> String) -> Vec<Record> {
    read_topic(
        &env.topic("fraud-scores"),
        Duration::from_secs(180),
        Duration::from_secs(3),
        |r| txn_counts(r).len() >= n,
        context,
    )
}

/// A redis-server of one test, with an append-only file so a stop and
/// start keeps its data (like a production Redis with persistence).
pub struct OwnRedis {
    pub port: u16,
    dir: PathBuf,
    persistence: &'static [&'static str],
    child: Option<Child>,
}

impl OwnRedis {
    pub fn start(dir: &std::path::Path) -> OwnRedis {
        OwnRedis::start_with(
            dir,
            &[
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ],
        )
    }

    /// A Redis used as a pure cache: no persistence, at most 256 MB, least
    /// recently used keys evicted (a flood's millions of scores would
    /// otherwise hold gigabytes of the shared redis-server for their TTL).
    pub fn start_cache(dir: &std::path::Path) -> OwnRedis {
        OwnRedis::start_with(
            dir,
            &[
                "--appendonly",
                "no",
                "--save",
                "",
                "--maxmemory",
                "256mb",
                "--maxmemory-policy",
                "allkeys-lru",
            ],
        )
    }

    fn start_with(dir: &std::path::Path, persistence: &'static [&'static str]) -> OwnRedis {
        std::fs::create_dir_all(dir).expect("redis dir");
        let mut r = OwnRedis {
            port: free_port(),
            dir: dir.to_path_buf(),
            persistence,
            child: None,
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts redis-server on the same port and data folder; waits for PING.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(self.persistence)
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server (the Debian package redis-server): {e}")
            });
        self.child = Some(child);
        let url = self.url();
        wait_for(
            Duration::from_secs(15),
            "the test's redis-server to answer",
            || {
                let mut c = redis::Client::open(url.as_str())
                    .ok()?
                    .get_connection()
                    .ok()?;
                redis::cmd("PING").query::<String>(&mut c).ok()
            },
        );
    }

    /// SIGTERM (redis-server flushes its append-only file) and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A log line without its colour codes.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A record's JSON payload.
pub fn json(r: &Record) -> serde_json::Value {
    serde_json::from_slice(&r.payload).expect("JSON record")
}

/// What a failing zero-duplicate test needs to say so the cause can be
/// found from CI output alone: per source partition, the offsets scored
/// twice (first and last) and when each copy was scored, then every
/// line of the scoring group's protocol (rebalance, revoke, commit),
/// warm-ups, warnings and the stop of each process. The full logs are copied to `/tmp/{name}-failed-{i}.log`.
pub fn duplicate_report(
    scores: &[Record],
    counts: &HashMap<String, usize>,
    procs: &[&RunningProcess],
    name: &str,
) -> String {
    // source partition -> (offset, scored_at) of every duplicated copy
    let mut by_part: std::collections::BTreeMap<i64, Vec<(i64, String)>> = Default::default();
    for r in scores {
        let v = json(r);
        let id = v["txn_id"].as_str().unwrap_or_default();
        if counts.get(id).copied().unwrap_or(0) > 1 {
            by_part
                .entry(v["source"]["partition"].as_i64().unwrap_or(-1))
                .or_default()
                .push((
                    v["source"]["offset"].as_i64().unwrap_or(-1),
                    v["scored_at"].to_string(),
                ));
        }
    }
    let mut out = String::from("duplicated copies by source partition:\n");
    for (p, mut copies) in by_part {
        copies.sort();
        // Per offset, the earlier copy first: split into first and second
        // scorings, each with the span of times it was scored in.
        let span = |nth: usize| {
            let mut t: Vec<&String> = copies
                .chunk_by(|x, y| x.0 == y.0)
                .filter_map(|c| c.get(nth).map(|x| &x.1))
                .collect();
            t.sort();
            match (t.first(), t.last()) {
                (Some(a), Some(b)) => format!("{a} .. {b}"),
                _ => "-".to_string(),
            }
        };
        out += &format!(
            "  partition {p}: {} copies, offsets {}..={}, first scored {}, again {}\n",
            copies.len(),
            copies[0].0,
            copies[copies.len() - 1].0,
            span(0),
            span(1)
        );
    }
    for (i, r) in procs.iter().enumerate() {
        let _ = std::fs::copy(&r.log, format!("/tmp/{name}-failed-{i}.log"));
        out += &format!("{}:\n", r.log.display());
        for l in r.log_text().lines().filter(|l| {
            l.contains("pipeline::context")
                || l.contains("warm-up:")
                || l.contains("WARN")
                || l.contains("ERROR")
                || l.contains("shutting down")
                || l.contains("stopped")
        }) {
            out += &strip_ansi(l);
            out.push('\n');
        }
    }
    out
}

/// Produces `records` (key, payload) to one partition of `topic` and waits
/// for every ack.
pub fn produce_to_partition(topic: &str, partition: i32, records: &[(String, Vec<u8>)]) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .create()
        .expect("producer");
    for (k, v) in records {
        let mut rec = BaseRecord::to(topic).partition(partition).key(k).payload(v);
        loop {
            match p.send(rec) {
                Ok(()) => break,
                Err((e, r)) => {
                    assert!(
                        matches!(
                            e,
                            rdkafka::error::KafkaError::MessageProduction(
                                rdkafka::types::RDKafkaErrorCode::QueueFull
                            )
                        ),
                        "produce: {e}"
                    );
                    rec = r;
                    p.poll(Duration::from_millis(20));
                }
            }
        }
    }
    p.flush(Duration::from_secs(120)).expect("flush");
}

/// Commits the env's group offset of `topic`/`partition` at `offset` (as
/// `kafka-consumer-groups --reset-offsets --to-offset` would, with the
/// group empty). Not at the high watermark: tansu 0.6 reports one past
/// the first offset of the last record batch (src/recs/replay.rs).
pub fn commit_offset(env: &TestEnv, topic: &str, partition: i32, offset: i64) {
    use rdkafka::consumer::CommitMode;
    let c = group_client(env);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(offset))
        .expect("offset");
    c.commit(&tpl, CommitMode::Sync).expect("commit");
    let mut asked = TopicPartitionList::new();
    asked.add_partition(topic, partition);
    let got = c
        .committed_offsets(asked, Duration::from_secs(10))
        .expect("committed offsets");
    assert_eq!(
        got.find_partition(topic, partition).map(|e| e.offset()),
        Some(rdkafka::Offset::Offset(offset)),
        "the broker did not keep the commit"
    );
}

/// The scores scored (`scored_at`) within `window` (ms), split by source
/// partition: those of `paused` partitions as (partition, scored_at), and
/// how many of the others there were.
pub fn scored_in_window(
    scores: &[Record],
    window: std::ops::RangeInclusive<i64>,
    paused: impl Fn(i64) -> bool,
) -> (Vec<(i64, i64)>, usize) {
    let mut in_paused = Vec::new();
    let mut others = 0;
    for r in scores {
        let v = json(r);
        let at = v["scored_at"].as_i64().expect("scored_at");
        let p = v["source"]["partition"].as_i64().expect("source partition");
        if window.contains(&at) {
            if paused(p) {
                in_paused.push((p, at));
            } else {
                others += 1;
            }
        }
    }
    (in_paused, others)
}
