//! Checks a request's tensors against its model the way server/codec.py does, answering only
//! "fine" or "not sure": a request that fails any check goes to the Python handlers, which
//! refuse it with the one wording both front ends share. So this may accept less than Python
//! does, never more.

use bytes::Bytes;

use crate::call::InTensor;
use crate::model::ModelSpec;
use crate::tensor::{bytes_elements_fit, element_count, Dtype};

/// Collects a request's inputs, checking each as it comes.
pub struct Checker<'m> {
    model: &'m ModelSpec,
    seen: Vec<bool>,
    rows: Option<i64>,
    inputs: Vec<InTensor>,
}

/// An input's declared type and its element count, once its name, datatype and shape passed.
#[derive(Clone, Copy, Debug)]
pub struct Accepted {
    pub dtype: Dtype,
    pub count: u64,
}

impl<'m> Checker<'m> {
    pub fn new(model: &'m ModelSpec) -> Self {
        Checker { model, seen: vec![false; model.inputs.len()], rows: None, inputs: Vec::with_capacity(model.inputs.len()) }
    }

    /// Name, datatype and shape of the next input (codec.input_spec and check_shape).
    pub fn accept(&mut self, name: &str, datatype: &str, shape: &[i64]) -> Option<Accepted> {
        let (index, spec) = self.model.input(name)?;
        if self.seen[index] || spec.dtype.name() != datatype {
            return None;
        }
        let count = element_count(shape)?;
        let rows = if self.model.max_batch_size > 0 {
            let (&rows, rest) = shape.split_first()?;
            if rest.len() != spec.dims.len() || !dims_match(rest, &spec.dims) {
                return None;
            }
            if rows < 1 || rows > self.model.max_batch_size {
                return None;
            }
            rows
        } else {
            if shape.len() != spec.dims.len() || !dims_match(shape, &spec.dims) {
                return None;
            }
            1
        };
        // Every input of a batched request carries the same rows (codec.check_complete).
        if *self.rows.get_or_insert(rows) != rows {
            return None;
        }
        self.seen[index] = true;
        Some(Accepted { dtype: spec.dtype, count })
    }

    /// The input's bytes in wire layout: their size must be what the shape needs.
    pub fn push(&mut self, name: &str, accepted: Accepted, shape: Vec<i64>, data: Bytes) -> Option<()> {
        let fits = match accepted.dtype.itemsize() {
            Some(size) => data.len() as u64 == accepted.count * size as u64,
            None => bytes_elements_fit(&data, accepted.count),
        };
        if !fits {
            return None;
        }
        self.inputs.push(InTensor { name: name.to_owned(), dtype: accepted.dtype, shape, data });
        Some(())
    }

    /// Every required input present; the requested outputs declared and each asked once.
    /// Returns the inputs and the request's batch rows.
    pub fn finish(self, outputs: &[&str]) -> Option<(Vec<InTensor>, i64)> {
        for (spec, seen) in self.model.inputs.iter().zip(&self.seen) {
            if !seen && !spec.optional {
                return None;
            }
        }
        for (position, name) in outputs.iter().enumerate() {
            if !self.model.declares_output(name) || outputs[..position].contains(name) {
                return None;
            }
        }
        let rows = if self.model.max_batch_size > 0 { self.rows.unwrap_or(1) } else { 1 };
        Some((self.inputs, rows))
    }
}

fn dims_match(shape: &[i64], dims: &[i64]) -> bool {
    shape.iter().zip(dims).all(|(&s, &d)| d == -1 || d == s)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::InputSpec;

    pub fn add_sub() -> ModelSpec {
        let input = |name: &str| InputSpec { name: name.into(), dtype: Dtype::Fp32, dims: vec![16], optional: false };
        ModelSpec {
            name: "add_sub".into(),
            token: 7,
            max_batch_size: 64,
            inputs: vec![input("INPUT0"), input("INPUT1")],
            outputs: vec!["OUTPUT0".into(), "OUTPUT1".into()],
            native: true,
            body_limit: 1 << 20,
            json_limit: 1 << 20,
            limit_reason: "test".into(),
            split_header: String::new(),
        }
    }

    fn floats(count: usize) -> Bytes {
        Bytes::from(vec![0u8; count * 4])
    }

    type Tensor<'a> = (&'a str, &'a str, Vec<i64>, Bytes);

    fn check(model: &ModelSpec, tensors: &[Tensor], outputs: &[&str]) -> Option<i64> {
        let mut checker = Checker::new(model);
        for (name, datatype, shape, data) in tensors {
            let accepted = checker.accept(name, datatype, shape)?;
            checker.push(name, accepted, shape.clone(), data.clone())?;
        }
        checker.finish(outputs).map(|(_, rows)| rows)
    }

    #[test]
    fn a_well_formed_request_passes_with_its_rows() {
        let model = add_sub();
        let tensors = [("INPUT0", "FP32", vec![3, 16], floats(48)), ("INPUT1", "FP32", vec![3, 16], floats(48))];
        assert_eq!(check(&model, &tensors, &["OUTPUT1"]), Some(3));
    }

    #[test]
    fn anything_python_would_refuse_is_left_to_python() {
        let model = add_sub();
        let good = || ("INPUT1", "FP32", vec![1, 16], floats(16));
        let cases: Vec<Vec<Tensor>> = vec![
            vec![("INPUT0", "FP64", vec![1, 16], floats(32)), good()],
            vec![("INPUT0", "FP32", vec![1, 15], floats(15)), good()],
            vec![("INPUT0", "FP32", vec![16], floats(16)), good()],
            vec![("INPUT0", "FP32", vec![0, 16], floats(0)), good()],
            vec![("INPUT0", "FP32", vec![65, 16], floats(65 * 16)), good()],
            vec![("INPUT0", "FP32", vec![-1, 16], floats(16)), good()],
            vec![("INPUT0", "FP32", vec![1, 16], floats(15)), good()],
            vec![("INPUT0", "FP32", vec![2, 16], floats(32)), good()],
            vec![("INPUT0", "FP32", vec![1, 16], floats(16)), ("INPUT0", "FP32", vec![1, 16], floats(16))],
            vec![("INPUT9", "FP32", vec![1, 16], floats(16)), good()],
            vec![good()],
        ];
        for tensors in cases {
            assert_eq!(check(&model, &tensors, &[]), None, "{tensors:?}");
        }
        let both = [("INPUT0", "FP32", vec![1, 16], floats(16)), good()];
        assert_eq!(check(&model, &both, &["OUTPUT9"]), None);
        assert_eq!(check(&model, &both, &["OUTPUT0", "OUTPUT0"]), None);
    }
}
