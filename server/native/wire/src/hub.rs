//! The hand-off between the native front end's threads and Python's event loop.
//!
//! Requests go into `inbox`; the first one after the loop last took wakes it through an
//! eventfd the loop watches (`loop.add_reader`), and the loop takes everything pending in one
//! `take`. Each request has a slot; its answers arrive through `deliver`, called by the loop
//! once per turn with every answer of that turn, and go to the task waiting on the slot.
//! Nothing here holds the GIL: the Python side converts what it takes and delivers.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, oneshot};

use crate::call::{Answer, Item, LogLevel};
use crate::model::ModelTable;

/// Where a slot's answers go.
enum Waiter {
    /// One answer ends the slot.
    Once(oneshot::Sender<Answer>),
    /// Answers until `Finished` (or a final one the receiver recognises); tagged with the slot.
    Many(mpsc::UnboundedSender<(u64, Answer)>),
}

pub struct Hub {
    inbox: Mutex<Vec<Item>>,
    wake: OwnedFd,
    /// True when the loop has taken everything and waits for the eventfd.
    armed: AtomicBool,
    waiters: Mutex<HashMap<u64, Waiter>>,
    next_slot: AtomicU64,
    /// False once shutdown has begun: HTTP answers carry `Connection: close`.
    accepting: AtomicBool,
    models: RwLock<Arc<ModelTable>>,
}

/// CLOCK_MONOTONIC in nanoseconds: the clock Python's time.monotonic_ns reads.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

