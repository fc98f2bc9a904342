//! Compiles our transcriptions of CRIU's rpc.proto (the RPC protocol) and
//! of the image messages we read (images.proto) with rust-protobuf's pure
//! Rust parser, so building needs no `protoc` on the machine.
//!
//! The generated file starts with inner attributes (`#![allow(...)]`), which
//! `include!` cannot take inside a module; they are moved to `src/rpc.rs`.

use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("proto");
    std::fs::create_dir_all(&out).expect("create OUT_DIR/proto");
    protobuf_codegen::Codegen::new()
        .pure()
        .includes(["proto"])
        .input("proto/rpc.proto")
        .input("proto/images.proto")
        .out_dir(&out)
        .run_from_script();

    for name in ["rpc", "images"] {
        let generated = out.join(format!("{name}.rs"));
        let text = std::fs::read_to_string(&generated).expect("read generated code");
        let body: String = text
            .lines()
            .filter(|l| !l.starts_with("#![") && !l.starts_with("//!"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&generated, body).expect("write generated code");
        println!("cargo:rerun-if-changed=proto/{name}.proto");
    }
}
