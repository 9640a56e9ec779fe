//! The command line against the real broker: topics apply, and start-up
//! failures that must name their cause.

use super::util::*;

fn output_of(cmd: &mut std::process::Command) -> (i32, String, String) {
    let out = cmd.output().expect("run streamscore");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn topics_apply_is_idempotent_and_reports_a_partition_mismatch() {
    // TestEnv::new already applied once: this is the second run.
    let env = TestEnv::new("topics", "");
    let (code, out, err) = output_of(&mut env.command(&["topics", "apply"]));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.matches("exists").count(), 7, "{out}");
    assert!(!out.contains("created"), "{out}");

    // A definition that disagrees with the broker is reported, exit 3.
    let text = streamscore::topics::BUILTIN.replacen("partitions = 4", "partitions = 2", 1);
    let file = env.dir.path().join("topics.toml");
    std::fs::write(&file, text).unwrap();
    let (code, out, _) =
        output_of(&mut env.command(&["topics", "apply", "--file", file.to_str().unwrap()]));
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains(&format!("MISMATCH {}", env.topic("transactions"))),
        "{out}"
    );
    assert!(
        out.contains("4 partitions on the broker, 2 declared"),
        "{out}"
    );
}

#[test]
fn bad_configs_stop_start_up_with_exit_2_and_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    for (text, needle) in [
        ("[processing]\nbatch_max_evnts = 3\n", "batch_max_evnts"),
        ("[model]\nthreshold = 2.0\n", "model.threshold"),
        ("[windows]\nhour_bucket = \"7m\"\n", "windows.hour_bucket"),
        ("[http]\nbind = \"nowhere\"\n", "bind"),
        // librdkafka's own options, checked by librdkafka at load.
        (
            "[kafka.producer]\n\"compression.type\" = \"zstd\"\n",
            "kafka.producer.\"compression.type\"",
        ),
        (
            "[kafka.common]\n\"socket.timeout.mss\" = \"100\"\n",
            "kafka.common.\"socket.timeout.mss\"",
        ),
        ("[recs]\ncompression = \"brotli\"\n", "compression"),
    ] {
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        let (code, out, err) = output_of(
            std::process::Command::new(bin())
                .arg("--config")
                .arg(&p)
                .arg("run"),
        );
        assert_eq!(code, 2, "{text}: {out}{err}");
        assert!(
            err.contains(needle),
            "{text}: stderr does not name {needle}: {err}"
        );
    }
    let (code, _, err) = output_of(
        std::process::Command::new(bin())
            .args(["run"])
            .env("STREAMSCORE__KAFKA__BROKRS", "x"),
    );
    assert_eq!(code, 2);
    assert!(err.contains("brokrs"), "{err}");
}

#[test]
fn model_that_does_not_match_its_signature_stops_start_up() {
    let env = TestEnv::new("badmodel", "");
    let sig = env.dir.path().join("sig.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("models/fraud.json")).unwrap())
            .unwrap();
    v["features"].as_array_mut().unwrap().pop();
    std::fs::write(&sig, v.to_string()).unwrap();
    let (code, _, err) = output_of(
        env.command(&["run"])
            .env("STREAMSCORE__MODEL__SIGNATURE", sig.to_str().unwrap()),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("does not match its signature"), "{err}");
    assert!(err.contains("19 features"), "{err}");
}

#[test]
fn missing_topics_stop_start_up_pointing_at_topics_apply() {
    let env = TestEnv::new("notopics", "");
    let (code, _, err) = output_of(
        env.command(&["run"])
            .env("STREAMSCORE__KAFKA__TOPIC_PREFIX", unique("absent")),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("streamscore topics apply"), "{err}");
}

#[test]
fn generate_is_deterministic_with_a_seed() {
    let dir = tempfile::tempdir().unwrap();
    let mut outs = Vec::new();
    for name in ["a", "b"] {
        let p = dir.path().join(name);
        let st = std::process::Command::new(bin())
            .args([
                "generate",
                "--count",
                "2000",
                "--seed",
                "9",
                "--start-ms",
                "1764000000000",
            ])
            .arg("--output")
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success());
        outs.push(std::fs::read(&p).unwrap());
    }
    assert_eq!(outs[0], outs[1]);
    assert_eq!(outs[0].iter().filter(|b| **b == b'\n').count(), 2000);
}

#[test]
fn a_rebuild_that_cannot_reach_redis_stops_before_the_replay() {
    let env = TestEnv::new("rebuild-noredis", "");
    let start = streamscore::now_ms() - 100_000;
    let events: Vec<_> = streamscore::generate::InteractionGenerator::new(3, 50, 100, start, 100.0)
        .take(500)
        .collect();
    produce_all(&env.topic("interactions"), &interaction_records(&events));
    let (code, out, err) = output_of(
        env.command(&["rebuild"])
            // Nothing listens on port 1.
            .env("STREAMSCORE__REDIS__URL", "redis://127.0.0.1:1"),
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("before the replay"), "{err}");
    assert!(err.contains("Redis"), "{err}");
    // The log was not read: no progress line.
    assert!(!err.contains("events replayed"), "{err}");
}
