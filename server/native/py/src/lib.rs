//! `convoy.server._native`: the native front end as Python sees it.
//!
//! `Frontend(settings)` binds both ports and serves them on its own threads. The event loop
//! watches `fileno()`; when it is readable, `take()` returns every pending item as a tuple
//! (inference calls with their tensors as zero-copy `WireBytes`, forwarded HTTP requests and
//! gRPC calls, cancellations, log lines), and `answer(list)` hands back every answer of a loop
//! turn at once. `set_models` keeps the model table the native path checks requests against.

use std::ffi::{c_int, c_void};
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use pyo3::{ffi, intern};

use convoy_wire::call::{Answer, Failure, GrpcForward, HttpForward, InferCall, Item, LogLevel, OutTensor, Param};
use convoy_wire::errors::{self, Kind};
use convoy_wire::hub::Hub;
use convoy_wire::listen::{Server, Settings};
use convoy_wire::model::{InputSpec, ModelSpec, ModelTable};
use convoy_wire::tensor::Dtype;

/// Received bytes (a tensor, a body, a message) lent to Python without a copy, read-only.
#[pyclass(frozen, module = "convoy.server._native")]
struct WireBytes {
    data: Bytes,
}

#[pymethods]
impl WireBytes {
    fn __len__(&self) -> usize {
        self.data.len()
    }

    fn __bytes__<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.data)
    }

    /// # Safety
    /// `view` is the Py_buffer CPython passes to this slot. The buffer points into `data`, a
    /// `Bytes` this frozen object owns and never changes or moves; `PyBuffer_FillInfo` stores a
    /// new reference to the object in the view, so the bytes outlive every consumer (numpy's
    /// arrays over them keep the view's object alive). Read-only: a writable request fails.
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        let data = &slf.get().data;
        let result = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                data.as_ptr() as *mut c_void,
                data.len() as ffi::Py_ssize_t,
                1,
                flags,
            )
        };
        if result == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

fn internal(what: &str, panic: Box<dyn std::any::Any + Send>) -> PyErr {
    PyRuntimeError::new_err(format!("native front end: {what} failed: {}", errors::panic_text(panic.as_ref())))
}

/// Runs `f`, turning a panic into a RuntimeError (a panic is never a crash).
fn guarded<T>(what: &str, f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| Err(internal(what, panic)))
}

/// One model as `set_models` takes it.
type ModelRow = (String, u64, i64, bool, Vec<(String, String, Vec<i64>, bool)>, Vec<String>, usize, usize, String, String);

#[pyclass(module = "convoy.server._native")]
struct Frontend {
    hub: Arc<Hub>,
    /// Python strings for the names requests repeat (models, versions, tensors), made once.
    names: Mutex<Names>,
    server: Mutex<Option<Server>>,
    #[pyo3(get)]
    http_port: u16,
    #[pyo3(get)]
    grpc_port: u16,
}

fn setting<'py, T: for<'a> FromPyObject<'a, 'py>>(settings: &Bound<'py, PyDict>, key: &str) -> PyResult<T> {
    match settings.get_item(key)? {
        Some(value) => value.extract::<T>().map_err(|_| PyValueError::new_err(format!("native front end: setting '{key}' has the wrong type"))),
        None => Err(PyValueError::new_err(format!("native front end: setting '{key}' is missing"))),
    }
}

fn optional_text(settings: &Bound<'_, PyDict>, key: &str) -> PyResult<Option<String>> {
    match settings.get_item(key)? {
        Some(value) if !value.is_none() => Ok(Some(value.extract()?)),
        _ => Ok(None),
    }
}

