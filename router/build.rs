// Generates the gRPC client from proto/ (the contract shared with the Python worker).
// protoc comes from the protoc-bin-vendored crate: no system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .build_server(false)
        .compile_with_config(config, &["../proto/saw.proto"], &["../proto"])?;
    println!("cargo:rerun-if-changed=../proto/saw.proto");
    Ok(())
}
