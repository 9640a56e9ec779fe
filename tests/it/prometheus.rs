//! The shipped Prometheus config and alert rules against a real Prometheus
//! (Debian package `prometheus`) scraping a running streamscore fed by the
//! real broker: promtool accepts both files, every alert expression returns
//! data, and an alert goes pending/firing when scoring stops.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::util::*;

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run promtool (Debian package prometheus): {e}"));
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// GET over HTTP/1.0 (no chunked bodies); None unless 200.
fn get(host: &str, path_and_query: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path_and_query} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    head.lines()
        .next()?
        .contains(" 200 ")
        .then(|| body.to_string())
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query's result vector (None while Prometheus is not up).
fn query(host: &str, q: &str) -> Option<Vec<serde_json::Value>> {
    let body = get(host, &format!("/api/v1/query?query={}", encode(q)))?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    assert_eq!(v["status"], "success", "query {q}: {v}");
    v["data"]["result"].as_array().cloned()
}

/// The expression without its final threshold comparison: what it measures.
fn measured(expr: &str) -> String {
    let e = expr.trim();
    match e.rfind(" > ") {
        Some(i) => e[..i].trim().to_string(),
        None => e.to_string(),
    }
}

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn alert_rules_evaluate_on_real_data_and_fire_when_scoring_stops() {
    let root = root();
    promtool(&[
        "check",
        "config",
        root.join("config/prometheus.yml").to_str().unwrap(),
    ]);
    promtool(&[
        "check",
        "rules",
        root.join("config/alerts.yml").to_str().unwrap(),
    ]);

    let env = TestEnv::new("prom", "");
    let txns = live_txns(41, 6_000, 1_000, 50, 20.0);
    let mut records = keyed_records(&txns);
    records.push(("bad".into(), b"not json".to_vec()));
    let feeder = spawn_feeder(env.topic("transactions"), records, 300);
    let mut run = env.spawn_run_with(
        "prom",
        env.http_port,
        &[("STREAMSCORE__RECS__REBUILD_INTERVAL", "2s")],
    );

    // A test copy of the rules: evaluated at once (for: 0s) and a stale
    // threshold of 5 s instead of 5 min, so stopping the stream fires it.
    let text = std::fs::read_to_string(root.join("config/alerts.yml")).expect("alerts.yml");
    let mut rules: serde_yaml::Value = serde_yaml::from_str(&text).expect("alerts.yml is YAML");
    let mut exprs = Vec::new();
    for rule in rules["groups"][0]["rules"]
        .as_sequence_mut()
        .expect("rules")
    {
        let expr = rule["expr"].as_str().expect("expr").to_string();
        exprs.push((
            rule["alert"].as_str().expect("alert").to_string(),
            expr.clone(),
        ));
        rule["for"] = "0s".into();
        if rule["alert"] == "StreamscoreScoringStale" {
            rule["expr"] = format!("{} > 5", measured(&expr)).into();
        }
    }
    assert!(exprs.len() >= 5);
    let dir = env.dir.path();
    std::fs::write(
        dir.join("alerts.yml"),
        serde_yaml::to_string(&rules).unwrap(),
    )
    .unwrap();
    let port = free_port();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - alerts.yml\n\
             scrape_configs:\n  - job_name: streamscore\n    static_configs:\n      - targets: [\"127.0.0.1:{}\"]\n",
            env.http_port
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let _prom = Prometheus(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start prometheus (Debian package prometheus): {e}")),
    );
    let host = format!("127.0.0.1:{port}");
    wait_for(
        Duration::from_secs(60),
        "Prometheus to scrape streamscore",
        || {
            let r = query(&host, "streamscore_events_scored_total > 1000")?;
            (!r.is_empty()).then_some(())
        },
    );

    // Every dashboard query, and what every alert rule measures, returns
    // data (read from the shipped files, none written here).
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("config/grafana/dashboards/streamscore.json"))
            .expect("dashboard"),
    )
    .expect("dashboard JSON");
    let mut queries: Vec<(String, String)> = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            queries.push((title, t["expr"].as_str().expect("expr").to_string()));
        }
    }
    assert!(queries.len() >= 15, "{} dashboard queries", queries.len());
    queries.extend(exprs.iter().map(|(n, e)| (n.clone(), measured(e))));
    for (name, m) in &queries {
        wait_for(
            Duration::from_secs(90),
            &format!("{name}: `{m}` to return data"),
            || {
                let r = query(&host, m)?;
                (!r.is_empty()).then_some(())
            },
        );
    }

    // Stop the stream: scoring goes stale and the alert fires.
    feeder.join().expect("feeder");
    wait_for(
        Duration::from_secs(60),
        "StreamscoreScoringStale to go pending or firing",
        || {
            let body = get(&host, "/api/v1/alerts")?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            v["data"]["alerts"]
                .as_array()?
                .iter()
                .any(|a| {
                    a["labels"]["alertname"] == "StreamscoreScoringStale"
                        && (a["state"] == "firing" || a["state"] == "pending")
                })
                .then_some(())
        },
    );
    let st = run.terminate(Duration::from_secs(30));
    assert!(st.success(), "exit {st:?}; log:\n{}", run.log_text());
}
