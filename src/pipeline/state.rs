//! What `run` shares with the HTTP side: readiness flags and the state the
//! `/v1` API reads.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::config::Config;
use crate::features::{FeatureEngine, WindowSpec};
use crate::model::FraudModel;

/// Shared liveness/readiness flags, read by `/healthz` and `/readyz`.
#[derive(Debug, Default)]
pub struct Health {
    /// Subscribed and processing.
    pub running: AtomicBool,
    /// Rebuilding a partition's windows from the log.
    pub warming: AtomicBool,
    /// Rebuilding a partition's sessions from the log.
    pub sessions_warming: Arc<AtomicBool>,
    /// Rebuilding a partition's merchant windows (merchant stage).
    pub merchants_warming: Arc<AtomicBool>,
}

/// The state `run` keeps and the `/v1` API reads: window stores, the
/// model, the live sessions.
#[derive(Clone)]
pub struct Shared {
    pub engine: Arc<FeatureEngine>,
    pub model: Arc<FraudModel>,
    pub sessions: Arc<crate::sessions::SessionStore>,
    /// The replicated merchant-features table the stream scores with.
    pub table: Arc<crate::merchants::MerchantTable>,
}

impl Shared {
    /// Loads the model (checking its signature) and creates empty stores.
    pub fn load(cfg: &Config) -> anyhow::Result<Shared> {
        let model = FraudModel::load(&cfg.model.path, &cfg.model.signature)?;
        Ok(Shared {
            engine: Arc::new(FeatureEngine::new(WindowSpec::from(&cfg.windows))),
            model: Arc::new(model),
            sessions: Arc::new(crate::sessions::SessionStore::new(&cfg.sessions)),
            table: Arc::new(crate::merchants::MerchantTable::new(WindowSpec::from(
                &cfg.windows,
            ))),
        })
    }
}
