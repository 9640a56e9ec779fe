//! The `streamscore` binary: parses the command line, loads the config,
//! sets up logging and signals, and maps errors to exit codes
//! (1: runtime failure, 2: bad configuration or usage, 3: topic mismatch).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use streamscore::cli::{Cli, Command, FeaturesCommand, LogFormat, TopicsCommand};
use streamscore::config::Config;
use streamscore::{commands, http, metrics, pipeline};

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Cancels `token` on the first SIGTERM/Ctrl-C; exits at once on the second.
fn spawn_signal_handler(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot install SIGTERM handler");
                    return;
                }
            };
        for n in 0..2 {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
            if n == 0 {
                tracing::info!("shutting down (signal again to exit at once)");
                token.cancel();
            } else {
                tracing::warn!("second signal: exiting without draining");
                std::process::exit(130);
            }
        }
    });
}

async fn real_main(cli: Cli, cfg: Config) -> anyhow::Result<i32> {
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    match cli.command {
        Command::Run => {
            let metrics = metrics::Metrics::new();
            let health = Arc::new(pipeline::Health::default());
            let shared = pipeline::Shared::load(&cfg)?;
            let api = Arc::new(http::api::Api::new(
                cfg.clone(),
                shared.engine.clone(),
                shared.model.clone(),
                shared.sessions.clone(),
                shared.table.clone(),
                metrics.clone(),
            ));
            let server = http::serve(
                cfg.http.bind,
                cfg.serving.threads,
                cfg.serving.nice,
                metrics.clone(),
                health.clone(),
                Some(api),
                shutdown.clone(),
            )?;
            let r = pipeline::run(cfg, metrics, health, shared, shutdown.clone()).await;
            shutdown.cancel();
            let _ = tokio::time::timeout(
                Duration::from_secs(3),
                tokio::task::spawn_blocking(move || server.join()),
            )
            .await;
            r.map(|()| 0)
        }
        Command::Rebuild => commands::rebuild(&cfg).await.map(|()| 0),
        Command::EvalRecs => commands::eval_recs(&cfg).await.map(|()| 0),
        Command::Topics(TopicsCommand::Apply { file }) => {
            commands::topics_apply(&cfg, file.as_deref()).await
        }
        Command::Generate(args) => commands::generate(&cfg, &args, shutdown).await.map(|()| 0),
        Command::Features(FeaturesCommand::Export { input, output }) => {
            let rows = commands::export_features(&cfg, &input, &output)?;
            eprintln!(
                "features export: {rows} rows written to {}",
                output.display()
            );
            Ok(0)
        }
        Command::Watch(args) => commands::watch(&cfg, args.duration, shutdown)
            .await
            .map(|()| 0),
        Command::CheckConfig => {
            println!("{cfg:#?}");
            Ok(0)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let cfg = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("streamscore: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("streamscore: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(real_main(cli, cfg)) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("streamscore: {e:#}");
            ExitCode::from(1)
        }
    }
}
