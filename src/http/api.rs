//! The `/v1` API (docs/openapi.yaml; docs/SERVING.md explains it):
//!
//! - `GET /v1/recommendations/{user_id}?k=20`: the batch candidates of the
//!   current generation re-ranked by the user's live session
//!   ([`crate::recs::hybrid`]), the popular list for unknown users;
//! - `POST /v1/score`: scores one transaction against the current windows,
//!   read-only (the stream is the only writer of the windows);
//! - `GET /v1/features/users/{id}`, `/v1/features/merchants/{id}`: the
//!   current window values, computed by the scoring code.
//!
//! Every error is a JSON body `{"error": code, "message": text}` with a
//! 4xx/5xx status; no input can panic a handler (bodies and parameters are
//! parsed by hand, with the same validation as the stream).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::json;
use tokio::sync::OnceCell;

use crate::config::Config;
use crate::events::{parse_transaction, InteractionKind, Limits, Reason};
use crate::features::{FeatureEngine, Features, WindowView};
use crate::metrics::Metrics;
use crate::model::FraudModel;
use crate::pipeline::output::Decision;
use crate::recs::hybrid::{self, ServedSource};
use crate::recs::publish::Meta;
use crate::recs::{store, Scored};
use crate::sessions::{SessionItem, SessionStore};

/// Most session items whose neighbour lists a request reads.
const MAX_SESSION_ITEMS: usize = 20;

/// What the API answers from: the processor's own state.
pub struct Api {
    pub cfg: Config,
    pub engine: Arc<FeatureEngine>,
    pub model: Arc<FraudModel>,
    pub sessions: Arc<SessionStore>,
    /// The replicated merchant-features table (merchant features and views).
    pub table: Arc<crate::merchants::MerchantTable>,
    pub metrics: Metrics,
    redis: OnceCell<redis::aio::ConnectionManager>,
    /// `recs:meta`, re-read at most every [`META_MAX_AGE`] (one Redis round
    /// trip per request instead of two).
    meta: std::sync::RwLock<Option<(Instant, Meta)>>,
}

/// How long a read of `recs:meta` is reused. A rebuild keeps the previous
/// generation's fields until the next one, so a reader a second behind
/// still finds whole data; a new generation is served within this.
const META_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

impl Api {
    pub fn new(
        cfg: Config,
        engine: Arc<FeatureEngine>,
        model: Arc<FraudModel>,
        sessions: Arc<SessionStore>,
        table: Arc<crate::merchants::MerchantTable>,
        metrics: Metrics,
    ) -> Api {
        Api {
            cfg,
            engine,
            model,
            sessions,
            table,
            metrics,
            redis: OnceCell::new(),
            meta: std::sync::RwLock::new(None),
        }
    }

    /// The shared Redis connection, connected on first use (a failed
    /// connect is retried by the next request; once connected, the manager
    /// reconnects by itself).
    async fn redis(&self) -> Result<redis::aio::ConnectionManager, ApiError> {
        let url = self.cfg.redis.url.clone();
        let timeout = self.cfg.serving.redis_timeout;
        self.redis
            .get_or_try_init(|| async move {
                let client = redis::Client::open(url.as_str())
                    .map_err(|e| ApiError::unavailable(format!("redis.url: {e}")))?;
                let cfg = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(timeout.max(std::time::Duration::from_millis(500)))
                    .set_response_timeout(timeout);
                redis::aio::ConnectionManager::new_with_config(client, cfg)
                    .await
                    .map_err(|e| ApiError::unavailable(format!("connecting to Redis: {e}")))
            })
            .await
            .cloned()
    }
}

impl Api {
    fn cached_meta(&self) -> Option<Meta> {
        let c = self.meta.read().ok()?;
        let (at, m) = c.as_ref()?;
        (at.elapsed() < META_MAX_AGE).then(|| m.clone())
    }
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    fn unavailable(message: String) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
    pub fn method_not_allowed() -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this path does not take that method; see docs/openapi.yaml",
        )
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": self.code, "message": self.message})),
        )
            .into_response()
    }
}

/// An id from the path: non-empty, at most 256 bytes (ids are keys of
/// Redis and of the window stores).
fn check_id(what: &str, id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 256 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            format!("{what} must be 1 to 256 bytes"),
        ));
    }
    Ok(())
}

/// Parses an optional integer query parameter.
fn int_param(q: &HashMap<String, String>, name: &str) -> Result<Option<i64>, ApiError> {
    q.get(name)
        .map(|v| {
            v.parse::<i64>().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_parameter",
                    format!("{name} must be an integer, got {v:?}"),
                )
            })
        })
        .transpose()
}

