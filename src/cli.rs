//! Command line: process behaviour (config path, log format) lives here;
//! pipeline behaviour lives in the config file.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// streamscore: real-time fraud scoring and recommendations on a Kafka log.
///
/// The Kafka log is the single source of truth. `run` consumes
/// `transactions`, keeps per-user and per-merchant windows on event time,
/// scores every transaction with an ONNX model and publishes the score to
/// the `fraud-scores` topic and Redis. Bad input goes to `dead-letter`.
///
/// A first session, with a broker on 127.0.0.1:9092 and Redis on 6379:
///
///   streamscore topics apply
///   streamscore run &
///   streamscore generate --rate 200 --duration 60s
///   streamscore watch
#[derive(Debug, Parser)]
#[command(name = "streamscore", version, verbatim_doc_comment)]
pub struct Cli {
    /// Config file (TOML); every key is documented in config/streamscore.toml.
    /// Without it, built-in defaults apply; STREAMSCORE__SECTION__KEY
    /// environment variables override both.
    #[arg(long, short, global = true, env = "STREAMSCORE_CONFIG")]
    pub config: Option<PathBuf>,

    /// Log format.
    #[arg(
        long,
        global = true,
        env = "STREAMSCORE_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Score transactions in stream until SIGTERM/Ctrl-C (then drain, commit, exit 0).
    ///
    /// Serves /metrics and /healthz on http.bind. Offsets are committed only
    /// after each event's score is acknowledged by Kafka; a Redis writer
    /// follows fraud-scores into Redis.
    Run,
    /// Rebuild recommendation candidates from the whole interactions log and
    /// publish them as the next generation (recommendations topic, Redis).
    ///
    /// Reads every partition from the beginning up to the end offsets taken
    /// at start, with a consumer that never commits; prints progress (events,
    /// events/s, ETA) to stderr and the new recs:meta as JSON to stdout. The
    /// same log range gives the same candidates (see the digest).
    Rebuild,
    /// Measure recommendation quality on the interactions log: hold out each
    /// user's last interaction, build on the rest, report recall@K and
    /// NDCG@K of the candidates and of the popularity list (JSON).
    EvalRecs,
    /// Create or check the topics of topics/topics.toml.
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// Produce synthetic transactions with labelled fraud patterns.
    ///
    /// With --rate, event times are the wall clock (live traffic); without,
    /// events are produced as fast as possible with simulated times ending now.
    /// --output writes JSON lines to a file instead of Kafka.
    Generate(GenerateArgs),
    /// Feature tooling for model training.
    #[command(subcommand)]
    Features(FeaturesCommand),
    /// Follow fraud-scores and print a live summary every second.
    Watch(WatchArgs),
    /// Load and validate the configuration, print it (secrets masked), exit.
    CheckConfig,
}

#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// Create missing topics, report existing ones; exit 3 if a topic's
    /// partition count differs from its definition. Idempotent.
    Apply {
        /// Definitions file; default: the topics/topics.toml built into the binary.
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum FeaturesCommand {
    /// Compute the features of a transaction stream (JSON lines, log order)
    /// with the very window code of `run`, and write CSV for training.
    Export {
        /// Input: JSON lines of transactions (e.g. from `generate --output`).
        #[arg(long)]
        input: PathBuf,
        /// Output CSV: txn_id, event_time, label, pattern, then every feature.
        #[arg(long)]
        output: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Number of transactions (default: unlimited with --rate or --duration, else 10000).
    #[arg(long)]
    pub count: Option<u64>,
    /// Events per second (wall clock); 0 = as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Stop after this long (e.g. 60s, 5m).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<std::time::Duration>,
    /// Distinct users.
    #[arg(long, default_value_t = 50_000)]
    pub users: usize,
    /// Distinct merchants.
    #[arg(long, default_value_t = 2_000)]
    pub merchants: usize,
    /// Seed: the same seed gives the same events.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Share of fraudulent transactions.
    #[arg(long, default_value_t = 0.01)]
    pub fraud_rate: f64,
    /// Mean simulated gap between events in ms (without --rate).
    #[arg(long, default_value_t = 100.0)]
    pub mean_gap_ms: f64,
    /// First simulated event time, epoch ms (without --rate; default: so the
    /// last event is about now).
    #[arg(long)]
    pub start_ms: Option<i64>,
    /// Also produce this many interactions per transaction (0..).
    #[arg(long, default_value_t = 0.0)]
    pub interactions_per_txn: f64,
    /// Every Nth message is malformed (a different defect each time), to
    /// exercise the dead-letter path; 0 = never.
    #[arg(long, default_value_t = 0)]
    pub malformed_every: u64,
    /// Write JSON lines here instead of producing to Kafka.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// With --output: also write the interactions, as JSON lines, here.
    #[arg(long, requires = "output")]
    pub interactions_output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Stop after this long (default: until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<std::time::Duration>,
}