#[pymethods]
impl Frontend {
    /// Bind both ports and start serving (requests wait in the hub until Python takes them).
    #[new]
    fn new(py: Python<'_>, settings: &Bound<'_, PyDict>) -> PyResult<Self> {
        guarded("start", || {
            let network = Settings {
                host: setting(settings, "host")?,
                http_port: setting(settings, "http_port")?,
                grpc_port: setting(settings, "grpc_port")?,
                reuse_port: setting(settings, "reuse_port")?,
                max_connections: setting(settings, "max_connections")?,
                header_timeout: Duration::from_secs_f64(setting::<f64>(settings, "header_timeout")?.max(0.001)),
                keep_alive_timeout: Duration::from_secs_f64(setting::<f64>(settings, "keep_alive_timeout")?.max(0.001)),
                max_head_bytes: setting(settings, "max_head_bytes")?,
                max_headers: setting(settings, "max_headers")?,
                http_max_body_bytes: setting(settings, "http_max_body_bytes")?,
                grpc_max_message_bytes: setting(settings, "grpc_max_message_bytes")?,
                threads: setting(settings, "threads")?,
            };
            let tls = match (optional_text(settings, "tls_cert")?, optional_text(settings, "tls_key")?) {
                (Some(cert), Some(key)) => {
                    let client_ca = optional_text(settings, "tls_client_ca")?;
                    let http = convoy_wire::tls::acceptor(&cert, &key, client_ca.as_deref(), b"http/1.1")
                        .map_err(|e| PyOSError::new_err(e.to_string()))?;
                    let grpc = convoy_wire::tls::acceptor(&cert, &key, client_ca.as_deref(), b"h2")
                        .map_err(|e| PyOSError::new_err(e.to_string()))?;
                    Some((Arc::new(http), Arc::new(grpc)))
                }
                _ => None,
            };
            let hub = Hub::new().map_err(|e| PyOSError::new_err(format!("native front end: eventfd: {e}")))?;
            let started = {
                let hub = hub.clone();
                py.detach(move || Server::start(network, hub, tls))
            };
            let server = started.map_err(|e| PyOSError::new_err(e.to_string()))?;
            Ok(Frontend {
                hub,
                names: Mutex::new(Names::default()),
                http_port: server.http_port,
                grpc_port: server.grpc_port,
                server: Mutex::new(Some(server)),
            })
        })
    }

    /// The eventfd that is readable while items wait.
    fn fileno(&self) -> i32 {
        self.hub.fileno()
    }

    /// Every pending item, as tuples (see the module docstring and server/dataplane/).
    fn take<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let items = self.hub.take();
        let list = PyList::empty(py);
        let mut names = self.names.lock();
        for item in items {
            let converted = catch_unwind(AssertUnwindSafe(|| item_to_python(py, item, &mut names)));
            match converted {
                Ok(Ok(tuple)) => list.append(tuple)?,
                Ok(Err(error)) => return Err(error),
                Err(panic) => {
                    let text = errors::panic_text(panic.as_ref());
                    list.append((4, "ERROR", format!("native front end: converting a request failed: {text}")).into_pyobject(py)?)?;
                }
            }
        }
        Ok(list)
    }

    /// Answers for slots (a loop turn's worth): see `answer_from_python` for their shapes.
    fn answer(&self, answers: &Bound<'_, PyList>) -> PyResult<()> {
        guarded("answer", || {
            let mut converted = Vec::with_capacity(answers.len());
            for entry in answers.iter() {
                let tuple = entry.cast_into::<PyTuple>().map_err(|_| PyValueError::new_err("an answer must be a tuple"))?;
                converted.push(answer_from_python(&tuple)?);
            }
            self.hub.deliver(converted);
            Ok(())
        })
    }

    /// Replace the model table: tuples (name, token, max_batch_size, native,
    /// [(input, datatype, dims, optional)], [output names], body_limit, json_limit, reason,
    /// roll-out split header or "").
    fn set_models(&self, models: &Bound<'_, PyList>) -> PyResult<()> {
        guarded("set_models", || {
            let mut specs = Vec::with_capacity(models.len());
            for entry in models.iter() {
                let (name, token, max_batch_size, native, inputs, outputs, body_limit, json_limit, limit_reason, split_header): ModelRow =
                    entry.extract()?;
                let mut declared = Vec::with_capacity(inputs.len());
                let mut native = native;
                for (input, datatype, dims, optional) in inputs {
                    match Dtype::parse(&datatype) {
                        Some(dtype) => declared.push(InputSpec { name: input, dtype, dims, optional }),
                        None => native = false,
                    }
                }
                specs.push(ModelSpec {
                    name,
                    token,
                    max_batch_size,
                    inputs: declared,
                    outputs,
                    native,
                    body_limit,
                    json_limit,
                    limit_reason,
                    split_header: split_header.to_ascii_lowercase(),
                });
            }
            self.hub.set_models(ModelTable::new(specs));
            Ok(())
        })
    }

    /// False once shutdown begins: HTTP answers carry `Connection: close`.
    fn set_accepting(&self, accepting: bool) {
        self.hub.set_accepting(accepting);
    }

    /// Shutdown: drop new SYNs (returns what could not be done, for the log).
    fn filter_new_connections(&self) -> Vec<String> {
        self.server.lock().as_ref().map(Server::filter_new_connections).unwrap_or_default()
    }

    /// Shutdown: stop accepting and close both listeners.
    fn close_listeners(&self) {
        if let Some(server) = self.server.lock().as_ref() {
            server.close_listeners();
        }
    }

    /// Shutdown: let every connection finish what it began, then close.
    fn shutdown_connections(&self) {
        if let Some(server) = self.server.lock().as_ref() {
            server.shutdown_connections();
        }
    }

    /// (open HTTP connections, open gRPC connections, slots awaiting an answer).
    fn status(&self) -> (usize, usize, usize) {
        let (http, grpc) = self.server.lock().as_ref().map(Server::open_connections).unwrap_or((0, 0));
        (http, grpc, self.hub.pending())
    }

    /// Stop the threads (connections still open are closed).
    fn stop(&self, py: Python<'_>) {
        let server = self.server.lock().take();
        if let Some(mut server) = server {
            py.detach(move || server.stop());
        }
    }
}