/// `GET /v1/recommendations/{user_id}` answer.
#[derive(Debug, Serialize)]
pub struct RecsResponse {
    pub user_id: String,
    pub items: Vec<Scored>,
    pub source: ServedSource,
    /// Generation of the batch candidates used (null: none published yet).
    pub generation: Option<u64>,
    pub built_at: Option<i64>,
    /// Seconds since that generation was built.
    pub age_seconds: Option<f64>,
    /// Interactions in the user's live session.
    pub session_items: usize,
}

fn kind_weight(cfg: &Config, k: InteractionKind) -> f64 {
    match k {
        InteractionKind::View => cfg.recs.weight_view,
        InteractionKind::Click => cfg.recs.weight_click,
        InteractionKind::AddToCart => cfg.recs.weight_add_to_cart,
        InteractionKind::Purchase => cfg.recs.weight_purchase,
    }
}

/// The session's distinct items (most recent first, at most
/// [`MAX_SESSION_ITEMS`]) with summed kind weights, and what was bought.
fn session_signal(cfg: &Config, items: &[SessionItem]) -> (Vec<(String, f64)>, HashSet<String>) {
    let mut order: Vec<String> = Vec::new();
    let mut weights: HashMap<&str, f64> = HashMap::new();
    let mut bought = HashSet::new();
    for it in items.iter().rev() {
        if it.kind == InteractionKind::Purchase {
            bought.insert(it.item_id.clone());
        }
        let w = weights.entry(&it.item_id).or_insert_with(|| {
            order.push(it.item_id.clone());
            0.0
        });
        *w += kind_weight(cfg, it.kind);
    }
    order.truncate(MAX_SESSION_ITEMS);
    let signal = order
        .into_iter()
        .map(|i| {
            let w = weights.get(i.as_str()).copied().unwrap_or(0.0);
            (i, w)
        })
        .collect();
    (signal, bought)
}

pub async fn recommendations(
    State(api): State<Arc<Api>>,
    Path(user_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<RecsResponse>, ApiError> {
    check_id("user_id", &user_id)?;
    let k = match int_param(&q, "k")? {
        None => api.cfg.recs.top_k,
        Some(k) if k >= 1 && k as u64 <= api.cfg.serving.max_k as u64 => k as usize,
        Some(k) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_parameter",
                format!("k must be between 1 and {}, got {k}", api.cfg.serving.max_k),
            ))
        }
    };
    let session = api.sessions.get(&user_id);
    let (signal, bought) = session_signal(&api.cfg, &session);
    let mut con = api.redis().await?;
    let items: Vec<&str> = signal.iter().map(|(i, _)| i.as_str()).collect();
    let prefix = api.cfg.redis.key_prefix.clone();
    let current = tokio::time::timeout(api.cfg.serving.redis_timeout, async {
        let meta = match api.cached_meta() {
            Some(m) => Some(m),
            None => {
                let m = store::read_meta(&mut con, &prefix).await?;
                if let (Some(m), Ok(mut c)) = (&m, api.meta.write()) {
                    *c = Some((Instant::now(), m.clone()));
                }
                m
            }
        };
        match meta {
            Some(m) => store::read_generation(&mut con, &prefix, m, &user_id, &items).await,
            None => Ok(store::Current::default()),
        }
    })
    .await
    .map_err(|_| ApiError::unavailable("Redis did not answer in time".into()))?
    .map_err(|e| ApiError::unavailable(format!("{e:#}")))?;
    let (list, source) = hybrid::rank(&hybrid::Inputs {
        batch: current.user.as_ref().map(|u| u.items.as_slice()),
        popular: &current.popular,
        session: &signal,
        neighbours: &current.neighbours,
        bought: &bought,
        boost: api.cfg.serving.session_boost,
        k,
    });
    api.metrics
        .recs_served
        .with_label_values(&[source.as_str()])
        .inc();
    let now = crate::now_ms();
    Ok(Json(RecsResponse {
        user_id,
        items: list,
        source,
        generation: current.meta.as_ref().map(|m| m.generation),
        built_at: current.meta.as_ref().map(|m| m.built_at),
        age_seconds: current
            .meta
            .as_ref()
            .map(|m| (now - m.built_at).max(0) as f64 / 1000.0),
        session_items: session.len(),
    }))
}

/// `POST /v1/score` answer.
#[derive(Debug, Serialize)]
pub struct ScoreResponse {
    pub txn_id: String,
    pub user_id: String,
    pub merchant_id: String,
    pub score: f32,
    pub decision: Decision,
    pub threshold: f64,
    pub model_version: String,
    pub event_time: i64,
    pub features: Features,
    /// Time spent in the server, from the body read to the answer built.
    pub latency_ms: f64,
}

