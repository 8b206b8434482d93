//! ModelInferRequest -> InferCall (checked against the model table) and the answer back to a
//! ModelInferResponse, as server/grpc_api/handlers.py decodes and encodes them.

use bytes::{BufMut, Bytes, BytesMut};

use crate::call::{InferCall, OutTensor, Param, Protocol};
use crate::model::ModelTable;
use crate::proto::inference::{
    infer_parameter::ParameterChoice, model_infer_response::InferOutputTensor, InferParameter,
    InferTensorContents, ModelInferRequest, ModelInferResponse,
};
use crate::tensor::Dtype;
use crate::validate::Checker;

/// What the caller knows beyond the message (when and from whom it came).
pub struct Envelope<'m> {
    pub slot: u64,
    pub protocol: Protocol,
    pub received_ns: u64,
    pub deadline_ns: Option<u64>,
    pub authorization: Option<String>,
    pub traceparent: Option<String>,
    /// The call's metadata, for the roll-out split header the model may name.
    pub metadata: Option<&'m tonic::metadata::MetadataMap>,
}

/// The request as the native path serves it, or None: the Python handlers take it (anything
/// unusual, and everything they would refuse, so the refusal is worded once).
pub fn decode(table: &ModelTable, message: ModelInferRequest, envelope: Envelope) -> Option<InferCall> {
    let model = table.native(&message.model_name)?;
    let raw = &message.raw_input_contents;
    if !raw.is_empty() && raw.len() != message.inputs.len() {
        return None;
    }
    let mut checker = Checker::new(model);
    for (index, tensor) in message.inputs.iter().enumerate() {
        if !tensor.parameters.is_empty() {
            return None; // shared memory and other per-tensor parameters: Python's path
        }
        let accepted = checker.accept(&tensor.name, &tensor.datatype, &tensor.shape)?;
        let data = if raw.is_empty() {
            // An input with neither raw bytes nor typed contents has no data (Python says so).
            contents_bytes(accepted.dtype, accepted.count, Some(tensor.contents.as_ref()?))?
        } else {
            if tensor.contents.is_some() {
                return None;
            }
            raw[index].clone()
        };
        checker.push(&tensor.name, accepted, tensor.shape.clone(), data)?;
    }
    if message.outputs.iter().any(|output| !output.parameters.is_empty()) {
        return None;
    }
    let requested: Vec<&str> = message.outputs.iter().map(|output| output.name.as_str()).collect();
    let (inputs, rows) = checker.finish(&requested)?;
    let mut parameters = Vec::with_capacity(message.parameters.len());
    for (key, value) in &message.parameters {
        parameters.push((key.clone(), param(value)?));
    }
    let outputs = message.outputs.into_iter().map(|output| output.name).collect();
    Some(InferCall {
        slot: envelope.slot,
        protocol: envelope.protocol,
        model: message.model_name,
        version: message.model_version,
        id: message.id,
        token: model.token,
        rows,
        inputs,
        outputs,
        parameters,
        received_ns: envelope.received_ns,
        deadline_ns: envelope.deadline_ns,
        authorization: envelope.authorization,
        traceparent: envelope.traceparent,
        split_key: split_key(&model.split_header, envelope.metadata),
    })
}

fn split_key(header: &str, metadata: Option<&tonic::metadata::MetadataMap>) -> Option<String> {
    if header.is_empty() {
        return None;
    }
    metadata?.get(header)?.to_str().ok().map(str::to_owned)
}

pub fn param(value: &InferParameter) -> Option<Param> {
    Some(match value.parameter_choice.as_ref()? {
        ParameterChoice::BoolParam(v) => Param::Bool(*v),
        ParameterChoice::Int64Param(v) => Param::Int(*v),
        ParameterChoice::StringParam(v) => Param::Str(v.clone()),
        ParameterChoice::DoubleParam(v) => Param::Double(*v),
        ParameterChoice::Uint64Param(v) => Param::Uint(*v),
    })
}

pub fn to_infer_parameter(value: &Param) -> InferParameter {
    let choice = match value {
        Param::Bool(v) => ParameterChoice::BoolParam(*v),
        Param::Int(v) => ParameterChoice::Int64Param(*v),
        Param::Uint(v) => match i64::try_from(*v) {
            Ok(v) => ParameterChoice::Int64Param(v),
            Err(_) => ParameterChoice::Uint64Param(*v),
        },
        Param::Double(v) => ParameterChoice::DoubleParam(*v),
        Param::Str(v) => ParameterChoice::StringParam(v.clone()),
    };
    InferParameter { parameter_choice: Some(choice) }
}

