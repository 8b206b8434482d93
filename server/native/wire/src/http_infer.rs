//! An HTTP infer body (JSON, optionally followed by binary tensor data) -> InferCall, and the
//! answer back to JSON (+ binary outputs), as server/http_api/handlers.py reads and writes them.
//!
//! Only what is plainly well formed takes this path: strict types (a shape of integers, data of
//! the datatype's JSON type in a flat or rectangular list, string ids), no shared memory, no
//! classification. Everything else is left to the Python handlers, which word the refusal.

use std::borrow::Cow;
use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::call::{InferCall, OutTensor, Param, Protocol};
use crate::model::ModelSpec;
use crate::tensor::{bytes_elements, Dtype};
use crate::validate::Checker;

#[derive(Deserialize)]
struct JsonRequest<'a> {
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    parameters: Option<HashMap<Cow<'a, str>, JsonScalar<'a>>>,
    #[serde(borrow)]
    inputs: Vec<JsonInput<'a>>,
    #[serde(default, borrow)]
    outputs: Option<Vec<JsonOutput<'a>>>,
}

#[derive(Deserialize)]
struct JsonInput<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow)]
    datatype: Cow<'a, str>,
    shape: Vec<i64>,
    #[serde(default, borrow)]
    parameters: Option<HashMap<Cow<'a, str>, JsonScalar<'a>>>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct JsonOutput<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(default, borrow)]
    parameters: Option<HashMap<Cow<'a, str>, JsonScalar<'a>>>,
}

/// A parameter value: JSON scalars only (objects and lists are the Python handlers' to judge).
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
enum JsonScalar<'a> {
    Bool(bool),
    Int(i64),
    Uint(u64),
    Double(f64),
    #[serde(borrow)]
    Str(Cow<'a, str>),
}

impl JsonScalar<'_> {
    fn param(&self) -> Param {
        match self {
            JsonScalar::Bool(v) => Param::Bool(*v),
            JsonScalar::Int(v) => Param::Int(*v),
            JsonScalar::Uint(v) => Param::Uint(*v),
            JsonScalar::Double(v) => Param::Double(*v),
            JsonScalar::Str(v) => Param::Str(v.to_string()),
        }
    }
}

/// How the answer is written: which outputs go as binary data, and whether to compress.
#[derive(Clone, Debug, Default)]
pub struct ResponsePlan {
    pub model: String,
    pub id: String,
    pub binary_default: bool,
    pub binary: Vec<(String, bool)>,
}

impl ResponsePlan {
    fn binary(&self, name: &str) -> bool {
        self.binary.iter().find(|(n, _)| n == name).map(|(_, b)| *b).unwrap_or(self.binary_default)
    }
}

/// What the HTTP layer knows beyond the body.
pub struct HttpEnvelope {
    pub slot: u64,
    pub version: String,
    pub received_ns: u64,
    pub authorization: Option<String>,
    pub traceparent: Option<String>,
    /// The value of the model's roll-out split header, when it names one.
    pub split_key: Option<String>,
}

