//! Input events and their validation.
//!
//! Parsing is one typed serde pass on the happy path (interactions in
//! their plain form take a faster scan first, `fast.rs`); only a message
//! that fails is looked at again to name the reason. Every rejection carries a
//! [`Reason`] (a bounded set: it is a metric label) and a human detail, and
//! goes to the dead-letter topic with the raw bytes.

use serde::{Deserialize, Serialize};

mod fast;

/// Earliest event time accepted: 2000-01-01T00:00:00Z, in epoch ms. Anything
/// before is a unit mistake (seconds for milliseconds) or garbage.
pub const MIN_EVENT_TIME_MS: i64 = 946_684_800_000;

/// A payment event on the `transactions` topic (schemas/transaction.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transaction {
    pub txn_id: String,
    pub user_id: String,
    pub merchant_id: String,
    pub amount: f64,
    pub currency: String,
    /// ISO 3166 alpha-2 country where the payment was made.
    pub country: String,
    pub device_id: String,
    /// Event time, epoch milliseconds.
    pub event_time: i64,
    /// Ground truth injected by `streamscore generate` (the fraud pattern, or
    /// absent); never read by the scoring path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraud_pattern: Option<String>,
}

/// An [`Interaction`] borrowing its text from the message: the rebuild's
/// replay parses millions, and a field without escapes costs no allocation.
#[derive(Debug, Deserialize)]
pub struct InteractionRef<'a> {
    #[serde(borrow)]
    pub event_id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub user_id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub item_id: std::borrow::Cow<'a, str>,
    pub kind: InteractionKind,
    pub event_time: i64,
}

impl InteractionRef<'_> {
    pub fn into_owned(self) -> Interaction {
        Interaction {
            event_id: self.event_id.into_owned(),
            user_id: self.user_id.into_owned(),
            item_id: self.item_id.into_owned(),
            kind: self.kind,
            event_time: self.event_time,
        }
    }
}

/// Kind of an interaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InteractionKind {
    View,
    Click,
    AddToCart,
    Purchase,
}

/// A user/item event on the `interactions` topic (schemas/interaction.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interaction {
    pub event_id: String,
    pub user_id: String,
    pub item_id: String,
    pub kind: InteractionKind,
    pub event_time: i64,
}

/// Largest accepted amount (10^12 in any currency). Larger values are input
/// errors, and they would overflow the windows' f32 sums of squares: one
/// such event folded in made every later feature of its user infinite (found
/// by the poison-flood test).
pub const MAX_AMOUNT: f64 = 1e12;

/// Why an input was rejected. A closed set: used as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Oversize,
    InvalidJson,
    MissingField,
    WrongType,
    EmptyField,
    InvalidAmount,
    InvalidTimestamp,
    InvalidValue,
    NonFiniteFeature,
}

impl Reason {
    /// All reasons, for pre-registering metric labels.
    pub const ALL: [Reason; 9] = [
        Reason::Oversize,
        Reason::InvalidJson,
        Reason::MissingField,
        Reason::WrongType,
        Reason::EmptyField,
        Reason::InvalidAmount,
        Reason::InvalidTimestamp,
        Reason::InvalidValue,
        Reason::NonFiniteFeature,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Oversize => "oversize",
            Reason::InvalidJson => "invalid_json",
            Reason::MissingField => "missing_field",
            Reason::WrongType => "wrong_type",
            Reason::EmptyField => "empty_field",
            Reason::InvalidAmount => "invalid_amount",
            Reason::InvalidTimestamp => "invalid_timestamp",
            Reason::InvalidValue => "invalid_value",
            Reason::NonFiniteFeature => "non_finite_feature",
        }
    }
}

/// A rejected input: the reason code and what exactly was wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {detail}", reason.as_str())]
pub struct Rejection {
    pub reason: Reason,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: detail.into(),
        }
    }
}

/// Limits a validator applies.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_message_bytes: usize,
    /// Latest accepted event time relative to now, in ms.
    pub max_future_skew_ms: i64,
}

impl Limits {
    /// The limits `[processing]` configures.
    pub fn from_config(p: &crate::config::ProcessingConfig) -> Limits {
        Limits {
            max_message_bytes: p.max_message_bytes,
            max_future_skew_ms: p.max_future_skew.as_millis() as i64,
        }
    }