impl Hub {
    pub fn new() -> std::io::Result<Arc<Hub>> {
        // SAFETY: eventfd has no memory arguments; a negative return is an error, checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor this function owns.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Arc::new(Hub {
            inbox: Mutex::new(Vec::with_capacity(256)),
            wake,
            armed: AtomicBool::new(true),
            waiters: Mutex::new(HashMap::new()),
            next_slot: AtomicU64::new(1),
            accepting: AtomicBool::new(true),
            models: RwLock::new(Arc::new(ModelTable::default())),
        }))
    }

    /// The descriptor the loop watches for readability.
    pub fn fileno(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    pub fn models(&self) -> Arc<ModelTable> {
        self.models.read().clone()
    }

    pub fn set_models(&self, table: ModelTable) {
        *self.models.write() = Arc::new(table);
    }

    pub fn accepting(&self) -> bool {
        self.accepting.load(Ordering::Relaxed)
    }

    pub fn set_accepting(&self, accepting: bool) {
        self.accepting.store(accepting, Ordering::Relaxed);
    }

    /// A fresh slot number (never 0).
    pub fn new_slot(&self) -> u64 {
        self.next_slot.fetch_add(1, Ordering::Relaxed)
    }

    /// A slot answered once.
    pub fn register_once(&self) -> (u64, oneshot::Receiver<Answer>) {
        let slot = self.new_slot();
        (slot, self.register_once_at(slot))
    }

    pub fn register_once_at(&self, slot: u64) -> oneshot::Receiver<Answer> {
        let (sender, receiver) = oneshot::channel();
        self.waiters.lock().insert(slot, Waiter::Once(sender));
        receiver
    }

    /// A slot whose answers go to `sender` (a stream's, or a forwarded HTTP response's parts).
    pub fn register_many(&self, sender: &mpsc::UnboundedSender<(u64, Answer)>) -> u64 {
        let slot = self.new_slot();
        self.register_many_at(slot, sender);
        slot
    }

    pub fn register_many_at(&self, slot: u64, sender: &mpsc::UnboundedSender<(u64, Answer)>) {
        self.waiters.lock().insert(slot, Waiter::Many(sender.clone()));
    }

    /// Hand an item to the loop, waking it if it waits.
    pub fn submit(&self, item: Item) {
        self.inbox.lock().push(item);
        self.wake_loop();
    }

    pub fn log(&self, level: LogLevel, message: String) {
        self.submit(Item::Log(level, message));
    }

    fn wake_loop(&self) {
        if self.armed.swap(false, Ordering::AcqRel) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a local u64 into our own eventfd. It cannot block
            // (EFD_NONBLOCK); EAGAIN (counter full) still leaves the fd readable.
            unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    /// Everything pending (the loop's side): clears the eventfd first, then re-arms, then
    /// drains, so an item pushed at any point either is in this take or wakes the loop again.
    pub fn take(&self) -> Vec<Item> {
        let mut counter: u64 = 0;
        // SAFETY: reads at most 8 bytes into a local u64 from our own non-blocking eventfd.
        unsafe { libc::read(self.wake.as_raw_fd(), (&mut counter as *mut u64).cast(), 8) };
        self.armed.store(true, Ordering::Release);
        std::mem::replace(&mut *self.inbox.lock(), Vec::with_capacity(256))
    }

    /// Route answers to their waiting tasks; answers for slots nobody waits on any more
    /// (the client went away) are dropped.
    pub fn deliver(&self, answers: Vec<(u64, Answer)>) {
        let mut waiters = self.waiters.lock();
        for (slot, answer) in answers {
            match waiters.get(&slot) {
                None => {}
                Some(Waiter::Once(_)) => {
                    if let Some(Waiter::Once(sender)) = waiters.remove(&slot) {
                        let _ = sender.send(answer);
                    }
                }
                Some(Waiter::Many(sender)) => {
                    let last = answer.is_last();
                    let _ = sender.send((slot, answer));
                    if last {
                        waiters.remove(&slot);
                    }
                }
            }
        }
    }

    /// The waiting side gave up on `slot` (its client went away): forget it and tell Python.
    pub fn abandon(&self, slot: u64) {
        if self.waiters.lock().remove(&slot).is_some() {
            self.submit(Item::Cancel(slot));
        }
    }

    /// Slots still waiting for an answer.
    pub fn pending(&self) -> usize {
        self.waiters.lock().len()
    }
}

/// Abandons its slot when dropped before `disarm`: a handler future dropped because its client
/// went away (HTTP connection closed, gRPC call reset) cancels the request in Python.
pub struct SlotGuard {
    hub: Arc<Hub>,
    slot: u64,
    armed: bool,
}

impl SlotGuard {
    pub fn new(hub: &Arc<Hub>, slot: u64) -> Self {
        SlotGuard { hub: hub.clone(), slot, armed: true }
    }

    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if self.armed {
            self.hub.abandon(self.slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::Failure;

    fn readable(hub: &Hub) -> bool {
        let mut poll = libc::pollfd { fd: hub.fileno(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd we own, zero timeout.
        unsafe { libc::poll(&mut poll, 1, 0) == 1 }
    }

    #[test]
    fn the_first_item_after_a_take_wakes_the_loop_and_later_ones_do_not_write_again() {
        let hub = Hub::new().unwrap();
        assert!(!readable(&hub));
        hub.submit(Item::Cancel(1));
        assert!(readable(&hub));
        hub.submit(Item::Cancel(2));
        let items = hub.take();
        assert_eq!(items.len(), 2);
        assert!(!readable(&hub));
        hub.submit(Item::Cancel(3));
        assert!(readable(&hub));
        assert_eq!(hub.take().len(), 1);
    }

    #[test]
    fn answers_reach_their_own_slot_and_abandoned_slots_are_cancelled_in_python() {
        let hub = Hub::new().unwrap();
        let (first, mut first_rx) = hub.register_once();
        let (second, mut second_rx) = hub.register_once();
        let failure = |text: &str| {
            Answer::Failed(Failure { grpc_code: 3, http_status: 400, message: text.into(), retry_after_ms: None, fatal: false })
        };
        hub.deliver(vec![(second, failure("two")), (first, failure("one")), (999, failure("nobody"))]);
        match (first_rx.try_recv().unwrap(), second_rx.try_recv().unwrap()) {
            (Answer::Failed(a), Answer::Failed(b)) => assert_eq!((a.message.as_str(), b.message.as_str()), ("one", "two")),
            other => panic!("unexpected {other:?}"),
        }
        let (third, _rx) = hub.register_once();
        {
            let _guard = SlotGuard::new(&hub, third);
        }
        assert!(matches!(hub.take().as_slice(), [Item::Cancel(slot)] if *slot == third));
        assert_eq!(hub.pending(), 0);
    }

    #[test]
    fn a_stream_slot_gets_every_message_until_finished() {
        let hub = Hub::new().unwrap();
        let (sender, mut receiver) = mpsc::unbounded_channel();
        let slot = hub.register_many(&sender);
        hub.deliver(vec![(slot, Answer::Message(bytes::Bytes::from_static(b"a")))]);
        hub.deliver(vec![(slot, Answer::Message(bytes::Bytes::from_static(b"b"))), (slot, Answer::Finished)]);
        let mut seen = Vec::new();
        while let Ok((got, answer)) = receiver.try_recv() {
            assert_eq!(got, slot);
            seen.push(answer);
        }
        assert_eq!(seen.len(), 3);
        assert!(matches!(seen[2], Answer::Finished));
        assert_eq!(hub.pending(), 0);
    }
}
