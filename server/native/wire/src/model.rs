//! The model table: what the native front end checks an inference request against.
//!
//! Python pushes it (`Frontend.set_models`) whenever a model loads, unloads or changes state,
//! from the same ModelConfig the Python front end checks with, so both accept the same
//! requests. A request the table cannot vouch for goes to the Python handlers, which answer it
//! (or word its refusal) exactly as the Python front end does.

use std::collections::HashMap;
use std::sync::Arc;

use crate::tensor::Dtype;

/// A declared model input.
#[derive(Clone, Debug)]
pub struct InputSpec {
    pub name: String,
    pub dtype: Dtype,
    /// Dims without the batch dimension when the model batches; -1 is variable.
    pub dims: Vec<i64>,
    pub optional: bool,
}

/// One model as the native front end checks requests to it.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    pub name: String,
    /// Names the ModelConfig this spec was built from: Python takes a request validated
    /// against another config (a reload in between) through its own checks again.
    pub token: u64,
    /// 0: the model does not batch (shapes are the dims exactly).
    pub max_batch_size: i64,
    pub inputs: Vec<InputSpec>,
    /// Declared outputs; empty: any requested output name is passed on.
    pub outputs: Vec<String>,
    /// False: every request to this model goes to the Python handlers (a decoupled model, or a
    /// feature the native path does not carry).
    pub native: bool,
    /// What an HTTP infer body to this model may hold (server/http_api/body_limits.py): the whole
    /// decompressed body, its JSON part, and why, for the refusal.
    pub body_limit: usize,
    pub json_limit: usize,
    pub limit_reason: String,
    /// A roll-out splits this model's callers by this request header (lower case); "" none.
    pub split_header: String,
}

impl ModelSpec {
    pub fn input(&self, name: &str) -> Option<(usize, &InputSpec)> {
        self.inputs.iter().enumerate().find(|(_, spec)| spec.name == name)
    }

    pub fn declares_output(&self, name: &str) -> bool {
        self.outputs.is_empty() || self.outputs.iter().any(|output| output == name)
    }
}

/// Every model the engine serves, by name.
#[derive(Clone, Debug, Default)]
pub struct ModelTable {
    models: HashMap<String, Arc<ModelSpec>>,
}

impl ModelTable {
    pub fn new(models: Vec<ModelSpec>) -> Self {
        ModelTable {
            models: models.into_iter().map(|spec| (spec.name.clone(), Arc::new(spec))).collect(),
        }
    }

    /// The model if requests to it may take the native path.
    pub fn native(&self, name: &str) -> Option<&Arc<ModelSpec>> {
        self.models.get(name).filter(|spec| spec.native)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<ModelSpec>> {
        self.models.get(name)
    }
}