/// The body (decompressed; `json_length` from Inference-Header-Content-Length, None: all JSON)
/// as a call, or None for the Python handlers.
pub fn decode(model: &ModelSpec, body: &Bytes, json_length: Option<usize>, envelope: HttpEnvelope) -> Option<(InferCall, ResponsePlan)> {
    let split = json_length.unwrap_or(body.len());
    if split > body.len() || split > model.json_limit || split == 0 {
        return None;
    }
    let text = std::str::from_utf8(&body[..split]).ok()?;
    let document: JsonRequest = serde_json::from_str(text).ok()?;
    let binary = body.slice(split..);
    let mut offset = 0usize;
    let mut checker = Checker::new(model);
    for input in &document.inputs {
        let accepted = checker.accept(&input.name, &input.datatype, &input.shape)?;
        let mut size = None;
        if let Some(parameters) = &input.parameters {
            for (key, value) in parameters {
                if key.starts_with("shared_memory") {
                    return None;
                }
                if key == "binary_data_size" {
                    size = Some(match value {
                        JsonScalar::Int(v) if *v >= 0 => *v as usize,
                        JsonScalar::Uint(v) => usize::try_from(*v).ok()?,
                        _ => return None,
                    });
                }
            }
        }
        let data = match size {
            // Data given both ways is Python's to refuse (Triton's check).
            Some(_) if input.data.is_some() => return None,
            Some(size) => {
                let end = offset.checked_add(size)?;
                if end > binary.len() {
                    return None;
                }
                let part = binary.slice(offset..end);
                offset = end;
                part
            }
            None => values_to_bytes(accepted.dtype, accepted.count, input.data?.get())?,
        };
        checker.push(&input.name, accepted, input.shape.clone(), data)?;
    }
    if offset != binary.len() {
        return None;
    }
    let mut parameters = Vec::new();
    let mut binary_default = false;
    if let Some(given) = &document.parameters {
        for (key, value) in given {
            if key == "binary_data_output" {
                binary_default = match value {
                    JsonScalar::Bool(v) => *v,
                    _ => return None,
                };
            }
            parameters.push((key.to_string(), value.param()));
        }
    }
    let mut plan = ResponsePlan {
        model: model.name.clone(),
        id: document.id.as_deref().unwrap_or("").to_owned(),
        binary_default,
        binary: Vec::new(),
    };
    let outputs = document.outputs.unwrap_or_default();
    for output in &outputs {
        if let Some(parameters) = &output.parameters {
            for (key, value) in parameters {
                match (key.as_ref(), value) {
                    ("binary_data", JsonScalar::Bool(v)) => plan.binary.push((output.name.to_string(), *v)),
                    ("binary_data", _) => return None,
                    (key, _) if key.starts_with("shared_memory") || key == "classification" => return None,
                    _ => {}
                }
            }
        }
    }
    let requested: Vec<&str> = outputs.iter().map(|output| output.name.as_ref()).collect();
    let (inputs, rows) = checker.finish(&requested)?;
    let call = InferCall {
        slot: envelope.slot,
        protocol: Protocol::Http,
        model: model.name.clone(),
        version: envelope.version,
        id: plan.id.clone(),
        token: model.token,
        rows,
        inputs,
        outputs: requested.iter().map(|name| (*name).to_owned()).collect(),
        parameters,
        received_ns: envelope.received_ns,
        deadline_ns: None,
        authorization: envelope.authorization,
        traceparent: envelope.traceparent,
        split_key: envelope.split_key,
    };
    Some((call, plan))
}

/// JSON `data` (a flat or rectangular nested list of the datatype's JSON type) in wire layout.
fn values_to_bytes(dtype: Dtype, count: u64, text: &str) -> Option<Bytes> {
    let capacity = match dtype.itemsize() {
        Some(size) => count as usize * size,
        None => count as usize * 8,
    };
    let mut sink = ValueSink { dtype, count, seen: 0, out: BytesMut::with_capacity(capacity), widths: Vec::new() };
    let mut deserializer = serde_json::Deserializer::from_str(text);
    Flat { sink: &mut sink, depth: 0 }.deserialize(&mut deserializer).ok()?;
    deserializer.end().ok()?;
    (sink.seen == count).then(|| sink.out.freeze())
}

struct ValueSink {
    dtype: Dtype,
    count: u64,
    seen: u64,
    out: BytesMut,
    /// Length of the first list met at each depth: every later list at that depth must match
    /// (numpy refuses ragged nesting).
    widths: Vec<usize>,
}

#[derive(Debug)]
struct Refused;

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("left to the Python handlers")
    }
}

impl ValueSink {
    fn value<E: de::Error>(&mut self, put: impl FnOnce(&mut BytesMut, Dtype) -> bool) -> Result<(), E> {
        self.seen += 1;
        if self.seen > self.count || !put(&mut self.out, self.dtype) {
            return Err(E::custom(Refused));
        }
        Ok(())
    }
}

/// One level of a (possibly nested) data list.
struct Flat<'s> {
    sink: &'s mut ValueSink,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Flat<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

/// A list element: a value, or (nested data) a list one level deeper.
struct Element<'s> {
    sink: &'s mut ValueSink,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Element<'_> {
    type Value = bool; // true: it was a list

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_any(self)
    }
}