    /// The same limits without the future-time check, for re-reading events
    /// from the log: they were accepted (or rejected) when first read, and
    /// "now" then is not "now" at replay.
    pub fn for_replay(self) -> Limits {
        Limits {
            max_future_skew_ms: i64::MAX / 4,
            ..self
        }
    }
}

fn classify(e: &serde_json::Error) -> Reason {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => Reason::InvalidJson,
        Category::Data => {
            let msg = e.to_string();
            if msg.starts_with("missing field") {
                Reason::MissingField
            } else if msg.starts_with("invalid type") {
                Reason::WrongType
            } else {
                Reason::InvalidValue
            }
        }
    }
}

fn check_time(event_time: i64, now_ms: i64, limits: &Limits) -> Result<(), Rejection> {
    if event_time < MIN_EVENT_TIME_MS {
        return Err(Rejection::new(
            Reason::InvalidTimestamp,
            format!("event_time {event_time} is before 2000-01-01 (epoch milliseconds expected)"),
        ));
    }
    if event_time > now_ms.saturating_add(limits.max_future_skew_ms) {
        return Err(Rejection::new(
            Reason::InvalidTimestamp,
            format!(
                "event_time {event_time} is more than {} ms in the future",
                limits.max_future_skew_ms
            ),
        ));
    }
    Ok(())
}

fn check_non_empty(fields: &[(&str, &str)]) -> Result<(), Rejection> {
    for (name, value) in fields {
        if value.trim().is_empty() {
            return Err(Rejection::new(
                Reason::EmptyField,
                format!("field `{name}` is empty"),
            ));
        }
    }
    Ok(())
}

fn check_size(raw: &[u8], limits: &Limits) -> Result<(), Rejection> {
    if raw.len() > limits.max_message_bytes {
        return Err(Rejection::new(
            Reason::Oversize,
            format!(
                "message is {} bytes, limit {}",
                raw.len(),
                limits.max_message_bytes
            ),
        ));
    }
    Ok(())
}

/// Parses and validates a transaction; `now_ms` is wall-clock now.
pub fn parse_transaction(
    raw: &[u8],
    now_ms: i64,
    limits: &Limits,
) -> Result<Transaction, Rejection> {
    check_size(raw, limits)?;
    let t: Transaction =
        serde_json::from_slice(raw).map_err(|e| Rejection::new(classify(&e), e.to_string()))?;
    check_non_empty(&[
        ("txn_id", &t.txn_id),
        ("user_id", &t.user_id),
        ("merchant_id", &t.merchant_id),
        ("currency", &t.currency),
        ("country", &t.country),
        ("device_id", &t.device_id),
    ])?;
    if !t.amount.is_finite() || !(0.0..=MAX_AMOUNT).contains(&t.amount) {
        return Err(Rejection::new(
            Reason::InvalidAmount,
            format!(
                "amount {} must be a finite number between 0 and {MAX_AMOUNT:e}",
                t.amount
            ),
        ));
    }
    check_time(t.event_time, now_ms, limits)?;
    Ok(t)
}

/// Parses and validates an interaction; `now_ms` is wall-clock now.
pub fn parse_interaction(
    raw: &[u8],
    now_ms: i64,
    limits: &Limits,
) -> Result<Interaction, Rejection> {
    parse_interaction_ref(raw, now_ms, limits).map(InteractionRef::into_owned)
}

