//! Compiles the wire contract with protox (a pure-Rust protobuf compiler), so a fresh
//! machine builds without a system `protoc`.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "fedpersona/v1/federation.proto",
        "fedpersona/local/v1/local.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("fedpersona_v1.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