fn put_int(out: &mut BytesMut, dtype: Dtype, value: i128) -> bool {
    macro_rules! fits {
        ($t:ty, $put:ident) => {
            match <$t>::try_from(value) {
                Ok(v) => {
                    out.$put(v);
                    true
                }
                Err(_) => false,
            }
        };
    }
    match dtype {
        Dtype::Int8 => fits!(i8, put_i8),
        Dtype::Int16 => fits!(i16, put_i16_le),
        Dtype::Int32 => fits!(i32, put_i32_le),
        Dtype::Int64 => fits!(i64, put_i64_le),
        Dtype::Uint8 => fits!(u8, put_u8),
        Dtype::Uint16 => fits!(u16, put_u16_le),
        Dtype::Uint32 => fits!(u32, put_u32_le),
        Dtype::Uint64 => fits!(u64, put_u64_le),
        // JSON integers are fine for floating-point datatypes (numpy converts them exactly
        // rounded; `as` rounds to nearest too).
        Dtype::Fp32 => {
            out.put_f32_le(value as f32);
            true
        }
        Dtype::Fp64 => {
            out.put_f64_le(value as f64);
            true
        }
        _ => false,
    }
}

fn put_float(out: &mut BytesMut, dtype: Dtype, value: f64) -> bool {
    match dtype {
        Dtype::Fp32 => out.put_f32_le(value as f32),
        Dtype::Fp64 => out.put_f64_le(value),
        _ => return false,
    }
    true
}