/// [`parse_interaction`] without copying the text fields out of `raw`.
pub fn parse_interaction_ref<'a>(
    raw: &'a [u8],
    now_ms: i64,
    limits: &Limits,
) -> Result<InteractionRef<'a>, Rejection> {
    check_size(raw, limits)?;
    // The plain form our producers write, without serde; anything else
    // (and every malformed message) through serde, which names the reason.
    let i: InteractionRef<'a> = match fast::interaction(raw) {
        Some(i) => i,
        None => {
            serde_json::from_slice(raw).map_err(|e| Rejection::new(classify(&e), e.to_string()))?
        }
    };
    check_non_empty(&[
        ("event_id", &i.event_id),
        ("user_id", &i.user_id),
        ("item_id", &i.item_id),
    ])?;
    check_time(i.event_time, now_ms, limits)?;
    Ok(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_764_000_000_000;
    const LIMITS: Limits = Limits {
        max_message_bytes: 1024,
        max_future_skew_ms: 3_600_000,
    };

    fn good() -> serde_json::Value {
        serde_json::json!({
            "txn_id": "t1", "user_id": "u1", "merchant_id": "m1", "amount": 12.5,
            "currency": "EUR", "country": "FR", "device_id": "d1", "event_time": NOW - 1000
        })
    }

    fn reason_of(v: &serde_json::Value) -> Reason {
        parse_transaction(v.to_string().as_bytes(), NOW, &LIMITS)
            .unwrap_err()
            .reason
    }

    #[test]
    fn valid_transaction_parses() {
        let t = parse_transaction(good().to_string().as_bytes(), NOW, &LIMITS).unwrap();
        assert_eq!(t.txn_id, "t1");
        assert_eq!(t.amount, 12.5);
        assert_eq!(t.fraud_pattern, None);
    }

    #[test]
    fn each_malformed_class_has_its_reason() {
        assert_eq!(
            parse_transaction(b"{not json", NOW, &LIMITS)
                .unwrap_err()
                .reason,
            Reason::InvalidJson
        );
        assert_eq!(
            parse_transaction(b"", NOW, &LIMITS).unwrap_err().reason,
            Reason::InvalidJson
        );
        let mut v = good();
        v.as_object_mut().unwrap().remove("merchant_id");
        assert_eq!(reason_of(&v), Reason::MissingField);
        let mut v = good();
        v["amount"] = serde_json::json!("12.5");
        assert_eq!(reason_of(&v), Reason::WrongType);
        let mut v = good();
        v["amount"] = serde_json::json!(-1.0);
        assert_eq!(reason_of(&v), Reason::InvalidAmount);
        let mut v = good();
        v["amount"] = serde_json::json!(1e300);
        assert_eq!(
            reason_of(&v),
            Reason::InvalidAmount,
            "huge amounts are rejected"
        );
        let mut v = good();
        v["amount"] = serde_json::json!(MAX_AMOUNT);
        assert!(parse_transaction(v.to_string().as_bytes(), NOW, &LIMITS).is_ok());
        let mut v = good();
        v["user_id"] = serde_json::json!("  ");
        assert_eq!(reason_of(&v), Reason::EmptyField);
        let mut v = good();
        v["event_time"] = serde_json::json!(1_700_000_000); // seconds, not ms
        assert_eq!(reason_of(&v), Reason::InvalidTimestamp);
        let mut v = good();
        v["event_time"] = serde_json::json!(NOW + 2 * 3_600_000);
        assert_eq!(reason_of(&v), Reason::InvalidTimestamp);
        let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(2000));
        assert_eq!(
            parse_transaction(big.as_bytes(), NOW, &LIMITS)
                .unwrap_err()
                .reason,
            Reason::Oversize
        );
    }

    #[test]
    fn non_finite_amount_literal_is_rejected() {
        // JSON has no NaN/Infinity; an overflowing literal is not a number either.
        let raw = good().to_string().replace("12.5", "1e999");
        let r = parse_transaction(raw.as_bytes(), NOW, &LIMITS).unwrap_err();
        assert!(
            matches!(r.reason, Reason::InvalidJson | Reason::InvalidAmount),
            "{r}"
        );
        let raw = good().to_string().replace("12.5", "NaN");
        assert_eq!(
            parse_transaction(raw.as_bytes(), NOW, &LIMITS)
                .unwrap_err()
                .reason,
            Reason::InvalidJson
        );
    }

    #[test]
    fn rejection_detail_names_the_field() {
        let mut v = good();
        v.as_object_mut().unwrap().remove("device_id");
        let r = parse_transaction(v.to_string().as_bytes(), NOW, &LIMITS).unwrap_err();
        assert!(r.detail.contains("device_id"), "{}", r.detail);
    }

    #[test]
    fn interaction_parses_and_rejects_unknown_kind() {
        let ok = serde_json::json!({"event_id":"e","user_id":"u","item_id":"i","kind":"add_to_cart","event_time":NOW});
        let i = parse_interaction(ok.to_string().as_bytes(), NOW, &LIMITS).unwrap();
        assert_eq!(i.kind, InteractionKind::AddToCart);
        let bad = serde_json::json!({"event_id":"e","user_id":"u","item_id":"i","kind":"like","event_time":NOW});
        let r = parse_interaction(bad.to_string().as_bytes(), NOW, &LIMITS).unwrap_err();
        assert_eq!(r.reason, Reason::InvalidValue, "{r}");
    }
}
