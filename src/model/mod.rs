//! The fraud model: an ONNX file run by tract-onnx, with its signature
//! checked against a sidecar file before anything is scored.
//!
//! Checks at load (a mismatch stops start-up with a message naming it): the
//! sidecar's feature names equal [`FEATURE_NAMES`] in order; the ONNX graph
//! has one input of that name, element type float32, rank 2 and last
//! dimension `n_features`; it has an output of the sidecar's output name.
//! Only then are the input shapes fixed (a forced shape on a mismatched model
//! scores silently wrong, see shared/reference/tract-onnx-notes.md).
//!
//! Two plans are compiled: batch 1 and batch [`BATCH`]; a micro-batch is cut
//! into full batches and a remainder scored row by row (fixed shapes are about
//! twice as fast per row as a symbolic batch axis in tract).

use std::path::Path;

use anyhow::{anyhow, bail, Context};
use serde::Deserialize;
use tract_onnx::pb;
use tract_onnx::prelude::*;

use crate::features::{Features, FEATURE_NAMES, N_FEATURES};

/// Rows per full batch run.
pub const BATCH: usize = 64;

/// ONNX element type code of float32.
const ONNX_FLOAT: i32 = 1;

/// The sidecar file next to the ONNX model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// Model version, reported in every score and in `streamscore_model_info`.
    pub version: String,
    /// Name of the float32 `[N, n_features]` input.
    pub input: String,
    /// Name of the `[N, 1]` fraud-probability output.
    pub output: String,
    /// Feature names in input column order.
    pub features: Vec<String>,
    /// Free-form training facts (metrics, data); not checked.
    #[serde(default)]
    pub training: serde_json::Value,
}

type Plan = std::sync::Arc<TypedRunnableModel>;

/// A loaded, checked, optimised model.
pub struct FraudModel {
    signature: Signature,
    one: Plan,
    batch: Plan,
}

impl std::fmt::Debug for FraudModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FraudModel")
            .field("version", &self.signature.version)
            .finish()
    }
}

fn check_signature(sig: &Signature, proto: &pb::ModelProto) -> anyhow::Result<usize> {
    if sig.features.len() != N_FEATURES
        || sig
            .features
            .iter()
            .zip(FEATURE_NAMES.iter())
            .any(|(a, b)| a != b)
    {
        bail!(
            "model signature lists {} features {:?}, but this build computes {} features {:?} (in that order)",
            sig.features.len(),
            sig.features,
            N_FEATURES,
            FEATURE_NAMES
        );
    }
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| anyhow!("ONNX file has no graph"))?;
    let initializers: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<&pb::ValueInfoProto> = graph
        .input
        .iter()
        .filter(|i| !initializers.contains(&i.name.as_str()))
        .collect();
    if inputs.len() != 1 || inputs[0].name != sig.input {
        bail!(
            "model must have exactly one input named {:?}; the ONNX graph has {:?}",
            sig.input,
            inputs.iter().map(|i| i.name.as_str()).collect::<Vec<_>>()
        );
    }
    let tensor = match inputs[0].r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(pb::type_proto::Value::TensorType(t)) => t,
        _ => bail!("model input {:?} is not a tensor", sig.input),
    };
    if tensor.elem_type != ONNX_FLOAT {
        bail!(
            "model input {:?} has ONNX element type {}, expected 1 (float32)",
            sig.input,
            tensor.elem_type
        );
    }
    let dims = tensor
        .shape
        .as_ref()
        .map(|s| s.dim.as_slice())
        .ok_or_else(|| anyhow!("model input {:?} has no shape", sig.input))?;
    if dims.len() != 2 {
        bail!(
            "model input {:?} has rank {}, expected 2 ([N, {N_FEATURES}])",
            sig.input,
            dims.len()
        );
    }
    match dims[1].value {
        Some(pb::tensor_shape_proto::dimension::Value::DimValue(n)) if n == N_FEATURES as i64 => {}
        ref other => bail!(
            "model input {:?} has {:?} columns, expected {N_FEATURES}",
            sig.input,
            other
        ),
    }
    if !graph.output.iter().any(|o| o.name == sig.output) {
        bail!(
            "model has no output named {:?}; outputs are {:?}",
            sig.output,
            graph
                .output
                .iter()
                .map(|o| o.name.as_str())
                .collect::<Vec<_>>()
        );
    }
    Ok(N_FEATURES)
}

fn compile(proto: &pb::ModelProto, sig: &Signature, rows: usize) -> anyhow::Result<Plan> {
    let onnx = tract_onnx::onnx();
    let mut model = onnx
        .model_for_proto_model(proto)
        .context("loading the ONNX graph")?;
    model.select_outputs_by_name([sig.output.as_str()])?;
    let plan = model
        .with_input_fact(0, f32::fact([rows, N_FEATURES]).into())?
        .into_optimized()
        .context("optimising the ONNX graph (an operator tract does not implement?)")?
        .into_runnable()?;
    Ok(plan)
}