fn dtype_name<'py>(py: Python<'py>, dtype: Dtype) -> Bound<'py, PyString> {
    match dtype {
        Dtype::Bool => intern!(py, "BOOL").clone(),
        Dtype::Uint8 => intern!(py, "UINT8").clone(),
        Dtype::Uint16 => intern!(py, "UINT16").clone(),
        Dtype::Uint32 => intern!(py, "UINT32").clone(),
        Dtype::Uint64 => intern!(py, "UINT64").clone(),
        Dtype::Int8 => intern!(py, "INT8").clone(),
        Dtype::Int16 => intern!(py, "INT16").clone(),
        Dtype::Int32 => intern!(py, "INT32").clone(),
        Dtype::Int64 => intern!(py, "INT64").clone(),
        Dtype::Fp16 => intern!(py, "FP16").clone(),
        Dtype::Fp32 => intern!(py, "FP32").clone(),
        Dtype::Fp64 => intern!(py, "FP64").clone(),
        Dtype::Bf16 => intern!(py, "BF16").clone(),
        Dtype::Bytes => intern!(py, "BYTES").clone(),
    }
}

fn wire<'py>(py: Python<'py>, data: Bytes) -> PyResult<Bound<'py, PyAny>> {
    Ok(Bound::new(py, WireBytes { data })?.into_any())
}

fn param_to_python<'py>(py: Python<'py>, value: &Param) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Param::Bool(v) => PyBool::new(py, *v).to_owned().into_any(),
        Param::Int(v) => v.into_pyobject(py)?.into_any(),
        Param::Uint(v) => v.into_pyobject(py)?.into_any(),
        Param::Double(v) => PyFloat::new(py, *v).into_any(),
        Param::Str(v) => PyString::new(py, v).into_any(),
    })
}

fn address(py: Python<'_>, address: Option<SocketAddr>) -> PyResult<Bound<'_, PyAny>> {
    match address {
        Some(address) => Ok((address.ip().to_string(), address.port()).into_pyobject(py)?.into_any()),
        None => Ok(py.None().into_bound(py)),
    }
}

/// Python strings for the names requests repeat, each made once (bounded: cleared when full).
#[derive(Default)]
struct Names {
    strings: std::collections::HashMap<String, Py<PyString>>,
}

impl Names {
    const LIMIT: usize = 4096;

    fn get<'py>(&mut self, py: Python<'py>, name: &str) -> Bound<'py, PyString> {
        if let Some(found) = self.strings.get(name) {
            return found.bind(py).clone();
        }
        if self.strings.len() >= Self::LIMIT {
            self.strings.clear();
        }
        let made = PyString::new(py, name);
        self.strings.insert(name.to_owned(), made.clone().unbind());
        made
    }
}

fn infer_to_python<'py>(py: Python<'py>, call: InferCall, names: &mut Names) -> PyResult<Bound<'py, PyTuple>> {
    let inputs = PyList::empty(py);
    for tensor in call.inputs {
        let shape = PyTuple::new(py, &tensor.shape)?;
        inputs.append((names.get(py, &tensor.name), dtype_name(py, tensor.dtype), shape, wire(py, tensor.data)?))?;
    }
    let outputs = PyTuple::new(py, call.outputs.iter().map(|name| names.get(py, name)))?;
    let parameters = PyDict::new(py);
    for (key, value) in &call.parameters {
        parameters.set_item(key, param_to_python(py, value)?)?;
    }
    let protocol = match call.protocol {
        convoy_wire::call::Protocol::Grpc => intern!(py, "grpc"),
        convoy_wire::call::Protocol::GrpcStream => intern!(py, "grpc-stream"),
        convoy_wire::call::Protocol::Http => intern!(py, "http"),
    };
    let fields: Vec<Bound<'_, PyAny>> = vec![
        0u8.into_pyobject(py)?.into_any(),
        call.slot.into_pyobject(py)?.into_any(),
        protocol.clone().into_any(),
        names.get(py, &call.model).into_any(),
        names.get(py, &call.version).into_any(),
        PyString::new(py, &call.id).into_any(),
        call.token.into_pyobject(py)?.into_any(),
        call.rows.into_pyobject(py)?.into_any(),
        inputs.into_any(),
        outputs.into_any(),
        parameters.into_any(),
        call.received_ns.into_pyobject(py)?.into_any(),
        call.deadline_ns.into_pyobject(py)?.into_any(),
        call.authorization.into_pyobject(py)?.into_any(),
        call.traceparent.into_pyobject(py)?.into_any(),
        call.split_key.into_pyobject(py)?.into_any(),
    ];
    PyTuple::new(py, fields)
}

