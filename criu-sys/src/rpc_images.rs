//! The image messages we read, generated at build time from
//! `proto/images.proto` (our transcription of parts of CRIU's
//! `images/core.proto` and `images/creds.proto`); see [`crate::images`].

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

include!(concat!(env!("OUT_DIR"), "/proto/images.rs"));