impl FraudModel {
    /// Loads and checks `onnx_path` against the sidecar `signature_path`.
    pub fn load(onnx_path: &Path, signature_path: &Path) -> anyhow::Result<FraudModel> {
        let sig_text = std::fs::read_to_string(signature_path)
            .with_context(|| format!("reading model signature {}", signature_path.display()))?;
        let signature: Signature = serde_json::from_str(&sig_text)
            .with_context(|| format!("parsing model signature {}", signature_path.display()))?;
        let onnx = tract_onnx::onnx();
        let proto = onnx
            .proto_model_for_path(onnx_path)
            .with_context(|| format!("reading ONNX model {}", onnx_path.display()))?;
        check_signature(&signature, &proto).with_context(|| {
            format!(
                "model {} does not match its signature {}",
                onnx_path.display(),
                signature_path.display()
            )
        })?;
        let one = compile(&proto, &signature, 1)?;
        let batch = compile(&proto, &signature, BATCH)?;
        Ok(FraudModel {
            signature,
            one,
            batch,
        })
    }

    pub fn version(&self) -> &str {
        &self.signature.version
    }

    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    fn run(plan: &Plan, rows: usize, data: Vec<f32>, out: &mut Vec<f32>) -> anyhow::Result<()> {
        let input = Tensor::from_shape(&[rows, N_FEATURES], &data)?;
        let result = plan.run(tvec!(input.into()))?;
        let view = result[0].try_as_plain_ram()?;
        let probs = view.as_slice::<f32>()?;
        if probs.len() != rows {
            bail!("model returned {} values for {rows} rows", probs.len());
        }
        out.extend(probs.iter().map(|p| p.clamp(0.0, 1.0)));
        Ok(())
    }

    /// Fraud probabilities in [0, 1], one per row, in order. Every feature
    /// must be finite (the caller dead-letters rows that are not).
    pub fn score(&self, rows: &[Features]) -> anyhow::Result<Vec<f32>> {
        let mut out = Vec::with_capacity(rows.len());
        let mut chunks = rows.chunks_exact(BATCH);
        for chunk in &mut chunks {
            let data: Vec<f32> = chunk.iter().flat_map(|f| f.0).collect();
            Self::run(&self.batch, BATCH, data, &mut out)?;
        }
        for row in chunks.remainder() {
            Self::run(&self.one, 1, row.0.to_vec(), &mut out)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    #[derive(Deserialize)]
    struct Vectors {
        rows: Vec<Vec<f32>>,
        probabilities: Vec<f32>,
    }

    #[test]
    fn shipped_model_matches_the_training_scripts_predictions() {
        let m = FraudModel::load(
            &root().join("models/fraud.onnx"),
            &root().join("models/fraud.json"),
        )
        .unwrap();
        let v: Vectors = serde_json::from_str(
            &std::fs::read_to_string(root().join("models/fraud.testvectors.json")).unwrap(),
        )
        .unwrap();
        assert!(v.rows.len() > BATCH, "vectors must exercise both plans");
        let rows: Vec<Features> = v
            .rows
            .iter()
            .map(|r| Features(r.as_slice().try_into().unwrap()))
            .collect();
        let got = m.score(&rows).unwrap();
        assert_eq!(got.len(), v.probabilities.len());
        for (i, (g, want)) in got.iter().zip(&v.probabilities).enumerate() {
            assert!(
                (g - want).abs() < 1e-4,
                "row {i}: tract {g} vs sklearn {want}"
            );
        }
        // Not a constant model: the vectors span both decisions.
        assert!(got.iter().any(|p| *p > 0.5) && got.iter().any(|p| *p < 0.5));
    }

    fn write_sig(dir: &Path, features: &[&str], input: &str, output: &str) -> PathBuf {
        let p = dir.join("sig.json");
        let v =
            serde_json::json!({"version":"x","input":input,"output":output,"features":features});
        std::fs::write(&p, v.to_string()).unwrap();
        p
    }

    #[test]
    fn signature_mismatches_stop_loading_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let onnx = root().join("models/fraud.onnx");
        let mut short: Vec<&str> = FEATURE_NAMES.to_vec();
        short.pop();
        let err = FraudModel::load(
            &onnx,
            &write_sig(dir.path(), &short, "features", "probability"),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("19 features"), "{err:#}");

        let mut swapped: Vec<&str> = FEATURE_NAMES.to_vec();
        swapped.swap(0, 1);
        let err = FraudModel::load(
            &onnx,
            &write_sig(dir.path(), &swapped, "features", "probability"),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("in that order"), "{err:#}");

        let err = FraudModel::load(
            &onnx,
            &write_sig(dir.path(), &FEATURE_NAMES, "x", "probability"),
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("exactly one input named \"x\""),
            "{err:#}"
        );

        let err = FraudModel::load(
            &onnx,
            &write_sig(dir.path(), &FEATURE_NAMES, "features", "label"),
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("no output named \"label\""),
            "{err:#}"
        );
    }

    #[test]
    fn missing_files_are_named() {
        let err = FraudModel::load(Path::new("/nope.onnx"), &root().join("models/fraud.json"))
            .unwrap_err();
        assert!(format!("{err:#}").contains("/nope.onnx"), "{err:#}");
    }
}
