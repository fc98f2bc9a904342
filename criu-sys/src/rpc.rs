//! The messages of CRIU's RPC protocol, generated at build time from
//! `proto/rpc.proto` (our transcription of CRIU's `images/rpc.proto`).
//!
//! The generated names keep CRIU's snake_case (`Criu_opts`); the aliases below
//! give the ones the rest of the crate uses a Rust spelling.

#![allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    dead_code,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_attributes,
    unused_results,
    unused_mut,
    trivial_casts,
    unused_imports
)]

include!(concat!(env!("OUT_DIR"), "/proto/rpc.rs"));

pub type CriuOpts = Criu_opts;
pub type CriuReq = Criu_req;
pub type CriuResp = Criu_resp;
pub type CriuReqType = Criu_req_type;
pub type CriuVersion = Criu_version;
pub type CriuFeatures = Criu_features;
