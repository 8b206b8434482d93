//! The refusals the native front end words itself (limits it enforces before anything reaches
//! Python), on convoy/errors.py's table, and the guard that keeps a panic from crashing.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;

use crate::call::{Failure, LogLevel};
use crate::hub::Hub;

/// convoy/errors.py's INTERNAL_MESSAGE: what a client sees of an internal fault.
pub const INTERNAL_MESSAGE: &str = "internal error (details are in the server log)";

/// The error classes the native side raises, with convoy/errors.py's statuses for them (a
/// Python test checks the two tables agree).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    InvalidInput,
    Unavailable,
    Internal,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::InvalidInput, Kind::Unavailable, Kind::Internal];

    /// The Python class name.
    pub fn class(self) -> &'static str {
        match self {
            Kind::InvalidInput => "InvalidInput",
            Kind::Unavailable => "Unavailable",
            Kind::Internal => "Exception",
        }
    }

    /// (gRPC status name, gRPC code, HTTP status).
    pub fn status(self) -> (&'static str, i32, u16) {
        match self {
            Kind::InvalidInput => ("INVALID_ARGUMENT", 3, 400),
            Kind::Unavailable => ("UNAVAILABLE", 14, 503),
            Kind::Internal => ("INTERNAL", 13, 500),
        }
    }

    pub fn failure(self, message: impl Into<String>) -> Failure {
        let (_, grpc_code, http_status) = self.status();
        Failure { grpc_code, http_status, message: message.into(), retry_after_ms: None, fatal: false }
    }
}

pub fn panic_text(panic: &(dyn Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

/// Runs a request handler; a panic in it becomes `on_panic`'s answer (a generic INTERNAL) and
/// a line in the server log, never a dropped connection or a crashed process.
pub async fn guard_async<F, T>(hub: Arc<Hub>, future: F, on_panic: impl FnOnce(String) -> T) -> T
where
    F: Future<Output = T>,
{
    match AssertUnwindSafe(future).catch_unwind().await {
        Ok(value) => value,
        Err(panic) => {
            let text = panic_text(panic.as_ref());
            hub.log(LogLevel::Error, format!("native front end: a request handler panicked: {text}"));
            on_panic(text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::Item;

    #[test]
    fn a_panicking_handler_answers_its_fallback_and_logs_the_detail() {
        let hub = Hub::new().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let answer = runtime.block_on(guard_async(
            hub.clone(),
            async {
                if hub.pending() == 0 {
                    panic!("index 7 out of range");
                }
                "served"
            },
            |_| "internal error",
        ));
        assert_eq!(answer, "internal error");
        match hub.take().as_slice() {
            [Item::Log(LogLevel::Error, line)] => assert!(line.contains("index 7 out of range"), "{line}"),
            other => panic!("expected one log line, got {other:?}"),
        }
    }

    #[test]
    fn the_table_names_the_python_classes_and_their_statuses() {
        let rows: Vec<_> = Kind::ALL.iter().map(|k| (k.class(), k.status())).collect();
        assert_eq!(rows[0], ("InvalidInput", ("INVALID_ARGUMENT", 3, 400)));
        assert_eq!(Kind::Unavailable.failure("x").http_status, 503);
    }
}
