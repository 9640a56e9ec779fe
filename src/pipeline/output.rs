//! The records the pipeline writes: fraud scores and dead-letter records
//! (schemas/fraud-score.json, schemas/dead-letter.json).

use base64::Engine;
use serde::Serialize;

use crate::events::{Rejection, Transaction};
use crate::features::Features;

/// The decision at the configured threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Score at or above the threshold: block or review.
    Flag,
    /// Below the threshold.
    Pass,
}

impl Decision {
    pub fn at(score: f32, threshold: f64) -> Decision {
        if f64::from(score) >= threshold {
            Decision::Flag
        } else {
            Decision::Pass
        }
    }
}

/// Where an input message was read.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SourcePosition {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// One fraud score, as published to `fraud-scores` and cached in Redis.
#[derive(Debug, Serialize)]
pub struct FraudScore<'a> {
    pub txn_id: &'a str,
    pub user_id: &'a str,
    pub merchant_id: &'a str,
    pub amount: f64,
    pub score: f32,
    pub decision: Decision,
    pub threshold: f64,
    pub model_version: &'a str,
    /// The transaction's own time, epoch ms.
    pub event_time: i64,
    /// When the score was computed, epoch ms.
    pub scored_at: i64,
    /// True when the event was older than the grace period (not folded into windows).
    pub late: bool,
    /// The feature values the model saw, by name (audit trail).
    pub features: &'a Features,
    pub source: &'a SourcePosition,
    /// The merchant-features row the merchant features came from (null:
    /// the table had no row for the merchant, its features are 0).
    pub merchant_table: Option<MerchantTableUse>,
}

/// Which merchant-features row a score used, and how old it was.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct MerchantTableUse {
    /// Newest event time folded into the row, epoch ms.
    pub as_of: i64,
    /// When the merchant stage published the row, epoch ms.
    pub published_at: i64,
    /// `scored_at - published_at`: how old the row was when used.
    pub age_ms: i64,
    /// The merchant-repartition partition and last offset the row covers.
    pub partition: i32,
    pub offset: i64,
}

impl MerchantTableUse {
    pub fn new(r: &crate::merchants::RowUsed, scored_at: i64) -> Self {
        MerchantTableUse {
            as_of: r.as_of,
            published_at: r.published_at,
            age_ms: scored_at - r.published_at,
            partition: r.partition,
            offset: r.offset,
        }
    }
}

impl<'a> FraudScore<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        t: &'a Transaction,
        score: f32,
        threshold: f64,
        model_version: &'a str,
        scored_at: i64,
        late: bool,
        features: &'a Features,
        source: &'a SourcePosition,
        merchant_table: Option<MerchantTableUse>,
    ) -> Self {
        FraudScore {
            txn_id: &t.txn_id,
            user_id: &t.user_id,
            merchant_id: &t.merchant_id,
            amount: t.amount,
            score,
            decision: Decision::at(score, threshold),
            threshold,
            model_version,
            event_time: t.event_time,
            scored_at,
            late,
            features,
            source,
            merchant_table,
        }
    }
}

/// A message that could not be processed, with everything needed to replay it.
#[derive(Debug, Serialize)]
pub struct DeadLetter<'a> {
    /// Reason code (a closed set, see docs/METRICS.md).
    pub reason: &'static str,
    /// What exactly was wrong.
    pub detail: &'a str,
    pub source: &'a SourcePosition,
    /// The original key, base64, if there was one.
    pub key_base64: Option<String>,
    /// The original payload bytes, base64 (lossless).
    pub raw_base64: String,
    /// The payload as text, when it is valid UTF-8 and at most
    /// [`RAW_TEXT_MAX`] bytes (for people reading the topic).
    pub raw_text: Option<&'a str>,
    /// When it was dead-lettered, epoch ms.
    pub failed_at: i64,
}

/// Largest input whose text is repeated in `raw_text`.
pub const RAW_TEXT_MAX: usize = 64 * 1024;

impl<'a> DeadLetter<'a> {
    pub fn new(
        rejection: &'a Rejection,
        source: &'a SourcePosition,
        key: Option<&[u8]>,
        raw: &'a [u8],
        failed_at: i64,
    ) -> Self {
        let b64 = base64::engine::general_purpose::STANDARD;
        DeadLetter {
            reason: rejection.reason.as_str(),
            detail: &rejection.detail,
            source,
            key_base64: key.map(|k| b64.encode(k)),
            raw_base64: b64.encode(raw),
            // Readable text for people, only for small inputs: the bytes
            // are in raw_base64 anyway, and the record must stay under the
            // topic's size limit.
            raw_text: (raw.len() <= RAW_TEXT_MAX)
                .then(|| std::str::from_utf8(raw).ok())
                .flatten(),
            failed_at,
        }
    }

    /// Key of the dead-letter message: the source position, unique per input.
    pub fn key(&self) -> String {
        format!(
            "{}/{}/{}",
            self.source.topic, self.source.partition, self.source.offset
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Reason;

    #[test]
    fn decision_is_inclusive_at_the_threshold() {
        assert_eq!(Decision::at(0.5, 0.5), Decision::Flag);
        assert_eq!(Decision::at(0.499, 0.5), Decision::Pass);
    }

    #[test]
    fn dead_letter_keeps_raw_bytes_losslessly() {
        let rej = Rejection::new(Reason::InvalidJson, "expected value");
        let src = SourcePosition {
            topic: "transactions".into(),
            partition: 2,
            offset: 41,
        };
        let raw = [0xff, 0x00, b'x'];
        let d = DeadLetter::new(&rej, &src, Some(b"k"), &raw, 1);
        assert_eq!(d.raw_text, None);
        let back = base64::engine::general_purpose::STANDARD
            .decode(&d.raw_base64)
            .unwrap();
        assert_eq!(back, raw);
        assert_eq!(d.key(), "transactions/2/41");
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["reason"], "invalid_json");
        assert_eq!(v["source"]["offset"], 41);
    }
}
