//! SHA-256 on a thread of its own.
//!
//! Members hashed whole (those of plain tars and of format 1-2 archives,
//! which no frame table covers) cost about 1.5 s of one core per 2 GiB of
//! memory pages on these machines (SHA-NI). Done inline that adds to the
//! publish or the fetch; on its own thread it overlaps with reading,
//! compressing and writing. Buffers travel by value (no copies) and come
//! back through the caller's recycle channel once hashed.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

pub struct HashThread {
    tx: Option<SyncSender<(Vec<u8>, usize)>>,
    done: Option<JoinHandle<String>>,
}

impl HashThread {
    /// A hasher that hands every buffer back on `recycle` (if anyone still
    /// listens) once it has hashed it.
    pub fn spawn(recycle: SyncSender<Vec<u8>>) -> HashThread {
        let (tx, rx): (_, Receiver<(Vec<u8>, usize)>) = sync_channel(4);
        let done = std::thread::spawn(move || {
            let mut hash = Sha256::new();
            for (buf, len) in rx {
                hash.update(&buf[..len]);
                let _ = recycle.try_send(buf);
            }
            super::archive::hex(&hash.finalize())
        });
        HashThread {
            tx: Some(tx),
            done: Some(done),
        }
    }

    /// Hashes `buf[..len]` next.
    pub fn update(&self, buf: Vec<u8>, len: usize) {
        self.tx
            .as_ref()
            .expect("not finished")
            .send((buf, len))
            .expect("the hash thread outlives its sender");
    }

    /// The hex digest of everything given.
    pub fn finish(mut self) -> String {
        drop(self.tx.take());
        self.done
            .take()
            .expect("finished once")
            .join()
            .expect("hash thread panicked")
    }
}

impl Drop for HashThread {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.done.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_match_inline_hashing_and_buffers_come_back() {
        let (recycle_tx, recycle_rx) = sync_channel(8);
        let h = HashThread::spawn(recycle_tx);
        let mut inline = Sha256::new();
        for i in 0..5u8 {
            let buf = vec![i; 1000];
            inline.update(&buf[..700]);
            h.update(buf, 700);
        }
        assert_eq!(h.finish(), crate::migrate::archive::hex(&inline.finalize()));
        assert_eq!(recycle_rx.try_iter().count(), 5);
    }
}
