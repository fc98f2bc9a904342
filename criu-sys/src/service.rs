//! The CRIU end of the protocol: what `criu swrk <fd>` does with its socket.
//!
//! For programs that stand in for CRIU towards a client that speaks the
//! protocol (runc, for one): they receive `criu_req`s here, and answer with
//! `criu_resp`s, relaying to the real CRIU through [`crate::Criu`].

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use crate::error::Result;
use crate::rpc::{CriuReq, CriuResp};
use crate::transport::{recv_message, send_message};

pub struct ServiceSocket {
    fd: OwnedFd,
}

impl ServiceSocket {
    /// Wraps the socket a client handed us (the `<fd>` of `swrk <fd>`).
    pub fn new(fd: OwnedFd) -> Self {
        ServiceSocket { fd }
    }

    /// The next request and any descriptors sent with it; `None` when the
    /// client closed the connection.
    pub fn recv_request(&self) -> Result<Option<(CriuReq, Vec<OwnedFd>)>> {
        recv_message::<CriuReq>(self.fd.as_raw_fd())
    }

    pub fn send_response(&self, resp: &CriuResp, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        send_message(self.fd.as_raw_fd(), resp, fd.map(|f| f.as_raw_fd()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::CriuReqType;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    #[test]
    fn requests_and_responses_cross_a_seqpacket_pair_with_fds() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let client = ServiceSocket::new(a);
        let server = ServiceSocket::new(b);
        let mut req = CriuReq::new();
        req.set_type(CriuReqType::DUMP);
        req.set_notify_success(true);
        send_message(client.fd.as_raw_fd(), &req, None).unwrap();
        let (got, fds) = server.recv_request().unwrap().unwrap();
        assert_eq!(got.type_(), CriuReqType::DUMP);
        assert!(got.notify_success() && fds.is_empty());

        let mut resp = CriuResp::new();
        resp.set_type(CriuReqType::NOTIFY);
        resp.set_success(true);
        let devnull = std::fs::File::open("/dev/null").unwrap();
        use std::os::fd::AsFd;
        server.send_response(&resp, Some(devnull.as_fd())).unwrap();
        let (got, fds) = recv_message::<CriuResp>(client.fd.as_raw_fd())
            .unwrap()
            .unwrap();
        assert_eq!(got.type_(), CriuReqType::NOTIFY);
        assert_eq!(fds.len(), 1, "the descriptor travels with the message");
        drop(server);
        assert!(client.recv_request().unwrap().is_none(), "EOF on close");
    }
}