fn http_to_python(py: Python<'_>, forward: HttpForward) -> PyResult<Bound<'_, PyTuple>> {
    let headers = PyList::empty(py);
    for (name, value) in &forward.headers {
        headers.append((PyBytes::new(py, name), PyBytes::new(py, value)))?;
    }
    let fields: Vec<Bound<'_, PyAny>> = vec![
        1u8.into_pyobject(py)?.into_any(),
        forward.slot.into_pyobject(py)?.into_any(),
        PyString::new(py, &forward.method).into_any(),
        PyBytes::new(py, &forward.raw_path).into_any(),
        PyBytes::new(py, &forward.query).into_any(),
        headers.into_any(),
        PyBytes::new(py, &forward.body).into_any(),
        address(py, forward.client)?,
        address(py, Some(forward.server))?,
        PyString::new(py, if forward.tls { "https" } else { "http" }).into_any(),
    ];
    PyTuple::new(py, fields)
}

fn grpc_to_python(py: Python<'_>, forward: GrpcForward) -> PyResult<Bound<'_, PyTuple>> {
    let metadata = PyList::empty(py);
    for (key, value) in &forward.metadata {
        metadata.append((key, value))?;
    }
    let fields: Vec<Bound<'_, PyAny>> = vec![
        2u8.into_pyobject(py)?.into_any(),
        forward.slot.into_pyobject(py)?.into_any(),
        PyString::new(py, &forward.method).into_any(),
        metadata.into_any(),
        PyBytes::new(py, &forward.message).into_any(),
        forward.received_ns.into_pyobject(py)?.into_any(),
        forward.deadline_ns.into_pyobject(py)?.into_any(),
    ];
    PyTuple::new(py, fields)
}

fn item_to_python<'py>(py: Python<'py>, item: Item, names: &mut Names) -> PyResult<Bound<'py, PyTuple>> {
    match item {
        Item::Infer(call) => infer_to_python(py, call, names),
        Item::Http(forward) => http_to_python(py, forward),
        Item::Grpc(forward) => grpc_to_python(py, forward),
        Item::Cancel(slot) => (3, slot).into_pyobject(py),
        Item::Log(level, message) => {
            let level = match level {
                LogLevel::Debug => "DEBUG",
                LogLevel::Info => "INFO",
                LogLevel::Warning => "WARNING",
                LogLevel::Error => "ERROR",
            };
            (4, level, message).into_pyobject(py)
        }
    }
}

/// A tensor's bytes, copied out of any object with the buffer protocol (a numpy array, bytes).
fn buffer_bytes(object: &Bound<'_, PyAny>) -> PyResult<Bytes> {
    if let Ok(bytes) = object.cast::<PyBytes>() {
        return Ok(Bytes::copy_from_slice(bytes.as_bytes()));
    }
    let buffer = PyUntypedBuffer::get(object)?;
    if !buffer.is_c_contiguous() {
        let bytes = object.call_method0(intern!(object.py(), "tobytes"))?;
        return buffer_bytes(&bytes);
    }
    let length = buffer.len_bytes();
    // SAFETY: the buffer is C-contiguous and `length` bytes long at buf_ptr, valid until the
    // view is released when `buffer` drops (after the copy). We hold the GIL; the arrays passed
    // here are a finished batch's outputs, which nothing writes to any more.
    let data = unsafe { std::slice::from_raw_parts(buffer.buf_ptr() as *const u8, length) };
    Ok(Bytes::copy_from_slice(data))
}

