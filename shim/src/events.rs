//! Task events to containerd, in order, off the request path.
//!
//! Publishing is a ttrpc call to containerd; doing it inline would make every
//! RPC wait on containerd and could deadlock when containerd is itself
//! waiting on us. One thread sends events in the order they were queued, so
//! TaskExit never overtakes TaskStart.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused,
    TaskResumed,
};
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::context::Context;
use containerd_shim::publisher::RemotePublisher;

pub enum Event {
    Create(TaskCreate),
    Start { container_id: String, pid: u32 },
    Exit(TaskExit),
    Delete(TaskDelete),
    ExecAdded(TaskExecAdded),
    ExecStarted(TaskExecStarted),
    Paused(String),
    Resumed(String),
    Oom(String),
}

impl Event {
    fn into_message(self) -> (&'static str, Box<dyn MessageDyn>) {
        use containerd_shim::protos::events::task::TaskStart;
        match self {
            Event::Create(e) => (topics::TASK_CREATE_EVENT_TOPIC, Box::new(e)),
            Event::Start { container_id, pid } => (
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id,
                    pid,
                    ..Default::default()
                }),
            ),
            Event::Exit(e) => (topics::TASK_EXIT_EVENT_TOPIC, Box::new(e)),
            Event::Delete(e) => (topics::TASK_DELETE_EVENT_TOPIC, Box::new(e)),
            Event::ExecAdded(e) => (topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(e)),
            Event::ExecStarted(e) => (topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(e)),
            Event::Paused(id) => (
                topics::TASK_PAUSED_EVENT_TOPIC,
                Box::new(TaskPaused {
                    container_id: id,
                    ..Default::default()
                }),
            ),
            Event::Resumed(id) => (
                topics::TASK_RESUMED_EVENT_TOPIC,
                Box::new(TaskResumed {
                    container_id: id,
                    ..Default::default()
                }),
            ),
            Event::Oom(id) => (
                topics::TASK_OOM_EVENT_TOPIC,
                Box::new(TaskOOM {
                    container_id: id,
                    ..Default::default()
                }),
            ),
        }
    }
}

pub struct Events {
    tx: Mutex<Sender<Event>>,
    /// Events queued and not yet handed to containerd: a shim that exits
    /// must not take them with it (the TaskDelete of its last container
    /// is queued just before containerd asks it to shut down).
    unsent: Arc<AtomicUsize>,
}

impl Events {
    pub fn start(publisher: RemotePublisher, namespace: String) -> Events {
        let (tx, rx) = channel::<Event>();
        let unsent = Arc::new(AtomicUsize::new(0));
        let sent = unsent.clone();
        std::thread::Builder::new()
            .name("events".into())
            .spawn(move || {
                for ev in rx {
                    let (topic, msg) = ev.into_message();
                    if let Err(e) = publisher.publish(Context::default(), topic, &namespace, msg) {
                        log::warn!("publish {topic}: {e}");
                    }
                    sent.fetch_sub(1, Ordering::SeqCst);
                }
            })
            .expect("spawn events thread");
        Events {
            tx: Mutex::new(tx),
            unsent,
        }
    }

    pub fn send(&self, ev: Event) {
        self.unsent.fetch_add(1, Ordering::SeqCst);
        if self.tx.lock().unwrap().send(ev).is_err() {
            self.unsent.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Waits (at most `limit`) until every queued event has been handed
    /// to containerd; false if some are still waiting.
    pub fn flush(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.unsent.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Events that go to `rx` instead of containerd, for unit tests.
    #[cfg(test)]
    pub fn captured() -> (Events, std::sync::mpsc::Receiver<Event>) {
        let (tx, rx) = channel::<Event>();
        let events = Events {
            tx: Mutex::new(tx),
            unsent: Arc::new(AtomicUsize::new(0)),
        };
        (events, rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shim that shuts down waits for what is queued, and no longer.
    #[test]
    fn flush_waits_for_every_queued_event() {
        let (events, rx) = Events::captured();
        assert!(events.flush(Duration::ZERO), "nothing queued");
        events.send(Event::Oom("c".into()));
        assert!(
            !events.flush(Duration::from_millis(20)),
            "one not taken yet"
        );
        let taken = rx.recv().unwrap();
        assert!(matches!(taken, Event::Oom(_)));
        events.unsent.fetch_sub(1, Ordering::SeqCst); // as the sender thread does
        assert!(events.flush(Duration::from_millis(20)));
    }
}