fn status_of(reason: Reason) -> (StatusCode, &'static str) {
    match reason {
        Reason::Oversize => (StatusCode::PAYLOAD_TOO_LARGE, "oversize"),
        Reason::InvalidJson => (StatusCode::BAD_REQUEST, reason.as_str()),
        other => (StatusCode::UNPROCESSABLE_ENTITY, other.as_str()),
    }
}

pub async fn score(
    State(api): State<Arc<Api>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ScoreResponse>, ApiError> {
    let started = Instant::now();
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "oversize",
                format!(
                    "request body is larger than serving.max_body_bytes ({} bytes)",
                    api.cfg.serving.max_body_bytes
                ),
            )
        } else {
            ApiError::new(e.status(), "bad_request", e.body_text())
        }
    })?;
    let mut limits = Limits::from_config(&api.cfg.processing);
    limits.max_message_bytes = api.cfg.serving.max_body_bytes;
    let t = parse_transaction(&body, crate::now_ms(), &limits).map_err(|rej| {
        let (status, code) = status_of(rej.reason);
        ApiError::new(status, code, rej.detail)
    })?;
    // The stream's code: user windows here, merchant windows from the table.
    let mut features = api.engine.user_features_only(&t);
    api.table.fill(&t.merchant_id, t.event_time, &mut features);
    if !features.all_finite() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            Reason::NonFiniteFeature.as_str(),
            format!("features of {} are not all finite", t.txn_id),
        ));
    }
    let score = api
        .model
        .score(&[features])
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "model_error",
                format!("{e:#}"),
            )
        })?
        .first()
        .copied()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "model_error",
                "the model returned no score",
            )
        })?;
    let threshold = api.cfg.model.threshold;
    Ok(Json(ScoreResponse {
        decision: Decision::at(score, threshold),
        txn_id: t.txn_id,
        user_id: t.user_id,
        merchant_id: t.merchant_id,
        score,
        threshold,
        model_version: api.model.version().to_string(),
        event_time: t.event_time,
        features,
        latency_ms: started.elapsed().as_secs_f64() * 1000.0,
    }))
}

/// Named window values of a user (indices of [`crate::features::FEATURE_NAMES`]).
const USER_FIELDS: [(&str, usize); 10] = [
    ("txn_count_1m", 2),
    ("amount_sum_1m", 3),
    ("txn_count_1h", 4),
    ("amount_sum_1h", 5),
    ("txn_count_24h", 6),
    ("amount_sum_24h", 7),
    ("distinct_merchants_1h", 8),
    ("seconds_since_last_txn", 9),
    ("amount_mean_24h", 10),
    ("amount_std_24h", 11),
];

pub const MERCHANT_FIELDS: [(&str, usize); 5] = [
    ("txn_count_1h", 15),
    ("amount_mean_1h", 16),
    ("txn_count_24h", 17),
    ("amount_mean_24h", 18),
    ("distinct_users_1h", 19),
];

/// One window view: which store, its id field, its named values.
struct View {
    what: &'static str,
    id_field: &'static str,
    fields: &'static [(&'static str, usize)],
    read: fn(&Api, &str, Option<i64>) -> Option<WindowView>,
}

const USER_VIEW: View = View {
    what: "user",
    id_field: "user_id",
    fields: &USER_FIELDS,
    read: |api, id, at| api.engine.user_view(id, at),
};

const MERCHANT_VIEW: View = View {
    what: "merchant",
    id_field: "merchant_id",
    fields: &MERCHANT_FIELDS,
    read: |api, id, at| api.table.view(id, at),
};

fn feature_view(
    api: &Api,
    v: &View,
    id: &str,
    q: &HashMap<String, String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_id(&format!("{} id", v.what), id)?;
    let at = int_param(q, "at")?;
    let view = (v.read)(api, id, at)
        .ok_or_else(|| ApiError::not_found(format!("no window state for {} {id:?}", v.what)))?;
    let mut values = serde_json::Map::new();
    for (name, i) in v.fields {
        values.insert((*name).into(), json!(view.features.0[*i]));
    }
    let mut m = serde_json::Map::new();
    m.insert(v.id_field.into(), json!(id));
    m.insert("as_of".into(), json!(view.as_of));
    m.insert("last_event_time".into(), json!(view.last_event_time));
    m.insert("features".into(), serde_json::Value::Object(values));
    Ok(Json(serde_json::Value::Object(m)))
}

pub async fn user_features(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    feature_view(&api, &USER_VIEW, &id, &q)
}

pub async fn merchant_features(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    feature_view(&api, &MERCHANT_VIEW, &id, &q)
}