/// Typed contents in the datatype's InferTensorContents field, converted to wire bytes; None
/// when the count is off, a value does not fit the datatype, or the datatype has no numeric
/// field here (FP16, BF16 travel raw; BYTES contents are decoded by Python).
fn contents_bytes(dtype: Dtype, count: u64, contents: Option<&InferTensorContents>) -> Option<Bytes> {
    let contents = contents?;
    let mut out = BytesMut::with_capacity(count as usize * dtype.itemsize()?);
    macro_rules! fill {
        ($values:expr, $convert:expr, $put:ident) => {{
            let values = &$values;
            if values.len() as u64 != count {
                return None;
            }
            for &value in values.iter() {
                out.$put($convert(value)?);
            }
        }};
    }
    match dtype {
        Dtype::Bool => fill!(contents.bool_contents, |v: bool| Some(v as u8), put_u8),
        Dtype::Int8 => fill!(contents.int_contents, |v: i32| i8::try_from(v).ok(), put_i8),
        Dtype::Int16 => fill!(contents.int_contents, |v: i32| i16::try_from(v).ok(), put_i16_le),
        Dtype::Int32 => fill!(contents.int_contents, Some, put_i32_le),
        Dtype::Int64 => fill!(contents.int64_contents, Some, put_i64_le),
        Dtype::Uint8 => fill!(contents.uint_contents, |v: u32| u8::try_from(v).ok(), put_u8),
        Dtype::Uint16 => fill!(contents.uint_contents, |v: u32| u16::try_from(v).ok(), put_u16_le),
        Dtype::Uint32 => fill!(contents.uint_contents, Some, put_u32_le),
        Dtype::Uint64 => fill!(contents.uint64_contents, Some, put_u64_le),
        Dtype::Fp32 => fill!(contents.fp32_contents, Some, put_f32_le),
        Dtype::Fp64 => fill!(contents.fp64_contents, Some, put_f64_le),
        Dtype::Fp16 | Dtype::Bf16 | Dtype::Bytes => return None,
    }
    Some(out.freeze())
}

/// The response to a served request: its outputs (raw, one raw_output_contents entry each),
/// from the version that served it, with the model's response parameters.
pub fn encode_response(
    model: String,
    id: String,
    version: String,
    outputs: Vec<OutTensor>,
    parameters: &[(String, Param)],
) -> ModelInferResponse {
    let mut tensors = Vec::with_capacity(outputs.len());
    let mut raw = Vec::with_capacity(outputs.len());
    for output in outputs {
        tensors.push(InferOutputTensor {
            name: output.name,
            datatype: output.dtype.name().to_owned(),
            shape: output.shape,
            parameters: Default::default(),
            contents: None,
        });
        raw.push(output.data);
    }
    ModelInferResponse {
        model_name: model,
        model_version: version,
        id,
        parameters: parameters.iter().map(|(key, value)| (key.clone(), to_infer_parameter(value))).collect(),
        outputs: tensors,
        raw_output_contents: raw,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
    use crate::validate::tests::add_sub;

    fn envelope() -> Envelope<'static> {
        Envelope {
            slot: 9,
            protocol: Protocol::Grpc,
            received_ns: 1,
            deadline_ns: None,
            authorization: None,
            traceparent: None,
            metadata: None,
        }
    }

    fn tensor(name: &str, contents: Option<InferTensorContents>) -> InferInputTensor {
        InferInputTensor { name: name.into(), datatype: "FP32".into(), shape: vec![1, 16], parameters: Default::default(), contents }
    }

    fn raw_request() -> ModelInferRequest {
        ModelInferRequest {
            model_name: "add_sub".into(),
            id: "r1".into(),
            inputs: vec![tensor("INPUT0", None), tensor("INPUT1", None)],
            raw_input_contents: vec![Bytes::from(vec![1u8; 64]), Bytes::from(vec![2u8; 64])],
            ..Default::default()
        }
    }

    #[test]
    fn raw_inputs_become_slices_of_the_message() {
        let table = ModelTable::new(vec![add_sub()]);
        let message = raw_request();
        let first = message.raw_input_contents[0].as_ptr();
        let call = decode(&table, message, envelope()).expect("served natively");
        assert_eq!((call.rows, call.token, call.slot), (1, 7, 9));
        assert_eq!(call.inputs[0].data.as_ptr(), first, "no copy");
        assert_eq!(call.inputs[1].data[0], 2);
    }

    #[test]
    fn typed_contents_are_converted_and_checked() {
        let table = ModelTable::new(vec![add_sub()]);
        let floats = |n: usize| InferTensorContents { fp32_contents: vec![1.5; n], ..Default::default() };
        let mut message = ModelInferRequest {
            model_name: "add_sub".into(),
            inputs: vec![tensor("INPUT0", Some(floats(16))), tensor("INPUT1", Some(floats(16)))],
            ..Default::default()
        };
        let call = decode(&table, message.clone(), envelope()).unwrap();
        assert_eq!(&call.inputs[0].data[..4], &1.5f32.to_le_bytes());
        message.inputs[1].contents = Some(floats(15));
        assert!(decode(&table, message, envelope()).is_none());
    }

    #[test]
    fn unusual_or_wrong_requests_go_to_python() {
        let table = ModelTable::new(vec![add_sub()]);
        let mut unknown = raw_request();
        unknown.model_name = "nope".into();
        let mut shm = raw_request();
        shm.inputs[0].parameters.insert("shared_memory_region".into(), InferParameter::default());
        let mut mixed = raw_request();
        mixed.inputs[0].contents = Some(InferTensorContents::default());
        let mut short = raw_request();
        short.raw_input_contents.pop();
        let mut no_data = raw_request();
        no_data.raw_input_contents.clear();
        let mut output = raw_request();
        output.outputs.push(InferRequestedOutputTensor { name: "OUTPUT9".into(), parameters: Default::default() });
        for message in [unknown, shm, mixed, short, output, no_data] {
            assert!(decode(&table, message, envelope()).is_none());
        }
    }
}