fn param_from_python(value: &Bound<'_, PyAny>) -> PyResult<Param> {
    if let Ok(v) = value.cast::<PyBool>() {
        return Ok(Param::Bool(v.is_true()));
    }
    if value.is_instance_of::<PyInt>() {
        if let Ok(v) = value.extract::<i64>() {
            return Ok(Param::Int(v));
        }
        return Ok(Param::Uint(value.extract::<u64>()?));
    }
    if let Ok(v) = value.cast::<PyFloat>() {
        return Ok(Param::Double(v.value()));
    }
    Ok(Param::Str(value.str()?.to_string()))
}

fn parameters_from_python(value: &Bound<'_, PyAny>) -> PyResult<Vec<(String, Param)>> {
    if value.is_none() {
        return Ok(Vec::new());
    }
    let dict = value.cast::<PyDict>().map_err(|_| PyValueError::new_err("response parameters must be a dict"))?;
    let mut parameters = Vec::with_capacity(dict.len());
    for (key, value) in dict.iter() {
        parameters.push((key.str()?.to_string(), param_from_python(&value)?));
    }
    Ok(parameters)
}

/// One answer: (slot, kind, ...):
///   0 outputs   (version, [(name, datatype, shape, data)], parameters | None)
///   1 failure   (grpc_code, http_status, message, retry_after_ms | None, fatal)
///   2 message   (bytes)                       a forwarded gRPC call's response
///   3 finished  ()                            a stream slot is done
///   4 http head (status, [(name, value)], body, more)
///   5 http body (chunk, more)
fn answer_from_python(tuple: &Bound<'_, PyTuple>) -> PyResult<(u64, Answer)> {
    let slot: u64 = tuple.get_item(0)?.extract()?;
    let kind: u8 = tuple.get_item(1)?.extract()?;
    let answer = match kind {
        0 => {
            let version: String = tuple.get_item(2)?.extract()?;
            let items = tuple.get_item(3)?;
            let items = items.cast::<PyList>().map_err(|_| PyValueError::new_err("outputs must be a list"))?;
            let mut outputs = Vec::with_capacity(items.len());
            for item in items.iter() {
                let item = item.cast_into::<PyTuple>().map_err(|_| PyValueError::new_err("an output must be a tuple"))?;
                let name: String = item.get_item(0)?.extract()?;
                let datatype: String = item.get_item(1)?.extract()?;
                let dtype = Dtype::parse(&datatype).ok_or_else(|| PyValueError::new_err(format!("unknown datatype {datatype}")))?;
                let shape: Vec<i64> = item.get_item(2)?.extract()?;
                let data = buffer_bytes(&item.get_item(3)?)?;
                outputs.push(OutTensor { name, dtype, shape, data });
            }
            let parameters = parameters_from_python(&tuple.get_item(4)?)?;
            Answer::Outputs { version, outputs, parameters }
        }
        1 => Answer::Failed(Failure {
            grpc_code: tuple.get_item(2)?.extract()?,
            http_status: tuple.get_item(3)?.extract()?,
            message: tuple.get_item(4)?.extract()?,
            retry_after_ms: tuple.get_item(5)?.extract()?,
            fatal: tuple.get_item(6)?.extract()?,
        }),
        2 => Answer::Message(buffer_bytes(&tuple.get_item(2)?)?),
        3 => Answer::Finished,
        4 => {
            let headers: Vec<(Vec<u8>, Vec<u8>)> = tuple.get_item(3)?.extract()?;
            Answer::HttpHead {
                status: tuple.get_item(2)?.extract()?,
                headers: headers.into_iter().map(|(n, v)| (Bytes::from(n), Bytes::from(v))).collect(),
                body: buffer_bytes(&tuple.get_item(4)?)?,
                more: tuple.get_item(5)?.extract()?,
            }
        }
        5 => Answer::HttpBody { chunk: buffer_bytes(&tuple.get_item(2)?)?, more: tuple.get_item(3)?.extract()? },
        other => return Err(PyValueError::new_err(format!("unknown answer kind {other}"))),
    };
    Ok((slot, answer))
}

/// The statuses the native side gives the errors it raises itself: (class, gRPC name, HTTP).
#[pyfunction]
fn error_table() -> Vec<(&'static str, &'static str, u16)> {
    Kind::ALL.iter().map(|kind| {
        let (name, _, http) = kind.status();
        (kind.class(), name, http)
    }).collect()
}

#[pymodule]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<Frontend>()?;
    module.add_class::<WireBytes>()?;
    module.add_function(wrap_pyfunction!(error_table, module)?)?;
    module.add("STREAM_BACKLOG", convoy_wire::grpc::STREAM_BACKLOG)?;
    Ok(())
}