impl<'de> Visitor<'de> for Element<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a tensor value")
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<bool, E> {
        self.sink.value(|out, dtype| {
            dtype == Dtype::Bool && {
                out.put_u8(value as u8);
                true
            }
        })?;
        Ok(false)
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<bool, E> {
        self.sink.value(|out, dtype| put_int(out, dtype, value as i128))?;
        Ok(false)
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<bool, E> {
        self.sink.value(|out, dtype| put_int(out, dtype, value as i128))?;
        Ok(false)
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<bool, E> {
        self.sink.value(|out, dtype| put_float(out, dtype, value))?;
        Ok(false)
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<bool, E> {
        self.sink.value(|out, dtype| {
            dtype == Dtype::Bytes && {
                out.put_u32_le(value.len() as u32);
                out.put_slice(value.as_bytes());
                true
            }
        })?;
        Ok(false)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<bool, A::Error> {
        Flat { sink: self.sink, depth: self.depth }.visit_seq(seq)?;
        Ok(true)
    }
}

impl<'de> Visitor<'de> for Flat<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of tensor values")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut length = 0usize;
        let mut lists: Option<bool> = None;
        while let Some(was_list) = seq.next_element_seed(Element { sink: &mut *self.sink, depth: self.depth + 1 })? {
            // Values and lists never mix within one list.
            if *lists.get_or_insert(was_list) != was_list {
                return Err(de::Error::custom(Refused));
            }
            length += 1;
        }
        let widths = &mut self.sink.widths;
        if widths.len() <= self.depth {
            widths.resize(self.depth + 1, usize::MAX);
        }
        if widths[self.depth] == usize::MAX {
            widths[self.depth] = length;
        } else if widths[self.depth] != length {
            return Err(de::Error::custom(Refused));
        }
        Ok(())
    }
}

/// The JSON answer (+ binary outputs) for a served request: (body, json length when binary
/// parts follow it).
pub fn encode_response(plan: &ResponsePlan, version: &str, outputs: &[OutTensor], parameters: &[(String, Param)]) -> (Vec<u8>, Option<usize>) {
    let mut json = Vec::with_capacity(128 + outputs.iter().map(|o| o.data.len() * 3).sum::<usize>());
    let mut blobs: Vec<&Bytes> = Vec::new();
    json.extend_from_slice(b"{\"model_name\":");
    write_string(&mut json, &plan.model);
    json.extend_from_slice(b",\"model_version\":");
    write_string(&mut json, version);
    json.extend_from_slice(b",\"outputs\":[");
    for (index, output) in outputs.iter().enumerate() {
        if index > 0 {
            json.push(b',');
        }
        json.extend_from_slice(b"{\"name\":");
        write_string(&mut json, &output.name);
        json.extend_from_slice(b",\"datatype\":\"");
        json.extend_from_slice(output.dtype.name().as_bytes());
        json.extend_from_slice(b"\",\"shape\":[");
        for (i, dim) in output.shape.iter().enumerate() {
            if i > 0 {
                json.push(b',');
            }
            json.extend_from_slice(itoa::Buffer::new().format(*dim).as_bytes());
        }
        json.push(b']');
        if plan.binary(&output.name) {
            json.extend_from_slice(b",\"parameters\":{\"binary_data_size\":");
            json.extend_from_slice(itoa::Buffer::new().format(output.data.len()).as_bytes());
            json.push(b'}');
            blobs.push(&output.data);
        } else {
            json.extend_from_slice(b",\"data\":[");
            write_values(&mut json, output.dtype, &output.data);
            json.push(b']');
        }
        json.push(b'}');
    }
    json.push(b']');
    if !plan.id.is_empty() {
        json.extend_from_slice(b",\"id\":");
        write_string(&mut json, &plan.id);
    }
    if !parameters.is_empty() {
        json.extend_from_slice(b",\"parameters\":{");
        for (i, (key, value)) in parameters.iter().enumerate() {
            if i > 0 {
                json.push(b',');
            }
            write_string(&mut json, key);
            json.push(b':');
            write_param(&mut json, value);
        }
        json.push(b'}');
    }
    json.push(b'}');
    if blobs.is_empty() {
        return (json, None);
    }
    let split = json.len();
    for blob in blobs {
        json.extend_from_slice(blob);
    }
    (json, Some(split))
}

pub fn write_string(out: &mut Vec<u8>, text: &str) {
    serde_json::to_writer(&mut *out, text).expect("a string always serialises");
}

fn write_param(out: &mut Vec<u8>, value: &Param) {
    match value {
        Param::Bool(v) => out.extend_from_slice(if *v { b"true" } else { b"false" }),
        Param::Int(v) => out.extend_from_slice(itoa::Buffer::new().format(*v).as_bytes()),
        Param::Uint(v) => out.extend_from_slice(itoa::Buffer::new().format(*v).as_bytes()),
        Param::Double(v) => write_f64(out, *v),
        Param::Str(v) => write_string(out, v),
    }
}

/// Shortest round-trip text, as orjson writes it: `null` for NaN and infinities, a `+` on
/// positive exponents.
fn write_float(out: &mut Vec<u8>, text: &str) {
    match text.find('e') {
        Some(at) if text.as_bytes().get(at + 1) != Some(&b'-') => {
            out.extend_from_slice(&text.as_bytes()[..=at]);
            out.push(b'+');
            out.extend_from_slice(&text.as_bytes()[at + 1..]);
        }
        _ => out.extend_from_slice(text.as_bytes()),
    }
}

fn write_f32(out: &mut Vec<u8>, value: f32) {
    if value.is_finite() {
        write_float(out, ryu::Buffer::new().format_finite(value));
    } else {
        out.extend_from_slice(b"null");
    }
}

fn write_f64(out: &mut Vec<u8>, value: f64) {
    if value.is_finite() {
        write_float(out, ryu::Buffer::new().format_finite(value));
    } else {
        out.extend_from_slice(b"null");
    }
}

/// A tensor's wire bytes as JSON values (BF16 and FP16 widened to float32 as the Python
/// handler does; BYTES as UTF-8 text, invalid sequences replaced).
pub fn write_values(out: &mut Vec<u8>, dtype: Dtype, data: &[u8]) {
    macro_rules! each {
        ($size:expr, $conv:expr) => {
            for (i, chunk) in data.chunks_exact($size).enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                $conv(out, chunk.try_into().expect("chunks_exact"));
            }
        };
    }
    macro_rules! int {
        ($t:ty, $size:expr) => {
            each!($size, |out: &mut Vec<u8>, b: [u8; $size]| out.extend_from_slice(itoa::Buffer::new().format(<$t>::from_le_bytes(b)).as_bytes()))
        };
    }
    match dtype {
        Dtype::Bool => each!(1, |out: &mut Vec<u8>, b: [u8; 1]| out.extend_from_slice(if b[0] != 0 { b"true" } else { b"false" })),
        Dtype::Int8 => int!(i8, 1),
        Dtype::Int16 => int!(i16, 2),
        Dtype::Int32 => int!(i32, 4),
        Dtype::Int64 => int!(i64, 8),
        Dtype::Uint8 => int!(u8, 1),
        Dtype::Uint16 => int!(u16, 2),
        Dtype::Uint32 => int!(u32, 4),
        Dtype::Uint64 => int!(u64, 8),
        Dtype::Fp16 => each!(2, |out: &mut Vec<u8>, b: [u8; 2]| write_f32(out, half::f16::from_le_bytes(b).to_f32())),
        Dtype::Bf16 => each!(2, |out: &mut Vec<u8>, b: [u8; 2]| write_f32(out, half::bf16::from_le_bytes(b).to_f32())),
        Dtype::Fp32 => each!(4, |out: &mut Vec<u8>, b: [u8; 4]| write_f32(out, f32::from_le_bytes(b))),
        Dtype::Fp64 => each!(8, |out: &mut Vec<u8>, b: [u8; 8]| write_f64(out, f64::from_le_bytes(b))),
        Dtype::Bytes => {
            for (i, element) in bytes_elements(data).enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(out, &String::from_utf8_lossy(element));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::tests::add_sub;

    fn envelope() -> HttpEnvelope {
        HttpEnvelope { slot: 3, version: String::new(), received_ns: 0, authorization: None, traceparent: None, split_key: None }
    }

    fn body(text: &str) -> Bytes {
        Bytes::from(text.to_owned())
    }

    const SIXTEEN: &str = "[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16]";

    #[test]
    fn a_json_request_becomes_a_call_and_its_plan() {
        let model = add_sub();
        let text = format!(
            r#"{{"id":"a\"b","parameters":{{"priority":1,"binary_data_output":true}},"inputs":[
            {{"name":"INPUT0","datatype":"FP32","shape":[1,16],"data":{SIXTEEN}}},
            {{"name":"INPUT1","datatype":"FP32","shape":[1,16],"data":[[1.5,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16]]}}],
            "outputs":[{{"name":"OUTPUT0","parameters":{{"binary_data":false}}}}]}}"#
        );
        let (call, plan) = decode(&model, &body(&text), None, envelope()).expect("native");
        assert_eq!(call.id, "a\"b");
        assert_eq!(call.outputs, vec!["OUTPUT0"]);
        assert_eq!(&call.inputs[1].data[..4], &1.5f32.to_le_bytes());
        assert_eq!(&call.inputs[0].data[60..], &16.0f32.to_le_bytes());
        assert!(plan.binary_default && !plan.binary("OUTPUT0") && plan.binary("OUTPUT1"));
        assert!(call.parameters.contains(&("priority".to_owned(), Param::Int(1))));
    }

    #[test]
    fn binary_inputs_are_slices_of_the_body() {
        let model = add_sub();
        let header = r#"{"inputs":[{"name":"INPUT0","datatype":"FP32","shape":[1,16],"parameters":{"binary_data_size":64}},
            {"name":"INPUT1","datatype":"FP32","shape":[1,16],"parameters":{"binary_data_size":64}}]}"#;
        let mut raw = header.as_bytes().to_vec();
        raw.extend(std::iter::repeat_n(7u8, 128));
        let raw = Bytes::from(raw);
        let (call, _) = decode(&model, &raw, Some(header.len()), envelope()).expect("native");
        assert_eq!(call.inputs[1].data.as_ptr(), raw[header.len() + 64..].as_ptr());
        // A byte no input claims, or a size past the end: Python's to refuse.
        let mut extra = raw.to_vec();
        extra.push(0);
        assert!(decode(&model, &Bytes::from(extra), Some(header.len()), envelope()).is_none());
        assert!(decode(&model, &raw.slice(..raw.len() - 1), Some(header.len()), envelope()).is_none());
    }

    #[test]
    fn loose_json_is_left_to_python() {
        let model = add_sub();
        let other = format!(r#"{{"name":"INPUT1","datatype":"FP32","shape":[1,16],"data":{SIXTEEN}}}"#);
        for first in [
            r#"{"name":"INPUT0","datatype":"FP32","shape":[1,16],"data":[1,2,3]}"#.to_owned(),
            r#"{"name":"INPUT0","datatype":"FP32","shape":[1,16],"data":[true,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16]}"#.to_owned(),
            r#"{"name":"INPUT0","datatype":"FP32","shape":[1,16],"data":[[1,2,3,4,5,6,7,8],[9,10,11,12,13,14,15,16,17]]}"#.to_owned(),
            r#"{"name":"INPUT0","datatype":"FP32","shape":[1.0,16],"data":[1]}"#.to_owned(),
            format!(r#"{{"name":"INPUT0","datatype":"FP32","shape":[1,16],"data":{SIXTEEN},"parameters":{{"shared_memory_region":"r"}}}}"#),
            r#"{"name":"INPUT0","datatype":"FP32","shape":[1,16],"data":["1",2,3,4,5,6,7,8,9,10,11,12,13,14,15,16]}"#.to_owned(),
        ] {
            let text = format!(r#"{{"inputs":[{first},{other}]}}"#);
            assert!(decode(&model, &body(&text), None, envelope()).is_none(), "{text}");
        }
        let numeric_id = format!(r#"{{"id":5,"inputs":[{other}]}}"#);
        assert!(decode(&model, &body(&numeric_id), None, envelope()).is_none());
    }

    #[test]
    fn integers_are_range_checked_for_their_datatype() {
        let mut bytes = BytesMut::new();
        assert!(put_int(&mut bytes, Dtype::Int8, 127));
        assert!(!put_int(&mut bytes, Dtype::Int8, 128));
        assert!(!put_int(&mut bytes, Dtype::Uint8, -1));
        assert!(put_int(&mut bytes, Dtype::Uint64, u64::MAX as i128));
        assert!(!put_int(&mut bytes, Dtype::Bool, 1));
        assert!(values_to_bytes(Dtype::Int8, 2, "[1,300]").is_none());
        assert_eq!(values_to_bytes(Dtype::Uint16, 2, "[1,65535]").unwrap().as_ref(), &[1, 0, 255, 255]);
    }

    #[test]
    fn answers_are_written_as_the_python_handler_writes_them() {
        let floats: Vec<u8> = [1.0f32, 0.1, 3.4e38, f32::NAN].iter().flat_map(|v| v.to_le_bytes()).collect();
        let outputs = vec![
            OutTensor { name: "OUTPUT0".into(), dtype: Dtype::Fp32, shape: vec![1, 4], data: Bytes::from(floats) },
            OutTensor { name: "OUTPUT1".into(), dtype: Dtype::Int8, shape: vec![2], data: Bytes::from_static(&[1, 0xff]) },
        ];
        let plan = ResponsePlan { model: "m".into(), id: "x".into(), binary_default: false, binary: vec![("OUTPUT1".into(), true)] };
        let (body, split) = encode_response(&plan, "1", &outputs, &[("p".into(), Param::Bool(true))]);
        let split = split.expect("one binary output");
        assert_eq!(
            std::str::from_utf8(&body[..split]).unwrap(),
            concat!(
                r#"{"model_name":"m","model_version":"1","outputs":["#,
                r#"{"name":"OUTPUT0","datatype":"FP32","shape":[1,4],"data":[1.0,0.1,3.4e+38,null]},"#,
                r#"{"name":"OUTPUT1","datatype":"INT8","shape":[2],"parameters":{"binary_data_size":2}}],"#,
                r#""id":"x","parameters":{"p":true}}"#
            )
        );
        assert_eq!(&body[split..], &[1, 0xff]);
        let mut text = Vec::new();
        write_values(&mut text, Dtype::Bytes, &[2, 0, 0, 0, b'h', 0xff]);
        assert_eq!(String::from_utf8(text).unwrap(), "\"h\u{fffd}\"");
    }
}
